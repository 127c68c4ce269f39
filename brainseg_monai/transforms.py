"""Transform presets shared by training, validation and inference, for 2D slices and 3D volumes.

Everything is MONAI dictionary transforms; files are read through :class:`brainseg_monai.io.SimpleITKReader`,
so every format the reader knows works here. ``spatial_dims`` switches between the 2D and 3D variants.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

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
    Orientationd,
    RandCropByPosNegLabeld,
    Spacingd,
    SpatialPadd,
)

from brainseg_monai.io import SimpleITKReader
from brainseg_monai.normalisation import ZScoreIntensityd

# Tumour-free slices are two thirds of LGG; for them the crop centres on brain, as intended, and MONAI would warn for
# every one of them, burying the training log.
warnings.filterwarnings("ignore", message="Num foregrounds 0", module="monai")

__all__ = [
    "LoadImageSITKd", "PlainRandCropByPosNegLabeld", "infer_transforms", "load_transforms", "train_transforms",
    "val_transforms",
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
            :func:`brainseg_monai.normalisation.case_statistics`), or None for raw intensities.
    """
    _check_dims(spatial_dims)
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
    if normalisation is not None:
        xforms.append(ZScoreIntensityd(image_key, normalisation))
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
