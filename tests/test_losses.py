"""Loss registry, focal Tversky and boundary-weighted BCE: hand-computed values, MONAI agreement, gradients, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.losses import DiceLoss, TverskyLoss

from brainseg_monai.losses import (
    LOSSES,
    BoundaryWeightedBCELoss,
    DiceBoundaryBCELoss,
    FocalTverskyLoss,
    boundary_map,
    get_loss,
)


def square_mask(size: int = 7, low: int = 2, high: int = 5) -> torch.Tensor:
    """(1, 1, size, size) mask with a square of ones at [low:high, low:high]."""
    mask = torch.zeros(1, 1, size, size)
    mask[..., low:high, low:high] = 1
    return mask


def random_pair(spatial: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn((2, 1, *spatial), generator=generator)
    target = (torch.rand((2, 1, *spatial), generator=generator) > 0.7).float()
    return logits, target


def test_registry_has_the_documented_names() -> None:
    assert set(LOSSES) == {"dice", "dice_ce", "dice_focal", "generalized_dice", "tversky", "focal_tversky", "dice_boundary_bce"}


@pytest.mark.parametrize("spatial", [(16, 16), (8, 8, 8)])
@pytest.mark.parametrize("name", list(LOSSES))
def test_every_loss_gives_a_finite_scalar_with_finite_gradients(name: str, spatial: tuple[int, ...]) -> None:
    logits, target = random_pair(spatial)
    logits.requires_grad_(True)
    loss = get_loss(name)(logits, target)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list(LOSSES))
def test_every_loss_is_near_zero_for_a_confident_perfect_prediction(name: str) -> None:
    target = square_mask(8, 2, 6)
    logits = (target * 2 - 1) * 20.0
    assert get_loss(name)(logits, target).item() < 1e-3


def test_unknown_loss_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="name") as info:
        get_loss("hinge")
    for name in LOSSES:
        assert name in str(info.value)


def test_registry_applies_sigmoid_and_kwargs_override() -> None:
    logits, target = random_pair((16, 16))
    expected = DiceLoss(sigmoid=True)(logits, target)
    assert torch.allclose(get_loss("dice")(logits, target), expected)
    probabilities = torch.sigmoid(logits)
    assert torch.allclose(get_loss("Dice", sigmoid=False)(probabilities, target), expected, atol=1e-6)
    tversky = get_loss("tversky", alpha=0.2, beta=0.8)
    assert (tversky.alpha, tversky.beta) == (0.2, 0.8)


def test_dicece_with_one_channel_is_dice_plus_binary_cross_entropy() -> None:
    logits, target = random_pair((16, 16))
    expected = DiceLoss(sigmoid=True)(logits, target) + F.binary_cross_entropy_with_logits(logits, target)
    assert torch.allclose(get_loss("dice_ce")(logits, target), expected, atol=1e-6)


def test_losses_accept_meta_tensors() -> None:
    logits, target = random_pair((16, 16))
    for name in LOSSES:
        value = get_loss(name)(MetaTensor(logits), MetaTensor(target))
        assert torch.allclose(torch.as_tensor(value), get_loss(name)(logits, target))


# focal Tversky


def test_focal_tversky_hand_computed_value() -> None:
    probabilities = torch.tensor([[[[0.8, 0.2], [0.6, 0.0]]]])
    target = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]])
    # TP = 0.8 + 0.6 = 1.4, FP = 0.2, FN = 0.2 + 0.4 + 1.0 = 1.6
    tversky_index = 1.4 / (1.4 + 0.3 * 0.2 + 0.7 * 1.6)
    loss = FocalTverskyLoss(alpha=0.3, beta=0.7, gamma=0.75, smooth=0.0, sigmoid=False)(probabilities, target)
    assert loss.item() == pytest.approx((1 - tversky_index) ** 0.75, rel=1e-6)


def test_focal_tversky_perfect_is_zero_and_fully_wrong_is_one() -> None:
    target = square_mask()
    loss = FocalTverskyLoss()
    assert loss(target * 40 - 20, target).item() < 1e-4
    assert loss(20 - target * 40, target).item() == pytest.approx(1.0, abs=1e-4)


def test_focal_tversky_gradient_is_finite_at_a_perfect_prediction() -> None:
    target = square_mask()
    logits = (target * 40 - 20).requires_grad_(True)  # sigmoid saturates: 1 - TI is exactly 0 in float32
    FocalTverskyLoss(gamma=0.5)(logits, target).backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("alpha, beta", [(0.3, 0.7), (0.7, 0.3), (0.5, 0.5)])
@pytest.mark.parametrize("batch", [False, True])
def test_focal_tversky_with_gamma_one_is_monai_tversky(alpha: float, beta: float, batch: bool) -> None:
    logits, target = random_pair((8, 8, 8))
    ours = FocalTverskyLoss(alpha=alpha, beta=beta, gamma=1.0, batch=batch)(logits, target)
    monai = TverskyLoss(sigmoid=True, alpha=alpha, beta=beta, batch=batch)(logits, target)
    assert torch.allclose(ours, monai, atol=1e-6)


def test_focal_tversky_gamma_below_one_raises_a_partial_loss() -> None:
    logits, target = random_pair((16, 16))
    plain = FocalTverskyLoss(gamma=1.0, reduction="none")(logits, target)
    focal = FocalTverskyLoss(gamma=0.75, reduction="none")(logits, target)
    assert plain.shape == (2, 1)
    assert torch.allclose(focal, plain**0.75)
    assert (focal > plain).all()  # 0 < 1 - TI < 1
    assert FocalTverskyLoss(reduction="sum")(logits, target).item() == pytest.approx(focal.sum().item(), rel=1e-6)


def test_false_negatives_cost_more_than_false_positives_by_default() -> None:
    target = square_mask(8, 2, 6)  # 16 foreground pixels
    missed = target.clone()
    missed[..., 2, 2:6] = 0  # 4 false negatives
    extra = target.clone()
    extra[..., 1, 2:6] = 1  # 4 false positives
    loss = FocalTverskyLoss()
    assert loss(missed * 40 - 20, target) > loss(extra * 40 - 20, target)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"alpha": -0.1}, "alpha"),
        ({"beta": -0.1}, "beta"),
        ({"alpha": 0.0, "beta": 0.0}, "alpha"),
        ({"gamma": 0.0}, "gamma"),
        ({"smooth": -1.0}, "smooth"),
        ({"reduction": "median"}, "reduction"),
    ],
)
def test_focal_tversky_checks_its_arguments(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        FocalTverskyLoss(**kwargs)


def test_losses_refuse_mismatched_shapes() -> None:
    for loss in (FocalTverskyLoss(), BoundaryWeightedBCELoss(), DiceBoundaryBCELoss()):
        with pytest.raises(ValueError, match="same shape"):
            loss(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9))


# boundary map and boundary-weighted BCE


def test_boundary_map_is_the_morphological_gradient_of_a_square() -> None:
    # 3x3 square in 7x7: dilation is the 5x5 square, erosion the centre pixel
    expected = torch.zeros(7, 7)
    expected[1:6, 1:6] = 1
    expected[3, 3] = 0
    assert torch.equal(boundary_map(square_mask())[0, 0], expected)


def test_boundary_map_ignores_the_image_border() -> None:
    mask = torch.zeros(1, 1, 5, 5)
    mask[..., :2, :] = 1  # touches the top, left and right borders
    expected = torch.zeros(5, 5)
    expected[1:3, :] = 1  # only the edge facing the background
    assert torch.equal(boundary_map(mask)[0, 0], expected)


def test_boundary_map_in_3d_and_per_channel() -> None:
    mask = torch.zeros(1, 2, 7, 7, 7)
    mask[0, 0, 2:5, 2:5, 2:5] = 1  # second channel empty: channels must not leak into each other
    band = boundary_map(mask)
    assert band[0, 0, 3, 3, 3] == 0  # interior (eroded) voxel
    assert band[0, 0, 2, 3, 3] == 1 and band[0, 0, 1, 3, 3] == 1  # inner and outer contour
    assert band[0, 0, 0, 3, 3] == 0  # far background
    assert band[0, 0].sum() == 5**3 - 1
    assert band[0, 1].sum() == 0


def test_boundary_map_wider_kernel_and_blur() -> None:
    mask = square_mask(11, 3, 8)
    wide = boundary_map(mask, kernel_size=5)
    assert wide[0, 0, 1, 5] == 1 and wide[0, 0, 0, 5] == 0  # 2 pixels outside the square, not 3
    blurred = boundary_map(mask, sigma=1.0)
    assert blurred.min() >= 0 and blurred.max() <= 1
    edge, centre, corner = blurred[0, 0, 3, 5], blurred[0, 0, 5, 5], blurred[0, 0, 0, 0]
    assert edge > centre > 0 and edge > corner


@pytest.mark.parametrize(
    "kwargs, argument",
    [({"kernel_size": 4}, "kernel_size"), ({"kernel_size": 0}, "kernel_size"), ({"sigma": -1.0}, "sigma")],
)
def test_boundary_map_checks_its_arguments(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        boundary_map(square_mask(), **kwargs)
    with pytest.raises(ValueError, match=argument):
        BoundaryWeightedBCELoss(**kwargs)


def test_boundary_weighted_bce_hand_computed_value() -> None:
    target = square_mask()  # band of 24 pixels out of 49
    logits = torch.zeros_like(target)  # BCE of every pixel is ln 2
    loss = BoundaryWeightedBCELoss(weight=5.0)(logits, target)
    assert loss.item() == pytest.approx(math.log(2) * (1 + 5.0 * 24 / 49), rel=1e-6)


def test_boundary_weights_edge_errors_more_than_inner_ones() -> None:
    target = square_mask(9, 2, 7)
    edge_error = torch.where(target > 0, 5.0, -5.0)
    edge_error[..., 2, 4] = -5.0  # miss one pixel on the edge
    inner_error = torch.where(target > 0, 5.0, -5.0)
    inner_error[..., 4, 4] = -5.0  # miss the centre pixel
    loss = BoundaryWeightedBCELoss(weight=5.0)
    assert loss(edge_error, target) > 3 * loss(inner_error, target)


def test_boundary_weighted_bce_without_weight_is_plain_bce() -> None:
    logits, target = random_pair((8, 8, 8))
    assert torch.allclose(
        BoundaryWeightedBCELoss(weight=0.0)(logits, target), F.binary_cross_entropy_with_logits(logits, target)
    )
    probabilities = torch.sigmoid(logits)
    assert torch.allclose(
        BoundaryWeightedBCELoss(weight=0.0, sigmoid=False)(probabilities, target),
        F.binary_cross_entropy(probabilities, target),
        atol=1e-6,
    )
    assert BoundaryWeightedBCELoss(reduction="none")(logits, target).shape == logits.shape


def test_dice_boundary_bce_is_the_weighted_sum_of_its_terms() -> None:
    logits, target = random_pair((16, 16))
    combined = DiceBoundaryBCELoss(lambda_dice=0.5, lambda_bce=2.0, boundary_weight=3.0)(logits, target)
    dice = DiceLoss(sigmoid=True)(logits, target)
    bce = BoundaryWeightedBCELoss(weight=3.0)(logits, target)
    assert torch.allclose(combined, 0.5 * dice + 2.0 * bce)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"lambda_dice": -1.0}, "lambda_dice"),
        ({"lambda_bce": -1.0}, "lambda_bce"),
        ({"lambda_dice": 0.0, "lambda_bce": 0.0}, "lambda_dice"),
        ({"boundary_weight": -1.0}, "weight"),
    ],
)
def test_dice_boundary_bce_checks_its_arguments(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        DiceBoundaryBCELoss(**kwargs)


def test_boundary_weighted_bce_checks_reduction() -> None:
    with pytest.raises(ValueError, match="reduction"):
        BoundaryWeightedBCELoss(reduction="max")
