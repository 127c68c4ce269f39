"""The batch job behind ``brainseg infer``: every case independent, failures recorded, outputs atomic, resumable.

One run at a time writes to ``DIR``: it holds ``DIR/.brainseg-infer.lock``, which names its PID and host, and first
clears what an interrupted run left behind. Each case is predicted into a hidden temporary folder that is renamed to
``DIR/<case id>`` when complete, with a ``case.json`` marker holding its summary row, the inputs it read and the
fingerprint of their contents, the model and the settings; ``resume`` skips a case whose marker lists the same
inputs and fingerprint and redoes, saying why, one whose fingerprint differs. ``summary.csv`` is rewritten
atomically after every case; it keeps the rows of earlier runs' cases that this run does not include, and a case of
other inputs never takes the id of an earlier one. A full disk stops the batch with the cases so far recorded.
Under ``torchrun`` each rank takes every WORLD_SIZE-th case, rank 0 holds the lock and merges the per-rank summaries.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from brainseg_monai.channel_roles import InputRoles, SelectionRules
from brainseg_monai.errors import InputError, input_error_in
from brainseg_monai.inference.cases import Case, cannot_read, discover_cases
from brainseg_monai.inference.outputs import (
    CASE_FILES,
    CASE_MARKER,
    LOCK_NAME,
    OVERLAY,
    SEG,
    SLICE_SPREAD_SUFFIX,
    SUMMARY_NAME,
    UNCERTAINTY_OVERLAY,
    VOLUME_MASK,
    VOLUME_SPREAD,
    is_case_output,
    slice_output_names,
)
from brainseg_monai.inference.postprocess import PostProcessing
from brainseg_monai.inference.predictor import LoadedCase, Predictor, load_for_case
from brainseg_monai.io import ATOMIC_TEMPORARY, voxel_spacing, write_text_atomic
from brainseg_monai.model import ModelSpec, load_model, model_files
from brainseg_monai.uncertainty import EXPECTED_DICE, MEMBERS_DICE, SCORES, case_score, members_score, needs_review
from brainseg_monai.untrusted import check_detached_data
from brainseg_monai.inference.writers import (
    SegNotWritten,
    write_dicom_seg,
    write_overlay_png,
    write_png_mask,
    write_spread_png,
    write_spread_volume,
    write_uncertainty_png,
    write_volume_mask,
)

logger = logging.getLogger(__name__)

SUMMARY_FIELDS = [
    "case", "source", "status", "error", "warnings", "kind", "images", "tumour_voxels", "tumour_ml",
    "slices_with_tumour", "coverage_pct", "uncertainty", "review", "seconds",
]
#: the columns that say a ``summary.csv`` is ours: any other file of that name is the user's and is never replaced
_OWN_SUMMARY_COLUMNS = {"case", "source", "status", "error"}
#: errors that say the output folder has no room left: the batch stops instead of failing every case after
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT)
#: the most characters of a summary field; the log holds the whole message
_FIELD_CHARS = 500
#: what an interrupted run leaves in the output folder: case folders being written (``tempfile.mkdtemp``'s eight
#: characters) or moved aside for their replacement, and per-rank summaries and summaries being written
#: (`write_text_atomic`'s temporaries)
_TEMP_CASE = re.compile(r"^\.(?P<case>.+)\.(?P<kind>[a-z0-9_]{8}|old)$")
_TEMP_SUMMARY = re.compile(rf"^\.\.?summary(\.rank\d+)?\.csv({ATOMIC_TEMPORARY}\.tmp)?$")


@dataclass
class InferenceSettings:
    """What ``brainseg infer`` was asked for, beyond inputs and output folder."""

    checkpoint: str
    tta: str = "dihedral"
    device: str = "auto"
    batch_size: int = 16
    resume: bool = False
    threshold: float | None = None
    min_size: int | None = None
    open_above: int | None = None
    keep_largest: bool | None = None
    #: keep the components of at least this fraction of the heaviest one's probability mass (``PostProcessing``);
    #: 0 keeps every component
    keep_fraction: float | None = None
    stack_slices: bool | None = None
    channels: Mapping[str, str] | None = None
    #: the user's series selection rules (``--series-rules``); None: the documented defaults
    series_rules: SelectionRules | None = None
    progress: bool = True
    #: the forward's precision: ``fp32``, ``bf16`` or ``auto`` (see ``predictor.fast_path``)
    precision: str = "auto"
    #: inputs from someone else (``--untrusted``): refuse any whose header would make the reader open a file outside
    #: the input's folder (`brainseg_monai.untrusted.check_detached_data`), before anything is read
    untrusted: bool = False


def _row(case: Case, status: str, error: str = "", **values: Any) -> dict:
    """A summary row; its ``error`` and ``warnings`` are one line each (:func:`_one_line`), ``images`` is
    :func:`input_count`."""
    row = {key: "" for key in SUMMARY_FIELDS}
    row.update(case=case.case_id, source=case.source, status=status, error=error, kind=case.kind,
               images=input_count(case))
    row.update({k: v for k, v in values.items() if k in row})
    row.update(error=_one_line(row["error"]), warnings=_one_line(str(row["warnings"])))
    return row


def input_count(case: Case) -> int:
    """The ``images`` column of ``summary.csv``: how many inputs the case reads, the same for an ``ok`` and a
    ``failed`` row: its slice files, channel files or DICOM series, each once (a channel filled from another, as a
    FLAIR-only study fills T1 and T1c, does not count again). 0 when no input was chosen: an input that cannot be
    used at all, or a study whose series cannot fill the model's channels."""
    if case.series:
        return len({(os.path.abspath(s.folder), s.series_uid) for s in case.series})
    return len({os.path.abspath(p) for p in case.images})


