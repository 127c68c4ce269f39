"""Score what ``brainseg infer`` wrote against the truth: per image (slice), per patient (stacked volume) and pooled.

Predictions are found where the runner puts them: ``PRED_DIR/<case>/<image stem>_pred.png`` for 2D images and
``PRED_DIR/<case>/mask.nii.gz`` for volumes. A truth item without a prediction is refused (`MISSING_POLICY`):
scoring it as an empty prediction would count a tumour-free item as perfect, so deleting predictions could raise
the scores. ``allow_missing`` scores such items as empty predictions all the same and lists them in ``missing``;
``only_predicted`` leaves out the patients that have no prediction at all (one patient predicted, the dataset root
as truth) and counts them in ``left_out``.
A prediction mask holds 0 and 1 (volumes) or 0 and 255 (PNG), as ``brainseg infer`` writes them: other values (a
label map, a probability map) are refused unless ``label_maps`` counts every non-zero value as tumour.

Per-patient metrics are those of the patient's slices stacked in slice order (`metrics.patient_metrics`): Dice is
the sum of intersections over the sum of sizes, not the mean of slice Dices. Only the numbered slices of one patient
(``<patient>_<n>``, as in an LGG folder; the rule of `inference.postprocess.slice_stacks`) form a volume: the
images of a ``pairs`` group (figshare's ``cvfold<k>``, which is no patient) are pooled instead, with HD95 and ASD
undefined. A volume's per-image records are its slices along the third axis (the acquisition slices). The returned
dict is JSON-ready: nan and inf are ``None``.

`aggregate_folds` combines the ``metrics.json`` of K folds' evaluations: the mean and spread over folds, and the
per-patient Dice pooled over every fold's patients.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from brainseg_monai.datalist import (
    DEFAULT_LABEL_PATTERN,
    SOURCES,
    build_datalist,
    is_lgg_patient_folder,
    load_datalist,
    training_split,
)
from brainseg_monai.errors import InputError
from brainseg_monai.inference.postprocess import slice_stacks
from brainseg_monai.inference.outputs import SLICE_MASK_SUFFIX, VOLUME_MASK
from brainseg_monai.io import (
    IMAGE_2D_SUFFIXES,
    NIFTI_SUFFIXES,
    file_stem,
    find_dicom_series,
    json_ready,
    natural_key,
    read_mask,
    write_json_atomic,
)
from brainseg_monai.metrics import RATIO_METRICS, describe, image_metrics, patient_metrics, pooled_metrics, summarise

__all__ = [
    "METRICS_FILE",
    "MISSING_POLICY",
    "PREDICTION_VALUES",
    "SPLITS",
    "aggregate_folds",
    "evaluate_predictions",
    "write_metrics_json",
]

logger = logging.getLogger(__name__)

MISSING_POLICY = ("refused unless allowed (allow_missing, --allow-missing); allowed, each is scored as an empty "
                  "prediction (all background): 0 on an item with tumour, but perfect on a tumour-free one")
"""What happens to a truth item without a prediction; ``settings["missing_policy"]`` of every result."""
SPLITS = ("training", "validation", "testing", "all")
METRICS_FILE = "metrics.json"
"""The scores ``brainseg evaluate`` writes into its report folder, which `aggregate_folds` reads."""
_SHARED_SETTINGS = ("kind", "distance_unit", "spacing")  # what the folds' distances (and images) must agree on
PREDICTION_VALUES = ((0, 1), (0, 255))
"""The value sets a prediction mask may hold: ``brainseg infer`` writes 0/1 volumes and 0/255 PNGs. Any other value
(a label map's 2 or 4, a probability, {0, 3, 77}) would be counted as tumour without a word, so it is refused unless
``label_maps`` says every non-zero value is tumour."""

def evaluate_predictions(
    pred_dir: str | os.PathLike,
    truth: str | os.PathLike,
    source: str | None = None,
    spacing: float | Sequence[float] | None = None,
    *,
    split: str | None = None,
    fold: int | None = None,
    allow_missing: bool = False,
    label_maps: bool = False,
    only_predicted: bool = False,
) -> dict[str, Any]:
    """Score the masks ``brainseg infer`` wrote into ``pred_dir`` against ``truth``.

    Matching. 2D images: the prediction of truth image ``<stem>.<ext>`` of patient P is ``pred_dir/P/<stem>_pred.png``
    (an LGG patient folder is the case ``P``); otherwise the one ``pred_dir/*/<stem>_pred.png`` there is (a single
    image is the case ``<stem>``, a folder of pairs the case named after the folder); a stem found in several case
    folders and none of them P is ambiguous and an error. Volumes: ``pred_dir/<case>/mask.nii.gz`` with the case the
    patient (case folder, DICOM study), else the image's file stem or series folder (cases of a 1-channel model);
    several of these holding a mask is an error.

    Args:
        pred_dir: the output folder of ``brainseg infer``.
        truth: a dataset folder (read as ``source``; for ``lgg`` also one patient folder) or a datalist JSON file:
            a decathlon datalist (its ``split``, or fold ``fold``'s validation patients) or a JSON list of items
            ``{"image", "label", "patient"}``; items without a patient are their own patient (the image stem).
        source: ``lgg``, ``pairs``, ``nifti`` or ``dicom`` for a dataset folder; None: recognised from its layout.
        spacing: mm per axis. 2D images: (x, y) or one number for both; the 3D distances of a patient's stacked
            slices need the slice spacing too, (x, y, z), else their HD95 and ASD are None (a patient of one image
            keeps its 2D distances). Volumes: (x, y, z) or one number for all three, instead of the files' spacing.
            None: 2D images in pixels (a stack's z is one slice step), volumes at each truth file's spacing.
            ``settings`` records what was used (``image_spacing``, ``patient_spacing``, ``distances``).
        split: the datalist list to score, one of ``SPLITS``; default ``validation`` (datalist JSON only).
        fold: score the validation patients of this fold of a datalist built with folds (datalist JSON only).
        allow_missing: score a truth item without a prediction as an empty prediction instead of refusing it.
        label_maps: take prediction masks holding other values than `PREDICTION_VALUES` (label maps), every
            non-zero value counted as tumour, instead of refusing them.
        only_predicted: score only the patients with a prediction: a patient none of whose items has one is left
            out (counted in ``summary["left_out_patients"]``/``["left_out_items"]``, listed in ``left_out``). A
            patient with some predictions but not all still has missing items (refused unless ``allow_missing``):
            leaving out only the slices without one would change what the patient's score measures.

    Returns:
        ``{"summary", "per_patient", "per_image", "missing", "left_out", "skipped", "settings"}``: ``summary`` is
        `metrics.summarise` plus ``missing_predictions``, ``unmatched_predictions`` (prediction files of no truth
        item), ``patients_pooled``, ``left_out_patients`` and ``left_out_items`` (0 without ``only_predicted``);
        ``per_patient`` records ``{"patient", "images", "stacked", "missing_predictions", "spacing", <metrics>}``
        (``spacing``: what its HD95/ASD were computed at, None when undefined; a patient whose images are not the
        numbered slices of one size of that patient, or who has several volumes, is not stacked but pooled: its
        ratios come from the pooled confusion and HD95/ASD are None);
        ``per_image`` records ``{"patient", "image", "label", "prediction"[, "slice"], <metrics>}`` (a volume's
        image is its FLAIR channel when a file or folder is named so, else its first); ``missing`` lists
        ``{"patient", "image", "label", "expected"}``; ``left_out`` lists ``{"patient", "items"}`` of the patients
        left out by ``only_predicted``; ``skipped`` lists items without a label; ``settings`` says
        what a patient is (``patient_definition``) and what distances were measured in.

    Raises:
        ValueError: for a bad ``source``, ``spacing``, ``split`` or ``fold``.
        InputError: a missing folder or file, no labelled item, an unreadable mask, a prediction whose size (or, for
            volumes, geometry) differs from its truth (the message names both files), an ambiguous prediction, a
            truth item without a prediction unless ``allow_missing`` (the message names the first few expected), a
            prediction holding values outside `PREDICTION_VALUES` unless ``label_maps`` (the message names them),
            no truth item with a prediction at all under ``only_predicted``.
    """
    pred_root = Path(pred_dir).expanduser().resolve()
    if not pred_root.is_dir():
        raise InputError(pred_root, "prediction folder does not exist (the --out folder of brainseg infer)")
    if source is not None and source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)} or None but is {source!r}")
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)} or None but is {split!r}")
    if fold is not None and (isinstance(fold, bool) or not isinstance(fold, (int, np.integer))):
        raise ValueError(f"fold must be an integer or None but is {fold!r}")
    if not isinstance(allow_missing, (bool, np.bool_)):
        raise ValueError(f"allow_missing must be a bool but is {allow_missing!r}")
    if not isinstance(label_maps, (bool, np.bool_)):
        raise ValueError(f"label_maps must be a bool but is {label_maps!r}")
    if not isinstance(only_predicted, (bool, np.bool_)):
        raise ValueError(f"only_predicted must be a bool but is {only_predicted!r}")
    spacing_values = _check_spacing(spacing)

    items, source, truth_path, split = _truth_items(Path(truth).expanduser().resolve(), source, split, fold)
    labelled = [it for it in items if it.get("label")]
    skipped = [{"image": _first(it.get("image")), "patient": it.get("patient"), "reason": "no label"}
               for it in items if not it.get("label")]
    if not labelled:
        raise InputError(truth_path, "holds no labelled item to score")
    kind = _kind(labelled, source, truth_path)
    for item in labelled:
        if not item.get("patient"):
            item["patient"] = file_stem(_first(item["image"]))

    scorer = _SliceScorer if kind == "slices" else _VolumeScorer
    scored = scorer(pred_root, spacing_values, bool(label_maps))
    by_patient: dict[str, list[tuple[dict[str, Any], Path | None]]] = {}
    for item in labelled:  # every prediction is found before any is read, so a missing one fails fast
        by_patient.setdefault(str(item["patient"]), []).append((item, scored.find(item)))
    left_out = _leave_out_unpredicted(by_patient, scored, pred_root, truth_path) if only_predicted else []
    labelled = [item for found in by_patient.values() for item, _ in found]
    if scored.missing and not allow_missing:
        shown = ", ".join(_relative(m["expected"], pred_root) for m in scored.missing[:3])
        raise InputError(pred_root, f"{len(scored.missing)} of {len(labelled)} truth items have no prediction here "
                                    f"(expected {shown}{', ...' if len(scored.missing) > 3 else ''}): predict them "
                                    f"with brainseg infer; pass --only-predicted (only_predicted=True) to score only "
                                    f"the patients that were predicted, or --allow-missing (allow_missing=True) to "
                                    f"score each as an empty prediction, which is perfect on a tumour-free item")
    per_patient, per_image = [], []
    for patient, found in by_patient.items():
        patient_record, image_records = scored.patient(patient, found)
        per_patient.append(patient_record)
        per_image.extend(image_records)

    summary = summarise(per_image, per_patient)
    summary["missing_predictions"] = len(scored.missing)
    summary["unmatched_predictions"] = len(scored.unmatched())
    summary["patients_pooled"] = sum(1 for p in per_patient if not p["stacked"])
    summary["left_out_patients"] = len(left_out)
    summary["left_out_items"] = sum(entry["items"] for entry in left_out)
    if scored.missing:
        logger.warning("%d of %d truth items have no prediction in %s; allowed: each is scored as an empty prediction",
                       len(scored.missing), len(labelled), pred_root)
    settings = {
        "pred_dir": str(pred_root),
        "truth": str(truth_path),
        "source": source,
        "kind": kind,
        "split": split,
        "fold": fold,
        "patient_definition": _patient_definition(source, kind),
        "spacing": None if spacing_values is None else list(spacing_values),
        "distance_unit": "pixel" if kind == "slices" and spacing_values is None else "mm",
        "image_spacing": scored.image_spacing,
        "patient_spacing": scored.patient_spacing,
        "distances": scored.distances(),
        "allow_missing": bool(allow_missing),
        "label_maps": bool(label_maps),
        "only_predicted": bool(only_predicted),
        "missing_policy": MISSING_POLICY,
        "items": len(labelled),
    }
    result = {
        "summary": summary,
        "per_patient": per_patient,
        "per_image": per_image,
        "missing": scored.missing,
        "left_out": left_out,
        "skipped": skipped,
        "settings": settings,
    }
    return json_ready(result)


def _leave_out_unpredicted(by_patient: dict[str, list[tuple[dict[str, Any], Path | None]]], scored: _Scorer,
                           pred_root: Path, truth: Path) -> list[dict[str, Any]]:
    """Remove from ``by_patient`` (and from ``scored.missing``) every patient none of whose items has a prediction;
    returns ``{"patient", "items"}`` of each, in truth order.

    Raises:
        InputError: when no patient has a prediction (the wrong prediction folder or truth, most likely).
    """
    left_out = [{"patient": patient, "items": len(found)} for patient, found in by_patient.items()
                if all(path is None for _, path in found)]
    if len(left_out) == len(by_patient):
        raise InputError(pred_root, f"no truth item of {truth} has a prediction here; is this the --out folder of "
                                    f"brainseg infer run on (part of) that data?")
    gone = {entry["patient"] for entry in left_out}
    for patient in gone:
        del by_patient[patient]
    scored.missing = [m for m in scored.missing if str(m["patient"]) not in gone]
    if left_out:
        logger.info("only_predicted: %d patient(s) (%d truth items) without any prediction left out",
                    len(left_out), sum(entry["items"] for entry in left_out))
    return left_out


def write_metrics_json(result: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``result`` as strict JSON (nan and inf as null), atomically: a temporary file then a rename."""
    return write_json_atomic(path, result)


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
        path = path / METRICS_FILE if path.is_dir() else path
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


# ---------------------------------------------------------------- truth


def _truth_items(
    truth: Path, source: str | None, split: str | None, fold: int | None
) -> tuple[list[dict[str, Any]], str | None, Path, str | None]:
    """(items, source, truth path, the datalist list scored) from a dataset folder or a datalist JSON."""
    if truth.is_dir():
        if split is not None or fold is not None:
            raise ValueError(f"split and fold apply to a datalist JSON, not to the dataset folder {truth}")
        source = source or ("lgg" if is_lgg_patient_folder(truth) else _detect_source(truth))
        if source == "dicom":
            return _dicom_truth_items(truth), source, truth, None
        datalist = build_datalist(source, truth, val=0.0, check=False)
        return [dict(it) for it in datalist["training"]], source, truth, None
    if not truth.is_file():
        raise InputError(truth, "truth does not exist: give a dataset folder or a datalist JSON")
    try:
        loaded = json.loads(truth.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(truth, f"not a readable JSON datalist ({e})") from None
    if isinstance(loaded, list):
        if split is not None or fold is not None:
            raise ValueError(f"split and fold apply to a decathlon datalist, but {truth} is a list of items")
        items = loaded
    else:
        datalist = load_datalist(truth)
        source = source or datalist.get("source")
        split = split or "validation"
        if fold is not None:
            if split != "validation":
                raise ValueError(f"fold={fold} scores the fold's validation patients; split must be validation or "
                                 f"None but is {split!r}")
            items = training_split(datalist, fold)[1]
        elif split == "all":
            items = [*datalist["training"], *datalist.get("validation", []), *datalist.get("testing", [])]
        else:
            items = list(datalist.get(split, []))
            if not items:
                folds = datalist.get("folds")
                hint = f" (this datalist has {folds} folds: pass fold=0..{folds - 1})" if folds else ""
                raise InputError(truth, f"the {split} list is empty{hint}")
    bad = [i for i, it in enumerate(items) if not isinstance(it, Mapping) or "image" not in it]
    if bad:
        raise InputError(truth, f"item {bad[0]} is not an object with an 'image' (and 'label', 'patient')")
    return [dict(it) for it in items], source, truth, split


def _detect_source(root: Path) -> str:
    """The datalist source a dataset folder's layout matches."""
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return "pairs"
    folders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    names = [f.name.lower() for folder in folders for f in folder.iterdir() if f.is_file()]
    if any(re.search(r"_mask\.tiff?$", n) for n in names):
        return "lgg"
    label = DEFAULT_LABEL_PATTERN.lower()
    if any(n.endswith(NIFTI_SUFFIXES) and not Path(n).match(label) for n in names):
        return "nifti"
    if any(Path(n).match(label) for n in names):
        return "dicom"
    raise InputError(root, "cannot tell the layout (lgg, pairs, nifti, dicom): pass source=")


def _dicom_truth_items(root: Path) -> list[dict[str, Any]]:
    """One item per study folder holding a label: the datalist's DICOM source attaches a study's label only when the
    study has one series or channel patterns are given, while scoring needs the label alone (and the series, for
    the overlay and the case ids of 1-channel models)."""
    items = []
    studies = (p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for study in sorted(studies, key=lambda p: natural_key(p.name)):
        labels = sorted(p for p in study.iterdir() if p.is_file() and p.match(DEFAULT_LABEL_PATTERN))
        if len(labels) > 1:
            raise InputError(study, f"several label files: {', '.join(p.name for p in labels)}")
        series = find_dicom_series(study, recursive=True)
        folders = sorted({str(Path(s.folder).resolve()) for s in series})
        items.append({"image": folders or [str(study)], "label": str(labels[0]) if labels else None,
                      "patient": study.name})
    if not items:
        raise InputError(root, "no study folders found: expected ROOT/<study>/<series>/*.dcm and <study>_seg.nii.gz")
    return items


def _kind(items: Sequence[Mapping[str, Any]], source: str | None, truth: Path) -> str:
    """``slices`` (2D images, one ``_pred.png`` each) or ``volumes`` (one ``mask.nii.gz`` per case)."""
    if source in ("lgg", "pairs"):
        return "slices"
    if source in ("nifti", "dicom"):
        return "volumes"
    kinds = {"slices" if str(it["label"]).lower().endswith(IMAGE_2D_SUFFIXES) else "volumes" for it in items}
    if len(kinds) > 1:
        raise InputError(truth, "mixes 2D labels (PNG/TIF/JPG) with volume labels; evaluate them separately")
    return kinds.pop()


# ---------------------------------------------------------------- scoring


class _Scorer:
    """Shared bookkeeping: missing predictions, the prediction files used, and the spacing distances are taken at
    (``image_spacing`` for per-image records, ``patient_spacing`` for a patient's volume: lists of mm or pixels,
    ``"truth file"`` for each file's own, None for none)."""

    image_spacing: list[float] | str
    patient_spacing: list[float] | str | None

    def __init__(self, pred_root: Path, label_maps: bool) -> None:
        self.pred_root = pred_root
        self.label_maps = label_maps
        self.missing: list[dict[str, Any]] = []
        self.used: set[Path] = set()

    def _case_dirs(self) -> list[Path]:
        """Case folders of the prediction folder; hidden ones are the runner's unfinished temporaries."""
        return [p for p in self.pred_root.iterdir() if p.is_dir() and not p.name.startswith(".")]

    def _record_missing(self, item: Mapping[str, Any], expected: Any) -> None:
        self.missing.append({"patient": item["patient"], "image": _first(item["image"]), "label": item["label"],
                             "expected": expected})


class _SliceScorer(_Scorer):
    """2D images: ``<case>/<stem>_pred.png`` PNGs on the truth's pixel grid."""

    def __init__(self, pred_root: Path, spacing: tuple[float, ...] | None, label_maps: bool) -> None:
        super().__init__(pred_root, label_maps)
        self.in_pixels = spacing is None
        if spacing is None:  # pixel units throughout: a stack's z is one slice step
            self.image_spacing, self.patient_spacing = [1.0, 1.0], [1.0, 1.0, 1.0]
        else:  # pixel spacing says nothing of the slice spacing: a stack's 3D distances need it given
            self.image_spacing = list((spacing * 2)[:2])
            self.patient_spacing = list(spacing) if len(spacing) == 3 else None
        self.index: dict[str, list[Path]] = {}
        for case in self._case_dirs():
            for path in case.glob(f"*{SLICE_MASK_SUFFIX}"):
                self.index.setdefault(path.name[: -len(SLICE_MASK_SUFFIX)], []).append(path)

    def distances(self) -> str:
        """What HD95 and ASD are measured in, in words."""
        image = f"images at (x, y) = ({_shown(self.image_spacing)})"
        if self.in_pixels:
            return f"pixels: {image}; stacked slices at (x, y, z) = (1, 1, 1), z one slice step"
        if self.patient_spacing is None:
            return (f"mm: {image} mm; a patient of several slices has no HD95 or ASD (the slice spacing z was not "
                    f"given: give x y z)")
        return f"mm: {image} mm; stacked slices at (x, y, z) = ({_shown(self.patient_spacing)}) mm"

    def unmatched(self) -> list[Path]:
        return [p for paths in self.index.values() for p in paths if p not in self.used]

    def find(self, item: Mapping[str, Any]) -> Path | None:
        """The prediction of ``item``, or None (recorded as missing)."""
        stem = file_stem(_first(item["image"]))
        own = self.pred_root / str(item["patient"]) / f"{stem}{SLICE_MASK_SUFFIX}"
        if own.is_file():
            return own
        found = self.index.get(stem, [])
        if len(found) > 1:
            listing = ", ".join(sorted(str(p.relative_to(self.pred_root)) for p in found))
            raise InputError(self.pred_root, f"{stem}{SLICE_MASK_SUFFIX} of {_first(item['image'])} is in several "
                                             f"case folders ({listing}) and none is its patient {item['patient']!r}")
        if not found:
            self._record_missing(item, str(own))
            return None
        return found[0]

    def patient(
        self, patient: str, found: list[tuple[dict[str, Any], Path | None]]
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        images = [_first(item["image"]) for item, _ in found]
        numbered = _numbered_slices(patient, images)
        order = numbered or sorted(range(len(found)), key=lambda i: natural_key(Path(images[i]).name))
        truths, preds, records = [], [], []
        for item, pred_path in (found[i] for i in order):
            label = Path(item["label"])
            truth, _ = _read_mask(label, "truth", dims=2)
            if pred_path is None:
                pred = np.zeros_like(truth)
            else:
                self.used.add(pred_path)
                pred, _ = _read_mask(pred_path, "prediction", dims=2, any_values=self.label_maps)
                if pred.shape != truth.shape:
                    raise InputError(pred_path, f"prediction size {pred.shape} differs from the truth {label} "
                                                f"size {truth.shape} (x, y)")
            truths.append(truth)
            preds.append(pred)
            records.append({"patient": patient, "image": _first(item["image"]), "label": str(label),
                            "prediction": None if pred_path is None else str(pred_path),
                            **image_metrics(pred, truth, self.image_spacing)})
        stacked = len(records) == 1 or (numbered is not None and len({t.shape for t in truths}) == 1)
        if len(records) == 1:  # the patient is its image: its 2D distances are the patient's
            metrics, spacing = _single_image(records[0]), self.image_spacing
        elif stacked and self.patient_spacing is not None:
            metrics, spacing = patient_metrics(preds, truths, self.patient_spacing), self.patient_spacing
        else:  # images that form no volume, or a stack whose slice spacing z is unknown
            metrics, spacing = _pooled_patient(records), None
        return _patient_record(patient, len(found), stacked, spacing, records, metrics), records


class _VolumeScorer(_Scorer):
    """Volumes: ``<case>/mask.nii.gz`` on the truth's grid; per-image records are the slices along the third axis."""

    def __init__(self, pred_root: Path, spacing: tuple[float, ...] | None, label_maps: bool) -> None:
        if spacing is not None and len(spacing) == 2:
            raise ValueError(f"spacing of volumes must be one or three numbers (x, y, z) but is {list(spacing)!r}")
        super().__init__(pred_root, label_maps)
        self.spacing = None if spacing is None else tuple((spacing * 3)[:3])
        self.image_spacing = "truth file" if self.spacing is None else list(self.spacing[:2])
        self.patient_spacing = "truth file" if self.spacing is None else list(self.spacing)

    def distances(self) -> str:
        """What HD95 and ASD are measured in, in words."""
        if self.spacing is None:
            return "mm: each truth file's spacing (per patient: its 'spacing'); slices at its (x, y)"
        return (f"mm: volumes at (x, y, z) = ({_shown(self.spacing)}) mm instead of the files' spacing; slices at "
                f"(x, y) = ({_shown(self.spacing[:2])}) mm")

    def unmatched(self) -> list[Path]:
        masks = (case / VOLUME_MASK for case in self._case_dirs())
        return [p for p in masks if p.is_file() and p not in self.used]

    def find(self, item: Mapping[str, Any]) -> Path | None:
        """The prediction of ``item``, or None (recorded as missing with every place looked at)."""
        patient = str(item["patient"])
        candidates = [patient]
        for image in _as_list(item["image"]):
            path = Path(image)
            candidates.append(file_stem(path))
            if path.is_dir():  # a DICOM series folder: the runner's ids join the folders below the input root
                candidates.append(f"{patient}_{path.name}")
        candidates = list(dict.fromkeys(candidates))
        found = [self.pred_root / c / VOLUME_MASK for c in candidates if (self.pred_root / c / VOLUME_MASK).is_file()]
        if len(found) > 1:
            listing = ", ".join(str(p.relative_to(self.pred_root)) for p in found)
            raise InputError(self.pred_root, f"several predictions match patient {patient!r} ({listing}); keep one")
        if not found:
            self._record_missing(item, [str(self.pred_root / c / VOLUME_MASK) for c in candidates])
            return None
        return found[0]

    def patient(
        self, patient: str, found: list[tuple[dict[str, Any], Path | None]]
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        truths, preds, records, spacings = [], [], [], []
        for item, pred_path in found:
            label = Path(item["label"])
            truth, truth_image = _read_mask(label, "truth", dims=3)
            if pred_path is None:
                pred = np.zeros_like(truth)
            else:
                self.used.add(pred_path)
                pred, pred_image = _read_mask(pred_path, "prediction", dims=3, any_values=self.label_maps)
                problem = _grid_difference(pred_image, truth_image)
                if problem:
                    raise InputError(pred_path, f"prediction grid differs from the truth {label}: {problem}")
            spacing = self.spacing or tuple(float(s) for s in truth_image.GetSpacing())
            truths.append(truth)
            preds.append(pred)
            spacings.append(spacing)
            base = {"patient": patient, "image": _shown_channel(item["image"]), "label": str(label),
                    "prediction": None if pred_path is None else str(pred_path)}
            for z in range(truth.shape[2]):
                records.append({**base, "slice": z, **image_metrics(pred[..., z], truth[..., z], spacing[:2])})
        if len(found) == 1:
            metrics, spacing = patient_metrics(preds[0], truths[0], spacings[0]), list(spacings[0])
        else:
            metrics, spacing = _pooled_patient(records), None
        return _patient_record(patient, len(found), len(found) == 1, spacing, records, metrics), records


def _numbered_slices(patient: str, images: Sequence[str]) -> list[int] | None:
    """The order of ``images`` in slice number when they are all the numbered slices ``<patient>_<n>`` of
    ``patient`` in one folder (`slice_stacks`, as inference stacks them), else None: a group of other images,
    such as figshare's ``cvfold<k>``, is no volume."""
    stacks = slice_stacks(images)
    if len(stacks) != 1 or len(stacks[0]) != len(images):
        return None
    return stacks[0] if file_stem(images[0]).rsplit("_", 1)[0] == patient else None


def _patient_definition(source: str | None, kind: str) -> str:
    """What one per-patient record is, in words, for the report."""
    if kind == "volumes":
        return "a case (case folder or DICOM study) and its volume; a patient of several volumes is pooled"
    if source == "pairs":
        who = ("each pair's patient in cases.csv: its pid, else its cv_fold group cvfold<k> (figshare: a group of "
               "patients, not one), else the image alone")
    elif source == "lgg":
        who = "an LGG patient folder"
    else:
        who = "each item's patient in the datalist, else the image alone"
    return (f"{who}: its numbered slices <patient>_<n> of one size are stacked in slice order; other images of a "
            f"patient are pooled (Dice from their summed confusion; HD95 and ASD undefined)")


def _patient_record(
    patient: str, n_images: int, stacked: bool, spacing: Sequence[float] | None,
    records: Sequence[Mapping[str, Any]], metrics: Mapping[str, Any],
) -> dict[str, Any]:
    missing = len({r["label"] for r in records if r["prediction"] is None})
    return {"patient": patient, "images": n_images, "stacked": stacked, "missing_predictions": missing,
            "spacing": None if spacing is None else list(spacing), **metrics}


def _single_image(record: Mapping[str, Any]) -> dict[str, Any]:
    """The patient metrics of a patient of one 2D image: the image's own."""
    out = {k: v for k, v in record.items() if k not in ("patient", "image", "label", "prediction")}
    out["slices"] = 1
    out["slices_with_tumour"] = int(record["truth_size"] > 0)
    return out


def _pooled_patient(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A patient that cannot be stacked: ratios of the pooled confusion (still sum of intersections over sum of
    sizes); surface distances across separate images are undefined."""
    out = pooled_metrics(records)
    out.pop("pooled_over")
    out["hd95"] = out["asd"] = float("nan")
    out["missed"] = out["truth_size"] > 0 and out["pred_size"] == 0
    out["slices"] = len(records)
    out["slices_with_tumour"] = sum(1 for r in records if r["truth_size"] > 0)
    return out


def _read_mask(path: Path, role: str, dims: int, any_values: bool = True) -> tuple[np.ndarray, sitk.Image]:
    """A one-component mask as a boolean array in reader axis order (x, y[, z]), nonzero = tumour, and its image.

    Truth masks may be label maps (BraTS: 1, 2, 4), so any non-zero value is tumour there; a prediction is checked
    to hold `PREDICTION_VALUES` unless ``any_values``.
    """
    mask, image = read_mask(path, f"{role} mask")
    if image.GetDimension() != dims:
        raise InputError(path, f"{role} mask is {image.GetDimension()}D (size {image.GetSize()}); expected {dims}D")
    if not any_values:
        _check_binary(sitk.GetArrayViewFromImage(image), path, role)
    return mask, image


def _check_binary(values: np.ndarray, path: Path, role: str) -> None:
    """Refuse a mask holding other values than one set of `PREDICTION_VALUES` (the message lists those it holds).

    Raises:
        InputError: naming the file, its values, and the keyword that takes label maps.
    """
    for allowed in PREDICTION_VALUES:
        if not np.any((values != allowed[0]) & (values != allowed[1])):
            return
    present = np.unique(values)
    shown = ", ".join(f"{v:g}" for v in present[:6]) + (", ..." if len(present) > 6 else "")
    raise InputError(path, (
        f"{role} mask holds the values {shown} ({len(present)} distinct), not 0 and 1 (volumes) or 0 and 255 (PNG) "
        f"as brainseg infer writes them; is it a label map or a probability map? To count every non-zero value as "
        f"tumour, pass --label-maps (label_maps=True)"))


def _grid_difference(pred: sitk.Image, truth: sitk.Image) -> str:
    """What differs between two grids (size, spacing, origin, direction), or an empty string."""
    if pred.GetSize() != truth.GetSize():
        return f"size {pred.GetSize()} != {truth.GetSize()}"
    for name, tolerance in (("spacing", 1e-3), ("origin", 1e-2), ("direction", 1e-4)):
        a, b = getattr(pred, f"Get{name.capitalize()}")(), getattr(truth, f"Get{name.capitalize()}")()
        if not np.allclose(a, b, rtol=0.0, atol=tolerance):
            shown_a, shown_b = (tuple(round(v, 4) for v in x) for x in (a, b))
            return f"{name} {shown_a} != {shown_b}"
    return ""


def _check_spacing(spacing: float | Sequence[float] | None) -> tuple[float, ...] | None:
    """The one to three spacing values as given (x, y[, z]), checked."""
    if spacing is None:
        return None
    values = np.ravel(np.asarray(spacing, dtype=np.float64))
    if values.size not in (1, 2, 3) or not np.all(np.isfinite(values) & (values > 0)):
        raise ValueError(f"spacing must be one to three positive numbers (mm per axis x, y[, z]) but is {spacing!r}")
    return tuple(float(v) for v in values)


def _shown(values: Sequence[float]) -> str:
    return ", ".join(f"{v:g}" for v in values)


def _relative(expected: str | Sequence[str], root: Path) -> str:
    """An expected prediction path (or the alternatives of a volume) relative to the prediction folder."""
    paths = [expected] if isinstance(expected, str) else list(expected)
    return " or ".join(os.path.relpath(p, root) for p in paths)


def _as_list(image: Any) -> list[str]:
    return [str(p) for p in image] if isinstance(image, (list, tuple)) else [str(image)]


def _shown_channel(image: Any) -> str:
    """The channel a volume's records name (and its overlay shows): FLAIR when a file or folder is named so."""
    channels = _as_list(image)
    return next((c for c in channels if "flair" in Path(c).name.lower()), channels[0])


def _first(image: Any) -> str:
    return _as_list(image)[0]


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


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)
