"""One web request's work, without HTTP: store the uploads, find the case, gate it, run ``brainseg infer``'s job, view.

Segmentation is `brainseg_monai.inference.runner.run_inference`, the function behind ``brainseg infer``, run on the
request's temporary folder with the same channel roles and rules; the page shows what it wrote and how the uploaded
series or files fill the model's channels, and the user may set those roles by hand (`channel_overrides`). Every
uploaded and unzipped file is checked before anything reads it (`check_detached_data`: no header may send the reader
outside the upload). Messages name each file as it was uploaded, never by its path on the server. The request's
folder is removed when the request ends; those of a server that was killed are removed when the next one starts.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from brainseg_monai.channel_roles import InputRoles
from brainseg_monai.errors import InputError
from brainseg_monai.inference.cases import Case, discover_cases
from brainseg_monai.inference.postprocess import PostProcessing, slice_stacks
from brainseg_monai.inference.runner import InferenceSettings, run_inference
from brainseg_monai.inference.tta import TTA_MODES
from brainseg_monai.model import ModelSpec, load_model
from brainseg_monai.untrusted import check_detached_data
from brainseg_monai.webapp.gate import check_dicom_modality, check_plausible_mr
from brainseg_monai.webapp.roles import channel_overrides, describe_inputs, one_channel_choice
from brainseg_monai.webapp.uploads import (
    ShownNames,
    SizeBudget,
    Uploads,
    UploadTooLarge,
    sort_uploads,
    stem_of,
    store_upload,
    unpack_zip,
)
from brainseg_monai.webapp.view import case_view, read_channels_first

__all__ = ["DEFAULT_TTA", "TMP_PREFIX", "CaseRefused", "SegmentationFailed", "Segmenter", "Upload",
           "remove_stale_uploads"]

logger = logging.getLogger(__name__)

#: The TTA of ``brainseg infer``, which every figure of the shipped model describes; the page offers the others.
DEFAULT_TTA = InferenceSettings.tta

#: A zip may unpack to at most this many times the upload limit (DICOM compresses well; zip bombs do not pass).
ZIP_EXPANSION = 4

TMP_PREFIX = "brainseg-serve-"
"""Each request's temporary folder is ``$TMPDIR/brainseg-serve-<server PID>-<random>``: the PID lets a later server
tell the folders of a killed one from those of one still running."""


@dataclass
class Upload:
    """One uploaded file: the name the browser gave and a readable binary stream."""

    filename: str
    stream: BinaryIO


class CaseRefused(InputError):
    """A case that cannot run as it stands, with what the page needs to let the user set its channel roles.

    ``inputs`` is `describe_inputs`' listing of the case (series or files found, what each was taken to be, the
    channel choices), free of server paths.
    """

    def __init__(self, path: str | os.PathLike | None, reason: str, inputs: dict) -> None:
        super().__init__(path, reason)
        self.inputs = inputs


class SegmentationFailed(Exception):
    """An unforeseen failure while segmenting, its message already free of the server's temporary paths."""


