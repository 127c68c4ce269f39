"""``brainseg compare``: two studies of one patient registered rigidly, the tumour's change measured.

Known answers: a phantom seen again under a known rigid transform with a known growth, and a real FLAIR series
against a rotated, shifted copy of itself (no change). Masks are given (``--masks``) or come from a stand-in network,
so no trained model is needed.
"""

from __future__ import annotations

import json
import os
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
import torch

from brainseg_monai.cli import main as cli_main
from brainseg_monai.errors import InputError
from brainseg_monai.model import ModelSpec
from brainseg_monai.inference.runner import InferenceSettings
from brainseg_monai.io import read_sitk
from brainseg_monai.longitudinal import compare_studies, sphere_diameter
from brainseg_monai.synth import make_dataset, phantom_volume
from conftest import shared_path

#: the AFTER study is the BEFORE anatomy seen through this rigid transform (degrees about x, y, z; mm)
ROTATION_DEG = (4.0, -3.0, 6.0)
SHIFT_MM = (5.0, -4.0, 3.0)


def _points(image: sitk.Image) -> np.ndarray:
    """The physical point (LPS, mm) of every voxel, in numpy order (z, y, x) flattened."""
    z, y, x = np.indices(sitk.GetArrayViewFromImage(image).shape, dtype=np.float32).reshape(3, -1)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    return np.asarray(image.GetOrigin()) + (np.stack([x, y, z], 1) * np.asarray(image.GetSpacing())) @ direction.T


def _sphere(grid: sitk.Image, centre: np.ndarray, radius: float) -> sitk.Image:
    """A {0, 1} ball of ``radius`` mm around the physical point ``centre``, on ``grid``."""
    inside = np.linalg.norm(_points(grid) - centre, axis=1) <= radius
    mask = sitk.GetImageFromArray(inside.reshape(sitk.GetArrayViewFromImage(grid).shape).astype(np.uint8))
    mask.CopyInformation(grid)
    return mask


def _rigid(image: sitk.Image) -> sitk.Euler3DTransform:
    """The known transform, about the centre of ``image``'s grid."""
    centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])
    return sitk.Euler3DTransform(centre, *np.radians(ROTATION_DEG), SHIFT_MM)


def _recovered(result: dict) -> sitk.Euler3DTransform:
    transform = sitk.Euler3DTransform()
    transform.SetCenter(result["registration"]["center"])
    transform.SetParameters(result["registration"]["parameters"])
    return transform


def _registration_error_mm(result: dict, truth: sitk.Transform, mask: sitk.Image) -> float:
    """The largest distance between where the recovered and the true transform put BEFORE's tumour voxels."""
    points = _points(mask)[sitk.GetArrayViewFromImage(mask).reshape(-1) > 0]
    recovered = _recovered(result)
    return max(float(np.linalg.norm(np.subtract(recovered.TransformPoint(p), truth.TransformPoint(p))))
               for p in points.tolist())


def _phantom_pair(folder: Path, size: tuple[int, int, int], spacing: tuple[float, float, float],
                  radii: tuple[float, float]) -> dict:
    """A textured brain phantom (FLAIR) with a spherical tumour, and the same head moved by the known transform with
    the tumour grown: ``before.nii.gz``, ``after.nii.gz`` and their masks. Returns the paths, the true AFTER-to-BEFORE
    registration (the inverse of the known move, as registration recovers it) and the BEFORE mask."""
    folder.mkdir(parents=True, exist_ok=True)
    flair, _ = phantom_volume(np.random.default_rng(7), size, tumours=0)
    anatomy = sitk.GetImageFromArray(np.ascontiguousarray(flair[1].T))
    anatomy.SetSpacing(spacing)
    anatomy.SetOrigin((-40.0, 12.5, -30.0))
    move = _rigid(anatomy)
    # after(p) = before(move(p)): a BEFORE point x lies at move^-1(x) in AFTER
    moved = sitk.Resample(anatomy, anatomy, move, sitk.sitkLinear, 0.0)
    centre = np.asarray(move.GetCenter()) + (8.0, -5.0, 6.0)
    masks = [_sphere(anatomy, centre, radii[0]),
             _sphere(moved, np.asarray(move.GetInverse().TransformPoint(centre.tolist())), radii[1])]
    paths = {}
    for name, image, mask in (("before", anatomy, masks[0]), ("after", moved, masks[1])):
        pixels = sitk.GetArrayFromImage(image)
        pixels[sitk.GetArrayViewFromImage(mask) > 0] = 0.9  # bright on FLAIR
        painted = sitk.GetImageFromArray(pixels)
        painted.CopyInformation(image)
        paths[name] = folder / f"{name}.nii.gz"
        paths[f"{name}_mask"] = folder / f"{name}_mask.nii.gz"
        sitk.WriteImage(painted, str(paths[name]))
        sitk.WriteImage(mask, str(paths[f"{name}_mask"]))
    return {**paths, "truth": move.GetInverse(), "before_grid_mask": masks[0]}


