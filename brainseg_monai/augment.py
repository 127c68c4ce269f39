"""Training augmentation applied to whole batches on the training device, drawn independently for every sample.

MONAI's dictionary transforms augment one sample at a time on the CPU. On 2 cores that was a third of every training
step (``brainseg benchmark``: ``train_data_overhead_pct`` 32-34 with ``RandFlipd``, ``RandRotate90d``,
``RandAffined``, ``Rand2DElasticd`` and the intensity transforms per sample; ``Rand2DElasticd`` alone cost 4.7 ms a
256x256 sample even when its draw said "skip"). Here the same augmentations are drawn per sample but applied to the
batch at once with torch ops: flips and 90-degree rotations as exact index operations, rotation, scaling and elastic
deformation as one ``grid_sample`` on the samples that drew them, intensity changes by broadcasting. On a GPU the
work moves off the CPU altogether.

:class:`AugmentBatch` plugs it into MONAI's engines as the trainer's ``prepare_batch``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.engines.utils import PrepareBatch, default_prepare_batch
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.morphology import disk

from brainseg_monai.normalisation import zscore

__all__ = ["AugmentBatch", "BatchAugment", "estimate_brain"]


def estimate_brain(image: torch.Tensor, margin: int) -> torch.Tensor:
    """A rough brain mask ``(1, H, W)`` (boolean, on the image's device) of one z-scored 2D slice ``(C, H, W)`` that
    shows the whole head.

    The head is the largest connected region of the channels' mean above half-way between its darkest level (the
    air around the head) and its Otsu threshold, opened by 2 pixels to part it from specks of noise, with its holes
    filled; the brain is the head eroded by a disk of ``margin`` pixels, which takes off the scalp and skull. Rough
    (on noisy air the whole image may pass for the head, and nothing is removed), but what the augmentation needs:
    images whose surroundings are gone, as in skull-stripped data. On the CPU with SciPy (labelling and hole filling
    have no torch equivalent); 35-60 ms a 256x256 slice.
    """
    values = image.detach().float().cpu().mean(0).numpy()
    head = ndimage.binary_opening(values > (values.min() + threshold_otsu(values)) / 2, structure=disk(2).astype(bool))
    labels, count = ndimage.label(head)
    if count == 0:
        return torch.zeros((1, *image.shape[1:]), dtype=torch.bool, device=image.device)
    largest = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    filled = ndimage.binary_fill_holes(largest)
    brain = ndimage.binary_erosion(filled, structure=disk(margin).astype(bool)) if margin > 0 else filled
    return torch.as_tensor(brain[None], device=image.device)


def _check_prob(name: str, value: float) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1] but is {value}.")
    return float(value)


class BatchAugment:
    """Random flips, 90-degree rotations, affine + elastic deformation, missing sequences and intensity changes.

    Each sample draws its own parameters (as MONAI's ``Rand*d`` transforms with the same probabilities would); the
    image is resampled bilinearly and the label with nearest neighbour, so labels stay binary. Outside the field of
    view is zero, as in the z-scored images' background.

    Args:
        spatial_dims: 2 (``B, C, H, W``) or 3 (``B, C, H, W, D``; rotations and scaling in the first two axes, the
            slice plane, and no elastic deformation).
        flip_prob: probability of a flip, per spatial axis.
        rot90_prob: probability of a rotation by 90, 180 or 270 degrees in the first two axes (when they are equal).
        affine_prob: probability of a rotation within ``rotate_degrees`` and a scaling within ``1 +- scale_range``.
        rotate_degrees: largest rotation of the affine, in degrees.
        scale_range: largest relative change of size of the affine.
        elastic_prob: probability of an elastic deformation (2D only).
        elastic_spacing: distance in pixels between the control points of the deformation.
        elastic_magnitude: (low, high) of the standard deviation, in pixels, of the control points' displacement.
        scale_intensity_prob: probability of multiplying the image by ``1 + U(-scale_intensity, scale_intensity)``.
        scale_intensity: largest relative intensity scaling.
        shift_intensity_prob: probability of adding ``U(-shift_intensity, shift_intensity)`` to the image.
        shift_intensity: largest intensity offset (the images are z-scored, so this is in standard deviations).
        noise_prob: probability of Gaussian noise with a standard deviation drawn from ``U(0, noise_std)``.
        noise_std: largest standard deviation of the noise.
        missing_channel_prob: probability that a sample loses sequences: each channel other than
            ``missing_channel_fill`` is marked with probability 1/2 (one at random if none was), and the marked
            ones are replaced by a copy of the fill channel. The LGG set fills a missing pre- or post-contrast
            sequence with FLAIR (7 of the 56 shared patients); a model that never saw such inputs missed their
            tumours (fold 2 of the cross-validation in bundle/docs/README.md). Needs images of 2 or more channels.
        missing_channel_fill: index of the channel that fills in (1, FLAIR, for the LGG channel order).
        skull_strip_prob: probability that a 2D sample is made to look skull-stripped, as BraTS and many research
            pipelines give their images: the head (:func:`estimate_brain`) is eroded by ``skull_strip_margin``
            pixels to drop scalp and skull, the rest is set to 0 and each channel is z-scored again over what is
            left, exactly as such an image is z-scored at inference (its zero background does not count). The label
            is cut to what is left.
        skull_strip_margin: (low, high) of the erosion in pixels, drawn per sample (the skull and scalp are about
            7-17 mm, 8-20 pixels at the LGG slices' 0.86 mm).
        gamma_prob: probability of a contrast change per sample: each channel, rescaled to [0, 1] between its
            minimum and maximum, is raised to a power drawn log-uniformly from ``gamma_range`` (one per channel, as
            scanners and sites differ sequence by sequence).
        gamma_range: (low, high) of the power; nnU-Net's (0.7, 1.5) by default.
        bias_field_prob: probability of a smooth multiplicative intensity field per sample, as a receive coil's
            sensitivity makes: ``exp`` of a polynomial of degree 3 in the slice plane with coefficients drawn from
            ``U(-bias_field, bias_field)`` (no constant term), the same for every channel and slice of the sample.
        bias_field: largest coefficient of the field's polynomial (0.2: typically +-20% across a slice).

    Contrast and field change the image above its darkest level (the background of the scans stays the background)
    and each channel is then brought back to the mean and standard deviation it had, as the z-scoring at inference
    would; they run first, before the skull is stripped.

    Raises:
        ValueError: for ``spatial_dims`` other than 2 or 3, a probability outside [0, 1] or a negative range.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        flip_prob: float = 0.5,
        rot90_prob: float = 0.5,
        affine_prob: float = 0.3,
        rotate_degrees: float = 15.0,
        scale_range: float = 0.1,
        elastic_prob: float = 0.2,
        elastic_spacing: int = 24,
        elastic_magnitude: Sequence[float] = (1.0, 2.0),
        scale_intensity_prob: float = 0.5,
        scale_intensity: float = 0.1,
        shift_intensity_prob: float = 0.5,
        shift_intensity: float = 0.1,
        noise_prob: float = 0.15,
        noise_std: float = 0.05,
        missing_channel_prob: float = 0.0,
        missing_channel_fill: int = 1,
        skull_strip_prob: float = 0.0,
        skull_strip_margin: Sequence[int] = (8, 20),
        gamma_prob: float = 0.0,
        gamma_range: Sequence[float] = (0.7, 1.5),
        bias_field_prob: float = 0.0,
        bias_field: float = 0.2,
    ) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3 but is {spatial_dims}.")
        self.spatial_dims = spatial_dims
        self.flip_prob = _check_prob("flip_prob", flip_prob)
        self.rot90_prob = _check_prob("rot90_prob", rot90_prob)
        self.affine_prob = _check_prob("affine_prob", affine_prob)
        self.elastic_prob = _check_prob("elastic_prob", elastic_prob) if spatial_dims == 2 else 0.0
        self.scale_intensity_prob = _check_prob("scale_intensity_prob", scale_intensity_prob)
        self.shift_intensity_prob = _check_prob("shift_intensity_prob", shift_intensity_prob)
        self.noise_prob = _check_prob("noise_prob", noise_prob)
        self.missing_channel_prob = _check_prob("missing_channel_prob", missing_channel_prob)
        if not isinstance(missing_channel_fill, int) or missing_channel_fill < 0:
            raise ValueError(f"missing_channel_fill must be a channel index >= 0 but is {missing_channel_fill!r}.")
        self.missing_channel_fill = missing_channel_fill
        self.skull_strip_prob = _check_prob("skull_strip_prob", skull_strip_prob) if spatial_dims == 2 else 0.0
        margin = tuple(int(v) for v in skull_strip_margin)
        if len(margin) != 2 or not 0 <= margin[0] <= margin[1]:
            raise ValueError(f"skull_strip_margin must be (low, high) pixels with 0 <= low <= high but is "
                             f"{tuple(skull_strip_margin)}.")
        self.skull_strip_margin = margin
        self.gamma_prob = _check_prob("gamma_prob", gamma_prob)
        self.gamma_range = tuple(float(v) for v in gamma_range)
        if len(self.gamma_range) != 2 or not 0 < self.gamma_range[0] <= self.gamma_range[1]:
            raise ValueError(f"gamma_range must be (low, high) with 0 < low <= high but is {tuple(gamma_range)}.")
        self.bias_field_prob = _check_prob("bias_field_prob", bias_field_prob)
        low, high = (float(v) for v in elastic_magnitude)
        ranges = {"rotate_degrees": rotate_degrees, "scale_range": scale_range, "scale_intensity": scale_intensity,
                  "shift_intensity": shift_intensity, "noise_std": noise_std, "elastic_magnitude": low,
                  "bias_field": bias_field}
        for name, value in ranges.items():
            if float(value) < 0:
                raise ValueError(f"{name} must be >= 0 but is {value}.")
        if high < low or elastic_spacing < 2:
            raise ValueError(f"elastic_magnitude must be (low, high) with low <= high and elastic_spacing >= 2, "
                             f"but are {tuple(elastic_magnitude)} and {elastic_spacing}.")
        if not 0 <= scale_range < 1:
            raise ValueError(f"scale_range must be in [0, 1) but is {scale_range}.")
        self.rotate = math.radians(float(rotate_degrees))
        self.scale_range = float(scale_range)
        self.elastic_spacing = int(elastic_spacing)
        self.elastic_magnitude = (low, high)
        self.scale_intensity = float(scale_intensity)
        self.shift_intensity = float(shift_intensity)
        self.noise_std = float(noise_std)
        self.bias_field = float(bias_field)

    def __call__(self, image: torch.Tensor, label: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Augmented copies of ``image`` (``B, C, *spatial``) and ``label`` (``B, 1, *spatial``, or ``None``)."""
        if image.ndim != self.spatial_dims + 2:
            raise ValueError(f"expected a batch of shape (B, C, {self.spatial_dims} spatial dims) but got {tuple(image.shape)}.")
        if label is not None and (label.shape[0] != image.shape[0] or label.shape[2:] != image.shape[2:]):
            raise ValueError(f"label {tuple(label.shape)} does not match image {tuple(image.shape)} in batch and size.")
        image = image.clone()
        label = None if label is None else label.clone()
        self._contrast_and_field(image)
        self._skull_strip(image, label)
        self._flip_and_rotate90(image, label)
        self._resample(image, label)
        self._missing_channels(image)
        self._intensity(image)
        return image, label

    def _draw(self, prob: float, n: int) -> torch.Tensor:
        return torch.rand(n) < prob

    def _subset(self, prob: float, n: int, device: torch.device) -> torch.Tensor:
        """Indices of the samples that draw an augmentation of probability ``prob``."""
        return self._draw(prob, n).nonzero().flatten().to(device)

    def _flip_and_rotate90(self, image: torch.Tensor, label: torch.Tensor | None) -> None:
        """In place, on the samples that draw each: flips per axis, then a rotation by 1-3 quarter turns."""
        n = image.shape[0]
        tensors = [image] if label is None else [image, label]
        for axis in range(2, image.ndim):
            index = self._subset(self.flip_prob, n, image.device)
            for t in tensors:
                t[index] = t[index].flip(axis)
        if image.shape[2] != image.shape[3]:
            return
        turns = torch.randint(1, 4, (n,))
        turns[~self._draw(self.rot90_prob, n)] = 0
        for k in (1, 2, 3):
            index = (turns == k).nonzero().flatten().to(image.device)
            for t in tensors:
                t[index] = t[index].rot90(k, (2, 3))

    def _resample(self, image: torch.Tensor, label: torch.Tensor | None) -> None:
        """In place, on the samples that draw an affine or elastic deformation: one ``grid_sample`` for both."""
        n, dims = image.shape[0], self.spatial_dims
        affine = self._draw(self.affine_prob, n)
        elastic = self._draw(self.elastic_prob, n)
        index = (affine | elastic).nonzero().flatten()
        if not len(index):
            return
        m = len(index)
        theta = torch.eye(dims, dims + 1).repeat(m, 1, 1)
        angle = (torch.rand(m) * 2 - 1) * self.rotate * affine[index]
        scale = 1 + (torch.rand(m) * 2 - 1) * self.scale_range * affine[index]
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        # grid_sample's grid is (x, y[, z]) = (last axis, second last, ...): the slice-plane axes 2, 3 are the last two
        # of a 2D batch and the first two of a 3D batch, so the rotation block sits where those axes are
        plane = [0, 1] if dims == 2 else [1, 2]
        theta[:, plane[0], plane[0]], theta[:, plane[0], plane[1]] = cos, -sin
        theta[:, plane[1], plane[0]], theta[:, plane[1], plane[1]] = sin, cos
        size = image.shape[2:]
        grid = F.affine_grid(theta.to(image.device, image.dtype), [m, 1, *size], align_corners=False)
        if elastic[index].any():
            grid = grid + self._elastic_field(elastic[index], size, image)
        index = index.to(image.device)
        image[index] = F.grid_sample(image[index], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if label is not None:
            warped = F.grid_sample(label[index].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
            label[index] = warped.to(label.dtype)

    def _elastic_field(self, chosen: torch.Tensor, size: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        """(m, H, W, 2) displacement in grid units: Gaussian control points, bicubically upsampled; 0 where not chosen."""
        m = len(chosen)
        height, width = int(size[0]), int(size[1])
        control = (max(2, math.ceil(height / self.elastic_spacing) + 1), max(2, math.ceil(width / self.elastic_spacing) + 1))
        low, high = self.elastic_magnitude
        sigma = (low + torch.rand(m) * (high - low)) * chosen
        points = torch.randn(m, 2, *control) * sigma.view(m, 1, 1, 1)
        pixels = F.interpolate(points.to(like.device, like.dtype), size=(height, width), mode="bicubic", align_corners=True)
        # pixels -> grid units ([-1, 1] spans the image): x along width, y along height
        scale = torch.tensor([2.0 / width, 2.0 / height], device=like.device, dtype=like.dtype).view(1, 2, 1, 1)
        return (pixels * scale).permute(0, 2, 3, 1)

    def _missing_channels(self, image: torch.Tensor) -> None:
        """In place, on the samples that draw it: channels other than the fill channel replaced by a copy of it."""
        n, channels = image.shape[:2]
        if self.missing_channel_prob == 0:
            return
        if channels < 2:
            raise ValueError("missing_channel_prob > 0 needs images of 2 or more channels; set it to 0 for a "
                             "1-channel model.")
        if self.missing_channel_fill >= channels:
            raise ValueError(f"missing_channel_fill is {self.missing_channel_fill} but the batch has {channels} channels.")
        others = [c for c in range(channels) if c != self.missing_channel_fill]
        replace = torch.rand(n, len(others)) < 0.5
        none = ~replace.any(1)  # a drawn sample loses at least one sequence
        replace[none, torch.randint(len(others), (int(none.sum()),))] = True
        replace &= self._draw(self.missing_channel_prob, n).unsqueeze(1)
        for j, c in enumerate(others):
            index = replace[:, j].nonzero().flatten().to(image.device)
            image[index, c] = image[index, self.missing_channel_fill]

    def _contrast_and_field(self, image: torch.Tensor) -> None:
        """In place, on the samples that draw either: gamma per channel and a smooth field per sample, applied above
        each channel's minimum, then each channel brought back to its mean and standard deviation."""
        if self.gamma_prob == 0 and self.bias_field_prob == 0:
            return  # drawing nothing keeps the random stream, so runs without them repeat earlier runs exactly
        n, channels = image.shape[:2]
        gamma, field = self._draw(self.gamma_prob, n), self._draw(self.bias_field_prob, n)
        index = (gamma | field).nonzero().flatten()
        if not len(index):
            return
        chosen = image[index.to(image.device)].float()
        axes = tuple(range(2, chosen.ndim))
        low = chosen.amin(axes, keepdim=True)
        span = (chosen.amax(axes, keepdim=True) - low).clamp_min(1e-6)
        mean, std = chosen.mean(axes, keepdim=True), chosen.std(axes, keepdim=True, correction=0)
        unit = (chosen - low) / span
        lo, hi = (math.log(v) for v in self.gamma_range)
        power = torch.exp(lo + torch.rand(len(index), channels) * (hi - lo)) ** gamma[index].float().unsqueeze(1)
        unit = unit.clamp_min(0) ** power.to(unit).view(*power.shape, *(1,) * len(axes))
        unit = unit * self._bias_fields(field[index], chosen.shape[2:], unit)
        changed = zscore(low + unit * span, where=torch.ones_like(chosen, dtype=torch.bool))
        image[index.to(image.device)] = (changed * std + mean).to(image)

    def _bias_fields(self, chosen: torch.Tensor, size: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        """(m, 1, *size) multiplicative fields, smooth in the slice plane (the first two spatial axes): ``exp`` of a
        polynomial of degree 3 with random coefficients; 1 where not chosen."""
        m = len(chosen)
        y = torch.linspace(-1, 1, int(size[0]), device=like.device, dtype=like.dtype).view(-1, 1)
        x = torch.linspace(-1, 1, int(size[1]), device=like.device, dtype=like.dtype).view(1, -1)
        terms = torch.stack([y**i * x**j for i in range(4) for j in range(4 - i) if i + j > 0])  # 9 (H, W) monomials
        coefficients = (torch.rand(m, len(terms)) * 2 - 1) * self.bias_field * chosen.float().unsqueeze(1)
        log_field = torch.einsum("mt,thw->mhw", coefficients.to(like), terms)
        return torch.exp(log_field).view(m, 1, *log_field.shape[1:], *(1,) * (len(size) - 2))

    def _skull_strip(self, image: torch.Tensor, label: torch.Tensor | None) -> None:
        """In place, on the 2D samples that draw it: only the estimated brain kept, z-scored over itself; the label
        cut to it. Runs first, on the z-scored images as loaded, whose background is still the darkest level."""
        index = self._subset(self.skull_strip_prob, image.shape[0], image.device)
        if not len(index):
            return
        chosen = image[index]
        low, high = self.skull_strip_margin
        margins = torch.randint(low, high + 1, (len(index),)).tolist()
        brain = torch.stack([estimate_brain(sample, margin) for sample, margin in zip(chosen, margins)])
        # z-scoring is affine, so z-scoring the z-scored slice again over its brain equals z-scoring the raw one there
        image[index] = zscore(chosen * brain, where=brain)
        if label is not None:
            label[index] *= brain.to(label.dtype)

    def _intensity(self, image: torch.Tensor) -> None:
        """In place: scale, shift and noise, each on the samples that draw it."""
        n = image.shape[0]
        shape = (n,) + (1,) * (image.ndim - 1)
        factor = 1 + (torch.rand(n) * 2 - 1) * self.scale_intensity * self._draw(self.scale_intensity_prob, n)
        offset = (torch.rand(n) * 2 - 1) * self.shift_intensity * self._draw(self.shift_intensity_prob, n)
        image.mul_(factor.to(image).view(shape)).add_(offset.to(image).view(shape))
        index = self._subset(self.noise_prob, n, image.device)
        if len(index):
            std = (torch.rand(len(index)) * self.noise_std).to(image).view((-1,) + shape[1:])
            image[index] += torch.randn_like(image[index]) * std


class AugmentBatch(PrepareBatch):
    """The trainer's ``prepare_batch``: MONAI's default (image and label to the device), then :class:`BatchAugment`.

    Use as ``SupervisedTrainer(..., prepare_batch=AugmentBatch(BatchAugment(2)))``; the evaluator keeps the default.
    """

    def __init__(self, augment: BatchAugment) -> None:
        self.augment = augment

    def __call__(self, batchdata: dict[str, torch.Tensor], device: str | torch.device | None = None,
                 non_blocking: bool = False, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        with torch.no_grad():
            return self.augment(image, label)
