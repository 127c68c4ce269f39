"""The bundle as MONAI's tools see it: inference.json run by ConfigWorkflow, exported and verified by monai.bundle,
evaluate.json scoring the masks brainseg infer writes.

The masks of inference.json are compared file by file with brainseg infer's: for 2D slices (a patient's numbered
slices, a lone image) and for volumes without noise-only slices, at a model without a pixel size to resample to, the
two share every step, so the masks must be equal (see brainseg_monai/bundle_infer.py for where they differ).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.bundle import ConfigWorkflow
from monai.inferers import Inferer
from monai.transforms import Compose

from brainseg_monai.bundle_infer import LoadSliceStackd, PostProcessd, PredictorInferer, case_items
from brainseg_monai.errors import InputError
from brainseg_monai.inference.postprocess import PostProcessing
from brainseg_monai.inference.predictor import noise_only_slices
from brainseg_monai.inference.runner import InferenceSettings, run_inference
from brainseg_monai.model import MODEL_SIDECAR, ModelSpec, find_spec, load_model
from brainseg_monai.networks import get_network
from brainseg_monai.synth import make_dataset
from conftest import REPO_ROOT, shared_path

BUNDLE = REPO_ROOT / "bundle"
CONFIGS = BUNDLE / "configs"
INFERENCE = str(CONFIGS / "inference.json")
METADATA = str(CONFIGS / "metadata.json")
LOGGING = str(CONFIGS / "logging.conf")
SHIPPED = BUNDLE / "models" / "model.pt"
#: the shared LGG patient compared end to end (the first of tests/test_shipped_model.py's two)
PATIENT = "TCGA_CS_4944_20010208"
#: the datalist's training patient when evaluate.json scores PATIENT (a datalist needs one)
OTHER_PATIENT = "TCGA_HT_7884_19980913"
#: outputs of brainseg infer that are not masks (the bundle writes masks only)
#: what brainseg infer writes besides the masks (the bundle writes masks only)
_NOT_MASKS = {"case.json", "overlay.png", "summary.csv", "uncertainty.png", "uncertainty.nii.gz"}


def _random_model(folder: Path, threshold: float = 0.6) -> Path:
    """A 3-channel 2D U-Net with seeded random weights whose stored post-processing keeps the largest component of
    each patient's stacked slices: at ``threshold`` its masks have many components, so stacking matters."""
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    spec = ModelSpec(network_kwargs={"norm": "instance"}, roi_size=[64, 64], normalisation="case",
                     postprocessing={"threshold": threshold, "keep_largest": True, "stack_slices": True})
    torch.save(get_network("unet", 2, 3, 1, **spec.network_kwargs).state_dict(), folder / "model.pt")
    (folder / MODEL_SIDECAR).write_text(json.dumps(spec.to_dict()))
    return folder / "model.pt"


def _infer_with_bundle(inputs: Path, out: Path, checkpoint: Path = SHIPPED, **overrides: object) -> ConfigWorkflow:
    workflow = ConfigWorkflow(config_file=INFERENCE, workflow_type="infer", meta_file=METADATA, logging_file=LOGGING,
                              bundle_root=str(BUNDLE), checkpoint=str(checkpoint), dataset_dir=str(inputs),
                              output_dir=str(out), device="cpu", **overrides)
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return workflow


def _masks(folder: Path) -> dict[str, sitk.Image]:
    return {str(p.relative_to(folder)): sitk.ReadImage(str(p)) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in _NOT_MASKS and not p.name.endswith("_unc.png")}


def _assert_same_masks(bundle_out: Path, infer_out: Path) -> int:
    """Every mask file of brainseg infer has its twin from the bundle, same geometry and pixels; returns the
    number of tumour pixels, so a test can tell that it compared more than empty masks."""
    ours, theirs = _masks(bundle_out), _masks(infer_out)
    assert set(ours) == set(theirs) and theirs
    tumour = 0
    for name, expected in theirs.items():
        got = ours[name]
        assert got.GetSize() == expected.GetSize(), name
        assert np.allclose(got.GetOrigin(), expected.GetOrigin()), name
        assert np.allclose(got.GetSpacing(), expected.GetSpacing()), name
        assert np.allclose(got.GetDirection(), expected.GetDirection()), name
        pixels = sitk.GetArrayFromImage(expected)
        assert np.array_equal(sitk.GetArrayFromImage(got), pixels), name
        tumour += int(np.count_nonzero(pixels))
    return tumour


