"""Datalists: scan a dataset (lgg | pairs | nifti | dicom) into MONAI decathlon JSON with seeded patient-level splits.

Patients, never slices, are the unit of splitting: every item carries a ``patient`` and no patient is in two sets.
The JSON is what ``monai.data.load_decathlon_datalist`` reads; :func:`training_split` is what the training bundle calls.
"""

from __future__ import annotations

import csv
import fnmatch
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from brainseg_monai.errors import InputError, shown_pattern
from brainseg_monai.io import (
    IMAGE_2D_SUFFIXES,
    NIFTI_SUFFIXES,
    find_dicom_series,
    natural_key,
    read_header,
    read_sitk,
    write_text_atomic,
)

logger = logging.getLogger(__name__)

SOURCES = ("lgg", "pairs", "nifti", "dicom")
# Project convention for 3-channel MR (LGG TIFs are pre-contrast, FLAIR, post-contrast).
LGG_CHANNELS = ("t1", "flair", "t1c")
NIFTI_CHANNEL_SUFFIXES = ("t1", "flair", "t1c", "t2")
DEFAULT_LABEL_PATTERN = "*_seg.nii*"
# name -> regex searched (case-insensitively) in SeriesDescription; T1 without POST/GD/+C is pre-contrast.
DEFAULT_DICOM_CHANNELS = {"t1": r"T1(?!.*(POST|GD|\+C))", "flair": r"FLAIR", "t1c": r"T1.*(POST|GD|\+C)"}

_LGG_SLICE = re.compile(r"^(?P<stem>.+)_(?P<n>\d+)(?P<mask>_mask)?\.tiff?$", re.IGNORECASE)
_LGG_LAYOUT = ("ROOT/<patient>/<patient>_<n>.tif with <patient>_<n>_mask.tif beside each slice (or ROOT a single "
               "<patient> folder)")
_PAIRS_LAYOUT = "ROOT/images/<name>.<png|tif|jpg> and ROOT/masks/<name>.<png|tif|jpg> with matching names"
_NIFTI_LAYOUT = "ROOT/<case>/<case>_<channel>.nii.gz (channels among t1, flair, t1c, t2) and a label <case>_seg.nii.gz"
_DICOM_LAYOUT = "ROOT/<study>/<series folder>/*.dcm, optionally a label ROOT/<study>/<study>_seg.nii.gz"

Item = dict[str, Any]


