"""A trained model: its settings in the ``model.json`` sidecar beside ``model.pt``, and the network they rebuild.

This module is the one reader and writer of ``model.json``: training writes it when a run starts (and a final model's
own when the run completes), tuning stores its threshold and curve in it, inference reads it to rebuild the network,
its pre-processing and its tuned post-processing. A checkpoint with its sidecar is enough to use the model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from brainseg_monai.devices import as_bool, resolve_device
from brainseg_monai.errors import InputError
from brainseg_monai.evaluation import json_ready
from brainseg_monai.inference.postprocess import PostProcessing
from brainseg_monai.io import write_text_atomic
from brainseg_monai.networks import get_network
from brainseg_monai.normalisation import check_normalisation

__all__ = [
    "MODEL_SIDECAR",
    "TUNING_KEY",
    "ModelSpec",
    "find_spec",
    "load_model",
    "load_tuning",
    "own_sidecar",
    "read_sidecar",
    "sidecar_path",
    "store_tuning",
    "write_model_sidecar",
    "write_sidecar",
    "write_untuned_sidecar",
]

MODEL_SIDECAR = "model.json"
#: key of the tuning block in ``model.json``: the curve, the candidates and the data ``brainseg tune-threshold`` used
TUNING_KEY = "tuning"
#: a training run's settings, one folder above its checkpoints: the settings of a checkpoint without a sidecar
_RUN_CONFIG = "config_resolved.json"


@dataclass
class ModelSpec:
    """What is needed besides the weights to use a model: network, input layout and post-processing.

    The fields are the keys of ``model.json`` (``to_dict`` / ``from_dict``); other keys of the file (``tuning``) are
    kept by the functions that write it.
    """

    network_name: str = "unet"
    network_kwargs: dict = field(default_factory=dict)
    spatial_dims: int = 2
    in_channels: int = 3
    roi_size: list[int] = field(default_factory=lambda: [128, 128])
    pixdim: list[float] | None = None
    #: "slice": each 2D image z-scored on its own; "case": with the statistics of all slices of its case
    normalisation: str = "slice"
    channels: list[str] = field(default_factory=lambda: ["t1", "flair", "t1c"])
    #: the channel whose grid the others are resampled onto and whose series the mask and the SEG lie on
    primary_channel: str | None = None
    #: channel -> the channel that fills it in when the input lacks it (how the model was trained to see a missing
    #: sequence); channels not named here are required
    channel_fallbacks: dict = field(default_factory=dict)
    #: in-plane pixel size (mm) a 2D model was trained at: inputs at another size are resampled to it and back
    pixel_spacing: list[float] | None = None
    #: `PostProcessing` settings as stored: only the keys set (by tuning), the others take their defaults; the
    #: typed settings are :attr:`postprocessor`
    postprocessing: dict = field(default_factory=dict)
    #: `brainseg_monai.uncertainty`'s settings: ``review_above``, the case score above which a case is flagged for
    #: review, with how it was chosen (``chosen_on``)
    uncertainty: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelSpec:
        """Build from a ``model.json`` or a training run's ``config_resolved.json`` (unknown keys are ignored)."""
        known = {k: values[k] for k in cls.__dataclass_fields__ if k in values and values[k] is not None}
        return cls(**known)

    def __post_init__(self) -> None:
        """Check the settings and fill the defaults that depend on others (channel names, primary channel)."""
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3 but is {self.spatial_dims!r}.")
        check_normalisation(self.normalisation)
        if len(self.channels) != self.in_channels:
            self.channels = [f"channel{i}" for i in range(self.in_channels)] if self.in_channels != 3 else ["t1", "flair", "t1c"]
        if self.primary_channel is None:
            self.primary_channel = "flair" if "flair" in self.channels else self.channels[0]
        unknown = sorted(({self.primary_channel} | set(self.channel_fallbacks) | set(self.channel_fallbacks.values()))
                         - set(self.channels))
        if unknown:
            raise ValueError(f"primary_channel and channel_fallbacks must name channels of the model "
                             f"({', '.join(self.channels)}) but name {unknown}.")
        if any(self.channel_fallbacks.get(fill) for fill in self.channel_fallbacks.values()):
            raise ValueError(f"channel_fallbacks must fill from channels that are required themselves: "
                             f"{self.channel_fallbacks}.")
        if self.pixel_spacing is not None and (self.spatial_dims != 2 or len(self.pixel_spacing) != 2
                                               or min(self.pixel_spacing) <= 0):
            raise ValueError(f"pixel_spacing is two positive in-plane sizes (mm) of a 2D model, not "
                             f"{self.pixel_spacing!r}.")
        above = self.uncertainty.get("review_above")
        if above is not None and (isinstance(above, bool) or not isinstance(above, (int, float)) or not 0 <= above <= 0.5):
            raise ValueError(f"uncertainty's review_above is a score in [0, 0.5], not {above!r}.")
        try:
            PostProcessing.from_dict(self.postprocessing)
        except ValueError as err:
            raise ValueError(f"postprocessing holds invalid settings {self.postprocessing!r}: {err}") from None

    @property
    def required_channels(self) -> list[str]:
        """The channels an input must have: those without a fallback."""
        return [name for name in self.channels if name not in self.channel_fallbacks]

    @property
    def postprocessor(self) -> PostProcessing:
        """The post-processing the model applies by default: the stored settings, defaults for those not stored."""
        return PostProcessing.from_dict(self.postprocessing)

    def to_dict(self) -> dict:
        """The settings as ``model.json`` stores them (inverse of :meth:`from_dict`)."""
        return asdict(self)


