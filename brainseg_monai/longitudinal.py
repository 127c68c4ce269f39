"""How a patient's tumour changed between two studies: ``brainseg compare BEFORE AFTER --out R``.

Each study is segmented by the batch job of ``brainseg infer`` (or its mask is given), the AFTER image is registered
rigidly onto the BEFORE image (SimpleITK: Mattes mutual information, three resolutions, an Euler transform started
from the centres of the two grids) and the AFTER mask is resampled onto BEFORE's grid. The report gives the tumour
volume at each date, the absolute and relative change, the change of the mean diameter (the diameter of a sphere of
that volume) and, when both study dates are known, its rate in mm per year: the growth measure of lower-grade glioma
(Mandonnet et al., Ann Neurol 2003; Pallud et al., Neuro-Oncology 2013). Voxels gained and lost are counted on
BEFORE's grid.

Each study is registered on the image its mask lies on: for DICOM the primary series of the model (FLAIR for the
shipped model), for volumes the mask's image. Folders of 2D slices (the LGG layout) carry no spacing: their slices are
stacked with unit spacing, so sizes are in voxels, and only in-plane rotation and shifts are registered.

Two studies whose DICOM PatientIDs differ are refused unless forced; the IDs are named in that message and never
written to the report.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from brainseg_monai.channel_roles import InputRoles, role_from_name
from brainseg_monai.errors import InputError
from brainseg_monai.inference.cases import MASK_STEM_SUFFIXES, Case, discover_cases
from brainseg_monai.inference.outputs import CASE_MARKER, VOLUME_MASK, slice_output_names
from brainseg_monai.inference.runner import InferenceSettings, run_inference
from brainseg_monai.inference.writers import grey_window, overlay_slice
from brainseg_monai.io import (IMAGE_2D_SUFFIXES, ImageHeader, json_ready, read_header, read_sitk, write_json_atomic,
                               write_text_atomic)
from brainseg_monai.report import save_figure
from brainseg_monai.sequences import ROLES, classify_series

__all__ = ["StudyScan", "compare_studies", "register_rigid", "sphere_diameter"]

logger = logging.getLogger(__name__)

#: one image per case: discovery lists every series and volume of an input as a candidate for the mask's image
_ONE_IMAGE = InputRoles(("flair",), "flair")
#: of a 3-channel 2D slice (LGG: pre-contrast, FLAIR, post-contrast), the FLAIR channel, as the overlays show it
_FLAIR_OF_RGB = 1
#: the mask slice names looked for beside each 2D slice ``<stem>``: brainseg infer's, then the LGG and common truths
_MASK_SUFFIXES = MASK_STEM_SUFFIXES + ("",)  # "": a mask folder beside the image folder, named as the images
#: Mattes mutual information samples about this many voxels per resolution level: enough for its 50-bin histogram
#: (0.1 mm on a real FLAIR series), and the time of one registration stays in seconds
_SAMPLES_PER_LEVEL = 20_000
_HISTOGRAM_BINS = 50
#: the coarsest level keeps at least this many voxels along every axis
_MIN_LEVEL_SIZE = 8
_DAYS_PER_YEAR = 365.25
#: Okabe-Ito colours, told apart with colour-blindness too
_GAINED, _LOST, _UNCHANGED = "#D55E00", "#0072B2", "#F0E442"


@dataclass
class StudyScan:
    """One date's study as compared: the image the mask lies on, the mask, and who and when.

    ``image`` is a 3D float32 SimpleITK image; ``mask`` a uint8 {0, 1} image on its grid. ``stack`` is True for 2D
    slices stacked with unit spacing (sizes in voxels). ``study_date`` comes from the DICOM header or ``--dates``
    (``date_from`` says which; both None when unknown).
    """

    source: str
    kind: str
    image: sitk.Image
    mask: sitk.Image
    described: str
    mask_source: str
    stack: bool = False
    study_date: date | None = None
    date_from: str | None = None


@dataclass
class _Identity:
    """Who and when a study is, from the DICOM headers of the images found in it."""

    patient_id: str | None
    study_date: date | None


def sphere_diameter(volume: float) -> float:
    """The diameter of a sphere of ``volume`` (mm for mm^3): the "mean diameter" of glioma growth curves."""
    return (6.0 * volume / math.pi) ** (1.0 / 3.0)


def _parse_date(text: str, what: str) -> date:
    """``YYYY-MM-DD`` (``--dates``) or DICOM's ``YYYYMMDD``.

    Raises:
        ValueError: naming ``what`` and the text when it is neither.
    """
    for layout in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return datetime.strptime(text.strip(), layout).date()
        except ValueError:
            continue
    raise ValueError(f"{what} must be a date YYYY-MM-DD but is {text!r}")


def _candidates(source: Path, exclude: Sequence[Path]) -> list[Case]:
    """Every image of ``source`` as ``brainseg infer`` finds it, one per series, volume or folder of slices.

    Raises:
        InputError: when ``source`` holds nothing usable.
    """
    cases = [c for c in discover_cases([source], _ONE_IMAGE, exclude=exclude) if not c.error]
    if not cases:
        raise InputError(source, "holds no image, volume or DICOM series to compare")
    return cases


def _first_file(case: Case) -> str | None:
    """A DICOM file of ``case`` whose header names the patient and the study, or None when it holds no DICOM."""
    if case.series:
        return case.series[0].files[0]
    if case.kind == "volume" and case.images and pydicom.misc.is_dicom(case.images[0]):
        return case.images[0]
    return None


def _identity(source: Path, cases: Sequence[Case]) -> _Identity:
    """PatientID and StudyDate of the DICOM among ``cases`` (None where not DICOM or not recorded).

    Raises:
        InputError: when ``source`` holds studies of several patients or dates: one input is one study.
    """
    patients, dates = set(), set()
    for case in cases:
        path = _first_file(case)
        if path is None:
            continue
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID", "StudyDate"])
        except Exception as err:  # pydicom raises many types for a damaged file
            raise InputError(path, f"its DICOM header cannot be read ({err})") from err
        if str(header.get("PatientID", "")).strip():
            patients.add(str(header.PatientID).strip())
        if str(header.get("StudyDate", "")).strip():
            dates.add(str(header.StudyDate).strip())
    if len(patients) > 1:
        raise InputError(source, f"holds studies of {len(patients)} patients (PatientID "
                                 f"{', '.join(sorted(patients))}); point at one study")
    if len(dates) > 1:
        raise InputError(source, f"holds studies of {len(dates)} dates (StudyDate {', '.join(sorted(dates))}); "
                                 f"point at one study")
    study_date = None
    if dates:
        try:
            study_date = _parse_date(next(iter(dates)), f"the StudyDate of {source}")
        except ValueError as err:  # scanners write '2000.01.01' and worse: the date is unknown, not the study bad
            logger.warning("%s: taken as unknown", err)
    return _Identity(next(iter(patients), None), study_date)


def _check_same_patient(before: Path, after: Path, ids: Sequence[_Identity], force: bool) -> bool | None:
    """Whether the two studies are of one patient (None when a PatientID is unknown).

    Raises:
        InputError: naming both inputs and their PatientIDs when they differ, unless ``force``.
    """
    first, second = ids[0].patient_id, ids[1].patient_id
    if first is None or second is None:
        return None
    if first != second and not force:
        raise InputError(None, f"{before} (PatientID {first}) and {after} (PatientID {second}) are studies of "
                               f"different patients: a comparison would mean nothing. Check the inputs; if they are "
                               f"one patient under two IDs, pass --force")
    return first == second


def _scalar(image: sitk.Image) -> sitk.Image:
    """One channel of ``image``: FLAIR of a 3-channel (LGG RGB) image, else the first."""
    components = image.GetNumberOfComponentsPerPixel()
    if components > 1:
        image = sitk.VectorIndexSelectionCast(image, _FLAIR_OF_RGB if components == 3 else 0)
    return image


def _grid(image: sitk.Image | ImageHeader) -> tuple[tuple, ...]:
    """Size, spacing, origin and direction of an image, or of a header read without the pixels."""
    if isinstance(image, sitk.Image):
        return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()
    return image.size, image.spacing, image.origin, image.direction


def _same_grid(a: tuple[tuple, ...], b: tuple[tuple, ...]) -> bool:
    """Whether two grids are one, up to the rounding of a NIfTI round trip (0.01 mm, 1e-4 of spacing and cosines)."""
    return (tuple(a[0]) == tuple(b[0]) and np.allclose(a[1], b[1], rtol=1e-4, atol=0)
            and np.allclose(a[2], b[2], atol=1e-2) and np.allclose(a[3], b[3], atol=1e-4))


def _read_mask(path: Path, image: sitk.Image) -> sitk.Image:
    """The binary mask (non-zero is tumour) in ``path``, put on ``image``'s grid.

    Not `brainseg_monai.io.read_mask`: registration needs the mask as a SimpleITK image on ``image``'s grid, and a
    3-channel mask slice is read as its image slices are (:func:`_scalar`).

    Raises:
        InputError: when it does not lie on that grid.
    """
    mask = _scalar(read_sitk(path))
    if not _same_grid(_grid(mask), _grid(image)):
        raise InputError(path, f"does not lie on its image's grid (mask size {mask.GetSize()}, spacing "
                               f"{_rounded(mask.GetSpacing())}; image size {image.GetSize()}, spacing "
                               f"{_rounded(image.GetSpacing())}): give the mask segmented on that image")
    mask = sitk.Cast(mask != 0, sitk.sitkUInt8)
    mask.CopyInformation(image)
    return mask


def _rounded(values: Sequence[float], digits: int = 3) -> list[float]:
    return [round(float(v), digits) for v in values]


def _check_volume(image: sitk.Image, source: str) -> None:
    """Raises: InputError: when ``image`` is not a volume of at least 3 voxels along every axis (no rigid 3D fit)."""
    if image.GetDimension() != 3 or min(image.GetSize()) < 3:
        raise InputError(source, f"is not a volume of at least 3 slices (size {image.GetSize()}): a tumour's change "
                                 f"is measured in 3D")


def _stack(paths: Sequence[str], source: str) -> sitk.Image:
    """2D slices (in the given order) stacked into a volume with unit spacing; one channel each (:func:`_scalar`).

    Raises:
        InputError: when the slices differ in size.
    """
    planes = [sitk.GetArrayFromImage(_scalar(read_sitk(p))) for p in paths]
    sizes = {plane.shape for plane in planes}
    if len(sizes) > 1:
        raise InputError(source, f"holds slices of several sizes {sorted(sizes)}: they do not stack into one volume")
    return sitk.GetImageFromArray(np.stack(planes).astype(np.float32))


def _slice_masks(slices: Sequence[str], folder: Path) -> list[Path]:
    """The mask of each 2D slice in ``folder``: ``<stem>_pred.png`` (brainseg infer), ``<stem>_mask.*`` (LGG),
    ``<stem>_seg.*``, ``<stem>_label.*``, or a file of the slice's own name (image and mask folders side by side).

    Raises:
        InputError: naming the first slice without a mask.
    """
    if not folder.is_dir():
        raise InputError(folder, "is not a folder: the masks of a folder of slices are a folder of mask slices")
    by_stem: dict[str, Path] = {}
    for entry in sorted(folder.iterdir()):
        if entry.suffix.lower() in IMAGE_2D_SUFFIXES:
            by_stem.setdefault(entry.stem, entry)
    found = []
    for path in map(Path, slices):
        hits = [by_stem[path.stem + suffix] for suffix in _MASK_SUFFIXES if path.stem + suffix in by_stem]
        hits = [hit for hit in hits if os.path.abspath(hit) != os.path.abspath(path)]
        if not hits:
            raise InputError(folder, f"holds no mask for slice {path.name} (looked for {path.stem}_pred.png, "
                                     f"{path.stem}_mask.*, {path.stem}_seg.*, {path.stem}_label.* or {path.name})")
        found.append(hits[0])
    return found


def _stacked_scan(case: Case, masks: Sequence[Path], mask_source: str) -> StudyScan:
    """A folder of 2D slices and their masks as one unit-spacing volume."""
    image = _stack(case.images, case.source)
    _check_volume(image, case.source)
    mask = sitk.Cast(_stack([str(m) for m in masks], mask_source) != 0, sitk.sitkUInt8)
    if mask.GetSize() != image.GetSize():
        raise InputError(mask_source, f"mask slices of size {mask.GetSize()[:2]} do not match the slices of "
                                      f"{case.source} ({image.GetSize()[:2]})")
    return StudyScan(case.source, "slices", image, mask, f"{len(case.images)} slices of {case.source}, stacked",
                     mask_source, stack=True)


def _read_image(case: Case) -> sitk.Image:
    """The (one-channel, float32) volume of a volume or DICOM case."""
    if case.series:
        series = case.series[0]
        image = read_sitk(series.folder, series_uid=series.series_uid)
    else:
        image = read_sitk(case.images[0])
    return sitk.Cast(_scalar(image), sitk.sitkFloat32)


def _describe(case: Case) -> str:
    """The image of a case in words: ``series 'AXIAL FLAIR' (UID) in FOLDER`` or the file."""
    if case.series:
        series = case.series[0]
        return f"series '{series.description}' ({series.series_uid}) in {series.folder}"
    return case.images[0]


def _is_flair(case: Case) -> bool:
    """Whether a candidate image is a FLAIR: a series by its header, a file by its name."""
    if case.series:
        series = case.series[0]
        return classify_series(series.header, series.description, len(series.files)).role == "flair"
    return role_from_name(Path(case.images[0]).name, ROLES) == "flair"


def _header(case: Case) -> ImageHeader:
    """The geometry of a volume or DICOM case's image, read without its pixels."""
    if case.series:
        return read_header(case.series[0].folder, series_uid=case.series[0].series_uid)
    return read_header(case.images[0])