def _one_line(text: str) -> str:
    """``text`` as one line of a summary field: the frames of a traceback inside a message are dropped (the error it
    ended in stays), lines are joined and a very long message is shortened; the log holds it whole. A reason that a
    spreadsheet shows in one cell and one ``grep`` finds, not a traceback spread over the rows."""
    kept, in_traceback = [], False
    for line in text.splitlines():
        if line.strip().startswith("Traceback (most recent call last)"):
            in_traceback = True
        elif not (in_traceback and line[:1].isspace()):
            in_traceback = False
            kept.append(line)
    joined = " ".join(" ".join(kept).split())
    return joined if len(joined) <= _FIELD_CHARS else joined[:_FIELD_CHARS - 1] + "…"


def _volume_stats(mask: np.ndarray, spacing: Sequence[float] | None) -> dict:
    voxels = int(mask.sum())
    stats = {
        "tumour_voxels": voxels,
        "slices_with_tumour": int(mask.reshape(-1, mask.shape[-1]).any(0).sum()) if mask.ndim == 3 else int(voxels > 0),
        "coverage_pct": round(100.0 * voxels / mask.size, 4),
    }
    if spacing is not None and mask.ndim == 3:
        stats["tumour_ml"] = round(voxels * float(np.prod(spacing[:3])) / 1000.0, 4)
    return stats


