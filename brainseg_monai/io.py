"""The project's one read path: SimpleITK opens every file (2D images, NIfTI, MHA/NRRD, DICOM files and series).

`SimpleITKReader` is a `monai.data.ImageReader` that returns what MONAI's `ITKReader` returns (same axis order,
same RAS affine), so MONAI transforms and `Invertd` work unchanged; `write_image` is its inverse. Only four safe
DICOM tags ever reach the metadata (`SAFE_DICOM_TAGS`): never patient name, ID or birth date.

Every read checks the header's size against `MAX_PIXELS_2D` / `MAX_VOXELS_3D` before decoding, refuses NaN/inf in
NIfTI (which ITK would turn into 0), stacks a DICOM series only when its slices are evenly spaced (exact copies of a
slice are left out), and places the frames of an Enhanced (multi-frame) DICOM file by their own positions.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
import zlib
from collections.abc import Callable, Mapping, Sequence
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
from monai.data.utils import affine_to_spacing, orientation_ras_lps
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple
from monai.utils.type_conversion import convert_to_numpy

from brainseg_monai.errors import InputError
from brainseg_monai.quiet import itk_warnings_off, quiet_third_party

__all__ = [
    "ATOMIC_TEMPORARY",
    "DICOM_FILE_SUFFIXES",
    "IMAGE_2D_SUFFIXES",
    "MAX_PIXELS_2D",
    "MAX_VOXELS_3D",
    "NIFTI_SUFFIXES",
    "READ_SUFFIXES",
    "VOLUME_SUFFIXES",
    "WRITE_SUFFIXES",
    "SAFE_DICOM_TAGS",
    "DicomSeries",
    "ImageHeader",
    "SimpleITKReader",
    "check_image_values",
    "file_stem",
    "find_dicom_series",
    "json_ready",
    "natural_key",
    "planar_to_volume_affine",
    "read_header",
    "read_mask",
    "read_sitk",
    "select_series",
    "to_sitk",
    "voxel_spacing",
    "write_atomic",
    "write_image",
    "write_json_atomic",
    "write_text_atomic",
]

logger = logging.getLogger(__name__)

IMAGE_2D_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
"""2D image files: slices, each predicted on its own."""
NIFTI_SUFFIXES = (".nii", ".nii.gz")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + (".mha", ".mhd", ".nrrd")
"""Volume files a case is made of (a detached ``.nhdr`` header is read, but never taken as a case by itself)."""
DICOM_FILE_SUFFIXES = (".dcm", ".dicom", ".ima")
"""DICOM files by name; a DICOM file may also carry any other suffix (recognised by its DICM preamble)."""

READ_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr") + IMAGE_2D_SUFFIXES + DICOM_FILE_SUFFIXES
"""Suffixes read as single files."""

WRITE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd", ".png", ".tif", ".tiff")
"""Suffixes `write_image` writes (single-file formats only, so the write can be atomic)."""

_PLAIN_2D_SUFFIXES = (".png", ".tif", ".tiff")

ATOMIC_TEMPORARY = r"\.\d+-[0-9a-f]{8}"
"""What `write_atomic` puts between ``.<name>`` and the suffix of a temporary (a regex): PID and a random tag."""

SAFE_DICOM_TAGS = {
    "Modality": "0008|0060",
    "SeriesDescription": "0008|103e",
    "SeriesInstanceUID": "0020|000e",
    "StudyInstanceUID": "0020|000d",
}
"""The only DICOM tags copied into metadata (name -> SimpleITK key); nothing that identifies the patient."""

_FILENAME_KEY = "filename_or_obj"

MAX_PIXELS_2D = 25_000_000
"""Most pixels one image plane may hold (width x height) before `read_sitk` refuses it, undecoded; the environment
variable ``BRAINSEG_MAX_PIXELS`` or the ``max_pixels`` argument changes it. 5000 x 5000 holds every 2D input this
tool meets (MR slices, 4K screenshots, 20-megapixel photos); a 10000 x 10000 PNG of 350 KB took 17 GB through
8-view TTA inference (about 170 bytes per pixel), so this keeps one image near 4 GB."""

MAX_VOXELS_3D = 512**3
"""Most voxels one volume may hold (134 million) before `read_sitk` refuses it, undecoded; the environment variable
``BRAINSEG_MAX_VOXELS`` or the ``max_voxels`` argument changes it. Brain MR and head CT stay well below (256^3 is
17 million, thin-slice CT 512 x 512 x 400 is 105 million); one float32 copy of the limit is 0.5 GiB, and inference
holds several."""

_MAX_PIXELS_VARIABLE = "BRAINSEG_MAX_PIXELS"
_MAX_VOXELS_VARIABLE = "BRAINSEG_MAX_VOXELS"

_SAME_POSITION_MM = 0.01
"""Two slice or frame positions closer than this (mm) are one position; DICOM writes them to about 1e-4 mm."""

SERIES_HEADER_TAGS = (
    "PatientID", "StudyInstanceUID", "SeriesDescription", "SeriesNumber", "SeriesDate", "SeriesTime",
    "AcquisitionTime", "ProtocolName", "SequenceName", "ImageType", "ScanningSequence", "SequenceVariant",
    "ScanOptions", "MRAcquisitionType", "RepetitionTime", "EchoTime", "InversionTime", "FlipAngle",
    "ContrastBolusAgent", "ContrastBolusRoute", "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "Rows",
    "Columns", "NumberOfFrames", "SOPClassUID", "Manufacturer", "MagneticFieldStrength", "DiffusionBValue",
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


def natural_key(text: str) -> list[Any]:
    """Sort key ordering digit runs as integers and the rest without case (``x_2`` before ``x_10``): the order of
    slices, cases and folders everywhere (LGG slice order)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def _suffix(path: PathLike) -> str:
    """The known suffix of `path` (``.nii.gz`` counts as one), or its last suffix when unknown."""
    name = Path(path).name.lower()
    for suffix in READ_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return Path(name).suffix


