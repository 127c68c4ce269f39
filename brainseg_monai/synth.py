"""Seeded brain-like MR phantoms with known tumour masks, written in the layouts the datalist sources read.

The phantoms are the embedded default data: with no real data given, training, inference and the tests run on them.
One 3D phantom gives three MR channels (t1, flair, t1c) and a binary tumour mask; :func:`make_dataset` writes cases as
LGG-style RGB TIF slices, figshare-style PNG pairs, NIfTI volumes or DICOM studies (one MR series per channel).
Every output is a pure function of the seed and the settings: the same call gives the same bytes.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import SimpleITK as sitk
import tifffile
from monai.utils import look_up_option
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, PYDICOM_IMPLEMENTATION_UID, generate_uid
from skimage.filters import gaussian
from skimage.transform import resize

from brainseg_monai.errors import InputError

__all__ = [
    "CHANNELS",
    "DICOM_SERIES",
    "DICOM_FOLDERS",
    "FORMATS",
    "phantom_volume",
    "make_dataset",
    "default_dataset",
]

logger = logging.getLogger(__name__)

CHANNELS: tuple[str, ...] = ("t1", "flair", "t1c")
DICOM_SERIES: dict[str, str] = {"t1": "AX T1 PRE", "flair": "AX FLAIR", "t1c": "AX T1 POST GD"}
DICOM_FOLDERS: dict[str, str] = {"t1": "T1_PRE", "flair": "FLAIR", "t1c": "T1_POST"}
FORMATS: tuple[str, ...] = ("lgg", "pairs", "nifti", "dicom")

#: Bumped whenever the phantoms or the layouts change, so a cached dataset from older code is not taken as current.
GENERATOR_VERSION = 1
MARKER = "synth.json"

#: Default phantom size (x, y, z) per format; ``None`` for pairs means per-patient sizes of 128 and 96 alternating.
DEFAULT_SIZE: dict[str, tuple[int, int, int] | None] = {
    "lgg": (128, 128, 16),
    "pairs": None,
    "nifti": (96, 96, 64),
    "dicom": (96, 96, 32),
}
_PAIRS_SIZES = ((128, 128, 8), (96, 96, 8))
#: Slices per patient of the 2D formats when ``size`` gives only (x, y).
_SLICES_2D = {"lgg": 16, "pairs": 8}
#: Voxel spacing (mm) of the volume formats; anisotropic on purpose so resampling paths are exercised.
SPACING: dict[str, tuple[float, float, float]] = {"nifti": (1.0, 1.0, 1.5), "dicom": (0.9375, 0.9375, 3.0)}
#: Cases per format in :func:`default_dataset`: small enough to train a 2D U-Net on 2 CPU cores in minutes.
DEFAULT_CASES: dict[str, int] = {"lgg": 12, "pairs": 12, "nifti": 8, "dicom": 4}
#: Oblique geometry: rotation about x then y (degrees) and a non-zero origin (LPS, mm).
OBLIQUE_DEGREES = (12.0, 5.0)
OBLIQUE_ORIGIN = (-41.25, -58.5, 23.75)

# Tissue labels of the phantom and their (t1, flair, t1c) intensities, roughly the relative contrasts of
# clinical 1.5 T images: fat bright on T1, CSF dark on T1 and suppressed on FLAIR, white matter brighter than
# grey on T1 and darker on FLAIR, tumour dark on T1 and bright on FLAIR, with an enhancing rim on T1 post-contrast.
_BACKGROUND, _SCALP, _SKULL, _CSF, _GREY, _WHITE, _OEDEMA, _CORE, _RIM, _NECROSIS = range(10)
_INTENSITY = np.array(
    [
        # bg  scalp skull  csf  grey white oedema core  rim  necrosis
        [0.0, 0.85, 0.08, 0.12, 0.48, 0.66, 0.40, 0.34, 0.36, 0.22],  # t1
        [0.0, 0.55, 0.06, 0.08, 0.52, 0.40, 0.70, 0.92, 0.90, 0.80],  # flair
        [0.0, 0.88, 0.10, 0.14, 0.50, 0.68, 0.44, 0.42, 0.95, 0.20],  # t1c
    ],
    dtype=np.float32,
)
# Radii (fractions of the head's radial coordinate) of the layers from the outside in.
_SKULL_OUTER, _CSF_OUTER, _BRAIN_OUTER = 0.93, 0.87, 0.84
# Intensity scale of the volume formats: arbitrary MR units, like scanner output.
_MR_UNITS = 1000.0
# Stored DICOM value = (real - intercept) / slope; a non-identity rescale exercises the reader's rescale path.
_RESCALE_SLOPE, _RESCALE_INTERCEPT = 0.5, -20.0
# uint8 value of intensity 1.0 in the 2D formats (LGG TIF, PNG pairs).
_UINT8_SCALE = 200.0


def _check_size(size: Sequence[int], name: str = "size") -> tuple[int, int, int]:
    if (
        isinstance(size, (str, bytes))
        or len(size) != 3
        or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in size)
    ):
        raise ValueError(f"{name} must be three integers (x, y, z) but is {size!r}")
    x, y, z = (int(s) for s in size)
    if x < 8 or y < 8 or z < 4:
        raise ValueError(f"{name} must be at least (8, 8, 4) but is {tuple(size)!r}")
    return x, y, z


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], cells: int) -> np.ndarray:
    """Zero-mean, unit-variance random field varying over about ``1/cells`` of each axis.

    White noise on a coarse grid, lightly blurred, then linearly upsampled: much faster than blurring
    full-size noise with a wide kernel, and smooth enough for texture, bias fields and shape deformation.
    """
    coarse = rng.standard_normal(tuple(max(2, min(2 * cells, s)) for s in shape))
    field = resize(gaussian(coarse, sigma=1.0, mode="wrap"), shape, order=1, mode="reflect", anti_aliasing=False)
    field -= field.mean()
    return (field / (field.std() + 1e-6)).astype(np.float32)


def _add_tumour(
    rng: np.random.Generator, labels: np.ndarray, brain: np.ndarray, grid: Sequence[np.ndarray]
) -> None:
    """Paint one irregular tumour (deformed, rotated ellipsoid) with oedema, maybe a rim and necrosis, into ``labels``.

    Sizes are log-uniform from a couple of voxels to a third of the brain; the centre lies in the central part of
    the brain, so the top and bottom slices stay tumour-free. Only a bounding box is computed, for speed.
    """
    shape = labels.shape
    half = np.array(shape, dtype=np.float64) / 2.0
    # Centre on a voxel inside the brain's central part, so even the smallest tumour covers at least that voxel.
    candidates = np.argwhere(brain & (np.abs(grid[2]) < 0.45) & (np.abs(grid[0]) < 0.55) & (np.abs(grid[1]) < 0.6))
    if len(candidates) == 0:
        return
    centre = candidates[rng.integers(len(candidates))]
    smallest = 1.8 / half[:2].min()  # about two voxels in plane, in normalised units
    radius = math.exp(rng.uniform(math.log(smallest), math.log(0.33)))
    semi = radius * rng.uniform(0.7, 1.3, size=3)
    semi[2] = max(semi[2], 0.6 / half[2])  # at least the half slice around the centre voxel
    angle = rng.uniform(0.0, math.pi)
    oedema_width = rng.uniform(0.25, 0.8)
    reach = (1.0 + oedema_width) * 1.35 * np.array([semi[:2].max(), semi[:2].max(), semi[2]])
    lo = np.maximum(centre - np.ceil(reach * half).astype(int), 0)
    hi = np.minimum(centre + np.ceil(reach * half).astype(int) + 1, shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    dx, dy, dz = ((np.arange(lo[i], hi[i]) - centre[i]) / half[i] for i in range(3))
    dx, dy, dz = dx[:, None, None], dy[None, :, None], dz[None, None, :]
    u = math.cos(angle) * dx + math.sin(angle) * dy
    v = -math.sin(angle) * dx + math.cos(angle) * dy
    box_shape = tuple(int(b - a) for a, b in zip(lo, hi))
    wobble = 1.0 + 0.22 * _smooth_field(rng, box_shape, 3)
    dist = np.sqrt((u / semi[0]) ** 2 + (v / semi[1]) ** 2 + (dz / semi[2]) ** 2) * wobble

    region = labels[box]
    inside = brain[box]
    is_tumour = region >= _CORE
    region[inside & ~is_tumour & (dist < 1.0 + oedema_width)] = _OEDEMA
    core = inside & (dist < 1.0)
    region[core] = _CORE
    if rng.random() < 0.7:
        region[core & (dist >= 0.72)] = _RIM
    if radius > 0.12 and rng.random() < 0.6:
        region[core & (dist < 0.45)] = _NECROSIS


def phantom_volume(
    rng: np.random.Generator, size: Sequence[int] = (128, 128, 24), tumours: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One brain-like 3D MR phantom with its tumour mask.

    An ellipsoidal head (scalp, skull, CSF) around a brain with a grey/white texture and ventricles; 0-3
    irregular tumours (bright on FLAIR with oedema, dark on T1, often an enhancing rim and necrotic core on T1
    post-contrast); a smooth bias field, slight blur and Rician noise. Coordinates are normalised to the volume,
    so the same head fills any ``size``.

    Args:
        rng: the random generator; the phantom is a pure function of its state and ``size``.
        size: spatial size (x, y, z) in ITK index order; z is the slice axis.
        tumours: number of tumours; ``None`` draws 0-3 (about one case in five tumour-free).

    Returns:
        ``image`` float32 (3, x, y, z) in channel order :data:`CHANNELS`, intensities about 0-1,
        and ``mask`` uint8 (x, y, z) with 1 inside the tumour (oedema excluded).

    Raises:
        ValueError: when ``size`` is not three integers of at least (8, 8, 4) or ``tumours`` is not 0-3.
    """
    shape = _check_size(size)
    if tumours is not None and (not isinstance(tumours, (int, np.integer)) or not 0 <= tumours <= 3):
        raise ValueError(f"tumours must be None or an integer 0-3 but is {tumours!r}")
    grid = [((np.arange(n) + 0.5) / n * 2.0 - 1.0).astype(np.float32) for n in shape]
    gx, gy, gz = grid[0][:, None, None], grid[1][None, :, None], grid[2][None, None, :]

    axes = np.array([0.80, 0.90, 1.0]) * rng.uniform(0.94, 1.02, size=3)
    shift = rng.uniform(-0.03, 0.03, size=3)
    rho = np.sqrt(
        ((gx - shift[0]) / axes[0]) ** 2 + ((gy - shift[1]) / axes[1]) ** 2 + ((gz - shift[2]) / axes[2]) ** 2
    )
    rho *= 1.0 + 0.025 * _smooth_field(rng, shape, 4)

    labels = np.full(shape, _BACKGROUND, dtype=np.uint8)
    labels[rho <= 1.0] = _SCALP
    labels[rho <= _SKULL_OUTER] = _SKULL
    labels[rho <= _CSF_OUTER] = _CSF
    brain = rho <= _BRAIN_OUTER
    gyri = 0.12 * _smooth_field(rng, shape, 16)
    labels[brain] = _GREY
    labels[brain & (rho / _BRAIN_OUTER < 0.78 + gyri)] = _WHITE
    # Two lateral ventricles: small ellipsoids either side of the midline.
    for side in (-1.0, 1.0):
        ventricle = ((gx - shift[0] - side * 0.11) / 0.07) ** 2 + ((gy - shift[1] + 0.05) / 0.28) ** 2
        labels[(ventricle + ((gz - shift[2] - 0.05) / 0.22) ** 2 <= 1.0) & brain] = _CSF

    count = int(rng.choice(4, p=[0.2, 0.45, 0.2, 0.15])) if tumours is None else int(tumours)
    grid3 = (np.broadcast_to(gx, shape), np.broadcast_to(gy, shape), np.broadcast_to(gz, shape))
    for _ in range(count):
        _add_tumour(rng, labels, brain, grid3)
    mask = (labels >= _CORE).astype(np.uint8)

    contrast = _INTENSITY * rng.uniform(0.92, 1.08, size=(3, 1)).astype(np.float32)
    texture = 1.0 + 0.05 * _smooth_field(rng, shape, 12)
    bias = _smooth_field(rng, shape, 2)
    image = np.empty((3,) + shape, dtype=np.float32)
    for c in range(3):
        image[c] = contrast[c][labels] * texture * (1.0 + rng.uniform(0.04, 0.1) * bias)
    image = gaussian(image, sigma=(0.6, 0.6, 0.3), channel_axis=0, preserve_range=True, mode="nearest")
    sigma = rng.uniform(0.015, 0.035)
    real = image + sigma * rng.standard_normal(image.shape, dtype=np.float32)
    imaginary = sigma * rng.standard_normal(image.shape, dtype=np.float32)
    return np.sqrt(real * real + imaginary * imaginary).astype(np.float32), mask


