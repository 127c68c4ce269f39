"""Batch augmentation: image and label move together, labels stay binary, each part does what it says."""

from __future__ import annotations

import pytest
import torch

from brainseg_monai.augment import AugmentBatch, BatchAugment, estimate_brain
from brainseg_monai.normalisation import zscore

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
    flat = torch.zeros(2, 1, 24, 24, 8)
    flat[:, :, 4:20, 4:20] = 1.0
    fielded, _ = BatchAugment(3, **{**NONE, "bias_field_prob": 1.0})(flat)
    assert torch.allclose(fielded, fielded[..., :1].expand_as(fielded), atol=1e-5), "one field through the slices"
    assert fielded[:, :, 4:20, 4:20].std() > 0.01


def test_prepare_batch_moves_and_augments_a_loader_batch() -> None:
    image, label = _batch(4)
    out_image, out_label = AugmentBatch(BatchAugment(2, **NONE))({"image": image, "label": label}, torch.device("cpu"))
    assert torch.equal(out_image, image) and torch.equal(out_label, label)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"spatial_dims": 4}, "spatial_dims"), ({"flip_prob": 1.5}, "flip_prob"), ({"rotate_degrees": -1}, "rotate_degrees"),
     ({"scale_range": 1.0}, "scale_range"), ({"elastic_magnitude": (2, 1)}, "elastic_magnitude"),
     ({"missing_channel_prob": -0.1}, "missing_channel_prob"), ({"missing_channel_fill": -1}, "missing_channel_fill"),
     ({"gamma_range": (0.0, 1.5)}, "gamma_range"), ({"gamma_range": (1.5, 0.7)}, "gamma_range"),
     ({"bias_field": -0.1}, "bias_field"), ({"gamma_prob": 2}, "gamma_prob")],
)
def test_bad_arguments_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BatchAugment(**kwargs)


def test_gamma_is_monotonic_per_channel_and_keeps_each_channels_mean_and_std() -> None:
    torch.manual_seed(0)
    image = torch.rand(8, 3, 24, 24) * 3 - 1
    out, _ = BatchAugment(2, **{**NONE, "gamma_prob": 1.0})(image)
    axes = (2, 3)
    assert torch.allclose(out.mean(axes), image.mean(axes), atol=1e-4)
    assert torch.allclose(out.std(axes), image.std(axes), atol=1e-4)
    flat_in, flat_out = image.flatten(2), out.flatten(2)
    assert torch.equal(flat_in.argsort(-1), flat_out.argsort(-1)), "a power keeps the order of every channel's values"
    assert (out - image).abs().amax(axes).min() > 1e-3, "every sample and channel changed"
    # one power per channel: the change differs between the channels of a sample given the same values
    same = image[:, :1].expand(-1, 3, -1, -1).contiguous()
    out, _ = BatchAugment(2, **{**NONE, "gamma_prob": 1.0})(same)
    assert (out[:, 0] - out[:, 1]).abs().amax() > 1e-3
    untouched, _ = BatchAugment(2, **{**NONE, "gamma_prob": 1.0, "gamma_range": (1.0, 1.0)})(image)
    assert torch.allclose(untouched, image, atol=1e-5)


def test_bias_field_is_smooth_shared_by_the_channels_and_leaves_the_background_flat() -> None:
    torch.manual_seed(0)
    size = 48
    head = torch.zeros(size, size)
    head[8:40, 8:40] = 1.0
    image = torch.stack([head * 2.0 - 0.5, head * 5.0 - 1.0])[None].repeat(6, 1, 1, 1)  # background -0.5 and -1
    out, _ = BatchAugment(2, **{**NONE, "bias_field_prob": 1.0, "bias_field": 0.2})(image)
    inside, outside = head.bool(), ~head.bool()
    for sample in out:
        background = sample[:, outside]
        assert (background.amax(1) - background.amin(1)).abs().max() < 1e-4, "the background stays one level"
        # above the background the field multiplies: its ratio between two channels' brains is the same pattern
        above = sample[:, inside] - background[:, :1]
        pattern = above / above.mean(1, keepdim=True)
        assert torch.allclose(pattern[0], pattern[1], atol=1e-4)
        assert 0.02 < float(pattern[0].std()) < 0.6 and float(pattern[0].min()) > 0
        field = pattern[0].view(32, 32)
        assert float((field[1:] - field[:-1]).abs().max()) < 0.05, "smooth: neighbours differ little"
    assert torch.allclose(out.mean((2, 3)), image.mean((2, 3)), atol=1e-4)


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


