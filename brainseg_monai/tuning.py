"""Choices made on validation data after training: the probability threshold and whether to keep only the largest
component.

The tuned settings are stored in the checkpoint's ``model.json``: ``postprocessing`` (what ``brainseg infer`` applies
by default) and a ``tuning`` block with the curve, the post-processing candidates and their scores, the data they came
from and the previous threshold. The tuning block lives outside ``postprocessing`` because that block holds exactly the
`PostProcessing` settings.

K-fold, the documented way: ``brainseg datalist --folds K`` writes ``dl.json``; train fold k with ``--fold k
--datalist dl.json`` into its own folder; predict fold k's validation patients with that fold's model; evaluate them
with ``brainseg evaluate PRED_k --truth dl.json --fold k``; then `evaluation.aggregate_folds` over the K
``metrics.json``. To tune one threshold for the recipe, `tune_held_out_folds` pairs each fold's model with the fold it
never saw (``brainseg tune-threshold``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from brainseg_monai.datalist import training_split
from brainseg_monai.devices import as_bool, resolve_device
from brainseg_monai.errors import InputError
from brainseg_monai.inference.postprocess import PostProcessing
from brainseg_monai.inference.predictor import Predictor, load_for_case
from brainseg_monai.io import IMAGE_2D_SUFFIXES, read_mask
from brainseg_monai.metrics import DEFAULT_THRESHOLDS, best_on_curve, threshold_grid
from brainseg_monai.model import find_spec, load_model, store_tuning
from brainseg_monai.report import plot_threshold_curve

__all__ = [
    "POSTPROCESSING_CANDIDATES",
    "check_fold_model",
    "tune_held_out_folds",
    "tune_model_threshold",
    "tune_threshold_out_of_fold",
]

logger = logging.getLogger(__name__)

POSTPROCESSING_CANDIDATES: tuple[dict[str, Any], ...] = (
    {"keep_largest": False, "keep_fraction": None, "stack_slices": False},
    {"keep_largest": True, "keep_fraction": None, "stack_slices": True},
    {"keep_largest": False, "keep_fraction": 0.1, "stack_slices": True},
    {"keep_largest": False, "keep_fraction": 0.3, "stack_slices": True},
)
"""Post-processing compared, each with its own best threshold, as nnU-Net decides on its largest-component step from
the cross-validation predictions: the threshold alone; only the largest component of each case (a case's slices
stacked into one volume; removing far-off false positives may let a lower threshold recover more tumour); or the
components holding at least 10% or 30% of the heaviest one's probability mass (a confident small tumour is not traded
for a larger, fainter false positive, the way the 0.8.0 model lost a patient). The first wins ties, so an extra step is
kept only when it raises the mean patient Dice."""
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
            ``keep_largest``, ``keep_fraction`` and ``stack_slices`` (replacing what was there; the previous settings
            are kept in ``tuning.previous_postprocessing``); other keys kept.

    Returns:
        ``{"threshold", "postprocessing" (the chosen candidate's settings), "dice" (mean patient Dice with both),
        "threshold_curve" ([[t, mean patient Dice], ...] with that post-processing), "postprocessing_candidates"
        ([{"settings", "threshold", "dice", "worst", "below_0.5", "below_0.7" (patients under those Dice at that
        threshold), "threshold_curve"}, ...]), "previous_threshold",
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
        predictor = Predictor(network, spec, resolve_device(device), tta=tta, batch_size=batch_size, spread=False)
        by_patient: dict[str, list[Mapping[str, Any]]] = {}
        for item in items:
            by_patient.setdefault(str(item["patient"]), []).append(item)
        for patient, patient_items in by_patient.items():
            probs[patient], truths[patient], paths[patient] = _predict_patient(predictor, spec, patient_items)
            logger.info("patient %s: %d maps predicted by %s", patient, len(probs[patient]), checkpoint)
    before = target_spec.postprocessor  # its other steps (size filter, opening) stay
    candidates = []
    for settings in POSTPROCESSING_CANDIDATES:
        per_patient = {float(t): _patient_dice(probs, truths, paths, replace(before, threshold=float(t), **settings))
                       for t in grid}
        curve = [(t, float(np.mean(list(dice.values())))) for t, dice in per_patient.items()]
        best = best_on_curve(curve)
        # the patients lost or nearly lost with this candidate at its threshold: a mean can hide them
        at_best = np.array(list(per_patient[best].values()))
        candidates.append({"settings": dict(settings), "threshold": best, "dice": dict(curve)[best],
                           "worst": float(at_best.min()), "below_0.5": int((at_best < 0.5).sum()),
                           "below_0.7": int((at_best < 0.7).sum()), "threshold_curve": [[t, d] for t, d in curve]})
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


def tune_held_out_folds(
    checkpoints: Sequence[str | os.PathLike],
    datalist: str | os.PathLike | Mapping[str, Any],
    folds: Sequence[int] | None = None,
    *,
    store_in: str | os.PathLike | None = None,
    dry_run: bool = False,
    tta: str = "none",
    device: str = "auto",
    batch_size: int = 16,
    thresholds: Sequence[float] | None = None,
) -> dict[str, Any]:
    """``brainseg tune-threshold``: tune on the patients each checkpoint never saw, store the result in one model and
    plot its curve.

    Each checkpoint is paired with the fold it held out (``folds``, in the same order), or without ``folds`` one
    checkpoint with the datalist's validation split; each pairing is checked against the run's record
    (:func:`check_fold_model`) before the predictions, which take minutes. The result goes into ``store_in``, else
    into the one checkpoint; with several fold models, which model receives it must be said (``store_in``).

    Args:
        checkpoints: the model, or one model per fold.
        datalist: the datalist (file or dict) whose validation items, or fold, each model is tuned on.
        folds: the held-out fold of each checkpoint; None: the datalist's validation split.
        store_in: the model whose ``model.json`` receives the result (default: the one checkpoint).
        dry_run: store nothing.
        tta, device, batch_size, thresholds: as for :func:`tune_model_threshold`.

    Returns:
        As :func:`tune_threshold_out_of_fold`, with ``curve_plot``: the PNG of the chosen curve, beside the model
        that received the result (a dry run: beside the first checkpoint).

    Raises:
        ValueError: the fold count does not match the checkpoints, a fold repeats, ``dry_run`` with ``store_in``,
            several fold models without ``store_in``; as for :func:`tune_threshold_out_of_fold`.
        InputError: a checkpoint's run did not hold out its fold (:func:`check_fold_model`); as for
            :func:`tune_threshold_out_of_fold`.
    """
    given = list(folds or [])
    held_out = given or [None]
    if len(checkpoints) > 1 and len(held_out) != len(checkpoints):
        raise ValueError(f"{len(checkpoints)} checkpoints need as many --fold values (the fold each one never saw, "
                         f"in the same order); got {len(given)}")
    if len(checkpoints) == 1 and len(held_out) > 1:
        raise ValueError("several --fold values need one checkpoint per fold")
    if len(set(held_out)) < len(held_out):
        raise ValueError(f"--fold {' '.join(map(str, held_out))} repeats a fold; give each checkpoint the one fold it "
                         f"never saw")
    if dry_run and store_in:
        raise ValueError("--dry-run stores nothing; drop --store-in or --dry-run")
    target = None if dry_run else (store_in or (checkpoints[0] if len(checkpoints) == 1 else None))
    if not dry_run and target is None:
        raise ValueError("with several fold checkpoints, say which model receives the threshold with --store-in MODEL "
                         "(e.g. the model trained on all patients), or use --dry-run")
    for checkpoint, fold in zip(checkpoints, held_out):  # each model must never have seen the patients it is tuned on
        check_fold_model(checkpoint, fold)
    result = tune_threshold_out_of_fold(
        [(checkpoint, training_split(datalist, fold)[1]) for checkpoint, fold in zip(checkpoints, held_out)],
        target=target, tta=tta, device=device, batch_size=batch_size, thresholds=thresholds,
    )
    result["curve_plot"] = plot_threshold_curve(result["threshold_curve"], result["threshold"],
                                                Path(target or checkpoints[0]).parent / "threshold_curve.png",
                                                previous=result["previous_threshold"])
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
        probs = predictor.predict_case(load_for_case("slices", images, spec)).prob
        scored.extend(zip(slices, probs, images))
    for item in (it for it in items if not _is_2d(it["image"])):
        images = [str(p) for p in item["image"]] if isinstance(item["image"], (list, tuple)) else [str(item["image"])]
        scored.append((item, predictor.predict_case(load_for_case("volume", images, spec)).prob, images[0]))
    truths = []
    for item, prob, _ in scored:
        truth, _ = read_mask(item["label"], "label")
        if truth.shape != prob.shape:
            raise InputError(item["label"], f"label size {truth.shape} differs from the size {prob.shape} of its "
                                            f"image {item['image']}")
        truths.append(truth)
    return [prob for _, prob, _ in scored], truths, [path for _, _, path in scored]


def _mean_patient_dice(probs: Mapping[str, Sequence[np.ndarray]], truths: Mapping[str, Sequence[np.ndarray]],
                       paths: Mapping[str, Sequence[str]], post: PostProcessing) -> float:
    """Mean over patients of :func:`_patient_dice`."""
    return float(np.mean(list(_patient_dice(probs, truths, paths, post).values())))


def _patient_dice(probs: Mapping[str, Sequence[np.ndarray]], truths: Mapping[str, Sequence[np.ndarray]],
                  paths: Mapping[str, Sequence[str]], post: PostProcessing) -> dict[str, float]:
    """The Dice of each patient's post-processed maps taken together (1 when both are empty), as ``brainseg
    evaluate`` scores them; 2D maps go through `PostProcessing.apply_to_slices` with their image paths, so slices are
    stacked exactly as ``brainseg infer`` stacks them."""
    scores = {}
    for patient, maps in probs.items():
        flat = [i for i, m in enumerate(maps) if np.ndim(m) == 2]
        masks = dict(zip(flat, post.apply_to_slices([maps[i] for i in flat], [paths[patient][i] for i in flat])))
        masks.update({i: post(m) for i, m in enumerate(maps) if i not in masks})
        pairs = [(masks[i].astype(bool), truth) for i, truth in enumerate(truths[patient])]
        overlap = sum(int(np.count_nonzero(m & t)) for m, t in pairs)
        total = sum(int(np.count_nonzero(m)) + int(np.count_nonzero(t)) for m, t in pairs)
        scores[patient] = 1.0 if total == 0 else 2.0 * overlap / total
    return scores


def _is_2d(image: Any) -> bool:
    return isinstance(image, (str, os.PathLike)) and str(image).lower().endswith(IMAGE_2D_SUFFIXES)


def _held_out(fold: int | None) -> str:
    return "the datalist's validation split (no fold)" if fold is None else f"fold {fold}"