def build_datalist(
    source: str,
    root: str | os.PathLike,
    *,
    val: float = 0.2,
    test: float = 0.0,
    folds: int | None = None,
    seed: int = 0,
    channels: Mapping[str, str] | Sequence[str] | None = None,
    label_pattern: str | None = None,
    check: bool = True,
) -> dict[str, Any]:
    """Scan ``root`` as ``source`` and split its patients into training / validation / testing (or folds).

    Args:
        source: one of ``SOURCES``: ``lgg`` (a folder per patient of ``<patient>_<n>.tif`` + ``_mask.tif``),
            ``pairs`` (``images/`` + ``masks/`` with matching names, patient from ``cases.csv``), ``nifti``
            (a folder per case of channel files + label), ``dicom`` (a folder per study of DICOM series).
        root: the dataset folder.
        val: fraction of patients for validation (ignored when ``folds`` is given).
        test: fraction of patients for testing, taken first.
        folds: number of cross-validation folds; non-test items go to ``training`` with a ``fold`` key.
        seed: seed of ``numpy.random.default_rng`` that shuffles the sorted patient ids.
        channels: lgg/pairs: channel names (one per image component). nifti: name -> glob of the channel file
            (or names, meaning ``*_<name>.nii*``); default: those of ``NIFTI_CHANNEL_SUFFIXES`` in the first case.
            dicom: name -> regex on SeriesDescription (or names of ``DEFAULT_DICOM_CHANNELS``); default: one
            item per series.
        label_pattern: glob of the label file in a nifti case / dicom study folder (default ``*_seg.nii*``).
        check: read headers (and 2D mask / 3D label pixels) to check sizes, mask values and readability.
            Pairing errors (an image without a mask) are raised either way.

    Returns:
        ``{"name", "source", "root", "seed", "val", "test", "folds", "channels", "training", "validation",
        "testing", "skipped"}``; items ``{"image", "label", "patient"[, "fold"]}`` with absolute paths.

    Raises:
        ValueError: when an argument is invalid.
        InputError: when the data is missing, unreadable or inconsistent (the message names the file).
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)} but is {source!r}")
    for name, value in (("val", val), ("test", test)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be a fraction in [0, 1) but is {value!r}")
    if folds is None and val + test >= 1.0:
        raise ValueError(f"val + test must be below 1 but val={val!r} and test={test!r}")
    if folds is not None and (isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2):
        raise ValueError(f"folds must be an integer >= 2 or None but is {folds!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer but is {seed!r}")
    if label_pattern is not None and (not isinstance(label_pattern, str) or not label_pattern):
        raise ValueError(f"label_pattern must be a non-empty glob pattern or None but is {label_pattern!r}")
    if channels is not None and (isinstance(channels, str) or not isinstance(channels, (Mapping, Sequence))):
        raise ValueError(f"channels must be a mapping name -> pattern, a sequence of names or None but is {channels!r}")
    if source in ("lgg", "pairs") and isinstance(channels, Mapping):
        raise ValueError(f"channels for the {source} source must be a sequence of names, not a mapping: {channels!r}")

    root_path = _check_root(root)
    skipped: list[dict[str, str]] = []
    if source == "lgg":
        items, names = _scan_lgg(root_path, channels, check, skipped)
    elif source == "pairs":
        items, names = _scan_pairs(root_path, channels, check)
    elif source == "nifti":
        items, names = _scan_nifti(root_path, channels, label_pattern or DEFAULT_LABEL_PATTERN, check)
    else:
        items, names = _scan_dicom(root_path, channels, label_pattern or DEFAULT_LABEL_PATTERN, check, skipped)

    training, validation, testing = _split(items, val=val, test=test, folds=folds, seed=int(seed), root=root_path)
    logger.info(
        "%s (%s): %d items of %d patients -> training %d, validation %d, testing %d, skipped %d",
        root_path, source, len(items), len({it["patient"] for it in items}),
        len(training), len(validation), len(testing), len(skipped),
    )
    return {
        "name": root_path.name,
        "source": source,
        "root": str(root_path),
        "seed": int(seed),
        "val": 0.0 if folds is not None else float(val),
        "test": float(test),
        "folds": None if folds is None else int(folds),
        "channels": list(names),
        "training": training,
        "validation": validation,
        "testing": testing,
        "skipped": skipped,
    }


def write_datalist(datalist: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``datalist`` as pretty JSON, atomically (a temporary file beside ``path`` then a rename)."""
    path = write_text_atomic(path, json.dumps(datalist, indent=2) + "\n")
    return path