def _phantom_head(size: int = 96) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A z-scored 3-channel slice of a head: noisy air, a bright 5-pixel scalp ring, a dark skull ring, the brain
    (a disk of radius 30) with a dark ventricle and a bright tumour; the brain's truth mask and the tumour's."""
    generator = torch.Generator().manual_seed(3)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    r = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2).sqrt()
    raw = 3 + 2 * torch.rand(size, size, generator=generator)  # air: the scanner's noise
    brain = r <= 30
    raw = torch.where((r > 36) & (r <= 42), 120.0, raw)  # scalp
    raw = torch.where((r > 30) & (r <= 36), 15.0, raw)  # skull
    raw = torch.where(brain, 60 + 5 * torch.rand(size, size, generator=generator), raw)
    raw = torch.where(((yy - 48) ** 2 + (xx - 45) ** 2) < 16, 8.0, raw)  # ventricle, as dark as the skull
    tumour = ((yy - 40) ** 2 + (xx - 60) ** 2) < 36
    raw = torch.where(tumour, 110.0, raw)
    image = zscore(torch.stack([raw, 0.8 * raw + 1, raw.sqrt()])[None])[0]
    return image, brain[None], tumour[None]


def test_the_brain_is_estimated_inside_the_skull_with_its_holes_filled() -> None:
    image, brain, _ = _phantom_head()
    estimated = estimate_brain(image, margin=6)  # scalp 6, skull 6: eroding the head by 6 leaves brain and skull
    assert estimated.dtype == torch.bool and estimated.shape == brain.shape
    # the head (radius 42) eroded by 6 is the disk of radius 36: the brain and the skull ring, ventricle included
    inside = brain | (estimate_brain(image, margin=0) & ~_ring(36, 42, image.shape[-1]))
    agreement = (estimated == inside).float().mean()
    assert agreement > 0.99
    assert estimated[brain].all()  # the dark ventricle is a hole filled, not left out
    assert not estimate_brain(torch.zeros(3, 32, 32), 4).any()  # no head: nothing


def _ring(inner: float, outer: float, size: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    r = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2).sqrt()
    return ((r > inner) & (r <= outer))[None]


def test_zscore_where_equals_z_scoring_the_region_alone() -> None:
    generator = torch.Generator().manual_seed(4)
    images = torch.randn(2, 3, 16, 16, generator=generator) * 4 + 7
    masks = torch.rand(2, 1, 16, 16, generator=generator) > 0.4
    out = zscore(images * masks, where=masks)
    for n in range(2):
        for c in range(3):
            region = images[n, c][masks[n, 0]]
            expected = (images[n, c] - region.mean()) / region.std(correction=0)
            torch.testing.assert_close(out[n, c][masks[n, 0]], expected[masks[n, 0]])
            assert torch.count_nonzero(out[n, c][~masks[n, 0]]) == 0


def test_skull_strip_keeps_the_brain_z_scored_over_itself_and_cuts_the_label_to_it() -> None:
    image, brain, tumour = _phantom_head()
    label = tumour.float()[None].clone()
    label[0, 0, 2, 2] = 1  # a label pixel in the air is cut with the air
    batch = image[None].repeat(2, 1, 1, 1)
    labels = label.repeat(2, 1, 1, 1)
    out, out_label = BatchAugment(2, **NONE, skull_strip_prob=1.0, skull_strip_margin=(6, 6))(batch, labels)
    kept = out[0, 0] != 0
    assert kept[brain[0]].all() and not kept[_ring(37, 42, 96)[0]].any()  # the scalp is gone (to a pixel)
    region = out[0][:, kept]
    torch.testing.assert_close(region.mean(1), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(region.std(1, correction=0), torch.ones(3), atol=1e-4, rtol=0)
    assert torch.equal(out_label[0, 0], tumour[0].float()) and torch.equal(out[0], out[1])
    untouched, _ = BatchAugment(2, **NONE, skull_strip_prob=0.0)(batch, labels)
    assert torch.equal(untouched, batch)