def _case_rng(seed: int, index: int) -> np.random.Generator:
    """Each case has its own stream, so a case does not change when others are added."""
    return np.random.default_rng([seed, index])


def _patient_id(index: int) -> str:
    return f"SYN_{index + 1:04d}"


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values * _UINT8_SCALE), 0, 255).astype(np.uint8)


def _write_tif(path: Path, array: np.ndarray) -> None:
    # No DateTime tag and no JSON shape description: the bytes depend on the pixels only.
    tifffile.imwrite(
        path, array, photometric="rgb" if array.ndim == 3 else "minisblack", compression="zlib", metadata=None
    )


def _write_lgg(out: Path, cases: int, seed: int, size: tuple[int, int, int] | None, oblique: bool) -> None:
    size = size or DEFAULT_SIZE["lgg"]
    for index in range(cases):
        pid = _patient_id(index)
        image, mask = phantom_volume(_case_rng(seed, index), size)
        folder = out / pid
        folder.mkdir()
        rgb = _to_uint8(image)
        for z in range(size[2]):
            # ITK index order (x, y) -> file rows are y, columns are x.
            _write_tif(folder / f"{pid}_{z + 1}.tif", np.ascontiguousarray(rgb[:, :, :, z].transpose(2, 1, 0)))
            _write_tif(folder / f"{pid}_{z + 1}_mask.tif", np.ascontiguousarray(mask[:, :, z].T * np.uint8(255)))