def load_datalist(path: str | os.PathLike) -> dict[str, Any]:
    """Read a datalist JSON written by :func:`write_datalist` (or any decathlon JSON with a ``training`` list)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            datalist = json.load(f)
    except FileNotFoundError:
        raise InputError(path, "datalist does not exist") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(path, f"not a readable JSON datalist ({e})") from None
    if not isinstance(datalist, dict) or not isinstance(datalist.get("training"), list):
        raise InputError(path, "not a datalist: expected a JSON object with a 'training' list")
    for key in ("validation", "testing"):
        if not isinstance(datalist.get(key, []), list):
            raise InputError(path, f"not a datalist: '{key}' must be a list")
    return datalist


def training_split(
    datalist: Mapping[str, Any] | str | os.PathLike, fold: int | None = None
) -> tuple[list[Item], list[Item]]:
    """The (training, validation) items the training bundle uses.

    Without ``fold``: the datalist's ``training`` and ``validation``. With ``fold=k`` (a datalist built with
    ``folds``): training items whose fold is not k, and those whose fold is k.

    Raises:
        ValueError: ``fold`` is given but the datalist has no folds, or ``fold`` is out of range.
        InputError: the validation set is empty, or a patient is in both sets.
    """
    where: Path | None = None
    if isinstance(datalist, (str, os.PathLike)):
        where = Path(datalist)
        datalist = load_datalist(where)
    training = list(datalist.get("training", []))
    folded = [it for it in training if "fold" in it]
    n_folds = datalist.get("folds") or (max(int(it["fold"]) for it in folded) + 1 if folded else 0)
    if fold is None:
        train, valid = training, list(datalist.get("validation", []))
        hint = f"; this datalist has {n_folds} folds: pass fold=0..{n_folds - 1}" if n_folds else ""
    else:
        if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)):
            raise ValueError(f"fold must be an integer or None but is {fold!r}")
        if not n_folds:
            raise ValueError(f"fold={fold} was requested but the datalist has no folds (build it with folds=K)")
        if not 0 <= fold < n_folds:
            raise ValueError(f"fold must be in 0..{n_folds - 1} (the datalist has {n_folds} folds) but is {fold}")
        if len(folded) != len(training):
            raise InputError(where, "some training items have a 'fold' and others do not")
        train = [it for it in training if int(it["fold"]) != fold]
        valid = [it for it in training if int(it["fold"]) == fold]
        hint = ""
    if not valid:
        raise InputError(where, f"the validation set is empty{hint}")
    if not train:
        raise InputError(where, "the training set is empty")
    shared = sorted({it["patient"] for it in train} & {it["patient"] for it in valid})
    if shared:
        raise InputError(where, f"patients in both training and validation: {', '.join(shared[:5])}")
    return train, valid


def load_lgg_volume(patient_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Stack one LGG patient's slices, in slice-number order, into a volume.

    Returns:
        image ``(C, X, Y, N)`` in the file's dtype, mask ``(X, Y, N)`` uint8 in {0, 1}, and the N slice image paths.
        Spatial axes follow the ITK index order (the transpose of ``SimpleITK.GetArrayFromImage``).

    Raises:
        InputError: no slices, a slice without a mask, unreadable files, sizes that differ, non-binary masks.
    """
    patient_dir = Path(patient_dir).expanduser().resolve()
    if not patient_dir.is_dir():
        raise InputError(patient_dir, "is not a folder of LGG slices")
    slices = _lgg_slices(patient_dir, [])
    if not slices:
        raise InputError(patient_dir, f"no slices found: expected {_LGG_LAYOUT}")
    images, masks = [], []
    for _, image_path, mask_path in slices:
        image = _read_xy(image_path)
        mask = _read_xy(mask_path)
        if mask.shape[0] != 1:
            raise InputError(mask_path, f"mask has {mask.shape[0]} components; expected a single-channel mask")
        if images and image.shape != images[0].shape:
            raise InputError(image_path, f"size {image.shape[1:]} x {image.shape[0]} components differs from "
                                         f"the patient's first slice {images[0].shape[1:]} x {images[0].shape[0]}")
        if mask.shape[1:] != image.shape[1:]:
            raise InputError(mask_path, f"mask size {mask.shape[1:]} differs from its image size {image.shape[1:]}")
        _check_binary(mask_path, mask)
        images.append(image)
        masks.append((mask[0] > 0).astype(np.uint8))
    return np.stack(images, axis=-1), np.stack(masks, axis=-1), [str(p) for _, p, _ in slices]


# ---------------------------------------------------------------- sources


