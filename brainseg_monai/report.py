"""The evaluation report: ``metrics.json``, ``report.md`` and ``report.html`` with PNG plots beside them.

The HTML needs nothing but the PNGs in its folder (styles inline, no scripts), so the folder can be zipped, mailed
or served as it is. Every section is always there: when its input is absent it says so in one line.
"""

from __future__ import annotations

import html
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

from brainseg_monai.errors import InputError
from brainseg_monai.evaluation import METRICS_FILE, write_metrics_json
from brainseg_monai.inference.writers import write_overlay_png
from brainseg_monai.io import json_ready, read_mask, read_sitk, write_atomic, write_text_atomic
from brainseg_monai.model import MODEL_SIDECAR, load_tuning

__all__ = [
    "TRAINING_TAGS", "plot_threshold_curve", "read_training_scalars", "save_figure", "write_folds_report",
    "write_report",
]

logger = logging.getLogger(__name__)

TRAINING_TAGS = ("train_loss", "val_dice", "val_mean_dice", "val_mean_iou", "learning_rate")
"""The TensorBoard scalars the training bundle writes, plotted in this order: ``val_dice`` is the key metric (the
Dice of all validation pixels pooled), the one that picks ``model.pt`` and drives the schedule and early stopping."""
_STEP_UNIT = {"train_loss": "iteration"}  # the bundle logs the loss per iteration, the others per epoch

_MISSING_ALLOWED = ("allowed with --allow-missing: each is scored as an empty prediction, so a missed item with tumour "
                    "scores 0 but a tumour-free one scores as perfect, and these scores can be higher than with the "
                    "predictions made")
