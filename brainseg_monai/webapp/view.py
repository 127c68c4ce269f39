"""What the result page shows for one case: per-slice image and mask layers as PNG data URLs, statistics, metrics.

The layers are composited in the browser (grey image, red prediction at the chosen opacity, green truth outline, and
on request the TTA views' disagreement in yellow), so changing the opacity or the slice needs no request. Statistics are those ``brainseg infer`` wrote in its summary
row; Dice and IoU come from `brainseg_monai.metrics`. Planes are shown with rows = y and columns = x, as the
overlay PNG of the writers shows them.
"""

from __future__ import annotations

import base64
import io
import json
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.transforms import EnsureChannelFirst, LoadImage
from PIL import Image
from skimage.segmentation import find_boundaries

from brainseg_monai.errors import InputError
from brainseg_monai.inference.outputs import (
    CASE_MARKER,
    OVERLAY,
    SEG,
    SLICE_SPREAD_SUFFIX,
    UNCERTAINTY_OVERLAY,
    VOLUME_MASK,
    VOLUME_SPREAD,
    slice_output_names,
)
from brainseg_monai.inference.writers import MAX_SPREAD, spread_from_png
from brainseg_monai.io import SimpleITKReader
from brainseg_monai.metrics import Confusion

__all__ = ["case_view", "read_channels_first"]

_MIME = {".png": "image/png", ".nii.gz": "application/gzip", ".dcm": "application/dicom"}
_RED = (255, 0, 0, 255)
_GREEN = (0, 255, 0, 255)


def read_channels_first(paths: Sequence[str | Path], series_uid: str | None = None) -> Any:
    """(C, x, y[, z]) image from one file or folder (with ``series_uid``, that series of a folder holding several),
    or channels stacked from several, read as inference reads them."""
    reader = SimpleITKReader(series_uid=series_uid)  # first: it quiets what LoadImage's default readers say
    items = [str(p) for p in paths]
    load = LoadImage(image_only=True)
    return EnsureChannelFirst()(load(items if len(items) > 1 else items[0], reader=reader))


