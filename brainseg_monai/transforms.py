"""Transform presets shared by training, validation and inference, for 2D slices and 3D volumes.

Everything is MONAI dictionary transforms; files are read through :class:`brainseg_monai.io.SimpleITKReader`,
so every format the reader knows works here. ``spatial_dims`` switches between the 2D and 3D variants.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
from monai.data import ImageReader, get_track_meta, set_track_meta
from monai.transforms import (
    AsDiscreted,
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    FgBgToIndicesd,
    LoadImaged,
    MapTransform,
    NormalizeIntensity,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    Spacingd,
    SpatialPadd,
)

from brainseg_monai.io import SimpleITKReader

# Tumour-free slices are two thirds of LGG; for them the crop centres on brain, as intended, and MONAI would warn for
# every one of them, burying the training log.
warnings.filterwarnings("ignore", message="Num foregrounds 0", module="monai")

__all__ = [
    "LoadImageSITKd", "NormaliseCased", "PlainRandCropByPosNegLabeld", "case_statistics", "channel_statistics",
    "check_normalisation", "infer_transforms", "load_transforms", "normalise_with", "train_transforms", "val_transforms",
]


class LoadImageSITKd(LoadImaged):
    """``LoadImaged`` that reads only through :class:`SimpleITKReader`.

    MONAI's ``LoadImaged`` falls back to its other readers when the given reader raises, which would hide our
    errors (a truncated PNG reports Pillow's message; ``ITKReader`` silently picks one of several DICOM series).
    Passing the reader at call time has no fallback, so every error names the file and the reason.
    """

    def __init__(self, keys: Sequence[str] | str, image_only: bool = True, **reader_args) -> None:
        self.sitk_reader = SimpleITKReader(**reader_args)
        super().__init__(keys, reader=self.sitk_reader, image_only=image_only)

    def __call__(self, data: Mapping, reader: ImageReader | None = None) -> dict:
        """Load every key of ``data`` with SimpleITK (or ``reader``), as ``LoadImaged`` does."""
        return super().__call__(data, reader=reader or self.sitk_reader)


class PlainRandCropByPosNegLabeld(RandCropByPosNegLabeld):
    """MONAI's ``RandCropByPosNegLabeld`` with MetaTensor tracking off while it runs, for plain-tensor training items.

    Its crops build MetaTensor records of the transform even for plain tensors, which were about 40% of the training
    loader's time per batch (``brainseg benchmark``: 12 -> 7 ms a batch of 8 128x128 patches without them); the
    training pipeline drops that metadata right after anyway. The previous tracking setting is restored afterwards.
    MONAI's flag is process-wide, so this suits loaders in the main thread or in worker processes, which training uses.
    """

    def __call__(self, data: Mapping, lazy: bool | None = None) -> list[dict]:
        previous = get_track_meta()
        set_track_meta(False)
        try:
            return super().__call__(data, lazy)
        finally:
            set_track_meta(previous)


def _check_dims(spatial_dims: int, roi_size: Sequence[int] | None = None) -> None:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3 but is {spatial_dims!r}.")
    if roi_size is not None and len(roi_size) != spatial_dims:
        raise ValueError(f"roi_size must have {spatial_dims} entries for spatial_dims={spatial_dims} but is {list(roi_size)}.")


#: How intensities are z-scored: over each image's own brain pixels ("slice"), or over all images of the case (an LGG
#: patient's slices, a volume's slices) with statistics in ``norm_mean``/``norm_std`` ("case").
NORMALISATIONS = ("slice", "case")
STATS_KEYS = ("norm_mean", "norm_std")


def check_normalisation(normalisation: str) -> None:
    """Raise ``ValueError`` unless ``normalisation`` is one of ``NORMALISATIONS``."""
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS} but is {normalisation!r}.")


def channel_statistics(images: Sequence[torch.Tensor]) -> dict[str, list[float]]:
    """Per-channel mean and (population) std of the non-zero pixels of all ``images`` (each ``(C, *spatial)``).

    The statistics NormalizeIntensity(nonzero=True, channel_wise=True) takes from one image, pooled over a case.
    A channel with no non-zero pixel gets mean 0 and std 1.
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


def normalise_with(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """z-score the non-zero pixels of ``image`` (``(C, *spatial)``) with per-channel ``mean``/``std``; zeros stay 0."""
    shape = (-1,) + (1,) * (image.ndim - 1)
    m = torch.as_tensor(mean, dtype=image.dtype, device=image.device).view(shape)
    s = torch.as_tensor(std, dtype=image.dtype, device=image.device).view(shape)
    return torch.where(image != 0, (image - m) / s, image)


class NormaliseCased(MapTransform):
    """z-score the image with its case's per-channel statistics (``norm_mean``/``norm_std`` in the data).

    MONAI's ``NormalizeIntensityd`` takes fixed statistics or each image's own, not those of the case an image belongs
    to. Without the statistics in the data (an image given alone) the image's own are used, which is the same as
    ``NormalizeIntensityd(nonzero=True, channel_wise=True)``. The statistics keys are removed from the output.
    """

    def __init__(self, keys: Sequence[str] | str = "image") -> None:
        super().__init__(keys)
        self.own = NormalizeIntensity(nonzero=True, channel_wise=True)

    def __call__(self, data: Mapping) -> dict:
        """Normalised copy of ``data`` without the statistics keys."""
        d = dict(data)
        stats = {k: d.pop(k, None) for k in STATS_KEYS}
        for key in self.key_iterator(d):
            image = d[key]
            mean, std = stats[STATS_KEYS[0]], stats[STATS_KEYS[1]]
            if mean is None or std is None:  # an image alone
                d[key] = self.own(image)
                continue
            if len(mean) != image.shape[0] or len(std) != image.shape[0]:
                raise ValueError(f"case statistics have {len(mean)} channel(s) but the image has {image.shape[0]}.")
            d[key] = normalise_with(image, mean, std)
        return d


def case_statistics(items: Sequence[Mapping], spatial_dims: int = 2) -> list[dict]:
    """Copies of datalist ``items`` with their patient's per-channel ``norm_mean``/``norm_std`` (for "case").

    Items are grouped by ``case`` if they carry one, else by ``patient`` (an item with neither is its own case);
    each image is read once.
    """
    reader = Compose(load_transforms(spatial_dims, None, ("image",), normalisation=None))
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(str(item.get("case") or item.get("patient") or item["image"]), []).append(i)
    out = [dict(item) for item in items]
    for indices in groups.values():
        stats = channel_statistics([reader({"image": items[i]["image"]})["image"] for i in indices])
        for i in indices:
            out[i].update(stats)
    return out


def load_transforms(
    spatial_dims: int = 2,
    pixdim: Sequence[float] | None = None,
    keys: Sequence[str] = ("image", "label"),
    crop_foreground: bool = True,
    normalisation: str | None = "slice",
) -> list[MapTransform]:
    """Deterministic part: read, channel first, (3D) RAS orientation, spacing and brain crop, binary label, z-score.

    Labels become {0, 1} with ``label > 0`` semantics (BraTS labels 1-4 are whole tumour; LGG masks are {0, 255}).
    Intensities are z-scored per channel over non-zero voxels (the brain), so a constant slice maps to zeros.

    Args:
        spatial_dims: 2 for slice models, 3 for volume models.
        pixdim: target voxel spacing in mm for 3D (``None`` keeps the source spacing).
        keys: the image key first, then optionally the label key.
        crop_foreground: for 3D, crop to the bounding box of non-zero image voxels (inverted by ``Invertd``).
        normalisation: "slice" (each image's own statistics), "case" (``norm_mean``/``norm_std`` of the data, see
            :func:`case_statistics`), or None for raw intensities.
    """
    _check_dims(spatial_dims)
    if normalisation is not None:
        check_normalisation(normalisation)
    keys = list(keys)
    image_key, label_keys = keys[0], keys[1:]
    xforms: list[MapTransform] = [
        LoadImageSITKd(keys),
        EnsureChannelFirstd(keys),
        EnsureTyped(image_key, dtype="float32", track_meta=True),
    ]
    if spatial_dims == 3:
        # labels=None: axis names from the image's space (RAS, as SimpleITKReader returns it), MONAI's coming default
        xforms.append(Orientationd(keys, axcodes="RAS", labels=None))
        if pixdim is not None:
            modes = ["bilinear"] + ["nearest"] * len(label_keys)
            xforms.append(Spacingd(keys, pixdim=pixdim, mode=modes))
        if crop_foreground:
            xforms.append(CropForegroundd(keys, source_key=image_key, margin=4, allow_smaller=True))
    if label_keys:
        xforms.append(AsDiscreted(label_keys, threshold=0.5))
    if normalisation == "slice":
        xforms.append(NormalizeIntensityd(image_key, nonzero=True, channel_wise=True))
    elif normalisation == "case":
        xforms.append(NormaliseCased(image_key))
    return xforms


def train_transforms(
    spatial_dims: int = 2,
    roi_size: Sequence[int] = (128, 128),
    pixdim: Sequence[float] | None = None,
    pos_neg_ratio: float = 2.0,
    normalisation: str = "slice",
) -> Compose:
    """Training preset: the deterministic part, then tumour-centred crops; augmentation follows on the batch.

    Crops are centred on tumour ``pos_neg_ratio`` times as often as on brain without tumour, so tumour stays frequent
    even though most slices and most of each volume are tumour-free. The tumour and brain voxel indices are computed
    once, in the cached deterministic part (``FgBgToIndicesd``), which makes each crop about 3x cheaper; the crop
    only reads its input, so the bundle's ``CacheDataset`` hands out cached items without copying them
    (``copy_cache: false``; the copy was 40% of the loader's time). Flips,
    rotations, elastic deformation and intensity changes are done per sample but on whole batches, on the training
    device, by :class:`brainseg_monai.augment.AugmentBatch` (the bundle's ``train#prepare_batch``).

    Args:
        spatial_dims: 2 or 3.
        roi_size: training patch size; images smaller than it are zero-padded.
        pixdim: target voxel spacing for 3D, ``None`` keeps the source spacing.
        pos_neg_ratio: tumour-centred over background-centred crops.
        normalisation: "slice" or "case" (see :func:`load_transforms`).

    Raises:
        ValueError: when ``spatial_dims`` is not 2 or 3, ``roi_size`` has the wrong length or the ratio is negative.
    """
    _check_dims(spatial_dims, roi_size)
    if pos_neg_ratio < 0:
        raise ValueError(f"pos_neg_ratio must be >= 0 but is {pos_neg_ratio}.")
    keys = ["image", "label"]
    indices = ["label_fg_indices", "label_bg_indices"]  # FgBgToIndicesd's names
    roi = [int(r) for r in roi_size]
    xforms: list[MapTransform] = load_transforms(spatial_dims, pixdim, keys, normalisation=normalisation)
    xforms += [
        SpatialPadd(keys, spatial_size=roi),
        # background = every pixel without tumour: z-scored brain is negative in places, so "image > 0" could leave
        # a slice with no candidate at all (MONAI: "No sampling location available"); 3D volumes are cropped to the
        # head before this, so few background centres fall in air
        FgBgToIndicesd("label"),
        EnsureTyped(keys, dtype="float32", track_meta=False),  # crops of plain tensors skip MetaTensor's overhead
        PlainRandCropByPosNegLabeld(
            keys, label_key="label", spatial_size=roi, pos=pos_neg_ratio, neg=1.0, num_samples=1,
            fg_indices_key=indices[0], bg_indices_key=indices[1], allow_smaller=False,
        ),  # it pops the index keys
    ]
    return Compose(xforms)


def val_transforms(spatial_dims: int = 2, pixdim: Sequence[float] | None = None, normalisation: str = "slice") -> Compose:
    """Validation preset: the deterministic part only; whole images go through sliding-window inference."""
    return Compose(load_transforms(spatial_dims, pixdim, ("image", "label"), normalisation=normalisation))


def infer_transforms(
    spatial_dims: int = 2, pixdim: Sequence[float] | None = None, normalisation: str | None = "slice"
) -> Compose:
    """Inference preset: the deterministic part on the image alone, kept invertible for ``Invertd``."""
    return Compose(load_transforms(spatial_dims, pixdim, ("image",), normalisation=normalisation))