def _scan_lgg(root: Path, channels: Any, check: bool, skipped: list[dict[str, str]]) -> tuple[list[Item], list[str]]:
    """One item per slice; patient = the folder name. ``root`` is a folder of patient folders, or one patient
    folder (its slices in it, no patient folder below): what ``brainseg infer`` was pointed at for one patient."""
    items: list[Item] = []
    for folder in _subfolders(root) or ([root] if is_lgg_patient_folder(root) else []):
        for _, image, mask in _lgg_slices(folder, skipped):
            items.append({"image": str(image), "label": str(mask), "patient": folder.name})
    if not items:
        raise InputError(root, f"no LGG cases found: expected {_LGG_LAYOUT}")
    return items, _component_names(items, channels, check)


def is_lgg_patient_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds LGG slice masks (``<patient>_<n>_mask.tif``) itself: one patient's folder."""
    return any((m := _LGG_SLICE.match(p.name)) is not None and m["mask"] and p.is_file()
               for p in Path(folder).iterdir())


def _lgg_slices(folder: Path, skipped: list[dict[str, str]]) -> list[tuple[int, Path, Path]]:
    """(number, image, mask) of a patient folder's slices, sorted by number as an integer."""
    images: dict[int, Path] = {}
    masks: dict[int, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.suffix.lower() not in (".tif", ".tiff"):
            continue
        match = _LGG_SLICE.match(path.name)
        if match is None:
            skipped.append({"path": str(path), "reason": "not named <patient>_<n>.tif or <patient>_<n>_mask.tif"})
            continue
        number = int(match["n"])
        found = masks if match["mask"] else images
        if number in found:
            raise InputError(path, f"slice number {number} is also used by {found[number].name}")
        found[number] = path
    orphans = sorted(set(masks) - set(images))
    if orphans:
        raise InputError(masks[orphans[0]], "mask without an image: expected the slice image beside it")
    unmasked = sorted(set(images) - set(masks))
    if unmasked:
        image = images[unmasked[0]]
        raise InputError(image, f"image without a mask: expected {image.stem}_mask{image.suffix} beside it")
    return [(number, images[number], masks[number]) for number in sorted(images)]


def _scan_pairs(root: Path, channels: Any, check: bool) -> tuple[list[Item], list[str]]:
    """One item per image/mask pair; patient from cases.csv (pid, else cv_fold group), else the image name."""
    image_dir, mask_dir = root / "images", root / "masks"
    if not image_dir.is_dir() or not mask_dir.is_dir():
        raise InputError(root, f"no pairs found: expected {_PAIRS_LAYOUT}")
    images = _files_by_stem(image_dir)
    masks = _files_by_stem(mask_dir)
    if not images and not masks:
        raise InputError(root, f"no pairs found: expected {_PAIRS_LAYOUT}")
    orphans = sorted(set(masks) - set(images), key=natural_key)
    if orphans:
        raise InputError(masks[orphans[0]], f"mask without an image: expected images/{orphans[0]}.<ext>")
    unmasked = sorted(set(images) - set(masks), key=natural_key)
    if unmasked:
        raise InputError(images[unmasked[0]], f"image without a mask: expected masks/{unmasked[0]}.<ext>")
    patients, grouped = _pairs_patients(root / "cases.csv", sorted(images, key=natural_key))
    items = []
    for stem in sorted(images, key=natural_key):
        item: Item = {"image": str(images[stem]), "label": str(masks[stem]), "patient": patients[stem]}
        if stem in grouped:  # its "patient" is a group of patients: the image is z-scored as its own case
            item["case"] = stem
        items.append(item)
    return items, _component_names(items, channels, check)


def _pairs_patients(cases_csv: Path, stems: list[str]) -> tuple[dict[str, str], set[str]]:
    """Patient of each image stem: ``pid`` if given, else ``cvfold<cv_fold>`` (a patient-wise group), else the stem;
    and the stems whose patient is such a group.

    A ``cvfold`` group keeps splits patient-wise but is many patients, so its items also carry ``case`` (their own
    stem): "case" normalisation then z-scores each image alone, not over a fifth of the dataset.
    """
    if not cases_csv.is_file():
        return {stem: stem for stem in stems}, set()
    try:
        with open(cases_csv, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(cases_csv, f"cannot read the case table ({e})") from None
    if not rows or "name" not in rows[0]:
        raise InputError(cases_csv, "expected a header with a 'name' column (and 'pid' and/or 'cv_fold')")
    by_name: dict[str, str] = {}
    grouped: set[str] = set()
    for row in rows:
        name = (row.get("name") or "").strip()
        pid = (row.get("pid") or "").strip()
        cv_fold = (row.get("cv_fold") or "").strip()
        by_name[name] = pid or (f"cvfold{cv_fold}" if cv_fold else name)
        if not pid and cv_fold:
            grouped.add(name)
    missing = [stem for stem in stems if stem not in by_name]
    if missing:
        raise InputError(cases_csv, f"{len(missing)} images are not listed, e.g. {', '.join(missing[:5])}")
    return {stem: by_name[stem] for stem in stems}, grouped & set(stems)


def _scan_nifti(root: Path, channels: Any, label_pattern: str, check: bool) -> tuple[list[Item], list[str]]:
    """One item per case folder: image = the channel files in channel order; patient = the folder name."""
    cases = [d for d in _subfolders(root) if any(_is_nifti(p) for p in d.iterdir() if p.is_file())]
    if not cases:
        raise InputError(root, f"no NIfTI cases found: expected {_NIFTI_LAYOUT}")
    patterns = _nifti_channel_patterns(channels, cases[0], label_pattern)
    items: list[Item] = []
    for case in cases:
        files = sorted(p for p in case.iterdir() if p.is_file() and _is_nifti(p))
        labels = [p for p in files if _glob_match(p.name, label_pattern)]
        if len(labels) != 1:
            found = ", ".join(p.name for p in labels) or "none"
            raise InputError(case, f"expected one label file matching {label_pattern!r}, found {found}")
        candidates = _channel_candidates(case, label_pattern)
        image = []
        for name, pattern in patterns.items():
            matches = [p for p in candidates if _glob_match(p.name, pattern)]
            if len(matches) != 1:
                found = ", ".join(p.name for p in matches) or "none"
                raise InputError(case, f"channel {name!r}: expected one file matching {pattern!r}, found {found}")
            image.append(matches[0])
        if check:
            _check_volume_case([(p, _header(p)[0]) for p in image], labels[0])
        items.append({"image": [str(p) for p in image], "label": str(labels[0]), "patient": case.name})
    return items, list(patterns)


def _nifti_channel_patterns(channels: Any, first_case: Path, label_pattern: str) -> dict[str, str]:
    """name -> glob of each channel: given, or the standard suffixes present in the first case."""
    if isinstance(channels, Mapping):
        patterns = {str(k): str(v) for k, v in channels.items()}
    elif channels is not None:
        patterns = {str(name): f"*_{name}.nii*" for name in channels}
    else:
        names = [p.name for p in _channel_candidates(first_case, label_pattern)]
        patterns = {
            s: f"*_{s}.nii*" for s in NIFTI_CHANNEL_SUFFIXES if any(_glob_match(n, f"*_{s}.nii*") for n in names)
        }
        if not patterns:
            raise InputError(first_case, f"no channel files found: expected <case>_<channel>.nii.gz with channel "
                                         f"among {', '.join(NIFTI_CHANNEL_SUFFIXES)}, or pass channels=")
    if not patterns:
        raise ValueError(f"channels must name at least one channel but is {channels!r}")
    return patterns


def _channel_candidates(case: Path, label_pattern: str) -> list[Path]:
    """NIfTI files of a case that may be channels: neither the label nor a brain mask."""
    return sorted(
        p for p in case.iterdir()
        if p.is_file() and _is_nifti(p) and not _glob_match(p.name, label_pattern) and "brainmask" not in p.name.lower()
    )


def _scan_dicom(
    root: Path, channels: Any, label_pattern: str, check: bool, skipped: list[dict[str, str]]
) -> tuple[list[Item], list[str]]:
    """One item per study (image = its series folders in channel order) with ``channels``, else one per series."""
    regexes = _dicom_channel_regexes(channels)
    series = find_dicom_series(root, recursive=True)
    if not series:
        raise InputError(root, f"no DICOM series found: expected {_DICOM_LAYOUT}")
    per_folder: dict[Path, int] = {}
    for s in series:
        per_folder[Path(s.folder)] = per_folder.get(Path(s.folder), 0) + 1
    studies: dict[Path, list[Any]] = {}
    for s in series:
        folder = Path(s.folder).resolve()
        relative = folder.relative_to(root).parts
        studies.setdefault(root / relative[0] if relative else root, []).append(s)

    items: list[Item] = []
    for study in sorted(studies, key=lambda p: natural_key(p.name)):
        study_series = sorted(studies[study], key=lambda s: (str(s.folder), s.description or "", s.series_uid))
        try:
            label = _study_label(study, label_pattern)
            if regexes is None:
                usable = []
                for s in study_series:
                    if per_folder[Path(s.folder)] > 1:
                        skipped.append({"path": str(s.folder), "reason": f"series {s.series_uid} "
                                        f"({s.description!r}) shares its folder with other series; "
                                        "the reader needs one series per folder"})
                    else:
                        usable.append(s)
                if label is not None and len(usable) != 1:
                    # Without channels, which of several series a study's label annotates is unknown.
                    logger.info("%s: label not attached: %d series and no channels", study, len(usable))
                    label = None
                groups = [[s] for s in usable]
            else:
                groups = [_match_channels(study, study_series, regexes)]
                for s in groups[0]:
                    if per_folder[Path(s.folder)] > 1:
                        raise InputError(s.folder, f"folder holds {per_folder[Path(s.folder)]} series; "
                                                   "the reader needs one series per folder")
            for group in groups:
                folders = [str(Path(s.folder).resolve()) for s in group]
                item: Item = {"image": folders if regexes is not None else folders[0], "patient": study.name}
                if label is not None:
                    if check:
                        sizes = [(Path(s.folder), read_header(s.folder, series_uid=s.series_uid).size) for s in group]
                        _check_volume_case(sizes, label)
                    item["label"] = str(label)
                items.append(item)
        except InputError as e:
            # A batch never dies on one bad study: it is reported in "skipped" with the reason.
            logger.warning("skipping %s", e)
            skipped.append({"path": e.path or str(study), "reason": e.reason})
    if not items:
        reasons = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:3])
        raise InputError(root, f"no usable DICOM study ({len(skipped)} skipped: {reasons})")
    return items, list(regexes) if regexes is not None else ["image"]


