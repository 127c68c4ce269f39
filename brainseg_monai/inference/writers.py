"""Per-case outputs of inference: the mask in the source geometry (NIfTI, PNG), an overlay PNG and a DICOM SEG.

Masks arrive in reader axis order (x, y[, z]) with the reader's RAS affine, so `brainseg_monai.io.write_image`
puts them back on the source grid. Every file is written to a temporary name in its folder and moved into place,
and a writer refuses to write onto the input it came from.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from highdicom._standard_utils import get_iod_module_map, get_module_attribute_map, get_sop_class_iod_map
from monai.config import PathLike
from monai.utils.type_conversion import convert_to_numpy
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from skimage.segmentation import find_boundaries

from brainseg_monai import __version__
from brainseg_monai.errors import InputError
from brainseg_monai.io import write_image

__all__ = [
    "SEG_SERIES_NUMBER",
    "overlay_slice",
    "write_dicom_seg",
    "write_overlay_png",
    "write_png_mask",
    "write_volume_mask",
]

logger = logging.getLogger(__name__)

SEG_SERIES_NUMBER = 1000
"""SeriesNumber of the DICOM SEG series (fixed, so re-running a case gives the same bytes)."""

_RED = np.array([255.0, 0.0, 0.0])
_GREEN = np.array([0, 255, 0], dtype=np.uint8)
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


def _binary_mask(mask: Any, spatial_dims: int, name: str = "mask") -> np.ndarray:
    """`mask` as a uint8 {0, 1} array with `spatial_dims` axes; a leading singleton channel is dropped."""
    values = convert_to_numpy(mask)
    if values.ndim == spatial_dims + 1 and values.shape[0] == 1:
        values = values[0]
    if values.ndim != spatial_dims:
        raise ValueError(
            f"{name} must have {spatial_dims} spatial axes (optionally after one channel) but has shape {values.shape}."
        )
    if values.dtype != bool and not np.isin(values, (0, 1)).all():
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


def _grey(plane: np.ndarray) -> np.ndarray:
    """A (x, y) plane scaled to [0, 255] between its 1st and 99th percentiles (robust to bright outliers)."""
    plane = plane.astype(np.float64)
    low, high = np.percentile(plane, [1.0, 99.0])
    if high <= low:
        return np.zeros_like(plane)
    return np.clip((plane - low) / (high - low), 0.0, 1.0) * 255.0


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
    pixels = convert_to_numpy(image)
    if pixels.ndim not in (3, 4):
        raise ValueError(f"image must be channel-first (C, x, y[, z]) but has shape {pixels.shape}.")
    spatial_dims = pixels.ndim - 1
    if channel is None:
        channel = _FLAIR_CHANNEL if pixels.shape[0] == 3 else 0
    if not isinstance(channel, (int, np.integer)) or isinstance(channel, bool) or not 0 <= channel < pixels.shape[0]:
        raise ValueError(f"channel must be an integer in [0, {pixels.shape[0]}) but is {channel!r}.")
    if not 0.0 < opacity <= 1.0:
        raise ValueError(f"opacity must be in (0, 1] but is {opacity!r}.")
    predicted = _binary_mask(mask, spatial_dims)
    if predicted.shape != pixels.shape[1:]:
        raise ValueError(f"mask has shape {predicted.shape} but the image's spatial shape is {pixels.shape[1:]}.")
    reference = None if truth is None else _binary_mask(truth, spatial_dims, "truth")
    if reference is not None and reference.shape != predicted.shape:
        raise ValueError(f"truth has shape {reference.shape} but mask has shape {predicted.shape}.")
    plane = pixels[channel]
    if spatial_dims == 3:
        k = _most_tumour_slice(predicted)
        logger.info("overlay %s shows slice z=%d of %d", path, k, predicted.shape[2])
        plane, predicted = plane[..., k], predicted[..., k]
        reference = None if reference is None else reference[..., k]
    rgb = np.repeat(_grey(plane)[..., None], 3, axis=-1)
    inside = predicted.astype(bool)
    rgb[inside] = (1.0 - opacity) * rgb[inside] + opacity * _RED
    rgb = np.rint(rgb).astype(np.uint8)
    if reference is not None:
        rgb[find_boundaries(reference.astype(bool), mode="inner")] = _GREEN
    # (x, y, 3) -> channel-first (3, x, y), the layout write_image takes for an RGB image.
    return write_image(np.moveaxis(rgb, -1, 0), np.eye(3), path)


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(temporary)`` on a temporary name in `path`'s folder, then move it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _content_date_time(source: pydicom.Dataset) -> tuple[str | None, str | None]:
    """ContentDate/Time for the SEG from the source (first date with its time, else midnight), or (None, None)."""
    for date_keyword, time_keyword in _SOURCE_DATES:
        date = str(source.get(date_keyword) or "").strip()
        if date:
            return date, str(source.get(time_keyword) or "").strip() or "000000"
    return None, None


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
) -> Path:
    """Write a binary DICOM SEG (one segment, AUTOMATIC algorithm) referencing the source series' instances.

    The z index k of `mask` is the slice of ``series_files[k]``; its frame has rows = y and columns = x, so any
    orientation (oblique included) and pixel type of the source map one to one. Frames without mask are omitted
    (an empty mask keeps every frame, since a SEG needs at least one). The output is reproducible byte for byte:
    UIDs are derived from the source series, the algorithm and the mask; ContentDate/Time come from the source;
    highdicom's clock stamps are removed. Patient and study attributes are only those the SEG IOD requires,
    copied from the source.

    Args:
        mask: (x, y, z) or (1, x, y, z) {0, 1} array or tensor in reader axis order, as SimpleITK's
            `ImageSeriesReader` read `series_files`.
        series_files: the series' single-frame files in the order GDCM sorted them (``DicomSeries.files``).
        path: output file ending in ``.dcm``; its folder is created.
        algorithm_name: AlgorithmName and ManufacturerModelName.
        algorithm_version: AlgorithmVersion and SoftwareVersions.
        segment_label: SegmentLabel of the one segment.

    Raises:
        ValueError: when `mask` is not 3D and binary, its shape is not (Columns, Rows, number of files), or an
            argument is empty or not a string.
        InputError: when a file cannot be read as DICOM, or `path` is one of `series_files` or a folder.
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
    expected = (int(first.Columns), int(first.Rows), len(files))
    if values.shape != expected:
        raise ValueError(
            f"mask must have shape (Columns, Rows, number of files) = {expected} for this series but has shape "
            f"{values.shape}."
        )
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
        source_images=sources,
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
    )
    _make_reproducible(seg, sop_uid)
    _atomic_write(path, lambda temporary: pydicom.dcmwrite(temporary, seg, enforce_file_format=True))
    return path
