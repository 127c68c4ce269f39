"""The project's one read path: SimpleITK opens every file (2D images, NIfTI, MHA/NRRD, DICOM files and series).

`SimpleITKReader` is a `monai.data.ImageReader` that returns what MONAI's `ITKReader` returns (same axis order,
same RAS affine), so MONAI transforms and `Invertd` work unchanged; `write_image` is its inverse. Only four safe
DICOM tags ever reach the metadata (`SAFE_DICOM_TAGS`): never patient name, ID or birth date.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import SimpleITK as sitk
from PIL import Image as PILImage
from monai.config import PathLike
from monai.data.image_reader import ImageReader, _copy_compatible_dict, _stack_images
from monai.data.utils import orientation_ras_lps
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple
from monai.utils.type_conversion import convert_to_numpy

from brainseg_monai.errors import InputError

__all__ = [
    "READ_SUFFIXES",
    "WRITE_SUFFIXES",
    "SAFE_DICOM_TAGS",
    "DicomSeries",
    "ImageHeader",
    "SimpleITKReader",
    "check_image_values",
    "find_dicom_series",
    "read_header",
    "read_sitk",
    "select_series",
    "to_sitk",
    "write_image",
]

logger = logging.getLogger(__name__)

READ_SUFFIXES = (
    ".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr",
    ".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp",
    ".dcm", ".dicom", ".ima",
)  # fmt: skip
"""Suffixes read as single files; a DICOM file may also carry any other suffix (recognised by its DICM preamble)."""

WRITE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd", ".png", ".tif", ".tiff")
"""Suffixes `write_image` writes (single-file formats only, so the write can be atomic)."""

_PLAIN_2D_SUFFIXES = (".png", ".tif", ".tiff")
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")

SAFE_DICOM_TAGS = {
    "Modality": "0008|0060",
    "SeriesDescription": "0008|103e",
    "SeriesInstanceUID": "0020|000e",
    "StudyInstanceUID": "0020|000d",
}
"""The only DICOM tags copied into metadata (name -> SimpleITK key); nothing that identifies the patient."""

_FILENAME_KEY = "filename_or_obj"

SERIES_HEADER_TAGS = (
    "PatientID", "StudyInstanceUID", "SeriesNumber", "SeriesDate", "SeriesTime", "AcquisitionTime", "ProtocolName",
    "SequenceName", "ImageType", "ScanningSequence", "SequenceVariant", "ScanOptions", "MRAcquisitionType",
    "RepetitionTime", "EchoTime", "InversionTime", "FlipAngle", "ContrastBolusAgent", "ContrastBolusRoute",
    "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "Rows", "Columns", "NumberOfFrames", "SOPClassUID",
    "Manufacturer", "MagneticFieldStrength", "DiffusionBValue",
)  # fmt: skip
"""Header attributes kept per series in `DicomSeries.header` (nothing that names the patient besides PatientID,
which groups series into studies and is never written to outputs)."""


@dataclass
class DicomSeries:
    """One DICOM series found in a folder; `files` are in slice order as GDCM sorts them.

    `broken` lists DICOM files of the folder that GDCM had to leave out (truncated or corrupt) and that belong to
    this series or cannot be attributed: reading the series would silently miss slices, so `read_sitk` refuses it.
    """

    series_uid: str
    description: str
    modality: str
    study_uid: str
    folder: Path
    files: list[str]
    broken: list[str] = field(default_factory=list)
    header: dict[str, Any] = field(default_factory=dict)
    """What the first file's header says about the acquisition (`SERIES_HEADER_TAGS`): sequence identification,
    series selection and grouping into studies read it; plain values (str, float, list of str), missing ones absent."""

    @property
    def patient_id(self) -> str:
        return str(self.header.get("PatientID", ""))

    def summary(self) -> str:
        """One line for error messages and logs: UID, description, modality, number of files."""
        return f"{self.series_uid} '{self.description}' {self.modality or '?'} ({len(self.files)} files)"


@dataclass
class ImageHeader:
    """Geometry and pixel type of an image as SimpleITK would load it, read without the pixels.

    `size`, `spacing`, `origin` are in ITK index order (x, y[, z]); `direction` is the row-major LPS direction
    matrix; `pixel_type` is the numpy dtype name of one component (e.g. ``"uint8"``, ``"float64"``).
    """

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    components: int
    pixel_type: str


def file_stem(path: PathLike) -> str:
    """The file name without its known image suffix (``a.nii.gz`` -> ``a``): the rule ``brainseg infer`` names its
    outputs by and ``brainseg evaluate`` finds them by."""
    name = Path(path).name
    known = _suffix(name)
    return name[: -len(known)] if known in READ_SUFFIXES else Path(name).stem


def _suffix(path: PathLike) -> str:
    """The known suffix of `path` (``.nii.gz`` counts as one), or its last suffix when unknown."""
    name = Path(path).name.lower()
    for suffix in READ_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return Path(name).suffix


def _is_dicom_file(path: Path) -> bool:
    return _suffix(path) in _DICOM_SUFFIXES or pydicom.misc.is_dicom(path)


def _sitk_reason(error: RuntimeError) -> str:
    """The informative part of a SimpleITK/ITK exception, without source locations and object addresses."""
    text = re.sub(r"\s+", " ", str(error)).strip()
    for marker in ("ITK ERROR:", "sitk::ERROR:"):
        if marker in text:
            text = text.rsplit(marker, 1)[1].strip()
            break
    return re.sub(r"^\w+\(0x[0-9a-fA-F]+\):\s*", "", text)[:300]


def _check_complete(path: Path, suffix: str) -> None:
    """Refuse truncated NIfTI, JPEG and BMP files, which ITK reads without error (zero- or grey-filled)."""
    if suffix in (".nii", ".nii.gz"):
        found = path.stat().st_size if suffix == ".nii" else _gzip_length(path)
        try:
            data = nib.load(path).dataobj
        except Exception as error:  # nibabel raises many types for a damaged header
            raise InputError(path, f"not a valid NIfTI file ({error})") from error
        expected = int(data.offset) + int(np.prod(data.shape)) * np.dtype(data.dtype).itemsize
        if found < expected:
            raise InputError(path, f"truncated NIfTI file: {found} bytes (header and voxels), {expected} expected")
    elif suffix in (".jpg", ".jpeg", ".bmp"):
        try:
            with PILImage.open(path) as image:
                image.load()
        except (OSError, SyntaxError, ValueError) as error:  # Pillow's errors for damaged files
            raise InputError(path, f"corrupt or truncated image ({error})") from error


def _gzip_length(path: Path) -> int:
    """Decompressed length of a gzip file, streaming; a truncated or corrupt stream raises InputError."""
    decompressor = zlib.decompressobj(wbits=31)
    length = 0
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                length += len(decompressor.decompress(chunk))
    except zlib.error as error:
        raise InputError(path, f"corrupt gzip data ({error})") from error
    if not decompressor.eof:
        raise InputError(path, "truncated gzip file: the compressed stream ends early")
    return length


def _check_regular_file(path: Path) -> None:
    if not path.exists():
        raise InputError(path, "no such file or folder")
    if path.stat().st_size == 0:
        raise InputError(path, "file is empty (0 bytes)")


def _series_tags(reader: sitk.ImageFileReader) -> dict[str, str]:
    return {
        name: reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""
        for name, key in SAFE_DICOM_TAGS.items()
    }


def _file_information(path: PathLike) -> sitk.ImageFileReader:
    """An `ImageFileReader` with the header of `path` read (no pixels), errors turned into InputError."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise InputError(path, f"cannot read the image header ({_sitk_reason(error)})") from error
    return reader