def test_inference_config_has_every_property_monai_requires() -> None:
    workflow = ConfigWorkflow(config_file=INFERENCE, workflow_type="infer", meta_file=METADATA, logging_file=LOGGING,
                              bundle_root=str(BUNDLE))
    workflow.initialize()
    assert workflow.check_properties() in (None, [])
    parser = workflow.parser
    # the keys MONAI Label's bundle task and MONAI Deploy's bundle operator read
    assert isinstance(parser.get_parsed_content("preprocessing"), Compose)
    assert isinstance(parser.get_parsed_content("postprocessing"), Compose)
    assert isinstance(parser.get_parsed_content("inferer"), Inferer)
    network = parser.get_parsed_content("network_def")  # the shipped network, from model.json alone
    network.load_state_dict(torch.load(SHIPPED, map_location="cpu", weights_only=True))


def test_run_writes_the_masks_brainseg_infer_writes(tmp_path: Path) -> None:
    """LGG-layout patients, a lone 2D image and a NIfTI case folder, with a model whose stored post-processing keeps
    the largest component of each patient's stacked slices."""
    inputs = tmp_path / "inputs"
    make_dataset(inputs / "lgg", "lgg", cases=2, seed=3, size=(64, 64, 6))
    volumes = make_dataset(inputs / "volumes", "nifti", cases=1, seed=4, size=(48, 48, 12), oblique=True)
    flair = sitk.GetArrayFromImage(sitk.ReadImage(str(volumes / "SYN_0001" / "SYN_0001_flair.nii.gz")))
    assert noise_only_slices(np.moveaxis(flair, 0, -1)[None]) == []  # brainseg infer zeroes such slices, the bundle not
    (inputs / "single").mkdir()
    shutil.copy(inputs / "lgg" / "SYN_0001" / "SYN_0001_3.tif", inputs / "single" / "lone.tif")
    checkpoint = _random_model(tmp_path / "model")

    _infer_with_bundle(inputs, tmp_path / "bundle", checkpoint, tta="none")
    rows = run_inference([inputs], tmp_path / "infer", InferenceSettings(str(checkpoint), tta="none", device="cpu",
                                                                          progress=False))
    assert {row["status"] for row in rows} == {"ok"} and len(rows) == 4
    assert _assert_same_masks(tmp_path / "bundle", tmp_path / "infer") > 0


@pytest.mark.slow
@pytest.mark.realdata
def test_shared_patient_masks_and_evaluation_match_brainseg_infer(tmp_path: Path) -> None:
    """The shipped model on a shared LGG patient with its defaults (dihedral TTA, threshold 0.1, the largest
    component of the stacked slices): inference.json writes brainseg infer's masks, and evaluate.json scores them."""
    source = shared_path("lgg", "kaggle_3m", PATIENT)
    patients = tmp_path / "patients"
    patients.mkdir()
    (patients / PATIENT).symlink_to(source, target_is_directory=True)
    _infer_with_bundle(patients, tmp_path / "bundle")
    run_inference([patients], tmp_path / "infer", InferenceSettings(str(SHIPPED), device="cpu", progress=False))
    assert _assert_same_masks(tmp_path / "bundle", tmp_path / "infer") > 0

    slices = sorted(source.glob(f"{PATIENT}_*[0-9].tif"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    items = [{"image": str(p), "label": str(p.with_name(p.stem + "_mask.tif")), "patient": PATIENT} for p in slices]
    datalist = tmp_path / "datalist.json"
    other = shared_path("lgg", "kaggle_3m", OTHER_PATIENT) / f"{OTHER_PATIENT}_1.tif"  # listed, never read
    training = [{"image": str(other), "label": str(other.with_name(f"{other.stem}_mask.tif")),
                 "patient": OTHER_PATIENT}]
    datalist.write_text(json.dumps({"training": training, "validation": items}))
    evaluation = ConfigWorkflow(
        config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")], workflow_type="eval",
        bundle_root=str(BUNDLE), output_dir=str(tmp_path / "run"), datalist=str(datalist), device="cpu",
        checkpoint=str(SHIPPED), num_workers=0)
    evaluation.initialize()
    assert evaluation.check_properties() in (None, [])
    evaluation.run()
    with (tmp_path / "run" / "eval" / "val_mean_dice_raw.csv").open() as handle:
        scored = float(list(csv.reader(handle))[1][1])
    masks = [sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "infer" / PATIENT / f"{p.stem}_pred.png"))) > 0
             for p in slices]
    truth = [sitk.GetArrayFromImage(sitk.ReadImage(item["label"])) > 0 for item in items]
    dice = 2 * sum((m & t).sum() for m, t in zip(masks, truth)) / sum(m.sum() + t.sum() for m, t in zip(masks, truth))
    assert scored == pytest.approx(dice, abs=1e-5)


