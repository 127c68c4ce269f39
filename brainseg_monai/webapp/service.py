"""One web request's work, without HTTP: store the uploads, find the case, gate it, run ``brainseg infer``'s job, view.

Segmentation is `brainseg_monai.inference.runner.run_inference`, the function behind ``brainseg infer``, run on the
request's temporary folder; the page shows what it wrote. The folder is removed when the request ends.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from brainseg_monai.errors import InputError
from brainseg_monai.channel_roles import InputRoles
from brainseg_monai.inference.cases import Case, discover_cases
from brainseg_monai.inference.postprocess import PostProcessing
from brainseg_monai.inference.predictor import ModelSpec, load_model
from brainseg_monai.inference.runner import InferenceSettings, run_inference
from brainseg_monai.inference.tta import TTA_MODES
from brainseg_monai.webapp.gate import check_dicom_modality, check_plausible_mr
from brainseg_monai.webapp.uploads import SizeBudget, Uploads, sort_uploads, stem_of, store_upload, unpack_zip
from brainseg_monai.webapp.view import case_view, read_channels_first

__all__ = ["DEFAULT_TTA", "Segmenter", "Upload"]

logger = logging.getLogger(__name__)

#: The TTA of ``brainseg infer``, which every figure of the shipped model describes; the page offers the others.
DEFAULT_TTA = InferenceSettings.tta

#: A zip may unpack to at most this many times the upload limit (DICOM compresses well; zip bombs do not pass).
ZIP_EXPANSION = 4


@dataclass
class Upload:
    """One uploaded file: the name the browser gave and a readable binary stream."""

    filename: str
    stream: BinaryIO


class Segmenter:
    """Segments uploads with one checkpoint, one request at a time (inference uses every core).

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

    @property
    def default_threshold(self) -> float:
        return self.postprocessing.threshold

    def info(self) -> dict:
        """What the page needs to know about the model and the limits."""
        spec: ModelSpec = self.spec
        return {
            "channels": list(spec.channels), "spatial_dims": spec.spatial_dims, "network": spec.network_name,
            "threshold": self.default_threshold, "tta_modes": list(TTA_MODES), "tta": DEFAULT_TTA,
            "max_upload_mb": self.max_upload_bytes / 2**20,
        }

    def segment(self, uploads: Sequence[Upload], truth: Upload | None = None, tta: str = DEFAULT_TTA,
                threshold: float | None = None, case_id: str | None = None) -> dict:
        """Segment the uploaded case; returns the page's result, or ``{"choose": [...]}`` when several cases were found.

        Raises:
            InputError: for an unusable upload, an input the gate refuses or a case that failed (names the file).
            UploadTooLarge: when the uploads exceed the limit.
            ValueError: for a bad ``tta`` or ``threshold``.
        """
        if tta not in TTA_MODES:
            raise ValueError(f"tta must be one of {', '.join(TTA_MODES)} but is {tta!r}.")
        if threshold is not None and not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1) but is {threshold!r}.")
        if not uploads:
            raise InputError(None, "no file was uploaded")
        with tempfile.TemporaryDirectory(prefix="brainseg-serve-") as tmp:
            try:
                return self._segment(Path(tmp), Path(tmp) / "input", uploads, truth, tta, threshold, case_id)
            except InputError as err:
                raise InputError(_shown(err.path, Path(tmp)), _shown_in(err.reason, Path(tmp))) from err

    def _segment(self, tmp: Path, inbox: Path, uploads: Sequence[Upload], truth: Upload | None, tta: str,
                 threshold: float | None, case_id: str | None) -> dict:
        budget = SizeBudget(self.max_upload_bytes)
        stored = [store_upload(u.filename, u.stream, tmp / "uploads", budget) for u in uploads]
        found = sort_uploads(stored)
        if truth is not None:
            truth_path = store_upload(truth.filename, truth.stream, tmp / "truth", budget)
            found.truths[""] = truth_path
        source = self._input_path(found, inbox)
        spec = self.spec
        cases = discover_cases([source], InputRoles.of(spec))
        if len(cases) > 1 and case_id is None:
            return {"choose": [{"id": c.case_id, "label": _describe(c, tmp)} for c in cases]}
        case = cases[0] if len(cases) == 1 else next((c for c in cases if c.case_id == case_id), None)
        if case is None:
            raise InputError(None, f"case {case_id!r} is not in the upload (found {', '.join(c.case_id for c in cases)})")
        if case.error:
            raise InputError(case.source, case.error)
        check_dicom_modality(case.series)
        images, sources = self._read_and_gate(case)
        settings = InferenceSettings(checkpoint=self.checkpoint, tta=tta, device=self.device, threshold=threshold,
                                     progress=False)
        with self._lock:  # the chosen case alone: its folder may hold other series
            (row,) = run_inference([case.source], tmp / "output", settings,
                                   select=lambda found_case: found_case.inputs() == case.inputs())
        if row["status"] != "ok":
            raise InputError(row["source"], row["error"])
        truths = _truths_for(case, sources, found)
        view = case_view(case.kind, images, sources, tmp / "output" / row["case"], row, truths, spec.channels)
        view["settings"] = {"tta": tta, "threshold": self.default_threshold if threshold is None else threshold,
                            "postprocessing": self.postprocessing.describe()}
        return view

    def _input_path(self, found: Uploads, inbox: Path) -> Path:
        """The one path ``run_inference`` is pointed at: a folder of slices, of volume files, of DICOM, or an unzipped tree."""
        kinds = found.kinds()
        if not kinds:
            raise InputError(None, "only truth masks were uploaded; add the image to segment")
        if len(kinds) > 1 or len(found.zips) > 1:
            raise InputError(None, "upload one kind of input at a time: 2D slices, volume files, DICOM files or one zip")
        if found.zips:
            archive = found.zips[0]
            return unpack_zip(archive, inbox / stem_of(archive.name), ZIP_EXPANSION * self.max_upload_bytes)
        files = found.slices or found.volumes or found.dicom
        if len(files) == 1 and not found.dicom:
            return files[0]
        # The folder's name becomes the case id: the files' common name prefix (e.g. the patient id).
        prefix = os.path.commonprefix([stem_of(p.name) for p in files]).rstrip("_-. ") or "upload"
        folder = inbox / prefix
        folder.mkdir(parents=True)
        for path in files:
            path.rename(folder / path.name)
        return folder

    def _read_and_gate(self, case: Case) -> tuple[list, list[str]]:
        """Raw images as inference reads them, each checked by the gate; returns them with their source files."""
        if case.kind == "slices":
            images = [read_channels_first([path]) for path in case.images]
            for image, path in zip(images, case.images):
                check_plausible_mr(image, path, self.spec.in_channels, self.spec.channels)
            return images, list(case.images)
        volume = read_channels_first(case.images)
        if volume.ndim == 3:  # a single 2D DICOM file read as a volume case
            volume = volume[..., None]
        check_plausible_mr(volume, case.source, self.spec.in_channels, self.spec.channels)
        return [volume], [case.images[0]]


_WORK_FOLDERS = ("uploads", "truth", "input", "output")


def _shown(path: str | None, tmp: Path) -> str | None:
    """A path as the user knows it: relative to the upload (the temporary folder's name means nothing to them)."""
    if path is None:
        return None
    for folder in _WORK_FOLDERS:
        if Path(path).is_relative_to(tmp / folder):
            return str(Path(path).relative_to(tmp / folder))
    return Path(path).name


def _shown_in(text: str, tmp: Path) -> str:
    """``text`` with the request's temporary folders taken out of any path it quotes."""
    for folder in _WORK_FOLDERS:
        text = text.replace(f"{tmp / folder}{os.sep}", "")
    return text.replace(f"{tmp}{os.sep}", "")


def _describe(case: Case, tmp: Path) -> str:
    if case.series:
        listing = "; ".join(f"{s.description or 'no description'} ({s.modality or '?'}, {len(s.files)} images)"
                            for s in case.series)
        return f"{case.case_id}: {listing}"
    return f"{case.case_id}: {_shown(case.source, tmp)}"


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
