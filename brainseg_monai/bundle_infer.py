"""The pieces ``bundle/configs/inference.json`` and ``evaluate.json`` compose into MONAI's inference workflow.

MONAI's tools (``ConfigWorkflow``, ``monai.bundle run``, ``ckpt_export``, MONAI Label, MONAI Deploy) run a bundle as
``preprocessing`` -> ``inferer`` -> ``postprocessing`` over the items of a ``dataset``. These are that pipeline for a
2D model (and the inferer and post-processing for a 3D one, which ``evaluate.json`` scores), built from the library
code ``brainseg infer`` runs, so that both write the same masks:

- the items are the cases ``brainseg infer`` finds (:func:`case_items`), or a datalist's slices grouped by patient
  (:func:`patient_stacks`): a folder of slices is one item, read as one (C, x, y, z) stack
  (:class:`SliceStackReader`), so that its case statistics and the post-processing of its stacked slices are those
  of the case;
- :class:`NormaliseSlicesd` z-scores each slice, or every slice with the case's statistics, with
  :func:`~brainseg_monai.normalisation.normalise_images`;
- :class:`PredictorInferer` predicts with :class:`~brainseg_monai.inference.predictor.Predictor` (padding, batched
  dihedral TTA, the forward's precision), slice by slice in chunks of ``batch_size`` as ``brainseg infer`` does;
- :class:`PostProcessd` applies the model's stored
  :class:`~brainseg_monai.inference.postprocess.PostProcessing` (threshold, largest component of a patient's stacked
  slices); :class:`SaveMasksd` writes the masks where ``brainseg infer`` writes them.

Where ``brainseg infer`` does more, the bundle leaves the case out (DICOM studies, one-channel inputs given to a
multi-channel model) or differs: a volume given to a 2D model is neither resampled to the model's pixel size nor
spared its noise-only slices, and a volume's channel files must share one grid.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from monai.config import KeysCollection
from monai.data import ImageReader, MetaTensor
from monai.inferers import Inferer
from monai.transforms import LoadImaged, MapTransform
from monai.utils import convert_to_dst_type

from brainseg_monai import synth
from brainseg_monai.channel_roles import InputRoles
from brainseg_monai.errors import InputError
from brainseg_monai.inference.cases import discover_cases
from brainseg_monai.inference.postprocess import PostProcessing
from brainseg_monai.inference.predictor import Predictor
from brainseg_monai.inference.outputs import VOLUME_MASK, slice_output_names
from brainseg_monai.inference.writers import write_png_mask, write_volume_mask
from brainseg_monai.io import SimpleITKReader, file_stem, planar_to_volume_affine
from brainseg_monai.model import ModelSpec
from brainseg_monai.normalisation import ZScoreIntensityd, channel_statistics, normalise_images

__all__ = [
    "LoadSliceStackd", "NormaliseSlicesd", "PostProcessd", "PredictorInferer", "SaveMasksd", "SliceStackReader",
    "case_items", "check_2d_model", "patient_stacks",
]

logger = logging.getLogger(__name__)

#: the data key listing the 2D image files of an item, in the order of its stack's last axis
SLICE_FILES = "slice_files"
#: the data key naming an item's case: the folder its masks are written to
CASE = "case"


def check_2d_model(spec: ModelSpec) -> None:
    """Refuse a 3D model: the bundle's inference pipeline predicts 2D models (``brainseg infer`` runs both).

    Raises:
        ValueError: when ``spec`` is a 3D model.
    """
    if spec.spatial_dims != 2:
        raise ValueError(f"configs/inference.json runs 2D models but this model is {spec.spatial_dims}D "
                         f"({spec.network_name}); segment with brainseg infer --checkpoint instead.")


def case_items(dataset_dir: str | os.PathLike, spec: ModelSpec) -> list[dict]:
    """The cases ``brainseg infer`` finds under ``dataset_dir``, as items of the bundle's dataset.

    A folder of 2D images (an LGG patient) or one 2D image is an item with its files in ``image`` (one stack, see
    :class:`SliceStackReader`) and ``slice_files``; a volume is an item whose ``image`` is its file, or one file per
    model channel (a channel filled from another repeats that file). ``case`` is the case id, the folder of its
    masks. Cases ``brainseg infer`` would report as failed, DICOM studies (whose series ``brainseg infer`` picks and
    resamples onto one grid) and one-channel inputs given to a multi-channel model are left out, each named in the
    log. An empty ``dataset_dir`` means the embedded synthetic LGG phantoms (as for training).

    Raises:
        InputError: when nothing under ``dataset_dir`` can be segmented this way.
    """
    if not dataset_dir:
        dataset_dir = synth.default_dataset("lgg")
        logger.info("no dataset_dir given: segmenting the synthetic LGG phantoms in %s", dataset_dir)
    items = []
    for case in discover_cases([dataset_dir], InputRoles.of(spec)):
        reason = case.error or ("a DICOM study: use brainseg infer" if case.kind == "dicom" else None) or (
            "a one-channel input for a multi-channel model: use brainseg infer --channel" if case.fills else None)
        if reason:
            logger.warning("%s left out: %s", case.source, reason)
            continue
        item = {"image": list(case.images) if len(case.images) > 1 else case.images[0], CASE: case.case_id}
        if case.kind == "slices":
            item[SLICE_FILES] = list(case.images)
        items.append(item)
    if not items:
        raise InputError(dataset_dir, "holds no case the bundle can segment (see the log for the cases left out)")
    return items


def patient_stacks(items: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Datalist items of 2D slices grouped into one item per patient, the unit ``brainseg infer`` predicts.

    The group is an item's ``case``, else its ``patient`` (an item with neither is its own), as for the case
    statistics of training. Each item keeps the group's keys with list values for ``image`` and ``label``, and
    ``slice_files`` (the images), in the datalist's order.
    """
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for item in items:
        groups.setdefault(str(item.get(CASE) or item.get("patient") or item["image"]), []).append(item)
    stacks = []
    for name, members in groups.items():
        stack = {key: [member[key] for member in members] for key in ("image", "label") if key in members[0]}
        stacks.append({**stack, CASE: name, SLICE_FILES: [str(member["image"]) for member in members]})
    return stacks


