"""Batch augmentation: image and label move together, labels stay binary, each part does what it says."""

from __future__ import annotations

import pytest
import torch

from brainseg_monai.augment import AugmentBatch, BatchAugment

NONE = {"flip_prob": 0.0, "rot90_prob": 0.0, "affine_prob": 0.0, "elastic_prob": 0.0, "scale_intensity_prob": 0.0,
        "shift_intensity_prob": 0.0, "noise_prob": 0.0}


def _batch(n: int = 12, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectangles of different sizes and places (asymmetric, so every flip and rotation is distinguishable)."""
    generator = torch.Generator().manual_seed(1)
    label = torch.zeros(n, 1, size, size)
    for i in range(n):
        y, x = torch.randint(4, size // 2, (2,), generator=generator).tolist()
        label[i, 0, y : y + 8 + i, x : x + 5] = 1
    ramp = torch.linspace(0, 1, size).expand(n, 1, size, size)
    image = torch.cat([2.0 * label, ramp, ramp.transpose(2, 3)], 1)
    return image, label


def _dihedral(t: torch.Tensor) -> list[torch.Tensor]:
    return [r.flip(2) if f else r for k in range(4) for r in [t.rot90(k, (1, 2))] for f in (0, 1)]


def test_all_probabilities_zero_is_the_identity_and_the_input_is_not_modified() -> None:
    image, label = _batch()
    before = image.clone(), label.clone()
    out_image, out_label = BatchAugment(2, **NONE)(image, label)
    assert torch.equal(out_image, before[0]) and torch.equal(out_label, before[1])
    assert torch.equal(image, before[0]) and torch.equal(label, before[1])


def test_flips_and_rotations_are_exact_and_shared_by_image_and_label() -> None:
    torch.manual_seed(0)
    image, label = _batch()
    settings = {**NONE, "flip_prob": 0.5, "rot90_prob": 0.5}
    out_image, out_label = BatchAugment(2, **settings)(image, label)
    seen = set()
    for i in range(len(image)):
        matches = [k for k, (im, lb) in enumerate(zip(_dihedral(image[i]), _dihedral(label[i])))
                   if torch.equal(im, out_image[i]) and torch.equal(lb, out_label[i])]
        assert matches, f"sample {i} is not one dihedral transform of its input applied to image and label alike"
        seen.add(matches[0])
    assert len(seen) > 2  # drawn per sample, not once per batch


def test_affine_and_elastic_keep_image_and_label_aligned_and_labels_binary() -> None:
    torch.manual_seed(0)
    image, label = _batch()
    settings = {**NONE, "affine_prob": 1.0, "elastic_prob": 1.0}
    out_image, out_label = BatchAugment(2, **settings)(image, label)
    assert set(out_label.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(out_label, label)
    tumour = (out_image[:, :1] > 1.0).float()  # channel 0 is 2 x label, resampled bilinearly
    dice = 2 * (tumour * out_label).sum((1, 2, 3)) / (tumour.sum((1, 2, 3)) + out_label.sum((1, 2, 3)))
    assert dice.min() > 0.95
    ratio = out_label.sum((1, 2, 3)) / label.sum((1, 2, 3))  # scaling within +-10% changes areas within ~+-25%
    assert 0.6 < ratio.min() and ratio.max() < 1.5


def test_intensity_scaling_and_shift_stay_within_their_ranges() -> None:
    torch.manual_seed(0)
    image = torch.rand(32, 2, 16, 16) + 1.0
    scaled, _ = BatchAugment(2, **{**NONE, "scale_intensity_prob": 1.0, "scale_intensity": 0.1})(image)
    factor = (scaled / image).flatten(1)
    assert torch.allclose(factor.min(1).values, factor.max(1).values, atol=1e-5)  # one factor per sample
    assert factor.min() >= 0.9 - 1e-5 and factor.max() <= 1.1 + 1e-5 and factor.std() > 0.01
    shifted, _ = BatchAugment(2, **{**NONE, "shift_intensity_prob": 1.0, "shift_intensity": 0.2})(image)
    offset = (shifted - image).flatten(1)
    assert offset.abs().max() <= 0.2 + 1e-5 and torch.allclose(offset.min(1).values, offset.max(1).values, atol=1e-5)


def test_noise_only_on_the_samples_that_draw_it() -> None:
    torch.manual_seed(0)
    image = torch.zeros(64, 1, 8, 8)
    noisy, _ = BatchAugment(2, **{**NONE, "noise_prob": 0.25, "noise_std": 0.05})(image)
    changed = (noisy != 0).flatten(1).any(1)
    assert 4 < int(changed.sum()) < 32
    assert noisy.abs().max() < 0.05 * 6


def test_3d_batches_keep_shape_and_binary_labels() -> None:
    torch.manual_seed(0)
    label = (torch.rand(2, 1, 24, 24, 8) > 0.7).float()
    image = torch.cat([label, torch.rand(2, 1, 24, 24, 8)], 1)
    out_image, out_label = BatchAugment(3, affine_prob=1.0)(image, label)
    assert out_image.shape == image.shape and out_label.shape == label.shape
    assert set(out_label.unique().tolist()) <= {0.0, 1.0}


def test_prepare_batch_moves_and_augments_a_loader_batch() -> None:
    image, label = _batch(4)
    out_image, out_label = AugmentBatch(BatchAugment(2, **NONE))({"image": image, "label": label}, torch.device("cpu"))
    assert torch.equal(out_image, image) and torch.equal(out_label, label)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"spatial_dims": 4}, "spatial_dims"), ({"flip_prob": 1.5}, "flip_prob"), ({"rotate_degrees": -1}, "rotate_degrees"),
     ({"scale_range": 1.0}, "scale_range"), ({"elastic_magnitude": (2, 1)}, "elastic_magnitude"),
     ({"missing_channel_prob": -0.1}, "missing_channel_prob"), ({"missing_channel_fill": -1}, "missing_channel_fill")],
)
def test_bad_arguments_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BatchAugment(**kwargs)


def test_a_label_that_does_not_match_the_image_is_refused() -> None:
    with pytest.raises(ValueError, match="does not match"):
        BatchAugment(2)(torch.zeros(2, 3, 16, 16), torch.zeros(2, 1, 16, 8))


def test_missing_channels_are_filled_from_the_fill_channel_on_the_drawn_samples_only() -> None:
    torch.manual_seed(0)
    image, label = _batch(n=400, size=16)
    out, out_label = BatchAugment(2, **NONE, missing_channel_prob=0.5, missing_channel_fill=1)(image, label)
    assert torch.equal(out_label, label) and torch.equal(out[:, 1], image[:, 1])  # the fill channel and labels stay
    filled = torch.tensor([[torch.equal(out[i, c], image[i, 1]) for c in (0, 2)] for i in range(400)])
    kept = torch.tensor([[torch.equal(out[i, c], image[i, c]) for c in (0, 2)] for i in range(400)])
    assert (filled ^ kept).all()  # each other channel is either untouched or an exact copy of channel 1
    drawn = filled.any(1)
    assert 0.4 < drawn.float().mean() < 0.6  # about missing_channel_prob of the samples
    patterns = {tuple(row.tolist()) for row in filled[drawn]}
    assert patterns == {(True, False), (False, True), (True, True)}  # pre-, post-contrast or both missing


def test_missing_channels_on_impossible_batches_are_refused() -> None:
    with pytest.raises(ValueError, match="missing_channel_fill is 3 but the batch has 3 channels"):
        BatchAugment(2, **NONE, missing_channel_prob=1.0, missing_channel_fill=3)(*_batch(n=2))
    image, label = _batch(n=2)
    with pytest.raises(ValueError, match="needs images of 2 or more channels"):
        BatchAugment(2, **NONE, missing_channel_prob=0.5, missing_channel_fill=0)(image[:, :1], label)
