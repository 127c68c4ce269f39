"""Post-processing of a probability map into a binary mask: threshold, size-adaptive opening, small-component removal.

The numbered slices of one patient (``<patient>_<n>.<ext>``, as in an LGG patient folder) can be post-processed as one
stacked volume (``stack_slices``), so that components are 3D: a blob on a slice far from the tumour is then a
separate, small component that ``keep_largest`` or ``min_size`` removes, as in Buda et al.'s 3D largest-component step.

Connected components are labelled once per step with ``skimage.measure.label`` rather than with MONAI's
``RemoveSmallObjects``: that transform passes skimage 0.26's deprecated ``min_size`` argument (a warning on every call)
and fails on ``connectivity=None`` despite documenting it; one labelling also serves size filtering, ``keep_largest``
and the choice of which components to open.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from skimage.measure import label
from skimage.morphology import ball, disk, opening

__all__ = ["PostProcessing", "postprocess", "slice_stacks"]

logger = logging.getLogger(__name__)

_NUMBERED_SLICE = re.compile(r"^(?P<patient>.+)_(?P<n>\d+)$")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


@dataclass(frozen=True)
class PostProcessing:
    """
    Turns a 2D or 3D probability map into a uint8 {0, 1} mask, in this order:

    1. threshold: ``prob >= threshold`` (the same comparison as MONAI's ``AsDiscrete(threshold=...)``);
    2. size-adaptive opening: a binary opening with a disk (2D) or ball (3D) of radius ``open_radius`` voxels, applied
       only to components larger than ``open_above`` voxels, so it trims spurs and bridges from large tumours while
       small tumours, which an opening would erase, are left untouched (``open_above=None`` disables it);
    3. components smaller than ``min_size`` voxels are removed (including fragments the opening split off);
    4. with ``keep_largest``, only the largest component is kept (of equal largest ones, the first in array order);
       with ``keep_fraction`` instead, the components whose probability mass (the sum of their voxels' probabilities)
       is at least that fraction of the heaviest component's: a small tumour the model is sure of then survives a
       larger, fainter false positive, which ``keep_largest`` would keep in its place.

    With ``stack_slices``, :meth:`apply_to_slices` runs these steps once on each patient's numbered 2D slices stacked
    in slice order (`slice_stacks`), so components, ``min_size`` and the opening's ball are 3D, counted in voxels of
    the stack; other slices are post-processed one by one.

    The settings are stored with a model (``to_dict`` / ``from_dict``), so inference reproduces the tuned threshold.

    Args:
        threshold: probability at or above which a voxel is foreground, in (0, 1).
        min_size: components with fewer voxels are removed, >= 0 (0 keeps all).
        open_above: components with more voxels are opened, >= 0; ``None`` opens none.
        open_radius: radius in voxels of the opening's disk or ball, >= 1.
        keep_largest: keep only the largest component (after the other steps).
        keep_fraction: keep the components whose probability mass is at least this fraction of the heaviest one's,
            in (0, 1]; ``None`` keeps all. Not together with ``keep_largest``.
        connectivity: neighbourhood of a connected component, as in ``skimage.measure.label``: the number of
            orthogonal hops, 1 (faces) up to the image's number of dimensions; ``None`` means full connectivity
            (8 in 2D, 26 in 3D).
        stack_slices: post-process the numbered 2D slices of one patient as one stacked volume
            (:meth:`apply_to_slices`); off, each slice on its own. Volumes are 3D either way.

    Raises:
        ValueError: When an argument is out of its range or of the wrong type; the message names it.
    """

    threshold: float = 0.5
    min_size: int = 0
    open_above: int | None = None
    open_radius: int = 1
    keep_largest: bool = False
    connectivity: int | None = None
    stack_slices: bool = False
    keep_fraction: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float, np.floating)):
            raise ValueError(f"threshold must be a number in (0, 1), got {self.threshold!r}.")
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold!r}.")
        if not _is_int(self.min_size) or self.min_size < 0:
            raise ValueError(f"min_size must be an integer >= 0, got {self.min_size!r}.")
        if self.open_above is not None and (not _is_int(self.open_above) or self.open_above < 0):
            raise ValueError(f"open_above must be None or an integer >= 0, got {self.open_above!r}.")
        if not _is_int(self.open_radius) or self.open_radius < 1:
            raise ValueError(f"open_radius must be an integer >= 1, got {self.open_radius!r}.")
        for name in ("keep_largest", "stack_slices"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}.")
        if self.connectivity is not None and (not _is_int(self.connectivity) or self.connectivity < 1):
            raise ValueError(f"connectivity must be None or an integer >= 1, got {self.connectivity!r}.")
        if self.keep_fraction is not None:
            if isinstance(self.keep_fraction, bool) or not isinstance(self.keep_fraction, (int, float, np.floating)) \
                    or not 0 < self.keep_fraction <= 1:
                raise ValueError(f"keep_fraction must be None or a number in (0, 1], got {self.keep_fraction!r}.")
            if self.keep_largest:
                raise ValueError("keep_largest and keep_fraction both choose which components to keep: set one.")
            object.__setattr__(self, "keep_fraction", float(self.keep_fraction))
        # plain Python types, so to_dict() is JSON-serialisable whatever numpy scalars were given
        object.__setattr__(self, "threshold", float(self.threshold))
        object.__setattr__(self, "keep_largest", bool(self.keep_largest))
        object.__setattr__(self, "stack_slices", bool(self.stack_slices))
        for name in ("min_size", "open_above", "open_radius", "connectivity"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, int(getattr(self, name)))

    @classmethod
    def from_dict(cls, settings: dict[str, Any]) -> PostProcessing:
        """Settings from a dict such as the one stored with a model; missing keys take the defaults.

        Raises:
            ValueError: When ``settings`` has a key that is not a setting (the message lists the valid ones), or a
                value is out of range.
        """
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(settings) - set(names))
        if unknown:
            raise ValueError(f"settings has unknown keys {unknown}; valid keys are {names}.")
        return cls(**settings)

    def describe(self, stacked: bool | None = None) -> str:
        """The steps after the threshold in words, so a page or report can say what was done to the mask.

        Args:
            stacked: for one case, whether its slices were post-processed as a stack (``stack_slices`` and several
                numbered slices of one patient, `slice_stacks`): a lone image or a volume was not, and its
                description does not say so. None: the settings in general.
        """
        steps = []
        if self.open_above is not None:
            steps.append(f"components over {self.open_above} voxels opened (radius {self.open_radius})")
        if self.min_size:
            steps.append(f"components under {self.min_size} voxels removed")
        if self.keep_largest:
            steps.append("largest component kept")
        if self.keep_fraction is not None:
            steps.append(f"components under {self.keep_fraction:g} of the heaviest's probability mass removed")
        if not steps:
            return "none"
        as_stack = self.stack_slices if stacked is None else self.stack_slices and stacked
        return "; ".join(steps) + (" (a patient's numbered slices as one stack)" if as_stack else "")

    def to_dict(self) -> dict[str, Any]:
        """Settings as a JSON-serialisable dict (inverse of :meth:`from_dict`)."""
        return asdict(self)

    def __call__(self, prob: np.ndarray) -> np.ndarray:
        """
        Args:
            prob: probabilities, shape ``HW`` or ``HWD`` (no channel axis).

        Returns:
            uint8 mask of the same shape, values {0, 1}.

        Raises:
            ValueError: When ``prob`` is not 2D or 3D, or ``connectivity`` exceeds its number of dimensions.
        """
        prob = np.asarray(prob)
        if prob.ndim not in (2, 3):
            raise ValueError(f"prob must be a 2D or 3D array without channel axis, got shape {prob.shape}.")
        if self.connectivity is not None and self.connectivity > prob.ndim:
            raise ValueError(
                f"connectivity must be at most the number of dimensions ({prob.ndim}) of prob, got {self.connectivity}."
            )
        mask = prob >= self.threshold
        if self.open_above is not None:
            labels, sizes = self._components(mask)
            large = np.isin(labels, np.flatnonzero(sizes > self.open_above))
            if large.any():
                footprint = disk(self.open_radius) if mask.ndim == 2 else ball(self.open_radius)
                mask = (mask & ~large) | opening(large, footprint)
        if self.min_size > 0 or self.keep_largest or self.keep_fraction is not None:
            labels, sizes = self._components(mask)
            keep = sizes >= self.min_size
            keep[0] = False
            if self.keep_largest:
                keep &= np.arange(len(sizes)) == np.argmax(sizes)
            if self.keep_fraction is not None and keep.any():
                mass = np.bincount(labels.ravel(), weights=prob.ravel(), minlength=len(sizes)) * keep
                keep &= mass >= self.keep_fraction * mass.max()
            mask = keep[labels]
        return mask.astype(np.uint8)

    def apply_to_slices(self, probs: Sequence[np.ndarray], paths: Sequence[str | Path]) -> list[np.ndarray]:
        """Masks of 2D probability maps: with ``stack_slices``, each stack of `slice_stacks` (one patient's numbered
        slices of one size) is post-processed as one volume; every other map, and all without it, one by one.

        Args:
            probs: 2D probability maps.
            paths: the image file of each map, whose name says which patient and slice it is.

        Raises:
            ValueError: When a map is not 2D, or ``paths`` does not match ``probs`` one to one.
        """
        if len(paths) != len(probs):
            raise ValueError(f"got {len(probs)} probability maps but {len(paths)} paths.")
        for path, prob in zip(paths, probs):
            if np.ndim(prob) != 2:
                raise ValueError(f"{path}: apply_to_slices takes 2D maps, got shape {np.shape(prob)}.")
        masks: list[np.ndarray | None] = [None] * len(probs)
        for stack in slice_stacks(paths) if self.stack_slices else []:
            shapes = {np.shape(probs[i]) for i in stack}
            if len(shapes) > 1:
                logger.warning("%s: slices of different sizes %s are post-processed one by one",
                               Path(paths[stack[0]]).parent, sorted(shapes))
                continue
            for i, mask in zip(stack, self(np.stack([np.asarray(probs[i]) for i in stack]))):
                masks[i] = mask
        return [self(prob) if mask is None else mask for prob, mask in zip(probs, masks)]

    def _components(self, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Component labels of ``mask`` and the voxel count of each label (0 for the background label 0)."""
        labels = label(mask, connectivity=self.connectivity)
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        return labels, sizes


def slice_stacks(paths: Sequence[str | Path]) -> list[list[int]]:
    """Indices of ``paths`` grouped into stacks of one patient's numbered slices (``<patient>_<n>.<ext>`` in one
    folder, two or more), each in slice-number order. Other files (``12.png``, a lone slice) are in no stack, so a
    folder of unrelated images is never post-processed as one volume."""
    groups: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for index, path in enumerate(paths):
        path = Path(path)
        match = _NUMBERED_SLICE.match(path.stem)
        if match:
            groups.setdefault((str(path.parent), match["patient"]), []).append((int(match["n"]), index))
    return [[index for _, index in sorted(members)] for members in groups.values() if len(members) > 1]


def postprocess(
    prob: np.ndarray,
    threshold: float = 0.5,
    min_size: int = 0,
    open_above: int | None = None,
    open_radius: int = 1,
    connectivity: int | None = None,
    keep_largest: bool = False,
    keep_fraction: float | None = None,
) -> np.ndarray:
    """uint8 {0, 1} mask of a 2D or 3D probability map; see :class:`PostProcessing` for the steps and arguments.

    Raises:
        ValueError: When an argument is out of range (the message names it) or ``prob`` is not 2D or 3D.
    """
    return PostProcessing(threshold, min_size, open_above, open_radius, keep_largest, connectivity,
                          keep_fraction=keep_fraction)(prob)
