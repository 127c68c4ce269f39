"""Library side of training (brainseg_monai.training): tumour sampling, folds, fresh runs and the model's sidecar."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from torch.utils.data import RandomSampler, WeightedRandomSampler

from brainseg_monai import datalist as datalist_lib
from brainseg_monai.io import read_sitk
from brainseg_monai.model import write_model_sidecar
from brainseg_monai.synth import make_dataset
from brainseg_monai.training import (
    RunRefused,
    check_fresh_run,
    check_tumour_fraction,
    distributed_training_sampler,
    iteration_log_filter,
    prepare_data,
    training_sampler,
    tumour_weights,
)


@pytest.fixture(scope="module")
def lgg_slices(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], np.ndarray]:
    """Items of every LGG phantom slice and, read independently of SimpleITK, whether each mask holds tumour."""
    root = make_dataset(tmp_path_factory.mktemp("lgg") / "data", "lgg", cases=3, seed=5, size=(32, 32, 8))
    masks = sorted(root.glob("*/*_mask.tif"))
    truth = np.array([np.asarray(Image.open(mask)).any() for mask in masks])
    return [{"label": str(mask)} for mask in masks], truth


def test_tumour_weights_flag_exactly_the_slices_with_tumour(lgg_slices: tuple[list[dict], np.ndarray]) -> None:
    """The weights come from the masks' pixels, not from freed memory: the same on every call, whatever ran before."""
    items, truth = lgg_slices
    n_pos, n_neg = int(truth.sum()), int((~truth).sum())
    assert n_pos >= 3 and n_neg >= 3  # both kinds, so the weights cannot be uniform
    expected = np.where(truth, 0.3 / n_pos, 0.7 / n_neg)
    for _ in range(5):
        clutter = [read_sitk(item["label"].replace("_mask.tif", ".tif")) for item in items]  # reuse freed memory
        clutter.append(sitk.Image([256, 256], sitk.sitkFloat32) + 1.0)
        np.testing.assert_allclose(tumour_weights(items, 0.3), expected, rtol=1e-12)
        del clutter


def test_training_sampler_draws_tumour_by_the_fraction_and_repeats_with_the_seed(
    lgg_slices: tuple[list[dict], np.ndarray],
) -> None:
    items, truth = lgg_slices
    sampler = training_sampler(items, 0.5, seed=7)
    assert isinstance(sampler, WeightedRandomSampler) and len(sampler) == len(items)
    epochs = [list(sampler) for _ in range(200)]
    again = training_sampler(items, "0.5", seed=7)
    assert [list(again) for _ in range(3)] == epochs[:3]
    assert list(training_sampler(items, 0.5, seed=8)) != epochs[0]
    drawn_tumour = truth[np.concatenate(epochs)].mean()
    assert drawn_tumour == pytest.approx(0.5, abs=0.03) and truth.mean() < 0.4  # oversampled, as asked


def test_no_tumour_fraction_shuffles_every_item_once_per_epoch(lgg_slices: tuple[list[dict], np.ndarray]) -> None:
    items, _ = lgg_slices
    for fraction in (None, "null", "None"):
        sampler = training_sampler(items, fraction, seed=3)
        assert isinstance(sampler, RandomSampler)
        first, second = list(sampler), list(sampler)
        assert sorted(first) == sorted(second) == list(range(len(items))) and first != second
        assert list(training_sampler(items, fraction, seed=3)) == first
    assert check_tumour_fraction(None) is None and check_tumour_fraction("0.25") == 0.25
    for bad in (0, 1, 1.5, "half", True):
        with pytest.raises(ValueError, match=f"tumour_fraction must be in \\(0, 1\\), or null .* but is {bad!r}"):
            check_tumour_fraction(bad)


def test_distributed_sampler_splits_the_draws_between_processes(lgg_slices: tuple[list[dict], np.ndarray]) -> None:
    items, truth = lgg_slices
    shares = [list(distributed_training_sampler(items, items, None, 0, num_replicas=2, rank=r)) for r in (0, 1)]
    assert sorted(shares[0] + shares[1]) == list(range(len(items)))  # plain shuffling: every item once per epoch
    drawn = []
    for epoch in range(100):
        for rank in (0, 1):
            sampler = distributed_training_sampler(items, items, 0.5, 0, num_replicas=2, rank=rank)
            sampler.set_epoch(epoch)
            drawn += list(sampler)
    assert len(drawn) == 100 * len(items) and truth[drawn].mean() == pytest.approx(0.5, abs=0.03)


