"""The names of what ``brainseg infer`` writes, in one place: the runner writes them, and evaluation, the web app,
``brainseg compare``, the bundle's ``SaveMasksd`` and the benchmark find the outputs by them.

``OUT/summary.csv`` holds one row per case; each case folder ``OUT/<case id>`` holds the mask (one
``<stem>_pred.png`` per 2D image, or ``mask.nii.gz`` for a volume, with ``seg.dcm`` for a DICOM series), the TTA
views' spread beside it (``<stem>_unc.png`` or ``uncertainty.nii.gz``), ``overlay.png``, ``uncertainty.png`` and,
written last, ``case.json``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from brainseg_monai.errors import InputError
from brainseg_monai.io import file_stem

__all__ = [
    "CASE_FILES",
    "CASE_MARKER",
    "LOCK_NAME",
    "OVERLAY",
    "SEG",
    "SLICE_MASK_SUFFIX",
    "SLICE_SPREAD_SUFFIX",
    "SUMMARY_NAME",
    "UNCERTAINTY_OVERLAY",
    "VOLUME_MASK",
    "VOLUME_SPREAD",
    "is_case_output",
    "slice_output_names",
]

CASE_MARKER = "case.json"
"""Written last into every finished case folder: the case's summary row."""
SUMMARY_NAME = "summary.csv"
"""The batch's summary in the output folder, one row per case."""
LOCK_NAME = ".brainseg-infer.lock"
"""Held in the output folder by the run writing to it; names the holder's PID and host."""
SLICE_MASK_SUFFIX = "_pred.png"
"""What a 2D image's stem takes for its mask (0/255 on the image's pixel grid)."""
SLICE_SPREAD_SUFFIX = "_unc.png"
"""What a 2D image's stem takes for its TTA views' spread (0-255 for 0-0.5)."""
VOLUME_MASK = "mask.nii.gz"
"""The mask of a volume or DICOM case, on the source grid."""
VOLUME_SPREAD = "uncertainty.nii.gz"
"""The TTA views' spread of a volume or DICOM case, on the mask's grid."""
SEG = "seg.dcm"
"""The DICOM SEG of a DICOM case."""
OVERLAY = "overlay.png"
"""The mask in red over the image, at the slice with most tumour."""
UNCERTAINTY_OVERLAY = "uncertainty.png"
"""The views' spread in yellow over the image, the mask outlined, at the overlay's slice."""
CASE_FILES = (CASE_MARKER, VOLUME_MASK, SEG, OVERLAY, SLICE_MASK_SUFFIX, VOLUME_SPREAD, UNCERTAINTY_OVERLAY,
              SLICE_SPREAD_SUFFIX)
"""What a case folder holds: each file's name contains one of these (also in a writer's hidden temporary name)."""


def slice_output_names(paths: Sequence[str], suffix: str = SLICE_MASK_SUFFIX) -> list[str]:
    """``<stem>_pred.png`` per slice, or ``<file name>_pred.png`` for a later slice sharing an earlier one's stem
    (``suffix`` instead of ``_pred.png`` for the other outputs of a slice, such as its ``_unc.png``).

    ``a.tif`` after ``a.png`` would otherwise overwrite its mask; the first keeps the usual name, which
    ``brainseg evaluate`` and the web app look for.

    Raises:
        InputError: when two slices would still be written to one name.
    """
    names: list[str] = []
    for path in paths:
        name = f"{file_stem(path)}{suffix}"
        names.append(f"{Path(path).name}{suffix}" if name in names else name)
    clash = next((n for n, count in Counter(names).items() if count > 1), None)
    if clash is not None:
        both = [p for p, n in zip(paths, names) if n == clash]
        raise InputError(os.path.commonpath(both), f"{', '.join(map(str, both))} would all be written as {clash}")
    return names


def is_case_output(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a finished case of ``brainseg infer`` (its marker holds a summary row)."""
    try:
        row = json.loads((Path(folder) / CASE_MARKER).read_text())
    except (OSError, ValueError):  # none, unreadable, or in a folder that cannot be entered
        return False
    return isinstance(row, dict) and {"case", "source", "status"} <= set(row)
