"""Boundary-weighted binary cross-entropy and its sum with the Dice loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.networks.layers import GaussianFilter
from monai.transforms.utils_morphological_ops import dilate, erode
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss


def boundary_map(target: torch.Tensor, kernel_size: int = 3, sigma: float = 0.0) -> torch.Tensor:
    """
    Band around the edge of a binary mask: its morphological gradient (dilation minus erosion), optionally blurred.

    Computed in torch on the target's device, for 2D and 3D. With ``kernel_size=3`` the band is the mask's
    outermost voxels plus the background voxels touching them (8/26-connectivity). The image border does not count
    as an edge: a mask touching it is not marked along it.

    Args:
        target: ``BNHW[D]`` mask; values > 0.5 are foreground.
        kernel_size: odd width of the square/cube structuring element; the band is ``kernel_size - 1`` voxels wide.
        sigma: standard deviation in voxels of a Gaussian blur applied to the band; 0 for none.

    Returns:
        float tensor of the target's shape, in [0, 1] (exactly {0, 1} when ``sigma=0``).

    Raises:
        ValueError: When ``target`` is not 4D or 5D, ``kernel_size`` is not a positive odd integer, or ``sigma`` < 0.
    """
    if target.ndim not in (4, 5):
        raise ValueError(f"target must be BNHW or BNHWD, got shape {tuple(target.shape)}.")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size!r}.")
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma!r}.")
    shape = target.shape
    # one channel at a time: MONAI's morphological filters sum over all input channels
    mask = (torch.as_tensor(target).detach() > 0.5).float().reshape(-1, 1, *shape[2:])
    band = dilate(mask, kernel_size) - erode(mask, kernel_size)
    if sigma > 0:
        band = GaussianFilter(spatial_dims=target.ndim - 2, sigma=sigma).to(band.device)(band)
    return band.reshape(shape)


class BoundaryWeightedBCELoss(_Loss):
    """
    Binary cross-entropy with per-voxel weights ``1 + weight * boundary_map(target)``, which stresses the mask edge,
    where segmentations disagree most, in the spirit of the weight maps of Ronneberger et al., "U-Net: Convolutional
    Networks for Biomedical Image Segmentation", MICCAI 2015, https://arxiv.org/abs/1505.04597.

    The weight map comes from the target on the fly (``boundary_map``), so it needs no precomputation and runs on the
    GPU in 2D and 3D. ``input`` is ``BNH[WD]`` logits (or probabilities with ``sigmoid=False``); ``target`` is binary,
    same shape.
    """

    def __init__(
        self,
        weight: float = 2.0,
        kernel_size: int = 3,
        sigma: float = 0.0,
        sigmoid: bool = True,
        reduction: LossReduction | str = LossReduction.MEAN,
    ) -> None:
        """
        Args:
            weight: extra weight on boundary voxels, >= 0 (0 gives plain BCE); the default 2 weighs them 3x.
            kernel_size: odd width of the structuring element of ``boundary_map``.
            sigma: Gaussian blur of the boundary band in voxels, >= 0; 0 for none.
            sigmoid: ``input`` is logits (BCE with logits); else probabilities.
            reduction: ``"mean"`` or ``"sum"`` of the weighted per-voxel losses, or ``"none"`` for the map.

        Raises:
            ValueError: When ``weight`` or ``sigma`` is negative, ``kernel_size`` is not a positive odd integer, or
                ``reduction`` is not one of ``"mean"``, ``"sum"``, ``"none"``.
        """
        reductions = [r.value for r in LossReduction]
        reduction = reduction.value if isinstance(reduction, LossReduction) else reduction
        if reduction not in reductions:
            raise ValueError(f"reduction must be one of {reductions}, got {reduction!r}.")
        super().__init__(reduction=reduction)
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight!r}.")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size!r}.")
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma!r}.")
        self.weight = weight
        self.kernel_size = kernel_size
        self.sigma = sigma
        self.sigmoid = sigmoid

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: ``BNH[WD]`` logits (probabilities with ``sigmoid=False``).
            target: ``BNH[WD]`` binary mask.

        Raises:
            ValueError: When ``input`` and ``target`` shapes differ or are not 4D/5D.
        """
        if input.shape != target.shape:
            raise ValueError(
                f"input and target must have the same shape, got {tuple(input.shape)} and {tuple(target.shape)}."
            )
        target = target.to(dtype=input.dtype)
        weights = 1.0 + self.weight * boundary_map(target, self.kernel_size, self.sigma).to(input.dtype)
        bce = F.binary_cross_entropy_with_logits if self.sigmoid else F.binary_cross_entropy
        return bce(input, target, weight=weights, reduction=self.reduction)


class DiceBoundaryBCELoss(_Loss):
    """
    ``lambda_dice * Dice + lambda_bce * boundary-weighted BCE``: the Dice term handles the class imbalance of small
    tumours, the BCE term gives dense per-voxel gradients, weighted up at the mask edge
    (see ``BoundaryWeightedBCELoss``). The Dice term is MONAI's ``DiceLoss``.

    ``input`` is ``BNH[WD]`` logits (or probabilities with ``sigmoid=False``); ``target`` is binary, same shape.
    """

    def __init__(
        self,
        lambda_dice: float = 1.0,
        lambda_bce: float = 1.0,
        boundary_weight: float = 2.0,
        kernel_size: int = 3,
        sigma: float = 0.0,
        sigmoid: bool = True,
        batch: bool = False,
    ) -> None:
        """
        Args:
            lambda_dice: weight of the Dice term, >= 0.
            lambda_bce: weight of the boundary-weighted BCE term, >= 0.
            boundary_weight: extra BCE weight on boundary voxels, >= 0; the default 2 weighs them 3x.
            kernel_size: odd width of the structuring element of ``boundary_map``.
            sigma: Gaussian blur of the boundary band in voxels, >= 0.
            sigmoid: ``input`` is logits.
            batch: Dice over the whole batch instead of per sample (as in MONAI's ``DiceLoss``).

        Raises:
            ValueError: When ``lambda_dice`` or ``lambda_bce`` is negative, or both are 0.
            ValueError: When an argument of ``BoundaryWeightedBCELoss`` is invalid.
        """
        super().__init__()
        if lambda_dice < 0:
            raise ValueError(f"lambda_dice must be >= 0, got {lambda_dice!r}.")
        if lambda_bce < 0:
            raise ValueError(f"lambda_bce must be >= 0, got {lambda_bce!r}.")
        if lambda_dice == 0 and lambda_bce == 0:
            raise ValueError("lambda_dice and lambda_bce must not both be 0.")
        self.lambda_dice = lambda_dice
        self.lambda_bce = lambda_bce
        self.dice = DiceLoss(sigmoid=sigmoid, batch=batch)
        self.bce = BoundaryWeightedBCELoss(
            weight=boundary_weight, kernel_size=kernel_size, sigma=sigma, sigmoid=sigmoid
        )

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: ``BNH[WD]`` logits (probabilities with ``sigmoid=False``).
            target: ``BNH[WD]`` binary mask.

        Raises:
            ValueError: When ``input`` and ``target`` shapes differ.
        """
        bce = self.bce(input, target)  # checks the shapes first
        loss: torch.Tensor = self.lambda_dice * self.dice(input, target) + self.lambda_bce * bce
        return loss