@pytest.fixture(scope="module")
def lgg_patients(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("lgg7") / "data", "lgg", cases=7, seed=2, size=(16, 16, 4))


def test_fold_picks_among_num_folds_and_is_checked(lgg_patients: Path, tmp_path: Path) -> None:
    """``fold=5`` once built six folds silently, regrouping every fold's patients; now the count is ``num_folds``."""
    expected = datalist_lib.build_datalist("lgg", lgg_patients, val=0.0, folds=5, seed=0)
    for fold in (0, 4):
        _, valid, _ = prepare_data(None, lgg_patients, "lgg", tmp_path / f"k{fold}", fold=fold)
        written = json.loads((tmp_path / f"k{fold}" / "datalist.json").read_text())
        assert written["folds"] == 5
        assert valid == [it for it in expected["training"] if it["fold"] == fold]
    _, valid, _ = prepare_data(None, lgg_patients, "lgg", tmp_path / "k5of6", fold=5, num_folds=6)
    assert json.loads((tmp_path / "k5of6" / "datalist.json").read_text())["folds"] == 6 and valid
    for fold, num_folds in ((5, 5), (-1, 5), (3, 3)):
        with pytest.raises(ValueError, match=rf"fold must be in 0..{num_folds - 1} \(num_folds is {num_folds}\)"):
            prepare_data(None, lgg_patients, "lgg", tmp_path / "bad", fold=fold, num_folds=num_folds)
    with pytest.raises(ValueError, match="num_folds must be an integer of 2 or more but is 1"):
        prepare_data(None, lgg_patients, "lgg", tmp_path / "bad", fold=0, num_folds=1)
    assert not (tmp_path / "bad").exists()


def test_a_fresh_run_refuses_a_folder_with_an_earlier_runs_checkpoint(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "model.pt").write_bytes(b"best model, no last checkpoint: a fresh run may replace it")
    check_fresh_run(models, False)
    (models / "last_checkpoint_epoch=7.pt").write_bytes(b"an earlier run")
    for flag in (False, "false"):
        with pytest.raises(RunRefused) as info:  # a SystemExit: the bundle's command line prints it, no traceback
            check_fresh_run(models, flag)
        message = str(info.value.code)
        assert message.startswith(f"training refused: {models} holds last_checkpoint_epoch=7.pt of an earlier run")
        assert "--output_dir" in message and "--resume true" in message and "\n" not in message
    check_fresh_run(models, "true")
    check_fresh_run(tmp_path / "absent", False)
    assert (models / "last_checkpoint_epoch=7.pt").read_bytes() == b"an earlier run"


def test_model_sidecar_keeps_a_tuned_threshold_only_when_resuming(tmp_path: Path) -> None:
    tuned = {"network_name": "segresnet", "postprocessing": {"threshold": 0.3}, "tuning": {"threshold": 0.3}}
    run_config = {"network_name": "unet", "roi_size": [64, 64], "resume": False}
    sidecar = tmp_path / "model.json"
    for resume, kept in ((True, True), ("true", True), (False, False), ("false", False)):
        sidecar.write_text(json.dumps(tuned))
        write_model_sidecar(tmp_path, run_config, resume=resume)
        values = json.loads(sidecar.read_text())
        assert values["network_name"] == "unet" and values["roi_size"] == [64, 64]
        assert values["postprocessing"] == ({"threshold": 0.3} if kept else {})
        assert values.get("tuning") == ({"threshold": 0.3} if kept else None)


def test_iteration_lines_are_logged_every_n_iterations_or_not_at_all() -> None:
    """The bundle's ``log_every``: a loss line every N iterations of the run, not one per iteration."""
    assert iteration_log_filter(0) is False and iteration_log_filter(1) is True
    every_50 = iteration_log_filter("50")
    assert [i for i in range(1, 201) if every_50(None, i)] == [50, 100, 150, 200]
    for bad in (-1, "ten", 2.5, True):
        with pytest.raises(ValueError, match="log_every must be a whole number"):
            iteration_log_filter(bad)