def test_synthetic_pair_recovers_the_known_transform_and_growth(tmp_path: Path) -> None:
    radii = (12.0, 15.0)
    pair = _phantom_pair(tmp_path / "studies", (80, 80, 48), (1.2, 1.2, 2.0), radii)
    result = compare_studies(pair["before"], pair["after"], tmp_path / "R",
                             masks=(pair["before_mask"], pair["after_mask"]), dates=("2020-01-01", "2021-01-01"))

    assert _registration_error_mm(result, pair["truth"], pair["before_grid_mask"]) < 1.0
    volumes = [4.0 / 3.0 * math.pi * r ** 3 / 1000.0 for r in radii]  # ml
    change = result["change"]
    assert result["before"]["volume_ml"] == pytest.approx(volumes[0], rel=0.02)
    assert result["after"]["volume_ml"] == pytest.approx(volumes[1], rel=0.02)
    assert change["volume_ml"] == pytest.approx(volumes[1] - volumes[0], rel=0.02)
    assert change["relative_pct"] == pytest.approx(100.0 * (volumes[1] / volumes[0] - 1.0), rel=0.02)
    # the same change seen on BEFORE's grid, through the registration: the ball grew in place, nothing was lost
    assert change["gained_ml"] - change["lost_ml"] == pytest.approx(volumes[1] - volumes[0], rel=0.02)
    assert change["lost_voxels"] <= 0.01 * result["before"]["voxels"]
    assert change["mean_diameter_mm"] == pytest.approx(2 * (radii[1] - radii[0]), rel=0.02)
    # 2020 is a leap year: 366 days
    assert change["interval_days"] == 366
    assert change["rate_mm_per_year"] == pytest.approx(change["mean_diameter_mm"] * 365.25 / 366, rel=1e-9)
    assert result["same_patient"] is None
    on_disk = json.loads((tmp_path / "R" / "compare.json").read_text())
    assert on_disk == result
    assert (tmp_path / "R" / "compare.png").stat().st_size > 0
    assert "mm/year" in (tmp_path / "R" / "compare.md").read_text()
    if os.environ.get("BRAINSEG_COMPARE_PICTURE"):  # the README's picture is this pair's
        shutil.copyfile(tmp_path / "R" / "compare.png", os.environ["BRAINSEG_COMPARE_PICTURE"])


def test_sphere_diameter_is_the_diameter_of_a_ball_of_that_volume() -> None:
    assert sphere_diameter(4.0 / 3.0 * math.pi * 10.0 ** 3) == pytest.approx(20.0)


