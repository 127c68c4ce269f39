"""``brainseg infer`` end to end: masks in the source geometry, DICOM SEG, overlays, failures, resume, sharding."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from monai.bundle import ConfigWorkflow

from brainseg_monai.cli import build_parser
from brainseg_monai.cli import main as cli_main
from brainseg_monai.channel_roles import InputRoles
from brainseg_monai.errors import InputError
from brainseg_monai.inference.cases import discover_cases
from brainseg_monai.inference.runner import InferenceSettings, run_inference
from brainseg_monai.model import MODEL_SIDECAR, ModelSpec
from brainseg_monai.networks import get_network
from brainseg_monai.synth import make_dataset
from brainseg_monai.uncertainty import members_score
from conftest import REPO_ROOT, shared_path
from infer_helpers import (THREE_CHANNELS, BrightVoxels, bright_per_slice, infer_cli, infer_settings, output_hashes,
                           pred_png, random_image, stand_in, summary_rows, untrained_one_channel_model, write_image, xyz)

SIZE = (64, 64, 12)


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2D U-Net trained for a few epochs on LGG-layout phantoms (the same generator as the DICOM studies)."""
    root = tmp_path_factory.mktemp("train")
    data = make_dataset(root / "lgg", "lgg", cases=10, seed=21, size=SIZE)
    wf = ConfigWorkflow(
        config_file=str(REPO_ROOT / "bundle" / "configs" / "train.json"), workflow_type="train",
        bundle_root=str(REPO_ROOT / "bundle"), output_dir=str(root / "run"), dataset_dir=str(data), device="cpu",
        max_epochs=12, roi_size=[64, 64], batch_size=8, learning_rate=0.003, val_fraction=0.2,
        network_kwargs={"channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 1},
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    return root / "run" / "models" / "model.pt"


@pytest.fixture(scope="module")
def dicom_studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("dicom") / "studies", "dicom", cases=2, seed=22, size=SIZE, oblique=True)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def _geometry(image: sitk.Image) -> tuple:
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def _assert_same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-5)


def _read_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


@pytest.mark.slow
def test_oblique_dicom_studies_masks_in_series_geometry(trained_checkpoint: Path, dicom_studies: Path, tmp_path: Path) -> None:
    out = tmp_path / "pred"
    rows = run_inference([dicom_studies], out, InferenceSettings(str(trained_checkpoint), tta="flip", progress=False))
    assert [r["status"] for r in rows] == ["ok", "ok"], rows
    for row in rows:
        study = dicom_studies / row["case"]
        series = _read_series(study / "T1_PRE")
        assert not np.allclose(np.reshape(series.GetDirection(), (3, 3)), np.eye(3)), "phantom should be oblique"
        mask = sitk.ReadImage(str(out / row["case"] / "mask.nii.gz"))
        _assert_same_geometry(mask, series)
        truth = sitk.ReadImage(str(study / f"{row['case']}_seg.nii.gz"))
        _assert_same_geometry(truth, series)
        dice = _dice(sitk.GetArrayFromImage(mask), sitk.GetArrayFromImage(truth))
        if sitk.GetArrayViewFromImage(truth).any():
            assert dice > 0.5, f"{row['case']}: Dice {dice:.3f} against the known phantom mask"
        assert int(row["tumour_voxels"]) == int(sitk.GetArrayViewFromImage(mask).sum())
        seg_path = out / row["case"] / "seg.dcm"
        seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(seg_path))
        # the SEG lies on the model's primary channel: FLAIR for this model
        source_uids = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in (study / "FLAIR").iterdir()}
        referenced = {ref.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence for ref in item.ReferencedInstanceSequence}
        assert referenced == source_uids
        assert (out / row["case"] / "overlay.png").is_file()