def _is_dicom_file(path: Path) -> bool:
    return _suffix(path) in DICOM_FILE_SUFFIXES or pydicom.misc.is_dicom(path)


def _sitk_reason(error: RuntimeError) -> str:
    """The informative part of a SimpleITK/ITK exception, without source locations and object addresses."""
    text = re.sub(r"\s+", " ", str(error)).strip()
    for marker in ("ITK ERROR:", "sitk::ERROR:"):
        if marker in text:
            text = text.rsplit(marker, 1)[1].strip()
            break
    return re.sub(r"^\w+\(0x[0-9a-fA-F]+\):\s*", "", text)[:300]


def _check_complete(path: Path, suffix: str) -> None:
    """Refuse truncated NIfTI files, which ITK reads without error (zero-filled); streams, never holds the voxels."""
    if suffix in NIFTI_SUFFIXES:
        found = path.stat().st_size if suffix == ".nii" else _gzip_length(path)
        data = _nifti_data(path)
        expected = int(data.offset) + int(np.prod(data.shape)) * np.dtype(data.dtype).itemsize
        if found < expected:
            raise InputError(path, f"truncated NIfTI file: {found} bytes (header and voxels), {expected} expected")


def _nifti_data(path: Path) -> Any:
    """nibabel's array proxy of a NIfTI file (header read, voxels not)."""
    try:
        return nib.load(path).dataobj
    except Exception as error:  # nibabel raises many types for a damaged header
        raise InputError(path, f"not a valid NIfTI file ({error})") from error


def _check_pixels(path: Path, suffix: str) -> None:
    """Refuse what ITK would decode without error but wrongly: truncated JPEG and BMP files (grey-filled) and float
    NIfTI holding NaN or infinite values (ITK's NIfTI reader turns them into 0, so `check_image_values` would never
    see them; MHA and NRRD keep them). Decodes the pixels, so it runs after the size check."""
    if suffix in NIFTI_SUFFIXES:
        data = _nifti_data(path)
        if np.issubdtype(data.dtype, np.floating) or np.issubdtype(data.dtype, np.complexfloating):
            check_image_values(np.asanyarray(data), path)
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
        dicom = Path(path) if _is_dicom_file(Path(path)) else None
        raise _read_failure(path, "cannot read the image header", error, dicom) from error
    return reader


