"""Focal Tversky loss for binary segmentation of small structures."""

from __future__ import annotations

import torch
from monai.losses import TverskyLoss
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

# floor for (1 - TI) before the power: with gamma < 1 the slope of x ** gamma is infinite at a perfect prediction
_FLOOR = 1e-7


class FocalTverskyLoss(_Loss):
    """
    Focal Tversky loss ``(1 - TI) ** gamma`` of Abraham & Khan, "A Novel Focal Tversky Loss Function with Improved
    Attention U-Net for Lesion Segmentation", ISBI 2019, https://arxiv.org/abs/1810.07842.

    The Tversky index ``TI = TP / (TP + alpha * FP + beta * FN)`` (Salehi et al. 2017) is computed by MONAI's
    ``TverskyLoss`` per sample and channel, with the same meaning of ``alpha`` and ``beta`` (``alpha`` weighs false
    positives, ``beta`` false negatives), so ``gamma=1`` gives exactly MONAI's Tversky loss. The defaults weigh false
    negatives more (``beta=0.7``), which favours recall on small lesions, as in the paper (whose alpha is our beta);
    ``gamma < 1`` keeps the gradient large on examples that are already nearly right.

    ``input`` is ``BNH[WD]`` logits (or probabilities with ``sigmoid=False``); ``target`` is binary, same shape.
    """

    def __init__(
        self,
        alpha: float = 0.3,
        beta: float = 0.7,
        gamma: float = 0.75,
        smooth: float = 1e-5,
        sigmoid: bool = True,
        batch: bool = False,
        reduction: LossReduction | str = LossReduction.MEAN,
    ) -> None:
        """
        Args:
            alpha: weight of false positives, >= 0.
            beta: weight of false negatives, >= 0.
            gamma: focal exponent applied to ``1 - TI``, > 0 (1 gives the plain Tversky loss).
            smooth: added to numerator and denominator of TI, >= 0, so empty masks give a finite value.
            sigmoid: apply a sigmoid to ``input`` first (``input`` is logits).
            batch: pool TP, FP and FN over the batch before the index (one value per channel) instead of per sample.
            reduction: ``"mean"``, ``"sum"`` or ``"none"`` over the per-sample (or per-channel) losses.

        Raises:
            ValueError: When ``alpha`` or ``beta`` is negative, or both are 0.
            ValueError: When ``gamma`` is not positive, or ``smooth`` is negative.
            ValueError: When ``reduction`` is not one of ``"mean"``, ``"sum"``, ``"none"``.
        """
        reductions = [r.value for r in LossReduction]
        reduction = reduction.value if isinstance(reduction, LossReduction) else reduction
        if reduction not in reductions:
            raise ValueError(f"reduction must be one of {reductions}, got {reduction!r}.")
        super().__init__(reduction=reduction)
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha!r}.")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta!r}.")
        if alpha == 0 and beta == 0:
            raise ValueError("alpha and beta must not both be 0 (the index would be 1 whatever the prediction).")
        if gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {gamma!r}.")
        if smooth < 0:
            raise ValueError(f"smooth must be >= 0, got {smooth!r}.")
        self.gamma = gamma
        self.tversky = TverskyLoss(
            sigmoid=sigmoid,
            alpha=alpha,
            beta=beta,
            smooth_nr=smooth,
            smooth_dr=smooth,
            batch=batch,
            reduction=LossReduction.NONE,
        )

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: ``BNH[WD]`` logits (probabilities with ``sigmoid=False``).
            target: ``BNH[WD]`` binary mask.

        Raises:
            ValueError: When ``input`` and ``target`` shapes differ.
        """
        if input.shape != target.shape:
            raise ValueError(
                f"input and target must have the same shape, got {tuple(input.shape)} and {tuple(target.shape)}."
            )
        loss = torch.clamp(self.tversky(input, target), min=_FLOOR) ** self.gamma
        if self.reduction == LossReduction.MEAN.value:
            return loss.mean()
        if self.reduction == LossReduction.SUM.value:
            return loss.sum()
        return loss