def _write_png(path: Path, array: np.ndarray) -> None:
    writer = sitk.ImageFileWriter()
    writer.SetFileName(str(path))
    writer.Execute(sitk.GetImageFromArray(array))


def _write_pairs(out: Path, cases: int, seed: int, size: tuple[int, int, int] | None, oblique: bool) -> None:
    (out / "images").mkdir()
    (out / "masks").mkdir()
    rows = []
    t1c = CHANNELS.index("t1c")
    for index in range(cases):
        pid = _patient_id(index)
        case_size = size or _PAIRS_SIZES[index % len(_PAIRS_SIZES)]
        image, mask = phantom_volume(_case_rng(seed, index), case_size)
        grey = _to_uint8(image[t1c])
        for z in range(case_size[2]):
            name = f"{pid}_{z + 1:02d}"
            _write_png(out / "images" / f"{name}.png", np.ascontiguousarray(grey[:, :, z].T))
            _write_png(out / "masks" / f"{name}.png", np.ascontiguousarray(mask[:, :, z].T * np.uint8(255)))
            has_tumour = bool(mask[:, :, z].any())
            rows.append([name, pid, int(has_tumour), "tumour" if has_tumour else "no_tumour", index % 5 + 1])
    with open(out / "cases.csv", "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["name", "pid", "label", "label_name", "cv_fold"])
        writer.writerows(rows)


def _geometry(oblique: bool) -> tuple[np.ndarray, np.ndarray]:
    """Direction (columns: row, column and slice axes in LPS) and origin (LPS, mm) of a volume."""
    if not oblique:
        return np.eye(3), np.zeros(3)
    ax, ay = (math.radians(a) for a in OBLIQUE_DEGREES)
    rot_x = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    rot_y = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    return rot_x @ rot_y, np.array(OBLIQUE_ORIGIN, dtype=np.float64)


def _write_nifti(
    path: Path,
    array: np.ndarray,
    spacing: Sequence[float],
    direction: np.ndarray,
    origin: np.ndarray,
) -> None:
    """Write an (x, y, z) array with an LPS geometry (what SimpleITK reports) as NIfTI (RAS affine).

    nibabel writes gzip with mtime 0 and no file name, so the bytes depend on the content only.
    """
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(spacing, dtype=np.float64)[None, :]
    affine[:3, 3] = origin
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # LPS -> RAS
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    nib.save(image, str(path))


def _write_nifti_cases(out: Path, cases: int, seed: int, size: tuple[int, int, int] | None, oblique: bool) -> None:
    size = size or DEFAULT_SIZE["nifti"]
    spacing = SPACING["nifti"]
    direction, origin = _geometry(oblique)
    for index in range(cases):
        pid = _patient_id(index)
        image, mask = phantom_volume(_case_rng(seed, index), size)
        folder = out / pid
        folder.mkdir()
        for c, channel in enumerate(CHANNELS):
            values = image[c] * np.float32(_MR_UNITS)
            _write_nifti(folder / f"{pid}_{channel}.nii.gz", values, spacing, direction, origin)
        _write_nifti(folder / f"{pid}_seg.nii.gz", mask, spacing, direction, origin)


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters) with ample precision for geometry."""
    text = f"{value:.10g}"
    return "0" if text == "-0" else text


def _mr_slice(
    pixels: np.ndarray,
    channel: str,
    k: int,
    position: Sequence[str],
    orientation: Sequence[str],
    spacing: Sequence[float],
    uids: dict[str, str],
    pid: str,
    slice_location: float,
) -> Dataset:
    """One MR Image Storage instance of an axial series: patient, study, series, frame of reference, pixels."""
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = uids["sop"]
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = uids["sop"]
    # Fixed synthetic date and time, never the clock's.
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20000101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = ""
    ds.Modality = "MR"
    ds.Manufacturer = "brainseg-monai synthetic phantom"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "SYNTHETIC BRAIN PHANTOM"
    ds.SeriesDescription = DICOM_SERIES[channel]
    ds.PatientName = f"SYNTH^{pid.split('_')[1]}"
    ds.PatientID = pid
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = "BRAIN"
    flair = channel == "flair"
    ds.ScanningSequence = ["SE", "IR"] if flair else "SE"
    ds.SequenceVariant = "SK" if flair else "NONE"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.SliceThickness = _ds(spacing[2])
    ds.RepetitionTime = "9000" if flair else "500"
    ds.EchoTime = "120" if flair else "12"
    if flair:
        ds.InversionTime = "2500"
    ds.EchoTrainLength = "16" if flair else "1"
    ds.MagneticFieldStrength = "1.5"
    ds.ImagedNucleus = "1H"
    ds.SpacingBetweenSlices = _ds(spacing[2])
    if channel == "t1c":
        ds.ContrastBolusAgent = "GADOLINIUM"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.StudyID = "1"
    ds.SeriesNumber = CHANNELS.index(channel) + 1
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = list(position)
    ds.ImageOrientationPatient = list(orientation)
    ds.FrameOfReferenceUID = uids["frame"]
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _ds(slice_location)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]  # row spacing (along y), column spacing (along x)
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.WindowCenter = "500"
    ds.WindowWidth = "1000"
    ds.RescaleIntercept = _ds(_RESCALE_INTERCEPT)
    ds.RescaleSlope = _ds(_RESCALE_SLOPE)
    ds.RescaleType = "US"
    ds.PixelData = pixels.astype("<i2").tobytes()
    return ds


def _write_dicom(out: Path, cases: int, seed: int, size: tuple[int, int, int] | None, oblique: bool) -> None:
    size = size or DEFAULT_SIZE["dicom"]
    spacing = SPACING["dicom"]
    direction, origin = _geometry(oblique)
    orientation = [_ds(v) for v in np.concatenate([direction[:, 0], direction[:, 1]])]
    # The truth is written in the geometry SimpleITK derives from the tags, i.e. from the rounded strings.
    row, column = np.array([float(v) for v in orientation[:3]]), np.array([float(v) for v in orientation[3:]])
    normal = np.cross(row, column)
    positions = [[_ds(v) for v in origin + k * spacing[2] * direction[:, 2]] for k in range(size[2])]
    for index in range(cases):
        pid = _patient_id(index)
        image, mask = phantom_volume(_case_rng(seed, index), size)
        study = generate_uid(entropy_srcs=["brainseg-monai synth", str(seed), pid, "study", f"oblique={oblique}"])
        frame = generate_uid(entropy_srcs=["brainseg-monai synth", str(seed), pid, "frame", f"oblique={oblique}"])
        stored = np.rint((image * np.float32(_MR_UNITS) - _RESCALE_INTERCEPT) / _RESCALE_SLOPE)
        stored = np.clip(stored, np.iinfo(np.int16).min, np.iinfo(np.int16).max).astype(np.int16)
        case_folder = out / pid
        case_folder.mkdir()
        for c, channel in enumerate(CHANNELS):
            folder = case_folder / DICOM_FOLDERS[channel]
            folder.mkdir()
            series = generate_uid(entropy_srcs=[study, channel, "series"])
            for k in range(size[2]):
                uids = {
                    "study": study,
                    "frame": frame,
                    "series": series,
                    "sop": generate_uid(entropy_srcs=[series, str(k)]),
                }
                location = float(np.dot([float(v) for v in positions[k]], normal))
                ds = _mr_slice(
                    np.ascontiguousarray(stored[c, :, :, k].T), channel, k, positions[k], orientation, spacing,
                    uids, pid, location,
                )
                pydicom.dcmwrite(folder / f"IM{k + 1:04d}.dcm", ds, enforce_file_format=True)
        first = np.array([float(v) for v in positions[0]])
        _write_nifti(
            case_folder / f"{pid}_seg.nii.gz", mask, spacing, np.stack([row, column, normal], axis=1), first
        )


_WRITERS = {"lgg": _write_lgg, "pairs": _write_pairs, "nifti": _write_nifti_cases, "dicom": _write_dicom}


def _settings(fmt: str, cases: int, seed: int, size: tuple[int, int, int] | None, oblique: bool) -> dict:
    return {
        "generator": "brainseg_monai.synth",
        "version": GENERATOR_VERSION,
        "format": fmt,
        "cases": cases,
        "seed": seed,
        "size": None if size is None else list(size),
        "oblique": oblique,
    }


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _check_existing(out: Path, settings: dict) -> bool:
    """True when ``out`` already holds this dataset; raises when it holds anything else; False when absent/empty."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise InputError(out, "exists and is not a folder; refusing to overwrite it with a synthetic dataset")
    if not any(out.iterdir()):
        return False
    marker = _read_marker(out)
    if marker == settings:
        return True
    if marker is None:
        raise InputError(
            out, f"is not empty and holds no complete synthetic dataset ({MARKER} missing); refusing to overwrite it"
        )
    raise InputError(
        out,
        f"holds a synthetic dataset made with other settings ({json.dumps(marker, sort_keys=True)}), not "
        f"{json.dumps(settings, sort_keys=True)}; choose another folder or remove this one",
    )


