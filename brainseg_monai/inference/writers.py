"""Per-case outputs of inference: the mask in the source geometry (NIfTI, PNG), an overlay PNG and a DICOM SEG.

Masks arrive in reader axis order (x, y[, z]) with the reader's RAS affine, so `brainseg_monai.io.write_image`
puts them back on the source grid. Every file is written to a temporary name in its folder and moved into place,
and a writer refuses to write onto the input it came from.

Clinical series often hold values the standard does not allow (PatientSex '0000', dates like '2000.01.01',
over-long IDs, misspelt character sets, no SliceThickness). The SEG writer sanitises what it copies from the
source instead of failing, and reports what it changed; a SEG that still cannot be built raises `SegNotWritten`.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from highdicom._standard_utils import get_iod_module_map, get_module_attribute_map, get_sop_class_iod_map
from highdicom.valuerep import _check_specific_character_set
from monai.config import PathLike
from monai.utils.type_conversion import convert_to_numpy
from pydicom.charset import python_encoding
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from pydicom.valuerep import DS
from skimage.segmentation import find_boundaries

from brainseg_monai import __version__
from brainseg_monai.errors import InputError
from brainseg_monai.io import write_atomic, write_image

__all__ = [
    "SEG_SERIES_NUMBER",
    "SegNotWritten",
    "grey_window",
    "overlay_slice",
    "write_dicom_seg",
    "write_overlay_png",
    "write_png_mask",
    "spread_from_png",
    "write_spread_png",
    "write_spread_volume",
    "write_uncertainty_png",
    "write_volume_mask",
]

logger = logging.getLogger(__name__)

SEG_SERIES_NUMBER = 1000
"""SeriesNumber of the DICOM SEG series (fixed, so re-running a case gives the same bytes)."""

_RED = np.array([255.0, 0.0, 0.0])
#: the largest standard deviation of probabilities in [0, 1]: half the views at 0, half at 1
MAX_SPREAD = 0.5
_GREEN = np.array([0, 255, 0], dtype=np.uint8)
_YELLOW = np.array([255.0, 255.0, 0.0])
_FLAIR_CHANNEL = 1  # (t1, flair, t1c): FLAIR shows the whole tumour best
# (date, time) pairs of the source tried in turn for the SEG's ContentDate/ContentTime.
_SOURCE_DATES = (
    ("ContentDate", "ContentTime"),
    ("SeriesDate", "SeriesTime"),
    ("AcquisitionDate", "AcquisitionTime"),
    ("StudyDate", "StudyTime"),
)
# Type 3, but kept: it states that the source was de-identified and conditions DeidentificationMethod (type 1C).
_KEPT_OPTIONAL_PATIENT_ATTRIBUTES = frozenset({"PatientIdentityRemoved"})
# The patient and study attributes the SEG copies from the source: (keyword, VR, type 2?, enumerated values).
# Type 2 attributes that are invalid become empty, as the standard allows; type 3 ones are left out.
_COPIED_ATTRIBUTES: tuple[tuple[str, str, bool, tuple[str, ...]], ...] = (
    ("PatientName", "PN", True, ()),
    ("PatientID", "LO", True, ()),
    ("PatientBirthDate", "DA", True, ()),
    ("PatientSex", "CS", True, ("M", "F", "O")),
    ("PatientIdentityRemoved", "CS", False, ("YES", "NO")),
    ("StudyID", "SH", True, ()),
    ("AccessionNumber", "SH", True, ()),
    ("StudyDate", "DA", True, ()),
    ("StudyTime", "TM", True, ()),
    ("ReferringPhysicianName", "PN", True, ()),
)
_MAX_CHARACTERS = {"CS": 16, "SH": 16, "LO": 64, "PN": 64}  # PN: per component group (PS3.5 table 6.2-1)
_DATE = re.compile(r"\d{8}")
_TIME = re.compile(r"([01]\d|2[0-3])([0-5]\d((60|[0-5]\d)(\.\d{1,6})?)?)?")
# Control characters other than ESC (which ISO 2022 character sets use) are not allowed in SH, LO, PN and CS.
_CONTROL = re.compile(r"[\x00-\x1a\x1c-\x1f\x7f]")
_UTF8 = "ISO_IR 192"
_SLICE_TOLERANCE_MM = 1e-3  # slices closer than this along the normal are at the same position
# Values of these VRs are the SEG's text, which its SpecificCharacterSet must be able to encode.
_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})


class SegNotWritten(Exception):
    """A DICOM SEG could not be built from this source series; ``str(error)`` is the reason on one line.

    The mask itself is fine and the other outputs are written: a caller keeps the case ``ok`` and records
    ``SEG not written: <reason>`` instead of failing the case.
    """


def _binary_mask(mask: Any, spatial_dims: int, name: str = "mask") -> np.ndarray:
    """`mask` as a uint8 {0, 1} array with `spatial_dims` axes; a leading singleton channel is dropped."""
    values = convert_to_numpy(mask)
    if values.ndim == spatial_dims + 1 and values.shape[0] == 1:
        values = values[0]
    if values.ndim != spatial_dims:
        raise ValueError(
            f"{name} must have {spatial_dims} spatial axes (optionally after one channel) but has shape {values.shape}."
        )
    if values.dtype != bool and not ((values == 0) | (values == 1)).all():  # np.isin: 40x slower on a volume
        found = np.unique(values)[:6].tolist()
        raise ValueError(f"{name} must be binary (0/1 or bool) but holds values {found}.")
    return values.astype(np.uint8)


def _output_path(path: PathLike, suffix: str) -> Path:
    path = Path(path)
    if not path.name.lower().endswith(suffix):
        raise ValueError(f"path must end with {suffix!r} but is {str(path)!r}.")
    if path.is_dir():
        raise InputError(path, "is a folder, cannot write a file there")
    return path


def write_volume_mask(mask: Any, affine: Any, path: PathLike, *, reference: PathLike | None = None) -> Path:
    """Write a 3D binary mask as {0, 1} uint8 NIfTI on the source grid (size, spacing, origin, direction).

    Args:
        mask: (x, y, z) or (1, x, y, z) {0, 1} array or tensor in reader axis order, on the source image's grid.
        affine: the source image's RAS affine, ``meta["affine"]`` from the reader (or after MONAI's `Invertd`).
        path: output file ending in ``.nii.gz`` or ``.nii``; its folder is created.
        reference: the input image file or series folder; writing onto it is refused.

    Raises:
        ValueError: when `mask` is not 3D and binary, `path` is not NIfTI, or the affine is bad (see `to_sitk`).
        InputError: when `path` is `reference` or a folder.
    """
    if not Path(path).name.lower().endswith((".nii.gz", ".nii")):
        raise ValueError(f"path must end with '.nii.gz' or '.nii' but is {str(path)!r}.")
    return write_image(_binary_mask(mask, 3), affine, path, reference=reference)


def write_png_mask(mask2d: Any, path: PathLike, *, reference: PathLike | None = None) -> Path:
    """Write a 2D binary mask as a {0, 255} uint8 PNG on the input image's pixel grid.

    Pixel (row, col) of the PNG is pixel (row, col) of the input image: the mask's x axis is the columns.

    Args:
        mask2d: (x, y) or (1, x, y) {0, 1} array or tensor in reader axis order.
        path: output file ending in ``.png``; its folder is created.
        reference: the input image; writing onto it is refused.

    Raises:
        ValueError: when `mask2d` is not 2D and binary or `path` is not a PNG.
        InputError: when `path` is `reference` or a folder.
    """
    path = _output_path(path, ".png")
    # A PNG keeps only the pixel grid, so the identity affine loses nothing.
    return write_image(_binary_mask(mask2d, 2, "mask2d") * np.uint8(255), np.eye(3), path, reference=reference)


def _spread_values(spread: Any, spatial_dims: int) -> np.ndarray:
    values = convert_to_numpy(spread).astype(np.float32)
    if values.ndim == spatial_dims + 1 and values.shape[0] == 1:
        values = values[0]
    if values.ndim != spatial_dims or not np.isfinite(values).all() or values.min() < 0 or values.max() > MAX_SPREAD:
        raise ValueError(f"spread must be a {spatial_dims}D map of standard deviations in [0, {MAX_SPREAD}] but has "
                         f"shape {values.shape}" + (f" and range [{values.min()}, {values.max()}]" if values.size else ""))
    return values


def write_spread_volume(spread: Any, affine: Any, path: PathLike, *, reference: PathLike | None = None) -> Path:
    """Write the TTA views' per-voxel standard deviation (float32 NIfTI, in [0, 0.5]) on the mask's grid.

    Raises:
        ValueError: when `spread` is not a 3D map of values in [0, 0.5] or `path` is not NIfTI.
        InputError: when `path` is `reference` or a folder.
    """
    if not Path(path).name.lower().endswith((".nii.gz", ".nii")):
        raise ValueError(f"path must end with '.nii.gz' or '.nii' but is {str(path)!r}.")
    return write_image(_spread_values(spread, 3), affine, path, reference=reference)


def write_spread_png(spread2d: Any, path: PathLike, *, reference: PathLike | None = None) -> Path:
    """Write a 2D image's per-pixel TTA standard deviation as a grey PNG on its pixel grid: 0 (the views agree) to
    255 (the largest possible disagreement, 0.5), linear, so ``value / 510`` gives it back to within 0.001.

    Raises:
        ValueError: when `spread2d` is not a 2D map of values in [0, 0.5] or `path` is not a PNG.
        InputError: when `path` is `reference` or a folder.
    """
    path = _output_path(path, ".png")
    grey = np.rint(_spread_values(spread2d, 2) / MAX_SPREAD * 255.0).astype(np.uint8)
    return write_image(grey, np.eye(3), path, reference=reference)


def _shown_channel(image: Any, channel: int | None) -> np.ndarray:
    """The (x, y[, z]) channel of a channel-first image that an overlay shows in grey: ``channel``, or FLAIR (1) of a
    3-channel (t1, flair, t1c) image, else 0.

    Raises:
        ValueError: for an image that is not (C, x, y[, z]), or a ``channel`` it does not have.
    """
    pixels = convert_to_numpy(image)
    if pixels.ndim not in (3, 4):
        raise ValueError(f"image must be channel-first (C, x, y[, z]) but has shape {pixels.shape}.")
    if channel is None:
        channel = _FLAIR_CHANNEL if pixels.shape[0] == 3 else 0
    if not isinstance(channel, (int, np.integer)) or isinstance(channel, bool) or not 0 <= channel < pixels.shape[0]:
        raise ValueError(f"channel must be an integer in [0, {pixels.shape[0]}) but is {channel!r}.")
    return pixels[channel]


def spread_from_png(grey: Any) -> np.ndarray:
    """The standard deviations a ``<stem>_unc.png`` holds, from its grey levels (the inverse of `write_spread_png`)."""
    return convert_to_numpy(grey).astype(np.float32) / 255.0 * MAX_SPREAD


def write_uncertainty_png(image: Any, spread: Any, mask: Any, path: PathLike, *, channel: int | None = None) -> Path:
    """Write an RGB PNG of where the model is unsure: the views' standard deviation from transparent to yellow over
    one grey image channel, the mask outlined in red, at the slice `write_overlay_png` shows.

    Args:
        image: (C, x, y[, z]) channel-first array or tensor in reader axis order.
        spread: (x, y[, z]) standard deviations in [0, 0.5] on the image grid.
        mask: (x, y[, z]) {0, 1} predicted mask on the image grid.
        path: output file ending in ``.png``; its folder is created.
        channel: image channel shown in grey, as for `write_overlay_png`.

    Raises:
        ValueError: for shapes that do not match, a non-binary mask, values outside [0, 0.5] or a bad `channel`.
        InputError: when `path` is a folder.
    """
    path = _output_path(path, ".png")
    plane = _shown_channel(image, channel)
    spatial_dims = plane.ndim
    predicted, values = _binary_mask(mask, spatial_dims), _spread_values(spread, spatial_dims)
    if predicted.shape != plane.shape or values.shape != plane.shape:
        raise ValueError(f"mask {predicted.shape} and spread {values.shape} must have the image's spatial shape "
                         f"{plane.shape}.")
    if spatial_dims == 3:
        k = _most_tumour_slice(predicted)
        plane, predicted, values = plane[..., k], predicted[..., k], values[..., k]
    rgb = np.repeat(grey_window(plane)[..., None] * 255.0, 3, axis=-1)
    weight = (values / MAX_SPREAD)[..., None]  # 0: grey as it is; 1: pure yellow
    rgb = np.rint((1.0 - weight) * rgb + weight * _YELLOW).astype(np.uint8)
    rgb[find_boundaries(predicted.astype(bool), mode="inner")] = _RED.astype(np.uint8)
    return write_image(np.moveaxis(rgb, -1, 0), np.eye(3), path)


def overlay_slice(mask: Any) -> int | None:
    """The z index `write_overlay_png` shows for a (x, y, z) mask: most mask voxels, else the middle slice.

    Returns None for a 2D (x, y) mask. A leading singleton channel is allowed.
    """
    values = convert_to_numpy(mask)
    if values.ndim in (3, 4) and values.shape[0] == 1:
        values = values[0]
    if values.ndim == 2:
        return None
    if values.ndim != 3:
        raise ValueError(
            f"mask must be (x, y) or (x, y, z), optionally after one channel, but has shape {values.shape}."
        )
    return _most_tumour_slice(values)


def _most_tumour_slice(volume: np.ndarray) -> int:
    per_slice = np.count_nonzero(volume, axis=(0, 1))
    return int(np.argmax(per_slice)) if per_slice.any() else volume.shape[2] // 2


def grey_window(plane: Any) -> np.ndarray:
    """A plane as the overlays show it in grey: scaled to [0, 1] between its 1st and 99th percentiles (robust to
    bright outliers), all 0 when those are equal."""
    plane = np.asarray(plane, dtype=np.float64)
    low, high = np.percentile(plane, [1.0, 99.0])
    if high <= low:
        return np.zeros_like(plane)
    return np.clip((plane - low) / (high - low), 0.0, 1.0)


def write_overlay_png(
    image: Any,
    mask: Any,
    path: PathLike,
    *,
    truth: Any | None = None,
    channel: int | None = None,
    opacity: float = 0.5,
) -> Path:
    """Write an RGB PNG of the mask in red over one grey image channel, the truth (when given) outlined in green.

    A volume is shown at the slice `overlay_slice` picks (logged). The PNG shows the array's (x, y) plane with
    rows = y and columns = x, which for DICOM and ITK-ordered images is the radiological view of an axial slice.

    Args:
        image: (C, x, y[, z]) channel-first array or tensor in reader axis order.
        mask: (x, y[, z]) or (1, x, y[, z]) {0, 1} predicted mask on the image grid.
        path: output file ending in ``.png``; its folder is created.
        truth: optional reference mask of the same shape as `mask`.
        channel: image channel shown in grey; None for FLAIR (1) of a 3-channel (t1, flair, t1c) image, else 0.
        opacity: weight of the red over the grey in (0, 1].

    Raises:
        ValueError: for shapes that do not match, a non-binary mask or truth, a bad `channel` or `opacity`.
        InputError: when `path` is a folder.
    """
    path = _output_path(path, ".png")
    plane = _shown_channel(image, channel)
    spatial_dims = plane.ndim
    if not 0.0 < opacity <= 1.0:
        raise ValueError(f"opacity must be in (0, 1] but is {opacity!r}.")
    predicted = _binary_mask(mask, spatial_dims)
    if predicted.shape != plane.shape:
        raise ValueError(f"mask has shape {predicted.shape} but the image's spatial shape is {plane.shape}.")
    reference = None if truth is None else _binary_mask(truth, spatial_dims, "truth")
    if reference is not None and reference.shape != predicted.shape:
        raise ValueError(f"truth has shape {reference.shape} but mask has shape {predicted.shape}.")
    if spatial_dims == 3:
        k = _most_tumour_slice(predicted)
        logger.info("overlay %s shows slice z=%d of %d", path, k, predicted.shape[2])
        plane, predicted = plane[..., k], predicted[..., k]
        reference = None if reference is None else reference[..., k]
    rgb = np.repeat(grey_window(plane)[..., None] * 255.0, 3, axis=-1)
    inside = predicted.astype(bool)
    rgb[inside] = (1.0 - opacity) * rgb[inside] + opacity * _RED
    rgb = np.rint(rgb).astype(np.uint8)
    if reference is not None:
        rgb[find_boundaries(reference.astype(bool), mode="inner")] = _GREEN
    # (x, y, 3) -> channel-first (3, x, y), the layout write_image takes for an RGB image.
    return write_image(np.moveaxis(rgb, -1, 0), np.eye(3), path)


def _is_date(text: str) -> bool:
    """Whether `text` is one DICOM DA value (YYYYMMDD) naming a real calendar day."""
    if not _DATE.fullmatch(text):
        return False
    try:
        datetime.datetime.strptime(text, "%Y%m%d")
    except ValueError:
        return False
    return True


def _content_date_time(source: pydicom.Dataset) -> tuple[str | None, str | None]:
    """ContentDate/Time for the SEG from the source (first valid date with its time, else midnight), or (None, None)."""
    for date_keyword, time_keyword in _SOURCE_DATES:
        date = str(source.get(date_keyword) or "").strip()
        if _is_date(date):
            time = str(source.get(time_keyword) or "").strip()
            return date, time if _TIME.fullmatch(time) else "000000"
    return None, None


def _text(value: Any) -> str:
    """An attribute's value as the text DICOM stores (values joined by backslashes)."""
    if isinstance(value, (MultiValue, list, tuple)):
        return "\\".join(str(v) for v in value)
    return "" if value is None else str(value).strip()