class _CaseWriter:
    """Writes one case into a temporary folder and moves it into place only when complete."""

    def __init__(self, out_dir: Path, case_id: str) -> None:
        self.final = out_dir / case_id
        if self.final.exists() and not (self.final / CASE_MARKER).is_file() and (
                not self.final.is_dir() or any(self.final.iterdir())):
            raise InputError(self.final, "exists and was not written by brainseg infer; refusing to replace it")
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{case_id}.", dir=out_dir))  # the name _TEMP_CASE recognises

    def path(self, name: str) -> Path:
        return self.tmp / name

    def commit(self, row: dict, inputs: Sequence[str], details: Mapping[str, Any] | None = None) -> None:
        """Write the marker (summary row, the inputs read for ``--resume``, and ``details`` such as their
        fingerprint and the channel roles) and move the case into place."""
        marker = {**row, "inputs": list(inputs), **(details or {})}
        (self.tmp / CASE_MARKER).write_text(json.dumps(marker, indent=2, default=str) + "\n")
        old = None
        if self.final.exists():
            old = self.final.with_name(f".{self.final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.final, old)
        os.replace(self.tmp, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _member_masks(members: Any, post: PostProcessing, images: Sequence[str] | None) -> list | None:
    """Each ensemble member's own masks, post-processed as the ensemble's (slices of a folder with their ``images``,
    else one volume each); None for a single model."""
    if members is None:
        return None
    if images is None:
        return [post(member) for member in members]
    return [post.apply_to_slices([maps[k] for maps in members], images) for k in range(len(members[0]))]


def _certainty(prob: Any, spread: Any, masks: Any, post: PostProcessing, review: Mapping[str, Any],
               member_masks: Sequence[Any] | None = None) -> dict:
    """The summary's ``uncertainty`` (the case score: an ensemble's members' disagreement where their masks are
    given, else the expected Dice) and ``review`` (yes/no; empty when the model has no threshold); both empty with
    one view (``--tta none``, one model), whose probability is not what the score was validated on. With them
    ``uncertainty_score``, the score's name, for ``case.json``."""
    if spread is None:
        return {"uncertainty": "", "review": "", "uncertainty_score": ""}
    if member_masks is not None:
        score, name = members_score(member_masks), MEMBERS_DICE
    else:
        score, name = case_score(prob, masks, post.threshold), EXPECTED_DICE
    flagged = needs_review(score, review, name)
    return {"uncertainty": round(score, 5), "review": "" if flagged is None else ("yes" if flagged else "no"),
            "uncertainty_score": name}


def _predict_case(case: Case, loaded: LoadedCase, predictor: Predictor, post: PostProcessing,
                  writer: _CaseWriter) -> dict:
    """Predict one loaded case and write its outputs into ``writer``: the mask, ``overlay.png`` and, with TTA, the
    views' spread beside it (``<stem>_unc.png`` per slice, ``uncertainty.nii.gz`` for a volume) and
    ``uncertainty.png``; returns the summary values."""
    prediction = predictor.predict_case(loaded)
    review = predictor.spec.uncertainty
    if loaded.slices is not None:
        masks = post.apply_to_slices(prediction.prob, case.images)
        for path, name, mask in zip(case.images, slice_output_names(case.images), masks):
            write_png_mask(mask, writer.path(name), reference=path)
        best = int(np.argmax([m.sum() for m in masks]))
        shown = np.asarray(loaded.slices[best])
        write_overlay_png(shown, masks[best], writer.path(OVERLAY))
        if prediction.spread is not None:
            for path, name, spread in zip(case.images, slice_output_names(case.images, SLICE_SPREAD_SUFFIX),
                                          prediction.spread):
                write_spread_png(spread, writer.path(name), reference=path)
            write_uncertainty_png(shown, prediction.spread[best], masks[best], writer.path(UNCERTAINTY_OVERLAY))
        voxels = int(sum(int(m.sum()) for m in masks))
        total = int(sum(m.size for m in masks))
        return {
            "tumour_voxels": voxels,
            "slices_with_tumour": int(sum(bool(m.any()) for m in masks)),
            "coverage_pct": round(100.0 * voxels / total, 4),
            **_certainty(prediction.prob, prediction.spread, masks, post, review,
                         _member_masks(prediction.members, post, case.images)),
        }
    prob, spread = prediction.prob, prediction.spread
    affine = np.asarray(loaded.data["image"].meta["original_affine"] if loaded.data is not None
                        else loaded.volume.meta["affine"])
    mask = post(prob)
    reference = case.images[case.primary] if case.primary < len(case.images) else case.images[0]
    write_volume_mask(mask, affine, writer.path(VOLUME_MASK), reference=reference)
    shown = loaded.image
    if shown.shape[1:] != mask.shape:  # a 3D model's input was cropped or resampled: show its probability instead
        shown = prob[None]
    write_overlay_png(shown, mask, writer.path(OVERLAY))
    if spread is not None:
        write_spread_volume(spread, affine, writer.path(VOLUME_SPREAD), reference=reference)
        write_uncertainty_png(shown, spread, mask, writer.path(UNCERTAINTY_OVERLAY))
    warnings: list[str] = []
    if case.kind == "dicom" and case.series:
        try:  # the mask is the result; a SEG the source's attributes do not allow is a warning, not a lost case
            warnings += write_dicom_seg(mask, case.series[case.primary].files, writer.path(SEG))
        except SegNotWritten as err:
            warnings.append(f"SEG not written: {err}")
    # a 2D image has no slice thickness, so no volume in ml
    stats = _volume_stats(mask, None if loaded.planar else voxel_spacing(affine))
    member_masks = _member_masks(prediction.members, post, None)
    return {**stats, **_certainty(prob, spread, mask, post, review, member_masks), "warnings": "; ".join(warnings)}


def _write_summary(path: Path, rows: Sequence[Mapping]) -> None:
    """Replace ``path`` by ``rows`` atomically: a reader sees the old summary or the new one, and a failed write (a
    full disk, Ctrl-C) leaves the old one and no temporary file."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=SUMMARY_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, text.getvalue())


def _read_summary(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _with_earlier(rows: Sequence[dict], earlier: Mapping[str, dict]) -> list[dict]:
    """This run's ``rows``, then the rows of earlier runs' cases this run has not (yet) written, in their order."""
    mine = {row["case"] for row in rows}
    return [*rows, *(row for name, row in earlier.items() if name not in mine)]


def _distributed() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class _Ranks:
    """This process's place among ``torchrun``'s processes, and what they agree on; a lone process is rank 0 of 1."""

    def __init__(self) -> None:
        self.rank, self.world = _distributed()
        self.created = False
        if self.world > 1:
            import torch.distributed as dist

            self.dist = dist
            if not dist.is_initialized():
                dist.init_process_group(backend="gloo")
                self.created = True

    def barrier(self) -> None:
        if self.world > 1:
            self.dist.barrier()

    def from_rank0(self, value: Any) -> Any:
        """Rank 0's ``value`` (picklable) on every rank."""
        if self.world == 1:
            return value
        box = [value]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.created:  # a gloo group left alive at exit can abort the process ("terminate called without an active exception")
            self.dist.destroy_process_group()


class OutputLock:
    """Exclusive use of an output folder by one run: two runs writing one folder at once left summary.csv and the
    masks disagreeing, and both exited 0.

    The lock is the kernel's (``flock``) on ``DIR/.brainseg-infer.lock``, so it goes with its holder, even one killed
    by ``kill -9``; the file names the holder (PID, host, start) for the message of a refused run. On a file system
    without ``flock`` the PID stands in: a holder on this host whose process is gone is recovered, one on another
    host is taken as running. Released (the file removed) by :meth:`release`.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, recovering one left by a run that is gone.

        Raises:
            InputError: naming the folder, the holder's PID and host and what to do, while another run holds it;
                naming the lock file and the reason when it cannot be written (a read-only folder, a full disk).
        """
        try:
            self._acquire()
        except OSError as err:
            self.release()
            raise InputError(self.path, f"cannot be written to hold the output folder ({_os_reason(err)})") from err

    def _acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if not self._lock(fd):
                    raise self._refusal(_holder(fd))
                opened, current = os.fstat(fd), os.stat(self.path)
            except FileNotFoundError:  # its holder removed the file on release meanwhile: lock the one there now
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)
                raise
            if (opened.st_dev, opened.st_ino) == (current.st_dev, current.st_ino):
                break
            os.close(fd)  # as above: the file locked is no longer the lock file
        self._fd = fd
        left = _holder(fd)
        if left:
            logger.warning("%s: recovered the lock of PID %s on %s (started %s): that run is no longer running",
                           self.folder, left.get("pid"), left.get("host"), left.get("started"))
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)

    def release(self) -> None:
        """Give the lock up and remove its file (nothing when not held)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing releases the kernel's lock
            self._fd = None

    @staticmethod
    def _lock(fd: int) -> bool:
        """Whether the lock was taken: the kernel's, else (no ``flock`` here) the recorded holder's being gone."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as err:  # no flock on this file system (some network and FUSE mounts)
            logger.debug("flock is not available (%s): the lock's PID tells whether it is held", err)
            holder = _holder(fd)
            return not holder or not _running(holder)

    def _refusal(self, holder: dict) -> InputError:
        who = (f"PID {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}" if holder
               else "its PID not yet recorded")
        return InputError(self.folder, f"is in use by another brainseg infer run ({who}): two runs writing one "
                                       f"folder corrupt it. Wait for that run to end, or choose another --out; if "
                                       f"no such run exists, delete {self.path}")


