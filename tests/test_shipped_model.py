"""The LGG model shipped in bundle/models: loadable with its settings, accurate on shared patients, exportable.

Nothing here trains. The shipped model was trained on all 56 shared LGG patients, so these patients are not unseen:
the Dice bar checks that the model and the inference pipeline work, and the cross-validated figures in
bundle/docs/README.md (each patient predicted by a model that never saw it) are the estimate for new patients.
"""

from __future__ import annotations

import configparser
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from brainseg_monai import __version__
from brainseg_monai.evaluation import evaluate_predictions
from brainseg_monai.inference.predictor import load_for_case
from brainseg_monai.inference.runner import InferenceSettings, run_inference
from brainseg_monai.model import MODEL_SIDECAR, load_model
from conftest import REPO_ROOT, shared_path

BUNDLE = REPO_ROOT / "bundle"
MODEL = BUNDLE / "models" / "model.pt"
#: The recipe the shipped model was trained with; train.json alone builds the phantom default (a batch-norm U-Net).
LGG_CONFIG = REPO_ROOT / "configs" / "lgg_2d.json"
#: Two shared patients, chosen before scoring (the first two of cross-validation fold 0, in name order, with 20
#: slices); the cross-validation model that never saw them scores 0.89 and 0.90 with the shipped defaults.
PATIENTS = ("TCGA_CS_4944_20010208", "TCGA_HT_7884_19980913")
#: Per-patient Dice bar: well above chance (an empty or all-brain mask scores about 0 to 0.1 here) and below what
#: even the models that never saw these patients reach, so that only a broken model or pipeline fails it.
DICE_BAR = 0.75


def test_the_shipped_model_loads_with_its_settings() -> None:
    assert MODEL.is_file(), "bundle/models/model.pt is missing"
    assert MODEL.stat().st_size <= 25 * 2**20
    network, spec = load_model(MODEL, "cpu")
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    channel_def = meta["network_data_format"]["inputs"]["image"]["channel_def"]
    assert spec.spatial_dims == 2 and spec.in_channels == 3 == len(channel_def)
    assert 0.0 < spec.postprocessing["threshold"] < 1.0  # the tuned threshold travels with the model
    assert "lgg" in meta["changelog"][meta["version"]].lower()
    sidecar = json.loads((MODEL.parent / MODEL_SIDECAR).read_text())
    assert sidecar["network_name"] == spec.network_name
    with torch.no_grad():
        out = network(torch.zeros(1, 3, 256, 256))
    assert out.shape == (1, 1, 256, 256) and torch.isfinite(out).all()


def test_the_metadata_has_its_schema_fields_and_pins_this_package_version() -> None:
    """The required fields of the model-zoo schema named (checked offline; the schema itself is a download)."""
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    assert meta["schema"].endswith("/meta_schema_20240725.json")  # the schema that has required_packages_version
    required = {"schema", "version", "monai_version", "pytorch_version", "numpy_version", "required_packages_version",
                "task", "description", "authors", "copyright", "network_data_format"}
    assert required <= set(meta), required - set(meta)
    for tensor in [*meta["network_data_format"]["inputs"].values(), *meta["network_data_format"]["outputs"].values()]:
        assert {"type", "format", "num_channels", "spatial_shape", "dtype", "value_range"} <= set(tensor)
    setup = configparser.ConfigParser()
    setup.read(REPO_ROOT / "setup.cfg")
    assert meta["required_packages_version"]["brainseg-monai"] == __version__ == setup["metadata"]["version"]


@pytest.mark.realdata
def test_shared_lgg_patients_are_segmented_well_by_default(tmp_path: Path) -> None:
    root = shared_path("lgg", "kaggle_3m")
    patients = tmp_path / "patients"
    patients.mkdir()
    for name in PATIENTS:
        (patients / name).symlink_to(root / name, target_is_directory=True)
    rows = run_inference([patients], tmp_path / "pred", InferenceSettings(str(MODEL), device="cpu", progress=False))
    assert [r["status"] for r in rows] == ["ok", "ok"]
    result = evaluate_predictions(tmp_path / "pred", patients, source="lgg")
    dice = {p["patient"]: p["dice"] for p in result["per_patient"]}
    assert set(dice) == set(PATIENTS)
    assert min(dice.values()) >= DICE_BAR, dice


@pytest.mark.realdata
def test_torchscript_export_gives_the_same_masks(tmp_path: Path) -> None:
    slices = [str(p) for p in sorted(shared_path("lgg", "kaggle_3m", PATIENTS[0]).glob("*_1[0-4].tif"))]
    exported = tmp_path / "model.ts"
    cmd = [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(exported),
           "--ckpt_file", str(MODEL), "--meta_file", str(BUNDLE / "configs" / "metadata.json"),
           "--config_file", json.dumps([str(BUNDLE / "configs" / "train.json"), str(LGG_CONFIG)]),
           "--bundle_root", str(BUNDLE)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    network, spec = load_model(MODEL, "cpu")
    scripted = torch.jit.load(str(exported), map_location="cpu").eval()
    batch = torch.stack([torch.as_tensor(s) for s in load_for_case("slices", slices, spec).slices])  # as infer reads
    with torch.no_grad():
        ours, theirs = torch.sigmoid(network(batch)), torch.sigmoid(scripted(batch))
    threshold = spec.postprocessing["threshold"]
    assert torch.equal(ours >= threshold, theirs >= threshold)
    assert (ours - theirs).abs().max() < 1e-4


ENSEMBLE = BUNDLE / "models" / "ensemble.json"


def test_the_shipped_ensemble_names_its_members_and_the_score_its_review_threshold_is_for() -> None:
    """bundle/models/ensemble.json: the shipped model and a second of the same recipe (seed 1), each at most 25 MB,
    with a review threshold chosen for the members' disagreement."""
    from brainseg_monai.uncertainty import MEMBERS_DICE

    stored = json.loads(ENSEMBLE.read_text())
    assert stored["members"] == ["model.pt", "model_seed1.pt"]
    for member in stored["members"]:
        assert (ENSEMBLE.parent / member).stat().st_size <= 25 * 2**20
    network, spec = load_model(ENSEMBLE, "cpu")
    assert spec.members == stored["members"] and spec.uncertainty["score"] == MEMBERS_DICE
    assert spec.postprocessing == json.loads((MODEL.parent / MODEL_SIDECAR).read_text())["postprocessing"]
    with torch.no_grad():
        assert network(torch.zeros(1, 3, 256, 256)).shape == (1, 2, 256, 256)


@pytest.mark.realdata
def test_the_shipped_ensemble_segments_a_shared_patient_and_scores_its_members_disagreement(tmp_path: Path) -> None:
    from brainseg_monai.uncertainty import MEMBERS_DICE

    root = shared_path("lgg", "kaggle_3m")
    patients = tmp_path / "patients"
    patients.mkdir()
    (patients / PATIENTS[0]).symlink_to(root / PATIENTS[0], target_is_directory=True)
    rows = run_inference([patients], tmp_path / "pred", InferenceSettings(str(ENSEMBLE), device="cpu", progress=False))
    assert rows[0]["status"] == "ok", rows
    dice = evaluate_predictions(tmp_path / "pred", patients, source="lgg")["per_patient"][0]["dice"]
    assert dice >= DICE_BAR
    marker = json.loads((tmp_path / "pred" / PATIENTS[0] / "case.json").read_text())
    assert marker["uncertainty_score"] == MEMBERS_DICE and 0.0 <= float(rows[0]["uncertainty"]) < 0.2
    assert rows[0]["review"] in ("yes", "no")