@pytest.mark.slow
def test_failed_case_is_recorded_and_others_go_on(trained_checkpoint: Path, dicom_studies: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    studies = tmp_path / "studies"
    shutil.copytree(dicom_studies, studies)
    broken = studies / "SYN_0002" / "FLAIR"
    for dcm in broken.iterdir():  # truncated transfer: every file of one series cut to its first 300 bytes
        dcm.write_bytes(dcm.read_bytes()[:300])
    out = tmp_path / "pred"
    code = cli_main(["infer", str(studies), "--out", str(out), "--checkpoint", str(trained_checkpoint), "--tta", "none",
                     "--no-progress"])
    assert code != 0
    rows = {r["case"]: r for r in summary_rows(out)}
    assert rows["SYN_0001"]["status"] == "ok"
    assert rows["SYN_0002"]["status"] == "failed" and rows["SYN_0002"]["error"]
    assert not (out / "SYN_0002").exists()
    assert "SYN_0002" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_rebuilds_a_deleted_case_byte_for_byte(trained_checkpoint: Path, dicom_studies: Path, tmp_path: Path) -> None:
    out = tmp_path / "pred"
    settings = InferenceSettings(str(trained_checkpoint), tta="flip", progress=False)
    run_inference([dicom_studies], out, settings)
    before = output_hashes(out)
    kept_marker = (out / "SYN_0001" / "case.json").stat().st_mtime_ns
    shutil.rmtree(out / "SYN_0002")
    settings.resume = True
    rows = run_inference([dicom_studies], out, settings)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert output_hashes(out) == before
    assert (out / "SYN_0001" / "case.json").stat().st_mtime_ns == kept_marker, "a finished case was redone"


@pytest.mark.slow
def test_lgg_patient_folder_gives_one_png_per_slice(trained_checkpoint: Path, tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "lgg", "lgg", cases=1, seed=23, size=(64, 48, 5))
    patient = next(p for p in data.iterdir() if p.is_dir())
    out = tmp_path / "pred"
    rows = run_inference([patient], out, InferenceSettings(str(trained_checkpoint), tta="dihedral", progress=False))
    assert rows[0]["status"] == "ok" and rows[0]["case"] == patient.name
    slices = sorted(p for p in patient.glob("*.tif") if not p.stem.endswith("_mask"))
    preds = sorted((out / patient.name).glob("*_pred.png"))
    assert {p.name for p in preds} == {f"{s.stem}_pred.png" for s in slices}
    for source in slices:
        pred = sitk.ReadImage(str(out / patient.name / f"{source.stem}_pred.png"))
        assert pred.GetSize() == sitk.ReadImage(str(source)).GetSize()
        assert set(np.unique(sitk.GetArrayViewFromImage(pred))) <= {0, 255}


@pytest.mark.parametrize("direction, spacing", [
    (np.diag([1.0, 1.0, 1.0]), (1.0, 1.0, 1.0)),
    (np.diag([-1.0, 1.0, 1.0]), (0.9, 1.1, 2.0)),  # flipped: reoriented to RAS before the network
    (np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), (0.9, 1.1, 2.0)),  # axes permuted
])
def test_3d_model_masks_land_on_the_source_grid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                direction: np.ndarray, spacing: tuple[float, ...]) -> None:
    """Orientation and foreground crop of 3D preprocessing are undone: each mask voxel is its own source voxel."""
    import brainseg_monai.inference.runner as runner

    rng = np.random.default_rng(3)
    array = np.zeros((12, 40, 36), dtype=np.float32)  # (z, y, x); the head does not fill the volume, so it is cropped
    array[2:10, 5:33, 4:30] = rng.uniform(1.0, 100.0, size=(8, 28, 26))
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin((12.3, -45.6, 78.9))
    image.SetDirection(direction.flatten().tolist())
    source = tmp_path / "volume.nii.gz"
    sitk.WriteImage(image, str(source))
    spec = ModelSpec(network_name="unet", spatial_dims=3, in_channels=1, roi_size=[64, 64, 64], channels=["image"])
    monkeypatch.setattr(runner, "load_model", lambda checkpoint, device: (BrightVoxels().eval(), spec))
    rows = run_inference([source], tmp_path / "pred", InferenceSettings("unused.pt", tta="none", threshold=0.5,
                                                                         progress=False, device="cpu"))
    assert rows[0]["status"] == "ok", rows
    mask = sitk.ReadImage(str(tmp_path / "pred" / rows[0]["case"] / "mask.nii.gz"))
    _assert_same_geometry(mask, sitk.ReadImage(str(source)))
    foreground = array[array != 0]
    expected = (array > foreground.mean()) & (array != 0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mask) > 0, expected)


@pytest.mark.realdata
def test_real_oblique_series_end_to_end_one_channel(tmp_path: Path) -> None:
    series_dir = shared_path("dicom", "C3L-03728_AX_T1_SE")
    checkpoint = untrained_one_channel_model(tmp_path / "model")
    out = tmp_path / "pred"
    rows = run_inference([series_dir], out, InferenceSettings(str(checkpoint), tta="none", threshold=0.5, progress=False))
    assert rows[0]["status"] == "ok", rows
    mask = sitk.ReadImage(str(out / rows[0]["case"] / "mask.nii.gz"))
    _assert_same_geometry(mask, _read_series(series_dir))
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(out / rows[0]["case"] / "seg.dcm"))
    assert seg.Modality == "SEG"


def test_an_ensemble_segments_a_real_series_and_resume_notices_a_changed_member(tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture) -> None:
    """``brainseg ensemble`` then ``brainseg infer --checkpoint ensemble.json``: the mask on the series' grid, the
    members' disagreement reported even without TTA; ``--resume`` redoes the case when a member's weights change."""
    series_dir = shared_path("dicom", "C3L-03728_AX_T1_SE")
    members = [untrained_one_channel_model(tmp_path / f"m{seed}", seed) for seed in (0, 1)]
    ensemble = tmp_path / "ensemble.json"
    assert cli_main(["ensemble", *map(str, members), "--out", str(ensemble)]) == 0
    assert "an ensemble of 2 models" in capsys.readouterr().out
    out = tmp_path / "pred"
    settings = InferenceSettings(str(ensemble), tta="none", threshold=0.5, progress=False, device="cpu")
    rows = run_inference([series_dir], out, settings)
    assert rows[0]["status"] == "ok", rows
    case = out / rows[0]["case"]
    _assert_same_geometry(sitk.ReadImage(str(case / "mask.nii.gz")), _read_series(series_dir))
    spread = sitk.ReadImage(str(case / "uncertainty.nii.gz"))
    _assert_same_geometry(spread, _read_series(series_dir))
    assert sitk.GetArrayViewFromImage(spread).max() > 0
    # the case score is the members' disagreement: one minus the Dice of the masks each makes alone
    alone = []
    for k, member in enumerate(members):
        row = run_inference([series_dir], tmp_path / f"alone{k}", InferenceSettings(
            str(member), tta="none", threshold=0.5, progress=False, device="cpu"))[0]
        alone.append(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"alone{k}" / row["case"] / "mask.nii.gz"))))
    assert float(rows[0]["uncertainty"]) == pytest.approx(members_score(alone), abs=1e-5)
    assert 0 < float(rows[0]["uncertainty"]) < 1
    settings.resume = True
    finished = (case / "case.json").stat().st_mtime_ns
    assert run_inference([series_dir], out, settings)[0]["status"] == "ok"
    assert (case / "case.json").stat().st_mtime_ns == finished, "an unchanged ensemble redid the case"
    untrained_one_channel_model(tmp_path / "m1", 2)  # new weights for one member
    run_inference([series_dir], out, settings)
    assert (case / "case.json").stat().st_mtime_ns != finished, "a changed member was not noticed"