def _image_of_mask(source: Path, cases: Sequence[Case], mask: Path) -> Case:
    """The image ``mask`` lies on among the volumes and series of ``source``: the one on its grid, a FLAIR first.

    Raises:
        InputError: when no image or several non-FLAIR images lie on the mask's grid.
    """
    mask_grid = _grid(read_header(mask))
    on_grid = [c for c in cases if c.kind != "slices" and _same_grid(_grid(_header(c)), mask_grid)]
    if len(on_grid) > 1:
        on_grid = [c for c in on_grid if _is_flair(c)] or on_grid
    if len(on_grid) == 1:
        return on_grid[0]
    listing = "; ".join(_describe(c) for c in (on_grid or cases) if c.kind != "slices")
    if on_grid:
        raise InputError(source, f"{len(on_grid)} images lie on the grid of mask {mask} and none is the one FLAIR: "
                                 f"{listing}; point at the one the mask was segmented on")
    raise InputError(source, f"holds no image on the grid of mask {mask} (size {mask_grid[0]}, spacing "
                             f"{_rounded(mask_grid[1])}); images: {listing or 'none'}")


def _masked_scan(source: Path, cases: Sequence[Case], mask: Path) -> StudyScan:
    """A study with its given mask: a folder of slices with a folder of mask slices, or the image a mask file lies on.

    Raises:
        InputError: when the mask fits no image of ``source`` or ``source`` holds several folders of slices.
    """
    if not mask.exists():
        raise InputError(mask, "no such mask file or folder")
    slices = [c for c in cases if c.kind == "slices"]
    if not mask.is_dir() and len(slices) == len(cases):
        raise InputError(mask, f"is a file, but {source} is a folder of 2D slices: give the folder of its mask slices")
    if mask.is_dir():
        if len(slices) != 1:
            raise InputError(source, f"holds {len(slices)} folders of 2D slices; a folder of masks ({mask}) needs "
                                     f"one: point at one patient's folder")
        return _stacked_scan(slices[0], _slice_masks(slices[0].images, mask), str(mask))
    case = _image_of_mask(source, cases, mask)
    image = _read_image(case)
    _check_volume(image, case.source)
    return StudyScan(case.source, case.kind, image, _read_mask(mask, image), _describe(case), str(mask))