def _value_problem(value: Any, vr: str, allowed: tuple[str, ...]) -> str | None:
    """Why `value` is not a valid single value of `vr` (and one of `allowed` when given), or None when it is."""
    if isinstance(value, (MultiValue, list, tuple)):
        return f"holds {len(value)} values where one is allowed"
    text = _text(value)
    if allowed:
        return None if text in allowed else f"is not {'/'.join(allowed)}"
    if vr == "DA":
        return None if _is_date(text) else "is not a date (YYYYMMDD)"
    if vr == "TM":
        return None if _TIME.fullmatch(text) else "is not a time (HHMMSS.FFFFFF)"
    if _CONTROL.search(text):
        return "holds control characters"
    limit = _MAX_CHARACTERS[vr]
    if vr == "PN":
        groups = text.split("=")
        if len(groups) > 3:
            return f"has {len(groups)} component groups where at most 3 are allowed"
        if any(len(group.split("^")) > 5 for group in groups):
            return "has more than the 5 name components allowed"
        return f"has a component group longer than {limit} characters" if max(map(len, groups)) > limit else None
    return f"is longer than the {limit} characters {vr} allows" if len(text) > limit else None


def _sanitise_patient_study(source: pydicom.Dataset) -> list[str]:
    """Make the patient and study attributes that the SEG copies from `source` valid, in place; say what changed.

    highdicom copies them verbatim and refuses some invalid ones (PatientSex '0000', a bad date), while others
    would make an invalid SEG (an over-long StudyID). Invalid type 2 values become empty and invalid type 3 ones
    are left out, as the standard allows. Missing type 2 attributes are added empty, since highdicom needs them.
    A valid one-component person name gets a trailing caret ('Doe' -> 'Doe^', the same name in PS3.5 6.2.1.2), the
    unambiguous form that highdicom asks for with a UserWarning on every SEG otherwise. Only coded values (such as
    PatientSex) are quoted in the messages: names, IDs and dates are identifying and stay out of summary files.
    """
    changes = []
    for keyword, vr, type_2, allowed in _COPIED_ATTRIBUTES:
        if keyword not in source:
            if type_2:
                setattr(source, keyword, "")
            continue
        value = source[keyword].value
        if _text(value) == "":
            continue
        problem = _value_problem(value, vr, allowed)
        if problem is None:
            name = _text(value)
            if vr == "PN" and "^" not in name:
                setattr(source, keyword, name.replace("=", "^=", 1) if "=" in name else f"{name}^")
            continue
        quoted = f" {_text(value)!r}" if vr == "CS" else ""
        if type_2:
            setattr(source, keyword, "")
            changes.append(f"{keyword}{quoted} {problem}: left empty")
        else:
            delattr(source, keyword)
            changes.append(f"{keyword}{quoted} {problem}: left out")
    return changes


