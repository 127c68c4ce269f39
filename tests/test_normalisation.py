"""Intensity normalisation per slice or per case: the same statistics in training and inference."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.data import CacheDataset, MetaTensor, get_track_meta
from monai.transforms import Compose, NormalizeIntensity

from brainseg_monai.datalist import build_datalist
from brainseg_monai.inference.predictor import load_for_case
from brainseg_monai.model import ModelSpec
from brainseg_monai.normalisation import (
    ZScoreIntensityd,
    channel_statistics,
    normalise_images,
    normalise_slices,
    zscore,
)
from brainseg_monai.synth import make_dataset
from brainseg_monai.training import with_normalisation
from brainseg_monai.transforms import load_transforms, train_transforms


@pytest.fixture(scope="module")
def lgg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("norm") / "data", "lgg", cases=2, seed=5, size=(48, 48, 5))


#: the reference z-score: MONAI's, per image
MONAI_ZSCORE = NormalizeIntensity(nonzero=True, channel_wise=True)


def _pooled(images: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of the non-zero pixels of all images, with numpy."""
    means, stds = [], []
    for c in range(images[0].shape[0]):
        values = np.concatenate([np.asarray(im[c]).ravel() for im in images])
        values = values[values != 0]
        means.append(values.mean())
        stds.append(values.std())
    return np.array(means), np.array(stds)


def test_channel_statistics_pool_the_nonzero_pixels_of_all_images() -> None:
    generator = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 10, 12, generator=generator), torch.rand(2, 7, 7, generator=generator) * 3
    a[:, :4] = 0
    stats = channel_statistics([a, b])
    mean, std = _pooled([a, b])
    assert np.allclose(stats["norm_mean"], mean) and np.allclose(stats["norm_std"], std)
    assert channel_statistics([torch.zeros(1, 4, 4)]) == {"norm_mean": [0.0], "norm_std": [1.0]}


def test_zscore_equals_monai_per_image_in_2d_and_3d() -> None:
    """MONAI's ``NormalizeIntensity`` on each image alone is the reference of the one z-score."""
    gen = torch.Generator().manual_seed(0)
    for shape in ((40, 24), (12, 10, 8)):
        images = torch.rand(4, 3, *shape, generator=gen) * 900 * (torch.rand(4, 1, *shape, generator=gen) > 0.4)
        images[1, 1] = 0  # an all-zero channel stays zero
        images[2, 2] = (images[2, 2] != 0) * 7.0  # constant brain: std 0 is taken as 1
        expected = torch.stack([torch.as_tensor(MONAI_ZSCORE(image.clone())) for image in images])
        got = zscore(images)
        assert got.shape == images.shape
        assert (got - expected).abs().max().item() < 1e-5
        assert not got[1, 1].any() and set(got[2, 2].unique().tolist()) <= {0.0}


def test_normalise_slices_equals_monai_per_slice() -> None:
    gen = torch.Generator().manual_seed(0)
    volume = torch.rand(3, 40, 24, 6, generator=gen) * 900 * (torch.rand(1, 40, 24, 6, generator=gen) > 0.4)
    volume[1, ..., 2] = 0  # an all-zero plane stays zero
    expected = torch.stack([torch.as_tensor(MONAI_ZSCORE(volume[..., z].clone())) for z in range(6)])
    got = normalise_slices(volume)
    assert got.shape == (6, 3, 40, 24)
    assert (got - expected).abs().max().item() < 1e-5
    assert not got[2, 1].any()


def test_normalise_images_equals_monai_per_image() -> None:
    """Stacked normalisation of a case's slices (two sizes here) against MONAI's transform on each image alone."""
    gen = torch.Generator().manual_seed(1)
    images = [torch.rand(3, *shape, generator=gen) * 500 * (torch.rand(1, *shape, generator=gen) > 0.3)
              for shape in ((40, 24), (40, 24), (16, 16), (40, 24))]
    images[1][2] = 0  # an all-zero channel stays zero
    for got, image in zip(normalise_images(images), images):
        assert got.shape == image.shape
        assert (got - torch.as_tensor(MONAI_ZSCORE(image.clone()))).abs().max().item() < 1e-5


