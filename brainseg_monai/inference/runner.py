"""The batch job behind ``brainseg infer``: every case independent, failures recorded, outputs atomic, resumable.

Each case is predicted into a hidden temporary folder that is renamed to ``DIR/<case id>`` when complete, with a
``case.json`` marker holding its summary row and the inputs it read; ``resume`` skips cases whose marker lists the
same inputs. ``summary.csv`` is rewritten atomically after every case. Under ``torchrun`` each rank takes every
WORLD_SIZE-th case and rank 0 merges the per-rank summaries.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from brainseg_monai.channel_roles import InputRoles, SelectionRules
from brainseg_monai.errors import InputError, input_error_in
from brainseg_monai.inference.cases import CASE_MARKER, Case, discover_cases
from brainseg_monai.inference.postprocess import PostProcessing
from brainseg_monai.inference.predictor import Predictor, load_for_case, load_model
from brainseg_monai.io import file_stem
from brainseg_monai.inference.writers import (
    SegNotWritten,
    write_dicom_seg,
    write_overlay_png,
    write_png_mask,
    write_volume_mask,
)

logger = logging.getLogger(__name__)

SUMMARY_FIELDS = [
    "case", "source", "status", "error", "warnings", "kind", "images", "tumour_voxels", "tumour_ml",
    "slices_with_tumour", "coverage_pct", "seconds",
]
#: the columns that say a ``summary.csv`` is ours: any other file of that name is the user's and is never replaced
_OWN_SUMMARY_COLUMNS = {"case", "source", "status", "error"}


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
    stack_slices: bool | None = None
    channels: Mapping[str, str] | None = None
    #: the user's series selection rules (``--series-rules``); None: the documented defaults
    series_rules: SelectionRules | None = None
    progress: bool = True


def _row(case: Case, status: str, error: str = "", **values: Any) -> dict:
    row = {key: "" for key in SUMMARY_FIELDS}
    row.update(case=case.case_id, source=case.source, status=status, error=error, kind=case.kind, images=len(case.images))
    row.update({k: v for k, v in values.items() if k in row})
    return row


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


def _spacing(affine: Any) -> list[float]:
    """Voxel spacing from the spatial block of a (d+1)x(d+1) affine, never its translation column."""
    matrix = np.asarray(affine, dtype=np.float64)
    rank = matrix.shape[0] - 1
    return np.linalg.norm(matrix[:rank, :rank], axis=0).tolist()


def slice_output_names(paths: Sequence[str]) -> list[str]:
    """``<stem>_pred.png`` per slice, or ``<file name>_pred.png`` for a later slice sharing an earlier one's stem.

    ``a.tif`` after ``a.png`` would otherwise overwrite its mask; the first keeps the usual name, which
    ``brainseg evaluate`` and the web app look for.

    Raises:
        InputError: when two slices would still be written to one name.
    """
    names: list[str] = []
    for path in paths:
        name = f"{file_stem(path)}_pred.png"
        names.append(f"{Path(path).name}_pred.png" if name in names else name)
    clash = next((n for n, count in Counter(names).items() if count > 1), None)
    if clash is not None:
        both = [p for p, n in zip(paths, names) if n == clash]
        raise InputError(os.path.commonpath(both), f"{', '.join(map(str, both))} would all be written as {clash}")
    return names


class _CaseWriter:
    """Writes one case into a temporary folder and moves it into place only when complete."""

    def __init__(self, out_dir: Path, case_id: str) -> None:
        self.final = out_dir / case_id
        if self.final.exists() and not (self.final / CASE_MARKER).is_file() and any(self.final.iterdir()):
            raise InputError(self.final, "exists and was not written by brainseg infer; refusing to replace it")
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{case_id}.", dir=out_dir))

    def path(self, name: str) -> Path:
        return self.tmp / name

    def commit(self, row: dict, inputs: Sequence[str], details: Mapping[str, Any] | None = None) -> None:
        """Write the marker (summary row, the inputs read for ``--resume``, and ``details`` such as the channel
        roles) and move the case into place."""
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


def _predict_case(case: Case, loaded: dict, predictor: Predictor, post: PostProcessing, writer: _CaseWriter) -> dict:
    """Predict one loaded case and write its outputs into ``writer``; returns the summary values."""
    if loaded["kind"] == "slices":
        names = slice_output_names(case.images)
        probs = predictor.predict_slices(loaded["slices"], case.images)
        masks = post.apply_to_slices(probs, case.images)
        for path, name, mask in zip(case.images, names, masks):
            write_png_mask(mask, writer.path(name), reference=path)
        best = int(np.argmax([m.sum() for m in masks]))
        write_overlay_png(np.asarray(loaded["slices"][best]), masks[best], writer.path("overlay.png"))
        voxels = int(sum(int(m.sum()) for m in masks))
        total = int(sum(m.size for m in masks))
        return {
            "tumour_voxels": voxels,
            "slices_with_tumour": int(sum(bool(m.any()) for m in masks)),
            "coverage_pct": round(100.0 * voxels / total, 4),
        }
    if "data" in loaded:
        image = loaded["data"]["image"]
        prob = predictor.predict_volume_3d(loaded["data"], loaded["preprocessing"])
        affine = np.asarray(image.meta["original_affine"])
        raw = None
    else:
        raw = loaded["volume"]
        prob = predictor.predict_volume_by_slices(raw, case.source, resample=not loaded["planar"])
        affine = np.asarray(raw.meta["affine"])
    mask = post(prob)
    reference = case.images[case.primary] if case.primary < len(case.images) else case.images[0]
    write_volume_mask(mask, affine, writer.path("mask.nii.gz"), reference=reference)
    overlay_image = np.asarray(raw) if raw is not None else np.asarray(image)
    if overlay_image.shape[1:] == mask.shape:
        write_overlay_png(overlay_image, mask, writer.path("overlay.png"))
    else:
        write_overlay_png(prob[None], mask, writer.path("overlay.png"))
    warnings: list[str] = []
    if case.kind == "dicom" and case.series:
        try:  # the mask is the result; a SEG the source's attributes do not allow is a warning, not a lost case
            warnings += write_dicom_seg(mask, case.series[case.primary].files, writer.path("seg.dcm"))
        except SegNotWritten as err:
            warnings.append(f"SEG not written: {err}")
    # a 2D image has no slice thickness, so no volume in ml
    stats = _volume_stats(mask, None if loaded.get("planar") else _spacing(affine))
    return {**stats, "warnings": "; ".join(warnings)}


def _write_summary(path: Path, rows: Sequence[Mapping]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=SUMMARY_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _read_summary(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _distributed() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def run_inference(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, settings: InferenceSettings,
                  select: Callable[[Case], bool] | None = None) -> list[dict]:
    """Segment every case under ``inputs`` into ``out_dir``; returns the summary rows (also in ``summary.csv``).

    A case that cannot be read or predicted, and an input that cannot be used, is recorded as ``failed`` with its
    reason and the others go on. ``out_dir`` and what it holds are never read as inputs, even inside an input folder.
    ``select`` keeps only the cases it accepts (e.g. the series a web app user chose in a folder holding several).

    Raises:
        InputError: when the checkpoint is unusable, no input can be used at all, ``select`` accepts no case, or
            ``out_dir`` is a file or holds a ``summary.csv`` that ``brainseg infer`` did not write.
    """
    out = Path(out_dir)
    _check_output_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    network, spec = load_model(settings.checkpoint, settings.device)
    device = next(network.parameters()).device
    post = PostProcessing.from_dict(spec.postprocessing)
    overrides = {"threshold": settings.threshold, "min_size": settings.min_size, "open_above": settings.open_above,
                 "keep_largest": settings.keep_largest, "stack_slices": settings.stack_slices}
    post = PostProcessing.from_dict({**post.to_dict(), **{k: v for k, v in overrides.items() if v is not None}})
    predictor = Predictor(network, spec, device, tta=settings.tta, batch_size=settings.batch_size, copy_network=False)
    roles = InputRoles.of(spec, settings.channels, settings.series_rules)
    cases = discover_cases(inputs, roles, exclude=[out])
    if select is not None:
        cases = [c for c in cases if select(c)]
        if not cases:
            raise InputError(None, f"no case under {', '.join(map(str, inputs))} is the one asked for")
    finished = _match_finished_cases(cases, out) if settings.resume else {}
    rank, world = _distributed()
    mine = cases[rank::world]
    rows = _run_cases(mine, out, predictor, post, spec, settings, rank, finished)
    if world > 1:
        return _merge_ranks(out, cases, rows, rank, world)
    _write_summary(out / "summary.csv", rows)
    return rows


def _check_output_folder(out: Path) -> None:
    """Refuse an ``--out`` that is a file, or whose ``summary.csv`` is not ours (it would be replaced).

    Raises:
        InputError: naming the path and the reason.
    """
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder; --out must be a folder (it is created when missing)")
    summary = out / "summary.csv"
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


def _match_finished_cases(cases: list[Case], out: Path) -> dict[str, dict]:
    """For ``--resume``: the summary rows of cases already finished in ``out`` from the same inputs, by case id.

    A finished case is recognised by the inputs its marker lists, not by its id: ids follow the order of the inputs
    (``img`` and ``img_2`` for two ``img.png``), so the same id may name other inputs in this run. Such a case takes
    the id it was finished under, and the other cases take ids no finished case uses, so none is replaced.
    """
    on_disk: dict[tuple[str, ...], tuple[str, dict]] = {}
    for marker in sorted(out.glob(f"*/{CASE_MARKER}")):
        try:
            row = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue  # an unreadable marker: the case is redone
        if isinstance(row, dict) and row.get("inputs"):
            on_disk[tuple(row["inputs"])] = (marker.parent.name, row)
    finished: dict[str, dict] = {}
    rest = []
    for case in cases:
        hit = on_disk.get(tuple(case.inputs()))
        if hit is not None and hit[0] not in finished:
            case.case_id = hit[0]
            finished[case.case_id] = {key: hit[1].get(key, "") for key in SUMMARY_FIELDS}
        else:
            rest.append(case)
    taken = set(finished) | {name for name, _ in on_disk.values()}
    for case in rest:
        candidate, n = case.case_id, 2
        while candidate in taken:
            candidate, n = f"{case.case_id}_{n}", n + 1
        case.case_id = candidate
        taken.add(candidate)
    return finished


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


def _run_cases(cases: list[Case], out: Path, predictor: Predictor, post: PostProcessing, spec, settings: InferenceSettings,
               rank: int, finished: Mapping[str, dict]) -> list[dict]:
    rows: list[dict] = []
    summary = out / ("summary.csv" if _distributed()[1] == 1 else f".summary.rank{rank}.csv")
    todo = []
    for case in cases:
        if case.case_id in finished:
            rows.append(dict(finished[case.case_id]))
        else:
            todo.append(case)

    def load(case: Case) -> dict:
        if case.error:
            raise InputError(case.source, case.error)
        return load_for_case(case.kind, case.images, spec, case.series, case.primary, case.fills)

    bar = tqdm(total=len(cases), initial=len(rows), unit="case", disable=not settings.progress or rank > 0)
    overlap = _spare_core_for_reading(predictor.device)
    order = {c.case_id: i for i, c in enumerate(cases)}  # summary rows stay in case order
    with ThreadPoolExecutor(max_workers=1) as pool:  # reads the next case while this one is predicted
        pending: Future | None = pool.submit(load, todo[0]) if todo and overlap else None
        for index, case in enumerate(todo):
            started = time.perf_counter()
            future = pending
            pending = pool.submit(load, todo[index + 1]) if overlap and index + 1 < len(todo) else None
            writer = None
            try:
                loaded = future.result() if future is not None else load(case)
                writer = _CaseWriter(out, case.case_id)
                values = _predict_case(case, loaded, predictor, post, writer)
                row = _row(case, "ok", seconds=round(time.perf_counter() - started, 3), **values)
                writer.commit(row, case.inputs(), _case_details(case, loaded))
            except Exception as err:  # one bad case is recorded, never fatal to the batch
                if writer is not None:
                    writer.abort()
                reason = _failure_reason(case, err)
                logger.warning("case %s failed: %s", case.case_id, reason)
                logger.debug("%s", traceback.format_exc())
                row = _row(case, "failed", reason, seconds=round(time.perf_counter() - started, 3))
            rows.append(row)
            rows.sort(key=lambda r: order.get(r["case"], len(order)))
            _write_summary(summary, rows)
            bar.update(1)
            bar.set_postfix(failed=sum(r["status"] == "failed" for r in rows))
    bar.close()
    return rows


def _case_details(case: Case, loaded: Mapping[str, Any]) -> dict:
    """What ``case.json`` says beyond the summary row: how the inputs filled the model's channels and why, which
    channels were resampled onto the primary channel's grid, and which channels a one-channel input filled."""
    details: dict[str, Any] = {}
    if case.roles:
        details["channels"] = case.roles
    if loaded.get("resampled"):
        details["resampled_onto_primary_grid"] = list(loaded["resampled"])
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


def _merge_ranks(out: Path, cases: list[Case], rows: list[dict], rank: int, world: int) -> list[dict]:
    """Rank 0 waits for every rank and writes the merged ``summary.csv`` in case order."""
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend="gloo")
    dist.barrier()
    merged = rows
    if rank == 0:
        merged = [r for k in range(world) for r in _read_summary(out / f".summary.rank{k}.csv")]
        order = {c.case_id: i for i, c in enumerate(cases)}
        merged.sort(key=lambda r: order.get(r["case"], len(order)))
        _write_summary(out / "summary.csv", merged)
        for k in range(world):
            (out / f".summary.rank{k}.csv").unlink(missing_ok=True)
    dist.barrier()
    if created:  # a gloo group left alive at exit can abort the process ("terminate called without an active exception")
        dist.destroy_process_group()
    return merged