def _holder(fd: int) -> dict:
    """The holder a lock file records (empty when none or unreadable)."""
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _running(holder: Mapping[str, Any]) -> bool:
    """Whether the process a lock records may still run: gone only when on this host and its PID is not alive."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


@contextmanager
def _held(out: Path, ranks: _Ranks) -> Iterator[None]:
    """Hold ``out`` for this run: rank 0 takes its lock for all ranks, and clears what interrupted runs left in it
    before any rank writes; a refusal reaches every rank. The lock is released however the run ends."""
    lock = OutputLock(out) if ranks.rank == 0 else None
    try:
        refused = None
        if lock is not None:
            try:
                lock.acquire()
            except InputError as err:
                refused = (err.path, err.reason)
            else:
                _remove_leftovers(out)
        refused = ranks.from_rank0(refused)
        if refused is not None:
            raise InputError(*refused)
        yield
    finally:
        if lock is not None:
            lock.release()


def _remove_leftovers(out: Path) -> None:
    """Clear what an interrupted run (``kill -9``, a power cut) left in ``out``, and nothing else: case folders being
    written (``.<case>.<8 characters>``) or moved aside for their replacement (``.<case>.old``: put back when the
    replacement never arrived), each holding only files a case folder holds, and temporary or per-rank summaries."""
    for entry in sorted(out.iterdir()):
        if entry.is_symlink():
            continue
        if _TEMP_SUMMARY.match(entry.name) and entry.is_file():
            entry.unlink()
            logger.warning("%s: removed, left by an interrupted run", entry)
            continue
        match = _TEMP_CASE.match(entry.name)
        if match is None or not entry.is_dir() or not all(
                f.is_file() and any(name in f.name for name in CASE_FILES) for f in entry.iterdir()):
            continue
        final = out / match["case"]
        if match["kind"] == "old" and is_case_output(entry) and not final.exists():
            os.replace(entry, final)
            logger.warning("%s: put back as %s, where an interrupted run had moved it aside", entry, final)
        else:
            shutil.rmtree(entry)
            logger.warning("%s: removed, left by an interrupted run", entry)


def run_inference(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, settings: InferenceSettings,
                  select: Callable[[Case], bool] | None = None) -> list[dict]:
    """Segment every case under ``inputs`` into ``out_dir``; returns this run's summary rows (``summary.csv`` holds
    them and the rows of earlier runs' cases that this run does not include).

    A case that cannot be read or predicted, and an input that cannot be used, is recorded as ``failed`` with its
    reason and the others go on. ``out_dir`` and what it holds are never read as inputs, even inside an input folder.
    ``select`` keeps only the cases it accepts (e.g. the series a web app user chose in a folder holding several).

    Raises:
        InputError: when the checkpoint is unusable, no input can be used at all, ``select`` accepts no case,
            ``out_dir`` is a file, holds a ``summary.csv`` that ``brainseg infer`` did not write or is in use by
            another run, or when ``out_dir`` has no room left (the batch stops with the cases so far recorded);
            with ``settings.untrusted``, before anything is read, when a header would make the reader open a file
            outside its input's folder.
    """
    out = Path(out_dir)
    _check_output_folder(out)
    if settings.untrusted:
        _check_untrusted(inputs)
    out.mkdir(parents=True, exist_ok=True)
    ranks = _Ranks()
    try:
        with _held(out, ranks):
            return _run(inputs, out, settings, select, ranks)
    finally:
        ranks.close()


def _check_untrusted(inputs: Sequence[str | os.PathLike]) -> None:
    """Refuse the run if an input, or a file in an input folder, would make the reader open a file outside that
    input's folder (a file's folder for a file input): a detached image header naming another file, or a link.

    Raises:
        InputError: naming the file and the data file its header names (`check_detached_data`).
    """
    for raw in inputs:
        path = Path(raw)
        check_detached_data(path, path if path.is_dir() else path.parent)


@dataclass
class _Job:
    """What every case of a run shares."""

    out: Path
    #: where this process records its rows: ``summary.csv``, or its rank's summary under ``torchrun``
    summary: Path
    predictor: Predictor
    post: PostProcessing
    spec: ModelSpec
    settings: InferenceSettings
    rank: int
    #: the model's and the settings' parts of every case's fingerprint
    fingerprint: dict
    #: with ``--resume``: the markers of cases finished before from the same inputs, by case id
    resumable: Mapping[str, dict]
    #: the rows of earlier runs' cases that the summary keeps, by case id
    earlier: Mapping[str, dict]


def _run(inputs: Sequence[str | os.PathLike], out: Path, settings: InferenceSettings,
         select: Callable[[Case], bool] | None, ranks: _Ranks) -> list[dict]:
    network, spec = load_model(settings.checkpoint, settings.device)
    device = next(network.parameters()).device
    post = PostProcessing.from_dict(spec.postprocessing)
    overrides = {"threshold": settings.threshold, "min_size": settings.min_size, "open_above": settings.open_above,
                 "keep_largest": settings.keep_largest, "keep_fraction": settings.keep_fraction,
                 "stack_slices": settings.stack_slices}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    # the way of choosing components asked for replaces the model's: --keep-fraction, --keep-largest, or
    # --keep-fraction 0 (every component, as "the threshold alone" among tuning's candidates)
    if settings.keep_fraction is not None and settings.keep_largest is None:
        overrides["keep_largest"] = False
    if (settings.keep_largest and settings.keep_fraction is None) or settings.keep_fraction == 0:
        overrides["keep_fraction"] = None
    post = PostProcessing.from_dict({**post.to_dict(), **overrides})
    predictor = Predictor(network, spec, device, tta=settings.tta, batch_size=settings.batch_size, copy_network=False,
                          precision=settings.precision)
    roles = InputRoles.of(spec, settings.channels, settings.series_rules)
    cases = discover_cases(inputs, roles, exclude=[out])
    if select is not None:
        cases = [c for c in cases if select(c)]
        if not cases:
            raise InputError(None, f"no case under {', '.join(map(str, inputs))} is the one asked for")
    earlier = _Earlier.read(out)
    finished = _assign_ids(cases, earlier)
    if ranks.rank == 0:
        _say_kept(out, earlier, cases)
    ranks.barrier()  # every rank has read what earlier runs left before any rank writes
    fingerprint = {"model": _model_fingerprint(settings.checkpoint, spec),
                   "settings": _settings_fingerprint(settings, post, roles)}
    job = _Job(out, out / (SUMMARY_NAME if ranks.world == 1 else f".summary.rank{ranks.rank}.csv"), predictor, post,
               spec, settings, ranks.rank, fingerprint, finished if settings.resume else {},
               earlier.rows if ranks.world == 1 else {})
    rows = _run_cases(cases[ranks.rank::ranks.world], job)
    if ranks.world > 1:
        return _merge_ranks(out, cases, rows, ranks, earlier.rows)
    return rows


def _check_output_folder(out: Path) -> None:
    """Refuse an ``--out`` that is a file, or whose ``summary.csv`` is not ours (it would be replaced).

    Raises:
        InputError: naming the path and the reason.
    """
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder; --out must be a folder (it is created when missing)")
    summary = out / SUMMARY_NAME
    if not summary.exists():
        return
    try:
        with summary.open(newline="") as handle:
            header = next(csv.reader(handle), [])
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(summary, f"cannot be read to check that brainseg infer wrote it ({err})") from err
    if not _OWN_SUMMARY_COLUMNS <= set(header):
        raise InputError(summary, "exists and was not written by brainseg infer; refusing to replace it "
                                  "(choose another --out, or move the file)")


@dataclass
class _Earlier:
    """What earlier runs left in the output folder, by case id: their summary rows (with those of finished cases
    that ``summary.csv`` lacks, as after a full disk) and the markers of their finished cases."""

    rows: dict[str, dict]
    markers: dict[str, dict]

    @classmethod
    def read(cls, out: Path) -> _Earlier:
        """Raises: InputError: when ``summary.csv`` cannot be read."""
        markers: dict[str, dict] = {}
        for path in sorted(out.glob(f"*/{CASE_MARKER}")):
            if path.parent.name.startswith("."):
                continue  # a case being written, not a finished one
            try:
                marker = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # an unreadable marker: the case is redone
            if isinstance(marker, dict) and marker.get("inputs"):
                markers[path.parent.name] = marker
        rows: dict[str, dict] = {}
        summary = out / SUMMARY_NAME
        if summary.is_file():
            try:
                found = _read_summary(summary)
            except (OSError, UnicodeDecodeError, csv.Error) as err:
                raise InputError(summary, f"cannot be read to keep its rows ({err})") from err
            rows = {r["case"]: {key: r.get(key) or "" for key in SUMMARY_FIELDS} for r in found if r.get("case")}
        for name, marker in markers.items():
            rows.setdefault(name, {key: marker.get(key, "") for key in SUMMARY_FIELDS})
        return cls(rows, markers)


def _assign_ids(cases: list[Case], earlier: _Earlier) -> dict[str, dict]:
    """Give each case the id it is kept under beside what earlier runs left in the output folder; returns the
    markers of the cases finished before from the same inputs, by case id.

    A finished case is recognised by the inputs its marker lists, not by its id: ids follow the order of the inputs
    (``img`` and ``img_2`` for two ``img.png``), so the same id may name other inputs in this run. Such a case takes
    the id it was finished under, and a case keeps an id that an earlier row gives to its own source: this run wins
    for its own cases. A case whose id earlier results of other inputs hold takes an id no case uses, so a same-named
    case of other inputs never replaces an earlier one; the log says so.
    """
    by_inputs = {tuple(marker["inputs"]): name for name, marker in earlier.markers.items()}
    finished: dict[str, dict] = {}
    rest = []
    for case in cases:
        name = by_inputs.get(tuple(case.inputs()))
        if name is not None and name not in finished:
            case.case_id = name
            finished[name] = earlier.markers[name]
        else:
            rest.append(case)
    taken = set(finished)
    moved = []
    for case in rest:
        row = earlier.rows.get(case.case_id)
        if case.case_id in taken or case.case_id in earlier.markers or (
                row is not None and os.path.abspath(row["source"]) != os.path.abspath(case.source)):
            moved.append(case)
        else:
            taken.add(case.case_id)
    for case in moved:
        holder = earlier.rows[case.case_id]["source"] if case.case_id in earlier.rows else next(
            c.source for c in cases if c.case_id == case.case_id and c is not case)
        candidate, n = f"{case.case_id}_2", 3
        while candidate in taken or candidate in earlier.rows:
            candidate, n = f"{case.case_id}_{n}", n + 1
        logger.warning("case %s (%s): the id names the results of other inputs (%s), which are kept; this case is "
                       "named %s", case.case_id, case.source, holder, candidate)
        case.case_id = candidate
        taken.add(candidate)
    return finished


def _say_kept(out: Path, earlier: _Earlier, cases: Sequence[Case]) -> None:
    """Log which earlier runs' cases ``summary.csv`` keeps because this run does not include them."""
    ids = {case.case_id for case in cases}
    kept = [name for name in earlier.rows if name not in ids]
    if kept:
        shown = ", ".join(kept[:10]) + (f" and {len(kept) - 10} more" if len(kept) > 10 else "")
        logger.warning("%s: keeps the rows of %d case(s) of earlier runs that this run does not include: %s",
                       out / SUMMARY_NAME, len(kept), shown)