def test_the_transform_z_scores_an_image_alone_as_monai_does_and_keeps_its_metadata() -> None:
    image = MetaTensor(torch.rand(3, 16, 16) * 100, meta={"filename_or_obj": "a.png"})
    image[:, :3] = 0
    for normalisation in ("slice", "case"):  # "case" without the case's statistics: the image is its own case
        ours = ZScoreIntensityd("image", normalisation)({"image": image})["image"]
        assert isinstance(ours, MetaTensor) and ours.meta["filename_or_obj"] == "a.png"
        assert torch.allclose(ours.as_tensor(), torch.as_tensor(MONAI_ZSCORE(image.clone())), atol=1e-5)
    with pytest.raises(ValueError, match="normalisation must be one of"):
        ZScoreIntensityd("image", "volume")
    with pytest.raises(ValueError, match="1 mean.*3 channel"):
        ZScoreIntensityd("image", "case")({"image": image, "norm_mean": [0.0], "norm_std": [1.0]})


def test_case_statistics_are_shared_by_a_patients_slices_and_z_score_them(lgg: Path) -> None:
    items = build_datalist("lgg", lgg, val=0.0)["training"]
    with_stats = with_normalisation((items, [], []), "case")[0]
    by_patient: dict[str, list[dict]] = {}
    for item in with_stats:
        by_patient.setdefault(item["patient"], []).append(item)
    assert len(by_patient) == 2
    reader = Compose(load_transforms(2, keys=("image",), normalisation=None))
    for patient_items in by_patient.values():
        assert len({tuple(i["norm_mean"]) for i in patient_items}) == 1
        stats = patient_items[0]
        normalised = [zscore(reader({"image": i["image"]})["image"][None], stats)[0] for i in patient_items]
        mean, std = _pooled(normalised)
        assert np.allclose(mean, 0, atol=1e-4) and np.allclose(std, 1, atol=1e-4)
    assert "norm_mean" not in items[0]  # the input items are left as they were


def test_training_items_get_statistics_only_for_case_normalisation(lgg: Path) -> None:
    items = build_datalist("lgg", lgg, val=0.0)["training"]
    train, valid, _ = with_normalisation((items, items[:2], ["t1", "flair", "t1c"]), "case")
    assert all("norm_mean" in i for i in train + valid)
    assert with_normalisation((items, [], []), "slice")[0] is items
    with pytest.raises(ValueError, match="normalisation"):
        with_normalisation((items, [], []), "volume")


def test_inference_uses_the_statistics_of_the_whole_patient(lgg: Path) -> None:
    patient = sorted(p for p in lgg.iterdir() if p.is_dir())[0]
    images = sorted(str(p) for p in patient.glob("*.tif") if not p.name.endswith("_mask.tif"))
    case = load_for_case("slices", images, ModelSpec(normalisation="case")).slices
    mean, std = _pooled([torch.as_tensor(s) for s in case])
    assert np.allclose(mean, 0, atol=1e-4) and np.allclose(std, 1, atol=1e-4)
    stats = with_normalisation(([{"image": p, "patient": "p"} for p in images], [], []), "case")[0][0]  # training's
    reader = Compose(load_transforms(2, keys=("image",), normalisation="case"))
    for path, slice_ in zip(images, case):
        trained_on = reader({"image": path, "norm_mean": stats["norm_mean"], "norm_std": stats["norm_std"]})["image"]
        assert torch.allclose(torch.as_tensor(trained_on), torch.as_tensor(slice_), atol=1e-5)
    alone = load_for_case("slices", images[:1], ModelSpec(normalisation="case")).slices[0]
    per_slice = load_for_case("slices", images[:1], ModelSpec(normalisation="slice")).slices[0]
    assert torch.allclose(torch.as_tensor(alone), torch.as_tensor(per_slice), atol=1e-5)  # a slice alone: its own


def test_inference_of_slice_models_normalises_as_training(lgg: Path) -> None:
    patient = sorted(p for p in lgg.iterdir() if p.is_dir())[0]
    images = sorted(str(p) for p in patient.glob("*.tif") if not p.name.endswith("_mask.tif"))
    slices = load_for_case("slices", images, ModelSpec(normalisation="slice")).slices
    reader = Compose(load_transforms(2, keys=("image",), normalisation="slice"))
    for path, slice_ in zip(images, slices):
        assert torch.allclose(torch.as_tensor(reader({"image": path})["image"]), slice_, atol=1e-5)


