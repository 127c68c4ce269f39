"""Realistic DICOM study trees built from the shared real series, as a hospital archive exports them.

The two shared series (REMBRANDT's axial FLAIR, 256x256x53 at 0.94x0.94x3 mm, and CPTAC's oblique T1 spin echo,
512x512x28 at 0.45x0.45x6 mm) are rewritten into one study of one patient: two real sequences on different grids,
one of them oblique, no post-contrast series, and the faults real headers carry (PatientSex '0000', a one-component
PatientName). Series that a study also holds and that are never inputs are added from copies of the FLAIR slices:
a localizer, a derived ADC map, an earlier repeat of the FLAIR and a sagittal FLAIR.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from conftest import shared_path


def _series_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    return sorted(files, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))


def _centre(files: list[Path]) -> np.ndarray:
    """The physical centre of a series: the middle of its first and last slices' centres."""
    centres = []
    for path in (files[0], files[-1]):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        row, col = np.asarray(ds.ImageOrientationPatient[:3], float), np.asarray(ds.ImageOrientationPatient[3:], float)
        spacing = np.asarray(ds.PixelSpacing, float)
        centres.append(np.asarray(ds.ImagePositionPatient, float) + row * spacing[1] * (ds.Columns - 1) / 2
                       + col * spacing[0] * (ds.Rows - 1) / 2)
    return np.mean(centres, axis=0)


def _copy_series(files: list[Path], dest: Path, study: dict, edit: Callable[[pydicom.Dataset, int], None] | None = None,
                 shift: np.ndarray | None = None) -> Path:
    """Write ``files`` as a new series of ``study`` into ``dest`` (new UIDs), each dataset passed through ``edit``."""
    dest.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.update(study)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if shift is not None:
            ds.ImagePositionPatient = [f"{v:.4f}" for v in np.asarray(ds.ImagePositionPatient, float) + shift]
        if edit is not None:
            edit(ds, k)
        ds.save_as(dest / f"IM{k:04d}.dcm", enforce_file_format=True)
    return dest


def build_real_study(root: Path, patient: str = "PAT1", extras: bool = True) -> Path:
    """``root/<patient>/<series folders>``: the real FLAIR and T1 rewritten into one study, and (``extras``) a
    localizer, an ADC map, an earlier repeat of the FLAIR and a sagittal FLAIR. Returns the study folder.

    The T1's slice positions are moved so that its centre meets the FLAIR's: the two series come from two patients
    scanned in different places, and a study's sequences cover the same head.
    """
    flair = _series_files(shared_path("dicom", "HF1139_AXIAL_FLAIR"))
    t1 = _series_files(shared_path("dicom", "C3L-03728_AX_T1_SE"))
    study = {"StudyInstanceUID": generate_uid(), "PatientID": patient, "PatientName": "ANONYMOUS",
             "PatientSex": "0000", "StudyDate": "20240102", "StudyID": "1", "AccessionNumber": ""}
    folder = root / patient

    def describe(text: str, number: int) -> Callable[[pydicom.Dataset, int], None]:
        def edit(ds: pydicom.Dataset, _: int) -> None:
            ds.SeriesDescription, ds.SeriesNumber = text, number
        return edit

    _copy_series(flair, folder / "sT2W_FLAIR", study, describe("sT2W/FLAIR", 4))
    _copy_series(t1, folder / "T1_SE", study, describe("T1/SE/extrp", 6), shift=_centre(flair) - _centre(t1))
    if not extras:
        return folder

    def localizer(ds: pydicom.Dataset, _: int) -> None:
        ds.SeriesDescription, ds.SeriesNumber = "Survey", 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]

    def adc(ds: pydicom.Dataset, _: int) -> None:
        ds.SeriesDescription, ds.SeriesNumber = "dADC", 501
        ds.ImageType = ["DERIVED", "PRIMARY", "ADC", "ADC"]

    def sagittal(ds: pydicom.Dataset, k: int) -> None:
        ds.SeriesDescription, ds.SeriesNumber = "3D FLAIR sag", 7
        ds.ImageOrientationPatient = ["0", "1", "0", "0", "0", "-1"]
        ds.ImagePositionPatient = [f"{-60.0 + 1.0 * k:.1f}", "120", "80"]

    _copy_series(flair[20:23], folder / "survey", study, localizer)
    _copy_series(flair[10:40], folder / "adc", study, adc)
    _copy_series(flair, folder / "FLAIR_first_try", study, describe("AX FLAIR", 2))
    _copy_series((flair + flair)[:73], folder / "sag_flair", study, sagittal)  # more slices than the axial one
    return folder