def _when(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9).isoformat(timespec="microseconds")


def _file_digest(path: str | os.PathLike) -> tuple[os.stat_result, str]:
    """The size and times of ``path`` and the SHA-256 of its content, streamed.

    Raises:
        InputError: naming the file when it cannot be read (``cannot be read: permission denied``).
    """
    try:
        with open(path, "rb") as handle:
            return os.fstat(handle.fileno()), hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError as err:
        raise InputError(path, cannot_read(err)) from err


def input_fingerprint(case: Case) -> dict:
    """What ``--resume`` compares of a case's inputs: how many files, their bytes, and one SHA-256 over each file's
    path and content; the newest modification time is recorded too. Every byte is read (about 0.1-0.3 s per 100 MB;
    the prediction reads them next anyway), so a file rewritten with its old size and time still counts as changed.

    Raises:
        InputError: naming a file that cannot be read.
    """
    combined = hashlib.sha256()
    size, newest = 0, 0
    files = case.files()
    for path in files:
        info, digest = _file_digest(path)
        combined.update(f"{path}\0{digest}\n".encode())
        size += info.st_size
        newest = max(newest, info.st_mtime_ns)
    return {"files": len(files), "bytes": size, "newest_mtime": _when(newest), "sha256": combined.hexdigest()}