def test_a_volume_through_a_case_normalised_2d_model_uses_the_volume_statistics() -> None:
    volume = torch.rand(2, 8, 8, 4) + 0.5
    stats = channel_statistics([volume])
    slices = normalise_slices(volume, stats)
    assert slices.shape == (4, 2, 8, 8)
    mean, std = _pooled(list(slices))
    assert np.allclose(mean, 0, atol=1e-5) and np.allclose(std, 1, atol=1e-5)


def test_a_3d_model_reads_a_volume_with_its_normalisation(tmp_path: Path) -> None:
    """The 3D path z-scores with the model's setting; a volume alone is its own case, so both equal MONAI's."""
    array = np.zeros((10, 24, 20), dtype=np.float32)
    array[2:8, 4:20, 3:17] = np.random.default_rng(0).uniform(1.0, 100.0, size=(6, 16, 14))
    source = tmp_path / "volume.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(source))
    raw = Compose(load_transforms(3, keys=("image",), normalisation=None))({"image": str(source)})["image"]
    for normalisation in ("slice", "case"):
        spec = ModelSpec(spatial_dims=3, in_channels=1, channels=["image"], roi_size=[16, 16, 16],
                         normalisation=normalisation)
        loaded = load_for_case("volume", [str(source)], spec)
        steps = [t for t in loaded.preprocessing.transforms if isinstance(t, ZScoreIntensityd)]
        assert [t.normalisation for t in steps] == [normalisation]
        expected = torch.as_tensor(MONAI_ZSCORE(raw.clone()))
        assert torch.allclose(loaded.data["image"].as_tensor(), expected, atol=1e-5)


def test_training_crops_are_plain_tensors_drawn_afresh_each_pass(lgg: Path) -> None:
    """The cached pipeline stops before the crop (still random), which returns plain tensors, tumour-centred."""
    items = build_datalist("lgg", lgg, val=0.0)["training"]
    tumour = [it for it in items if np.asarray(load_transforms(2)[0](dict(it))["label"]).any()]
    dataset = CacheDataset(tumour, train_transforms(2, (16, 16), pos_neg_ratio=1e6), progress=False, copy_cache=False)
    first, second = [dataset[i][0] for i in range(len(dataset))], [dataset[i][0] for i in range(len(dataset))]
    assert get_track_meta()  # the crop's setting is restored
    for sample in first:
        assert type(sample["image"]) is torch.Tensor and type(sample["label"]) is torch.Tensor
        assert sample["image"].shape == (3, 16, 16) and sample["label"].shape == (1, 16, 16)
        assert sample["label"].any() and set(sample["label"].unique().tolist()) <= {0.0, 1.0}
    assert any(not torch.equal(a["image"], b["image"]) for a, b in zip(first, second))


def test_a_pairs_cv_fold_group_is_split_together_but_each_image_is_its_own_case(tmp_path: Path) -> None:
    # figshare's layout: no pid, so an image's patient is its cv_fold group, which holds many patients
    root = make_dataset(tmp_path / "pairs", "pairs", cases=6, seed=4, size=(32, 32, 4))
    table = (root / "cases.csv").read_text().splitlines()
    (root / "cases.csv").write_text("\n".join([table[0]] + [re.sub(r"^([^,]*),[^,]*,", r"\1,,", row)
                                                          for row in table[1:]]) + "\n")
    items = build_datalist("pairs", root, val=0.0)["training"]
    assert {i["patient"] for i in items} == {f"cvfold{k}" for k in range(1, 6)}
    assert all(i["case"] == Path(i["image"]).stem for i in items)
    reader = Compose(load_transforms(2, keys=("image",), normalisation=None))
    for item in with_normalisation((items, [], []), "case")[0]:
        own = channel_statistics([reader({"image": item["image"]})["image"]])
        assert np.allclose(item["norm_mean"], own["norm_mean"]) and np.allclose(item["norm_std"], own["norm_std"])
    with_pid = build_datalist("pairs", make_dataset(tmp_path / "pid", "pairs", cases=2, seed=4, size=(32, 32, 4)),
                              val=0.0)["training"]
    assert not any("case" in i for i in with_pid)  # a real patient's images share its statistics