def remove_stale_uploads(folder: str | os.PathLike | None = None) -> list[Path]:
    """Remove the request folders (``brainseg-serve-*`` in ``folder``, default ``$TMPDIR``) of servers that stopped.

    A server killed mid-request leaves its uploads behind (patient images, possibly large). A folder is kept while
    the server whose PID its name carries runs (this one's included); folders of this user without a PID in their
    name (written before the name carried it) are removed. Returns the folders removed.
    """
    root = Path(folder or tempfile.gettempdir())
    removed = []
    for path in root.glob(f"{TMP_PREFIX}*"):
        pid, _, rest = path.name[len(TMP_PREFIX):].partition("-")
        try:
            if not path.is_dir() or path.is_symlink() or path.stat().st_uid != os.getuid():
                continue
        except OSError:
            continue
        if pid.isdigit() and rest and _running(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        logger.info("removed %d upload folder(s) left by a server that stopped: %s", len(removed),
                    ", ".join(p.name for p in removed))
    return removed


def _running(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Segmenter:
    """Segments uploads with one checkpoint, one request at a time (inference uses every core).

    Removes the upload folders of servers that were killed (`remove_stale_uploads`) when created.

    Args:
        checkpoint: ``model.pt`` with its ``model.json`` beside it, as for ``brainseg infer``.
        max_upload_mb: limit of one request's uploads together, in MB (2**20 bytes).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.

    Raises:
        InputError: when the checkpoint is missing or unreadable (checked once, at start).
        ValueError: when ``max_upload_mb`` is not positive or the model's stored post-processing is invalid.
    """

    def __init__(self, checkpoint: str | os.PathLike, max_upload_mb: float = 512, device: str = "auto") -> None:
        if not max_upload_mb > 0:
            raise ValueError(f"max_upload_mb must be positive but is {max_upload_mb!r}.")
        self.checkpoint = str(checkpoint)
        self.device = device
        self.max_upload_bytes = int(max_upload_mb * 2**20)
        _, self.spec = load_model(self.checkpoint, "cpu")
        self.postprocessing = PostProcessing.from_dict(self.spec.postprocessing)  # what run_inference applies
        self._lock = threading.Lock()
        remove_stale_uploads()

    @property
    def default_threshold(self) -> float:
        return self.postprocessing.threshold

    def info(self) -> dict:
        """What the page needs to know about the model and the limits."""
        spec: ModelSpec = self.spec
        return {
            "channels": list(spec.channels), "primary_channel": spec.primary_channel,
            "channel_fallbacks": dict(spec.channel_fallbacks), "spatial_dims": spec.spatial_dims,
            "network": spec.network_name, "threshold": self.default_threshold, "tta_modes": list(TTA_MODES),
            "tta": DEFAULT_TTA, "max_upload_mb": self.max_upload_bytes / 2**20,
        }

    def segment(self, uploads: Sequence[Upload], truth: Upload | None = None, tta: str = DEFAULT_TTA,
                threshold: float | None = None, case_id: str | None = None,
                channels: Mapping[str, Any] | None = None) -> dict:
        """Segment the uploaded case; returns the page's result, or ``{"choose": [...]}`` when several cases were found.

        The result's ``inputs`` (`describe_inputs`) says how the uploads fill the model's channels and what the user
        may choose instead; ``channels`` sends such choices back (see `channel_overrides`).

        Raises:
            CaseRefused: for a case that cannot run as it stands (a missing channel, a one-channel image nothing
                says the role of, a failed case), with its inputs for the page.
            InputError: for an unusable upload or an input the gate refuses (names the file as uploaded).
            UploadTooLarge: when the uploads exceed the limit.
            ValueError: for a bad ``tta``, ``threshold`` or ``channels``.
            SegmentationFailed: for an unforeseen failure (its message names no server path).
        """
        if tta not in TTA_MODES:
            raise ValueError(f"tta must be one of {', '.join(TTA_MODES)} but is {tta!r}.")
        if threshold is not None and not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1) but is {threshold!r}.")
        overrides = channel_overrides(channels or {}, self.spec)
        if not uploads:
            raise InputError(None, "no file was uploaded")
        with tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}{os.getpid()}-") as tmp:
            names = ShownNames(Path(tmp))
            try:
                return self._segment(Path(tmp), names, uploads, truth, tta, threshold, case_id, overrides)
            except CaseRefused as err:
                raise CaseRefused(names(err.path) if err.path else None, names.text(err.reason), err.inputs) from err
            except InputError as err:
                raise InputError(names(err.path) if err.path else None, names.text(err.reason)) from err
            except (ValueError, UploadTooLarge):
                raise
            except Exception as err:  # the message of an unforeseen error may quote the request's folder
                logger.exception("segmentation failed")
                uploaded = ", ".join(u.filename for u in uploads)
                raise SegmentationFailed(
                    f"{uploaded}: could not be segmented ({type(err).__name__}: {names.text(str(err))})") from err

    def _segment(self, tmp: Path, names: ShownNames, uploads: Sequence[Upload], truth: Upload | None, tta: str,
                 threshold: float | None, case_id: str | None, overrides: Mapping[str, str]) -> dict:
        budget = SizeBudget(self.max_upload_bytes)
        stored = []
        for upload in uploads:
            path = store_upload(upload.filename, upload.stream, tmp / "uploads", budget)
            names.add(path, upload.filename)
            stored.append(path)
        found = sort_uploads(stored)
        if truth is not None:
            truth_path = store_upload(truth.filename, truth.stream, tmp / "truth", budget)
            names.add(truth_path, truth.filename)
            found.truths[""] = truth_path
        source = self._input_path(found, tmp / "input", names)
        check_detached_data(tmp, tmp)  # before anything reads an uploaded or unzipped file
        spec = self.spec
        cases = discover_cases([source], InputRoles.of(spec, overrides))
        if len(cases) > 1 and case_id is None:
            return {"choose": [{"id": c.case_id, "label": _label(c, names)} for c in cases]}
        case = cases[0] if len(cases) == 1 else next((c for c in cases if c.case_id == case_id), None)
        if case is None:
            raise InputError(None, f"case {case_id!r} is not in the upload (found {', '.join(c.case_id for c in cases)})")
        inputs = describe_inputs(case, spec, names, overrides)
        if case.error:
            hint = "; or set the channels by hand below" if inputs["channels"] else ""
            raise CaseRefused(case.source, case.error + hint, inputs)
        check_dicom_modality(case.series)
        images, sources, shown_channel = self._read_and_gate(case, inputs, names)
        settings = InferenceSettings(checkpoint=self.checkpoint, tta=tta, device=self.device, threshold=threshold,
                                     channels=dict(overrides), progress=False)
        with self._lock:  # the chosen case alone: its folder may hold other series
            (row,) = run_inference([case.source], tmp / "output", settings,
                                   select=lambda found_case: found_case.inputs() == case.inputs())
        if row["status"] != "ok":
            raise CaseRefused(row["source"], row["error"], inputs)
        truths = _truths_for(case, sources, found)
        view = case_view(case.kind, images, sources, tmp / "output" / row["case"], row, truths, shown_channel)
        stacked = case.kind == "slices" and bool(slice_stacks(case.images))
        view["settings"] = {"tta": tta, "threshold": self.default_threshold if threshold is None else threshold,
                            "postprocessing": self.postprocessing.describe(stacked=stacked)}
        view["inputs"] = inputs
        return view

    def _input_path(self, found: Uploads, inbox: Path, names: ShownNames) -> Path:
        """The one path ``run_inference`` is pointed at: a folder of slices, of volume files, of DICOM, or an unzipped tree."""
        kinds = found.kinds()
        if not kinds:
            raise InputError(None, "only truth masks were uploaded; add the image to segment")
        if len(kinds) > 1 or len(found.zips) > 1:
            raise InputError(None, "upload one kind of input at a time: 2D slices, volume files, DICOM files or one zip")
        if found.zips:
            archive = found.zips[0]
            folder = inbox / stem_of(archive.name)
            names.add(folder, names(archive))
            return unpack_zip(archive, folder, ZIP_EXPANSION * self.max_upload_bytes)
        files = found.slices or found.volumes or found.dicom
        if len(files) == 1 and not found.dicom:
            return files[0]
        # The folder's name becomes the case id: the files' common name prefix (e.g. the patient id).
        prefix = os.path.commonprefix([stem_of(p.name) for p in files]).rstrip("_-. ") or "upload"
        folder = inbox / prefix
        folder.mkdir(parents=True)
        for path in files:
            path.rename(folder / path.name)
            names.move(path, folder / path.name)
        return folder

    def _read_and_gate(self, case: Case, inputs: dict, names: ShownNames) -> tuple[list, list[str], int]:
        """Raw images as the page shows them, each checked by the gate; returns them, their source files, and the
        channel of them to show.

        Slices are read whole. Of a volume case the primary channel's input is read, the grid the mask lies on (a
        DICOM series of a folder holding several by its UID). A lone one-channel image given to a multi-channel model
        needs a role (its name, or the user's choice): without one it is refused with the choice in ``inputs``.
        """
        spec = self.spec
        if case.kind == "slices":
            paths = list(case.images)
            images = [read_channels_first([path]) for path in paths]
        else:
            primary = case.primary if case.primary < len(case.images) else 0
            uid = case.series[primary].series_uid if case.series else None
            paths = [case.images[primary]]
            image = read_channels_first(paths, uid)
            images = [image[..., None] if image.ndim == 3 else image]  # a single 2D DICOM file read as a volume case
        one_input_per_channel = bool(case.series or case.roles)
        lone = not one_input_per_channel and spec.in_channels > 1 and images[0].shape[0] == 1
        if lone:
            role = next(iter(case.fills.values()), None)
            inputs["one_channel"] = one_channel_choice(Path(case.source).name, names(case.source), role, spec)
            if role is None:
                raise CaseRefused(paths[0], (
                    f"has 1 channel but the model takes {spec.in_channels} ({', '.join(spec.channels)}) and nothing "
                    f"says which sequence it is: choose it below"), inputs)
        expected = 1 if one_input_per_channel or lone else spec.in_channels
        for image, path in zip(images, paths):
            check_plausible_mr(image, path, expected, spec.channels if expected > 1 else ())
        shown_channel = spec.channels.index(spec.primary_channel) if expected > 1 else 0
        return images, [str(p) for p in paths], shown_channel