def _source_character_set(source: pydicom.Dataset) -> tuple[Any, list[str]]:
    """The SpecificCharacterSet for the SEG: the source's when highdicom accepts it, else UTF-8 (ISO_IR 192).

    pydicom has already decoded the source's text (guessing at misspelt terms), so any character set that can
    hold that text is correct for the SEG; UTF-8 holds all of it.
    """
    value = source.get("SpecificCharacterSet")
    if value is None:
        return None, []
    try:
        _check_specific_character_set(value)
    except (ValueError, TypeError):
        return _UTF8, [f"SpecificCharacterSet {_text(value)!r} is not a DICOM character set: the SEG uses {_UTF8}"]
    return value, []


def _fits_character_set(seg: pydicom.Dataset) -> bool:
    """Whether the SEG's SpecificCharacterSet (one term, or none: ASCII) can encode all of its text.

    Multi-valued (ISO 2022) sets came from the source, which highdicom accepted, and hold its text by
    construction, so they are not checked.
    """
    value = seg.get("SpecificCharacterSet")
    encoding = "ascii" if value is None else python_encoding.get(value) if isinstance(value, str) else None
    if encoding is None:
        return True
    fits = True

    def check(_: pydicom.Dataset, element: pydicom.DataElement) -> None:
        nonlocal fits
        if element.VR in _TEXT_VRS and element.value is not None:
            try:
                _text(element.value).encode(encoding)
            except UnicodeEncodeError:
                fits = False

    seg.walk(check)
    return fits


