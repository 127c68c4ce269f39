"""Segmentation metrics for binary tumour masks per image (slice), per patient (stacked volume) and pooled.

Masks are numpy arrays or torch tensors, 2D or 3D, in reader axis order (x, y[, z]); any nonzero value is
tumour ({0,1}, {0,255}, bool, or a label map scored as whole tumour). ``spacing`` is mm per axis in the same
order (default 1: pixels). Distances are between boundary-voxel centres (MONAI's definition): HD95 is the larger
of the two directed 95th percentiles, ASD the mean of the distances pooled over both directions, both in the unit
of ``spacing``.

Conventions when a mask is empty (Dice and F1 are the same number for binary masks):

=====================  =========  =========  ==========  ==========  ============
truth / prediction     Dice, IoU  precision  recall      HD95, ASD   ``missed``
=====================  =========  =========  ==========  ==========  ============
both empty             1          1          1           0           False
truth empty only       0          0          nan         nan         False
prediction empty only  0          nan        0           nan         True
=====================  =========  =========  ==========  ==========  ============

Both empty: nothing to find and nothing wrongly found. nan means undefined: it is kept in the per-record
dicts and left out of every mean, and every summary says how many values it is over (``*_n``) and how many
were undefined (``*_undefined``). Specificity is nan when the truth covers every voxel.

The patient is the unit of the headline figure: a patient's Dice is the Dice of its slices stacked into a
volume (sum of intersections over sum of sizes), not the mean of its slice Dices.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Union

import numpy as np
import torch
from monai.metrics import compute_average_surface_distance, compute_confusion_matrix_metric, compute_hausdorff_distance

from brainseg_monai.errors import InputError

__all__ = [
    "Confusion",
    "DEFAULT_SIZE_EDGES",
    "DEFAULT_THRESHOLDS",
    "RATIO_METRICS",
    "best_on_curve",
    "describe",
    "detection_metrics",
    "image_metrics",
    "patient_metrics",
    "pooled_metrics",
    "size_bins",
    "summarise",
    "threshold_grid",
    "tumour_free_metrics",
]

ArrayLike = Union[np.ndarray, torch.Tensor]

RATIO_METRICS = {
    "dice": "f1 score",  # 2TP / (2TP + FP + FN): the formula of MONAI's DiceHelper, taken from counts so it pools
    "iou": "threat score",
    "precision": "precision",
    "recall": "sensitivity",
    "specificity": "specificity",
    "f1": "f1 score",
    "accuracy": "accuracy",
}
"""Our metric name -> MONAI's `compute_confusion_matrix_metric` name."""

_ONE_WHEN_BOTH_EMPTY = ("dice", "iou", "precision", "recall", "f1")
_SUMMARY_METRICS = ("dice", "iou", "precision", "recall", "specificity", "accuracy", "hd95", "asd")
DEFAULT_THRESHOLDS = np.round(np.arange(0.05, 0.96, 0.05), 6)
DEFAULT_SIZE_EDGES = (0, 100, 500, 2000, math.inf)