def _series_in_folder(folder: Path) -> list[DicomSeries]:
    series = []
    for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)):
        files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
        if not files:
            continue
        tags = _series_tags(_file_information(files[0]))
        series.append(
            DicomSeries(
                series_uid=uid,
                description=tags["SeriesDescription"],
                modality=tags["Modality"],
                study_uid=tags["StudyInstanceUID"],
                folder=folder,
                files=files,
                header=series_header(files[0]),
            )
        )
    if series:
        _attach_broken_files(folder, series)
    return series


#: code strings that may hold several values: always a list in `DicomSeries.header`, even when one value is stored
_MULTI_VALUED_TAGS = {"ImageType", "ScanningSequence", "SequenceVariant", "ScanOptions"}


def _plain(value: Any) -> Any:
    """A pydicom element value as str, float or a list of str: JSON-safe, and the same whatever the VR's Python type."""
    if isinstance(value, pydicom.multival.MultiValue) or isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip(" \x00")
    return str(value).strip()


def series_header(path: PathLike) -> dict[str, Any]:
    """`SERIES_HEADER_TAGS` of one DICOM file as plain values; a tag missing or unparsable (an invalid number written
    by a scanner) is left out, so a damaged optional attribute never stops a series from being found."""
    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(SERIES_HEADER_TAGS))
    except Exception:  # pydicom raises many types for a damaged file; GDCM already accepted it as a slice
        return {}
    header: dict[str, Any] = {}
    for name in SERIES_HEADER_TAGS:
        try:
            value = dataset.get(name)
        except Exception:  # an element whose value does not parse as its VR
            continue
        if value is None or value == "":
            continue
        try:
            plain = _plain(value)
        except Exception:
            continue
        header[name] = [plain] if name in _MULTI_VALUED_TAGS and isinstance(plain, str) else plain
    return header