def test_missing_checkpoint_and_input_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["infer", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "m.pt")]) == 2
    assert "m.pt" in capsys.readouterr().err
    checkpoint = untrained_one_channel_model(tmp_path / "model")
    assert cli_main(["infer", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--checkpoint", str(checkpoint)]) == 2
    assert "nope" in capsys.readouterr().err


def test_no_bundle_anywhere_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture) -> None:
    """As after a wheel install run outside the repository: no ./bundle and none beside the package."""
    import brainseg_monai.cli as cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "__file__", str(tmp_path / "site-packages" / "brainseg_monai" / "cli.py"))
    image = tmp_path / "slice.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.uint8)), str(image))
    assert cli_main(["infer", str(image), "--out", str(tmp_path / "o")]) == 2
    assert "no bundle found" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_output_folder_of_other_files_is_never_replaced(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "lgg", "lgg", cases=1, seed=24, size=(32, 32, 4))
    patient = next(p for p in data.iterdir() if p.is_dir())
    checkpoint = untrained_one_channel_model(tmp_path / "model")
    spec = json.loads((checkpoint.parent / MODEL_SIDECAR).read_text())
    spec.update(in_channels=3, channels=["t1", "flair", "t1c"], primary_channel="flair")
    net = get_network("unet", 2, 3, 1, **spec["network_kwargs"])
    torch.save(net.state_dict(), checkpoint)
    (checkpoint.parent / MODEL_SIDECAR).write_text(json.dumps(spec))
    before = output_hashes(data)
    rows = run_inference([patient], data, InferenceSettings(str(checkpoint), tta="none", progress=False))
    assert rows[0]["status"] == "failed" and "refusing" in rows[0]["error"]
    after = {k: v for k, v in output_hashes(data).items() if not k.startswith("summary")}
    assert after == before


@pytest.mark.slow
def test_two_processes_shard_cases(trained_checkpoint: Path, dicom_studies: Path, tmp_path: Path) -> None:
    out = tmp_path / "pred"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           "-m", "brainseg_monai.cli", "infer", str(dicom_studies), "--out", str(out), "--checkpoint",
           str(trained_checkpoint), "--tta", "none", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = summary_rows(out)
    assert [r["case"] for r in rows] == ["SYN_0001", "SYN_0002"] and {r["status"] for r in rows} == {"ok"}
    assert not list(out.glob(".summary.rank*"))


def test_noise_only_slices_are_found_and_not_segmented() -> None:
    from brainseg_monai.inference.predictor import Predictor, noise_only_slices

    rng = np.random.default_rng(0)
    volume = rng.rayleigh(3.0, size=(3, 32, 32, 5)).astype(np.float32)  # background noise everywhere
    volume[:, 8:24, 8:24, 1:4] += 400.0  # the head is in slices 1-3
    assert noise_only_slices(volume) == [0, 4]
    spec = ModelSpec(network_name="unet", in_channels=3, roi_size=[32, 32],
                     network_kwargs={"channels": [8, 16], "strides": [2], "num_res_units": 1})
    net = get_network("unet", 2, 3, 1, **spec.network_kwargs).eval()
    probs = Predictor(net, spec, torch.device("cpu"), tta="none").predict_volume_by_slices(torch.as_tensor(volume), "v")[0]
    assert probs.shape == (32, 32, 5)
    assert (probs[..., 1:4] > 0).all(), "a sigmoid is never exactly 0 on a predicted slice"
    assert not probs[..., 0].any() and not probs[..., 4].any()


def test_study_missing_a_channel_fails_naming_it(tmp_path: Path) -> None:
    studies = make_dataset(tmp_path / "studies", "dicom", cases=2, seed=25, size=(32, 32, 4))
    shutil.rmtree(studies / "SYN_0002" / "FLAIR")
    checkpoint = untrained_one_channel_model(tmp_path / "model")
    spec = json.loads((checkpoint.parent / MODEL_SIDECAR).read_text())
    spec.update(in_channels=3, channels=["t1", "flair", "t1c"], primary_channel="flair", roi_size=[32, 32])
    torch.save(get_network("unet", 2, 3, 1, **spec["network_kwargs"]).state_dict(), checkpoint)
    (checkpoint.parent / MODEL_SIDECAR).write_text(json.dumps(spec))
    rows = {r["case"]: r for r in run_inference([studies], tmp_path / "pred", InferenceSettings(str(checkpoint), tta="none", progress=False))}
    assert rows["SYN_0001"]["status"] == "ok"
    assert rows["SYN_0002"]["status"] == "failed"
    assert "flair" in rows["SYN_0002"]["error"] and "AX T1 PRE" in rows["SYN_0002"]["error"]