class SliceStackReader(SimpleITKReader):
    """:class:`~brainseg_monai.io.SimpleITKReader` that reads 2D images as a stack of slices along a new last axis.

    One 2D file, or a list of them (one patient's slices), becomes one (x, y, z[, components]) array whose affine
    keeps the in-plane geometry of the first with unit spacing along z: the layout ``brainseg infer`` gives a 2D
    image it treats as a volume, so that every input of a 2D model is a stack of axial slices. Volumes are read as by
    the parent (a list of them stacked as channels).
    """

    def get_data(self, img: sitk.Image | Sequence[sitk.Image]) -> tuple[np.ndarray, dict]:
        """Array and metadata of 2D images stacked along z, or of volumes as the parent reads them.

        Raises:
            InputError: when the 2D images differ in size.
        """
        images = [img] if isinstance(img, sitk.Image) else list(img)
        if any(image.GetDimension() != 2 for image in images):
            return super().get_data(img)
        sizes = sorted({image.GetSize() for image in images})
        if len(sizes) > 1:
            first = images[0].GetMetaData("filename_or_obj") if images[0].HasMetaDataKey("filename_or_obj") else ""
            raise InputError(Path(first).parent if first else None,
                             f"holds 2D images of different sizes {sizes}, which do not stack into one case "
                             f"(brainseg infer predicts them)")
        arrays, meta = zip(*(super(SliceStackReader, self).get_data(image) for image in images))
        header = dict(meta[0])
        affine = planar_to_volume_affine(header["affine"])
        stacked = np.stack(arrays, axis=2)
        header.update(affine=affine, original_affine=affine.copy(), spatial_shape=np.asarray(stacked.shape[:3]))
        return stacked, header