def _dicom_channel_regexes(channels: Any) -> dict[str, re.Pattern[str]] | None:
    """name -> compiled case-insensitive regex, from a mapping or from names of ``DEFAULT_DICOM_CHANNELS``."""
    if channels is None:
        return None
    if isinstance(channels, Mapping):
        source = {str(k): str(v) for k, v in channels.items()}
    else:
        unknown = [n for n in channels if n not in DEFAULT_DICOM_CHANNELS]
        if unknown:
            raise ValueError(f"channels names must be among {', '.join(DEFAULT_DICOM_CHANNELS)} (or pass a mapping "
                             f"name -> regex) but include {unknown!r}")
        source = {n: DEFAULT_DICOM_CHANNELS[n] for n in channels}
    if not source:
        raise ValueError(f"channels must name at least one channel but is {channels!r}")
    compiled = {}
    for name, pattern in source.items():
        try:
            compiled[name] = re.compile(pattern, re.IGNORECASE)
        except re.error as e:
            raise ValueError(f"channels[{name!r}] is not a valid regex: {shown_pattern(pattern)} ({e})") from None
    return compiled


def _match_channels(study: Path, series: list[Any], regexes: Mapping[str, re.Pattern[str]]) -> list[Any]:
    """The one series of each channel, in channel order; InputError listing the descriptions otherwise."""
    descriptions = ", ".join(repr(s.description or "") for s in series)
    chosen = []
    for name, regex in regexes.items():
        hits = [s for s in series if regex.search(s.description or "")]
        if len(hits) != 1:
            problem = "no series matches" if not hits else f"{len(hits)} series match"
            raise InputError(
                study,
                f"channel {name!r} ({shown_pattern(regex.pattern)}): {problem}; series descriptions: {descriptions}"
            )
        chosen.append(hits[0])
    if len({id(s) for s in chosen}) != len(chosen):
        raise InputError(study, f"one series matches several channels; series descriptions: {descriptions}")
    return chosen