def _label(case: Case, names: ShownNames) -> str:
    """One line naming a case and its inputs, for the page's list of cases to choose from."""
    if case.series:
        unique = {s.series_uid: s for s in case.series}.values()
        listing = "; ".join(f"{s.description or 'no description'} ({s.modality or '?'}, {len(s.files)} images)"
                            for s in unique)
        return f"{case.case_id}: {listing}"
    records = [r["series"] for r in case.roles.get("roles", []) if "series" in r] + case.roles.get("rejected", [])
    if records:
        listing = "; ".join(dict.fromkeys(f"{r['description'] or 'no description'} ({r['slices']} images)"
                                          for r in records))
        return f"{case.case_id}: {listing}" + (" (cannot run as it stands)" if case.error else "")
    return f"{case.case_id}: {names(case.source)}"


def _truths_for(case: Case, sources: Sequence[str], found: Uploads) -> list[Path | None]:
    """Truth per slice by ``<stem>_mask`` name, else the truth upload for a single image or volume, else a
    ``*_seg``/``*_mask`` file beside the case's inputs (as a DICOM study zip of the synthetic phantoms carries)."""
    if case.kind == "slices":
        matched = [found.truths.get(stem_of(Path(s).name)) for s in sources]
        if len(sources) == 1 and matched[0] is None and len(found.truths) == 1:
            matched = list(found.truths.values())
        return matched
    if found.truths:
        return [found.truths.get(stem_of(Path(case.source).name), next(iter(found.truths.values())))]
    folder = Path(case.source)
    beside = sorted(sort_uploads(p for p in folder.iterdir() if p.is_file()).truths.values()) if folder.is_dir() else []
    return [beside[0] if len(beside) == 1 else None]