class LoadSliceStackd(LoadImaged):
    """``LoadImaged`` reading through :class:`SliceStackReader` only.

    As :class:`brainseg_monai.transforms.LoadImageSITKd`, the reader is given at call time, so MONAI's other readers
    never take over a file ours refuses (their errors would hide the reason).

    Args:
        keys: the keys to load (a file, or a list of files, each).
        image_only: return MetaTensors without separate metadata dictionaries.
    """

    def __init__(self, keys: KeysCollection, image_only: bool = True) -> None:
        self.stack_reader = SliceStackReader()
        super().__init__(keys, reader=self.stack_reader, image_only=image_only)

    def __call__(self, data: Mapping, reader: ImageReader | None = None) -> dict:
        """Load every key of ``data``: 2D files as one stack of slices, a volume, or volume channel files."""
        return super().__call__(data, reader=reader or self.stack_reader)


class NormaliseSlicesd(ZScoreIntensityd):
    """z-score a 2D model's input as ``brainseg infer`` does: per channel over the non-zero pixels of each slice.

    A (C, x, y, z) stack is z-scored slice by slice along its last axis, a (C, x, y) image as one slice, by
    :func:`~brainseg_monai.normalisation.normalise_images` on its slices, the call ``brainseg infer`` makes on
    a case's slices; with ``normalisation="case"`` every slice takes the statistics of all slices of the item
    (:func:`~brainseg_monai.normalisation.channel_statistics`), those of the case when the item is a case. The image
    keeps its metadata. Its arguments are :class:`~brainseg_monai.normalisation.ZScoreIntensityd`'s.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """A copy of ``data`` with every key's image z-scored."""
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            values = torch.as_tensor(image)
            planes = list(values.unbind(-1)) if values.ndim == 4 else [values]
            stats = channel_statistics(planes) if self.normalisation == "case" else None
            normalised = torch.stack(normalise_images(planes, stats), dim=-1)
            d[key] = convert_to_dst_type(normalised if values.ndim == 4 else normalised[..., 0], image)[0]
        return d


class PredictorInferer(Inferer):
    """Tumour probabilities by ``brainseg infer``'s :class:`~brainseg_monai.inference.predictor.Predictor`.

    A 2D model predicts each (C, x, y) image of the batch in one forward (padded to a size the network takes, all
    TTA views in one stacked batch), and a (C, x, y, z) stack slice by slice, ``batch_size`` slices a forward: the
    chunks of ``brainseg infer``. A 3D model predicts each (C, x, y, z) volume whole, by a Gaussian sliding window
    when it exceeds the training patch. Returns ``(B, 1, *spatial)`` float32 probabilities on the inputs' device
    (where the evaluator's labels are): the sigmoid averaged over the TTA views (probabilities, not logits, are
    averaged), so the post-processing thresholds them directly.

    Args:
        spec: the model's settings.
        tta: ``"none"``, ``"flip"`` or ``"dihedral"``.
        batch_size: 2D slices per forward (each times the TTA views); the sliding window's batch for a 3D model.
        precision: ``"fp32"``, ``"bf16"`` or ``"auto"`` (see :func:`~brainseg_monai.inference.predictor.fast_path`).
    """

    def __init__(self, spec: ModelSpec, tta: str = "dihedral", batch_size: int = 16, precision: str = "auto") -> None:
        super().__init__()
        self.spec, self.tta, self.batch_size, self.precision = spec, tta, int(batch_size), precision

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, **kwargs: Any) -> MetaTensor:
        """Probabilities of ``network`` (its current weights, copied) on a (B, C, x, y[, z]) batch.

        Raises:
            InputError: when a 2D image has another number of channels than the model (the message names it).
            ValueError: for a batch whose spatial dimensions a model of ``spec.spatial_dims`` cannot take.
        """
        spatial = inputs.ndim - 2
        if spatial != self.spec.spatial_dims and not (self.spec.spatial_dims == 2 and spatial == 3):
            raise ValueError(f"inputs of shape {tuple(inputs.shape)} do not fit a {self.spec.spatial_dims}D model (2D: "
                             f"(B, C, x, y) images or (B, C, x, y, z) stacks of slices; 3D: (B, C, x, y, z) volumes).")
        predictor = Predictor(network, self.spec, inputs.device, self.tta, self.batch_size, precision=self.precision,
                              spread=False)
        if self.spec.spatial_dims == 3:
            return MetaTensor(predictor.predict_batch(torch.as_tensor(inputs)).to(inputs.device))
        probs = []
        for image in inputs:
            source = str(image.meta.get("filename_or_obj", "")) if isinstance(image, MetaTensor) else ""
            planes = list(torch.as_tensor(image).unbind(-1)) if spatial == 3 else [torch.as_tensor(image)]
            prob = np.stack([maps[0] for maps in predictor.predict_slices(planes, [source] * len(planes))], axis=-1)
            probs.append(torch.as_tensor(prob if spatial == 3 else prob[..., 0]))
        return MetaTensor(torch.stack(probs)[:, None].to(inputs.device))