def own_sidecar(checkpoint: str | os.PathLike) -> Path:
    """The sidecar that belongs to ``checkpoint`` alone: its name with ``.json`` (``model_final.pt`` ->
    ``model_final.json``; ``model.pt``'s is ``model.json``)."""
    return Path(checkpoint).with_suffix(".json")


def sidecar_path(checkpoint: str | os.PathLike) -> Path:
    """The ``model.json`` that :func:`find_spec` reads first for ``checkpoint``: the JSON of the same name, else
    ``model.json`` beside it (which may not exist yet); a ``.json`` path is its own sidecar."""
    ckpt = Path(checkpoint)
    if ckpt.suffix == ".json":
        return ckpt
    same_name = own_sidecar(ckpt)
    return same_name if same_name.is_file() else ckpt.parent / MODEL_SIDECAR


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    """The values of the ``model.json`` at ``path``.

    Raises:
        InputError: when the file is missing, unreadable, or not a JSON object.
    """
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "model settings not found (a checkpoint needs its model.json beside it)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(path, f"not a readable model.json ({e})") from None
    if not isinstance(values, dict):
        raise InputError(path, f"not a model.json: a JSON object of model settings was expected, not "
                               f"{type(values).__name__}")
    return values


def write_sidecar(path: str | os.PathLike, values: Mapping[str, Any]) -> Path:
    """Write ``values`` as the ``model.json`` at ``path`` (atomically: a reader never sees half a file)."""
    return write_text_atomic(path, json.dumps(json_ready(values), indent=2, allow_nan=False) + "\n")


def write_model_sidecar(
    ckpt_dir: str | os.PathLike,
    run_config: Mapping[str, Any],
    channels: Sequence[str] | None = None,
    resume: bool | str | int = False,
) -> Path:
    """Write ``ckpt_dir/model.json`` from a training run's settings (called when training starts).

    A resumed run keeps what was added to its ``model.json`` since it started (the tuned ``postprocessing``, the
    ``tuning`` record). A fresh run writes the defaults: a threshold tuned for another model is not this model's.
    """
    values = dict(run_config)
    if channels is not None:
        values["channels"] = list(channels)
    spec = ModelSpec.from_dict(values)
    path = Path(ckpt_dir) / MODEL_SIDECAR
    existing = read_sidecar(path) if as_bool(resume, "resume") and path.is_file() else {}
    if existing.get("postprocessing"):
        spec.postprocessing = existing["postprocessing"]
    return write_sidecar(path, {**existing, **spec.to_dict()})