def test_inference_bundle_config_runs_the_batch_job(tmp_path: Path) -> None:
    """bundle/configs/batch_inference.json: the same batch job as 'brainseg infer', DICOM studies included."""
    studies = make_dataset(tmp_path / "studies", "dicom", cases=1, seed=26, size=(32, 32, 4))
    checkpoint = untrained_one_channel_model(tmp_path / "model")
    config = REPO_ROOT / "bundle" / "configs" / "batch_inference.json"
    wf = ConfigWorkflow(config_file=str(config), workflow_type="infer", bundle_root=str(REPO_ROOT / "bundle"),
                        input=str(studies), checkpoint=str(checkpoint), output_dir=str(tmp_path / "pred"), tta="none")
    wf.initialize()
    wf.run()
    rows = summary_rows(tmp_path / "pred")
    assert len(rows) == 3 and {r["status"] for r in rows} == {"ok"}  # one-channel model: each series is a case
    for row in rows:
        mask = sitk.ReadImage(str(tmp_path / "pred" / row["case"] / "mask.nii.gz"))
        _assert_same_geometry(mask, _read_series(Path(row["source"])))


def test_a_study_with_no_readable_series_is_a_failed_case_not_skipped(tmp_path: Path) -> None:
    """GDCM passes over unreadable files silently; a study truncated in every file must still be reported."""
    studies = make_dataset(tmp_path / "studies", "dicom", cases=3, seed=23, size=(24, 24, 4))
    for dcm in (studies / "SYN_0002").rglob("*.dcm"):
        dcm.write_bytes(dcm.read_bytes()[:300])
    cases = {c.case_id: c for c in discover_cases([studies], InputRoles.of(ModelSpec()))}
    assert list(cases) == ["SYN_0001", "SYN_0002", "SYN_0003"]
    assert cases["SYN_0001"].error is None and cases["SYN_0003"].error is None
    assert "no readable series" in cases["SYN_0002"].error and "FLAIR" in cases["SYN_0002"].error
    with pytest.raises(InputError, match="no readable series"):  # pointed at alone, nothing can run
        discover_cases([studies / "SYN_0002"], InputRoles.of(ModelSpec()))
    one_channel = discover_cases([studies], InputRoles.of(ModelSpec(in_channels=1)))
    assert sum(c.error is not None for c in one_channel) == 3  # each unreadable series folder, by itself


def test_dicomdir_and_reports_are_not_unreadable_studies(tmp_path: Path) -> None:
    """Non-image DICOM objects (a DICOMDIR at the root, a folder of reports) are neither cases nor failures."""
    studies = make_dataset(tmp_path / "studies", "dicom", cases=2, seed=24, size=(24, 24, 4))
    report = pydicom.Dataset()
    report.SOPClassUID = pydicom.uid.UID("1.2.840.10008.5.1.4.1.1.88.11")  # Basic Text SR
    report.SOPInstanceUID = pydicom.uid.generate_uid()
    report.Modality = "SR"
    report.file_meta = pydicom.dataset.FileMetaDataset()
    report.file_meta.MediaStorageSOPClassUID = report.SOPClassUID
    report.file_meta.MediaStorageSOPInstanceUID = report.SOPInstanceUID
    report.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    (studies / "SYN_0001" / "SR").mkdir()
    report.save_as(studies / "SYN_0001" / "SR" / "report.dcm", enforce_file_format=True)
    report.file_meta.MediaStorageSOPClassUID = pydicom.uid.MediaStorageDirectoryStorage
    report.SOPClassUID = pydicom.uid.MediaStorageDirectoryStorage
    report.save_as(studies / "DICOMDIR", enforce_file_format=True)
    for channels, expected in ((3, 2), (1, 6)):
        cases = discover_cases([studies], InputRoles.of(ModelSpec(in_channels=channels)))
        assert len(cases) == expected and all(c.error is None for c in cases), [(c.case_id, c.error) for c in cases]


def test_post_processing_flags_default_to_the_models_settings() -> None:
    parser = build_parser()
    args = parser.parse_args(["infer", "in", "--out", "o"])
    assert args.keep_largest is None and args.stack_slices is None  # None: the model.json setting applies
    args = parser.parse_args(["infer", "in", "--out", "o", "--no-keep-largest", "--stack-slices"])
    assert args.keep_largest is False and args.stack_slices is True


# --------------------------------------------------------------------- what a batch reads, and what it writes where