def _study_label(study: Path, label_pattern: str) -> Path | None:
    """The label file in a study folder, if any (optional for DICOM: unlabelled studies are for inference)."""
    if not study.is_dir():
        return None
    labels = sorted(p for p in study.iterdir() if p.is_file() and _glob_match(p.name, label_pattern))
    if len(labels) > 1:
        raise InputError(study, f"several label files match {label_pattern!r}: {', '.join(p.name for p in labels)}")
    return labels[0] if labels else None


# ---------------------------------------------------------------- splits


def _split(
    items: list[Item], *, val: float, test: float, folds: int | None, seed: int, root: Path
) -> tuple[list[Item], list[Item], list[Item]]:
    """Shuffle sorted patient ids with the seed; take test, then val (or assign folds round-robin)."""
    patients = sorted({it["patient"] for it in items})
    order = [patients[i] for i in np.random.default_rng(seed).permutation(len(patients))]
    n = len(order)
    n_test = _split_count(test, n)
    rest = order[n_test:]
    test_set = set(order[:n_test])
    if folds is not None:
        if folds > len(rest):
            raise InputError(root, f"folds={folds} needs at least {folds} non-test patients, found {len(rest)}")
        fold_of = {patient: i % folds for i, patient in enumerate(rest)}
        training = [{**it, "fold": fold_of[it["patient"]]} for it in items if it["patient"] in fold_of]
        validation: list[Item] = []
    else:
        n_val = _split_count(val, n)
        if n_test + n_val >= n and n >= 2:
            raise InputError(root, f"only {n} patients: val={val} and test={test} leave none for training")
        val_set = set(rest[:n_val])
        training = [it for it in items if it["patient"] not in test_set and it["patient"] not in val_set]
        validation = [it for it in items if it["patient"] in val_set]
        if val > 0 and not validation:
            logger.warning("%s: only %d patient, the validation set is empty", root, n)
    testing = [it for it in items if it["patient"] in test_set]
    return training, validation, testing