def _model_fingerprint(checkpoint: str, spec: ModelSpec) -> dict:
    """The weights (bytes, modification time, SHA-256; of an ensemble, summed over its members and one SHA-256 over
    theirs) and the model's settings but its post-processing: the post-processing applied is in the settings'
    fingerprint, since ``--threshold`` and the like override the model's."""
    record: dict[str, Any] = {"spec": {key: value for key, value in spec.to_dict().items() if key != "postprocessing"}}
    if not Path(checkpoint).is_file():  # only a stand-in network (tests) comes without one
        return record
    infos, digests = zip(*(_file_digest(path) for path in model_files(checkpoint)))
    combined = hashlib.sha256("".join(f"{d}\n" for d in digests).encode()).hexdigest()
    digest = digests[0] if len(digests) == 1 else combined  # one file keeps its own: earlier runs' fingerprints match
    record.update(file=os.path.abspath(checkpoint), bytes=sum(i.st_size for i in infos),
                  mtime=_when(max(i.st_mtime_ns for i in infos)), sha256=digest)
    return record


def _settings_fingerprint(settings: InferenceSettings, post: PostProcessing, roles: InputRoles) -> dict:
    """The settings that change a case's outputs: TTA, the forward's precision, the post-processing applied
    (threshold included), how inputs become channels (``--channel``, ``--series-rules``) and the case scores'
    names (a case scored by an earlier definition is scored again). Device and batch size do not."""
    return {"tta": settings.tta, "precision": settings.precision, "postprocessing": post.to_dict(),
            "channels": dict(roles.overrides), "series_rules": asdict(roles.rules),
            "case_scores": list(SCORES)}