def test_folder_holding_several_series_reads_each_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Series exported into one folder: each case reads exactly its own series, also when picked by --channel."""
    study = make_dataset(tmp_path / "studies", "dicom", cases=1, seed=31, size=(32, 24, 4)) / "SYN_0001"
    flat = tmp_path / "flat"
    flat.mkdir()
    for folder in ("T1_PRE", "FLAIR", "T1_POST"):
        for dcm in (study / folder).iterdir():
            shutil.copy(dcm, flat / f"{folder}_{dcm.name}")
    volumes = {name: xyz(_read_series(study / name)) for name in ("T1_PRE", "FLAIR", "T1_POST")}
    expected = {name: bright_per_slice(volume[None]) for name, volume in volumes.items()}
    assert (expected["T1_PRE"] != expected["FLAIR"]).any(), "the phantom's series must give different masks"

    stand_in(monkeypatch)
    out = tmp_path / "each"
    rows = {r["case"]: r for r in run_inference([flat], out, infer_settings())}
    assert {case: row["status"] for case, row in rows.items()} == {
        "flat_AX_T1_PRE": "ok", "flat_AX_FLAIR": "ok", "flat_AX_T1_POST_GD": "ok"}, rows
    for case, folder in (("flat_AX_T1_PRE", "T1_PRE"), ("flat_AX_FLAIR", "FLAIR"), ("flat_AX_T1_POST_GD", "T1_POST")):
        mask = sitk.ReadImage(str(out / case / "mask.nii.gz"))
        _assert_same_geometry(mask, _read_series(study / folder))
        np.testing.assert_array_equal(xyz(mask) > 0, expected[folder])
    seg = pydicom.dcmread(out / "flat_AX_FLAIR" / "seg.dcm")
    flair_uid = pydicom.dcmread(next((study / "FLAIR").iterdir()), stop_before_pixels=True).SeriesInstanceUID
    assert [item.SeriesInstanceUID for item in seg.ReferencedSeriesSequence] == [flair_uid]

    rows = run_inference([flat], tmp_path / "flair", infer_settings(channels={"image": "FLAIR"}))
    assert [(r["case"], r["status"]) for r in rows] == [("flat_AX_FLAIR", "ok")]
    np.testing.assert_array_equal(xyz(sitk.ReadImage(str(tmp_path / "flair" / "flat_AX_FLAIR" / "mask.nii.gz"))) > 0,
                                  expected["FLAIR"])

    stand_in(monkeypatch, in_channels=3, channel=1)  # looks at the second channel, FLAIR
    rows = run_inference([flat], tmp_path / "three", infer_settings())
    assert [(r["case"], r["status"]) for r in rows] == [("flat", "ok")], rows
    stacked = np.stack([volumes["T1_PRE"], volumes["FLAIR"], volumes["T1_POST"]])
    np.testing.assert_array_equal(xyz(sitk.ReadImage(str(tmp_path / "three" / "flat" / "mask.nii.gz"))) > 0,
                                  bright_per_slice(stacked, channel=1))


def test_output_folder_inside_the_input_is_never_read_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_dataset(tmp_path / "lgg", "lgg", cases=2, seed=32, size=(32, 32, 4))
    stand_in(monkeypatch, in_channels=3, channel=1)
    out = data / "pred"
    first = run_inference([data], out, infer_settings())
    assert [(r["case"], r["status"]) for r in first] == [("SYN_0001", "ok"), ("SYN_0002", "ok")], first
    before = output_hashes(out)
    second = run_inference([data], out, infer_settings())
    assert [(r["case"], r["status"]) for r in second] == [("SYN_0001", "ok"), ("SYN_0002", "ok")], second
    assert sorted(p.name for p in out.iterdir()) == ["SYN_0001", "SYN_0002", "summary.csv"]
    assert output_hashes(out) == before


def test_out_that_is_a_file_or_holds_a_users_summary_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture) -> None:
    image = write_image(tmp_path / "img.png", random_image(1))
    stand_in(monkeypatch)
    results = tmp_path / "results"
    results.mkdir()
    (results / "summary.csv").write_text("patient,volume_ml\nA,12.5\n")
    with pytest.raises(InputError, match="summary.csv: exists and was not written by brainseg infer"):
        run_inference([image], results, infer_settings())
    assert (results / "summary.csv").read_text() == "patient,volume_ml\nA,12.5\n"
    assert [p.name for p in results.iterdir()] == ["summary.csv"]
    taken = tmp_path / "taken.txt"
    taken.write_text("notes")
    assert infer_cli(image, "--out", taken) == 2
    error = capsys.readouterr().err
    assert "taken.txt: exists and is not a folder" in error and "Traceback" not in error
    assert taken.read_text() == "notes"


def test_resume_skips_only_cases_finished_from_the_same_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ``img.png`` in different folders: resuming with the new one first must segment it, not skip it."""
    images = {seed: write_image(tmp_path / name / "img.png", random_image(seed)) for seed, name in ((1, "rx"), (2, "ry"))}
    stand_in(monkeypatch)
    out = tmp_path / "pred"
    run_inference([images[1]], out, infer_settings())
    finished = (out / "img" / "case.json").stat().st_mtime_ns
    rows = run_inference([images[2], images[1]], out, infer_settings(resume=True))
    by_source = {r["source"]: r for r in rows}
    assert sorted(by_source) == sorted(str(p) for p in images.values()) and {r["status"] for r in rows} == {"ok"}
    assert by_source[str(images[1])]["case"] == "img"
    assert (out / "img" / "case.json").stat().st_mtime_ns == finished, "the finished case was redone"
    new_case = by_source[str(images[2])]["case"]
    assert new_case != "img"
    for seed, image in images.items():
        case = by_source[str(image)]["case"]
        np.testing.assert_array_equal(pred_png(out / case / "img_pred.png"), bright_per_slice(random_image(seed)[None]))
    assert summary_rows(out) == [{k: str(v) for k, v in r.items()} for r in rows]