@dataclass(frozen=True)
class Confusion:
    """Pixel (voxel) confusion counts of a binary prediction; the ratio metrics follow the module's conventions.

    ``a + b`` pools two confusions (all their pixels), so ``sum(confusions, Confusion())`` is the pooled matrix.
    """

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    @classmethod
    def from_masks(cls, pred: ArrayLike, truth: ArrayLike) -> Confusion:
        """Count TP, FP, FN, TN of ``pred`` against ``truth`` (same shape; nonzero is tumour)."""
        p, t = _as_mask(pred, "pred"), _as_mask(truth, "truth")
        _check_same_shape(p, t)
        # counted here, not with MONAI's get_confusion_matrix: it returns float32 counts, inexact above 2**24 voxels
        tp = int(np.count_nonzero(p & t))
        n_pred, n_truth = int(np.count_nonzero(p)), int(np.count_nonzero(t))
        return cls(tp=tp, fp=n_pred - tp, fn=n_truth - tp, tn=int(p.size) - n_pred - n_truth + tp)

    def __add__(self, other: Confusion) -> Confusion:
        if not isinstance(other, Confusion):
            return NotImplemented
        return Confusion(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    def ratio(self, name: str) -> float:
        """The ratio metric ``name`` (a key of `RATIO_METRICS`) from MONAI, with the both-empty convention applied."""
        if name not in RATIO_METRICS:
            raise ValueError(f"name must be one of {sorted(RATIO_METRICS)}, got {name!r}.")
        if name in _ONE_WHEN_BOTH_EMPTY and self.tp + self.fp + self.fn == 0:
            return 1.0
        matrix = torch.tensor([self.tp, self.fp, self.tn, self.fn], dtype=torch.float64)  # MONAI's order
        return float(compute_confusion_matrix_metric(RATIO_METRICS[name], matrix))

    @property
    def dice(self) -> float:
        """2TP / (2TP + FP + FN)."""
        return self.ratio("dice")

    @property
    def iou(self) -> float:
        """Jaccard index TP / (TP + FP + FN)."""
        return self.ratio("iou")

    @property
    def precision(self) -> float:
        """TP / (TP + FP); nan when nothing is predicted but there is tumour."""
        return self.ratio("precision")

    @property
    def recall(self) -> float:
        """Sensitivity TP / (TP + FN); nan when the truth is empty but something is predicted."""
        return self.ratio("recall")

    @property
    def specificity(self) -> float:
        """TN / (TN + FP); nan when there is no background."""
        return self.ratio("specificity")

    @property
    def f1(self) -> float:
        """The F1 score, equal to Dice for binary masks."""
        return self.ratio("f1")

    @property
    def accuracy(self) -> float:
        """Pixel accuracy (TP + TN) / all."""
        return self.ratio("accuracy")

    def metrics(self) -> dict[str, Any]:
        """Counts, tumour sizes and every ratio metric as a flat dict."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["truth_size"], out["pred_size"] = self.tp + self.fn, self.tp + self.fp
        out.update({name: self.ratio(name) for name in RATIO_METRICS})
        return out


def image_metrics(pred: ArrayLike, truth: ArrayLike, spacing: float | Sequence[float] | None = None) -> dict[str, Any]:
    """Every metric of one image or slice (2D) or volume (3D).

    Args:
        pred: predicted mask, (x, y[, z]); nonzero is tumour.
        truth: true mask of the same shape.
        spacing: mm per axis in the same order (one number: isotropic); None means 1 (distances in pixels).

    Returns:
        ``tp, fp, fn, tn, truth_size, pred_size`` (pixel counts), ``dice, iou, precision, recall, specificity,
        f1, accuracy, hd95, asd`` (in the unit of ``spacing``) and ``missed`` (tumour in the truth, nothing predicted).

    Raises:
        InputError: when the shapes differ.
        ValueError: when a mask is not 2D or 3D, looks like probabilities, or ``spacing`` is not positive.
    """
    p, t = _as_mask(pred, "pred"), _as_mask(truth, "truth")
    _check_same_shape(p, t)
    if p.ndim not in (2, 3):
        raise ValueError(f"pred and truth must be 2D or 3D masks, got shape {p.shape}.")
    return _mask_metrics(p, t, _check_spacing(spacing, p.ndim))


def patient_metrics(
    preds: Sequence[ArrayLike] | ArrayLike,
    truths: Sequence[ArrayLike] | ArrayLike,
    spacing: float | Sequence[float] | None = None,
) -> dict[str, Any]:
    """Every metric of one patient: its slices stacked into a volume, so Dice is sum(2TP) / (sum|P| + sum|T|).

    Args:
        preds: the patient's predicted 2D slices in slice order (stacked along a new last axis, z), or one
            3D volume (x, y, z).
        truths: the true slices (or volume), matching ``preds``.
        spacing: mm per axis of the volume (x, y, z), z the slice spacing; None means 1 (pixels and slice steps).

    Returns:
        What `image_metrics` returns for the stacked volume, plus ``slices`` and ``slices_with_tumour``.

    Raises:
        InputError: when the slice counts or shapes differ.
        ValueError: when the inputs are neither 2D slices nor a 3D volume, or ``spacing`` is not 3 positive numbers.
    """
    p, t = _as_volume(preds, "preds"), _as_volume(truths, "truths")
    _check_same_shape(p, t)
    out = _mask_metrics(p, t, _check_spacing(spacing, 3))
    out["slices"] = int(p.shape[-1])
    out["slices_with_tumour"] = int(np.count_nonzero(t.any(axis=(0, 1))))
    return out


def pooled_metrics(confusions: Iterable[Confusion | Mapping[str, Any]]) -> dict[str, Any]:
    """Metrics of all pixels together: the confusion matrices summed, then the ratios (``pooled_over``: how many).

    Args:
        confusions: `Confusion` objects or dicts with ``tp, fp, fn, tn`` (what `image_metrics` returns).
    """
    total, count = Confusion(), 0
    for item in confusions:
        total += item if isinstance(item, Confusion) else _confusion_of(item)
        count += 1
    if count == 0:
        raise ValueError("confusions must hold at least one confusion matrix, got none.")
    return {"pooled_over": count, **total.metrics()}


def describe(values: Iterable[float]) -> dict[str, float | int]:
    """Nan-aware ``mean, median, std`` (sample, ddof=1), ``min, max`` over the defined values, with ``n`` (how many
    were defined) and ``undefined`` (how many were nan); the statistics are nan when none is defined."""
    array = np.asarray([float(v) for v in values], dtype=np.float64)
    defined = array[~np.isnan(array)]
    n = int(defined.size)
    stats = {"mean": np.nan, "median": np.nan, "std": np.nan, "min": np.nan, "max": np.nan}
    if n:
        stats = {
            "mean": float(defined.mean()), "median": float(np.median(defined)),
            "std": float(defined.std(ddof=1)) if n > 1 else np.nan,
            "min": float(defined.min()), "max": float(defined.max()),
        }  # fmt: skip
    return {**stats, "n": n, "undefined": int(array.size - n)}


def tumour_free_metrics(records: Sequence[Mapping[str, Any]]) -> dict[str, float | int]:
    """False positives on records (slices) whose truth is empty: how many there are (``tumour_free``), how many get
    any predicted pixel (``with_false_positive``, ``false_positive_rate``) and the FP pixels in all
    (``false_positive_pixels``)."""
    free = [r for r in records if r["truth_size"] == 0]
    flagged = sum(1 for r in free if r["pred_size"] > 0)
    return {
        "tumour_free": len(free),
        "with_false_positive": flagged,
        "false_positive_rate": flagged / len(free) if free else np.nan,
        "false_positive_pixels": int(sum(r["pred_size"] for r in free)),
    }


def detection_metrics(records: Sequence[Mapping[str, Any]]) -> dict[str, float | int]:
    """Tumour present / absent per record (slice or patient): present in the truth when ``truth_size > 0``,
    detected when ``pred_size > 0``. Sensitivity and specificity are nan when there is no record of that class."""
    present = np.array([r["truth_size"] > 0 for r in records], dtype=bool)
    detected = np.array([r["pred_size"] > 0 for r in records], dtype=bool)
    counts = Confusion(
        tp=int(np.count_nonzero(present & detected)), fp=int(np.count_nonzero(~present & detected)),
        fn=int(np.count_nonzero(present & ~detected)), tn=int(np.count_nonzero(~present & ~detected)),
    )  # fmt: skip
    matrix = torch.tensor([counts.tp, counts.fp, counts.tn, counts.fn], dtype=torch.float64)
    return {
        "n": len(records), "with_tumour": counts.tp + counts.fn, "tumour_free": counts.fp + counts.tn,
        "tp": counts.tp, "fp": counts.fp, "fn": counts.fn, "tn": counts.tn,
        "sensitivity": float(compute_confusion_matrix_metric("sensitivity", matrix)),
        "specificity": float(compute_confusion_matrix_metric("specificity", matrix)),
    }  # fmt: skip


def size_bins(
    records: Sequence[Mapping[str, Any]], edges: Sequence[float] = DEFAULT_SIZE_EDGES
) -> list[dict[str, Any]]:
    """Dice and recall by true tumour size: bin i holds records with ``edges[i] < truth_size <= edges[i+1]``, so
    tumour-free records are never in a bin. Each bin: ``label`` ("1-100", ..., ">2000"), ``low``, ``high``,
    ``n``, ``dice_mean``, ``dice_median``, ``recall_mean``, ``recall_median``, ``missed`` (nothing predicted).

    Args:
        records: dicts with ``truth_size``, ``dice``, ``recall`` and ``missed`` (`image_metrics`, `patient_metrics`).
        edges: increasing bin edges in pixels, the first >= 0; the last may be ``inf``.
    """
    edge_values = [float(e) for e in edges]
    if len(edge_values) < 2 or edge_values[0] < 0 or any(b <= a for a, b in zip(edge_values, edge_values[1:])):
        raise ValueError(f"edges must be at least two increasing numbers, the first >= 0, got {tuple(edges)!r}.")
    out = []
    for low, high in zip(edge_values, edge_values[1:]):
        members = [r for r in records if low < r["truth_size"] <= high]
        first = math.floor(low) + 1
        label = f">{math.floor(low)}" if math.isinf(high) else f"{first}-{math.floor(high)}"
        dice, recall = describe(r["dice"] for r in members), describe(r["recall"] for r in members)
        out.append({
            "label": label, "low": low, "high": high, "n": len(members),
            "dice_mean": dice["mean"], "dice_median": dice["median"],
            "recall_mean": recall["mean"], "recall_median": recall["median"],
            "missed": sum(1 for r in members if r["missed"]),
        })  # fmt: skip
    return out


def summarise(per_image: Sequence[Mapping[str, Any]], per_patient: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The evaluation summary of per-image and per-patient records (what `image_metrics` / `patient_metrics` return).

    For each metric m in dice, iou, precision, recall, specificity, accuracy, hd95, asd:
    ``patient_<m>_{mean,median,std,min,max,n,undefined}`` over patients and ``image_<m>_...`` over the images
    with tumour in the truth (``image_dice_mean`` is the mean slice Dice on tumour slices). ``global_<m>`` for the
    ratio metrics comes from the pooled confusion matrix (``confusion``), summed over the patients (over the images
    when no patient is given). Also ``patients``, ``images``, ``tumour_images``, ``patients_missed``,
    ``images_missed``, ``tumour_free`` (`tumour_free_metrics` of the images), ``detection`` (``image`` and
    ``patient``: `detection_metrics`) and ``size_bins`` (`size_bins` of the images).

    Raises:
        ValueError: when both lists are empty.
    """
    if not per_image and not per_patient:
        raise ValueError("summarise needs per_image or per_patient records, got neither.")
    tumour_images = [r for r in per_image if r["truth_size"] > 0]
    out: dict[str, Any] = {"patients": len(per_patient), "images": len(per_image), "tumour_images": len(tumour_images)}
    for level, records in (("patient", per_patient), ("image", tumour_images)):
        for metric in _SUMMARY_METRICS:
            for stat, value in describe(r[metric] for r in records).items():
                out[f"{level}_{metric}_{stat}"] = value
    pooled = pooled_metrics(per_patient or per_image)
    out.update({f"global_{name}": pooled[name] for name in RATIO_METRICS if name != "f1"})
    out["confusion"] = {key: pooled[key] for key in ("tp", "fp", "fn", "tn")}
    out["patients_missed"] = sum(1 for r in per_patient if r["missed"])
    out["images_missed"] = sum(1 for r in per_image if r["missed"])
    out["tumour_free"] = tumour_free_metrics(per_image)
    out["detection"] = {"image": detection_metrics(per_image), "patient": detection_metrics(per_patient)}
    out["size_bins"] = size_bins(per_image)
    return out


def threshold_grid(thresholds: Sequence[float] | np.ndarray) -> np.ndarray:
    """Candidate thresholds sorted, deduplicated and rounded to 6 decimals (so 0.15000000000000002 is 0.15).

    Raises:
        ValueError: when there is none, or one is outside (0, 1).
    """
    grid = np.unique(np.round(np.asarray(thresholds, dtype=np.float64).ravel(), 6))
    if grid.size == 0 or not np.all((grid > 0) & (grid < 1)):
        raise ValueError(f"thresholds must be numbers in (0, 1), got {np.asarray(thresholds)!r}.")
    return grid


def best_on_curve(curve: Sequence[tuple[float, float]]) -> float:
    """The threshold of a ``(threshold, score)`` curve with the highest score; ties go to the threshold closest to
    0.5, then the lower one (a curve in increasing threshold order)."""
    grid, values = np.array([t for t, _ in curve]), np.array([v for _, v in curve])
    tied = np.flatnonzero(np.isclose(values, values.max(), rtol=0.0, atol=1e-12))
    return float(grid[tied[np.argmin(np.abs(grid[tied] - 0.5))]])


def _mask_metrics(p: np.ndarray, t: np.ndarray, spacing: tuple[float, ...]) -> dict[str, Any]:
    """Confusion metrics, distances and ``missed`` of boolean masks of equal shape."""
    out = Confusion.from_masks(p, t).metrics()
    out["hd95"], out["asd"] = _surface_distances(p, t, spacing)
    out["missed"] = out["truth_size"] > 0 and out["pred_size"] == 0
    return out


def _surface_distances(p: np.ndarray, t: np.ndarray, spacing: tuple[float, ...]) -> tuple[float, float]:
    """(HD95, ASD) in the unit of ``spacing`` from MONAI, after the empty-mask conventions."""
    has_p, has_t = bool(p.any()), bool(t.any())
    if not has_p and not has_t:
        return 0.0, 0.0
    if not has_p or not has_t:
        return math.nan, math.nan
    # crop to the union's box plus one voxel first: distances do not change, MONAI's own crop is ~20x slower
    union = p | t
    box = []
    for axis in range(union.ndim):
        hit = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        box.append(slice(max(int(hit[0]) - 1, 0), int(hit[-1]) + 2))
    y_pred = torch.as_tensor(np.ascontiguousarray(p[tuple(box)]))[None, None]
    y = torch.as_tensor(np.ascontiguousarray(t[tuple(box)]))[None, None]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")  # raised by MONAI's own internal call
        hd95 = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=list(spacing))
        asd = compute_average_surface_distance(
            y_pred, y, include_background=True, symmetric=True, spacing=list(spacing)
        )
    return float(hd95), float(asd)


