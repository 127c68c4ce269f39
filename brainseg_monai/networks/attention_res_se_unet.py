"""Attention residual squeeze-and-excitation U-Net, assembled from MONAI blocks, for 2D and 3D binary segmentation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import ChannelSELayer, Convolution, ResidualUnit
from monai.networks.nets.attentionunet import AttentionBlock
from torch import nn


class AttentionResSEUNet(nn.Module):
    """
    U-Net with residual units, a squeeze-and-excitation bridge and attention-gated skip connections.

    Three published ideas on a U-Net backbone:

    - residual units in the encoder and decoder (He et al., "Deep Residual Learning for Image Recognition",
      CVPR 2016, https://arxiv.org/abs/1512.03385), via MONAI's ``ResidualUnit``;
    - channel squeeze-and-excitation on the bridge, so the deepest features are reweighted by global context
      (Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018, https://arxiv.org/abs/1709.01507),
      via MONAI's ``ChannelSELayer``;
    - additive attention gates on every skip connection, so the decoder suppresses encoder features away from
      the target (Oktay et al., "Attention U-Net: Learning Where to Look for the Pancreas", MIDL 2018,
      https://arxiv.org/abs/1804.03999), via MONAI's ``AttentionBlock``.

    Every convolution is followed by spatial dropout (whole feature maps, ``Dropout2d``/``Dropout3d`` from MONAI's
    ``Dropout`` factory), which regularises better than element-wise dropout on small data sets.

    Input is ``BCH W[D]`` with every spatial size divisible by ``2 ** (len(channels) - 1)``; output is
    ``B out_channels H W[D]`` logits at the input's spatial size.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        dropout: float = 0.1,
        norm: str | tuple = "instance",
        se_reduction: int = 16,
    ) -> None:
        """
        Args:
            spatial_dims: 2 or 3.
            in_channels: number of input channels (image modalities).
            out_channels: number of output channels (1 for binary segmentation logits).
            channels: feature channels per resolution level, finest first; the last one is the bridge.
                Each level after the first halves the spatial size.
            dropout: spatial dropout probability after every convolution, in [0, 1); 0 disables it.
            norm: feature normalisation, a MONAI ``Norm`` name or ``(name, kwargs)``.
            se_reduction: squeeze-and-excitation reduction ratio r of Hu et al.; ``channels[-1] // se_reduction``
                hidden units.

        Raises:
            ValueError: When ``spatial_dims`` is not 2 or 3.
            ValueError: When ``in_channels`` or ``out_channels`` is not positive.
            ValueError: When ``channels`` has fewer than 2 levels or a non-positive entry.
            ValueError: When ``dropout`` is outside [0, 1).
            ValueError: When ``se_reduction`` is not positive or larger than ``channels[-1]``.
        """
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.")
        if in_channels < 1:
            raise ValueError(f"in_channels must be positive, got {in_channels!r}.")
        if out_channels < 1:
            raise ValueError(f"out_channels must be positive, got {out_channels!r}.")
        channels = tuple(channels)
        if len(channels) < 2 or any(c < 1 for c in channels):
            raise ValueError(f"channels must have at least 2 positive entries, got {channels!r}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")
        if se_reduction < 1 or channels[-1] // se_reduction < 1:
            raise ValueError(f"se_reduction must be in [1, channels[-1]={channels[-1]}], got {se_reduction!r}.")
        self.spatial_dims = spatial_dims
        self.divisor = 2 ** (len(channels) - 1)
        conv_args = {
            "norm": norm,
            "act": "prelu",
            "dropout": dropout if dropout > 0 else None,
            "dropout_dim": spatial_dims,  # channel-wise (spatial) dropout, as in Dropout2d / Dropout3d
        }

        encoder = [ResidualUnit(spatial_dims, in_channels, channels[0], strides=1, **conv_args)]
        encoder += [
            ResidualUnit(spatial_dims, c_in, c_out, strides=2, **conv_args)
            for c_in, c_out in zip(channels[:-1], channels[1:])
        ]
        self.encoder = nn.ModuleList(encoder)
        self.bridge_se = ChannelSELayer(spatial_dims, channels[-1], r=se_reduction)

        # decoder modules are ordered from the bridge up to the finest level
        levels = list(range(len(channels) - 2, -1, -1))
        self.upsamples = nn.ModuleList(
            Convolution(spatial_dims, channels[i + 1], channels[i], strides=2, is_transposed=True, **conv_args)
            for i in levels
        )
        self.attention_gates = nn.ModuleList(
            AttentionBlock(spatial_dims, f_int=max(1, channels[i] // 2), f_g=channels[i], f_l=channels[i])
            for i in levels
        )
        self.decoder = nn.ModuleList(
            ResidualUnit(spatial_dims, 2 * channels[i], channels[i], strides=1, **conv_args) for i in levels
        )
        self.head = Convolution(spatial_dims, channels[0], out_channels, kernel_size=1, conv_only=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: ``BCH W[D]`` image batch, each spatial size divisible by ``2 ** (len(channels) - 1)``.

        Raises:
            ValueError: When ``x`` has the wrong number of dimensions or an indivisible spatial size.
        """
        spatial_shape = tuple(x.shape[2:])
        if len(spatial_shape) != self.spatial_dims:
            raise ValueError(
                f"AttentionResSEUNet({self.spatial_dims}D) expects a {self.spatial_dims + 2}D (B, C, spatial...) "
                f"input, got shape {tuple(x.shape)}."
            )
        if any(s % self.divisor for s in spatial_shape):
            raise ValueError(
                f"AttentionResSEUNet needs every spatial size divisible by {self.divisor} (2 ** (len(channels) - 1)), "
                f"got spatial shape {spatial_shape}; pad or crop the input, e.g. with "
                f"monai.transforms.DivisiblePad(k={self.divisor})."
            )
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        x = self.bridge_se(skips.pop())
        for upsample, gate, merge in zip(self.upsamples, self.attention_gates, self.decoder):
            skip = skips.pop()
            x = upsample(x)
            x = merge(torch.cat([gate(g=x, x=skip), x], dim=1))
        out: torch.Tensor = self.head(x)
        return out
