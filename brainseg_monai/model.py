"""A trained model: its settings in the ``model.json`` sidecar beside ``model.pt``, and the network they rebuild.

This module is the one reader and writer of ``model.json``: training writes it when a run starts (and a final model's
own when the run completes), tuning stores its threshold and curve in it, inference reads it to rebuild the network,
its pre-processing and its tuned post-processing. A checkpoint with its sidecar is enough to use the model.

An ensemble is a ``model.json`` alone whose ``members`` name the weight files of models of one architecture (the fold
models of a cross-validation, :func:`write_ensemble`); passed as the checkpoint, it loads as one
`brainseg_monai.networks.ensemble.EnsembleNetwork` whose members' probabilities inference averages.
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
from brainseg_monai.inference.postprocess import PostProcessing
from brainseg_monai.io import write_json_atomic
from brainseg_monai.networks import get_network
from brainseg_monai.networks.ensemble import EnsembleNetwork
from brainseg_monai.normalisation import check_normalisation

__all__ = [
    "MODEL_SIDECAR",
    "TUNING_KEY",
    "ModelSpec",
    "find_spec",
    "initial_weights",
    "load_model",
    "load_tuning",
    "model_files",
    "own_sidecar",
    "read_sidecar",
    "sidecar_path",
    "store_tuning",
    "write_ensemble",
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
    #: review, the ``score`` it was chosen for and how it was chosen (``chosen_on``)
    uncertainty: dict = field(default_factory=dict)
    #: an ensemble's weight files, relative to its ``model.json``; empty for a single model (the checkpoint itself)
    members: list[str] = field(default_factory=list)

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
        if above is not None and (isinstance(above, bool) or not isinstance(above, (int, float)) or not 0 <= above <= 1):
            raise ValueError(f"uncertainty's review_above is a score in [0, 1], not {above!r}.")
        try:
            PostProcessing.from_dict(self.postprocessing)
        except ValueError as err:
            raise ValueError(f"postprocessing holds invalid settings {self.postprocessing!r}: {err}") from None
        if self.members and (len(self.members) < 2 or not all(isinstance(m, str) and m for m in self.members)):
            raise ValueError(f"members names the weight files of an ensemble, two or more, not {self.members!r}.")

    @property
    def required_channels(self) -> list[str]:
        """The channels an input must have: those without a fallback."""
        return [name for name in self.channels if name not in self.channel_fallbacks]

    @property
    def postprocessor(self) -> PostProcessing:
        """The post-processing the model applies by default: the stored settings, defaults for those not stored."""
        return PostProcessing.from_dict(self.postprocessing)

    def to_dict(self) -> dict:
        """The settings as ``model.json`` stores them (inverse of :meth:`from_dict`); ``members`` only of an
        ensemble."""
        values = asdict(self)
        if not self.members:
            del values["members"]
        return values


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
    return write_json_atomic(path, values)


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
    """The settings of ``checkpoint``: its ``model.json``, else the run's ``config_resolved.json`` one level up; an
    ensemble's ``model.json`` is its own.

    Raises:
        InputError: when neither file is there (the message says where it looked), or the settings are invalid.
    """
    ckpt = Path(checkpoint)
    if ckpt.suffix == ".json":
        return _spec_of(ckpt, read_sidecar(ckpt))
    candidates = [own_sidecar(ckpt), ckpt.parent / MODEL_SIDECAR, ckpt.parent.parent / _RUN_CONFIG]
    for candidate in candidates:
        if candidate.is_file():
            return _spec_of(candidate, read_sidecar(candidate))
    raise InputError(ckpt, f"no model settings found beside the checkpoint (looked for {', '.join(map(str, candidates))})")


def model_files(checkpoint: str | os.PathLike) -> list[Path]:
    """The weight files ``checkpoint`` stands for: itself, or for an ensemble's ``model.json`` its members' (each
    resolved against the file's folder).

    Raises:
        InputError: when the file is missing, or an ensemble's ``model.json`` is unreadable or names no members.
    """
    ckpt = Path(checkpoint)
    if not ckpt.is_file():
        raise InputError(ckpt, "checkpoint not found (train a model first, or pass --checkpoint)")
    if ckpt.suffix != ".json":
        return [ckpt]
    members = find_spec(ckpt).members
    if not members:
        raise InputError(ckpt, "names no weight files: a model.json given as the checkpoint is an ensemble's, whose "
                               "members list its models' .pt files (brainseg ensemble writes one); for a single "
                               "model pass its .pt")
    return [ckpt.parent / member for member in members]


def _spec_of(path: Path, values: Mapping[str, Any]) -> ModelSpec:
    try:
        return ModelSpec.from_dict(values)
    except (TypeError, ValueError) as err:
        raise InputError(path, f"invalid model settings: {err}") from None


def _load_weights(network: torch.nn.Module, ckpt: Path, described: str) -> None:
    """Load the weights of ``ckpt`` (a state dict, or a training checkpoint's ``model`` entry) into ``network``."""
    if not ckpt.is_file():
        raise InputError(ckpt, "ensemble member not found (its path is relative to the ensemble's model.json)")
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt files
        raise InputError(ckpt, f"cannot read checkpoint: {err}") from err
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    try:
        network.load_state_dict(state)
    except RuntimeError as err:
        raise InputError(ckpt, f"weights do not fit {described}: {str(err).splitlines()[0]}") from err


def load_model(checkpoint: str | os.PathLike, device: str | torch.device = "auto") -> tuple[torch.nn.Module, ModelSpec]:
    """Rebuild the network of ``checkpoint`` (best ``model.pt`` or a ``last_checkpoint``; an ensemble's ``model.json``)
    in eval mode on ``device``.

    Raises:
        InputError: when the checkpoint (or a member) is missing, unreadable, or does not fit the network its
            settings describe; or a ``.pt``'s settings are an ensemble's.
    """
    ckpt = Path(checkpoint)
    files = model_files(ckpt)
    spec = find_spec(ckpt)
    if ckpt.suffix != ".json" and spec.members:
        raise InputError(ckpt, f"its model.json describes an ensemble of {len(spec.members)} models: pass that "
                               f"model.json as the checkpoint")
    dev = resolve_device(device)
    networks = []
    for path in files:
        network = get_network(spec.network_name, spec.spatial_dims, spec.in_channels, 1, **spec.network_kwargs)
        _load_weights(network, path, f"network '{spec.network_name}' ({spec.spatial_dims}D, {spec.in_channels} "
                                     f"channels)")
        networks.append(network)
    network = networks[0] if len(networks) == 1 else EnsembleNetwork(networks)
    return network.to(dev).eval(), spec


def initial_weights(network: torch.nn.Module, checkpoint: str | os.PathLike | None) -> torch.nn.Module:
    """``network`` with the weights of ``checkpoint`` (a model's ``.pt``, e.g. the shipped one), to train on from
    there (fine-tuning on one's own scans); ``network`` as it is when ``checkpoint`` is None.

    Raises:
        InputError: when the checkpoint is missing, unreadable or does not fit ``network`` (the settings differ).
    """
    if checkpoint is None or str(checkpoint).strip().lower() in ("", "none", "null"):
        return network
    ckpt = Path(checkpoint)
    if not ckpt.is_file():
        raise InputError(ckpt, "init_from: checkpoint not found")
    _load_weights(network, ckpt, f"the network of this run ({type(network).__name__}; its settings must be the "
                                  f"checkpoint's: {sidecar_path(ckpt)})")
    return network


#: settings that may differ between an ensemble's members: each one's tuned post-processing and review threshold
_PER_MODEL = ("postprocessing", "uncertainty", "members")


def write_ensemble(members: Sequence[str | os.PathLike], out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``out``, the ``model.json`` of an ensemble of the checkpoints ``members`` (paths stored relative to it).

    The members must share every setting but their tuned ones. Their post-processing is kept where they all agree
    on it; the review threshold and the tuning are not (they were chosen for one model's probabilities, not for the
    average: tune the ensemble on patients none of its members saw).

    Raises:
        InputError: a member is missing, not a ``.pt``, has no settings or other settings than the first; or ``out``
            exists and ``overwrite`` is False.
        ValueError: fewer than two members.
    """
    if len(members) < 2:
        raise ValueError(f"an ensemble needs at least two members but got {len(members)}.")
    target = Path(out)
    if target.suffix != ".json":
        raise InputError(target, "the ensemble is written as a .json (its model.json)")
    if target.exists() and not overwrite:
        raise InputError(target, "exists already: choose another path, or overwrite it on purpose")
    specs = []
    for member in members:
        path = Path(member)
        if path.suffix != ".pt":
            raise InputError(path, "an ensemble's member is a model's .pt checkpoint")
        model_files(path)  # exists
        specs.append(find_spec(path).to_dict())
    first = specs[0]
    for member, spec in zip(members[1:], specs[1:]):
        differ = sorted(k for k in first if k not in _PER_MODEL and spec.get(k) != first[k])
        if differ:
            raise InputError(member, f"has other settings than {members[0]} ({', '.join(differ)}): an ensemble's "
                                     f"members are models of one architecture and input")
    agreed = all(spec["postprocessing"] == first["postprocessing"] for spec in specs)
    folder = target.parent.resolve()
    ensemble = ModelSpec.from_dict({
        **{key: value for key, value in first.items() if key not in _PER_MODEL},
        "postprocessing": first["postprocessing"] if agreed else {},
        "members": [os.path.relpath(Path(member).resolve(), folder) for member in members]})
    target.parent.mkdir(parents=True, exist_ok=True)
    return write_sidecar(target, ensemble.to_dict())