def _split_count(fraction: float, n: int) -> int:
    """Patients for a split: the rounded fraction, at least one for a non-zero fraction when there are >= 2."""
    if fraction <= 0 or n < 2:
        return 0
    return max(1, math.floor(fraction * n + 0.5))


# ---------------------------------------------------------------- checks and reads


def _check_root(root: str | os.PathLike) -> Path:
    path = Path(root).expanduser().resolve()
    if not path.exists():
        raise InputError(path, "dataset folder does not exist")
    if not path.is_dir():
        raise InputError(path, "is not a folder")
    if not any(path.iterdir()):
        raise InputError(path, "dataset folder is empty")
    return path


def _component_names(items: list[Item], channels: Any, check: bool) -> list[str]:
    """Channel names of 2D images (one per component); with ``check`` every pair is read and checked.

    Default names: ``image`` for grey images, ``LGG_CHANNELS`` (the project's 3-channel MR order) for RGB.
    """
    components = _header(Path(items[0]["image"]))[1]
    if check:
        for item in items:
            image, mask = Path(item["image"]), Path(item["label"])
            size, n = _header(image)
            if len(size) != 2:
                raise InputError(image, f"expected a 2D image, found size {size}")
            if n != components:
                raise InputError(image, f"has {n} components but {items[0]['image']} has {components}")
            _check_mask_2d(mask, size)
    if channels is not None:
        names = [str(c) for c in channels]
        if len(names) != components:
            raise ValueError(
                f"channels names {names!r} do not match the {components} components of {items[0]['image']}"
            )
        return names
    if components == 1:
        return ["image"]
    if components == 3:
        return list(LGG_CHANNELS)
    return [f"c{i}" for i in range(components)]