def test_folder_mixing_a_series_an_image_and_a_volume_gives_each_its_case(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    study = make_dataset(tmp_path / "studies", "dicom", cases=1, seed=33, size=(32, 24, 4)) / "SYN_0001"
    mixed = tmp_path / "mixed"
    shutil.copytree(study / "FLAIR", mixed)
    write_image(mixed / "thumbnail.png", random_image(3))
    volume = np.zeros((20, 16, 3), dtype=np.float32)
    volume[4:16, 3:13, :] = np.random.default_rng(4).uniform(1, 100, size=(12, 10, 3))
    write_image(mixed / "converted.nii.gz", volume)
    stand_in(monkeypatch)
    out = tmp_path / "pred"
    rows = {r["kind"]: r for r in run_inference([mixed], out, infer_settings())}
    assert sorted(rows) == ["dicom", "slices", "volume"] and {r["status"] for r in rows.values()} == {"ok"}, rows
    np.testing.assert_array_equal(xyz(sitk.ReadImage(str(out / rows["dicom"]["case"] / "mask.nii.gz"))) > 0,
                                  bright_per_slice(xyz(_read_series(study / "FLAIR"))[None]))
    np.testing.assert_array_equal(pred_png(out / rows["slices"]["case"] / "thumbnail_pred.png"),
                                  bright_per_slice(random_image(3)[None]))
    np.testing.assert_array_equal(xyz(sitk.ReadImage(str(out / rows["volume"]["case"] / "mask.nii.gz"))) > 0,
                                  bright_per_slice(volume[None]))


def test_bad_inputs_are_failed_rows_and_the_others_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    good = write_image(tmp_path / "good.png", random_image(5))
    empty = tmp_path / "empty"
    empty.mkdir()
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    series = make_dataset(tmp_path / "studies", "dicom", cases=1, seed=34, size=(24, 24, 4)) / "SYN_0001" / "FLAIR"
    no_suffix = tmp_path / "IM0002"  # DICOM "with any name": recognised by its preamble
    shutil.copy(sorted(series.iterdir())[1], no_suffix)
    stand_in(monkeypatch)
    out = tmp_path / "pred"
    assert infer_cli(good, empty, tmp_path / "missing.png", notes, no_suffix, "--out", out) == 1
    rows = {Path(r["source"]).name: r for r in summary_rows(out)}
    assert list(rows) == ["good.png", "empty", "missing.png", "notes.txt", "IM0002"]
    assert rows["good.png"]["status"] == "ok" and rows["IM0002"]["status"] == "ok"
    assert rows["IM0002"]["kind"] == "volume" and (out / rows["IM0002"]["case"] / "mask.nii.gz").is_file()
    assert "holds no image, volume or DICOM series" in rows["empty"]["error"]
    assert rows["missing.png"]["error"] == "does not exist"
    assert "unsupported file type" in rows["notes.txt"]["error"]
    assert {rows[name]["status"] for name in ("empty", "missing.png", "notes.txt")} == {"failed"}
    capsys.readouterr()
    assert infer_cli(empty, tmp_path / "missing.png", "--out", tmp_path / "none") == 2  # nothing usable: a clear error
    error = capsys.readouterr().err
    assert "none of the inputs can be segmented" in error and "empty" in error and "missing.png" in error


def test_slices_sharing_a_stem_are_written_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "slices"
    sources = {"a.png": 6, "a.tif": 7, "b.png": 8}
    for name, seed in sources.items():
        write_image(folder / name, random_image(seed))
    stand_in(monkeypatch)
    out = tmp_path / "pred"
    rows = run_inference([folder], out, infer_settings())
    assert rows[0]["status"] == "ok" and rows[0]["images"] == 3
    written = {"a.png": "a_pred.png", "a.tif": "a.tif_pred.png", "b.png": "b_pred.png"}  # the first keeps <stem>
    assert sorted(p.name for p in (out / "slices").glob("*_pred.png")) == sorted(written.values())
    for name, seed in sources.items():
        np.testing.assert_array_equal(pred_png(out / "slices" / written[name]), bright_per_slice(random_image(seed)[None]))


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_2d_volume_file_mask_keeps_its_geometry_and_has_no_volume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  suffix: str) -> None:
    array = random_image(9).astype(np.int16)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.T))
    image.SetSpacing((0.5, 0.7))
    image.SetOrigin((10.0, -20.0))
    image.SetDirection((-1.0, 0.0, 0.0, 1.0))
    source = tmp_path / f"plane{suffix}"
    sitk.WriteImage(image, str(source))
    stand_in(monkeypatch)
    out = tmp_path / "pred"
    row = run_inference([source], out, infer_settings())[0]
    assert row["status"] == "ok", row
    mask = sitk.ReadImage(str(out / "plane" / "mask.nii.gz"))
    assert mask.GetSize() == (40, 28, 1)
    np.testing.assert_allclose(mask.GetSpacing()[:2], (0.5, 0.7), atol=1e-6)
    np.testing.assert_allclose(mask.GetOrigin()[:2], (10.0, -20.0), atol=1e-6)
    np.testing.assert_allclose(np.reshape(mask.GetDirection(), (3, 3))[:2, :2], [[-1, 0], [0, 1]], atol=1e-6)
    expected = bright_per_slice(array[None])
    np.testing.assert_array_equal(xyz(mask)[..., 0] > 0, expected)
    assert row["tumour_voxels"] == int(expected.sum())
    assert row["tumour_ml"] == "", "a 2D image has no slice thickness, so no volume"