class PostProcessd(MapTransform):
    """Probabilities -> float32 {0, 1} masks by a model's :class:`~brainseg_monai.inference.postprocess.PostProcessing`.

    An item listing its 2D files in ``slice_files`` (one per slice of its stack) is post-processed as ``brainseg
    infer`` post-processes a folder of slices, :meth:`PostProcessing.apply_to_slices`: with ``stack_slices`` each
    patient's numbered slices as one volume, other slices one by one. Anything else (a volume, an image) is
    post-processed whole. The channel axis stays; the metadata of a MetaTensor too.

    Args:
        keys: the probability keys (one channel).
        postprocessing: the steps, e.g. a model's :attr:`~brainseg_monai.model.ModelSpec.postprocessor`.
    """

    def __init__(self, keys: KeysCollection, postprocessing: PostProcessing) -> None:
        super().__init__(keys)
        self.postprocessing = postprocessing

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """A copy of ``data`` with every key's probabilities replaced by the mask."""
        d = dict(data)
        files = d.get(SLICE_FILES) or []
        for key in self.key_iterator(d):
            prob = np.asarray(torch.as_tensor(d[key]).detach().cpu()[0], dtype=np.float32)
            if prob.ndim == 3 and len(files) == prob.shape[-1]:
                mask = np.stack(self.postprocessing.apply_to_slices(list(np.moveaxis(prob, -1, 0)), files), axis=-1)
            else:
                mask = self.postprocessing(prob)
            d[key] = convert_to_dst_type(mask[None], d[key], dtype=torch.float32)[0]
        return d


class SaveMasksd(MapTransform):
    """Write masks where ``brainseg infer`` writes them: ``output_dir/<case>/<stem>_pred.png`` (0/255, the image's
    pixel grid) for each 2D image of an item with ``slice_files``, else ``output_dir/<case>/mask.nii.gz`` on the grid
    of the source volume (the mask must be on it: after ``Invertd``). ``<case>`` is the item's ``case``, else the
    stem of its image file.

    Args:
        keys: the mask keys ({0, 1}, one channel).
        output_dir: the folder of the case folders.
        image_key: the image whose metadata gives a volume's source affine (``original_affine``) and file.
    """

    def __init__(self, keys: KeysCollection, output_dir: str | os.PathLike, image_key: str = "image") -> None:
        super().__init__(keys)
        self.output_dir, self.image_key = Path(output_dir), image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Write every key's mask; ``data`` is returned unchanged."""
        d = dict(data)
        for key in self.key_iterator(d):
            mask = np.asarray(torch.as_tensor(d[key]).detach().cpu()[0]).astype(np.uint8)
            meta = d[self.image_key].meta
            folder = self.output_dir / str(d.get(CASE) or file_stem(meta["filename_or_obj"]))
            files = d.get(SLICE_FILES) or []
            if files:
                planes = np.moveaxis(mask, -1, 0) if mask.ndim == 3 else [mask]
                for path, name, plane in zip(files, slice_output_names(files), planes):
                    write_png_mask(plane, folder / name, reference=path)
            else:
                write_volume_mask(mask, meta["original_affine"], folder / VOLUME_MASK,
                                  reference=meta["filename_or_obj"])
        return d