def _dicom_header(path: Path) -> pydicom.Dataset | None:
    """The header of a DICOM file without its pixels, or None when it cannot be parsed (truncated or corrupt)."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # pydicom raises many types for a damaged file; any of them means unreadable
        return None


def _is_image_header(header: pydicom.Dataset) -> bool:
    """False for DICOMDIR, structured reports, presentation states and other non-slice objects."""
    sop_class = header.get("SOPClassUID") or header.file_meta.get("MediaStorageSOPClassUID", "")
    return "Image Storage" in pydicom.uid.UID(str(sop_class)).name


def is_dicom_image_file(path: PathLike) -> bool:
    """Whether `path` is a DICOM image slice, or a DICOM file too damaged to tell (it may be one).

    DICOM by its preamble, or by its suffix when it is too short for one; DICOMDIR, reports and presentation states
    are not images.
    """
    path = Path(path)
    if not path.is_file() or not (_suffix(path) in _DICOM_SUFFIXES or pydicom.misc.is_dicom(path)):
        return False
    header = _dicom_header(path)
    return header is None or _is_image_header(header)


def _attach_broken_files(folder: Path, series: list[DicomSeries]) -> None:
    """Find image DICOM files GDCM skipped (it drops unreadable files silently) and attach them to their series."""
    grouped = {os.path.normpath(f) for s in series for f in s.files}
    for entry in sorted(folder.iterdir()):
        if not entry.is_file() or os.path.normpath(entry) in grouped or not pydicom.misc.is_dicom(entry):
            continue
        header = _dicom_header(entry)
        if header is not None and not _is_image_header(header):
            continue  # DICOMDIR, structured reports, presentation states: not slices
        uid = "" if header is None else str(header.get("SeriesInstanceUID", ""))
        # a damaged file may have lost or garbled its UID: then it may belong to any series of the folder
        owners = [s for s in series if s.series_uid == uid] or series
        for owner in owners:
            owner.broken.append(str(entry))
        logger.warning("%s: DICOM image file left out of its series, truncated or corrupt", entry)


def find_dicom_series(folder: PathLike, recursive: bool = False) -> list[DicomSeries]:
    """List the DICOM series in `folder` (and, with `recursive`, in every folder below it, sorted by path).

    GDCM groups files by SeriesInstanceUID and sorts each series' files in slice order; the tags are read from
    one file per series without its pixels, so this is fast on large trees. Non-DICOM files are ignored.

    Raises:
        InputError: when `folder` does not exist or is not a folder.
    """
    root = Path(folder)
    if not root.exists():
        raise InputError(root, "no such folder")
    if not root.is_dir():
        raise InputError(root, "not a folder (DICOM series are read from the folder that holds their files)")
    folders = [root]
    if recursive:
        folders = sorted(Path(dirpath) for dirpath, _, filenames in os.walk(root) if filenames)
    found: list[DicomSeries] = []
    for each in folders:
        found.extend(_series_in_folder(each))
    return found


def _listing(series: Sequence[DicomSeries]) -> str:
    return "; ".join(s.summary() for s in series)


def select_series(
    folder: PathLike, series_uid: str | None = None, series_description: str | None = None
) -> DicomSeries:
    """The one DICOM series in `folder`, or the one picked by `series_uid` and/or a `series_description` regex.

    The description pattern is matched with `re.search`, case-insensitive; when both are given both must match.

    Raises:
        InputError: when the folder is missing, empty or holds no DICOM series; when it holds several series and no
            choice is given; when the choice matches none or several (the message lists each series found).
    """
    root = Path(folder)
    series = find_dicom_series(root)
    if not series:
        entries = list(root.iterdir())
        if not entries:
            raise InputError(root, "folder is empty")
        subfolders = sorted(e.name for e in entries if e.is_dir())
        if subfolders and not any(e.is_file() for e in entries):
            raise InputError(
                root,
                f"no DICOM files directly in this folder; it holds subfolders {subfolders[:5]}: give one series folder",
            )
        raise InputError(root, f"no DICOM series found among its {len(entries)} entries")
    pattern = _compile_description(series_description)
    chosen = [
        s
        for s in series
        if (series_uid is None or s.series_uid == series_uid)
        and (pattern is None or pattern.search(s.description) is not None)
    ]
    if series_uid is None and pattern is None:
        if len(series) == 1:
            return _complete(root, series[0])
        raise InputError(
            root,
            f"holds {len(series)} DICOM series; choose one with series_uid or series_description: {_listing(series)}",
        )
    choice = ", ".join(
        f"{name}={value!r}"
        for name, value in (("series_uid", series_uid), ("series_description", series_description))
        if value is not None
    )
    if not chosen:
        raise InputError(root, f"no DICOM series matches {choice}; found: {_listing(series)}")
    if len(chosen) > 1:
        raise InputError(root, f"{len(chosen)} DICOM series match {choice}, one is needed: {_listing(chosen)}")
    return _complete(root, chosen[0])


def _complete(folder: Path, series: DicomSeries) -> DicomSeries:
    if series.broken:
        names = ", ".join(Path(f).name for f in series.broken[:5])
        reason = f"series {series.series_uid} has {len(series.broken)} unreadable DICOM file(s), corrupt or truncated"
        raise InputError(folder, f"{reason}: {names}")
    return series


def _compile_description(series_description: str | None) -> re.Pattern | None:
    if series_description is None:
        return None
    try:
        return re.compile(series_description, re.IGNORECASE)
    except re.error as error:
        raise ValueError(
            f"series_description must be a valid regular expression but is {series_description!r}: {error}"
        ) from error


def _dtype_name(pixel_id: int) -> str:
    # SimpleITK exposes no pixel-ID -> numpy map; a 1x1 image of that type gives numpy's own answer.
    return sitk.GetArrayViewFromImage(sitk.Image([1, 1], pixel_id)).dtype.name


def read_header(
    path: PathLike, series_uid: str | None = None, series_description: str | None = None
) -> ImageHeader:
    """Geometry and pixel type of a file or DICOM series folder, as `read_sitk` would load it, without the pixels.

    For a series, the slice axis is computed like ITK's `ImageSeriesReader`: direction from the first slice,
    spacing = distance between the first and last slice origins / (number of slices - 1).

    Raises:
        InputError: same cases as `read_sitk` (a corrupt pixel block is only found by `read_sitk`).
    """
    path = Path(path)
    if path.is_dir():
        series = select_series(path, series_uid, series_description)
        first = _file_information(series.files[0])
        size, spacing = list(first.GetSize()), list(first.GetSpacing())
        if len(series.files) > 1:
            last = _file_information(series.files[-1])
            step = np.linalg.norm(np.subtract(last.GetOrigin(), first.GetOrigin())) / (len(series.files) - 1)
            size[2], spacing[2] = len(series.files), float(step)
        reader = first
    else:
        _check_file_to_read(path)
        reader = _file_information(path)
        size, spacing = list(reader.GetSize()), list(reader.GetSpacing())
    return ImageHeader(
        size=tuple(int(s) for s in size),
        spacing=tuple(float(s) for s in spacing),
        origin=tuple(float(o) for o in reader.GetOrigin()),
        direction=tuple(float(d) for d in reader.GetDirection()),
        components=int(reader.GetNumberOfComponents()),
        pixel_type=_dtype_name(reader.GetPixelID()),
    )


def _check_file_to_read(path: Path) -> None:
    _check_regular_file(path)
    if _suffix(path) not in READ_SUFFIXES and not pydicom.misc.is_dicom(path):
        raise InputError(
            path, f"unsupported file type '{_suffix(path)}' (readable: {', '.join(READ_SUFFIXES)}, DICOM files)"
        )


def _keep_only_safe_metadata(image: sitk.Image, tags: dict[str, str]) -> None:
    """Drop every metadata key SimpleITK attached (a DICOM file brings all its tags) and set the safe ones."""
    for key in image.GetMetaDataKeys():
        image.EraseMetaData(key)
    for name, value in tags.items():
        image.SetMetaData(name, value)


def _check_slice_spacing(folder: Path, reader: sitk.ImageSeriesReader, image: sitk.Image) -> None:
    """Refuse a series whose slices are not evenly spaced along their normal: a missing slice or a repeated position.

    SimpleITK stacks such a series anyway, with one spacing for all slices (and only a warning on stderr), so
    every slice after the gap would sit at the wrong place and volumes would be wrong.
    """
    count = len(reader.GetFileNames())
    if count < 3 or image.GetDimension() != 3:
        return
    positions = []
    for k in range(count):
        if not reader.HasMetaDataKey(k, "0020|0032"):
            return  # no ImagePositionPatient: the geometry is SimpleITK's to make, nothing to check against
        positions.append([float(v) for v in reader.GetMetaData(k, "0020|0032").split("\\")])
    normal = np.asarray(image.GetDirection()).reshape(3, 3)[:, 2]
    steps = np.diff(np.asarray(positions) @ normal)
    typical = float(np.median(np.abs(steps)))
    uneven = np.flatnonzero(np.abs(np.abs(steps) - typical) > max(0.1 * typical, 1e-3))
    if typical == 0.0 or uneven.size:
        k = int(uneven[0]) if uneven.size else 0
        names = [Path(f).name for f in reader.GetFileNames()]
        raise InputError(
            folder, f"the series' slices are not evenly spaced: {names[k]} and {names[k + 1]} are "
                    f"{abs(steps[k]):.3g} mm apart where the others are {typical:.3g} mm (a missing slice, or several "
                    f"images at one position?)"
        )


def read_sitk(
    path: PathLike,
    series_uid: str | None = None,
    series_description: str | None = None,
    output_pixel_type: int = sitk.sitkUnknown,
) -> sitk.Image:
    """Open a file or a DICOM series folder with SimpleITK: the single place in the project that reads images.

    The returned image carries no metadata but the safe DICOM tags (`SAFE_DICOM_TAGS`, DICOM input only).

    Args:
        path: an image file (see `READ_SUFFIXES`; DICOM files with any name) or a folder holding a DICOM series.
        series_uid: SeriesInstanceUID picking one series in a folder holding several (ignored for a file).
        series_description: regular expression (``re.search``, case-insensitive) on SeriesDescription picking one
            (ignored for a file).
        output_pixel_type: a SimpleITK pixel ID to cast to while reading; ``sitkUnknown`` keeps the file's type.

    Raises:
        InputError: missing path, unsupported suffix, empty file or folder, folder without DICOM, corrupt or
            truncated file, several series without a choice, a choice matching none or several.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file or folder")
    if path.is_dir():
        series = select_series(path, series_uid, series_description)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(series.files)
        reader.SetOutputPixelType(output_pixel_type)
        reader.MetaDataDictionaryArrayUpdateOn()  # each slice's position, for the spacing check below
        tags = {
            "Modality": series.modality,
            "SeriesDescription": series.description,
            "SeriesInstanceUID": series.series_uid,
            "StudyInstanceUID": series.study_uid,
        }
    else:
        _check_file_to_read(path)
        _check_complete(path, _suffix(path))
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.SetOutputPixelType(output_pixel_type)
        tags = {}
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise InputError(path, f"cannot read the image, corrupt or truncated? ({_sitk_reason(error)})") from error
    if isinstance(reader, sitk.ImageSeriesReader):
        _check_slice_spacing(path, reader, image)
    if path.is_file() and _is_dicom_file(path):
        tags = {
            name: image.GetMetaData(key).strip() for name, key in SAFE_DICOM_TAGS.items() if image.HasMetaDataKey(key)
        }
    _keep_only_safe_metadata(image, tags)
    return image