def make_dataset(
    out: str | os.PathLike,
    fmt: str,
    cases: int = 6,
    seed: int = 0,
    size: Sequence[int] | None = None,
    oblique: bool = False,
) -> Path:
    """Write ``cases`` seeded phantoms into ``out`` in one of the layouts the datalist sources read.

    Layouts (``<pid>`` is ``SYN_0001``, ``SYN_0002``, ...):

    - ``lgg``: ``<pid>/<pid>_<n>.tif`` RGB uint8 (t1, flair, t1c) and ``<pid>/<pid>_<n>_mask.tif`` {0, 255},
      n = 1.. the axial slices of one phantom (default 128 x 128 x 16).
    - ``pairs``: ``images/<name>.png`` grey uint8 (the t1c slice), ``masks/<name>.png`` {0, 255} and ``cases.csv``
      (``name,pid,label,label_name,cv_fold``; label 1 = slice with tumour; cv_fold 1-5 by patient); by default
      8 slices per patient, patients alternately 128 x 128 and 96 x 96.
    - ``nifti``: ``<pid>/<pid>_{t1,flair,t1c}.nii.gz`` float32 and ``<pid>/<pid>_seg.nii.gz`` uint8 {0, 1};
      default 96 x 96 x 64 at 1 x 1 x 1.5 mm.
    - ``dicom``: ``<pid>/{T1_PRE,FLAIR,T1_POST}/IM<kkkk>.dcm``, one MR series per channel (:data:`DICOM_SERIES`),
      int16 with rescale, and the truth ``<pid>/<pid>_seg.nii.gz`` in the series' geometry; default
      96 x 96 x 32 at 0.9375 x 0.9375 x 3 mm.

    The dataset is generated in a temporary sibling folder and renamed into place with ``synth.json`` (the
    settings) written last, so ``out`` is either complete or absent, concurrent calls are safe, and a repeat
    call with the same settings does nothing.

    Args:
        out: folder to create (or an empty one).
        fmt: one of :data:`FORMATS`.
        cases: number of patients (phantoms).
        seed: the outputs are byte-identical for the same seed and settings.
        size: phantom size (x, y, z), z being the slices per patient; for lgg and pairs (x, y) keeps the default
            slices per patient (16 and 8); ``None`` for the format's default (:data:`DEFAULT_SIZE`).
        oblique: tilt the slices (12 degrees about x, 5 about y) and move the origin; nifti and dicom only.

    Returns:
        The absolute path of ``out``.

    Raises:
        ValueError: for a bad ``fmt``, ``cases``, ``seed``, ``size`` or ``oblique``.
        InputError: when ``out`` exists and is not empty and is not this very dataset (nothing is overwritten).
    """
    fmt = look_up_option(fmt, FORMATS)
    if not isinstance(cases, (int, np.integer)) or isinstance(cases, bool) or cases < 1:
        raise ValueError(f"cases must be a positive integer but is {cases!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer but is {seed!r}")
    if size is not None and fmt in ("lgg", "pairs") and not isinstance(size, (str, bytes)) and len(size) == 2:
        size = (*size, _SLICES_2D[fmt])
    checked_size = None if size is None else _check_size(size)
    if not isinstance(oblique, bool):
        raise ValueError(f"oblique must be a bool but is {oblique!r}")
    if oblique and fmt not in ("nifti", "dicom"):
        raise ValueError(f"oblique=True needs fmt 'nifti' or 'dicom' (2D slices have no geometry) but fmt is {fmt!r}")
    out = Path(out).expanduser().absolute()
    settings = _settings(fmt, int(cases), int(seed), checked_size, oblique)
    if _check_existing(out, settings):
        logger.info("%s already holds the synthetic %s dataset (seed %d); nothing to do", out, fmt, seed)
        return out

    out.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 mode would end up on ``out``; mkdir honours the umask like any new folder.
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        logger.info("writing %d synthetic %s cases (seed %d) to %s", cases, fmt, seed, out)
        _WRITERS[fmt](tmp, int(cases), int(seed), checked_size, oblique)
        (tmp / MARKER).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        try:
            os.replace(tmp, out)  # atomic; succeeds onto an absent or empty folder
        except OSError:
            if _check_existing(out, settings):  # another process finished the same dataset first
                shutil.rmtree(tmp)
                return out
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def default_dataset(fmt: str = "lgg", root: str | os.PathLike | None = None) -> Path:
    """The embedded default data: the seed-0 synthetic dataset of ``fmt``, made on first use and cached.

    Args:
        fmt: one of :data:`FORMATS`.
        root: cache folder; defaults to ``$BRAINSEG_DATA_DIR`` or ``~/.cache/brainseg-monai``.

    Returns:
        ``<root>/synth-v<GENERATOR_VERSION>-<fmt>-seed0`` holding :data:`DEFAULT_CASES` cases of the format's
        default size; the version in the name means a newer generator makes a new folder instead of failing.

    Raises:
        ValueError: for a bad ``fmt``.
        InputError: when that folder holds something else.
    """
    fmt = look_up_option(fmt, FORMATS)
    if root is None:
        root = os.environ.get("BRAINSEG_DATA_DIR") or Path.home() / ".cache" / "brainseg-monai"
    return make_dataset(Path(root).expanduser() / f"synth-v{GENERATOR_VERSION}-{fmt}-seed0", fmt, cases=DEFAULT_CASES[fmt], seed=0)
