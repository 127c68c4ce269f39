"""Several trained models of one architecture run as one network: one logit channel per member.

nnU-Net's default at inference: the fold models of a cross-validation, their probabilities averaged. Here the
members' logits are stacked as channels, so that each test-time view goes to every member in the same forward and
`brainseg_monai.inference.tta.TTAPredictor` averages the probabilities (not the logits) over views and members; their
spread over both is the ensemble's uncertainty map.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["EnsembleNetwork", "members_of"]


class EnsembleNetwork(nn.Module):
    """``NCH[WD]`` images -> ``NMH[WD]`` logits, channel ``m`` being member ``m``'s 1-channel output.

    Args:
        members: two or more networks with 1-channel logits, taking the same input.

    Raises:
        ValueError: when fewer than two members are given.
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least two members but got {len(members)}.")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([member(x) for member in self.members], dim=1)


def members_of(network: nn.Module) -> int:
    """How many logit channels ``network`` returns for the tumour: its members for an ensemble, else 1."""
    return len(network.members) if isinstance(network, EnsembleNetwork) else 1
