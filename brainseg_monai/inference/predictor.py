"""How a trained model predicts: 2D images, volumes slice by slice (2D models) or by sliding window (3D).

The model, its settings and its ``model.json`` are `brainseg_monai.model`'s; this module reads the inputs the way
those settings say and runs the network on them.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from monai.networks.blocks import Convolution
from monai.transforms import (
    Compose,
    DivisiblePad,
    EnsureChannelFirstd,
    Invertd,
    LoadImage,
    LoadImaged,
    Orientation,
    ResampleToMatch,
    Spacing,
)
from torch.nn.utils.fusion import fuse_conv_bn_eval

from brainseg_monai.devices import with_memory_format
from brainseg_monai.errors import InputError, input_error_in
from brainseg_monai.inference.tta import TTAPredictor
from brainseg_monai.io import DicomSeries, SimpleITKReader, check_image_values, planar_to_volume_affine, voxel_spacing
from brainseg_monai.model import ModelSpec
from brainseg_monai.networks.ensemble import members_of
from brainseg_monai.normalisation import channel_statistics, normalise_images, normalise_slices, shape_chunks
from brainseg_monai.transforms import infer_transforms

logger = logging.getLogger(__name__)

# Every network in the registry accepts sizes divisible by 32 (SwinUNETR needs 32, U-Nets with 5 levels 16).
_DIVISOR = 32
#: smallest in-plane side (pixels) the networks look at: the U-Nets halve it four times
_MIN_SIDE = 16
#: largest padded 2D slice a 2D model predicts in one forward; larger ones go through the sliding window
_WHOLE_SLICE_PIXELS = 1024 * 1024
#: most pixels in one CPU forward of a 2D model: its TTA views are sent in chunks of this size. On 2 CPU cores the
#: shipped model ran 1.7x faster an image in batches of 8 256x256 images than in one batch of 128 (the activations
#: of a small batch stay in cache; docs/benchmarks.md, "Forward batches on the CPU")
_CPU_FORWARD_PIXELS = 8 * 256 * 256
#: relative difference between a volume's in-plane pixel size and the model's above which the slices are resampled
_SPACING_TOLERANCE = 0.1
#: MONAI axis codes (RAS space) of an axial DICOM series as ITK reads it: x to the left, y to the back, z to the head
_AXIAL_AXCODES = "LPS"


def noise_only_slices(volume: torch.Tensor | np.ndarray, fraction: float = 0.1) -> list[int]:
    """Axial slices (last axis) of a (C, x, y, z) volume whose brightest content is below ``fraction`` of the volume's.

    The 99th percentile per slice (brightest channel) against the volume's: a slice above or below the head is
    background noise only.
    """
    values = np.asarray(volume, dtype=np.float32)
    flat = values.reshape(values.shape[0], -1, values.shape[-1])
    per_slice = np.percentile(flat, 99, axis=1).max(axis=0)
    overall = float(np.percentile(flat, 99, axis=(1, 2)).max())
    if overall <= 0:
        return list(range(values.shape[-1]))
    return [int(z) for z in np.flatnonzero(per_slice < fraction * overall)]


class GroupInstanceNorm(torch.nn.Module):
    """Instance norm computed by ``torch.nn.functional.group_norm`` with one group per channel.

    The same statistics as ``InstanceNorm2d`` without running statistics (each image's channel over its pixels, the
    same ``eps``, affine or not), so the same function up to float rounding. PyTorch's instance norm reshapes its
    input into one batch-norm channel per image and channel, which copies a channels-last tensor each time; group
    norm reduces it where it lies: the shipped model's forward 1.3-1.5x faster on 2 CPU cores, its masks over the 87
    LGG patients unchanged but for 8 pixels (docs/benchmarks.md, "The shipped model").
    """

    def __init__(self, norm: torch.nn.InstanceNorm2d) -> None:
        super().__init__()
        self.num_channels, self.eps, self.weight, self.bias = norm.num_features, norm.eps, norm.weight, norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_channels, self.weight, self.bias, self.eps)


def inference_network(network: torch.nn.Module, device: torch.device | str, copy_network: bool = True,
                      group_instance_norm: bool = False) -> torch.nn.Module:
    """``network`` in eval mode made faster for inference: a copy, leaving ``network`` as it is, by default.

    With ``copy_network=False`` the network itself is changed and returned, saving the copy (40 ms for the default
    U-Net) when the caller has no other use for it.

    Batch norm that directly follows a convolution in MONAI's ``Convolution`` blocks is folded into the convolution's
    weights (exact up to float rounding: probabilities within 1e-5), and on CPU the weights are stored channels-last,
    which oneDNN's convolutions run faster on (``brainseg benchmark``: 1.2-1.35x for the 2D U-Net, 1.25x in 3D).
    Instance norm cannot be folded (its statistics are each image's own); with ``group_instance_norm`` every
    ``InstanceNorm2d`` that normalises with the image's own statistics runs as :class:`GroupInstanceNorm`.
    """
    network = (copy.deepcopy(network) if copy_network else network).eval()
    for block in network.modules():
        adn = getattr(block, "adn", None)
        if not isinstance(block, Convolution) or adn is None or not len(adn):
            continue
        first_name, first = next(iter(adn.named_children()))
        if isinstance(first, torch.nn.modules.batchnorm._BatchNorm) and first.track_running_stats:
            transpose = isinstance(block.conv, torch.nn.modules.conv._ConvTransposeNd)
            block.conv = fuse_conv_bn_eval(block.conv, first, transpose=transpose)
            setattr(adn, first_name, torch.nn.Identity())
    if group_instance_norm:
        for parent in list(network.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.InstanceNorm2d) and not child.track_running_stats:
                    setattr(parent, name, GroupInstanceNorm(child))
    return with_memory_format(network, torch.device(device).type == "cpu")


#: the values of ``--precision`` (see :func:`fast_path`)
PRECISIONS = ("fp32", "bf16", "auto")
#: ``/proc/cpuinfo`` flags of the CPU instructions that do bfloat16 arithmetic (AVX512-BF16, AMX)
_CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.lru_cache(maxsize=1)
def cpu_bf16_flags() -> frozenset[str]:
    """The bfloat16 instruction flags this CPU reports in ``/proc/cpuinfo``; empty where it reports none or there is
    no such file.

    PyTorch runs bfloat16 on any CPU, but without these instructions it converts in software: the shipped model's
    forward under bfloat16 autocast took 4x as long as in float32 on an AVX2-only AMD EPYC (docs/benchmarks.md).
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return frozenset(flags) & _CPU_BF16_FLAGS


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` does bfloat16 arithmetic itself: a CUDA GPU that supports it, a CPU that reports it."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(cpu_bf16_flags())


@dataclass(frozen=True)
class FastPath:
    """How the forward runs for a ``--precision`` on a device (see :func:`fast_path`).

    Args:
        autocast: the dtype the forward autocasts to; None runs it in float32.
        group_instance_norm: instance norm computed as group norm (:class:`GroupInstanceNorm`).
    """

    autocast: torch.dtype | None = None
    group_instance_norm: bool = False

    def describe(self) -> str:
        """In words, for reports: ``float32``, ``bfloat16 autocast``, ``float32, instance norm as group_norm``."""
        what = f"{str(self.autocast).removeprefix('torch.')} autocast" if self.autocast is not None else "float32"
        return what + (", instance norm as group_norm" if self.group_instance_norm else "")


def fast_path(precision: str, device: torch.device) -> FastPath:
    """How the forward runs for ``precision`` on ``device``.

    ``fp32``: float32 with the network's own layers, the reference. ``bf16``: bfloat16 autocast, only on a device with
    bfloat16 arithmetic (:func:`bf16_supported`). ``auto``: on CPU float32 with instance norm as group norm
    (:class:`GroupInstanceNorm`), whose masks matched the reference's over the 87 LGG patients (per-patient Dice
    between them >= 0.99997); on CUDA float16 autocast (as ``brainseg infer`` always did there). bfloat16 is not part
    of ``auto``: it halved the shipped model's forward on a CPU with AVX512-BF16, but whether it leaves the masks
    unchanged has not been measured over the LGG patients (docs/benchmarks.md, "The shipped model").

    Raises:
        ValueError: for a ``precision`` not in :data:`PRECISIONS`, or ``bf16`` on a device without bfloat16.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} but is {precision!r}.")
    if precision == "bf16":
        if not bf16_supported(device):
            what = ("this CPU reports neither AVX512-BF16 nor AMX-BF16" if device.type == "cpu"
                    else f"{device} does not support bfloat16")
            raise ValueError(f"precision bf16: {what}, so bfloat16 would be emulated, slower than float32; use "
                             f"precision fp32 or auto.")
        return FastPath(autocast=torch.bfloat16)
    if precision == "auto" and device.type == "cuda":
        return FastPath(autocast=torch.float16)
    return FastPath(group_instance_norm=precision == "auto" and device.type == "cpu")


class Predictor:
    """Probabilities for images and volumes from one model, with batched TTA and sliding windows.

    Args:
        network: the model in eval mode (1-channel logits), or an ensemble of such (one channel per member, see
            `brainseg_monai.networks.ensemble`): its members' probabilities are averaged with the views'.
        spec: its settings (spatial dims, training patch size, channels).
        device: where to run.
        tta: ``"none"``, ``"flip"`` or ``"dihedral"``.
        batch_size: images (2D) or slices per forward; each is multiplied by the number of TTA views.
        copy_network: False lets the predictor fuse and re-lay ``network`` itself (see :func:`inference_network`).
        precision: ``"fp32"``, ``"bf16"`` or ``"auto"``: how the forward runs, see :func:`fast_path`
            (``fast_path`` holds the one chosen).
        spread: also compute the standard deviation of the TTA views and members where there is more than one
            (``self.spread`` says whether it is), and for an ensemble each member's own probability (its mean over
            the views; ``self.member_maps``), for the case's uncertainty; False spares their sums and their
            resampling where only the probability is used (tuning, the bundle's evaluation).

    Raises:
        ValueError: for a ``batch_size`` below 1, an unknown ``precision``, or ``"bf16"`` on a device without
            bfloat16 arithmetic.
    """

    def __init__(self, network: torch.nn.Module, spec: ModelSpec, device: torch.device, tta: str = "dihedral",
                 batch_size: int = 16, copy_network: bool = True, precision: str = "auto", spread: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 but is {batch_size}.")
        self.spec, self.device = spec, torch.device(device)
        self.fast_path = fast_path(precision, self.device)
        self.network = inference_network(network, self.device, copy_network, self.fast_path.group_instance_norm)
        self.members = members_of(self.network)
        # one view of one model cannot disagree with itself: its zeros would read as certainty
        self.spread = bool(spread) and (tta != "none" or self.members > 1)
        self.member_maps = self.spread and self.members > 1
        #: maps per pixel: the probability, the spread (with :attr:`spread`), each member's probability (with
        #: :attr:`member_maps`)
        self.channels = 1 + self.spread + (self.members if self.member_maps else 0)
        self.tta, self.batch_size = tta, int(batch_size)
        roi = list(spec.roi_size)
        self.window = SlidingWindowInferer(roi_size=roi, sw_batch_size=self.batch_size, overlap=0.25, mode="gaussian")

    def _network_fn(self, spatial_shape: Sequence[int]):
        """The network itself, or a Gaussian sliding window when a volume exceeds the training patch.

        A 2D model sees a whole slice in one forward up to :data:`_WHOLE_SLICE_PIXELS` (the U-Nets are fully
        convolutional and padded to a size they accept): windows of the training size over a 288x288 slice cost 4
        forwards where one does (docs/benchmarks.md), and every pixel sees its full context instead of a window's edge.
        """
        whole_slice = self.spec.spatial_dims == 2 and int(np.prod(spatial_shape)) <= _WHOLE_SLICE_PIXELS
        if not whole_slice and any(s > r for s, r in zip(spatial_shape, self.spec.roi_size)):
            return lambda x: self.window(x, self.network)
        return self.network

    def _forward_images(self, spatial_shape: Sequence[int]) -> int | None:
        """Most images (TTA views included) per forward: :data:`_CPU_FORWARD_PIXELS` worth for a 2D model on the CPU;
        no limit elsewhere (a GPU is faster with the whole stacked batch; 3D windows are batched by the inferer)."""
        if self.device.type != "cpu" or self.spec.spatial_dims != 2:
            return None
        return max(1, _CPU_FORWARD_PIXELS // int(np.prod(spatial_shape)))

    @torch.inference_mode()
    def predict_batch(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, *spatial) normalised images -> (B, :attr:`channels`, *spatial): the tumour probability (the mean
        of the TTA views and ensemble members), with :attr:`spread` their standard deviation and with
        :attr:`member_maps` each member's probability; all views of the batch stacked into its forwards."""
        spatial = images.shape[2:]
        pad = DivisiblePad(k=_DIVISOR, mode="constant")
        padded = torch.stack([pad(im) for im in images]) if any(s % _DIVISOR for s in spatial) else images
        tta = TTAPredictor(self.tta, self.spec.spatial_dims, self._forward_images(padded.shape[2:]),
                           self.fast_path.autocast, self.members)
        network_fn, inputs = self._network_fn(padded.shape[2:]), padded.to(self.device)
        if self.member_maps:
            maps = torch.cat(tta.mean_spread_and_members(network_fn, inputs), dim=1)
        else:
            maps = torch.cat(tta.mean_and_spread(network_fn, inputs), dim=1) if self.spread else tta(network_fn, inputs)
        maps = maps.float().cpu()
        if maps.shape[2:] != spatial:
            starts = [(p - s) // 2 for p, s in zip(maps.shape[2:], spatial)]
            maps = maps[(slice(None), slice(None), *(slice(b, b + s) for b, s in zip(starts, spatial)))]
        return maps

    def _check_channels(self, image: torch.Tensor, source: str) -> None:
        if image.shape[0] != self.spec.in_channels:
            raise InputError(source, f"has {image.shape[0]} channel(s) but the model takes {self.spec.in_channels} "
                                     f"({', '.join(self.spec.channels)})")

    def predict_case(self, loaded: LoadedCase) -> CasePrediction:
        """The probabilities and the spread of the TTA views (and ensemble members) of a case :func:`load_for_case`
        read, on its input grid; the spread None without :attr:`spread`, the members' own None without
        :attr:`member_maps`."""
        if loaded.slices is not None:
            maps = self.predict_slices(loaded.slices, loaded.images)
            return CasePrediction([m[0] for m in maps], [m[1] for m in maps] if self.spread else None,
                                  [m[2:] for m in maps] if self.member_maps else None)
        if loaded.data is not None:
            volume = self.predict_volume_3d(loaded.data, loaded.preprocessing)
        else:
            volume = self.predict_volume_by_slices(loaded.volume, loaded.source, resample=not loaded.planar)
        return CasePrediction(volume[0], volume[1] if self.spread else None, volume[2:] if self.member_maps else None)

    def predict_slices(self, images: Sequence[torch.Tensor], sources: Sequence[str]) -> list[np.ndarray]:
        """2D model over normalised (C, x, y) images; equal-sized ones are batched. Returns a (:attr:`channels`, x, y)
        array per image: the probability, the TTA views' standard deviation and the members' probabilities (see
        :meth:`predict_batch`)."""
        for image, source in zip(images, sources):
            self._check_channels(image, source)
        out: list[np.ndarray | None] = [None] * len(images)
        for chunk in shape_chunks(images, self.batch_size):
            maps = self.predict_batch(torch.stack([images[i] for i in chunk]))
            for i, pair in zip(chunk, maps):
                out[i] = pair.numpy()
        return out  # type: ignore[return-value]

    def predict_volume_by_slices(self, volume: torch.Tensor, source: str, resample: bool = True) -> np.ndarray:
        """2D model over a raw (C, x, y, z) volume: each axial slice normalised as in training, slices batched.
        Returns (:attr:`channels`, x, y, z): the maps of :meth:`predict_batch`.

        A volume read with its affine (a MetaTensor) is first turned so that its last axis runs foot to head, with
        the in-plane layout of an axial DICOM slice and of a 2D image (MONAI ``Orientation`` to LPS, which leaves
        such a series as it is); sliced along the stored last axis, a sagittal or coronal acquisition would be
        segmented in planes the 2D model never saw. With ``resample`` and a model that knows its ``pixel_spacing``,
        slices whose pixel size differs by more than 10% are then resampled to it (MONAI ``Spacing``, bilinear),
        so a 0.45 mm series shows the network a head of the size it learnt. The probability is turned and resampled
        back onto the source grid (the transforms' own inverses). A plain tensor is taken to be axial already.
        """
        self._check_channels(volume, source)
        if not isinstance(volume, MetaTensor):
            return self._predict_axial_slices(torch.as_tensor(volume), source)
        orientation = Orientation(axcodes=_AXIAL_AXCODES, labels=None)  # labels from the volume's space (RAS)
        axial = orientation(volume)
        spacing = self._model_spacing(axial) if resample else None
        grid = spacing(axial) if spacing is not None else axial
        maps = self._predict_axial_slices(grid.as_tensor(), source)
        turned = MetaTensor(torch.as_tensor(maps), affine=grid.affine, applied_operations=list(grid.applied_operations))
        if spacing is not None:
            turned = spacing.inverse(turned)
        return np.ascontiguousarray(orientation.inverse(turned).numpy())

    def _model_spacing(self, axial: MetaTensor) -> Spacing | None:
        """The in-plane resampling to the model's pixel size, or None when the volume is already at it."""
        if self.spec.pixel_spacing is None:
            return None
        current = voxel_spacing(axial.affine)[:2]
        target = np.asarray(self.spec.pixel_spacing, dtype=np.float64)
        if np.all(np.abs(current / target - 1.0) <= _SPACING_TOLERANCE):
            return None
        return Spacing(pixdim=(float(target[0]), float(target[1]), 0.0), mode="bilinear", padding_mode="zeros")

    def _predict_axial_slices(self, volume: torch.Tensor, source: str) -> np.ndarray:
        """2D model over the last axis of a (C, x, y, z) volume: the (:attr:`channels`, x, y, z) maps.

        Slices outside the head hold only noise; z-scoring them per slice (as training does) would blow that noise
        up into texture the network was never shown, so they get probability 0 (see :func:`noise_only_slices`).
        """
        maps = np.zeros((self.channels, *volume.shape[1:]), dtype=np.float32)
        noise = set(noise_only_slices(volume))
        keep = [z for z in range(volume.shape[-1]) if z not in noise]
        kept = volume[..., keep]
        stats = channel_statistics([kept]) if self.spec.normalisation == "case" and keep else None
        slices = list(normalise_slices(kept, stats))
        for z, pair in zip(keep, self.predict_slices(slices, [source] * len(slices))):
            maps[..., z] = pair
        return maps

    def predict_volume_3d(self, data: dict, preprocessing: Any) -> np.ndarray:
        """3D model: ``data`` from :func:`infer_transforms`; the (:attr:`channels`, x, y, z) maps are inverted back to
        the source grid."""
        image = data["image"]
        self._check_channels(image, str(image.meta.get("filename_or_obj", "")))
        maps = self.predict_batch(image[None])[0]
        data = dict(data)
        # a MetaTensor: Invertd skips a plain tensor (with only a warning) and would leave the mask on the cropped,
        # reoriented grid
        data["pred"] = MetaTensor(maps)
        inverted = Invertd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=False)(data)
        out = np.asarray(inverted["pred"].detach().cpu().numpy(), dtype=np.float32)
        source_shape = tuple(int(s) for s in image.meta["spatial_shape"])
        if out.shape[1:] != source_shape:
            raise RuntimeError(f"the probability of {image.meta.get('filename_or_obj', 'the volume')} was inverted to "
                               f"{out.shape[1:]}, not the source grid {source_shape}: a preprocessing step is not invertible")
        return out


def _read_channel(path: str, series: DicomSeries | None = None) -> MetaTensor:
    """One image file, or exactly ``series`` of the folder ``path``, as a channel-first float32 MetaTensor."""
    reader = SimpleITKReader(series_uid=series.series_uid) if series is not None else SimpleITKReader()
    # The reader is passed at call time: MONAI would otherwise fall back to other readers and hide our errors.
    image = LoadImage(image_only=True, ensure_channel_first=True)(path, reader=reader)
    check_image_values(image, path)
    return image


def _grid(image: MetaTensor) -> str:
    """Size, spacing and origin of a channel-first image, for messages."""
    affine = np.asarray(image.affine, dtype=np.float64)
    rank = affine.shape[0] - 1
    return (f"size {tuple(int(s) for s in image.shape[1:])}, spacing {np.round(voxel_spacing(affine), 4).tolist()}, "
            f"origin {np.round(affine[:rank, -1], 2).tolist()}")


def _read_channels(images: Sequence[str], series: Sequence[DicomSeries], spec: ModelSpec, source: str,
                   primary: int = 0) -> tuple[MetaTensor, list[str]]:
    """A case's channels stacked into one (C, x, y[, z]) MetaTensor on the grid of the primary channel.

    Each input is read once (a channel filled from another repeats its path and series) and on its own, so that the
    series of a folder holding several is named. Sequences of a real study rarely share a grid (another field of
    view, matrix, slice positions or an oblique plane): a channel on another grid is resampled onto the primary
    channel's in physical space (MONAI ``ResampleToMatch``, linear, zero outside its field of view). A 2D channel
    cannot be resampled onto another grid's plane and is refused instead, naming both channels.

    Returns the stacked channels (the primary's metadata and affine) and the channels that were resampled.

    Raises:
        InputError: a channel cannot be read, or a 2D channel is not on the primary's grid.
    """
    picked = list(series) or [None] * len(images)
    keys = [(path, one.series_uid if one is not None else "") for path, one in zip(images, picked)]
    read: dict[tuple[str, str], MetaTensor] = {}
    for key, path, one in zip(keys, images, picked):
        if key not in read:
            read[key] = _read_channel(path, one)
    names = list(spec.channels) if len(spec.channels) == len(images) else [f"channel{i}" for i in range(len(images))]

    def named(i: int) -> str:
        what = f"series '{picked[i].description}' in {images[i]}" if picked[i] is not None else images[i]
        return f"channel '{names[i]}' ({what})"

    reference = read[keys[primary]]
    channels, resampled = [], []
    for i, key in enumerate(keys):
        channel = read[key]
        same = channel.shape[1:] == reference.shape[1:] and np.allclose(channel.affine, reference.affine, rtol=0,
                                                                       atol=1e-3)
        if not same:
            if channel.ndim != 4 or reference.ndim != 4:
                detail = f"{_grid(channel)} vs {_grid(reference)}"
                if _grid(channel) == _grid(reference):
                    detail = "same size, spacing and origin but another orientation"
                raise InputError(source, f"{named(i)} is not on the grid of {named(primary)}: {detail}")
            channel = ResampleToMatch(mode="bilinear", padding_mode="zeros")(channel, img_dst=reference)
            resampled.append(names[i])
        channels.append(channel.as_tensor() if i != primary else channel)
    if len(channels) == 1:
        return reference, resampled
    stacked = MetaTensor(torch.cat([torch.as_tensor(c) for c in channels]), meta=dict(reference.meta))
    stacked.affine = reference.affine
    return stacked, resampled


def _check_visible(image: torch.Tensor, source: str) -> None:
    """Refuse an image whose slices are smaller than :data:`_MIN_SIDE` pixels: a 1x1 PNG would otherwise come back
    ``ok`` with an empty mask, as if it had been looked at. Of a volume, the two largest sides count: its plane
    may be stored sagittal or coronal, and a stack of a few slices is a volume all the same."""
    side = tuple(sorted((int(s) for s in image.shape[1:]), reverse=True)[:2])
    if min(side) < _MIN_SIDE:
        raise InputError(source, f"is {' x '.join(map(str, side))} pixels in-plane: too small for the model to see "
                                 f"(at least {_MIN_SIDE} x {_MIN_SIDE})")


def _fill_channels(image: MetaTensor, spec: ModelSpec, fills: Mapping[str, str], source: str) -> MetaTensor:
    """A one-channel input given to a multi-channel model, repeated into every channel ``fills`` says it plays.

    Raises:
        InputError: when nothing says which sequence the image is (the message shows the flag that says it).
    """
    if image.shape[0] != 1 or spec.in_channels == 1 or image.shape[0] == spec.in_channels:
        return image
    if not fills:
        name = Path(source).name
        example = f"--channel '{spec.primary_channel}={re.escape(name)}'"
        raise InputError(source, (
            f"has 1 channel but the model takes {spec.in_channels} ({', '.join(spec.channels)}) and nothing says "
            f"which sequence it is; if it is a {spec.primary_channel} image, run: brainseg infer {shlex.quote(source)} "
            f"--out OUT {example} (missing {', '.join(c for c in spec.channels if c != spec.primary_channel)} "
            f"are then filled as the model was trained for)"))
    out = MetaTensor(image.as_tensor().repeat(spec.in_channels, *([1] * (image.ndim - 1))), meta=dict(image.meta))
    out.affine = image.affine
    return out


def _without_loading(preprocessing: Compose) -> Compose:
    """``preprocessing`` without its reading steps, for an image already read by :func:`_read_channels`."""
    return Compose([t for t in preprocessing.transforms if not isinstance(t, (LoadImaged, EnsureChannelFirstd))])


def _as_single_slice_volume(image: MetaTensor) -> MetaTensor:
    """A (C, x, y) 2D image as a (C, x, y, 1) volume whose 4x4 affine keeps the in-plane geometry (unit z)."""
    volume = MetaTensor(image.as_tensor()[..., None], meta=dict(image.meta))
    full = planar_to_volume_affine(image.affine)
    volume.affine = torch.as_tensor(full)
    volume.meta["original_affine"] = full
    volume.meta["spatial_shape"] = np.asarray(volume.shape[1:])
    return volume


@dataclass
class LoadedCase:
    """A case read for the model by :func:`load_for_case`, in the one layout that its kind and the model call for:
    ``slices`` (a folder of 2D images), ``volume`` (a 2D model over a volume) or ``data`` (a 3D model)."""

    #: the input files (slices) or channel paths, and the one path that names the case in messages
    images: list[str]
    source: str
    #: a slice folder: each image's normalised (C, x, y) tensor
    slices: list[torch.Tensor] | None = None
    #: a 2D model over a volume: the raw (C, x, y, z) volume; ``planar`` when it is a 2D image given a unit z axis
    volume: MetaTensor | None = None
    planar: bool = False
    #: a 3D model: the pre-processed dict and the transforms that made it (inverted onto the source grid after)
    data: dict | None = None
    preprocessing: Compose | None = None
    #: the channels resampled onto the primary channel's grid
    resampled: list[str] = field(default_factory=list)

    @property
    def image(self) -> np.ndarray:
        """The (C, x, y[, z]) input the mask lies on, for overlays (a slice folder has one per slice instead)."""
        if self.volume is not None:
            return np.asarray(self.volume)
        if self.data is None:
            raise ValueError("a slice folder has one image per slice: use slices")
        return np.asarray(self.data["image"])


@dataclass
class CasePrediction:
    """A case's tumour probabilities and the TTA views' standard deviation at each pixel on its input grid: one
    (x, y) array per slice of a slice folder, else one (x, y, z) volume; ``spread`` is None without TTA.
    ``members``: an ensemble's members' own probabilities, (M, x, y) per slice or (M, x, y, z); None otherwise."""

    prob: np.ndarray | list[np.ndarray]
    spread: np.ndarray | list[np.ndarray] | None
    members: np.ndarray | list[np.ndarray] | None = None


def load_for_case(kind: str, images: Sequence[str], spec: ModelSpec, series: Sequence[DicomSeries] = (),
                  primary: int = 0, fills: Mapping[str, str] | None = None) -> LoadedCase:
    """Read a case's inputs the way the predictor needs them (runs in a background thread, overlapping compute).

    Args:
        kind: the case's kind (``slices``, ``volume`` or ``dicom``).
        images: the slice files, or one path per channel (a file, or the folder of a DICOM series).
        spec: the model's settings.
        series: for DICOM, the series of each channel: exactly that series of its folder is read.
        primary: index of the primary channel among ``images``: the grid the others are resampled onto.
        fills: for a one-channel input, the channels it fills (model channel -> the role it plays).

    Raises:
        InputError: naming the file and the reason, also for errors raised inside MONAI's transforms.
        ValueError: when ``images`` is empty or ``series`` does not give one series per path.
    """
    try:
        return _load_for_case(kind, images, spec, series, primary, fills or {})
    except RuntimeError as error:
        cause = input_error_in(error)
        if cause is None:
            raise
        raise cause from error


def _load_for_case(kind: str, images: Sequence[str], spec: ModelSpec, series: Sequence[DicomSeries], primary: int,
                   fills: Mapping[str, str]) -> LoadedCase:
    if not images:
        raise ValueError("images must name at least one file or series folder but is empty.")
    if series and len(series) != len(images):
        raise ValueError(f"series must give one series per channel path ({len(images)}) but has {len(series)}.")
    if kind == "slices":
        if spec.spatial_dims != 2:
            raise InputError(images[0], "is a 2D image but the model is a 3D volume model")
        raw = [_fill_channels(_read_channel(path), spec, fills, path).as_tensor() for path in images]
        for path, image in zip(images, raw):
            _check_visible(image, path)
        # the case's statistics over all its slices (a slice alone: its own)
        stats = channel_statistics(raw) if spec.normalisation == "case" else None
        return LoadedCase(list(images), os.path.commonpath(list(images)), slices=normalise_images(raw, stats))
    source = os.path.commonpath(list(images))
    volume, resampled = _read_channels(images, series, spec, source, primary)
    volume = _fill_channels(volume, spec, fills, images[0])
    _check_visible(volume, source)
    if volume.ndim == 3 and spec.spatial_dims == 3:
        raise InputError(images[0], "is a 2D image but the model is a 3D volume model")
    if spec.spatial_dims == 3:
        preprocessing = _without_loading(infer_transforms(3, spec.pixdim, spec.normalisation))
        data = preprocessing({"image": volume})
        return LoadedCase(list(images), source, data=data, preprocessing=preprocessing, resampled=resampled)
    planar = volume.ndim == 3  # a 2D MHA/NRRD/NIfTI or a 2D image read as a volume case
    if planar:
        volume = _as_single_slice_volume(volume)
    return LoadedCase(list(images), source, volume=volume, planar=planar, resampled=resampled)