def _slice_distances(sources: Sequence[pydicom.Dataset]) -> np.ndarray | None:
    """Each source slice's position along the normal of the first slice's plane (mm), or None without geometry."""
    if any("ImagePositionPatient" not in s for s in sources) or "ImageOrientationPatient" not in sources[0]:
        return None  # highdicom decides whether a SEG without plane positions can be written
    orientation = np.array([float(v) for v in sources[0].ImageOrientationPatient])
    normal = np.cross(orientation[:3], orientation[3:])
    return np.array([[float(v) for v in s.ImagePositionPatient] for s in sources]) @ normal


def _first_at_each_position(distances: np.ndarray | None, values: np.ndarray) -> tuple[list[int], list[str]]:
    """Indices of the slices kept in the SEG: the first at each position, since frames must not share one."""
    if distances is None:
        return list(range(values.shape[2])), []
    seen: set[int] = set()
    kept, repeated = [], []
    for k, distance in enumerate(distances):
        key = int(round(distance / _SLICE_TOLERANCE_MM))
        (repeated if key in seen else kept).append(k)
        seen.add(key)
    if not repeated:
        return kept, []
    lost = int(np.count_nonzero(values[..., repeated]))
    return kept, [
        f"slices z={', '.join(map(str, repeated))} repeat an earlier slice's position: left out of the SEG "
        f"({lost} mask voxels on them)"
    ]