def _segmented_scan(source: Path, work: Path, settings: InferenceSettings) -> StudyScan:
    """Segment ``source`` with the batch job of ``brainseg infer`` into ``work`` and read back its one case: the
    primary series or file the mask lies on (``case.json``), or the slices and their ``<stem>_pred.png``.

    Raises:
        InputError: when ``source`` holds other than one case or its case failed.
    """
    rows = run_inference([source], work, settings)
    if len(rows) != 1:
        raise InputError(source, f"holds {len(rows)} cases ({', '.join(r['case'] for r in rows)}); point at one study")
    row = rows[0]
    if row["status"] != "ok":
        raise InputError(source, f"could not be segmented: {row['error']}")
    folder = work / row["case"]
    marker = json.loads((folder / CASE_MARKER).read_text())
    if row["kind"] == "slices":
        slices = list(marker["inputs"])
        case = Case(row["case"], row["source"], "slices", slices)
        return _stacked_scan(case, [folder / name for name in slice_output_names(slices)], str(folder))
    channels = marker.get("channels") or {}
    primary = next((r for r in channels.get("roles", []) if r.get("channel") == channels.get("primary")), None)
    if row["kind"] == "dicom" and primary is not None:
        series = primary["series"]
        image = read_sitk(series["folder"], series_uid=series["uid"])
        described = f"series '{series['description']}' ({series['uid']}) in {series['folder']}"
    else:
        path = Path(row["source"]) / primary["file"] if primary is not None else Path(marker["inputs"][0])
        image, described = read_sitk(path), str(path)
    image = sitk.Cast(_scalar(image), sitk.sitkFloat32)
    _check_volume(image, row["source"])
    return StudyScan(str(source), row["kind"], image, _read_mask(folder / VOLUME_MASK, image), described,
                     str(folder / VOLUME_MASK))