def test_evaluate_json_scores_each_patients_post_processed_masks(tmp_path: Path) -> None:
    """evaluate.json over a training run's validation patients: the stored threshold and the largest component of
    each patient's stacked slices, not validate's 0.5; one score per patient."""
    data = make_dataset(tmp_path / "lgg", "lgg", cases=4, seed=3, size=(64, 64, 6))
    checkpoint = _random_model(tmp_path / "run" / "models", threshold=0.6)
    evaluation = ConfigWorkflow(
        config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")], workflow_type="eval",
        bundle_root=str(BUNDLE), output_dir=str(tmp_path / "run"), dataset_dir=str(data), device="cpu", num_workers=0,
        tta="none")
    evaluation.initialize()
    assert evaluation.check_properties() in (None, [])
    evaluation.run()
    validation = json.loads((tmp_path / "run" / "datalist.json").read_text())["validation"]
    patients = sorted({item["patient"] for item in validation})
    run_inference([str(data / p) for p in patients], tmp_path / "infer",
                  InferenceSettings(str(checkpoint), tta="none", device="cpu", progress=False))
    with (tmp_path / "run" / "eval" / "val_mean_dice_raw.csv").open() as handle:
        scored = [float(row[1]) for row in list(csv.reader(handle))[1:]]
    expected = []
    for patient in patients:
        items = [item for item in validation if item["patient"] == patient]
        masks = [sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "infer" / patient /
                                                           f"{Path(i['image']).stem}_pred.png"))) > 0 for i in items]
        truth = [sitk.GetArrayFromImage(sitk.ReadImage(i["label"])) > 0 for i in items]
        overlap = sum(int((m & t).sum()) for m, t in zip(masks, truth))
        expected.append(2 * overlap / sum(int(m.sum() + t.sum()) for m, t in zip(masks, truth)))
    assert len(scored) == len(patients) and scored == pytest.approx(expected, abs=1e-5)


def test_evaluate_json_scores_a_3d_model_on_whole_volumes(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "volumes", "nifti", cases=3, seed=4, size=(48, 48, 32))
    models = tmp_path / "run" / "models"
    models.mkdir(parents=True)
    spec = ModelSpec(spatial_dims=3, roi_size=[32, 32, 32], postprocessing={"threshold": 0.5, "keep_largest": True})
    torch.save(get_network("unet", 3, 3, 1).state_dict(), models / "model.pt")
    (models / MODEL_SIDECAR).write_text(json.dumps(spec.to_dict()))
    evaluation = ConfigWorkflow(
        config_file=[str(CONFIGS / "train.json"), str(REPO_ROOT / "configs" / "brats_3d.json"),
                     str(CONFIGS / "evaluate.json")], workflow_type="eval", bundle_root=str(BUNDLE),
        output_dir=str(tmp_path / "run"), dataset_dir=str(data), device="cpu", num_workers=0, in_channels=3,
        roi_size=[32, 32, 32], network_name="unet", tta="none")
    evaluation.initialize()
    assert evaluation.check_properties() in (None, [])
    evaluation.run()
    with (tmp_path / "run" / "eval" / "val_mean_dice_raw.csv").open() as handle:
        rows = list(csv.reader(handle))[1:]
    assert len(rows) == 1 and rows[0][0].endswith(".nii.gz") and 0.0 <= float(rows[0][1]) <= 1.0