def _check_mask_2d(mask: Path, image_size: tuple[int, ...]) -> None:
    array = _read_xy(mask)
    if array.shape[0] != 1:
        raise InputError(mask, f"mask has {array.shape[0]} components; expected a single-channel mask")
    if array.shape[1:] != tuple(image_size):
        raise InputError(mask, f"mask size {array.shape[1:]} differs from its image size {tuple(image_size)}")
    _check_binary(mask, array)


def _check_binary(path: Path, array: np.ndarray) -> None:
    values = set(np.unique(array).tolist())
    if not (values <= {0, 255} or values <= {0, 1}):
        shown = sorted(values)[:8]
        raise InputError(path, f"mask values {shown} are not background/foreground: expected {{0, 255}} or {{0, 1}}")


def _check_volume_case(sizes: Sequence[tuple[Path, tuple[int, ...]]], label: Path) -> None:
    """Channels (path, size) share one size; the label has that size and holds non-negative integer labels."""
    for path, size in sizes[1:]:
        if size != sizes[0][1]:
            raise InputError(path, f"size {size} differs from {sizes[0][0].name} size {sizes[0][1]}")
    array = _read_array(label)
    size = tuple(reversed(array.shape))
    if size != sizes[0][1]:
        raise InputError(label, f"label size {size} differs from its image size {sizes[0][1]} ({sizes[0][0]})")
    if array.dtype.kind == "f" and not np.all(np.isfinite(array) & (array == np.round(array))):
        raise InputError(label, "label has non-integer values; expected integer labels (0 = background)")
    if array.size and array.min() < 0:
        raise InputError(label, f"label has negative values (min {array.min()}); expected labels >= 0")


def _header(path: Path) -> tuple[tuple[int, ...], int]:
    """(size in ITK index order, components per pixel), from the header only."""
    header = read_header(path)
    return header.size, header.components


def _read_array(path: Path) -> np.ndarray:
    """Pixels as SimpleITK returns them (index order reversed: [z,] y, x[, components])."""
    return sitk.GetArrayFromImage(read_sitk(path))


def _read_xy(path: Path) -> np.ndarray:
    """A 2D image as (C, X, Y) in ITK index order."""
    image = read_sitk(path)
    if image.GetDimension() != 2:
        raise InputError(path, f"expected a 2D image, found size {image.GetSize()}")
    array = sitk.GetArrayFromImage(image)
    return array.T[None] if image.GetNumberOfComponentsPerPixel() == 1 else array.transpose(2, 1, 0)


# ---------------------------------------------------------------- files


def _subfolders(root: Path) -> list[Path]:
    folders = (p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return sorted(folders, key=lambda p: natural_key(p.name))


def _files_by_stem(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.suffix.lower() not in IMAGE_2D_SUFFIXES:
            continue
        if path.stem in found:
            raise InputError(path, f"two files named {path.stem!r}: {found[path.stem].name} and {path.name}")
        found[path.stem] = path
    return found


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _glob_match(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name.lower(), pattern.lower())