def _sanitise_slice_measures(first: pydicom.Dataset, distances: np.ndarray | None) -> list[str]:
    """Make the slice measures that highdicom copies from `first` into the SEG's Pixel Measures valid, in place.

    SliceThickness is required there (type 1C) and highdicom reads it from the first source slice; when that has
    no valid one, the distance between adjacent slices stands in for it. An invalid SpacingBetweenSlices (type 3) is
    not copied; highdicom then states the measured spacing where the slices are evenly spaced.

    Raises:
        SegNotWritten: when there is no valid SliceThickness and no second slice position to measure one.
    """
    changes = []
    given = first.get("SliceThickness")
    if _positive(given) is None:
        steps = None if distances is None else np.diff(np.unique(np.round(distances / _SLICE_TOLERANCE_MM)))
        if steps is None or steps.size == 0:
            raise SegNotWritten(
                "the source has no valid SliceThickness and no second slice position to measure the slice spacing"
            )
        thickness = DS(float(np.median(steps)) * _SLICE_TOLERANCE_MM, auto_format=True)
        stated = "is missing" if given in (None, "") else f"{_text(given)!r} is not a positive number"
        changes.append(f"SliceThickness {stated} in the source: the SEG gives the slice spacing, {thickness} mm")
        first.SliceThickness = thickness
    spacing = first.get("SpacingBetweenSlices")
    if spacing not in (None, "") and _positive(spacing) is None:
        changes.append(f"SpacingBetweenSlices {_text(spacing)!r} is not a positive number: not copied")
        del first.SpacingBetweenSlices
    return changes