def test_unreadable_slice_and_channels_on_other_grids_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    patient = make_dataset(tmp_path / "lgg", "lgg", cases=1, seed=35, size=(32, 32, 4)) / "SYN_0001"
    broken = patient / "SYN_0001_2.tif"
    broken.write_bytes(broken.read_bytes()[:200])  # cut in transfer
    stand_in(monkeypatch, in_channels=3, channel=1)
    row = run_inference([patient], tmp_path / "pred", infer_settings())[0]
    assert row["status"] == "failed"
    assert str(broken) in row["error"] and "corrupt or truncated" in row["error"], row["error"]
    assert "applying transform" not in row["error"]

    study = make_dataset(tmp_path / "a", "dicom", cases=1, seed=36, size=(32, 32, 4)) / "SYN_0001"
    other = make_dataset(tmp_path / "b", "dicom", cases=1, seed=37, size=(24, 24, 4)) / "SYN_0001"
    shutil.rmtree(study / "FLAIR")
    shutil.copytree(other / "FLAIR", study / "FLAIR")
    rows = run_inference([study], tmp_path / "pred2", infer_settings())
    # the FLAIR of another study is never matched with this study's T1s: two cases, each missing what the other has
    assert [r["status"] for r in rows] == ["failed", "failed"], rows
    errors = sorted(r["error"] for r in rows)
    assert errors[0].startswith("no series for the required channel 'flair'") and "'AX T1 PRE'" in errors[0]
    assert errors[1].startswith("no series for the required channel 't1', 't1c'") and "'AX FLAIR'" in errors[1]

    # the same FLAIR as part of this study: on another grid (24x24 against 32x32), the T1s are resampled onto it
    this_study = pydicom.dcmread(next((study / "T1_PRE").iterdir()), stop_before_pixels=True).StudyInstanceUID
    for path in (study / "FLAIR").iterdir():
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = this_study
        ds.save_as(path)
    row = run_inference([study], tmp_path / "pred3", infer_settings())[0]
    assert row["status"] == "ok", row
    marker = json.loads((tmp_path / "pred3" / row["case"] / "case.json").read_text())
    assert marker["resampled_onto_primary_grid"] == ["t1", "t1c"]
    mask = sitk.ReadImage(str(tmp_path / "pred3" / row["case"] / "mask.nii.gz"))
    _assert_same_geometry(mask, _read_series(study / "FLAIR"))


@pytest.mark.parametrize("order, flip", [
    ((0, 1, 2), (False, False, False)),  # axial as stored: the reference
    ((1, 2, 0), (False, False, False)),  # sagittal: stored slices run left to right
    ((2, 0, 1), (False, True, False)),  # coronal, stored upside down
])
def test_2d_model_segments_every_volume_in_axial_slices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        order: tuple[int, int, int], flip: tuple[bool, bool, bool]) -> None:
    """One head stored axial, sagittal or coronal gets the same mask: the 2D model sees axial slices, and the mask
    lands on the stored grid."""
    rng = np.random.default_rng(10)
    array = rng.uniform(1.0, 100.0, size=(20, 24, 6)).astype(np.float32)  # (x, y, z): axial, z to the head
    array *= np.linspace(0.5, 2.0, 6, dtype=np.float32)  # slices differ in brightness: the plane matters
    axial = sitk.GetImageFromArray(np.ascontiguousarray(array.T))
    axial.SetSpacing((0.9, 1.1, 2.0))
    axial.SetOrigin((12.3, -45.6, 78.9))
    stored = sitk.Flip(sitk.PermuteAxes(axial, order), flip)  # the same head in physical space, another index order
    source = tmp_path / "head.nii.gz"
    sitk.WriteImage(stored, str(source))
    truth = sitk.GetImageFromArray(np.ascontiguousarray(bright_per_slice(array[None]).T.astype(np.uint8)))
    truth.CopyInformation(axial)
    expected = sitk.Flip(sitk.PermuteAxes(truth, order), flip)
    stand_in(monkeypatch)
    row = run_inference([source], tmp_path / "pred", infer_settings())[0]
    assert row["status"] == "ok", row
    mask = sitk.ReadImage(str(tmp_path / "pred" / "head" / "mask.nii.gz"))
    _assert_same_geometry(mask, sitk.ReadImage(str(source)))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mask), sitk.GetArrayFromImage(expected))


def test_failure_reason_finds_an_input_error_behind_monai_wrappers(tmp_path: Path) -> None:
    """A user's file error raised inside a MONAI transform reaches the summary row as that error, not the wrapper."""
    from brainseg_monai.errors import input_error_in
    from brainseg_monai.inference.cases import Case
    from brainseg_monai.inference.runner import _failure_reason

    case = Case("p1", str(tmp_path / "p1"), "volume", [str(tmp_path / "p1" / "flair.nii.gz")])
    own = InputError(case.source, "holds no voxels")
    other = InputError(case.images[0], "is truncated")
    for inner, expected in ((own, "holds no voxels"), (other, str(other))):
        try:
            try:
                raise inner
            except InputError as err:
                raise RuntimeError("applying transform <LoadImaged>") from err
        except RuntimeError as wrapped:
            assert input_error_in(wrapped) is inner
            assert _failure_reason(case, wrapped) == expected
    plain = RuntimeError("out of memory")
    assert input_error_in(plain) is None
    assert _failure_reason(case, plain) == "RuntimeError: out of memory"