def _confusion_of(record: Mapping[str, Any]) -> Confusion:
    """The `Confusion` stored in a metrics dict."""
    missing = [f.name for f in fields(Confusion) if f.name not in record]
    if missing:
        raise ValueError(f"a metrics record must hold tp, fp, fn, tn; this one lacks {missing}.")
    return Confusion(*(int(record[f.name]) for f in fields(Confusion)))


def _to_numpy(x: ArrayLike) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _as_mask(x: ArrayLike, name: str) -> np.ndarray:
    """Boolean mask (nonzero is tumour); floating values strictly between 0 and 1 are taken for probabilities."""
    array = _to_numpy(x)
    if array.dtype == bool:
        return array
    if np.issubdtype(array.dtype, np.floating) and np.any((array > 0) & (array < 1)):
        raise ValueError(f"{name} must be a binary mask (bool, 0/1 or 0/255), got values in (0, 1): threshold first.")
    return array != 0


def _as_volume(x: Sequence[ArrayLike] | ArrayLike, name: str) -> np.ndarray:
    """One 3D mask (x, y, z): a 3D array as it is, or 2D slices stacked along a new last axis."""
    if isinstance(x, (np.ndarray, torch.Tensor)):
        if x.ndim != 3:
            raise ValueError(f"{name} must be 2D slices or one 3D volume, got an array of shape {tuple(x.shape)}.")
        return _as_mask(x, name)
    slices = [_as_mask(s, f"{name}[{i}]") for i, s in enumerate(x)]
    if not slices:
        raise ValueError(f"{name} must hold at least one slice, got none.")
    shapes = {s.shape for s in slices}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise InputError(None, f"{name} must be 2D slices of one shape, got shapes {sorted(shapes)}")
    return np.stack(slices, axis=-1)


def _check_same_shape(p: np.ndarray, t: np.ndarray) -> None:
    if p.shape != t.shape:
        raise InputError(None, f"prediction shape {p.shape} differs from truth shape {t.shape}")


def _check_spacing(spacing: float | Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    values = np.ravel(np.asarray(spacing, dtype=np.float64))
    if values.size == 1:
        values = np.repeat(values, ndim)
    if values.size != ndim or not np.all(np.isfinite(values) & (values > 0)):
        raise ValueError(f"spacing must be one or {ndim} positive numbers (mm per axis, x, y[, z]), got {spacing!r}.")
    return tuple(float(v) for v in values)