def _positive(value: Any) -> float | None:
    """`value` as a positive finite number, or None when it is missing, not one number or not positive."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) and number > 0 else None


def _optional_patient_study_keywords(sop_class_uid: str) -> set[str]:
    """Patient- and study-level attributes that the SEG IOD does not require (user-optional modules, type 3)."""
    # highdicom copies whole Patient/Study modules from the source; its tables of the standard say what is optional.
    modules = get_iod_module_map()[get_sop_class_iod_map()[sop_class_uid]]
    attributes = get_module_attribute_map()
    optional = {
        item["keyword"]
        for module in modules
        if module["ie"] in ("Patient", "Study")
        for item in attributes[module["key"]]
        if not item["path"] and (module["usage"] == "U" or item["type"] == "3")
    }
    return optional - _KEPT_OPTIONAL_PATIENT_ATTRIBUTES


def _make_reproducible(seg: hd.seg.Segmentation, sop_uid: str) -> None:
    """Replace what highdicom takes from the clock or a random source, and drop what the standard does not need."""
    for keyword in ("InstanceCreationDate", "InstanceCreationTime"):  # type 3, stamped with the clock
        if keyword in seg:
            delattr(seg, keyword)
    organisation = generate_uid(entropy_srcs=[sop_uid, "DimensionOrganizationUID"])
    for item in [*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence]:
        item.DimensionOrganizationUID = organisation
    # Keep highdicom's own processing-equipment item without its clock stamp; drop the copy of the source's
    # acquisition equipment (institution name and address, station), which the standard does not need.
    processing = codes.DCM.ProcessingEquipment.value
    kept = []
    for item in seg.get("ContributingEquipmentSequence", []):
        if item.PurposeOfReferenceCodeSequence[0].CodeValue == processing:
            if "ContributionDateTime" in item:
                del item.ContributionDateTime
            kept.append(item)
    seg.ContributingEquipmentSequence = kept
    for keyword in _optional_patient_study_keywords(seg.SOPClassUID):
        if keyword in seg:
            delattr(seg, keyword)


def write_dicom_seg(
    mask: Any,
    series_files: Sequence[PathLike],
    path: PathLike,
    *,
    algorithm_name: str = "brainseg-monai",
    algorithm_version: str = __version__,
    segment_label: str = "tumour",
) -> list[str]:
    """Write a binary DICOM SEG (one segment, AUTOMATIC algorithm) referencing the source series' instances.

    The z index k of `mask` is the slice of ``series_files[k]``; its frame has rows = y and columns = x, so any
    orientation (oblique included) and pixel type of the source map one to one. Frames without mask are omitted
    (an empty mask keeps every frame, since a SEG needs at least one). The output is reproducible byte for byte:
    UIDs are derived from the source series, the algorithm and the mask; ContentDate/Time come from the source;
    highdicom's clock stamps are removed. Patient and study attributes are only those the SEG IOD requires,
    copied from the first source file.

    Invalid source values do not stop the SEG, whose patient and study attributes must be valid: they are
    sanitised on the datasets read into memory (the source files are never changed) and each change is returned:
    invalid type 2 values (PatientSex '0000', a bad date, an over-long StudyID) are emptied, invalid optional ones
    left out, an unknown SpecificCharacterSet becomes ISO_IR 192 (UTF-8), a missing SliceThickness becomes the
    slice spacing, and slices repeating an earlier slice's position are left out (a SEG's frames cannot share one).

    Contract with the caller: the returned warnings go to the case's ``warnings`` in summary.csv; on
    `SegNotWritten` the case stays ``ok`` with the warning ``SEG not written: <reason>`` (the mask is not lost).

    Args:
        mask: (x, y, z) or (1, x, y, z) {0, 1} array or tensor in reader axis order, as SimpleITK's
            `ImageSeriesReader` read `series_files`.
        series_files: the series' single-frame files in the order GDCM sorted them (``DicomSeries.files``).
        path: output file ending in ``.dcm``; its folder is created. Written atomically: nothing is left there
            when the SEG cannot be written.
        algorithm_name: AlgorithmName and ManufacturerModelName.
        algorithm_version: AlgorithmVersion and SoftwareVersions.
        segment_label: SegmentLabel of the one segment.

    Returns:
        One line per source value that was emptied, left out or filled in, e.g.
        ``"PatientSex '0000' is not M/F/O: left empty"``; empty when the source was valid.

    Raises:
        ValueError: when `mask` is not 3D and binary, its shape is not (Columns, Rows, number of files), or an
            argument is empty or not a string.
        InputError: when a file cannot be read as DICOM, or `path` is one of `series_files` or a folder.
        SegNotWritten: when no valid SEG can be built from the series (e.g. it has no Frame of Reference, or
            lacks what a SEG must reference); its message is the reason, on one line.
    """
    path = _output_path(path, ".dcm")
    for name, value in (
        ("algorithm_name", algorithm_name),
        ("algorithm_version", algorithm_version),
        ("segment_label", segment_label),
    ):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{name} must be a non-empty string but is {value!r}.")
    if isinstance(series_files, (str, os.PathLike)) or len(series_files) == 0:
        raise ValueError(f"series_files must be a non-empty sequence of DICOM files but is {series_files!r}.")
    files = [Path(f) for f in series_files]
    for source_file in files:
        if source_file.exists() and path.exists() and os.path.samefile(source_file, path):
            raise InputError(path, f"refusing to overwrite a source DICOM file of the series ({source_file})")
    values = _binary_mask(mask, 3)
    sources = []
    for source_file in files:
        try:
            sources.append(pydicom.dcmread(source_file, stop_before_pixels=True))
        except (OSError, pydicom.errors.InvalidDicomError) as error:
            raise InputError(source_file, f"cannot read the source DICOM file ({error})") from error
    first = sources[0]
    needed = ("SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns")
    missing = [keyword for keyword in needed if not first.get(keyword)]
    if missing:
        raise SegNotWritten(f"the source file {files[0]} has no {', '.join(missing)}, which a SEG needs")
    expected = (int(first.Columns), int(first.Rows), len(files))
    if values.shape != expected:
        raise ValueError(
            f"mask must have shape (Columns, Rows, number of files) = {expected} for this series but has shape "
            f"{values.shape}."
        )
    try:
        encoded, changes = _encode_seg(values, sources, path, algorithm_name, algorithm_version, segment_label)
    except SegNotWritten:
        raise
    except Exception as error:  # whatever highdicom or pydicom refuse, the mask (written elsewhere) must survive
        message = " ".join(str(error).split()) or "no details given"
        raise SegNotWritten(f"cannot build a SEG from this series ({type(error).__name__}: {message})") from error
    write_atomic(path, lambda temporary: temporary.write_bytes(encoded))
    return changes


def _encode_seg(
    values: np.ndarray,
    sources: list[pydicom.Dataset],
    path: Path,
    algorithm_name: str,
    algorithm_version: str,
    segment_label: str,
) -> tuple[bytes, list[str]]:
    """The SEG of `write_dicom_seg` as DICOM file bytes, and what was changed from the source to build it.

    Sanitises `sources` in place (datasets in memory); highdicom and pydicom errors propagate to the caller.
    """
    first = sources[0]
    changes = _sanitise_patient_study(first)
    character_set, character_set_changes = _source_character_set(first)
    changes += character_set_changes
    distances = _slice_distances(sources)
    kept, position_changes = _first_at_each_position(distances, values)
    changes += position_changes
    changes += _sanitise_slice_measures(first, None if distances is None else distances[kept])
    values = values[..., kept]
    # One SEG series per source series, algorithm and label; one instance per mask: re-runs give the same UIDs.
    series_uid = generate_uid(
        entropy_srcs=[
            "brainseg-monai SEG", str(first.SeriesInstanceUID), algorithm_name, algorithm_version, segment_label
        ]
    )
    sop_uid = generate_uid(entropy_srcs=[series_uid, hashlib.sha256(values.tobytes()).hexdigest()])
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=segment_label,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=algorithm_name, family=codes.cid7162.ArtificialIntelligence, version=algorithm_version
        ),
    )
    content_date, content_time = _content_date_time(first)
    if content_date is None:
        logger.warning("%s: the source series has no date; the SEG's ContentDate/Time is now (not reproducible)", path)
    seg = hd.seg.Segmentation(
        source_images=[sources[k] for k in kept],
        pixel_array=np.ascontiguousarray(values.transpose(2, 1, 0)),  # (x, y, z) -> frames (z, rows=y, cols=x)
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=series_uid,
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer="brainseg-monai",
        manufacturer_model_name=algorithm_name,
        software_versions=algorithm_version,
        device_serial_number="1",
        series_description=f"{algorithm_name} {segment_label} segmentation"[:64],
        omit_empty_frames=bool(values.any()),
        content_date=content_date,
        content_time=content_time,
        specific_character_set=character_set,
    )
    _make_reproducible(seg, sop_uid)
    if not _fits_character_set(seg):
        stated = repr(_text(seg.SpecificCharacterSet)) if "SpecificCharacterSet" in seg else "(none: ASCII)"
        changes.append(f"the SEG's text does not fit the source's SpecificCharacterSet {stated}: the SEG uses {_UTF8}")
        seg.SpecificCharacterSet = _UTF8
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, seg, enforce_file_format=True)
    return buffer.getvalue(), changes
