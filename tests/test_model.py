"""A model's settings and its sidecar (`brainseg_monai.model`): the one reader and writer of ``model.json``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from brainseg_monai.errors import InputError
from brainseg_monai.inference.postprocess import PostProcessing
from brainseg_monai.model import (
    MODEL_SIDECAR,
    TUNING_KEY,
    ModelSpec,
    find_spec,
    initial_weights,
    load_model,
    load_tuning,
    model_files,
    read_sidecar,
    store_tuning,
    write_model_sidecar,
    write_ensemble,
    write_sidecar,
    write_untuned_sidecar,
)
from brainseg_monai.networks import get_network
from conftest import REPO_ROOT

SHIPPED_SIDECAR = REPO_ROOT / "bundle" / "models" / MODEL_SIDECAR
#: a fresh process prints the ignite and TensorBoard modules importing ``%s`` adds to MONAI's, and our training modules
_TRAINING_STACK = """
import json, sys

def training_stack():
    return {m for m in sys.modules
            if m.split(".")[0] in ("ignite", "tensorboard") or m.startswith("torch.utils.tensorboard")}

import monai  # MONAI's __init__ loads every submodule, some of which import ignite and TensorBoard when installed
before = training_stack()
import %s
print(json.dumps({"added": sorted(training_stack() - before),
                  "ours": sorted(m for m in sys.modules if m in ("brainseg_monai.training", "brainseg_monai.tuning",
                                                                 "brainseg_monai.report"))}))
"""


@pytest.mark.parametrize("module", ["brainseg_monai.inference.runner", "brainseg_monai.webapp"])
def test_inference_imports_nothing_of_the_training_stack(module: str) -> None:
    """Inference loads neither our training modules nor any ignite or TensorBoard module beyond those ``import monai``
    itself loads (all of them, with MONAI 1.6 and both installed: the check that can be made is the difference)."""
    result = subprocess.run([sys.executable, "-c", _TRAINING_STACK % module], capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    imported = json.loads(result.stdout.splitlines()[-1])
    assert imported == {"added": [], "ours": []}


def test_the_shipped_sidecar_round_trips_unchanged(tmp_path: Path) -> None:
    """Read, rebuilt as a ModelSpec and written back, the shipped ``model.json`` is the same file byte for byte: by
    the writer itself, by a resumed training run with its settings, and by tuning storing its own result again."""
    text = SHIPPED_SIDECAR.read_text(encoding="utf-8")
    values = json.loads(text)
    spec = ModelSpec.from_dict(values)
    assert spec.to_dict() == {key: value for key, value in values.items() if key != TUNING_KEY}
    assert spec.postprocessor == PostProcessing(threshold=0.1, keep_largest=True, stack_slices=True)
    assert write_sidecar(tmp_path / "written.json", {**values, **spec.to_dict()}).read_text(encoding="utf-8") == text

    shutil.copy(SHIPPED_SIDECAR, tmp_path / MODEL_SIDECAR)
    run_config = {key: value for key, value in values.items() if key not in (TUNING_KEY, "postprocessing")}
    write_model_sidecar(tmp_path, {**run_config, "learning_rate": 1e-3}, resume=True)
    assert (tmp_path / MODEL_SIDECAR).read_text(encoding="utf-8") == text
    store_tuning(tmp_path / "model.pt", values["postprocessing"], values[TUNING_KEY])
    assert (tmp_path / MODEL_SIDECAR).read_text(encoding="utf-8") == text
    assert load_tuning(tmp_path) == values[TUNING_KEY]


def test_a_final_model_gets_the_settings_without_what_was_tuned_for_the_best(tmp_path: Path) -> None:
    shutil.copy(SHIPPED_SIDECAR, tmp_path / MODEL_SIDECAR)
    written = write_untuned_sidecar(tmp_path / "model_final.pt", tmp_path / MODEL_SIDECAR)
    assert written == tmp_path / "model_final.json"
    final = read_sidecar(written)
    assert final["postprocessing"] == {} and TUNING_KEY not in final
    assert find_spec(tmp_path / "model_final.pt").postprocessor == PostProcessing()
    assert find_spec(tmp_path / "model.pt").postprocessor.threshold == 0.1  # the best model's own is untouched
    assert write_untuned_sidecar(tmp_path / "other.pt", tmp_path / "missing.json") is None


def test_tuning_a_model_without_a_sidecar_writes_one_from_its_run_settings(tmp_path: Path) -> None:
    """A checkpoint read through its run's ``config_resolved.json`` gets a ``model.json`` with the tuned settings."""
    (tmp_path / "config_resolved.json").write_text(json.dumps({"network_name": "unet", "roi_size": [32, 32],
                                                               "learning_rate": 1e-3}))
    checkpoint = tmp_path / "models" / "model.pt"
    checkpoint.parent.mkdir()
    sidecar = store_tuning(checkpoint, {"threshold": 0.3}, {"threshold": 0.3, "threshold_curve": [[0.3, 0.8]]})
    assert sidecar == checkpoint.parent / MODEL_SIDECAR
    stored = read_sidecar(sidecar)
    assert stored["roi_size"] == [32, 32] and stored["postprocessing"] == {"threshold": 0.3}
    assert "learning_rate" not in stored and load_tuning(checkpoint)["threshold"] == 0.3