def _read_failure(path: PathLike, what: str, error: RuntimeError, dicom: Path | None) -> InputError:
    """The InputError for a failed SimpleITK read; for DICOM in a compressed or unknown transfer syntax it names the
    syntax and how to convert the file, since GDCM's own message ("Failed to change to Implicit Transfer Syntax",
    "Unable to determine ImageIO reader") does not say that the encoding is the problem."""
    reason = _sitk_reason(error)
    header = None if dicom is None else _dicom_header(dicom)
    syntax = None if header is None else header.file_meta.get("TransferSyntaxUID")
    if syntax is not None and (not syntax.is_transfer_syntax or syntax.is_compressed):
        label = str(syntax) if syntax.name == str(syntax) else f"{syntax.name} ({syntax})"
        where = "" if dicom == Path(path) else f" of {dicom.name}"
        return InputError(
            path,
            f"{what}: the pixel data{where} is in transfer syntax {label}, which SimpleITK's GDCM cannot decode, or "
            f"is corrupt ({reason}); convert it to an uncompressed transfer syntax (GDCM: `gdcmconv --raw IN OUT`; "
            f"DCMTK: `dcmdjpeg`, `dcmdjpls`, `dcmdrle`) and read it again",
        )
    return InputError(path, f"{what}, corrupt or truncated? ({reason})")


def _series_in_folder(folder: Path) -> list[DicomSeries]:
    series = []
    with itk_warnings_off():  # GDCM prints "No Series were found" for a folder without DICOM; callers say what matters
        found = {uid: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
                 for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))}
    for uid, files in found.items():
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
    if not path.is_file() or not (_suffix(path) in DICOM_FILE_SUFFIXES or pydicom.misc.is_dicom(path)):
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
    spacing = distance between the first and last slice origins / (number of slices - 1). For a multi-frame DICOM
    file it comes from the frames' positions, as `read_sitk` places them.

    Raises:
        InputError: same cases as `read_sitk` (a corrupt pixel block, different images at one position of a series
            and the size limits are only found by `read_sitk`).
    """
    path = Path(path)
    source = path
    if path.is_dir():
        series = select_series(path, series_uid, series_description)
        source = _multiframe_file(path, series)
        if source is None:
            first = _file_information(series.files[0])
            size, spacing = list(first.GetSize()), list(first.GetSpacing())
            if len(series.files) > 1:
                last = _file_information(series.files[-1])
                step = np.linalg.norm(np.subtract(last.GetOrigin(), first.GetOrigin())) / (len(series.files) - 1)
                size[2], spacing[2] = len(series.files), float(step)
            reader = first
            origin, direction = reader.GetOrigin(), reader.GetDirection()
    else:
        _check_file_to_read(path)
    if source is not None:
        reader = _file_information(source)
        size, spacing = list(reader.GetSize()), list(reader.GetSpacing())
        origin, direction = reader.GetOrigin(), reader.GetDirection()
        stack = _frame_stack(source) if _is_dicom_file(source) else None
        if stack is not None:
            spacing, origin, direction = list(stack.spacing), stack.origin, stack.direction
    return ImageHeader(
        size=tuple(int(s) for s in size),
        spacing=tuple(float(s) for s in spacing),
        origin=tuple(float(o) for o in origin),
        direction=tuple(float(d) for d in direction),
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


def _size_limit(given: int | None, argument: str, variable: str, default: int) -> int:
    """The size limit `given` as `argument`, else the one in the environment variable `variable`, else `default`.

    Raises:
        ValueError: when the one used is not a positive whole number (the message names it).
    """
    name = argument
    if given is None:
        text = os.environ.get(variable, "").strip()
        if not text:
            return default
        name = f"environment variable {variable}"
        try:
            given = int(text)
        except ValueError:
            raise ValueError(f"{name} must be a positive whole number but is {text!r}.") from None
    if isinstance(given, bool) or not isinstance(given, (int, np.integer)) or given < 1:
        raise ValueError(f"{name} must be a positive whole number but is {given!r}.")
    return int(given)


def _check_size(path: Path, size: Sequence[int], max_pixels: int, max_voxels: int) -> None:
    """Refuse an image whose header promises more pixels per plane or voxels per volume than the limits, before its
    pixels are decoded: a small compressed file can unpack to gigabytes, and every later stage multiplies that."""
    dims = [int(s) for s in size]
    plane = int(np.prod(dims[:2], dtype=object))
    voxels = int(np.prod(dims, dtype=object))
    shape = " x ".join(str(s) for s in dims)
    if plane > max_pixels:
        raise InputError(
            path,
            f"image too large: {shape} is {plane:,} pixels per plane, above the limit of {max_pixels:,}; raise it "
            f"with the environment variable {_MAX_PIXELS_VARIABLE} (or max_pixels=) if this image is meant to be read",
        )
    if voxels > plane and voxels > max_voxels:
        raise InputError(
            path,
            f"volume too large: {shape} is {voxels:,} voxels, above the limit of {max_voxels:,}; raise it with the "
            f"environment variable {_MAX_VOXELS_VARIABLE} (or max_voxels=) if this volume is meant to be read",
        )


def _execute(reader: sitk.ImageReaderBase, path: Path, dicom: Path | None) -> sitk.Image:
    try:
        return reader.Execute()
    except RuntimeError as error:
        raise _read_failure(path, "cannot read the image", error, dicom) from error


@dataclass(frozen=True)
class _FrameStack:
    """Where the frames of a multi-frame DICOM file lie: `order` lists the frame indices from the first slice to the
    last along the slice normal; `spacing`, `origin` and `direction` are the volume's ITK geometry in that order."""

    order: tuple[int, ...]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]