@pytest.mark.realdata
def test_real_series_against_a_rotated_shifted_copy_of_itself_has_no_change(tmp_path: Path) -> None:
    series = shared_path("dicom", "HF1139_AXIAL_FLAIR")
    before = read_sitk(series)
    move = _rigid(before)
    mask = _sphere(before, np.asarray(move.GetCenter()) + (10.0, -15.0, 6.0), 20.0)
    after = sitk.Resample(sitk.Cast(before, sitk.sitkFloat32), before, move, sitk.sitkLinear, 0.0)
    after_mask = sitk.Resample(mask, before, move, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    for name, image in (("mask.nii.gz", mask), ("copy.nii.gz", after), ("copy_mask.nii.gz", after_mask)):
        sitk.WriteImage(image, str(tmp_path / name))

    result = compare_studies(series, tmp_path / "copy.nii.gz", tmp_path / "R",
                             masks=(tmp_path / "mask.nii.gz", tmp_path / "copy_mask.nii.gz"))

    assert _registration_error_mm(result, move.GetInverse(), mask) < 1.0
    change = result["change"]
    assert abs(change["relative_pct"]) < 2.0
    assert change["gained_voxels"] + change["lost_voxels"] < 0.1 * result["before"]["voxels"]
    assert result["before"]["image"].startswith("series 'AXIAL FLAIR'")
    assert (result["before"]["study_date"], result["before"]["date_from"]) == ("1993-02-09", "DICOM StudyDate")
    assert result["after"]["study_date"] is None and change["rate_mm_per_year"] is None
    assert any("study date of AFTER is unknown" in note for note in result["notes"])


def test_cli_compare_with_masks_writes_the_report(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pair = _phantom_pair(tmp_path / "studies", (56, 56, 32), (1.6, 1.6, 2.5), (12.0, 14.0))
    out = tmp_path / "R"
    masks = [str(pair["before_mask"]), str(pair["after_mask"])]
    code = cli_main(["compare", str(pair["before"]), str(pair["after"]), "--out", str(out), "--masks", *masks,
                     "--dates", "2021-03-01", "2021-09-01"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "mm/year" in printed and str(out / "compare.md") in printed
    result = json.loads((out / "compare.json").read_text())
    assert result["change"]["interval_days"] == 184
    assert result["change"]["rate_mm_per_year"] > 0
    assert {p.name for p in out.iterdir()} == {"compare.json", "compare.md", "compare.png"}
    assert cli_main(["compare", str(pair["before"]), str(pair["after"]), "--out", str(out), "--masks", *masks,
                     "--dates", "2021-03-01", "1.9.2021"]) == 2
    assert "YYYY-MM-DD" in capsys.readouterr().err


@pytest.fixture(scope="module")
def dicom_studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two synthetic DICOM studies (T1, FLAIR, T1 post), of patients SYN_0001 and SYN_0002, with their truth."""
    return make_dataset(tmp_path_factory.mktemp("compare") / "dicom", "dicom", cases=2, size=(40, 40, 10))


def test_studies_of_different_patients_are_refused_unless_forced(dicom_studies: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    first, second = dicom_studies / "SYN_0001", dicom_studies / "SYN_0002"
    masks = (first / "SYN_0001_seg.nii.gz", second / "SYN_0002_seg.nii.gz")
    with pytest.raises(InputError) as refused:
        compare_studies(first, second, tmp_path / "R", masks=masks)
    for word in (str(first), str(second), "SYN_0001", "SYN_0002", "--force"):
        assert word in str(refused.value)
    assert not (tmp_path / "R").exists()
    command = ["compare", str(first), str(second), "--out", str(tmp_path / "R"), "--masks", *map(str, masks)]
    assert cli_main(command) == 2
    assert "different patients" in capsys.readouterr().err

    result = compare_studies(first, second, tmp_path / "R", masks=masks, force=True)
    assert result["same_patient"] is False
    assert any("--force" in note for note in result["notes"])
    # the truth lies on all three series' grid: the FLAIR is the one registered
    assert result["before"]["image"].startswith("series 'AX FLAIR'")


class _BrightFlair(torch.nn.Module):
    """A stand-in 2D network: tumour wherever the FLAIR channel is above its slice's mean (z-scored > 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x[:, 1:2] > 0, 100.0, -100.0)


def test_segments_both_studies_and_registers_the_flair_series(dicom_studies: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import brainseg_monai.inference.runner as runner

    spec = ModelSpec(network_name="unet", spatial_dims=2, in_channels=3, roi_size=[64, 64],
                     channels=["t1", "flair", "t1c"], channel_fallbacks={"t1": "flair", "t1c": "flair"})
    monkeypatch.setattr(runner, "load_model", lambda checkpoint, device: (_BrightFlair().eval(), spec))
    study = dicom_studies / "SYN_0001"
    again = shutil.copytree(study, tmp_path / "again" / "SYN_0001")  # the same scan, read as a second study
    settings = InferenceSettings("unused.pt", tta="none", threshold=0.5, progress=False, device="cpu")

    result = compare_studies(study, again, tmp_path / "R", settings=settings)

    for name in ("before", "after"):
        assert result[name]["image"].startswith("series 'AX FLAIR'")
        mask = Path(result[name]["mask"])
        assert mask.is_file() and mask.parent.parent == tmp_path / "R" / name
    assert result["before"]["voxels"] == result["after"]["voxels"] > 0
    change = result["change"]
    assert change["volume_ml"] == 0.0
    assert change["gained_voxels"] + change["lost_voxels"] <= 0.01 * result["before"]["voxels"]
    assert result["same_patient"] is True
    assert change["interval_days"] == 0 and change["rate_mm_per_year"] is None
    assert any("same date" in note for note in result["notes"])


def test_lgg_slice_folders_are_stacked_and_measured_in_voxels(tmp_path: Path) -> None:
    patient = make_dataset(tmp_path / "lgg", "lgg", cases=1, size=(64, 64, 12)) / "SYN_0001"
    moved = tmp_path / "later" / "SYN_0001"
    moved.mkdir(parents=True)
    for path in patient.glob("*.tif"):  # the head moved 3 pixels along x (columns) and -2 along y (rows)
        tifffile.imwrite(moved / path.name, np.roll(tifffile.imread(path), (-2, 3), axis=(0, 1)))

    result = compare_studies(patient, moved, tmp_path / "R", masks=(patient, moved))

    assert result["sizes_in"] == "voxels"
    assert result["before"]["volume_ml"] is None and result["change"]["rate_mm_per_year"] is None
    assert result["change"]["voxels"] == 0
    registration = result["registration"]
    assert registration["mode"] == "2d-stack" and registration["translation_unit"] == "voxels"
    assert registration["rotation_deg"][:2] == [0.0, 0.0]
    np.testing.assert_allclose(registration["translation"], [3.0, -2.0, 0.0], atol=0.5)
    assert result["change"]["gained_voxels"] + result["change"]["lost_voxels"] <= 0.1 * result["before"]["voxels"]
    assert any("voxels, not ml" in note and "2D-stack" in note for note in result["notes"])