def check_image_values(array: Any, path: PathLike | None = None) -> None:
    """Refuse arrays holding NaN or infinite values; accept constant arrays.

    The reader returns what is on disk; this check is applied where values are used. NaN/inf would poison
    normalisation and the loss, so they are an input error. A constant image (e.g. a blank slice above the
    head) is legitimate: intensity normalisation handles it, so it passes.

    Raises:
        InputError: when `array` holds NaN or infinite values (the message names `path` and the count).
    """
    values = convert_to_numpy(array)
    if not np.issubdtype(values.dtype, np.floating) and not np.issubdtype(values.dtype, np.complexfloating):
        return
    nan = int(np.isnan(values).sum())
    if nan:
        raise InputError(path, f"contains NaN values ({nan} of {values.size})")
    inf = int(np.isinf(values).sum())
    if inf:
        raise InputError(path, f"contains infinite values ({inf} of {values.size})")


def _affine_of(image: sitk.Image, lps_to_ras: bool) -> np.ndarray:
    """(sr+1)x(sr+1) affine of `image` (sr = spatial rank, at most 3), the same matrix ITKReader builds."""
    dims = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dims, dims)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)
    sr = min(max(dims, 1), 3)
    affine = np.eye(sr + 1)
    affine[:sr, :sr] = direction[:sr, :sr] @ np.diag(spacing[:sr])
    affine[:sr, -1] = origin[:sr]
    return orientation_ras_lps(affine) if lps_to_ras else affine