def _functional_group(frame: pydicom.Dataset, shared: pydicom.Dataset, sequence: str, attribute: str) -> Any:
    """An attribute of a per-frame functional group, or of the shared one when the frame has none, else None."""
    for source in (frame, shared):
        items = source.get(sequence)
        if items and attribute in items[0]:
            return items[0].get(attribute)
    return None


def _frame_stack(path: Path) -> _FrameStack | None:
    """The frame geometry of a multi-frame DICOM file (an Enhanced MR, CT... image), None for a single frame.

    GDCM stacks the frames in file order and derives spacing and origin from them only when they happen to be in
    ascending order (otherwise 1 mm and the first frame's position): this reads each frame's position from the
    functional groups and accepts the file only when its frames form one evenly spaced stack with one orientation,
    pixel spacing and rescale, which is a volume whatever the frame order.

    Raises:
        InputError: frames without positions, several frames at one position (echoes, time points, diffusion
            directions, several stacks), unevenly spaced frames, or orientation, spacing or rescale varying by frame.
    """
    header = _dicom_header(path)
    if header is None:
        return None  # unparsable: SimpleITK's read reports it
    try:
        frames = int(header.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        return None
    if frames <= 1:
        return None
    kind = pydicom.uid.UID(str(header.get("SOPClassUID", ""))).name.replace(" Storage", "") or "DICOM image"

    def refuse(reason: str) -> InputError:
        return InputError(
            path,
            f"{kind} multi-frame file with {frames} frames, read only when they form one evenly spaced stack of "
            f"slices, but {reason}; export the series as classic single-frame images",
        )

    per_frame = header.get("PerFrameFunctionalGroupsSequence")
    shared_items = header.get("SharedFunctionalGroupsSequence")
    shared = shared_items[0] if shared_items else pydicom.Dataset()
    if not per_frame or len(per_frame) != frames:
        raise refuse("it has no per-frame functional groups giving each frame's position")
    values: dict[str, list] = {"position": [], "orientation": [], "spacing": [], "rescale": []}
    for k, frame in enumerate(per_frame):
        found = {
            "position": _functional_group(frame, shared, "PlanePositionSequence", "ImagePositionPatient"),
            "orientation": _functional_group(frame, shared, "PlaneOrientationSequence", "ImageOrientationPatient"),
            "spacing": _functional_group(frame, shared, "PixelMeasuresSequence", "PixelSpacing"),
        }
        missing = [name for name, value in found.items() if value is None]
        if missing:
            raise refuse(f"frame {k + 1} has no {' or '.join(missing)}")
        slope = _functional_group(frame, shared, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _functional_group(frame, shared, "PixelValueTransformationSequence", "RescaleIntercept")
        found["rescale"] = [1.0 if slope is None else slope, 0.0 if intercept is None else intercept]
        for name, value in found.items():
            try:
                values[name].append([float(v) for v in value])
            except (TypeError, ValueError) as error:  # a value that is no number, or a single one
                raise refuse(f"frame {k + 1} has an unreadable {name} ({error})") from error
    wrong = [name for name, width in (("position", 3), ("orientation", 6), ("spacing", 2))
             if any(len(v) != width for v in values[name])]  # fmt: skip
    if wrong:
        raise refuse(f"its frame {' and '.join(wrong)} values have the wrong number of elements")
    arrays = {name: np.asarray(value, dtype=np.float64) for name, value in values.items()}
    for name, tolerance in (("orientation", 1e-4), ("spacing", 1e-4), ("rescale", 0.0)):
        if np.ptp(arrays[name], axis=0).max() > tolerance:
            raise refuse(f"its frames differ in {name} (the first has {values[name][0]})")
    row, column = arrays["orientation"][0, :3], arrays["orientation"][0, 3:]
    normal = np.cross(row, column)
    normal /= np.linalg.norm(normal)
    positions = arrays["position"]
    heights = positions @ normal
    order = np.argsort(heights, kind="stable")
    steps = np.diff(heights[order])
    distinct = 1 + int(np.sum(steps > _SAME_POSITION_MM))
    if distinct < frames:
        raise refuse(
            f"they lie at {distinct} distinct positions: several frames per slice (echoes, time points, diffusion "
            f"directions or several stacks)"
        )
    shift = positions - positions[order[0]] - np.outer(heights - heights[order[0]], normal)
    pixel = float(arrays["spacing"][0].min())
    if np.linalg.norm(shift, axis=1).max() > 0.1 * pixel:
        raise refuse("its frames are shifted in-plane against each other")
    typical = float(np.median(steps))
    uneven = np.flatnonzero(np.abs(steps - typical) > max(0.1 * typical, 1e-3))
    if uneven.size:
        k = int(uneven[0])
        raise refuse(
            f"its frames are not evenly spaced: frames {order[k] + 1} and {order[k + 1] + 1} are {steps[k]:.3g} mm "
            f"apart where the others are {typical:.3g} mm (a missing frame?)"
        )
    row_spacing, column_spacing = arrays["spacing"][0]
    slice_spacing = float(heights[order[-1]] - heights[order[0]]) / (frames - 1)  # as ITK's series reader
    return _FrameStack(
        order=tuple(int(k) for k in order),
        spacing=(float(column_spacing), float(row_spacing), slice_spacing),
        origin=tuple(float(v) for v in positions[order[0]]),
        direction=tuple(float(v) for v in np.column_stack((row, column, normal)).flatten()),
    )


def _place_frames(path: Path, image: sitk.Image, stack: _FrameStack) -> sitk.Image:
    """`image` (frames in file order) with its frames in slice order and the geometry of `stack`."""
    if image.GetDimension() != 3 or image.GetSize()[2] != len(stack.order):
        raise InputError(path, f"multi-frame file read as size {image.GetSize()}, not {len(stack.order)} frames")
    if list(stack.order) != sorted(stack.order):
        vector = image.GetNumberOfComponentsPerPixel() > 1
        placed = sitk.GetImageFromArray(sitk.GetArrayViewFromImage(image)[list(stack.order)], isVector=vector)
        for key in image.GetMetaDataKeys():
            placed.SetMetaData(key, image.GetMetaData(key))
        image = placed
    image.SetSpacing(stack.spacing)
    image.SetOrigin(stack.origin)
    image.SetDirection(stack.direction)
    return image


def _multiframe_file(folder: Path, series: DicomSeries) -> Path | None:
    """The file of a series that is one multi-frame file (read as a file, frames placed by `_frame_stack`), else None.

    Raises:
        InputError: for a series of several multi-frame files, which no reader here stacks.
    """
    frames = series.header.get("NumberOfFrames", 1.0)
    if not isinstance(frames, float) or frames <= 1:
        return None
    if len(series.files) > 1:
        raise InputError(
            folder,
            f"series {series.series_uid} is {len(series.files)} multi-frame DICOM files; not supported, read each "
            f"file on its own or export the series as classic single-frame images",
        )
    return Path(series.files[0])


def _slices_to_stack(folder: Path, reader: sitk.ImageSeriesReader, image: sitk.Image) -> list[str]:
    """The series' files in slice order with exact copies left out; refuse a series that is not one even stack.

    GDCM lists a series holding two files at one position in file-name order (its position sort gives up), and
    SimpleITK stacks whatever it is given with one spacing (only a warning on stderr), so every slice after a gap or
    a repeat would sit at the wrong place. A file at the position of another with the same pixels (the same
    SOPInstanceUID exported twice, a copied file) adds nothing: it is left out with a warning. Different images at
    one position (several echoes or repeated acquisitions in one series) and uneven spacing (a missing slice) are
    refused. Without ImagePositionPatient the geometry is SimpleITK's to make and the files are kept as they are.
    """
    files = list(reader.GetFileNames())
    if len(files) < 2 or image.GetDimension() != 3:
        return files
    positions = []
    for k in range(len(files)):
        if not reader.HasMetaDataKey(k, "0020|0032"):
            return files
        positions.append([float(v) for v in reader.GetMetaData(k, "0020|0032").split("\\")])
    where = np.asarray(positions)
    normal = np.asarray(image.GetDirection()).reshape(3, 3)[:, 2]
    names = [Path(f).name for f in files]
    pixels = sitk.GetArrayViewFromImage(image)  # slice k is file k
    kept: list[int] = []
    for k in (int(k) for k in np.argsort(where @ normal, kind="stable")):
        if not kept or np.linalg.norm(where[k] - where[kept[-1]]) > _SAME_POSITION_MM:
            kept.append(k)
        elif np.array_equal(pixels[k], pixels[kept[-1]]):
            logger.warning("%s: %s is a copy of %s (same position and pixels), left out", folder, names[k],
                           names[kept[-1]])
        else:
            raise InputError(
                folder,
                f"{names[kept[-1]]} and {names[k]} are different images at one slice position (several echoes or "
                f"repeated acquisitions in one series?); remove the extra images or split the series",
            )
    steps = np.diff(where[kept] @ normal)
    typical = float(np.median(steps))
    uneven = np.flatnonzero(np.abs(steps - typical) > max(0.1 * typical, 1e-3))
    if typical <= _SAME_POSITION_MM or uneven.size:
        k = int(uneven[0]) if uneven.size else 0
        raise InputError(
            folder,
            f"the series' slices are not evenly spaced: {names[kept[k]]} and {names[kept[k + 1]]} are "
            f"{steps[k]:.3g} mm apart where the others are {typical:.3g} mm (a missing slice?)",
        )
    return [files[k] for k in kept]


def _read_series(folder: Path, files: list[str], output_pixel_type: int, limits: tuple[int, int]) -> sitk.Image:
    """Stack a DICOM series' files after checking its size from the first file's header (rows x columns x files)."""
    first = _file_information(files[0])
    width, height = first.GetSize()[:2]
    _check_size(folder, (width, height, len(files)), *limits)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.SetOutputPixelType(output_pixel_type)
    reader.MetaDataDictionaryArrayUpdateOn()  # each slice's position, for the stacking check
    image = _execute(reader, folder, Path(files[0]))
    stacked = _slices_to_stack(folder, reader, image)
    if stacked != files:
        reader.SetFileNames(stacked)
        image = _execute(reader, folder, Path(stacked[0]))
    return image


def _read_file(path: Path, output_pixel_type: int, limits: tuple[int, int]) -> sitk.Image:
    """Read one file: completeness, then the size from its header, then the pixels (and frame placement)."""
    suffix = _suffix(path)
    _check_complete(path, suffix)
    reader = _file_information(path)
    _check_size(path, reader.GetSize(), *limits)
    _check_pixels(path, suffix)
    dicom = path if _is_dicom_file(path) else None
    stack = None if dicom is None else _frame_stack(path)
    reader.SetOutputPixelType(output_pixel_type)
    image = _execute(reader, path, dicom)
    return image if stack is None else _place_frames(path, image, stack)


def read_sitk(
    path: PathLike,
    series_uid: str | None = None,
    series_description: str | None = None,
    output_pixel_type: int = sitk.sitkUnknown,
    *,
    max_pixels: int | None = None,
    max_voxels: int | None = None,
) -> sitk.Image:
    """Open a file or a DICOM series folder with SimpleITK: the single place in the project that reads images.

    The returned image carries no metadata but the safe DICOM tags (`SAFE_DICOM_TAGS`, DICOM input only). Its size
    is checked from the header before any pixel is decoded. Every DICOM transfer syntax GDCM decodes is read
    (uncompressed little/big endian, implicit VR, JPEG lossless, JPEG-LS, JPEG 2000, RLE); a multi-frame (Enhanced)
    file is read as a volume when its frames form one evenly spaced stack, placed by their own positions.

    Args:
        path: an image file (see `READ_SUFFIXES`; DICOM files with any name) or a folder holding a DICOM series.
        series_uid: SeriesInstanceUID picking one series in a folder holding several (ignored for a file).
        series_description: regular expression (``re.search``, case-insensitive) on SeriesDescription picking one
            (ignored for a file).
        output_pixel_type: a SimpleITK pixel ID to cast to while reading; ``sitkUnknown`` keeps the file's type.
        max_pixels: most pixels per image plane; None: ``BRAINSEG_MAX_PIXELS`` if set, else `MAX_PIXELS_2D`.
        max_voxels: most voxels per volume; None: ``BRAINSEG_MAX_VOXELS`` if set, else `MAX_VOXELS_3D`.

    Raises:
        InputError: missing path, unsupported suffix, empty file or folder, folder without DICOM, corrupt or
            truncated file, a transfer syntax GDCM cannot decode, several series without a choice, a choice matching
            none or several, an image above the size limits, NaN/inf in a NIfTI file, a series whose slices are not
            evenly spaced or hold different images at one position, a multi-frame file that is not one even stack.
        ValueError: a size limit (argument or environment variable) that is not a positive whole number.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file or folder")
    limits = (
        _size_limit(max_pixels, "max_pixels", _MAX_PIXELS_VARIABLE, MAX_PIXELS_2D),
        _size_limit(max_voxels, "max_voxels", _MAX_VOXELS_VARIABLE, MAX_VOXELS_3D),
    )
    if path.is_dir():
        series = select_series(path, series_uid, series_description)
        multiframe = _multiframe_file(path, series)
        if multiframe is None:
            image = _read_series(path, series.files, output_pixel_type, limits)
        else:
            image = _read_file(multiframe, output_pixel_type, limits)
        tags = {
            "Modality": series.modality,
            "SeriesDescription": series.description,
            "SeriesInstanceUID": series.series_uid,
            "StudyInstanceUID": series.study_uid,
        }
    else:
        _check_file_to_read(path)
        image = _read_file(path, output_pixel_type, limits)
        tags = {}
        if _is_dicom_file(path):
            tags = {
                name: image.GetMetaData(key).strip()
                for name, key in SAFE_DICOM_TAGS.items()
                if image.HasMetaDataKey(key)
            }
    _keep_only_safe_metadata(image, tags)
    return image


def read_mask(path: PathLike, what: str = "mask") -> tuple[np.ndarray, sitk.Image]:
    """A one-component mask file as a boolean array in reader axis order (x, y[, z]), any non-zero value tumour (a
    label map such as BraTS's 1, 2, 4 included), and the image read (its grid and stored values).

    Raises:
        InputError: when it cannot be read or holds more than one component (``<what> has 3 components; ...``).
    """
    image = read_sitk(path)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(path, f"{what} has {image.GetNumberOfComponentsPerPixel()} components; expected one")
    return sitk.GetArrayViewFromImage(image).T > 0, image


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
    bundle config as ``"reader": "$brainseg_monai.io.SimpleITKReader"``. Build it before the ``LoadImage``: it
    silences what MONAI's other default readers say about themselves (`brainseg_monai.quiet`), once per image
    otherwise.
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
            kwargs: arguments of `read_sitk` besides the path and series choice (``output_pixel_type``,
                ``max_pixels``, ``max_voxels``).

        Raises:
            ValueError: for a bad `channel_dim`, an invalid `series_description` pattern, unknown `kwargs` or a size
                limit that is not a positive whole number.
        """
        super().__init__()
        quiet_third_party()
        if not (channel_dim is None or channel_dim == "no_channel" or isinstance(channel_dim, int)):
            raise ValueError(f"channel_dim must be None, 'no_channel' or an int but is {channel_dim!r}.")
        _compile_description(series_description)
        accepted = ["max_pixels", "max_voxels", "output_pixel_type"]
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise ValueError(f"unknown SimpleITKReader arguments {unknown}; accepted extra: {accepted}.")
        for name in ("max_pixels", "max_voxels"):
            if kwargs.get(name) is not None:
                _size_limit(kwargs[name], name, "", 1)
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


def voxel_spacing(affine: Any) -> np.ndarray:
    """Voxel spacing (mm) from the spatial block of a (d+1)x(d+1) affine, never its translation column."""
    matrix = np.asarray(affine, dtype=np.float64)
    return affine_to_spacing(matrix, r=matrix.shape[0] - 1, suppress_zeros=False)


def planar_to_volume_affine(affine: Any) -> np.ndarray:
    """The 4x4 affine of a 2D image (3x3 affine) taken as a volume of one slice: its in-plane geometry, unit z."""
    plane = np.asarray(affine, dtype=np.float64)
    volume = np.eye(4)
    volume[:2, :2], volume[:2, 3] = plane[:2, :2], plane[:2, 2]
    return volume


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
    # SimpleITK picks the format by the temporary's suffix
    compress = suffix in (".mha", ".nrrd")
    return write_atomic(path, lambda temporary: sitk.WriteImage(image, str(temporary), useCompression=compress),
                        suffix=suffix)


def write_atomic(path: PathLike, write: Callable[[Path], object], suffix: str = ".tmp") -> Path:
    """Call ``write(temporary)`` on a hidden temporary name in ``path``'s folder (created), then move it into place.

    A reader never sees half a file, and a failed or interrupted write leaves the previous file and no temporary.
    The temporary is ``.<name>.<pid>-<8 hex><suffix>`` (`ATOMIC_TEMPORARY`), made by ``write`` itself rather than by
    ``mkstemp``, whose 0600 mode would end up on the output: the file gets the permissions of any new file. Writers
    that pick the format by the name's end (SimpleITK) take the output's ``suffix``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}"
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through `write_atomic`."""
    return write_atomic(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def json_ready(value: Any) -> Any:
    """``value`` with numpy scalars as Python numbers, paths as strings and non-finite floats as None."""
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return str(value)
    return value


def write_json_atomic(path: PathLike, values: Any) -> Path:
    """Write ``values`` as indented JSON (:func:`json_ready`: no NaN, no numpy types) through `write_atomic`."""
    return write_text_atomic(path, json.dumps(json_ready(values), indent=2, allow_nan=False) + "\n")