#: what ``--resume`` compares of each part of a fingerprint: contents, not paths or times (a copied or touched file
#: holds the same input); None: all of it
_COMPARED: dict[str, tuple[str, ...] | None] = {
    "inputs": ("files", "bytes", "sha256"), "model": ("bytes", "sha256", "spec"), "settings": None}


def _changes(recorded: Any, current: Mapping[str, Any]) -> str:
    """What differs between a finished case's fingerprint and this run's, in words (``input and settings
    changed``); empty when nothing does."""
    if not isinstance(recorded, dict):
        return "finished without a fingerprint (by an earlier version)"
    current = json.loads(json.dumps(current))  # as case.json holds it: lists, not tuples

    def part(fingerprint: Mapping[str, Any], name: str) -> Any:
        value, keys = fingerprint.get(name), _COMPARED[name]
        return {key: value.get(key) for key in keys} if keys and isinstance(value, dict) else value

    words = {"inputs": "input", "model": "model", "settings": "settings"}
    changed = [word for name, word in words.items() if part(recorded, name) != part(current, name)]
    if not changed:
        return ""
    return (", ".join(changed[:-1]) + " and " if len(changed) > 1 else "") + changed[-1] + " changed"


def _spare_core_for_reading(device: torch.device) -> bool:
    """Whether reading the next case in a background thread can overlap the network instead of slowing it.

    Reading is CPU work (decoding, transforms). On a GPU, or with more cores than torch's threads in all local
    processes, it runs beside the network for free; with every core in torch's threads it preempts one of them and the
    others wait for it, which cost 15% end to end on 2 cores (``brainseg benchmark``), so reading then takes turns.
    """
    if device.type != "cpu":
        return True
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores > torch.get_num_threads() * int(os.environ.get("LOCAL_WORLD_SIZE", 1))


@dataclass
class _Prepared:
    """A case read for prediction (``loaded``), or found finished by ``--resume`` (``finished``: its summary row)."""

    fingerprint: dict
    loaded: LoadedCase | None = None
    finished: dict | None = None
    #: why a case finished before is redone (``redone: input changed``)
    note: str = ""


def _prepare(case: Case, job: _Job) -> _Prepared:
    """Fingerprint a case's inputs and read them, unless ``--resume`` finds the case finished with the same
    fingerprint (runs in a background thread, overlapping the prediction of the case before).

    Raises:
        InputError: for a case found unusable, a file that cannot be read, and errors of reading.
    """
    if case.error:
        raise InputError(case.source, case.error)
    fingerprint = {"inputs": input_fingerprint(case), **job.fingerprint}
    note = ""
    marker = job.resumable.get(case.case_id)
    if marker is not None:
        changed = _changes(marker.get("fingerprint"), fingerprint)
        if not changed:
            return _Prepared(fingerprint, finished={key: marker.get(key, "") for key in SUMMARY_FIELDS})
        note = f"redone: {changed}"
        logger.warning("case %s (%s): %s", case.case_id, case.source, note)
    loaded = load_for_case(case.kind, case.images, job.spec, case.series, case.primary, case.fills)
    return _Prepared(fingerprint, loaded, note=note)


#: how a batch stopped for want of room goes on
_GO_ON = "the finished cases are kept: make room and run the same command with --resume to go on"