def write_untuned_sidecar(checkpoint: str | os.PathLike, source: str | os.PathLike) -> Path | None:
    """Give ``checkpoint`` its own sidecar: the settings of the ``model.json`` at ``source`` without the
    post-processing and tuning tuned for that model, so tuning one model never retunes the other.

    Returns:
        The sidecar written, or None when ``source`` does not exist.
    """
    if not Path(source).is_file():
        return None
    values = read_sidecar(source)
    values.pop(TUNING_KEY, None)
    values["postprocessing"] = {}
    return write_sidecar(own_sidecar(checkpoint), values)


def store_tuning(checkpoint: str | os.PathLike, postprocessing: Mapping[str, Any], tuning: Mapping[str, Any]) -> Path:
    """Store tuned settings in the sidecar of ``checkpoint``: ``postprocessing`` updates the stored post-processing
    (the keys not given stay) and ``tuning`` replaces the tuning block; every other key is kept.

    A checkpoint whose settings come from its run's ``config_resolved.json`` gets a ``model.json`` beside it.

    Raises:
        InputError: when the checkpoint has no settings or its sidecar is unreadable.
    """
    sidecar = sidecar_path(checkpoint)
    values = read_sidecar(sidecar) if sidecar.is_file() else find_spec(checkpoint).to_dict()
    values["postprocessing"] = {**(values.get("postprocessing") or {}), **postprocessing}
    values[TUNING_KEY] = dict(tuning)
    return write_sidecar(sidecar, values)


def load_tuning(checkpoint_or_sidecar: str | os.PathLike) -> dict[str, Any] | None:
    """The tuning block of a model (checkpoint, its ``model.json``, or the folder holding them) when it holds a
    threshold curve, else None."""
    path = Path(checkpoint_or_sidecar)
    sidecar = path / MODEL_SIDECAR if path.is_dir() else sidecar_path(path)
    if not sidecar.is_file():
        return None
    tuning = read_sidecar(sidecar).get(TUNING_KEY)
    return tuning if isinstance(tuning, dict) and tuning.get("threshold_curve") else None


def find_spec(checkpoint: str | os.PathLike) -> ModelSpec:
    """The settings of ``checkpoint``: its ``model.json``, else the run's ``config_resolved.json`` one level up.

    Raises:
        InputError: when neither file is there (the message says where it looked), or the settings are invalid.
    """
    ckpt = Path(checkpoint)
    candidates = [own_sidecar(ckpt), ckpt.parent / MODEL_SIDECAR, ckpt.parent.parent / _RUN_CONFIG]
    for candidate in candidates:
        if candidate.is_file() and candidate != ckpt:
            values = read_sidecar(candidate)
            try:
                return ModelSpec.from_dict(values)
            except (TypeError, ValueError) as err:
                raise InputError(candidate, f"invalid model settings: {err}") from None
    raise InputError(ckpt, f"no model settings found beside the checkpoint (looked for {', '.join(map(str, candidates))})")


def load_model(checkpoint: str | os.PathLike, device: str | torch.device = "auto") -> tuple[torch.nn.Module, ModelSpec]:
    """Rebuild the network of ``checkpoint`` (best ``model.pt`` or a ``last_checkpoint``) in eval mode on ``device``.

    Raises:
        InputError: when the checkpoint is missing, unreadable, or does not fit the network its settings describe.
    """
    ckpt = Path(checkpoint)
    if not ckpt.is_file():
        raise InputError(ckpt, "checkpoint not found (train a model first, or pass --checkpoint)")
    spec = find_spec(ckpt)
    dev = resolve_device(device)
    network = get_network(spec.network_name, spec.spatial_dims, spec.in_channels, 1, **spec.network_kwargs)
    try:
        state = torch.load(ckpt, map_location=dev, weights_only=True)
    except Exception as err:  # torch raises several types for corrupt files
        raise InputError(ckpt, f"cannot read checkpoint: {err}") from err
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    try:
        network.load_state_dict(state)
    except RuntimeError as err:
        raise InputError(ckpt, f"weights do not fit network '{spec.network_name}' ({spec.spatial_dims}D, "
                               f"{spec.in_channels} channels): {str(err).splitlines()[0]}") from err
    return network.to(dev).eval(), spec