def test_case_items_leave_out_what_only_brainseg_infer_segments(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """DICOM studies and one-channel images of a named sequence are brainseg infer's; the rest are items."""
    make_dataset(tmp_path / "in" / "lgg", "lgg", cases=1, seed=3, size=(32, 32, 4))
    make_dataset(tmp_path / "in" / "dicom", "dicom", cases=1, seed=5, size=(24, 24, 4))
    (tmp_path / "in" / "flair").mkdir()
    shutil.copy(tmp_path / "in" / "lgg" / "SYN_0001" / "SYN_0001_1.tif", tmp_path / "in" / "flair" / "x_flair.png")
    sitk.WriteImage(sitk.VectorIndexSelectionCast(sitk.ReadImage(str(tmp_path / "in" / "flair" / "x_flair.png")), 1),
                    str(tmp_path / "in" / "flair" / "x_flair.png"))
    shipped = find_spec(SHIPPED)  # FLAIR fills the other two channels
    items = case_items(tmp_path / "in", shipped)
    assert [item["case"] for item in items] == ["SYN_0001"]
    assert len(items[0]["image"]) == 4 and items[0]["slice_files"] == items[0]["image"]
    assert "DICOM study" in caplog.text and "one-channel input" in caplog.text
    with pytest.raises(InputError, match="no case the bundle can segment"):
        case_items(tmp_path / "in" / "dicom", shipped)


def test_slices_of_different_sizes_do_not_stack(tmp_path: Path) -> None:
    for name, size in (("p_1.png", 32), ("p_2.png", 40)):
        sitk.WriteImage(sitk.Image([size, size], sitk.sitkUInt8), str(tmp_path / name))
    with pytest.raises(InputError, match="different sizes"):
        LoadSliceStackd("image")({"image": [str(tmp_path / "p_1.png"), str(tmp_path / "p_2.png")]})


def test_post_processing_keeps_the_largest_component_of_a_patients_stacked_slices() -> None:
    prob = np.zeros((1, 16, 16, 3), dtype=np.float32)
    prob[0, 2:8, 2:8, 0:2] = 0.9  # a tumour over two slices
    prob[0, 12:14, 12:14, 2] = 0.9  # a small blob on the third, away from it
    keep = PostProcessing(threshold=0.5, keep_largest=True, stack_slices=True)
    numbered = ["p_1.tif", "p_2.tif", "p_3.tif"]
    stacked = PostProcessd("pred", keep)({"pred": torch.as_tensor(prob), "slice_files": numbered})
    assert stacked["pred"][0, ..., :2].sum() == 72 and stacked["pred"][0, ..., 2].sum() == 0
    for settings, files in ((keep, ["a.tif", "b.tif", "c.tif"]), (PostProcessing(0.5, keep_largest=True), numbered)):
        alone = PostProcessd("pred", settings)({"pred": torch.as_tensor(prob), "slice_files": files})
        assert alone["pred"][0, ..., 2].sum() == 4  # unnumbered slices, or no stacking: each slice on its own


@pytest.mark.parametrize("spatial_dims, shape", [(2, (2, 3, 24, 40)), (2, (1, 3, 24, 40, 5)), (3, (1, 3, 20, 24, 16))])
def test_predictor_inferer_gives_one_probability_channel(spatial_dims: int, shape: tuple[int, ...]) -> None:
    """2D images, a stack of 2D slices, and a 3D volume: probabilities on the input's grid."""
    spec = ModelSpec(spatial_dims=spatial_dims, roi_size=[32] * spatial_dims,
                     network_kwargs={"channels": [4, 8], "strides": [2], "num_res_units": 0})
    network = get_network("unet", spatial_dims, 3, 1, **spec.network_kwargs).eval()
    probs = PredictorInferer(spec, tta="flip")(torch.rand(shape), network)
    assert probs.shape == (shape[0], 1, *shape[2:]) and probs.dtype == torch.float32
    assert 0 <= float(probs.min()) and float(probs.max()) <= 1


def _monai_bundle(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_verify_net_in_out_from_the_bundle_folder() -> None:
    """As the model zoo runs it: from the bundle's folder, with inference.json alone."""
    _monai_bundle("verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json",
                  "--config_file", "configs/inference.json", cwd=BUNDLE)


def test_ckpt_export_needs_inference_json_alone(tmp_path: Path) -> None:
    exported = tmp_path / "model.ts"
    _monai_bundle("ckpt_export", "network_def", "--filepath", str(exported), "--ckpt_file", str(SHIPPED),
                  "--meta_file", METADATA, "--config_file", INFERENCE, "--bundle_root", str(BUNDLE))
    network, _ = load_model(SHIPPED, "cpu")
    scripted = torch.jit.load(str(exported), map_location="cpu").eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(scripted(images), network(images), atol=1e-5)


def test_metadata_passes_the_schema_it_names(tmp_path: Path) -> None:
    """``verify_metadata`` downloads the schema the metadata names; offline it needs a local copy of that file."""
    url = json.loads(Path(METADATA).read_text())["schema"]
    local = os.environ.get("BRAINSEG_META_SCHEMA")
    if not local or not Path(local).is_file():
        pytest.skip(f"the schema {url} is a download and there is no network here; set BRAINSEG_META_SCHEMA to a "
                    f"local copy of it to run this check")
    if importlib.util.find_spec("jsonschema") is None:
        pytest.skip("jsonschema is not installed (monai.bundle verify_metadata needs it)")
    schema = tmp_path / "schema.json"
    shutil.copy(local, schema)  # an existing file is not downloaded again
    _monai_bundle("verify_metadata", "--meta_file", METADATA, "--filepath", str(schema))
