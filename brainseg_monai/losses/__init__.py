"""Segmentation losses by name, for binary segmentation: ``input`` is ``B1H W[D]`` logits, ``target`` a binary mask.

``get_loss(name, **kwargs)`` is what the bundle configs call (``"$brainseg_monai.losses.get_loss(@loss_name)"`` or
``{"_target_": "brainseg_monai.losses.get_loss", "name": "dice_ce"}``). Every loss applies a sigmoid to its input by
default (``sigmoid=True``, as MONAI's losses take it); keyword arguments override the defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from monai.losses import DiceCELoss, DiceFocalLoss, DiceLoss, GeneralizedDiceLoss, TverskyLoss
from torch import nn

from brainseg_monai.losses.boundary import BoundaryWeightedBCELoss, DiceBoundaryBCELoss, boundary_map
from brainseg_monai.losses.focal_tversky import FocalTverskyLoss

__all__ = [
    "LOSSES",
    "BoundaryWeightedBCELoss",
    "DiceBoundaryBCELoss",
    "FocalTverskyLoss",
    "boundary_map",
    "get_loss",
]


def _with_sigmoid(loss_class: type[nn.Module], **kwargs) -> nn.Module:
    """MONAI loss with ``sigmoid=True`` unless ``kwargs`` say otherwise."""
    return loss_class(**{"sigmoid": True, **kwargs})


LOSSES: dict[str, Callable[..., nn.Module]] = {
    "dice": partial(_with_sigmoid, DiceLoss),
    # with one output channel, MONAI's DiceCELoss uses binary cross-entropy with logits
    "dice_ce": partial(_with_sigmoid, DiceCELoss),
    "dice_focal": partial(_with_sigmoid, DiceFocalLoss),
    "generalized_dice": partial(_with_sigmoid, GeneralizedDiceLoss),
    "tversky": partial(_with_sigmoid, TverskyLoss),
    "focal_tversky": FocalTverskyLoss,
    "dice_boundary_bce": DiceBoundaryBCELoss,
}


def get_loss(name: str, **kwargs) -> nn.Module:
    """Build the loss registered as ``name`` (case-insensitive); ``kwargs`` override its defaults.

    Args:
        name: one of ``LOSSES``.
        kwargs: arguments of the loss class (e.g. ``alpha``, ``beta`` for "tversky").

    Raises:
        ValueError: When ``name`` is not registered (the message lists the registered names).
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in LOSSES:
        raise ValueError(f"name must be one of {', '.join(LOSSES)}; got loss name {name!r}.")
    return LOSSES[key](**kwargs)
