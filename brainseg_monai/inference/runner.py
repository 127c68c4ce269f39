"""The batch job behind ``brainseg infer``: every case independent, failures recorded, outputs atomic, resumable.

Each case is predicted into a hidden temporary folder that is renamed to ``DIR/<case id>`` when complete, with a
``case.json`` marker holding its summary row; ``resume`` skips cases whose marker exists. ``summary.csv`` is
rewritten atomically after every case. Under ``torchrun`` each rank takes every WORLD_SIZE-th case and rank 0
merges the per-rank summaries.
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
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from brainseg_monai.errors import InputError
from brainseg_monai.inference.cases import Case, discover_cases
from brainseg_monai.inference.postprocess import PostProcessing
from brainseg_monai.inference.predictor import Predictor, load_for_case, load_model
from brainseg_monai.inference.writers import write_dicom_seg, write_overlay_png, write_png_mask, write_volume_mask

logger = logging.getLogger(__name__)

SUMMARY_FIELDS = [
    "case", "source", "status", "error", "kind", "images", "tumour_voxels", "tumour_ml", "slices_with_tumour",
    "coverage_pct", "seconds",
]
CASE_MARKER = "case.json"


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
    progress: bool = True


def _stem(path: str) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".tiff", ".tif", ".png", ".jpg", ".jpeg", ".bmp", ".mha", ".mhd", ".nrrd", ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


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
    matrix = np.asarray(affine, dtype=np.float64)
    return np.linalg.norm(matrix[:3, :3], axis=0).tolist()


class _CaseWriter:
    """Writes one case into a temporary folder and moves it into place only when complete."""

    def __init__(self, out_dir: Path, case_id: str) -> None:
        self.final = out_dir / case_id
        if self.final.exists() and not (self.final / CASE_MARKER).is_file() and any(self.final.iterdir()):
            raise InputError(self.final, "exists and was not written by brainseg infer; refusing to replace it")
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{case_id}.", dir=out_dir))

    def path(self, name: str) -> Path:
        return self.tmp / name

    def commit(self, row: dict) -> None:
        (self.tmp / CASE_MARKER).write_text(json.dumps(row, indent=2, default=str) + "\n")
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
        probs = predictor.predict_slices(loaded["slices"], case.images)
        masks = post.apply_to_slices(probs, case.images)
        for path, image, mask in zip(case.images, loaded["slices"], masks):
            write_png_mask(mask, writer.path(f"{_stem(path)}_pred.png"), reference=path)
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
        prob = predictor.predict_volume_by_slices(raw, case.source)
        affine = np.asarray(raw.meta["affine"])
    mask = post(prob)
    write_volume_mask(mask, affine, writer.path("mask.nii.gz"), reference=case.images[0])
    overlay_image = np.asarray(raw) if raw is not None else np.asarray(image)
    if overlay_image.shape[1:] == mask.shape:
        write_overlay_png(overlay_image, mask, writer.path("overlay.png"))
    else:
        write_overlay_png(prob[None], mask, writer.path("overlay.png"))
    if case.kind == "dicom" and case.series:
        write_dicom_seg(mask, case.series[0].files, writer.path("seg.dcm"))
    return _volume_stats(mask, _spacing(affine))


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


def run_inference(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, settings: InferenceSettings) -> list[dict]:
    """Segment every case under ``inputs`` into ``out_dir``; returns the summary rows (also in ``summary.csv``).

    A case that cannot be read or predicted is recorded as ``failed`` with its reason and the others go on.

    Raises:
        InputError: when the checkpoint or an input path is unusable as a whole (nothing could run).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    network, spec = load_model(settings.checkpoint, settings.device)
    device = next(network.parameters()).device
    post = PostProcessing.from_dict(spec.postprocessing)
    overrides = {"threshold": settings.threshold, "min_size": settings.min_size, "open_above": settings.open_above,
                 "keep_largest": settings.keep_largest, "stack_slices": settings.stack_slices}
    post = PostProcessing.from_dict({**post.to_dict(), **{k: v for k, v in overrides.items() if v is not None}})
    predictor = Predictor(network, spec, device, tta=settings.tta, batch_size=settings.batch_size, copy_network=False)
    cases = discover_cases(inputs, spec.in_channels, settings.channels or spec.dicom_channels(), spec.file_channels())
    rank, world = _distributed()
    mine = cases[rank::world]
    rows = _run_cases(mine, out, predictor, post, spec, settings, rank)
    if world > 1:
        return _merge_ranks(out, cases, rows, rank, world)
    _write_summary(out / "summary.csv", rows)
    return rows


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
               rank: int) -> list[dict]:
    rows: list[dict] = []
    summary = out / ("summary.csv" if _distributed()[1] == 1 else f".summary.rank{rank}.csv")
    todo = []
    for case in cases:
        marker = out / case.case_id / CASE_MARKER
        if settings.resume and marker.is_file():
            rows.append(json.loads(marker.read_text()))
        else:
            todo.append(case)
    done_ids = {r["case"] for r in rows}

    def load(case: Case) -> dict:
        if case.error:
            raise InputError(case.source, case.error)
        return load_for_case(case.kind, case.images, spec)

    bar = tqdm(total=len(cases), initial=len(rows), unit="case", disable=not settings.progress or rank > 0)
    overlap = _spare_core_for_reading(predictor.device)
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
                writer.commit(row)
            except Exception as err:  # one bad case is recorded, never fatal to the batch
                if writer is not None:
                    writer.abort()
                reason = err.reason if isinstance(err, InputError) else f"{type(err).__name__}: {err}"
                logger.warning("case %s failed: %s", case.case_id, reason)
                logger.debug("%s", traceback.format_exc())
                row = _row(case, "failed", reason, seconds=round(time.perf_counter() - started, 3))
            rows.append(row)
            done_ids.add(case.case_id)
            order = {c.case_id: i for i, c in enumerate(cases)}
            rows.sort(key=lambda r: order.get(r["case"], len(order)))
            _write_summary(summary, rows)
            bar.update(1)
            bar.set_postfix(failed=sum(r["status"] == "failed" for r in rows))
    bar.close()
    return rows


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