def _data_url(pixels: np.ndarray, mime: str = "image/png") -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def _file_url(path: Path) -> str:
    mime = next((m for s, m in _MIME.items() if path.name.lower().endswith(s)), "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _zip_url(paths: Sequence[Path]) -> str:
    """A zip of ``paths`` (each under its own name) as a data URL: a patient's 23 slice masks in one download."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in paths:
            archive.write(path, path.name)
    return f"data:application/zip;base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def _window(values: np.ndarray) -> tuple[float, float]:
    """1st-99th percentile grey window; one per case so the brightness holds steady along the slice slider."""
    low, high = np.percentile(values, [1.0, 99.0])
    return float(low), float(high) if high > low else float(low) + 1.0


def _layers(plane: np.ndarray, window: tuple[float, float], pred: np.ndarray, truth: np.ndarray | None,
            spread: np.ndarray | None) -> dict:
    """Data URLs of one (x, y) plane: grey image, red prediction (opaque, faded in the page), green truth outline and
    the views' standard deviation as yellow whose opacity grows with it (none where the views agree)."""
    low, high = window
    grey = (np.clip((plane.astype(np.float64) - low) / (high - low), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    red = np.zeros(pred.shape + (4,), dtype=np.uint8)
    red[pred] = _RED
    layers = {"image": _data_url(grey.T), "pred": _data_url(red.transpose(1, 0, 2)), "truth": None}
    if truth is not None:
        green = np.zeros(truth.shape + (4,), dtype=np.uint8)
        green[find_boundaries(truth, mode="inner")] = _GREEN
        layers["truth"] = _data_url(green.transpose(1, 0, 2))
    if spread is not None:
        yellow = np.zeros(spread.shape + (4,), dtype=np.uint8)
        yellow[..., :2] = 255
        yellow[..., 3] = np.rint(np.clip(spread / MAX_SPREAD, 0.0, 1.0) * 255.0).astype(np.uint8)
        layers["unc"] = _data_url(yellow.transpose(1, 0, 2))
    layers["tumour_pixels"] = int(pred.sum())
    return layers


def _spread(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The views' standard deviation ``brainseg infer`` wrote (a ``_unc.png`` or ``uncertainty.nii.gz``), or None."""
    if not path.is_file():
        return None
    values = np.asarray(read_channels_first([path]))[0].astype(np.float32)
    if path.name.endswith(".png"):
        values = spread_from_png(values)
    return values if values.shape == shape else None


def _binary(path: Path, shape: tuple[int, ...], image_name: str) -> np.ndarray:
    """A mask file as a boolean (x, y[, z]) array; any nonzero value (in any channel) is tumour.

    Not `brainseg_monai.io.read_mask`, which refuses several channels: an uploaded truth may be an RGB(A) PNG."""
    values = np.asarray(read_channels_first([path])).max(axis=0) > 0
    if values.ndim == 3 and len(shape) == 2 and values.shape[-1] == 1:
        values = values[..., 0]
    if values.shape != shape:
        raise InputError(path.name, f"truth mask has shape {values.shape} but {image_name} has {shape}")
    return values


def _stats(row: Mapping[str, Any], case_dir: Path) -> dict:
    """The summary row's figures, with the name of the case score (from ``case.json``: an ensemble's differs)."""
    keys = ("tumour_voxels", "tumour_ml", "slices_with_tumour", "coverage_pct", "uncertainty")
    stats: dict[str, Any] = {k: float(row[k]) if "." in str(row[k]) else int(row[k]) for k in keys
                             if str(row.get(k, "")) != ""}
    if "uncertainty" in stats:
        stats["uncertainty_score"] = json.loads((case_dir / CASE_MARKER).read_text()).get("uncertainty_score", "")
    if row.get("review"):
        stats["review"] = row["review"]
    return stats


def _overlap(preds: Sequence[np.ndarray], truths: Sequence[np.ndarray]) -> dict:
    """Dice and IoU of the masks pooled (a patient's slices as one stack), from their confusion counts alone: the
    page shows no surface distance, so none is computed."""
    pooled = sum((Confusion.from_masks(p, t) for p, t in zip(preds, truths)), Confusion())
    return {"dice": pooled.dice, "iou": pooled.iou}


def case_view(
    kind: str,
    images: Sequence[Any],
    sources: Sequence[str],
    case_dir: Path,
    row: Mapping[str, Any],
    truths: Sequence[Path | None],
    channel: int,
) -> dict:
    """The result page's data for one case predicted into ``case_dir`` by ``run_inference``: ``case``, ``kind``,
    ``slices`` (layers per slice), ``start``, ``stats``, ``metrics``, ``downloads`` (each file the case wrote) and
    ``archive`` (all of them in one zip, when there are several; else None).

    Args:
        kind: the case kind, ``"slices"`` or a volume kind (``"volume"``, ``"dicom"``).
        images: raw (C, x, y) images (slices) or one (C, x, y, z) volume on the grid of the mask (the primary
            channel's input), as the gate read them.
        sources: the input file of each slice (its ``<stem>_pred.png`` is read), or the volume's input read.
        case_dir: ``<out>/<case>`` as written by ``run_inference``.
        row: the case's summary row.
        truths: per slice (or for the volume) a truth mask file, or None.
        channel: the channel of ``images`` shown (the primary channel, FLAIR for the LGG model).

    Raises:
        InputError: when a truth mask does not match its image's shape.
    """
    stats = _stats(row, case_dir)
    if kind == "slices":
        # no area in mm^2: TIF/PNG/JPG/BMP slices hold no scanner pixel size (a dpi tag, if any, is a print setting)
        preds, refs, layers = [], [], []
        names = slice_output_names([str(source) for source in sources])
        spreads = slice_output_names([str(source) for source in sources], SLICE_SPREAD_SUFFIX)
        for image, source, name, unc, truth_path in zip(images, sources, names, spreads, truths):
            plane = np.asarray(image[channel])
            pred = _binary(case_dir / name, plane.shape, Path(source).name)
            truth = None if truth_path is None else _binary(truth_path, plane.shape, Path(source).name)
            spread = _spread(case_dir / unc, plane.shape)
            layers.append({"name": Path(source).name, **_layers(plane, _window(plane), pred, truth, spread)})
            if truth is not None:
                preds.append(pred)
                refs.append(truth)
        metrics = None
        if refs and len({r.shape for r in refs}) == 1:
            metrics = {**_overlap(preds, refs), "slices_with_truth": len(refs)}
        downloads = [case_dir / name for name in names] + [case_dir / name for name in spreads]  # slider's order
    else:
        volume = np.asarray(images[0][channel])
        pred = _binary(case_dir / VOLUME_MASK, volume.shape, Path(sources[0]).name)
        truth = None if truths[0] is None else _binary(truths[0], volume.shape, Path(sources[0]).name)
        window = _window(volume)
        spread = _spread(case_dir / VOLUME_SPREAD, volume.shape)
        layers = [
            {"name": f"z = {z}", **_layers(volume[..., z], window, pred[..., z],
                                           None if truth is None else truth[..., z],
                                           None if spread is None else spread[..., z])}
            for z in range(volume.shape[-1])
        ]
        metrics = None
        if truth is not None:
            metrics = _overlap([pred], [truth])
        downloads = [case_dir / VOLUME_MASK, case_dir / SEG, case_dir / VOLUME_SPREAD]
    counts = [layer["tumour_pixels"] for layer in layers]
    downloads = [p for p in downloads + [case_dir / OVERLAY, case_dir / UNCERTAINTY_OVERLAY] if p.is_file()]
    return {
        "case": row["case"],
        "kind": "slices" if kind == "slices" else "volume",
        "slices": layers,
        "start": int(np.argmax(counts)) if any(counts) else len(layers) // 2,
        "stats": stats,
        "metrics": metrics,
        "downloads": [{"name": p.name, "url": _file_url(p)} for p in downloads],
        "archive": {"name": f"{row['case']}.zip", "url": _zip_url(downloads)} if len(downloads) > 1 else None,
    }