def _levels(image: sitk.Image) -> list[int]:
    """Shrink factors of the resolution pyramid, coarse to fine: 4, 2, 1 where the coarse grid keeps some size."""
    smallest = min(image.GetSize())
    return [f for f in (4, 2, 1) if f == 1 or smallest // f >= _MIN_LEVEL_SIZE]


def register_rigid(fixed: sitk.Image, moving: sitk.Image, in_plane: bool = False) -> tuple[sitk.Euler3DTransform, dict]:
    """The rigid transform that maps ``fixed``'s physical points onto ``moving``'s, and how it was found.

    Mattes mutual information (so the two studies' intensities need not match), about 20 000 random samples per
    level of a 4-2-1 pyramid (Gaussian smoothing of half the shrink factor), a regular-step gradient descent with
    steps scaled to physical shift, started by ``CenteredTransformInitializer`` on the grids' centres (geometry).

    Args:
        fixed: the BEFORE image (3D, scalar).
        moving: the AFTER image (3D, scalar).
        in_plane: only the rotation about the slice axis and the shifts (a stack of 2D slices, whose slice axis has
            no physical spacing to rotate in).

    Returns:
        The transform (``Resample(after, before, transform)`` puts AFTER on BEFORE's grid) and a record: rotation
        (degrees about x, y, z), translation, and the exact ``center`` and ``parameters`` that rebuild the transform,
        metric value, iterations and the optimizer's stop condition.
    """
    fixed, moving = sitk.Cast(fixed, sitk.sitkFloat32), sitk.Cast(moving, sitk.sitkFloat32)
    transform = sitk.Euler3DTransform(sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.GEOMETRY))
    levels = _levels(fixed)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=_HISTOGRAM_BINS)
    method.SetMetricSamplingStrategy(method.RANDOM)
    voxels = math.prod(fixed.GetSize())
    method.SetMetricSamplingPercentagePerLevel(
        [min(1.0, _SAMPLES_PER_LEVEL * f ** 3 / voxels) for f in levels], seed=1)  # seeded: the same report each run
    method.SetInterpolator(sitk.sitkLinear)
    # first steps of 1 mm (or voxel), stopping below 0.01: far finer than any voxel, and no time spent beyond it
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=0.01, numberOfIterations=200,
                                                    gradientMagnitudeTolerance=1e-8)
    method.SetOptimizerScalesFromPhysicalShift()
    if in_plane:  # Euler3D's parameters: angles about x, y, z, then the translation
        method.SetOptimizerWeights([0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    method.SetShrinkFactorsPerLevel(levels)
    method.SetSmoothingSigmasPerLevel([f / 2 if f > 1 else 0.0 for f in levels])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    method.SetInitialTransform(transform, inPlace=True)
    method.Execute(fixed, moving)
    record = {
        "transform": "Euler3DTransform",
        "mode": "2d-stack" if in_plane else "3d",
        "rotation_deg": _rounded(np.degrees(transform.GetParameters()[:3]), 4),
        "translation": _rounded(transform.GetTranslation(), 4),
        "center": list(transform.GetCenter()),
        "parameters": list(transform.GetParameters()),
        "metric": "Mattes mutual information",
        "metric_value": round(method.GetMetricValue(), 6),
        "shrink_factors": levels,
        "iterations_last_level": method.GetOptimizerIteration(),
        "stop": method.GetOptimizerStopConditionDescription(),
    }
    return transform, record


def _volume(voxels: int, scan: StudyScan) -> float | None:
    """``voxels`` of ``scan``'s grid in ml; None for a stack of 2D slices (no spacing)."""
    return None if scan.stack else voxels * math.prod(scan.mask.GetSpacing()) / 1000.0


def _measures(before: StudyScan, after: StudyScan, on_before: np.ndarray, days: int | None) -> dict:
    """Volumes at each date (on each study's own grid), their change, the mean diameter's change and rate, and the
    voxels gained, lost and unchanged on BEFORE's grid."""
    first = sitk.GetArrayViewFromImage(before.mask).astype(bool)
    counts = [int(first.sum()), int(np.count_nonzero(sitk.GetArrayViewFromImage(after.mask)))]
    volumes = [_volume(counts[0], before), _volume(counts[1], after)]
    sizes = volumes if volumes[0] is not None else counts  # ml, or voxels for stacks
    diameters = [None if v is None else sphere_diameter(v * 1000.0) for v in volumes]
    gained, lost = on_before & ~first, first & ~on_before
    change: dict[str, Any] = {
        "voxels": counts[1] - counts[0],
        "volume_ml": None if volumes[0] is None else volumes[1] - volumes[0],
        "relative_pct": 100.0 * (sizes[1] - sizes[0]) / sizes[0] if sizes[0] else None,
        "mean_diameter_mm": None if diameters[0] is None else diameters[1] - diameters[0],
        "interval_days": days,
        "rate_mm_per_year": None,
        "gained_voxels": int(gained.sum()),
        "lost_voxels": int(lost.sum()),
        "unchanged_voxels": int((first & on_before).sum()),
        "gained_ml": _volume(int(gained.sum()), before),
        "lost_ml": _volume(int(lost.sum()), before),
    }
    if change["mean_diameter_mm"] is not None and days:
        change["rate_mm_per_year"] = change["mean_diameter_mm"] / (days / _DAYS_PER_YEAR)
    dates = [{"voxels": n, "volume_ml": v, "mean_diameter_mm": d} for n, v, d in zip(counts, volumes, diameters)]
    return {"dates": dates, "change": change}


def _picture(before: StudyScan, first: np.ndarray, second: np.ndarray, path: Path) -> dict:
    """``compare.png``: BEFORE's slice with most tumour in grey, the tumour gained, lost and unchanged in colour."""
    k = overlay_slice((first | second).T)  # the overlays' slice of the union: (z, y, x) arrays -> (x, y, z)
    plane = sitk.GetArrayViewFromImage(before.image)[k]  # rows y, columns x: as the overlays
    rgb = np.repeat(grey_window(plane)[..., None], 3, axis=-1)
    parts = {"gained": (second[k] & ~first[k], _GAINED), "lost": (first[k] & ~second[k], _LOST),
             "unchanged": (first[k] & second[k], _UNCHANGED)}
    for inside, colour in parts.values():
        rgb[inside] = 0.4 * rgb[inside] + 0.6 * np.array(to_rgb(colour))
    spacing = before.image.GetSpacing()
    figure = Figure(figsize=(6.4, 6.4 * plane.shape[0] * spacing[1] / (plane.shape[1] * spacing[0]) + 0.6))
    axes = figure.add_subplot()
    axes.imshow(rgb, aspect=spacing[1] / spacing[0], interpolation="nearest")
    axes.set_axis_off()
    axes.set_title(f"BEFORE, slice {k + 1} of {before.image.GetSize()[2]}, with the AFTER mask registered onto it",
                   fontsize=9)
    axes.legend(handles=[Patch(color=colour, label=f"{name} ({int(inside.sum())} voxels here)")
                         for name, (inside, colour) in parts.items()], loc="lower right", fontsize=8, framealpha=0.8)
    figure.tight_layout()
    save_figure(figure, path)
    return {"slice_index": k, "slices": before.image.GetSize()[2]}


def _notes(scans: Sequence[StudyScan], same_patient: bool | None, days: int | None) -> list[str]:
    """What a reader must know to trust the figures: units, where voxels are counted, dates, the patient check."""
    notes = []
    if scans[0].stack:
        notes.append("2D slices carry no spacing: each folder's slices were stacked with unit spacing, so sizes are "
                     "in voxels, not ml, and no growth rate in mm per year is given. Registration is 2D-stack: "
                     "rotation about the slice axis and shifts, in voxels. The voxel counts compare only when both "
                     "studies have the same pixel size and slice spacing.")
    notes.append("The size at each date is counted on that study's own grid; gained, lost and unchanged voxels on "
                 "BEFORE's grid, after nearest-neighbour resampling of the AFTER mask, so gained minus lost can "
                 "differ slightly from the change.")
    if not scans[0].stack:
        unknown = [name for name, scan in zip(("BEFORE", "AFTER"), scans) if scan.study_date is None]
        if unknown:
            notes.append(f"No growth rate: the study date of {' and '.join(unknown)} is unknown (no usable DICOM "
                         f"StudyDate; give --dates).")
        elif days == 0:
            notes.append("No growth rate: both studies have the same date.")
        elif days is not None and days < 0:
            notes.append("AFTER is dated before BEFORE: the changes are AFTER minus BEFORE, the rate is per year "
                         "forward in time.")
    if same_patient is None:
        notes.append("Not checked that the studies are of one patient: a PatientID is unknown (not DICOM).")
    elif not same_patient:
        notes.append("The studies' PatientIDs differ: compared because --force was given.")
    return notes


def _date_record(scan: StudyScan, measures: dict) -> dict:
    """One date of ``compare.json``: what was read, its date and where it came from, and its measures."""
    return {"source": scan.source, "kind": scan.kind, "image": scan.described, "mask": scan.mask_source,
            "study_date": None if scan.study_date is None else scan.study_date.isoformat(),
            "date_from": scan.date_from, **measures}


def compare_studies(
    before: str | os.PathLike,
    after: str | os.PathLike,
    out: str | os.PathLike,
    *,
    masks: Sequence[str | os.PathLike] | None = None,
    dates: Sequence[str | date | None] | None = None,
    force: bool = False,
    settings: InferenceSettings | None = None,
) -> dict:
    """Compare two studies of one patient and write ``compare.json``, ``compare.md`` and ``compare.png`` to ``out``.

    Args:
        before: the earlier study: a DICOM study or series folder, a volume file, or a folder of 2D slices.
        after: the later study, of the same kind.
        out: report folder (created). Without ``masks`` it also receives ``before/`` and ``after/``, the outputs of
            ``brainseg infer`` on each study.
        masks: the (BEFORE, AFTER) masks instead of segmenting: a mask file on one image of the study (e.g. ``brainseg
            infer``'s ``mask.nii.gz``; non-zero is tumour), or for a folder of slices a folder of mask slices.
        dates: the (BEFORE, AFTER) study dates (``YYYY-MM-DD`` or dates); they win over DICOM StudyDate.
        force: compare even when the two studies' PatientIDs differ.
        settings: how ``brainseg infer`` segments the studies (the model, device, TTA); needed without ``masks``.

    Returns:
        What ``compare.json`` holds: ``before`` and ``after`` (source, image registered, mask, study date, voxels,
        volume in ml, mean diameter in mm), ``change`` (absolute and relative, mean diameter and its rate in mm per
        year, voxels and ml gained, lost, unchanged), ``registration``, ``picture``, ``same_patient`` and ``notes``.

    Raises:
        InputError: when the studies are of different patients (without ``force``), an input holds several studies
            or none, a mask lies on no image of its study, one study is a folder of slices and the other a volume, or
            a study cannot be read or segmented.
        ValueError: a date that is not ``YYYY-MM-DD``, or neither ``masks`` nor ``settings``.
    """
    out, paths = Path(out), (Path(before), Path(after))
    if masks is None and settings is None:
        raise ValueError("settings (the model that segments the studies) are needed when no masks are given")
    if masks is not None and len(masks) != 2:
        raise ValueError(f"masks must be two paths (BEFORE, AFTER) but are {masks!r}")
    if dates is not None and len(dates) != 2:
        raise ValueError(f"dates must be two dates (BEFORE, AFTER) but are {dates!r}")
    given = [d if d is None or isinstance(d, date) else _parse_date(str(d), f"the {name} date")
             for d, name in zip(dates or (None, None), ("BEFORE", "AFTER"))]
    found = [_candidates(path, [out]) for path in paths]
    identities = (_identity(paths[0], found[0]), _identity(paths[1], found[1]))
    same_patient = _check_same_patient(paths[0], paths[1], identities, force)
    if masks is not None:
        scans = [_masked_scan(path, cases, Path(mask)) for path, cases, mask in zip(paths, found, masks)]
    else:
        scans = [_segmented_scan(path, out / name, settings) for path, name in zip(paths, ("before", "after"))]
    if scans[0].stack != scans[1].stack:
        kinds = ["a folder of 2D slices" if s.stack else "a volume" for s in scans]
        raise InputError(None, f"{before} is {kinds[0]} and {after} {kinds[1]}: compare studies of one kind")
    for scan, identity, date_given in zip(scans, identities, given):
        if date_given is not None:
            scan.study_date, scan.date_from = date_given, "--dates"
        elif identity.study_date is not None:
            scan.study_date, scan.date_from = identity.study_date, "DICOM StudyDate"

    transform, registration = register_rigid(scans[0].image, scans[1].image, in_plane=scans[0].stack)
    registration["translation_unit"] = "voxels" if scans[0].stack else "mm"
    moved = sitk.Resample(scans[1].mask, scans[0].image, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    first = sitk.GetArrayFromImage(scans[0].mask).astype(bool)
    second = sitk.GetArrayFromImage(moved).astype(bool)
    days = (scans[1].study_date - scans[0].study_date).days if scans[0].study_date and scans[1].study_date else None
    measures = _measures(scans[0], scans[1], second, days)
    out.mkdir(parents=True, exist_ok=True)
    picture = {"file": "compare.png", **_picture(scans[0], first, second, out / "compare.png")}
    result = json_ready({
        "before": _date_record(scans[0], measures["dates"][0]),
        "after": _date_record(scans[1], measures["dates"][1]),
        "sizes_in": "voxels" if scans[0].stack else "ml",
        "change": measures["change"],
        "same_patient": same_patient,
        "registration": registration,
        "picture": picture,
        "notes": _notes(scans, same_patient, days),
    })
    write_json_atomic(out / "compare.json", result)
    write_text_atomic(out / "compare.md", _markdown(result))
    return result


def _fmt(value: float | None, digits: int = 2, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _markdown(result: dict) -> str:
    """``compare.md``: the figures of both dates and their change, the picture with its caption, how it was done."""
    before, after, change = result["before"], result["after"], result["change"]
    stack = result["sizes_in"] == "voxels"
    if stack:
        size = ["tumour size (voxels)", str(before["voxels"]), str(after["voxels"]),
                f"{change['voxels']:+d} ({_fmt(change['relative_pct'], 1, True)}%)"]
    else:
        size = ["tumour volume (ml)", _fmt(before["volume_ml"]), _fmt(after["volume_ml"]),
                f"{_fmt(change['volume_ml'], 2, True)} ({_fmt(change['relative_pct'], 1, True)}%)"]
    rate = "" if change["rate_mm_per_year"] is None else f" ({_fmt(change['rate_mm_per_year'], 2, True)} mm/year)"
    interval = "" if change["interval_days"] is None else f"{change['interval_days']} days"
    rows = [
        ["study date", before["study_date"] or "unknown", after["study_date"] or "unknown", interval],
        size,
    ]
    if not stack:
        rows.append(["mean diameter (mm)", _fmt(before["mean_diameter_mm"], 1), _fmt(after["mean_diameter_mm"], 1),
                     f"{_fmt(change['mean_diameter_mm'], 1, True)}{rate}"])
    moved = (f"gained {change['gained_voxels']}, lost {change['lost_voxels']}, unchanged {change['unchanged_voxels']}"
             + ("" if stack else f" (gained {_fmt(change['gained_ml'])} ml, lost {_fmt(change['lost_ml'])} ml)"))
    rows.append(["voxels on BEFORE's grid", "", "", moved])
    registration, picture = result["registration"], result["picture"]
    unit = registration["translation_unit"]
    lines = [
        "# Tumour change between two studies", "",
        "| | BEFORE | AFTER | change |", "|---|---|---|---|",
        *("| " + " | ".join(row) + " |" for row in rows), "",
        f"![tumour change]({picture['file']})", "",
        f"*BEFORE image, slice {picture['slice_index'] + 1} of {picture['slices']} (the one with most tumour), with "
        f"the AFTER mask registered onto it: gained (AFTER only) in orange-red, lost (BEFORE only) in blue, unchanged "
        f"(both) in yellow.*", "",
        "## Registration", "",
        f"AFTER was registered rigidly onto BEFORE ({registration['mode']}): {registration['metric']}, "
        f"shrink factors {'-'.join(map(str, registration['shrink_factors']))}, Euler transform started on the grids' "
        f"centres. Rotation {registration['rotation_deg']} degrees about x, y, z; translation "
        f"{registration['translation']} {unit}; metric {registration['metric_value']}; stop: {registration['stop']}",
        "", "## Inputs", "",
        *(f"- {name}: {record['source']}; image {record['image']}; mask {record['mask']}"
          + (f"; date from {record['date_from']}" if record["date_from"] else "")
          for name, record in (("BEFORE", before), ("AFTER", after))),
        "", "## Notes", "", *(f"- {note}" for note in result["notes"]), "",
    ]
    return "\n".join(lines)
