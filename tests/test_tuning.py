"""Threshold tuning with a stub network whose probabilities are known, so the best threshold and the whole curve are
known; the pairing of fold models with the folds they never saw."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
import torch
from monai.bundle import ConfigWorkflow
from PIL import Image

from brainseg_monai import tuning
from brainseg_monai.datalist import training_split
from brainseg_monai.errors import InputError
from brainseg_monai.inference.postprocess import PostProcessing
from brainseg_monai.evaluation import evaluate_predictions
from brainseg_monai.inference.runner import InferenceSettings, run_inference
from brainseg_monai.model import ModelSpec, find_spec, load_tuning, sidecar_path
from brainseg_monai.synth import make_dataset
from brainseg_monai.tuning import tune_held_out_folds, tune_model_threshold
from conftest import REPO_ROOT

# Regions of every image, from the darkest intensity level to the brightest, and the probability the stub gives each.
LEVELS = (20, 60, 100, 150, 200)
PROBABILITIES = torch.tensor([0.02, 0.17, 0.32, 0.57, 0.82])
TUMOUR_FROM = 2  # levels 2, 3, 4 are tumour: thresholds in (0.17, 0.32] give a perfect mask, the tie goes to 0.3


class LevelNet(torch.nn.Module):
    """Stub network: the k-th smallest distinct value of each image's channel 0 gets logit(PROBABILITIES[k]) + shift.

    Intensity normalisation is a per-image increasing affine map, so the ranks of the levels survive it.
    """

    def __init__(self, shift: float = 0.0) -> None:
        super().__init__()
        self.shift = shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape[0], 1, *x.shape[2:])
        for b in range(x.shape[0]):
            channel = x[b, 0].contiguous()
            rank = torch.searchsorted(torch.unique(channel), channel)
            out[b, 0] = (torch.logit(PROBABILITIES[rank].double()) + self.shift).float()
        return out


def level_probabilities(shift: float = 0.0) -> np.ndarray:
    """The probability LevelNet(shift) gives each level."""
    return torch.sigmoid(torch.logit(PROBABILITIES.double()) + shift).numpy()


def level_map(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Level indices 0..4 in random blocks of 4 pixels, every level present."""
    blocks = rng.integers(0, len(LEVELS), size=tuple(s // 4 for s in shape))
    blocks.flat[: len(LEVELS)] = np.arange(len(LEVELS))
    out = blocks
    for axis in range(len(shape)):
        out = np.repeat(out, 4, axis=axis)
    return out


def expected_curve(
    levels_by_patient: dict[str, list[np.ndarray]], thresholds: np.ndarray, shifts: dict[str, float] | None = None
) -> np.ndarray:
    """Mean over patients of the stacked Dice at each threshold, from the level maps (and each patient's model
    shift) alone."""
    curve = []
    for t in thresholds:
        dices = []
        for patient, maps in levels_by_patient.items():
            probs = level_probabilities((shifts or {}).get(patient, 0.0))
            predicted = [probs[m] >= t for m in maps]
            truths = [m >= TUMOUR_FROM for m in maps]
            inter = sum(np.count_nonzero(p & q) for p, q in zip(predicted, truths))
            sizes = sum(np.count_nonzero(p) + np.count_nonzero(q) for p, q in zip(predicted, truths))
            dices.append(2 * inter / sizes)
        curve.append(np.mean(dices))
    return np.array(curve)


@pytest.fixture
def model_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A checkpoint folder with a model.json holding other keys; load_model returns the stub."""
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "model.pt").write_bytes(b"weights are not read: load_model is the stub")
    spec = ModelSpec(network_name="unet", roi_size=[32, 32], postprocessing={"threshold": 0.5, "min_size": 3})
    (folder / "model.json").write_text(json.dumps({**spec.to_dict(), "trained_on": "phantoms"}, indent=2))

    def fake_load_model(checkpoint: Path, device: str = "auto") -> tuple[torch.nn.Module, ModelSpec]:
        shift = json.loads(sidecar_path(checkpoint).read_text()).get("stub_shift", 0.0)
        return LevelNet(shift).eval(), find_spec(checkpoint)

    monkeypatch.setattr(tuning, "load_model", fake_load_model)
    return folder


def slice_items(folder: Path, patients: tuple[str, ...], seed: int = 0) -> tuple[list[dict], dict]:
    """Two RGB TIF slices per patient with PNG masks (levels >= TUMOUR_FROM), and each patient's level maps."""
    rng = np.random.default_rng(seed)
    items, levels_by_patient = [], {}
    for patient in patients:
        for k in range(2):
            levels = level_map(rng, (32, 32))  # (x, y)
            image = np.stack([np.asarray(LEVELS, dtype=np.uint8)[levels]] * 3, axis=-1)  # RGB, all channels alike
            path = folder / f"{patient}_{k}.tif"
            path.parent.mkdir(exist_ok=True)
            tifffile.imwrite(path, np.ascontiguousarray(image.transpose(1, 0, 2)), photometric="rgb")  # rows = y
            label = path.with_name(f"{patient}_{k}_mask.png")
            Image.fromarray(((levels >= TUMOUR_FROM) * 255).astype(np.uint8).T).save(label)
            items.append({"image": str(path), "label": str(label), "patient": patient})
            levels_by_patient.setdefault(patient, []).append(levels)
    return items, levels_by_patient


def test_tuning_picks_the_known_threshold_and_stores_it(model_dir: Path, tmp_path: Path) -> None:
    items, levels_by_patient = slice_items(tmp_path / "data", ("P1", "P2", "P3"))

    before = (model_dir / "model.json").read_text()
    dry = tune_model_threshold(model_dir / "model.pt", items, device="cpu", write=False)
    assert (model_dir / "model.json").read_text() == before and dry["sidecar"] is None

    result = tune_model_threshold(model_dir / "model.pt", items, device="cpu")
    assert result["threshold"] == pytest.approx(0.3)
    grid = np.array([t for t, _ in result["threshold_curve"]])
    np.testing.assert_allclose(grid, np.round(np.arange(0.05, 0.96, 0.05), 6))
    np.testing.assert_allclose([d for _, d in result["threshold_curve"]], expected_curve(levels_by_patient, grid),
                               atol=1e-9)
    assert result["dice"] == pytest.approx(1.0) and result["previous_threshold"] == 0.5
    assert result["previous_dice"] == pytest.approx(expected_curve(levels_by_patient, np.array([0.5]))[0])
    assert result["patients"] == 3 and result["items"] == 6

    # the tumour levels (60% of the blocks) touch across the stack: keeping the largest component changes nothing,
    # and the tie goes to the threshold alone
    assert [c["dice"] for c in result["postprocessing_candidates"]] == [pytest.approx(1.0)] * 4
    assert result["postprocessing"] == {"keep_largest": False, "keep_fraction": None, "stack_slices": False}
    stored = json.loads((model_dir / "model.json").read_text())
    assert stored["postprocessing"] == {"threshold": 0.3, "min_size": 3, "keep_largest": False, "keep_fraction": None,
                                        "stack_slices": False}
    assert stored["trained_on"] == "phantoms" and stored["roi_size"] == [32, 32]
    assert stored["tuning"]["threshold_curve"] == result["threshold_curve"]
    # what brainseg infer builds from the model: the tuned threshold, the other settings kept
    post = PostProcessing.from_dict(find_spec(model_dir / "model.pt").postprocessing)
    assert post.threshold == 0.3 and post.min_size == 3
    assert load_tuning(model_dir)["threshold"] == 0.3 and load_tuning(model_dir / "model.pt")["dice"] == 1.0


def test_largest_component_is_chosen_with_its_own_threshold_when_it_raises_patient_dice(
    model_dir: Path, tmp_path: Path
) -> None:
    """Two 32 x 32 slices of one patient: a tumour of a bright core (108 px a slice) and a fainter rim (36 px), on
    both slices (one 3D component of 288 voxels), and on slice 0 a false positive as faint as the rim (225 px) away
    from it. Three levels per image, so the stub gives 0.02, 0.17 and 0.32: thresholds 0.2-0.3 find the core alone
    (Dice 432/504), 0.05-0.15 the rim and the false positive too (Dice 576/801). Only with the largest component
    does the low threshold pay (Dice 1), so tuning the threshold first and the post-processing after would miss it."""
    items = []
    for k in range(2):
        image = np.full((32, 32), 20, np.uint8)
        image[1:13, 1:10] = 200  # core
        image[1:13, 10:13] = 100  # rim
        truth = image > 20
        if k == 0:
            image[16:31, 16:31] = 100  # false positive
        path = tmp_path / "data" / f"P1_{k}.tif"
        path.parent.mkdir(exist_ok=True)
        tifffile.imwrite(path, np.ascontiguousarray(np.stack([image] * 3, axis=-1)), photometric="rgb")
        Image.fromarray((truth * 255).astype(np.uint8)).save(path.with_name(f"P1_{k}_mask.png"))
        items.append({"image": str(path), "label": str(path.with_name(f"P1_{k}_mask.png")), "patient": "P1"})

    result = tune_model_threshold(model_dir / "model.pt", items, device="cpu")
    alone, largest, *by_mass = result["postprocessing_candidates"]
    assert alone["settings"] == {"keep_largest": False, "keep_fraction": None, "stack_slices": False}
    assert alone["threshold"] == pytest.approx(0.3) and alone["dice"] == pytest.approx(432 / 504)
    assert dict(map(tuple, alone["threshold_curve"]))[0.15] == pytest.approx(576 / 801)
    assert largest["settings"] == {"keep_largest": True, "keep_fraction": None, "stack_slices": True}
    assert largest["threshold"] == pytest.approx(0.15) and largest["dice"] == pytest.approx(1.0)
    assert (alone["worst"], alone["below_0.7"], largest["worst"]) == (pytest.approx(432 / 504), 0, pytest.approx(1.0))
    # the false positive holds 47% of the tumour's probability mass at 0.15 (225 x 0.17 against 216 x 0.32 + 72 x
    # 0.17): kept by 10% and 30% of the heaviest, so those candidates do no better than the core alone
    assert [c["settings"]["keep_fraction"] for c in by_mass] == [0.1, 0.3]
    assert [c["dice"] for c in by_mass] == [pytest.approx(432 / 504)] * 2
    assert dict(map(tuple, largest["threshold_curve"]))[0.3] == pytest.approx(432 / 504)
    assert result["postprocessing"] == largest["settings"] and result["threshold"] == pytest.approx(0.15)
    assert result["dice"] == pytest.approx(1.0) and result["threshold_curve"] == largest["threshold_curve"]
    assert result["previous_dice"] == 0.0  # the threshold alone at the previous 0.5 flags nothing
    stored = json.loads((model_dir / "model.json").read_text())
    assert stored["postprocessing"] == {"threshold": 0.15, "min_size": 3, "keep_largest": True, "keep_fraction": None,
                                        "stack_slices": True}
    assert stored["tuning"]["postprocessing_candidates"] == result["postprocessing_candidates"]
    assert PostProcessing.from_dict(find_spec(model_dir / "model.pt").postprocessing).stack_slices


def _fold_models(model_dir: Path, tmp_path: Path, shifts: tuple[float, ...]) -> list[Path]:
    """Copies of the stub model, one per fold, the k-th shifting its logits by shifts[k]."""
    models = []
    for k, shift in enumerate(shifts):
        fold_dir = tmp_path / f"fold{k}" / "models"
        fold_dir.mkdir(parents=True)
        (fold_dir / "model.pt").write_bytes((model_dir / "model.pt").read_bytes())
        settings = json.loads((model_dir / "model.json").read_text())
        (fold_dir / "model.json").write_text(json.dumps({**settings, "stub_shift": shift}))
        models.append(fold_dir / "model.pt")
    return models


def test_out_of_fold_tuning_pools_every_fold_and_stores_in_the_final_model(model_dir: Path, tmp_path: Path) -> None:
    items, levels_by_patient = slice_items(tmp_path / "data", ("P1", "P2", "P3"), seed=5)
    # fold 1's model is more confident: its best threshold alone would be in (0.60, 0.78], fold 0's in (0.17, 0.32]
    models = _fold_models(model_dir, tmp_path, (0.0, 2.0))
    held_out = ({"P1", "P2"}, {"P3"})
    folds = [(model, [it for it in items if it["patient"] in patients]) for model, patients in zip(models, held_out)]
    fold_json = (models[0].parent / "model.json").read_text()

    result = tuning.tune_threshold_out_of_fold(folds, target=model_dir / "model.pt", device="cpu")
    grid = np.round(np.arange(0.05, 0.96, 0.05), 6)
    expected = expected_curve(levels_by_patient, grid, {"P3": 2.0})
    np.testing.assert_allclose([d for _, d in result["threshold_curve"]], expected, atol=1e-9)
    tied = grid[np.isclose(expected, expected.max(), atol=1e-12)]
    assert result["threshold"] == pytest.approx(min(tied, key=lambda t: (abs(t - 0.5), t)))  # ties: closest to 0.5
    assert result["dice"] == pytest.approx(expected.max()) and result["dice"] < 1.0
    assert result["patients"] == 3 and result["items"] == 6 and result["folds"] == 2
    stored = json.loads((model_dir / "model.json").read_text())
    assert stored["postprocessing"] == {"threshold": result["threshold"], "min_size": 3, "keep_largest": False,
                                        "keep_fraction": None, "stack_slices": False}
    assert stored["tuning"]["folds"] == 2 and stored["tuning"]["threshold_curve"] == result["threshold_curve"]
    assert (models[0].parent / "model.json").read_text() == fold_json  # the fold models are left as they were

    dry = tuning.tune_threshold_out_of_fold(folds, device="cpu", thresholds=[0.2, 0.5])
    assert dry["sidecar"] is None and dry["previous_threshold"] == 0.5
    np.testing.assert_allclose([d for _, d in dry["threshold_curve"]],
                               expected_curve(levels_by_patient, np.array([0.2, 0.5]), {"P3": 2.0}), atol=1e-9)
    with pytest.raises(ValueError, match="'P3' is among the held-out patients of both"):
        tuning.tune_threshold_out_of_fold([(models[0], items), folds[1]], device="cpu")
    with pytest.raises(InputError, match="checkpoint not found"):
        tuning.tune_threshold_out_of_fold(folds, target=tmp_path / "nowhere" / "model.pt", device="cpu")
    with pytest.raises(InputError, match="checkpoint not found"):
        tuning.tune_threshold_out_of_fold([folds[0], (tmp_path / "gone.pt", folds[1][1])], device="cpu")


def test_tune_threshold_command_line_pairs_checkpoints_with_their_folds(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from brainseg_monai.cli import main

    items, _ = slice_items(tmp_path / "data", ("P1", "P2", "P3"), seed=5)
    datalist = {"name": "t", "source": "lgg", "folds": 2, "channels": ["t1", "flair", "t1c"], "validation": [],
                "testing": [], "training": [{**it, "fold": 0 if it["patient"] != "P3" else 1} for it in items]}
    (tmp_path / "dl.json").write_text(json.dumps(datalist))
    models = _fold_models(model_dir, tmp_path, (0.0, 2.0))
    for k, model in enumerate(models):
        (model.parent.parent / "config_resolved.json").write_text(json.dumps({"fold": k, "train_all": False}))
    args = ["tune-threshold", "--datalist", str(tmp_path / "dl.json"), "--device", "cpu"]

    # given in reverse order, each checkpoint still predicts the fold it never saw
    assert main([*args, "--checkpoint", str(models[1]), str(models[0]), "--fold", "1", "0",
                 "--store-in", str(model_dir / "model.pt")]) == 0
    tuned = json.loads((model_dir / "model.json").read_text())["tuning"]
    assert tuned["folds"] == 2 and tuned["patients"] == 3
    direct = tuning.tune_threshold_out_of_fold(
        [(models[0], [it for it in items if it["patient"] != "P3"]), (models[1], [it for it in items if it["patient"] == "P3"])],
        device="cpu")
    np.testing.assert_allclose(tuned["threshold_curve"], direct["threshold_curve"], atol=1e-12)
    out = capsys.readouterr().out
    assert "over 3 patients" in out and f"curve: {model_dir / 'threshold_curve.png'}" in out
    dry = tune_held_out_folds([models[1], models[0]], tmp_path / "dl.json", [1, 0], dry_run=True, device="cpu")
    assert dry["sidecar"] is None and dry["curve_plot"] == models[1].parent / "threshold_curve.png"
    np.testing.assert_allclose(dry["threshold_curve"], direct["threshold_curve"], atol=1e-12)
    with Image.open(dry["curve_plot"]) as png:
        assert png.format == "PNG"

    assert main([*args, "--checkpoint", str(models[1]), str(models[0]), "--fold", "0", "1", "--dry-run"]) == 2
    assert "held out fold 1" in capsys.readouterr().err
    (models[0].parent.parent / "config_resolved.json").write_text(json.dumps({"fold": 0, "train_all": True}))
    assert main([*args, "--checkpoint", str(models[0]), str(models[1]), "--fold", "0", "1", "--dry-run"]) == 2
    assert "trained on the validation patients too" in capsys.readouterr().err


def test_tune_threshold_command_line_checks_a_single_checkpoint_too(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from brainseg_monai.cli import main

    items, _ = slice_items(tmp_path / "data", ("P1", "P2", "P3"), seed=5)
    base = {"name": "t", "source": "lgg", "channels": ["t1", "flair", "t1c"], "testing": []}
    folds, split = tmp_path / "folds.json", tmp_path / "split.json"
    folds.write_text(json.dumps({**base, "folds": 2, "validation": [], "training": [
        {**it, "fold": 0 if it["patient"] != "P3" else 1} for it in items]}))
    split.write_text(json.dumps({**base, "training": [it for it in items if it["patient"] != "P3"],
                                 "validation": [it for it in items if it["patient"] == "P3"]}))
    model = _fold_models(model_dir, tmp_path, (0.0,))[0]
    record = model.parent.parent / "config_resolved.json"

    def tune(datalist: Path, *fold: str) -> int:
        return main(["tune-threshold", "--checkpoint", str(model), "--datalist", str(datalist), *fold, "--dry-run",
                     "--device", "cpu", "--tta", "none"])

    record.write_text(json.dumps({"fold": 0, "train_all": False}))
    assert tune(folds, "--fold", "1") == 2  # fold 1 is the one it trained on: an in-sample threshold
    assert "its run held out fold 0" in capsys.readouterr().err
    assert tune(folds, "--fold", "0") == 0 and "dry run: nothing stored" in capsys.readouterr().out
    assert tune(split) == 2  # its run held out a fold, not this datalist's validation split
    assert "held out fold 0" in capsys.readouterr().err

    record.write_text(json.dumps({"fold": None, "train_all": True}))
    assert tune(split) == 2  # it trained on the validation split too: it saw every patient
    assert "trained on the validation patients too" in capsys.readouterr().err
    record.write_text(json.dumps({"fold": None, "train_all": False}))
    assert tune(split) == 0
    assert tune(folds, "--fold", "1") == 2
    assert "held out the datalist's validation split (no fold)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "checkpoints, options, message",
    [
        (["a.pt", "b.pt"], {"folds": [0]}, "2 checkpoints need as many --fold values"),
        (["a.pt", "b.pt"], {}, "2 checkpoints need as many --fold values"),
        (["a.pt"], {"folds": [0, 1]}, "several --fold values need one checkpoint per fold"),
        (["a.pt", "b.pt"], {"folds": [0, 1]}, "--store-in MODEL"),
        (["a.pt", "b.pt"], {"folds": [0, 0], "dry_run": True}, "repeats a fold"),
        (["a.pt"], {"store_in": "c.pt", "dry_run": True}, "drop --store-in or --dry-run"),
    ],
)
def test_fold_models_and_the_target_are_checked_before_anything_is_read(checkpoints: list[str], options: dict,
                                                                       message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        tune_held_out_folds(checkpoints, "dl.json", **options)


def test_the_command_line_says_what_is_wrong_with_its_folds(capsys: pytest.CaptureFixture) -> None:
    from brainseg_monai.cli import main

    assert main(["tune-threshold", "--datalist", "dl.json", "--checkpoint", "a.pt", "b.pt", "--fold", "0"]) == 2
    assert "2 checkpoints need as many --fold values" in capsys.readouterr().err


def test_tuning_volumes_with_a_2d_model(model_dir: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    items, levels_by_patient = [], {}
    for patient in ("V1", "V2"):
        levels = np.stack([level_map(rng, (32, 32)) for _ in range(3)], axis=-1)  # every slice holds every level
        for name, array in (("flair", np.asarray(LEVELS, dtype=np.float32)[levels]),
                            ("seg", (levels >= TUMOUR_FROM).astype(np.uint8))):
            image = sitk.GetImageFromArray(np.ascontiguousarray(array.T))
            image.SetSpacing((1.0, 1.0, 2.0))
            sitk.WriteImage(image, str(tmp_path / f"{patient}_{name}.nii.gz"))
        items.append({"image": [str(tmp_path / f"{patient}_flair.nii.gz")],
                      "label": str(tmp_path / f"{patient}_seg.nii.gz"), "patient": patient})
        levels_by_patient[patient] = [levels]
    spec = json.loads((model_dir / "model.json").read_text())
    (model_dir / "model.json").write_text(json.dumps({**spec, "in_channels": 1, "channels": ["flair"]}))

    result = tune_model_threshold(model_dir / "model.pt", items, device="cpu", thresholds=[0.1, 0.2, 0.3, 0.6])
    assert result["threshold"] == pytest.approx(0.3)
    np.testing.assert_allclose([d for _, d in result["threshold_curve"]],
                               expected_curve(levels_by_patient, np.array([0.1, 0.2, 0.3, 0.6])), atol=1e-9)


def test_tuning_argument_errors(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="items must be a non-empty sequence"):
        tune_model_threshold(model_dir / "model.pt", [])
    with pytest.raises(ValueError, match=r"items\[0\] lacks label"):
        tune_model_threshold(model_dir / "model.pt", [{"image": "a.png", "patient": "p"}])


def test_tuned_threshold_is_what_infer_applies(tmp_path: Path) -> None:
    """Train a tiny model, tune on its validation patients, predict them with brainseg infer's runner and evaluate:
    the evaluated mean patient Dice is the tuned one (the same predictions, thresholded at the stored threshold)."""
    data = make_dataset(tmp_path / "lgg", "lgg", cases=5, seed=21, size=(64, 64, 8))
    workflow = ConfigWorkflow(
        config_file=str(REPO_ROOT / "bundle" / "configs" / "train.json"), workflow_type="train",
        bundle_root=str(REPO_ROOT / "bundle"), output_dir=str(tmp_path / "run"), dataset_dir=str(data), device="cpu",
        max_epochs=2, roi_size=[64, 64], batch_size=8, learning_rate=0.003, val_fraction=0.4,
        network_kwargs={"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1},
    )  # fmt: skip
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    checkpoint = tmp_path / "run" / "models" / "model.pt"
    validation = training_split(tmp_path / "run" / "datalist.json")[1]

    tuned = tune_model_threshold(checkpoint, validation, device="cpu")
    run_inference([str(data)], tmp_path / "pred",
                  InferenceSettings(checkpoint=str(checkpoint), tta="none", device="cpu", progress=False))
    result = evaluate_predictions(tmp_path / "pred", tmp_path / "run" / "datalist.json")
    assert result["settings"]["split"] == "validation" and result["summary"]["patients"] == tuned["patients"] == 2
    assert result["summary"]["patient_dice_mean"] == pytest.approx(tuned["dice"], abs=1e-3)
    # each candidate with its threshold, forced at inference, scores what tuning measured for it
    for candidate in tuned["postprocessing_candidates"]:
        run_inference([str(data)], tmp_path / "forced", InferenceSettings(
            checkpoint=str(checkpoint), tta="none", device="cpu", progress=False, threshold=candidate["threshold"],
            **{**candidate["settings"], "keep_fraction": candidate["settings"]["keep_fraction"] or 0}))
        forced = evaluate_predictions(tmp_path / "forced", tmp_path / "run" / "datalist.json")
        assert forced["summary"]["patient_dice_mean"] == pytest.approx(candidate["dice"], abs=1e-3), candidate