_SUMMARY_ROWS = ("dice", "iou", "precision", "recall", "specificity", "accuracy", "hd95", "asd")
_PATIENT_COLUMNS = ("patient", "slices", "slices_with_tumour", "truth_size", "pred_size", "dice", "iou", "precision",
                    "recall", "hd95", "asd", "missing_predictions")
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figcaption { font-size: 0.85em; color: #555; max-width: 420px; }
img { max-width: 100%; border: 1px solid #ddd; }
img.overlay { width: 320px; image-rendering: pixelated; }
.note { color: #777; font-style: italic; }
"""


@dataclass
class _Section:
    """A titled list of blocks: ("text", str), ("note", str), ("table", headers, rows), ("image", file, caption)."""

    title: str
    blocks: list[tuple[Any, ...]] = field(default_factory=list)

    def text(self, line: str) -> _Section:
        self.blocks.append(("text", line))
        return self

    def note(self, line: str) -> _Section:
        self.blocks.append(("note", line))
        return self

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> _Section:
        self.blocks.append(("table", list(headers), [list(r) for r in rows]))
        return self

    def image(self, path: Path, caption: str, overlay: bool = False) -> _Section:
        self.blocks.append(("image", path.name, caption, overlay))
        return self


def write_report(
    result: Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    train_dir: str | os.PathLike | None = None,
    model: str | os.PathLike | None = None,
    n_worst: int = 4,
) -> dict[str, Path]:
    """Write the report of an evaluation (`evaluation.evaluate_predictions`) into ``out_dir``.

    The worst-case overlays read the image, truth and prediction files named in ``result["per_image"]``; the slice
    shown is the patient's one with the most tumour in the truth (FLAIR of an LGG slice), truth outlined in green,
    prediction filled in red.

    Args:
        result: what `evaluate_predictions` returns (or its ``metrics.json`` read back).
        out_dir: the report folder (created).
        train_dir: a training output folder: its TensorBoard event files give the training curves (tags
            `TRAINING_TAGS`), its ``models/model.json`` the threshold curve when ``model`` is not given.
        model: a checkpoint, its ``model.json`` or their folder: the threshold curve of ``brainseg tune-threshold``.
        n_worst: how many of the lowest-Dice patients to show as overlays (0 for none).

    Returns:
        name -> path of every file written: ``metrics``, ``markdown``, ``html`` and each plot.

    Raises:
        ValueError: when ``result`` lacks its sections or ``n_worst`` is negative.
    """
    missing = [key for key in ("summary", "per_patient", "per_image", "settings") if key not in result]
    if missing:
        raise ValueError(f"result must be an evaluation result (evaluate_predictions); it lacks {missing}")
    if isinstance(n_worst, bool) or not isinstance(n_worst, int) or n_worst < 0:
        raise ValueError(f"n_worst must be an integer >= 0 but is {n_worst!r}")
    result = json_ready(result)  # undefined values are None everywhere below, as in metrics.json
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {"metrics": write_metrics_json(result, out / METRICS_FILE)}
    summary, patients, images = result["summary"], result["per_patient"], result["per_image"]
    unit = result["settings"].get("distance_unit", "mm")

    sections = [
        _overview(result),
        _summary_table(summary, unit, result["settings"].get("distances")),
        _dice_distribution(patients, out, files),
        _dice_versus_size(patients, images, out, files),
        _confusion(summary, out, files),
        _patient_table(patients, unit),
        _tumour_free(summary),
        _detection(summary),
        _size_bins(summary),
        _missing(result),
        _worst_cases(patients, images, n_worst, out, files),
        _training_curves(train_dir, out, files),
        _threshold_curve(model, train_dir, out, files),
        _settings(result["settings"]),
    ]
    title = f"Evaluation of {Path(str(result['settings'].get('pred_dir', 'predictions'))).name}"
    files["markdown"] = write_text_atomic(out / "report.md", _markdown(title, sections))
    files["html"] = write_text_atomic(out / "report.html", _html(title, sections))
    logger.info("report written to %s", files["html"])
    return files


def read_training_scalars(train_dir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under ``train_dir`` (searched recursively): tag -> (step, value)
    sorted by step. Each file is read on its own: the training bundle writes several files into one folder."""
    root = Path(train_dir)
    if not root.is_dir():
        raise InputError(root, "training folder does not exist")
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(root.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(path), size_guidance={SCALARS: 0})  # 0: keep every point
        accumulator.Reload()
        for tag in accumulator.Tags()[SCALARS]:
            scalars.setdefault(tag, []).extend((int(e.step), float(e.value)) for e in accumulator.Scalars(tag))
    return {tag: sorted(points) for tag, points in scalars.items()}


def write_folds_report(aggregate: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``folds.json``, ``folds.md``, ``folds.html`` and ``folds_dice.png`` for `evaluation.aggregate_folds`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {"metrics": write_metrics_json(aggregate, out / "folds.json")}
    pooled = aggregate["pooled"]
    overview = _Section("K-fold cross-validation").text(
        f"{len(aggregate['folds'])} folds, {pooled['patients']} patients in all. Per-patient Dice pooled over every "
        f"fold's validation patients: mean {_fmt(pooled['patient_dice']['mean'])}, median "
        f"{_fmt(pooled['patient_dice']['median'])}, std {_fmt(pooled['patient_dice']['std'])}; global Dice "
        f"{_fmt(pooled['global_dice'])}. Distances (HD95, ASD) in {aggregate['settings']['distance_unit']} in every "
        f"fold; each fold is numbered by its report's settings.fold.")
    folds = _Section("Folds").table(
        ["fold", "patients", "patient Dice mean", "patient Dice median", "global Dice", "metrics.json"],
        [[f["fold"], f["patients"], f["patient_dice_mean"], f["patient_dice_median"], f["global_dice"], f["path"]]
         for f in aggregate["folds"]])
    keys = [k for k in aggregate["metrics"] if re.fullmatch(r"(patient|image)_\w+_(mean|median)|global_\w+", k)]
    spread = _Section("Mean and spread over folds").table(
        ["metric", "mean over folds", "std", "min", "max", "folds"],
        [[k, m["mean"], m["std"], m["min"], m["max"], m["n"]] for k, m in ((k, aggregate["metrics"][k]) for k in keys)])
    plot = _Section("Per-patient Dice by fold")
    by_fold: dict[int, list[float]] = {}
    for record in aggregate["per_patient"]:
        if record["dice"] is not None:
            by_fold.setdefault(int(record["fold"]), []).append(float(record["dice"]))
    if by_fold:
        figure = Figure(figsize=(6, 3.6), layout="constrained")
        axes = figure.add_subplot()
        rng = np.random.default_rng(0)
        for fold, values in sorted(by_fold.items()):
            axes.scatter(fold + rng.uniform(-0.15, 0.15, len(values)), values, s=14, alpha=0.7)
            axes.hlines(np.mean(values), fold - 0.3, fold + 0.3, color="black")
        axes.set_xticks(sorted(by_fold))
        axes.set_xlabel("fold")
        axes.set_ylabel("per-patient Dice")
        axes.set_ylim(-0.02, 1.02)
        axes.grid(alpha=0.3)
        files["dice_by_fold"] = save_figure(figure, out / "folds_dice.png")
        plot.image(files["dice_by_fold"], "Per-patient Dice of each fold's validation patients (bar: fold mean).")
    else:
        plot.note("Not available: no patient has a defined Dice.")
    sections = [overview, folds, spread, plot]
    files["markdown"] = write_text_atomic(out / "folds.md", _markdown("K-fold evaluation", sections))
    files["html"] = write_text_atomic(out / "folds.html", _html("K-fold evaluation", sections))
    return files


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
    return write_atomic(path, lambda temporary: figure.savefig(temporary, dpi=110, format="png"), suffix=".png")


# ---------------------------------------------------------------- sections


def _overview(result: Mapping[str, Any]) -> _Section:
    s, settings = result["summary"], result["settings"]
    section = _Section("Overview")
    section.text(
        f"Per-patient Dice (all of a patient's pixels together, not the mean of its slice Dices): mean {_fmt(s.get('patient_dice_mean'))}, median "
        f"{_fmt(s.get('patient_dice_median'))} over {s.get('patients')} patients. Global Dice (all pixels pooled): "
        f"{_fmt(s.get('global_dice'))}. Mean slice Dice over the {s.get('tumour_images')} images with tumour: "
        f"{_fmt(s.get('image_dice_mean'))}.")
    if settings.get("patient_definition"):
        pooled = s.get("patients_pooled") or 0
        section.text(f"A patient here is {settings['patient_definition']}."
                     + (f" {pooled} of {s.get('patients')} patients are pooled, not stacked." if pooled else ""))
    missing = s.get("missing_predictions", 0)
    section.text(
        f"Predictions {settings.get('pred_dir')} scored against {settings.get('truth')} "
        f"({settings.get('source') or 'datalist'}, {settings.get('kind')}): {settings.get('items')} items, "
        f"{s.get('images')} images. Missing predictions: {missing}"
        + (f" ({_MISSING_ALLOWED})" if missing else "")
        + f". Prediction files matching no truth item: {s.get('unmatched_predictions', 0)}.")
    if s.get("left_out_patients"):
        section.text(f"Left out (--only-predicted): {s['left_out_patients']} patients of the truth without any "
                     f"prediction ({s.get('left_out_items')} items); metrics.json lists them under left_out.")
    return section


def _summary_table(summary: Mapping[str, Any], unit: str, distances: str | None) -> _Section:
    rows = []
    for metric in _SUMMARY_ROWS:
        patient = {s: summary.get(f"patient_{metric}_{s}") for s in ("mean", "median", "std", "n", "undefined")}
        rows.append([
            f"{metric} ({unit})" if metric in ("hd95", "asd") else metric,
            patient["mean"], patient["median"], patient["std"], f"{patient['n']} ({patient['undefined']})",
            summary.get(f"image_{metric}_mean"), summary.get(f"image_{metric}_median"), summary.get(f"global_{metric}"),
        ])  # fmt: skip
    return _Section("Summary").table(
        ["metric", "patients: mean", "median", "std", "n (undefined)", "tumour images: mean", "median", "pooled"], rows
    ).note("Undefined values (e.g. precision with nothing predicted, HD95 with an empty mask) are left out of means "
           "and counted in 'undefined'; both-empty counts as Dice 1. Pooled: all pixels of all patients together."
           + (f" Distances in {distances}." if distances else ""))


def _dice_distribution(patients: Sequence[Mapping[str, Any]], out: Path, files: dict[str, Path]) -> _Section:
    section = _Section("Per-patient Dice distribution")
    values = np.array([p["dice"] for p in patients if p.get("dice") is not None], dtype=np.float64)
    if values.size == 0:
        return section.note("Not available: no patient has a defined Dice.")
    figure = Figure(figsize=(7.5, 3.4), layout="constrained")
    hist, strip = figure.subplots(1, 2, width_ratios=[2, 1])
    hist.hist(values, bins=np.linspace(0, 1, 21), color="tab:blue", edgecolor="white")
    hist.axvline(values.mean(), color="black", linestyle="--", label=f"mean {values.mean():.3f}")
    hist.axvline(np.median(values), color="tab:orange", linestyle=":", label=f"median {np.median(values):.3f}")
    hist.set_xlabel("per-patient Dice")
    hist.set_ylabel("patients")
    hist.yaxis.set_major_locator(MaxNLocator(integer=True))
    hist.legend(fontsize=8)
    jitter = np.random.default_rng(0).uniform(-0.2, 0.2, values.size)
    strip.scatter(jitter, values, s=16, alpha=0.7, color="tab:blue")
    strip.boxplot(values, positions=[0], widths=0.6, showfliers=False)
    strip.set_xticks([])
    strip.set_ylim(-0.02, 1.02)
    strip.set_ylabel("per-patient Dice")
    files["dice_distribution"] = save_figure(figure, out / "dice_distribution.png")
    return section.image(files["dice_distribution"], f"Per-patient Dice of {values.size} patients: histogram, and "
                                                     "each patient as a point over a box plot.")


def _dice_versus_size(
    patients: Sequence[Mapping[str, Any]], images: Sequence[Mapping[str, Any]], out: Path, files: dict[str, Path]
) -> _Section:
    section = _Section("Dice versus tumour size")
    per_patient = [(p["truth_size"], p["dice"]) for p in patients if p["truth_size"] > 0 and p.get("dice") is not None]
    per_image = [(r["truth_size"], r["dice"]) for r in images if r["truth_size"] > 0 and r.get("dice") is not None]
    if not per_patient and not per_image:
        return section.note("Not available: no image has tumour in the truth.")
    figure = Figure(figsize=(6.5, 4), layout="constrained")
    axes = figure.add_subplot()
    if per_image:
        x, y = np.array(per_image).T
        axes.scatter(x, y, s=8, alpha=0.35, color="grey", label="images (slices) with tumour")
    if per_patient:
        x, y = np.array(per_patient).T
        axes.scatter(x, y, s=30, alpha=0.85, color="tab:blue", label="patients (stacked)")
    axes.set_xscale("log")
    axes.set_xlabel("true tumour size (pixels or voxels, log scale)")
    axes.set_ylabel("Dice")
    axes.set_ylim(-0.02, 1.02)
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=8, loc="lower right")
    files["dice_vs_size"] = save_figure(figure, out / "dice_vs_size.png")
    free = sum(1 for p in patients if p["truth_size"] == 0)
    caption = "Dice against the true tumour size; tumour-free patients and images have no size and are not shown"
    return section.image(files["dice_vs_size"], caption + (f" ({free} tumour-free patients)." if free else "."))


def _confusion(summary: Mapping[str, Any], out: Path, files: dict[str, Path]) -> _Section:
    section = _Section("Pooled confusion matrix")
    counts = summary.get("confusion")
    if not counts:
        return section.note("Not available: the summary has no confusion matrix.")
    matrix = np.array([[counts["tp"], counts["fn"]], [counts["fp"], counts["tn"]]], dtype=np.float64)
    rows = matrix.sum(axis=1, keepdims=True)
    fraction = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    figure = Figure(figsize=(4.6, 3.8), layout="constrained")
    axes = figure.add_subplot()
    axes.imshow(fraction, cmap="Blues", vmin=0, vmax=1)
    for (i, j), value in np.ndenumerate(matrix):
        axes.text(j, i, f"{int(value):,}\n{100 * fraction[i, j]:.2f}% of row", ha="center", va="center",
                  color="white" if fraction[i, j] > 0.5 else "black", fontsize=9)
    axes.set_xticks([0, 1], ["tumour", "background"])
    axes.set_yticks([0, 1], ["tumour", "background"])
    axes.set_xlabel("prediction")
    axes.set_ylabel("truth")
    files["confusion"] = save_figure(figure, out / "confusion_matrix.png")
    section.image(files["confusion"], "Pixels (voxels) of all patients pooled; colour: fraction of the truth row.")
    return section.table(["", "predicted tumour", "predicted background"],
                         [["true tumour", counts["tp"], counts["fn"]], ["true background", counts["fp"], counts["tn"]]])


def _patient_table(patients: Sequence[Mapping[str, Any]], unit: str) -> _Section:
    section = _Section("Per patient")
    if not patients:
        return section.note("Not available: no patient was scored.")
    headers = [f"{c} ({unit})" if c in ("hd95", "asd") else c for c in _PATIENT_COLUMNS]
    section.table(headers, [[p.get(c) for c in _PATIENT_COLUMNS] for p in patients])
    if any(not p.get("stacked", True) for p in patients):
        unstacked = ", ".join(str(p["patient"]) for p in patients if not p.get("stacked", True))
        section.note(f"Pooled, not stacked (images that are not the numbered slices <patient>_<n> of one size of the "
                     f"patient, or several volumes): {unstacked}; their Dice comes from the pooled confusion and "
                     f"HD95/ASD are undefined.")
    return section


def _tumour_free(summary: Mapping[str, Any]) -> _Section:
    section = _Section("Tumour-free images: false positives")
    free = summary.get("tumour_free")
    if not free or not free.get("tumour_free"):
        return section.note("Not available: every image has tumour in the truth.")
    return section.table(
        ["tumour-free images", "with any predicted pixel", "false-positive rate", "false-positive pixels"],
        [[free[key] for key in ("tumour_free", "with_false_positive", "false_positive_rate", "false_positive_pixels")]])


def _detection(summary: Mapping[str, Any]) -> _Section:
    section = _Section("Detection: tumour present or absent")
    detection = summary.get("detection")
    if not detection:
        return section.note("Not available: the summary has no detection counts.")
    keys = ("n", "with_tumour", "tumour_free", "tp", "fn", "fp", "tn", "sensitivity", "specificity")
    rows = [[level, *(d[key] for key in keys)] for level, d in detection.items()]
    section.table(["level", "n", "with tumour", "tumour-free", "TP", "FN", "FP", "TN", "sensitivity", "specificity"],
                  rows)
    return section.note("Present in the truth: any tumour pixel; detected: any predicted pixel.")


def _size_bins(summary: Mapping[str, Any]) -> _Section:
    section = _Section("Dice and recall by tumour size (images)")
    bins = summary.get("size_bins")
    if not bins or not any(b["n"] for b in bins):
        return section.note("Not available: no image has tumour in the truth.")
    rows = [[b["label"], b["n"], b["dice_mean"], b["dice_median"], b["recall_mean"], b["recall_median"], b["missed"]]
            for b in bins]
    return section.table(["true size (pixels)", "images", "Dice mean", "Dice median", "recall mean", "recall median",
                          "missed (nothing predicted)"], rows)


def _missing(result: Mapping[str, Any]) -> _Section:
    section = _Section("Missing predictions")
    missing = result.get("missing") or []
    if not missing:
        return section.text("None: every truth item has a prediction.")
    section.text(f"{len(missing)} truth item{'s have' if len(missing) > 1 else ' has'} no prediction, "
                 f"{_MISSING_ALLOWED}.")
    shown = missing[:50]
    section.table(["patient", "image", "expected prediction"],
                  [[m["patient"], m["image"], m["expected"] if isinstance(m["expected"], str) else " or ".join(
                      m["expected"])] for m in shown])
    if len(missing) > len(shown):
        section.note(f"... and {len(missing) - len(shown)} more (all listed in metrics.json).")
    return section


def _worst_cases(
    patients: Sequence[Mapping[str, Any]], images: Sequence[Mapping[str, Any]], n_worst: int, out: Path,
    files: dict[str, Path],
) -> _Section:
    section = _Section("Worst cases")
    ranked = sorted((p for p in patients if p.get("dice") is not None), key=lambda p: p["dice"])[:n_worst]
    if not ranked:
        reason = "n_worst is 0" if n_worst == 0 else "no patient has a defined Dice"
        return section.note(f"Not available: {reason}.")
    section.text("The patients with the lowest Dice, each at its slice with the most tumour in the truth: truth "
                 "outlined in green, prediction filled in red.")
    for rank, patient in enumerate(ranked, start=1):
        records = [r for r in images if r["patient"] == patient["patient"]]
        if not records:
            section.note(f"{patient['patient']}: no image records.")
            continue
        record = max(records, key=lambda r: (r["truth_size"], r["pred_size"]))
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", str(patient["patient"]))
        path = out / f"worst_{rank}_{name}.png"
        try:
            _write_case_overlay(record, path)
        except (InputError, ValueError) as err:  # one unreadable case must not cost the whole report
            section.note(f"{patient['patient']}: overlay not drawn ({err}).")
            continue
        files[f"worst_{rank}"] = path
        where = Path(record["image"]).name + (f", slice {record['slice']}" if "slice" in record else "")
        caption = (f"{patient['patient']}: patient Dice {_fmt(patient['dice'])}. {where}: truth {record['truth_size']} "
                   f"px, predicted {record['pred_size']} px, Dice {_fmt(record['dice'])}.")
        section.image(path, caption, overlay=True)
    return section


def _training_curves(train_dir: str | os.PathLike | None, out: Path, files: dict[str, Path]) -> _Section:
    section = _Section("Training curves")
    if train_dir is None:
        return section.note("Not available: no training folder given (--train-dir).")
    try:
        scalars = read_training_scalars(train_dir)
    except InputError as err:
        return section.note(f"Not available: {err}.")
    tags = [t for t in TRAINING_TAGS if scalars.get(t)]
    if not tags:
        return section.note(f"Not available: no {', '.join(TRAINING_TAGS)} scalars in TensorBoard event files under "
                            f"{train_dir}.")
    figure = Figure(figsize=(9, 3.2 * ((len(tags) + 1) // 2)), layout="constrained")
    grid = figure.subplots((len(tags) + 1) // 2, 2, squeeze=False)
    for axes, tag in zip(grid.ravel(), tags):
        steps, values = np.array(scalars[tag]).T
        axes.plot(steps, values, marker="o" if len(steps) <= 30 else None, markersize=3)
        axes.set_title(tag, fontsize=10)
        axes.set_xlabel(_STEP_UNIT.get(tag, "epoch"))
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        if tag == "learning_rate" and np.all(values > 0) and values.max() / values.min() > 20:
            axes.set_yscale("log")
    for axes in grid.ravel()[len(tags):]:
        axes.set_visible(False)
    files["training_curves"] = save_figure(figure, out / "training_curves.png")
    absent = [t for t in TRAINING_TAGS if t not in tags]
    section.image(files["training_curves"], f"TensorBoard scalars of {train_dir}.")
    if absent:
        section.note(f"Not in the event files: {', '.join(absent)}.")
    return section


def _threshold_curve(
    model: str | os.PathLike | None, train_dir: str | os.PathLike | None, out: Path, files: dict[str, Path]
) -> _Section:
    section = _Section("Threshold tuning")
    candidates = [Path(model)] if model is not None else []
    if train_dir is not None:
        candidates += [Path(train_dir) / "models" / MODEL_SIDECAR, Path(train_dir) / MODEL_SIDECAR]
    tuning = next((t for t in (load_tuning(c) for c in candidates if c.exists()) if t), None)
    if tuning is None:
        where = ", ".join(str(c) for c in candidates) or "no model given (--model or --train-dir)"
        return section.note(f"Not available: no tuned threshold found ({where}); run brainseg tune-threshold.")
    files["threshold_curve"] = plot_threshold_curve(
        tuning["threshold_curve"], tuning["threshold"], out / "threshold_curve.png",
        previous=tuning.get("previous_threshold"),
    )
    section.text(f"Threshold {_fmt(tuning['threshold'], 2)} maximises the mean per-patient Dice "
                 f"({_fmt(tuning.get('dice'))}) on {tuning.get('patients')} validation patients (TTA "
                 f"{tuning.get('tta')}); the previous threshold {_fmt(tuning.get('previous_threshold'), 2)} gave "
                 f"{_fmt(tuning.get('previous_dice'))}.")
    return section.image(files["threshold_curve"], "Mean per-patient Dice against the probability threshold.")


def _settings(settings: Mapping[str, Any]) -> _Section:
    return _Section("Settings").table(["setting", "value"], [[k, v] for k, v in settings.items()])


# ---------------------------------------------------------------- rendering


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}" if abs(int(value)) >= 10000 else str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.{digits}f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v, digits) for v in value)
    return str(value)


def _markdown(title: str, sections: Sequence[_Section]) -> str:
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for block in section.blocks:
            if block[0] == "text":
                lines += [block[1], ""]
            elif block[0] == "note":
                lines += [f"*{block[1]}*", ""]
            elif block[0] == "table":
                cell = lambda v: _fmt(v).replace("|", "\\|")  # noqa: E731
                lines.append("| " + " | ".join(cell(h) for h in block[1]) + " |")
                lines.append("|" + "|".join("---" for _ in block[1]) + "|")
                lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in block[2]]
                lines.append("")
            else:
                lines += [f"![{block[2]}]({block[1]})", "", f"*{block[2]}*", ""]
    return "\n".join(lines)


def _html(title: str, sections: Sequence[_Section]) -> str:
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">', f"<title>{esc(title)}</title>",
             f"<style>{_STYLE}</style>", "</head>", "<body>", f"<h1>{esc(title)}</h1>"]
    for section in sections:
        parts.append(f"<h2>{esc(section.title)}</h2>")
        for block in section.blocks:
            if block[0] == "text":
                parts.append(f"<p>{esc(block[1])}</p>")
            elif block[0] == "note":
                parts.append(f'<p class="note">{esc(block[1])}</p>')
            elif block[0] == "table":
                head = "".join(f"<th>{esc(_fmt(h))}</th>" for h in block[1])
                body = "".join("<tr>" + "".join(f"<td>{esc(_fmt(v))}</td>" for v in row) + "</tr>" for row in block[2])
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            else:
                css = ' class="overlay"' if block[3] else ""
                parts.append(f'<figure><img src="{esc(block[1])}"{css} alt="{esc(block[2])}">'
                             f"<figcaption>{esc(block[2])}</figcaption></figure>")
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)





# ---------------------------------------------------------------- overlays


def _write_case_overlay(record: Mapping[str, Any], path: Path) -> Path:
    """Overlay of one per-image record: its image (a volume at ``record["slice"]``), truth and prediction."""
    image = _channel_first(read_sitk(record["image"]))
    truth, _ = read_mask(record["label"])
    prediction = None
    if record.get("prediction") is not None:
        prediction, _ = read_mask(record["prediction"])
    if "slice" in record:
        z = int(record["slice"])
        image, truth = image[..., z], truth[..., z]
        prediction = None if prediction is None else prediction[..., z]
    if prediction is None:
        prediction = np.zeros_like(truth)
    if image.shape[1:] != truth.shape:
        raise InputError(record["image"], f"image size {image.shape[1:]} differs from its truth {record['label']} "
                                          f"size {truth.shape}")
    return write_overlay_png(image, prediction.astype(np.uint8), path, truth=truth.astype(np.uint8))


def _channel_first(image: sitk.Image) -> np.ndarray:
    """(C, x, y[, z]) array in reader axis order."""
    array = sitk.GetArrayFromImage(image)
    if image.GetNumberOfComponentsPerPixel() == 1:
        return array.T[None]
    return np.moveaxis(array, -1, 0).transpose(0, *range(array.ndim - 1, 0, -1))