def _run_cases(cases: list[Case], job: _Job) -> list[dict]:
    """Run ``cases`` in order, recording the rows in ``job.summary`` after each.

    Raises:
        InputError: when the output folder has no room left or the summary cannot be written: the batch stops, with
            the case at fault and those not run recorded as failed where the summary can still be written.
    """
    rows: list[dict] = []
    overlap = _spare_core_for_reading(job.predictor.device)
    order = {c.case_id: i for i, c in enumerate(cases)}  # summary rows stay in case order
    bar = tqdm(total=len(cases), unit="case", disable=not job.settings.progress or job.rank > 0)
    with bar, ThreadPoolExecutor(max_workers=1) as pool:  # reads the next case while this one is predicted
        pending: Future | None = pool.submit(_prepare, cases[0], job) if cases and overlap else None
        for index, case in enumerate(cases):
            started = time.perf_counter()
            future = pending
            pending = pool.submit(_prepare, cases[index + 1], job) if overlap and index + 1 < len(cases) else None
            row, no_room = _run_case(case, future, job, started)
            rows.append(row)
            rows.sort(key=lambda r: order.get(r["case"], len(order)))
            if no_room:
                rows += [_row(c, "failed", f"not run: {no_room} in {job.out}") for c in cases[index + 1:]]
            try:
                _write_summary(job.summary, _with_earlier(rows, job.earlier))
            except OSError as err:
                raise InputError(job.summary, f"cannot be written ({_os_reason(err)}): the batch stopped at case "
                                              f"{index + 1} of {len(cases)}; {_GO_ON}") from err
            if no_room:
                raise InputError(job.out, f"{no_room}: case {case.case_id} could not be written and the batch "
                                          f"stopped at case {index + 1} of {len(cases)}; {_GO_ON}")
            bar.set_postfix(failed=sum(r["status"] == "failed" for r in rows), refresh=False)
            if index + 1 < len(cases):
                bar.update(1)
            else:  # the finished bar is drawn once, when it closes: update() would draw it a second time
                bar.n = len(cases)
    return rows


def _run_case(case: Case, future: Future | None, job: _Job, started: float) -> tuple[dict, str]:
    """One case's summary row, and the reason the output folder has no room when that is why the case failed."""
    writer = None
    try:
        prepared = future.result() if future is not None else _prepare(case, job)
        if prepared.finished is not None:
            return prepared.finished, ""
        writer = _CaseWriter(job.out, case.case_id)
        values = _predict_case(case, prepared.loaded, job.predictor, job.post, writer)
        row = _row(case, "ok", seconds=round(time.perf_counter() - started, 3), **values)
        writer.commit(row, case.inputs(), {"fingerprint": prepared.fingerprint, **_case_details(case, prepared.loaded),
                                           "uncertainty_score": values.get("uncertainty_score", "")})
        # why it was redone is this run's news: the marker's row, which a later --resume reports, does not repeat it
        return {**row, "warnings": "; ".join(filter(None, [prepared.note, row["warnings"]]))}, ""
    except BaseException as err:
        if writer is not None:
            writer.abort()  # no half-written case stays behind, on Ctrl-C too
        if not isinstance(err, Exception):
            raise
        reason = _failure_reason(case, err)
        logger.warning("case %s failed: %s", case.case_id, _one_line(reason))
        logger.debug("case %s failed", case.case_id, exc_info=True)  # the traceback: in the log, not the summary
        return _row(case, "failed", reason, seconds=round(time.perf_counter() - started, 3)), _no_room(err)


def _os_reason(error: OSError) -> str:
    return (error.strerror or str(error)).lower()


def _no_room(error: BaseException | None) -> str:
    """``no space left on device`` (or the quota's reason) when ``error`` or one of its causes says the disk is full,
    also in a library's message (ITK writes the system's reason into its text); else empty."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        for code in _NO_ROOM:
            if (isinstance(error, OSError) and error.errno == code) or os.strerror(code) in str(error):
                return os.strerror(code).lower()
        error = error.__cause__ or error.__context__
    return ""


def _case_details(case: Case, loaded: LoadedCase) -> dict:
    """What ``case.json`` says beyond the summary row: how the inputs filled the model's channels and why, which
    channels were resampled onto the primary channel's grid, and which channels a one-channel input filled."""
    details: dict[str, Any] = {}
    if case.roles:
        details["channels"] = case.roles
    if loaded.resampled:
        details["resampled_onto_primary_grid"] = list(loaded.resampled)
    if case.fills:
        details["filled_from_one_channel"] = dict(case.fills)
    return details


def _failure_reason(case: Case, error: Exception) -> str:
    """The reason a case failed for its summary row, naming the file at fault when it is not the case's source."""
    found = input_error_in(error)
    if found is None:
        cause = error.__cause__  # MONAI's Compose hides the transform's own error behind "applying transform"
        return f"{type(error).__name__}: {error}" + (f" ({type(cause).__name__}: {cause})" if cause else "")
    error = found
    if error.path is None or os.path.abspath(error.path) == os.path.abspath(case.source):
        return error.reason
    return str(error)


def _merge_ranks(out: Path, cases: list[Case], rows: list[dict], ranks: _Ranks,
                 earlier: Mapping[str, dict]) -> list[dict]:
    """Rank 0 waits for every rank and writes the merged ``summary.csv`` in case order, with the earlier runs' rows
    it keeps."""
    ranks.barrier()
    merged = rows
    if ranks.rank == 0:
        merged = [r for k in range(ranks.world) for r in _read_summary(out / f".summary.rank{k}.csv")]
        order = {c.case_id: i for i, c in enumerate(cases)}
        merged.sort(key=lambda r: order.get(r["case"], len(order)))
        _write_summary(out / SUMMARY_NAME, _with_earlier(merged, earlier))
        for k in range(ranks.world):
            (out / f".summary.rank{k}.csv").unlink(missing_ok=True)
    ranks.barrier()
    return merged