def test_an_image_too_small_to_see_fails_instead_of_an_empty_ok(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1x1 PNG used to come back ``ok`` with 0 tumour voxels, as if the model had looked at it."""
    from PIL import Image

    stand_in(monkeypatch)
    tiny, fine = tmp_path / "in" / "tiny.png", tmp_path / "in" / "fine.png"
    tiny.parent.mkdir()
    Image.fromarray(np.full((1, 1), 200, np.uint8)).save(tiny)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)).save(fine)
    rows = {r["case"]: r for r in run_inference([tiny, fine], tmp_path / "out", infer_settings())}
    assert rows["tiny"]["status"] == "failed" and "1 x 1 pixels in-plane: too small" in rows["tiny"]["error"]
    assert rows["fine"]["status"] == "ok"


# --------------------------------------------------------------------- the images column; inputs from someone else


def test_images_counts_the_inputs_read_the_same_for_ok_and_failed_rows(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """``images``: slice files, channel files or DICOM series read, each once, whatever the status; 0 when no input
    was chosen. A FLAIR-only study fills three channels from one series: 1."""
    import brainseg_monai.inference.runner as runner

    folders = {"good": tmp_path / "slices" / "good", "broken": tmp_path / "slices" / "broken"}
    for index, folder in enumerate(folders.values()):
        for n in range(3):
            write_image(folder / f"img{n}.png", random_image(10 * index + n))
    (folders["broken"] / "img1.png").write_bytes(b"not a png")
    studies = make_dataset(tmp_path / "studies", "dicom", cases=2, seed=27, size=(32, 32, 4))
    for series in ("T1_PRE", "T1_POST"):
        shutil.rmtree(studies / "SYN_0001" / series)
    shutil.rmtree(studies / "SYN_0002" / "FLAIR")

    stand_in(monkeypatch)
    slices = {r["case"]: r for r in run_inference(list(folders.values()), tmp_path / "pred", infer_settings())}
    assert (slices["good"]["status"], slices["good"]["images"]) == ("ok", 3)
    assert (slices["broken"]["status"], slices["broken"]["images"]) == ("failed", 3)

    spec = ModelSpec(network_name="unet", spatial_dims=2, in_channels=3, roi_size=[32, 32], channels=THREE_CHANNELS,
                     channel_fallbacks={"t1": "flair", "t1c": "flair"})
    monkeypatch.setattr(runner, "load_model", lambda checkpoint, device: (BrightVoxels(1).eval(), spec))
    rows = {r["case"]: r for r in run_inference([studies], tmp_path / "pred_dicom", infer_settings())}
    assert (rows["SYN_0001"]["status"], rows["SYN_0001"]["images"]) == ("ok", 1)
    assert (rows["SYN_0002"]["status"], rows["SYN_0002"]["images"]) == ("failed", 0)
    written = summary_rows(tmp_path / "pred_dicom")
    assert [(r["case"], r["images"]) for r in written] == [("SYN_0001", "1"), ("SYN_0002", "0")]


def test_untrusted_refuses_a_header_naming_a_file_outside_its_input_before_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    stand_in(monkeypatch)
    inbox = tmp_path / "inbox"
    image = write_image(inbox / "scan.mha", random_image(5))
    secret = tmp_path / "secret.raw"
    secret.write_bytes(bytes(40 * 28))
    (inbox / "evil.mhd").write_text("ObjectType = Image\nNDims = 2\nDimSize = 40 28\nElementType = MET_UCHAR\n"
                                    f"ElementDataFile = {secret}\n")
    with pytest.raises(InputError, match=r"evil.mhd: names the data file .*secret.raw.*outside the folder"):
        run_inference([inbox], tmp_path / "refused", infer_settings(untrusted=True))
    assert not (tmp_path / "refused").exists()  # refused before anything was written or read
    assert infer_cli(inbox, "--out", tmp_path / "refused_cli", "--untrusted") == 2
    assert "evil.mhd: names the data file" in capsys.readouterr().err
    # trusted (the default) it is read as any other file; a lone file of the folder passes the check on its own
    assert {r["status"] for r in run_inference([inbox], tmp_path / "trusted", infer_settings())} == {"ok"}
    assert run_inference([image], tmp_path / "alone", infer_settings(untrusted=True))[0]["status"] == "ok"


def test_component_flags_replace_a_stored_keep_fraction(tmp_path: Path) -> None:
    """A model tuned to keep components by probability mass: --keep-largest and --keep-fraction 0 replace that
    choice (they crashed or were ignored once), and asking for both ways at once is refused by name."""
    checkpoint = untrained_one_channel_model(tmp_path / "model")
    sidecar = checkpoint.parent / MODEL_SIDECAR
    spec = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**spec, "postprocessing": {"threshold": 0.5, "keep_fraction": 0.3}}))
    image = tmp_path / "in" / "slice.png"
    image.parent.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 255, (64, 64)).astype(np.uint8)),
                    str(image))
    expected = {None: (False, 0.3), (True, None): (True, None), (None, 0.0): (False, None), (None, 0.5): (False, 0.5)}
    for k, (flags, (largest, fraction)) in enumerate(expected.items()):
        keep_largest, keep_fraction = flags or (None, None)
        out = tmp_path / f"pred{k}"
        rows = run_inference([image], out, InferenceSettings(str(checkpoint), tta="none", progress=False, device="cpu",
                                                             keep_largest=keep_largest, keep_fraction=keep_fraction))
        assert rows[0]["status"] == "ok", rows
        post = json.loads((out / rows[0]["case"] / "case.json").read_text())["fingerprint"]["settings"]["postprocessing"]
        assert (post["keep_largest"], post["keep_fraction"]) == (largest, fraction), flags
    with pytest.raises(ValueError, match="set one"):
        run_inference([image], tmp_path / "both", InferenceSettings(str(checkpoint), tta="none", progress=False,
                                                                    device="cpu", keep_largest=True, keep_fraction=0.3))
