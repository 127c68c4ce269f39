"""Intensity normalisation: the z-score that training and inference both apply, per image or per case.

A model's ``normalisation`` (:class:`~brainseg_monai.model.ModelSpec`) says which statistics z-score an image:

- "slice": each channel of each image over its own non-zero pixels (the brain), as MONAI's
  ``NormalizeIntensity(nonzero=True, channel_wise=True)`` does;
- "case": each channel with the statistics of all images of the case (an LGG patient's slices, a volume's slices),
  carried by training items as ``norm_mean``/``norm_std`` (:func:`case_statistics`).

:func:`zscore` is the one implementation: training runs it through :class:`ZScoreIntensityd` in the transform
presets, inference on stacks of slices through :func:`normalise_images` and :func:`normalise_slices`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type, convert_to_tensor

__all__ = [
    "NORMALISATIONS", "STATS_KEYS", "ZScoreIntensityd", "case_statistics", "channel_statistics",
    "check_normalisation", "normalise_images", "normalise_slices", "shape_chunks", "zscore",
]

#: How intensities are z-scored: over each image's own brain pixels ("slice"), or over all images of the case (an LGG
#: patient's slices, a volume's slices) with statistics in ``norm_mean``/``norm_std`` ("case").
NORMALISATIONS = ("slice", "case")
STATS_KEYS = ("norm_mean", "norm_std")
#: images z-scored in one stacked pass by normalise_images (64 LGG slices: 50 MB a copy, a few copies at a time)
_CHUNK = 64


def check_normalisation(normalisation: str) -> None:
    """Raise ``ValueError`` unless ``normalisation`` is one of ``NORMALISATIONS``."""
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS} but is {normalisation!r}.")


def channel_statistics(images: Sequence[torch.Tensor]) -> dict[str, list[float]]:
    """Per-channel mean and (population) std of the non-zero pixels of all ``images`` (each ``(C, *spatial)``).

    The statistics :func:`zscore` takes from one image, pooled over a case. A channel with no non-zero pixel gets
    mean 0 and std 1.

    Raises:
        ValueError: when ``images`` is empty.
    """
    total = count = square = None
    for image in images:
        planes = torch.as_tensor(image).detach().double().flatten(1)
        mask = planes != 0
        values = torch.where(mask, planes, 0.0)
        sums, squares, counts = values.sum(1), values.square().sum(1), mask.sum(1)
        total = sums if total is None else total + sums
        square = squares if square is None else square + squares
        count = counts if count is None else count + counts
    if total is None:
        raise ValueError("channel_statistics needs at least one image.")
    n = count.clamp_min(1).double()
    mean = total / n
    std = (square / n - mean.square()).clamp_min(0).sqrt()
    std = torch.where(std == 0, 1.0, std)
    return {STATS_KEYS[0]: mean.tolist(), STATS_KEYS[1]: std.tolist()}


def zscore(images: torch.Tensor, stats: Mapping[str, Sequence[float]] | None = None,
           where: torch.Tensor | None = None) -> torch.Tensor:
    """z-score each channel of each ``(N, C, *spatial)`` float image over its non-zero pixels; zeros stay 0.

    ``where`` (boolean, ``(N, 1 or C, *spatial)``) names the pixels to z-score over instead of the non-zero ones; the
    others keep their values (the skull-strip augmentation z-scores a slice over its brain alone, as a
    skull-stripped image is at inference).

    With ``stats`` (``norm_mean``/``norm_std`` per channel, see :func:`channel_statistics`) every image is z-scored
    with those instead: the "case" normalisation. Without, it equals MONAI's ``NormalizeIntensity(nonzero=True,
    channel_wise=True)`` on each image (population std, 1 where it is 0, all-zero channels unchanged), computed for
    the whole stack in one vectorised pass: MONAI's transform loops over channels and masks by indexing, which cost
    about half of reading and pre-processing an LGG slice (``brainseg benchmark``).

    Raises:
        ValueError: when ``stats`` does not hold one mean and one std per channel.
    """
    if stats is not None:
        mean, std = stats[STATS_KEYS[0]], stats[STATS_KEYS[1]]
        if len(mean) != images.shape[1] or len(std) != images.shape[1]:
            raise ValueError(f"case statistics have {len(mean)} mean(s) and {len(std)} std(s) but the images have "
                             f"{images.shape[1]} channel(s).")
        shape = (1, -1) + (1,) * (images.ndim - 2)
        m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(shape)
        s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(shape)
        return torch.where(images != 0, (images - m) / s, images)
    dims = tuple(range(2, images.ndim))
    mask = images != 0 if where is None else where.expand_as(images)
    count = mask.sum(dims, keepdim=True).clamp_min(1)
    own_mean = torch.where(mask, images, 0.0).sum(dims, keepdim=True) / count
    own_std = (torch.where(mask, images - own_mean, 0.0).square().sum(dims, keepdim=True) / count).sqrt()
    own_std = torch.where(own_std == 0, 1.0, own_std)
    return torch.where(mask, (images - own_mean) / own_std, images)


def normalise_slices(volume: torch.Tensor, stats: Mapping[str, Sequence[float]] | None = None) -> torch.Tensor:
    """(C, x, y, z) volume -> (z, C, x, y) slices, each z-scored by :func:`zscore` (or with the case's ``stats``).

    One pass over the volume: MONAI's transform per slice on a strided view cost 20-30 ms a slice, this ~6 ms.
    """
    return zscore(volume.float().permute(3, 0, 1, 2).contiguous(), stats)


def normalise_images(images: Sequence[torch.Tensor], stats: Mapping[str, Sequence[float]] | None = None
                     ) -> list[torch.Tensor]:
    """(C, x, y) raw images -> z-scored by :func:`zscore`, equal-sized ones stacked into one pass.

    Through ``Compose``, MONAI's ``NormalizeIntensity`` per image cost about 3 ms of a 256x256 LGG slice's 6 ms of
    reading and pre-processing (``brainseg benchmark``); stacked, a case's slices take one vectorised pass.
    """
    out: list[torch.Tensor | None] = [None] * len(images)
    for chunk in shape_chunks(images, _CHUNK):  # bounded memory for folders of many large images
        normalised = zscore(torch.stack([torch.as_tensor(images[i]).float() for i in chunk]), stats)
        for i, image in zip(chunk, normalised):
            out[i] = image
    return out  # type: ignore[return-value]


def shape_chunks(images: Sequence[torch.Tensor], size: int) -> Iterator[list[int]]:
    """Indices of ``images`` in chunks of at most ``size`` images of one shape (each chunk stacks into a batch)."""
    by_shape: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(tuple(image.shape), []).append(i)
    for indices in by_shape.values():
        for start in range(0, len(indices), size):
            yield indices[start:start + size]


class ZScoreIntensityd(MapTransform):
    """z-score each key's ``(C, *spatial)`` image by :func:`zscore` as the model's ``normalisation`` says.

    "slice" takes the image's own statistics. "case" takes its case's ``norm_mean``/``norm_std`` from the data
    (:func:`case_statistics`), which MONAI's ``NormalizeIntensityd`` cannot (it takes fixed statistics or each
    image's own), and removes them from the output; an image without them (given alone: a case of its own) takes its
    own. The image keeps its metadata, so ``Invertd`` still undoes the spatial transforms before it.
    """

    def __init__(self, keys: KeysCollection, normalisation: str = "slice") -> None:
        """
        Args:
            keys: the image keys.
            normalisation: "slice" or "case".

        Raises:
            ValueError: for a ``normalisation`` other than "slice" or "case".
        """
        super().__init__(keys)
        check_normalisation(normalisation)
        self.normalisation = normalisation

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """A copy of ``data`` with every key's image z-scored (for "case", without the statistics keys)."""
        d = dict(data)
        stats = None
        if self.normalisation == "case":
            found = {k: d.pop(k, None) for k in STATS_KEYS}
            stats = found if all(v is not None for v in found.values()) else None
        for key in self.key_iterator(d):
            image = d[key]
            values = convert_to_tensor(image, dtype=torch.float32, track_meta=False)
            d[key] = convert_to_dst_type(zscore(values[None], stats)[0], image, dtype=torch.float32)[0]
        return d


def case_statistics(items: Sequence[Mapping], read: Callable[[Any], torch.Tensor]) -> list[dict]:
    """Copies of datalist ``items`` with their case's per-channel ``norm_mean``/``norm_std`` (for "case").

    Items are grouped by ``case`` if they carry one, else by ``patient`` (an item with neither is its own case);
    ``read`` gives the raw ``(C, *spatial)`` image of an item's ``image``, called once per item.
    """
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(str(item.get("case") or item.get("patient") or item["image"]), []).append(i)
    out = [dict(item) for item in items]
    for indices in groups.values():
        stats = channel_statistics([read(items[i]["image"]) for i in indices])
        for i in indices:
            out[i].update(stats)
    return out
