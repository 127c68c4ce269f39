"""``brainseg infer`` with no flags on real DICOM studies: series on other grids, a missing post-contrast series,
invalid patient attributes, localizers, derived and repeated series; and lone real images given their role.

The shipped LGG model runs on the real series of ../shared/data (skipped where absent), as a user would run it.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import REPO_ROOT, assert_dciodvfy_finds_no_errors, shared_path
from dicom_studies import build_real_study

from brainseg_monai.cli import main as cli_main
from brainseg_monai.io import read_sitk

MODEL = REPO_ROOT / "bundle" / "models" / "model.pt"


def _summary(out: Path) -> list[dict]:
    import csv

    with (out / "summary.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def _assert_on_grid(mask_path: Path, series: sitk.Image) -> None:
    mask = sitk.ReadImage(str(mask_path))
    assert mask.GetSize() == series.GetSize()
    np.testing.assert_allclose(mask.GetOrigin(), series.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(mask.GetSpacing(), series.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(mask.GetDirection(), series.GetDirection(), atol=1e-5)


@pytest.mark.realdata
@pytest.mark.slow
def test_infer_segments_a_real_study_with_no_flags(tmp_path: Path) -> None:
    """The issue's study: FLAIR (primary) and an oblique T1 on other grids, no post-contrast, PatientSex '0000'."""
    study = build_real_study(tmp_path / "STUDY")
    out = tmp_path / "P"
    assert cli_main(["infer", str(tmp_path / "STUDY"), "--out", str(out), "--no-progress"]) == 0
    [row] = _summary(out)
    assert row["status"] == "ok" and row["case"] == "PAT1", row
    assert "PatientSex '0000'" in row["warnings"]
    flair = read_sitk(study / "sT2W_FLAIR")
    _assert_on_grid(out / "PAT1" / "mask.nii.gz", flair)
    assert 5_000 < int(row["tumour_voxels"]) < 150_000  # the FLAIR's hyperintense lesion, not nothing or the head

    marker = json.loads((out / "PAT1" / "case.json").read_text())
    roles = {r["channel"]: r for r in marker["channels"]["roles"]}
    assert marker["channels"]["primary"] == "flair"
    assert roles["flair"]["series"]["description"] == "sT2W/FLAIR" and roles["flair"]["series"]["number"] == 4
    assert roles["t1"]["series"]["description"] == "T1/SE/extrp" and "TR 613" in roles["t1"]["reason"]
    assert roles["t1c"]["filled_from"] == "flair"
    assert marker["resampled_onto_primary_grid"] == ["t1"]
    rejected = {r["description"]: r["reason"] for r in marker["channels"]["rejected"]}
    assert set(rejected) == {"Survey", "dADC", "AX FLAIR", "3D FLAIR sag"}
    assert "localizer" in rejected["Survey"] and "ADC" in rejected["dADC"]
    assert rejected["AX FLAIR"].endswith("latest SeriesNumber (4 vs 2)")
    assert rejected["3D FLAIR sag"].endswith("axial first (axial vs sagittal)")

    seg_path = out / "PAT1" / "seg.dcm"
    seg = pydicom.dcmread(seg_path)
    flair_uids = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in (study / "sT2W_FLAIR").iterdir()}
    referenced = {ref.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence
                  for ref in item.ReferencedInstanceSequence}
    assert referenced == flair_uids
    assert seg.PatientSex == "" and seg.PatientID == "PAT1"
    assert_dciodvfy_finds_no_errors(seg_path)


@pytest.mark.realdata
def test_series_of_two_patients_in_one_folder_are_two_cases(tmp_path: Path) -> None:
    """Flat exports of two patients' series in one folder are never matched into one case."""
    flat = tmp_path / "flat"
    for patient in ("PA", "PB"):
        study = build_real_study(tmp_path / "tree", patient, extras=False)
        for series_folder in study.iterdir():
            for k, f in enumerate(sorted(series_folder.iterdir())):
                flat.mkdir(exist_ok=True)
                f.rename(flat / f"{patient}_{series_folder.name}_{k:03d}.dcm")
    from brainseg_monai.channel_roles import InputRoles
    from brainseg_monai.inference.cases import discover_cases
    from brainseg_monai.model import find_spec

    cases = discover_cases([flat], InputRoles.of(find_spec(MODEL)))
    assert len(cases) == 2 and all(c.error is None for c in cases), [(c.case_id, c.error) for c in cases]
    for case in cases:
        assert len({s.patient_id for s in case.series}) == 1
        assert case.case_id.startswith(f"flat_{case.series[0].patient_id}_")


@pytest.mark.realdata
def test_lone_flair_volume_and_its_sagittal_copy_give_one_mask(tmp_path: Path) -> None:
    """A FLAIR-only NIfTI named as FLAIR runs with the model's fallbacks; stored sagittal it gives the same mask, and
    one with nothing saying its sequence is refused with the command that would run it."""
    flair = read_sitk(shared_path("dicom", "HF1139_AXIAL_FLAIR"))
    axial = tmp_path / "in" / "case_flair.nii.gz"
    axial.parent.mkdir()
    sitk.WriteImage(flair, str(axial))
    image = nib.load(axial)
    sagittal_data = np.transpose(np.asarray(image.dataobj), (2, 0, 1))  # stored slices now run along x
    sagittal_affine = image.affine[:, [2, 0, 1, 3]]
    sagittal = tmp_path / "sag" / "case_flair.nii.gz"
    sagittal.parent.mkdir()
    nib.save(nib.Nifti1Image(sagittal_data, sagittal_affine), sagittal)
    masks = []
    for path, out in ((axial, tmp_path / "pa"), (sagittal, tmp_path / "ps")):
        assert cli_main(["infer", str(path), "--out", str(out), "--tta", "none", "--no-progress"]) == 0
        [row] = _summary(out)
        assert row["status"] == "ok"
        marker = json.loads((out / row["case"] / "case.json").read_text())
        assert marker["filled_from_one_channel"] == {"t1": "flair", "flair": "flair", "t1c": "flair"}
        mask = nib.load(out / row["case"] / "mask.nii.gz")
        np.testing.assert_allclose(mask.affine, nib.load(path).affine, atol=1e-4)
        masks.append(np.asarray(mask.dataobj) > 0)
    assert masks[0].sum() > 1000
    np.testing.assert_array_equal(np.transpose(masks[0], (2, 0, 1)), masks[1])

    unnamed = tmp_path / "in2" / "scan.nii.gz"
    unnamed.parent.mkdir()
    sitk.WriteImage(flair, str(unnamed))
    assert cli_main(["infer", str(unnamed), "--out", str(tmp_path / "pu"), "--tta", "none", "--no-progress"]) == 1
    [row] = _summary(tmp_path / "pu")
    assert "nothing says which sequence it is" in row["error"] and "--channel 'flair=scan" in row["error"]
    assert cli_main(["infer", str(unnamed), "--out", str(tmp_path / "pu2"), "--tta", "none", "--no-progress",
                     "--channel", r"flair=scan\.nii"]) == 0
