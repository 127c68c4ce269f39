"""Choices made on validation data after training: the probability threshold, whether to keep only the largest
component, and the aggregate of K folds.

The tuned settings are stored in the checkpoint's ``model.json``: ``postprocessing`` (what ``brainseg infer`` applies
by default) and a ``tuning`` block with the curve, the post-processing candidates and their scores, the data they came
from and the previous threshold. The tuning block lives outside ``postprocessing`` because that block holds exactly the
`PostProcessing` settings.

K-fold, the documented way: ``brainseg datalist --folds K`` writes ``dl.json``; train fold k with ``--fold k
--datalist dl.json`` into its own folder; predict fold k's validation patients with that fold's model; evaluate them
with ``brainseg evaluate PRED_k --truth dl.json --fold k``; then `aggregate_folds` over the K ``metrics.json``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from matplotlib.figure import Figure

from brainseg_monai.datalist import IMAGE_SUFFIXES_2D
from brainseg_monai.devices import as_bool, resolve_device
from brainseg_monai.errors import InputError
from brainseg_monai.evaluation import json_ready
from brainseg_monai.inference.postprocess import PostProcessing
from brainseg_monai.inference.predictor import Predictor, load_for_case
from brainseg_monai.io import read_sitk
from brainseg_monai.metrics import (
    DEFAULT_THRESHOLDS,
    RATIO_METRICS,
    best_on_curve,
    describe,
    pooled_metrics,
    threshold_grid,
)
from brainseg_monai.model import find_spec, load_model, store_tuning

__all__ = [
    "POSTPROCESSING_CANDIDATES",
    "aggregate_folds",
    "check_fold_model",
    "plot_threshold_curve",
    "tune_model_threshold",
    "tune_threshold_out_of_fold",
]

logger = logging.getLogger(__name__)

POSTPROCESSING_CANDIDATES: tuple[dict[str, bool], ...] = (
    {"keep_largest": False, "stack_slices": False},
    {"keep_largest": True, "stack_slices": True},
)
"""Post-processing compared, each with its own best threshold, as nnU-Net decides on its largest-component step from
the cross-validation predictions: the threshold alone, or only the largest component of each case (a case's slices
stacked into one volume; removing far-off false positives may let a lower threshold recover more tumour). The first
wins ties, so the extra step is kept only when it raises the mean patient Dice."""
_FOLD_METRICS = "metrics.json"
_SHARED_SETTINGS = ("kind", "distance_unit", "spacing")  # what the folds' distances (and images) must agree on
#: the entries of a tuning result that model.json's tuning block records
_TUNING_RECORD = ("threshold", "threshold_curve", "dice", "postprocessing", "postprocessing_candidates",
                  "previous_threshold", "previous_postprocessing", "previous_dice", "patients", "items", "folds", "tta",
                  "metric")


def tune_model_threshold(
    checkpoint: str | os.PathLike,
    items: Sequence[Mapping[str, Any]],
    *,
    tta: str = "none",
    device: str = "auto",
    batch_size: int = 16,
    thresholds: Sequence[float] | None = None,
    write: bool = True,
) -> dict[str, Any]:
    """Pick the probability threshold and `POSTPROCESSING_CANDIDATES` entry that maximise the mean per-patient Dice
    on ``items``, and store them with the model.

    Each item is predicted as ``brainseg infer`` predicts it (2D images one by one, volumes slice by slice with a 2D
    model or by sliding window with a 3D one), then ``thresholds`` are swept over the probabilities grouped by
    patient, post-processed with each candidate as infer would (the model's other steps, such as a size filter or an
    opening, kept as they are), and the best pair is kept.

    Args:
        checkpoint: the model (``model.pt``) with its ``model.json`` (or the run's ``config_resolved.json``).
        items: validation items ``{"image", "label", "patient"}`` (patients never seen in training), e.g.
            ``datalist.training_split(dl, fold)[1]``.
        tta: ``none``, ``flip`` or ``dihedral``, as at inference (tune with the TTA you will predict with).
        device: ``auto``, ``cpu`` or ``cuda[:n]``.
        batch_size: images or slices per forward pass.
        thresholds: candidate thresholds in (0, 1); default 0.05 to 0.95 by 0.05.
        write: store the result in ``model.json``: ``postprocessing`` gets the threshold and the chosen candidate's
            ``keep_largest`` and ``stack_slices`` (replacing what was there; the previous settings are kept in
            ``tuning.previous_postprocessing``); other keys kept.

    Returns:
        ``{"threshold", "postprocessing" (the chosen candidate's settings), "dice" (mean patient Dice with both),
        "threshold_curve" ([[t, mean patient Dice], ...] with that post-processing), "postprocessing_candidates"
        ([{"settings", "threshold", "dice", "threshold_curve"}, ...]), "previous_threshold",
        "previous_postprocessing", "previous_dice" (with the previous settings), "patients", "items", "folds", "tta",
        "metric", "sidecar"}`` (``sidecar`` None unless written).

    Raises:
        ValueError: for empty ``items``, an item without image, label or patient, or bad thresholds.
        InputError: an unreadable checkpoint, image or label; a label whose size differs from its image.
    """
    return tune_threshold_out_of_fold(
        [(checkpoint, items)], target=checkpoint if write else None, tta=tta, device=device, batch_size=batch_size,
        thresholds=thresholds,
    )


def tune_threshold_out_of_fold(
    folds: Sequence[tuple[str | os.PathLike, Sequence[Mapping[str, Any]]]],
    *,
    target: str | os.PathLike | None = None,
    tta: str = "none",
    device: str = "auto",
    batch_size: int = 16,
    thresholds: Sequence[float] | None = None,
) -> dict[str, Any]:
    """One threshold and post-processing for K folds: each fold's model predicts its own held-out patients, and the
    threshold and `POSTPROCESSING_CANDIDATES` entry that maximise the mean per-patient Dice over all of them are
    chosen; optionally stored in ``target``'s model.json.

    A threshold tuned on one fold's dozen patients follows that fold's noise; the out-of-fold probabilities of every
    patient give the curve for the recipe, which is what a final model trained on all patients should use.

    Args:
        folds: ``(checkpoint, items)`` per fold; ``items`` are the patients that checkpoint never saw. A patient may
            appear in one fold only.
        target: the checkpoint whose ``model.json`` receives the threshold and the curve; None stores nothing.
        tta, device, batch_size, thresholds: as for :func:`tune_model_threshold`.

    Returns:
        As :func:`tune_model_threshold`; ``previous_threshold`` is ``target``'s (else the first fold model's).

    Raises:
        ValueError: no folds, empty or malformed items, a patient in two folds, bad thresholds.
        InputError: an unreadable checkpoint, image or label; a label whose size differs from its image.
    """
    if not folds:
        raise ValueError("folds must hold at least one (checkpoint, items) pair")
    owner: dict[str, str] = {}
    for fold, (checkpoint, items) in enumerate(folds):
        if isinstance(items, (str, os.PathLike)) or not items:
            raise ValueError(f"items must be a non-empty sequence of {{'image', 'label', 'patient'}} dicts, got "
                             f"{items!r}" + (f" (fold {fold})" if len(folds) > 1 else ""))
        for index, item in enumerate(items):
            missing = [key for key in ("image", "label", "patient") if not isinstance(item, Mapping) or not item.get(key)]
            if missing:
                raise ValueError(f"items[{index}] lacks {', '.join(missing)}: {item!r}")
            patient = str(item["patient"])
            if owner.setdefault(patient, str(checkpoint)) != str(checkpoint):
                raise ValueError(f"patient {patient!r} is among the held-out patients of both {owner[patient]} and "
                                 f"{checkpoint}: out-of-fold tuning needs each patient predicted by one model that "
                                 f"never saw it")
    grid = threshold_grid(DEFAULT_THRESHOLDS if thresholds is None else thresholds)
    # every model and its settings are checked before the predictions, which take minutes
    specs = {}
    for checkpoint in [ckpt for ckpt, _ in folds] + ([target] if target is not None else []):
        if not Path(checkpoint).is_file():
            raise InputError(checkpoint, "checkpoint not found")
        specs[str(checkpoint)] = find_spec(checkpoint)
    target_spec = specs[str(target if target is not None else folds[0][0])]

    probs: dict[str, list[np.ndarray]] = {}
    truths: dict[str, list[np.ndarray]] = {}
    paths: dict[str, list[str]] = {}
    for checkpoint, items in folds:
        network, spec = load_model(checkpoint, device)
        predictor = Predictor(network, spec, resolve_device(device), tta=tta, batch_size=batch_size)
        by_patient: dict[str, list[Mapping[str, Any]]] = {}
        for item in items:
            by_patient.setdefault(str(item["patient"]), []).append(item)
        for patient, patient_items in by_patient.items():
            probs[patient], truths[patient], paths[patient] = _predict_patient(predictor, spec, patient_items)
            logger.info("patient %s: %d maps predicted by %s", patient, len(probs[patient]), checkpoint)
    before = target_spec.postprocessor  # its other steps (size filter, opening) stay
    candidates = []
    for settings in POSTPROCESSING_CANDIDATES:
        curve = [(float(t), _mean_patient_dice(probs, truths, paths, replace(before, threshold=float(t), **settings)))
                 for t in grid]
        best = best_on_curve(curve)
        candidates.append({"settings": dict(settings), "threshold": best, "dice": dict(curve)[best],
                           "threshold_curve": [[t, d] for t, d in curve]})
    chosen = max(candidates, key=lambda c: c["dice"])  # max returns the first of equals: the threshold alone

    previous = before.threshold
    result: dict[str, Any] = {
        "threshold": chosen["threshold"],
        "postprocessing": chosen["settings"],
        "dice": chosen["dice"],
        "threshold_curve": chosen["threshold_curve"],
        "postprocessing_candidates": candidates,
        "previous_threshold": previous,
        "previous_postprocessing": before.to_dict(),
        "previous_dice": _mean_patient_dice(probs, truths, paths, before),
        "patients": len(probs),
        "items": sum(len(items) for _, items in folds),
        "folds": len(folds),
        "tta": tta,
        "metric": "mean per-patient Dice (stacked slices), prediction = probability >= threshold, then the "
                  "post-processing"
        + (", each patient predicted by the fold model that never saw it" if len(folds) > 1 else ""),
        "sidecar": None,
    }
    if target is not None:
        result["sidecar"] = str(store_tuning(target, {"threshold": result["threshold"], **result["postprocessing"]},
                                             {key: result[key] for key in _TUNING_RECORD}))
    logger.info("threshold %.2f with post-processing %s: mean patient Dice %.4f (threshold was %.2f)",
                chosen["threshold"], chosen["settings"], chosen["dice"], previous)
    return result


def check_fold_model(checkpoint: str | os.PathLike, fold: int | None) -> None:
    """Refuse a model whose training run did not hold out what it is to be tuned on, as the run's
    ``config_resolved.json`` records: fold ``fold``, or with ``fold=None`` the datalist's validation split. A
    misordered ``--fold`` list, or a model trained on every patient (``train_all``), would give in-sample,
    optimistic scores and threshold. A checkpoint outside a training run folder has no record: it is taken as
    given, with a warning.

    Raises:
        InputError: the record names another fold (or none), records ``train_all``, or cannot be read.
    """
    record = Path(checkpoint).parent.parent / "config_resolved.json"
    if not record.is_file():
        logger.warning("%s has no training record (%s): cannot check that it never saw the patients it is tuned on",
                       checkpoint, record)
        return
    try:
        config = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(record, f"not a readable training record ({e})") from None
    if not isinstance(config, dict):
        raise InputError(record, "not a training record: expected a JSON object")
    if config.get("fold") != fold:
        raise InputError(checkpoint, f"its run held out {_held_out(config.get('fold'))} ({record}), not "
                                     f"{_held_out(fold)}: give each checkpoint the fold it never saw (--fold), in the "
                                     f"same order")
    if as_bool(config.get("train_all", False), f"train_all in {record}"):
        raise InputError(checkpoint, f"its run trained on the validation patients too (train_all, {record}): it saw "
                                     f"every patient and has no unseen ones to tune on; tune the fold models out "
                                     f"of fold and store the result in it with --store-in")


def plot_threshold_curve(
    curve: Sequence[Sequence[float]], best: float, path: str | os.PathLike, *, previous: float | None = None
) -> Path:
    """Write a PNG of mean per-patient Dice against threshold, the chosen one (and the previous one) marked."""
    points = np.asarray(curve, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or points.shape[0] == 0:
        raise ValueError(f"curve must be a non-empty list of (threshold, dice) pairs, got shape {points.shape}")
    figure = Figure(figsize=(5.5, 3.6), layout="constrained")
    axes = figure.add_subplot()
    axes.plot(points[:, 0], points[:, 1], marker="o", markersize=3, color="tab:blue")
    at_best = points[np.argmin(np.abs(points[:, 0] - best)), 1]
    axes.axvline(best, color="tab:red", linestyle="--", label=f"chosen {best:.2f} (Dice {at_best:.3f})")
    if previous is not None and not np.isclose(previous, best):
        axes.axvline(previous, color="grey", linestyle=":", label=f"previous {previous:.2f}")
    axes.set_xlabel("probability threshold")
    axes.set_ylabel("mean per-patient Dice")
    axes.set_xlim(0, 1)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower center", fontsize=8)
    return save_figure(figure, path)


def save_figure(figure: Figure, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure as PNG atomically (no pyplot: no global state, no display needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        figure.savefig(tmp, dpi=110, format="png")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def aggregate_folds(fold_dirs_or_metrics: Sequence[str | os.PathLike]) -> dict[str, Any]:
    """Mean and spread over K folds of their evaluation metrics, and the per-patient Dice pooled over all folds.

    Each fold's number is its report's ``settings.fold`` (``brainseg evaluate --fold K``); a report without one
    takes its place in the argument list. Distances are only averaged over reports measured alike.

    Args:
        fold_dirs_or_metrics: each fold's ``metrics.json`` (from ``brainseg evaluate``) or the folder holding it.

    Returns:
        ``{"folds": [{"fold", "path", "patients", "patient_dice_mean", "patient_dice_median", "global_dice"}]`` in
        fold order, ``"metrics": {summary key: `metrics.describe` over folds}`` for every number of the summaries,
        ``"pooled": {"patients", "patient_dice": describe over every fold's patients, "global_<ratio>" from the
        confusion matrices of all patients summed}``, ``"per_patient": [{"fold", "patient", "dice"}]``,
        and ``"settings": {"kind", "distance_unit", "spacing"}``, which every fold shares.

    Raises:
        ValueError: when fewer than two folds are given.
        InputError: a missing or unreadable metrics.json, a patient scored in two folds (folds must be disjoint),
            two reports of one fold number, or reports whose kind, distance unit or spacing differ.
    """
    if isinstance(fold_dirs_or_metrics, (str, os.PathLike)) or len(fold_dirs_or_metrics) < 2:
        raise ValueError(
            f"fold_dirs_or_metrics must list at least two folds' metrics.json, got {fold_dirs_or_metrics!r}"
        )
    folds = []
    seen: dict[str, Path] = {}
    numbered: dict[int, Path] = {}
    for index, raw in enumerate(fold_dirs_or_metrics):
        path = Path(raw)
        path = path / _FOLD_METRICS if path.is_dir() else path
        metrics = _read_metrics(path)
        for record in metrics["per_patient"]:
            patient = str(record["patient"])
            if patient in seen:
                raise InputError(path, f"patient {patient!r} is also scored in {seen[patient]}; folds must be disjoint")
            seen[patient] = path
        fold = metrics["settings"].get("fold")
        fold = index if fold is None else fold
        if isinstance(fold, bool) or not isinstance(fold, int):
            raise InputError(path, f"settings.fold must be an integer or null but is {fold!r}")
        if fold in numbered:
            raise InputError(path, f"fold {fold} is also the fold of {numbered[fold]} (settings.fold, else the place "
                                   f"in the list): give each fold's report once")
        numbered[fold] = path
        folds.append((fold, path, metrics))
    shared = {key: folds[0][2]["settings"].get(key) for key in _SHARED_SETTINGS}
    for _, path, metrics in folds[1:]:
        differ = [key for key in _SHARED_SETTINGS if metrics["settings"].get(key) != shared[key]]
        if differ:
            shown = "; ".join(f"{key} {metrics['settings'].get(key)!r} there, {shared[key]!r} in {folds[0][1]}"
                              for key in differ)
            raise InputError(path, f"scored unlike the other folds ({shown}): evaluate every fold alike")
    folds.sort(key=lambda f: f[0])

    keys = [k for k, v in folds[0][2]["summary"].items() if _is_number(v)]
    per_metric = {key: describe(_number(m["summary"].get(key)) for _, _, m in folds) for key in keys}
    patients = [record for _, _, m in folds for record in m["per_patient"]]
    pooled = pooled_metrics(patients)
    return json_ready({
        "folds": [
            {"fold": fold, "path": str(path), "patients": m["summary"].get("patients"),
             "patient_dice_mean": m["summary"].get("patient_dice_mean"),
             "patient_dice_median": m["summary"].get("patient_dice_median"),
             "global_dice": m["summary"].get("global_dice")}
            for fold, path, m in folds
        ],
        "metrics": per_metric,
        "pooled": {
            "patients": len(patients),
            "patient_dice": describe(_number(r.get("dice")) for r in patients),
            **{f"global_{name}": pooled[name] for name in RATIO_METRICS if name != "f1"},
        },
        "per_patient": [{"fold": fold, "patient": r["patient"], "dice": r.get("dice")}
                        for fold, _, m in folds for r in m["per_patient"]],
        "settings": shared,
    })  # fmt: skip


# ---------------------------------------------------------------- helpers


def _predict_patient(
    predictor: Predictor, spec: Any, items: Sequence[Mapping[str, Any]]
) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """Probability maps, true masks (reader axis order) and image paths (a volume's first) of one patient's items;
    its 2D images in one batch."""
    slices = [it for it in items if _is_2d(it["image"])]
    scored: list[tuple[Mapping[str, Any], np.ndarray, str]] = []  # (item, probabilities, its (first) image path)
    if slices:
        images = [str(it["image"]) for it in slices]
        probs = predictor.predict_slices(load_for_case("slices", images, spec)["slices"], images)
        scored.extend(zip(slices, probs, images))
    for item in (it for it in items if not _is_2d(it["image"])):
        images = [str(p) for p in item["image"]] if isinstance(item["image"], (list, tuple)) else [str(item["image"])]
        loaded = load_for_case("volume", images, spec)
        if "data" in loaded:
            scored.append((item, predictor.predict_volume_3d(loaded["data"], loaded["preprocessing"]), images[0]))
        else:
            prob = predictor.predict_volume_by_slices(loaded["volume"], images[0], resample=not loaded["planar"])
            scored.append((item, prob, images[0]))
    truths = []
    for item, prob, _ in scored:
        truth = _read_truth(Path(item["label"]))
        if truth.shape != prob.shape:
            raise InputError(item["label"], f"label size {truth.shape} differs from the size {prob.shape} of its "
                                            f"image {item['image']}")
        truths.append(truth)
    return [prob for _, prob, _ in scored], truths, [path for _, _, path in scored]


def _mean_patient_dice(probs: Mapping[str, Sequence[np.ndarray]], truths: Mapping[str, Sequence[np.ndarray]],
                       paths: Mapping[str, Sequence[str]], post: PostProcessing) -> float:
    """Mean over patients of the Dice of the patient's post-processed maps taken together (1 when both are empty),
    as ``brainseg evaluate`` scores them; 2D maps go through `PostProcessing.apply_to_slices` with their image paths,
    so slices are stacked exactly as ``brainseg infer`` stacks them."""
    scores = []
    for patient, maps in probs.items():
        flat = [i for i, m in enumerate(maps) if np.ndim(m) == 2]
        masks = dict(zip(flat, post.apply_to_slices([maps[i] for i in flat], [paths[patient][i] for i in flat])))
        masks.update({i: post(m) for i, m in enumerate(maps) if i not in masks})
        pairs = [(masks[i].astype(bool), truth) for i, truth in enumerate(truths[patient])]
        overlap = sum(int(np.count_nonzero(m & t)) for m, t in pairs)
        total = sum(int(np.count_nonzero(m)) + int(np.count_nonzero(t)) for m, t in pairs)
        scores.append(1.0 if total == 0 else 2.0 * overlap / total)
    return float(np.mean(scores))


def _is_2d(image: Any) -> bool:
    return isinstance(image, (str, os.PathLike)) and str(image).lower().endswith(IMAGE_SUFFIXES_2D)


def _read_truth(path: Path) -> np.ndarray:
    image = read_sitk(path)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(path, f"label has {image.GetNumberOfComponentsPerPixel()} components; expected one")
    return sitk.GetArrayFromImage(image).T > 0


def _read_metrics(path: Path) -> dict[str, Any]:
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "metrics.json not found (run brainseg evaluate on this fold first)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(path, f"not a readable metrics.json ({e})") from None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("summary"), dict) \
            or not isinstance(metrics.get("per_patient"), list) or not isinstance(metrics.get("settings", {}), dict):
        raise InputError(path, "not a metrics.json of brainseg evaluate: expected 'summary', 'per_patient' and "
                               "'settings'")
    metrics.setdefault("settings", {})
    return metrics


def _held_out(fold: int | None) -> str:
    return "the datalist's validation split (no fold)" if fold is None else f"fold {fold}"


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)
