"""The web app's input gate: refuse what is plainly not an MR slice or volume the model can take.

The model answers for any array of the right shape, so a photograph or a blank image would get a confident-looking
mask. The gate states the reason instead. Its tests are cheap and conservative: channel count against the model,
empty or constant content, a DICOM modality other than MR, and the dark air around the head that every MR image of
the head has and an ordinary photograph does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from monai.utils.type_conversion import convert_to_numpy

from brainseg_monai.errors import InputError
from brainseg_monai.io import DicomSeries, check_image_values

__all__ = ["check_dicom_modality", "check_plausible_mr", "dark_border_fraction"]

#: A border pixel is background when its brightest channel is below this fraction of the image's 99th percentile.
DARK_LEVEL = 0.1
#: Fraction of the in-plane border ring that must be dark background for an image of the head.
MIN_DARK_BORDER = 0.5
#: Width of the border ring as a fraction of each in-plane side (at least one pixel).
BORDER_WIDTH = 1.0 / 16.0


def dark_border_fraction(image: Any) -> float:
    """Fraction of the in-plane border ring of a (C, x, y[, z]) image that is dark background (see ``DARK_LEVEL``).

    The brightest channel counts, so a pixel is dark only when it is dark in every channel; for a volume every
    axial slice's ring counts.
    """
    values = convert_to_numpy(image).astype(np.float32, copy=False).max(axis=0)
    if values.ndim == 2:
        values = values[..., None]
    nx, ny = values.shape[:2]
    wx, wy = max(1, int(nx * BORDER_WIDTH)), max(1, int(ny * BORDER_WIDTH))
    ring = np.ones((nx, ny), dtype=bool)
    ring[wx:nx - wx, wy:ny - wy] = False
    top = float(np.percentile(values, 99))
    border = values[ring]
    return float(np.mean(border <= DARK_LEVEL * top)) if top > 0 else 1.0


def check_plausible_mr(image: Any, source: str, in_channels: int, channel_names: Sequence[str] = ()) -> None:
    """Refuse a (C, x, y[, z]) image that the model cannot take or that is not plausibly an MR image of the head.

    Args:
        image: channel-first array in reader axis order, raw intensities (before normalisation).
        source: the file name shown to the user.
        in_channels: channels the model takes.
        channel_names: the model's channel names, for the message.

    Raises:
        InputError: naming ``source`` and the reason: no pixels, wrong channel count, NaN/inf, constant content, or
            a bright border (no background around the head, as in a photograph).
    """
    values = convert_to_numpy(image)
    if values.size == 0 or values.ndim < 3 or min(values.shape[1:3]) < 2:
        raise InputError(source, f"is empty or too small to be an MR image (shape {tuple(values.shape[1:])})")
    if values.shape[0] != in_channels:
        names = f" ({', '.join(channel_names)})" if channel_names else ""
        hint = " (a colour or RGBA picture?)" if in_channels == 1 and values.shape[0] in (3, 4) else ""
        raise InputError(source, f"has {values.shape[0]} channel(s){hint} but the model takes {in_channels}{names}")
    check_image_values(values, source)
    low, high = float(values.min()), float(values.max())
    if low == high:
        raise InputError(source, f"is constant (every value is {low:g}): there is nothing to segment")
    dark = dark_border_fraction(values)
    if dark < MIN_DARK_BORDER:
        raise InputError(source, (
            f"does not look like an MR image of the head: only {100 * dark:.0f}% of its border is dark background "
            f"(an MR slice has air around the head; is this a photograph?)"))


def check_dicom_modality(series: Sequence[DicomSeries]) -> None:
    """Refuse DICOM series whose Modality is set and is not MR (CT, a secondary capture, a SEG, ...).

    Raises:
        InputError: naming the series folder, its description and its modality.
    """
    for item in series:
        if item.modality and item.modality.upper() != "MR":
            raise InputError(item.folder, (
                f"series '{item.description}' is {item.modality}, not MR: this model segments MR images only"))