@pytest.mark.parametrize(("content", "reason"), [
    ("{not json", "not a readable model.json"),
    ("[1, 2]", "not a model.json"),
    (json.dumps({"postprocessing": {"threshold": 2.0}}), "invalid model settings: postprocessing"),
    (json.dumps({"postprocessing": {"largest": True}}), "invalid model settings: postprocessing"),
    (json.dumps({"spatial_dims": 4}), "invalid model settings: spatial_dims"),
])
def test_bad_settings_are_refused_naming_the_file(tmp_path: Path, content: str, reason: str) -> None:
    (tmp_path / MODEL_SIDECAR).write_text(content)
    with pytest.raises(InputError, match=reason) as caught:
        find_spec(tmp_path / "model.pt")
    assert caught.value.path == str(tmp_path / MODEL_SIDECAR)


def test_load_model_rebuilds_the_network_its_sidecar_describes(tmp_path: Path) -> None:
    spec = ModelSpec(network_kwargs={"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}, roi_size=[32, 32])
    network = get_network(spec.network_name, spec.spatial_dims, spec.in_channels, 1, **spec.network_kwargs)
    torch.save({"model": network.state_dict(), "epoch": 3}, tmp_path / "model.pt")
    write_sidecar(tmp_path / MODEL_SIDECAR, spec.to_dict())
    loaded, found = load_model(tmp_path / "model.pt", "cpu")
    assert found == spec and not loaded.training
    image = torch.rand(1, 3, 32, 32)
    assert torch.equal(loaded(image), network.eval()(image))
    wider = {**spec.network_kwargs, "channels": [4, 8, 32]}
    write_sidecar(tmp_path / MODEL_SIDECAR, {**spec.to_dict(), "network_kwargs": wider})
    with pytest.raises(InputError, match="weights do not fit network 'unet'"):
        load_model(tmp_path / "model.pt", "cpu")


def test_an_unknown_normalisation_is_refused_when_the_spec_is_built() -> None:
    with pytest.raises(ValueError, match="normalisation must be one of"):
        ModelSpec(normalisation="volume")


def _small_model(folder: Path, seed: int, **settings) -> Path:
    """A small random 2D U-Net saved as ``folder/model.pt`` with its ``model.json``."""
    torch.manual_seed(seed)
    spec = ModelSpec(network_kwargs={"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1},
                     roi_size=[32, 32], **settings)
    folder.mkdir(parents=True, exist_ok=True)
    network = get_network(spec.network_name, spec.spatial_dims, spec.in_channels, 1, **spec.network_kwargs)
    torch.save(network.state_dict(), folder / "model.pt")
    write_sidecar(folder / MODEL_SIDECAR, spec.to_dict())
    return folder / "model.pt"


def test_an_ensemble_loads_its_members_and_averages_their_probabilities(tmp_path: Path) -> None:
    """``brainseg ensemble``'s model.json loads as one network of the members' logits; the predictor averages their
    probabilities (with one view, exactly the members' mean) and their disagreement is the spread."""
    from brainseg_monai.inference.predictor import Predictor
    from brainseg_monai.networks.ensemble import EnsembleNetwork

    members = [_small_model(tmp_path / f"fold{k}" / "models", k, postprocessing={"threshold": 0.3},
                            uncertainty={"review_above": 0.2}) for k in range(3)]
    path = write_ensemble(members, tmp_path / "ensemble" / "model.json")
    stored = read_sidecar(path)
    assert stored["members"] == [f"../fold{k}/models/model.pt" for k in range(3)]
    # post-processing agreed by all is kept; the review threshold was chosen for one model's probabilities
    assert stored["postprocessing"] == {"threshold": 0.3} and stored["uncertainty"] == {}
    assert model_files(path) == [path.parent / m for m in stored["members"]]
    network, spec = load_model(path, "cpu")
    assert isinstance(network, EnsembleNetwork) and len(network.members) == 3 and spec.members == stored["members"]
    image = torch.rand(2, 3, 32, 32)
    singles = [Predictor(load_model(m, "cpu")[0], spec, "cpu", tta="none").predict_batch(image) for m in members]
    maps = Predictor(network, spec, "cpu", tta="none").predict_batch(image)
    probs = torch.stack([single[:, 0] for single in singles])
    torch.testing.assert_close(maps[:, 0], probs.mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(maps[:, 1], probs.std(0, correction=0), rtol=0, atol=2e-3)
    assert maps[:, 1].max() > 0
    # without the spread: the same probability alone
    alone = Predictor(network, spec, "cpu", tta="none", spread=False).predict_batch(image)
    assert alone.shape == (2, 1, 32, 32) and torch.equal(alone, maps[:, :1])
    # members whose post-processing differs leave the ensemble's to its defaults
    other = _small_model(tmp_path / "other", 9, postprocessing={"threshold": 0.6})
    assert read_sidecar(write_ensemble([members[0], other], tmp_path / "mixed.json"))["postprocessing"] == {}


def test_an_ensemble_is_refused_clearly(tmp_path: Path) -> None:
    a, b = _small_model(tmp_path / "a", 0), _small_model(tmp_path / "b", 1)
    wider = _small_model(tmp_path / "wide", 2, in_channels=1)
    with pytest.raises(InputError, match="other settings than .*in_channels"):
        write_ensemble([a, wider], tmp_path / "e.json")
    with pytest.raises(ValueError, match="at least two"):
        write_ensemble([a], tmp_path / "e.json")
    with pytest.raises(InputError, match="a model's .pt checkpoint"):
        write_ensemble([a, tmp_path / "a" / MODEL_SIDECAR], tmp_path / "e.json")
    path = write_ensemble([a, b], tmp_path / "e.json")
    before = path.read_bytes()
    with pytest.raises(InputError, match="exists already"):
        write_ensemble([b, a], path)
    assert path.read_bytes() == before  # a user's file is never replaced unasked
    write_ensemble([b, a], path, overwrite=True)
    # a member gone: the error names it
    (tmp_path / "b" / "model.pt").unlink()
    with pytest.raises(InputError, match="ensemble member not found") as caught:
        load_model(path, "cpu")
    assert caught.value.path == str(tmp_path / "b" / "model.pt")
    # a model.json without members is no checkpoint; a .pt whose model.json is an ensemble's says which to pass
    with pytest.raises(InputError, match="names no weight files"):
        load_model(tmp_path / "a" / MODEL_SIDECAR, "cpu")
    shutil.copy(path, tmp_path / "a" / MODEL_SIDECAR)
    with pytest.raises(InputError, match="describes an ensemble of 2 models: pass that model.json"):
        load_model(a, "cpu")


def test_training_can_start_from_a_model_s_weights(tmp_path: Path) -> None:
    """train.json's init_from: the run's network starts from a checkpoint's weights (fine-tuning the shipped model
    on one's own scans); a checkpoint of other settings is refused naming it."""
    checkpoint = _small_model(tmp_path / "shipped", 0)
    spec = find_spec(checkpoint)
    fresh = get_network(spec.network_name, spec.spatial_dims, spec.in_channels, 1, **spec.network_kwargs)
    assert initial_weights(fresh, None) is fresh and initial_weights(fresh, "null") is fresh
    started = initial_weights(fresh, checkpoint)
    stored = torch.load(checkpoint, weights_only=True)
    assert all(torch.equal(started.state_dict()[k], v) for k, v in stored.items())
    other = get_network("unet", 2, 1, 1, channels=[4, 8, 16], strides=[2, 2], num_res_units=1)
    with pytest.raises(InputError, match="weights do not fit the network of this run") as caught:
        initial_weights(other, checkpoint)
    assert caught.value.path == str(checkpoint)
    with pytest.raises(InputError, match="init_from: checkpoint not found"):
        initial_weights(fresh, tmp_path / "none.pt")