class SimpleITKReader(ImageReader):
    """Load images with SimpleITK and return them exactly as MONAI's `ITKReader` does.

    Same array axis order (ITK index order x, y[, z] by default; multi-component pixels such as RGB become the
    last axis), same affine (LPS->RAS by default, equal to `NibabelReader`'s for NIfTI) and the same metadata
    keys that transforms use (`spacing`, `affine`, `original_affine`, `spatial_shape`, `original_channel_dim`,
    `space`), plus `filename_or_obj` and, for DICOM, only the tags in `SAFE_DICOM_TAGS`.
    A folder is read as one DICOM series; a sequence of paths is stacked as channels like `ITKReader`.

    Use it with ``LoadImage(reader=SimpleITKReader())``, ``LoadImaged(keys, reader=SimpleITKReader())``, or in a
    bundle config as ``"reader": "$brainseg_monai.io.SimpleITKReader"``.
    """

    def __init__(
        self,
        channel_dim: str | int | None = None,
        series_uid: str | None = None,
        series_description: str | None = None,
        reverse_indexing: bool = False,
        affine_lps_to_ras: bool = True,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            channel_dim: the channel axis of the array, stored as `original_channel_dim` for EnsureChannelFirst.
                None: no channel for scalar images, -1 for multi-component ones (RGB). ``"no_channel"`` as in MONAI.
            series_uid: SeriesInstanceUID picking one series in a folder holding several.
            series_description: regular expression (``re.search``, case-insensitive) on SeriesDescription.
            reverse_indexing: MONAI's meaning: False (default) gives ITK index order (x, y[, z]), consistent with
                the affine; True gives numpy order of `SimpleITK.GetArrayFromImage` (z, y, x); metadata unchanged.
            affine_lps_to_ras: convert the affine from ITK's LPS to RAS, like `ITKReader` and `NibabelReader`.
            kwargs: arguments of `read_sitk` besides the path and series choice (``output_pixel_type``).

        Raises:
            ValueError: for a bad `channel_dim`, an invalid `series_description` pattern or unknown `kwargs`.
        """
        super().__init__()
        if not (channel_dim is None or channel_dim == "no_channel" or isinstance(channel_dim, int)):
            raise ValueError(f"channel_dim must be None, 'no_channel' or an int but is {channel_dim!r}.")
        _compile_description(series_description)
        unknown = sorted(set(kwargs) - {"output_pixel_type"})
        if unknown:
            raise ValueError(f"unknown SimpleITKReader arguments {unknown}; accepted extra: ['output_pixel_type'].")
        self.channel_dim = float("nan") if channel_dim == "no_channel" else channel_dim
        self.series_uid = series_uid
        self.series_description = series_description
        self.reverse_indexing = reverse_indexing
        self.affine_lps_to_ras = affine_lps_to_ras
        self.kwargs = kwargs

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        """True when every name is a folder (DICOM series), has a readable suffix, or is a DICOM file."""
        for name in ensure_tuple(filename):
            path = Path(name)
            dicom_file = path.is_file() and pydicom.misc.is_dicom(path)
            if not (path.is_dir() or _suffix(path) in READ_SUFFIXES or dicom_file):
                return False
        return True

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any) -> sitk.Image | list[sitk.Image]:
        """Read one path, or several (stacked as channels by `get_data`); returns SimpleITK image(s).

        Args:
            data: a file, a DICOM series folder, or a sequence of them.
            kwargs: override the constructor's `kwargs` for this call.

        Raises:
            InputError: see `read_sitk`.
        """
        options = {**self.kwargs, **kwargs}
        names = ensure_tuple(data)
        images = []
        for name in names:
            image = read_sitk(name, self.series_uid, self.series_description, **options)
            image.SetMetaData(_FILENAME_KEY, str(name))
            images.append(image)
        return images if len(names) > 1 else images[0]

    def get_data(self, img: sitk.Image | Sequence[sitk.Image]) -> tuple[np.ndarray, dict]:
        """Array and metadata of one image, or of several stacked as channels (metadata from the first).

        Raises:
            RuntimeError: from MONAI when stacked images differ in affine or spatial shape.
        """
        arrays: list[np.ndarray] = []
        compatible_meta: dict = {}
        # ensure_tuple would iterate a SimpleITK image pixel by pixel
        for image in [img] if isinstance(img, sitk.Image) else img:
            data = self._get_array_data(image)
            arrays.append(data)
            header = self._get_meta_dict(image)
            header[MetaKeys.ORIGINAL_AFFINE] = _affine_of(image, self.affine_lps_to_ras)
            header[MetaKeys.SPACE] = SpaceKeys.RAS if self.affine_lps_to_ras else SpaceKeys.LPS
            header[MetaKeys.AFFINE] = header[MetaKeys.ORIGINAL_AFFINE].copy()
            header[MetaKeys.SPATIAL_SHAPE] = self._get_spatial_shape(image)
            if self.channel_dim is None:
                header[MetaKeys.ORIGINAL_CHANNEL_DIM] = (
                    float("nan") if data.ndim == len(header[MetaKeys.SPATIAL_SHAPE]) else -1
                )
            else:
                header[MetaKeys.ORIGINAL_CHANNEL_DIM] = self.channel_dim
            _copy_compatible_dict(header, compatible_meta)
        return _stack_images(arrays, compatible_meta), compatible_meta

    @staticmethod
    def _get_meta_dict(image: sitk.Image) -> dict:
        meta = {key: image.GetMetaData(key) for key in image.GetMetaDataKeys()}
        meta["spacing"] = np.asarray(image.GetSpacing())
        return meta

    def _get_spatial_shape(self, image: sitk.Image) -> np.ndarray:
        sr = min(max(image.GetDimension(), 1), 3)
        size = list(image.GetSize())
        if isinstance(self.channel_dim, int):
            size.pop(self.channel_dim)
        return np.asarray(size[:sr])

    def _get_array_data(self, image: sitk.Image) -> np.ndarray:
        array = sitk.GetArrayFromImage(image)  # numpy order: (z, y, x[, components])
        if self.reverse_indexing:
            return array
        if image.GetNumberOfComponentsPerPixel() == 1:
            return array.T
        return np.moveaxis(array.T, 0, -1)


def _geometry(affine: np.ndarray, ndim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spacing, LPS origin and direction of an `ndim`-D grid from a RAS affine (inverse of `_affine_of`)."""
    lps = orientation_ras_lps(np.asarray(affine, dtype=np.float64))
    matrix, origin = lps[:ndim, :ndim], lps[:ndim, -1]
    spacing = np.linalg.norm(matrix, axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"affine must have non-zero columns (spacing) but is {affine.tolist()}.")
    direction = matrix / spacing
    if not np.allclose(direction.T @ direction, np.eye(ndim), atol=1e-4):
        raise ValueError(f"affine must be a rotation times spacing (no shear) but is {affine.tolist()}.")
    return spacing, origin, direction


def to_sitk(array: Any, affine: Any) -> sitk.Image:
    """A SimpleITK image from an array in reader axis order and a RAS affine (the inverse of `SimpleITKReader`).

    The affine's size sets the spatial rank d (a (d+1)x(d+1) matrix): an array with d axes is scalar, one with d+1
    axes is channel-first (channels become pixel components; a single channel stays scalar). A 2D array with a
    4x4 affine uses the affine's in-plane block. Spacing, origin and direction come from the affine.

    Raises:
        ValueError: when the array's rank fits neither rule, or the affine is singular or sheared.
    """
    values = convert_to_numpy(array)
    matrix = convert_to_numpy(affine).astype(np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] not in (3, 4):
        raise ValueError(f"affine must be a 3x3 or 4x4 matrix but has shape {matrix.shape}.")
    rank = matrix.shape[0] - 1
    if values.ndim == rank - 1 == 2:
        matrix = np.delete(np.delete(matrix, 2, axis=0), 2, axis=1)
        rank = 2
    if values.ndim == rank:
        channels = None
    elif values.ndim == rank + 1:
        channels = values.shape[0]
    else:
        raise ValueError(
            f"array must have {rank} spatial axes, optionally after one channel axis, but has shape {values.shape}."
        )
    if values.dtype == bool:
        values = values.astype(np.uint8)
    elif values.dtype == np.float16:
        values = values.astype(np.float32)
    if channels == 1:
        values, channels = values[0], None
    if channels is None:
        image = sitk.GetImageFromArray(np.ascontiguousarray(values.T))
    else:
        channel_last = np.moveaxis(values, 0, -1)  # (x, y[, z], C) -> numpy order (z, y, x, C) for SimpleITK
        spatial_reversed = tuple(range(rank - 1, -1, -1)) + (rank,)
        image = sitk.GetImageFromArray(np.ascontiguousarray(channel_last.transpose(spatial_reversed)), isVector=True)
    spacing, origin, direction = _geometry(matrix, rank)
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(origin.tolist())
    image.SetDirection(direction.flatten().tolist())
    return image


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def write_image(array: Any, affine: Any, path: PathLike, *, reference: PathLike | None = None) -> Path:
    """Write an array in reader axis order with its RAS affine; the inverse of `SimpleITKReader`.

    NIfTI, MHA and NRRD keep the full geometry (spacing, origin, direction from the affine). PNG and TIF take 2D
    uint8/uint16 arrays (one channel or RGB) and keep only the pixel grid. The file is written to a temporary
    name in the same folder and moved into place, so a reader never sees half a file.

    Args:
        array: (x, y[, z]) or channel-first (C, x, y[, z]) array or tensor, see `to_sitk`.
        affine: the RAS affine, e.g. ``meta["affine"]`` from the reader.
        path: output file; its folder is created.
        reference: the input the array came from; writing onto it is refused.

    Raises:
        ValueError: unsupported output suffix, an array a 2D format cannot hold, or a bad affine (see `to_sitk`).
        InputError: when `path` is `reference` or an existing folder.
    """
    path = Path(path)
    suffix = next((s for s in WRITE_SUFFIXES if path.name.lower().endswith(s)), None)
    if suffix is None:
        raise ValueError(f"path must end with one of {WRITE_SUFFIXES} but is {str(path)!r}.")
    if reference is not None and _same_file(path, Path(reference)):
        raise InputError(path, f"refusing to overwrite the input image it was read from ({reference})")
    if path.is_dir():
        raise InputError(path, "is a folder, cannot write an image file there")
    image = to_sitk(array, affine)
    if suffix in _PLAIN_2D_SUFFIXES:
        pixel = sitk.GetArrayViewFromImage(image).dtype
        components = image.GetNumberOfComponentsPerPixel()
        if image.GetDimension() != 2 or pixel not in (np.uint8, np.uint16) or components not in (1, 3):
            raise ValueError(
                f"{suffix} holds 2D uint8/uint16 images with 1 or 3 channels, but the array has shape "
                f"{convert_to_numpy(array).shape} and dtype {convert_to_numpy(array).dtype}."
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    # a unique hidden name ending in the same suffix (SimpleITK picks the format by suffix); not mkstemp, whose
    # 0600 mode would end up on the output
    temporary = path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}"
    try:
        sitk.WriteImage(image, str(temporary), useCompression=suffix in (".mha", ".nrrd"))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename (readable by all).

    A reader never sees half a file, and an interrupted write leaves the previous file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would otherwise end up on the output
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
