"""Library side of the training bundle: data preparation, sampling, resume and TensorBoard overlays.

``bundle/configs/train.json`` references these functions so that the JSON holds composition, not logic.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np
import SimpleITK as sitk
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from monai.data import DistributedSampler, DistributedWeightedRandomSampler
from monai.handlers import CheckpointLoader, CheckpointSaver, EarlyStopHandler
from monai.inferers import SimpleInferer
from monai.transforms import Compose
from torch.utils.data import Dataset, RandomSampler, Sampler, WeightedRandomSampler

from brainseg_monai import datalist as datalist_lib
from brainseg_monai import synth, transforms
from brainseg_monai.devices import as_bool, resolve_device
from brainseg_monai.inference.writers import grey_window
from brainseg_monai.io import read_sitk, write_atomic, write_text_atomic
from brainseg_monai.model import MODEL_SIDECAR, own_sidecar, write_untuned_sidecar
from brainseg_monai.normalisation import case_statistics, check_normalisation

logger = logging.getLogger(__name__)

LAST_CHECKPOINT_PREFIX = "last"
#: entries of a last checkpoint that older versions did not save; resuming from such a checkpoint goes on without them
OPTIONAL_RESUME_KEYS = ("key_metric", "early_stop")
#: folds of the datalist a run builds from ``dataset_dir`` when ``fold`` is set (the bundle's ``num_folds``)
DEFAULT_NUM_FOLDS = 5


def _amp_mode(amp: bool | str | int) -> str:
    """"auto", "bf16", "true" or "false" for an ``amp`` value from a config or the command line."""
    if isinstance(amp, str) and amp.strip().lower() in ("auto", "bf16"):
        return amp.strip().lower()
    try:
        return "true" if as_bool(amp, "amp") else "false"
    except ValueError:
        raise ValueError(f"amp must be true, false, auto or bf16 but is {amp!r}.") from None


def resolve_amp(amp: bool | str, device: torch.device) -> bool:
    """MONAI's float16 mixed precision (CUDA only): ``"auto"`` turns it on for CUDA; ``"bf16"`` leaves it off.

    Raises:
        ValueError: for ``amp=true`` without CUDA, or a value other than true, false, auto or bf16.
    """
    mode = _amp_mode(amp)
    if mode == "auto":
        return device.type == "cuda"
    if mode == "true" and device.type != "cuda":
        raise ValueError(f"amp=true needs a CUDA device but the device is {device}; use amp=auto, bf16 or false.")
    return mode == "true"


def resolve_bf16(amp: bool | str) -> bool:
    """Whether the training forward runs under bfloat16 autocast (``amp="bf16"``), on CPU or CUDA."""
    return _amp_mode(amp) == "bf16"


class AutocastInferer(SimpleInferer):
    """MONAI's ``SimpleInferer`` under ``torch.autocast(dtype=bfloat16)`` on the input's device; float32 outputs.

    MONAI's trainers autocast on CUDA only (``amp=True``, float16 with a gradient scaler, or another dtype through
    ``amp_kwargs``). This brings bfloat16 autocast to the CPU, where CPUs with bfloat16 instructions (AVX512-BF16,
    AMX) run the training step markedly faster (docs/benchmarks.md); bfloat16 needs no gradient scaler. Outputs (a
    tensor, or a tuple, list or dict of them) come back as float32, so the loss is computed in float32. The bundle
    uses it for the training forward only: validation stays in float32. With ``enabled=False`` it is exactly
    ``SimpleInferer``.

    Args:
        enabled: autocast or not (the bundle passes ``resolve_bf16(@amp)``).
    """

    def __init__(self, enabled: bool = True) -> None:
        super().__init__()
        self.enabled = as_bool(enabled, "enabled")

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``network(inputs, *args, **kwargs)``, under bfloat16 autocast when enabled."""
        if not self.enabled:
            return super().__call__(inputs, network, *args, **kwargs)
        with torch.autocast(inputs.device.type, dtype=torch.bfloat16):
            outputs = super().__call__(inputs, network, *args, **kwargs)
        return _as_float32(outputs)


def _as_float32(outputs: Any) -> Any:
    """Floating-point tensors of ``outputs`` (a tensor, or a tuple, list or dict of them) as float32."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, (tuple, list)):
        return type(outputs)(_as_float32(o) for o in outputs)
    if isinstance(outputs, Mapping):
        return {k: _as_float32(v) for k, v in outputs.items()}
    return outputs


def prepare_data(
    datalist: str | os.PathLike | None,
    dataset_dir: str | os.PathLike | None,
    source: str,
    output_dir: str | os.PathLike,
    fold: int | None = None,
    val: float = 0.2,
    seed: int = 0,
    train_all: bool | str = False,
    num_folds: int = DEFAULT_NUM_FOLDS,
) -> tuple[list[dict], list[dict], list[str]]:
    """The (training items, validation items, channel names) of a run.

    With ``datalist`` (any file from ``brainseg datalist``) its split (or ``fold``, among the folds it was built
    with) is used. Otherwise one is built from ``dataset_dir`` with ``source`` (``num_folds`` folds when ``fold`` is
    set) and saved as ``output_dir/datalist.json``; an empty ``dataset_dir`` means the embedded synthetic default,
    generated on first use. ``train_all`` trains on the validation patients too (the final model of a recipe whose
    schedule, not a validation score, ends training): validation still runs and is logged, but on patients the
    model has seen, so its Dice is no estimate of unseen-patient performance.

    Raises:
        ValueError: when ``fold`` is not in ``0..num_folds - 1`` (a built datalist), or ``num_folds`` is below 2.
    """
    if datalist:
        dl = datalist_lib.load_datalist(datalist)
        train, valid = datalist_lib.training_split(datalist, fold=fold)
    else:
        if not dataset_dir:
            dataset_dir = synth.default_dataset(source)
            logger.info("no dataset_dir given: using the synthetic %s phantoms in %s", source, dataset_dir)
        folds = None if fold is None else _check_fold(fold, num_folds)
        dl = datalist_lib.build_datalist(source, dataset_dir, val=0.0 if folds else val, folds=folds, seed=seed)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        datalist_lib.write_datalist(dl, Path(output_dir) / "datalist.json")
        train, valid = datalist_lib.training_split(dl, fold=fold)
    if as_bool(train_all, "train_all"):
        logger.warning(
            "train_all: training on the %d validation items too; val_dice is measured on seen patients", len(valid)
        )
        train = train + valid
    return train, valid, list(dl.get("channels") or [])


def _check_fold(fold: int, num_folds: int) -> int:
    """``num_folds`` after checking that ``fold`` is one of them: another count would regroup every fold's patients."""
    if isinstance(num_folds, bool) or not isinstance(num_folds, (int, np.integer)) or num_folds < 2:
        raise ValueError(f"num_folds must be an integer of 2 or more but is {num_folds!r}.")
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or not 0 <= fold < num_folds:
        raise ValueError(f"fold must be in 0..{num_folds - 1} (num_folds is {num_folds}) but is {fold!r}; "
                         "pass --num_folds to cross-validate with more folds.")
    return int(num_folds)


def with_normalisation(
    data: tuple[list[dict], list[dict], list[str]], normalisation: str = "slice", spatial_dims: int = 2
) -> tuple[list[dict], list[dict], list[str]]:
    """``data`` from :func:`prepare_data`, its items carrying their patient's intensity statistics for "case".

    With "slice" it is returned as it is. With "case" every training and validation item gets its patient's
    per-channel ``norm_mean``/``norm_std`` (:func:`brainseg_monai.normalisation.case_statistics`) of its images read
    as training reads them, the statistics inference computes over a patient's slices.
    """
    check_normalisation(normalisation)
    train, valid, channels = data
    if normalisation == "slice":
        return train, valid, channels
    reader = Compose(transforms.load_transforms(spatial_dims, None, ("image",), normalisation=None))

    def read(image: Any) -> torch.Tensor:
        return reader({"image": image})["image"]

    return case_statistics(train, read), case_statistics(valid, read), channels


def _has_tumour(label_path: str) -> bool:
    """Whether the mask at ``label_path`` marks any tumour.

    The pixels are copied (``GetArrayFromImage``): a ``GetArrayViewFromImage`` view of the temporary image read
    freed memory and called tumour-free slices tumour.
    """
    return bool(sitk.GetArrayFromImage(read_sitk(label_path)).any())


def check_tumour_fraction(tumour_fraction: float | str | None) -> float | None:
    """``tumour_fraction`` from a config or the command line: a fraction in (0, 1), or None for plain shuffling.

    ``--tumour_fraction null`` arrives as the string "null" (or "None"), so "null" and "none" (any case) mean None.

    Raises:
        ValueError: for anything else, naming the value.
    """
    if tumour_fraction is None or str(tumour_fraction).strip().lower() in ("null", "none"):
        return None
    try:
        fraction = float(tumour_fraction)
    except (TypeError, ValueError):
        fraction = float("nan")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"tumour_fraction must be in (0, 1), or null for plain shuffling, but is {tumour_fraction!r}.")
    return fraction


def tumour_weights(items: Sequence[Mapping], tumour_fraction: float = 0.5) -> list[float]:
    """Per-item sampling weights so that about ``tumour_fraction`` of the draws hold tumour.

    In LGG two thirds of the slices are tumour-free; uniform sampling would mostly teach the network to say no.
    When all items (or none) hold tumour the weights are uniform.

    Raises:
        ValueError: when ``tumour_fraction`` is not in (0, 1).
    """
    fraction = check_tumour_fraction(tumour_fraction)
    if fraction is None:
        raise ValueError("tumour_fraction must be in (0, 1) for tumour weights but is None.")
    has = np.array([_has_tumour(str(it["label"])) for it in items], dtype=bool)
    n_pos, n_neg = int(has.sum()), int((~has).sum())
    if n_pos == 0 or n_neg == 0:
        return [1.0] * len(items)
    return np.where(has, fraction / n_pos, (1.0 - fraction) / n_neg).tolist()


def training_sampler(items: Sequence[Mapping], tumour_fraction: float | str | None = 0.5, seed: int = 0) -> Sampler:
    """A seeded sampler of ``len(items)`` draws per epoch.

    With a ``tumour_fraction``: drawn with replacement by :func:`tumour_weights`. With None: every item once per
    epoch in random order (plain shuffling). Runs before the weights worked drew uniformly with replacement, or by
    weights read from freed memory: plain shuffling is the nearest recipe that is reproducible.
    """
    fraction = check_tumour_fraction(tumour_fraction)
    generator = torch.Generator().manual_seed(int(seed))
    if fraction is None:
        return RandomSampler(range(len(items)), generator=generator)
    weights = torch.as_tensor(tumour_weights(items, fraction), dtype=torch.double)
    return WeightedRandomSampler(weights, len(items), True, generator)


def distributed_training_sampler(
    dataset: Dataset,
    items: Sequence[Mapping],
    tumour_fraction: float | str | None = 0.5,
    seed: int = 0,
    num_replicas: int | None = None,
    rank: int | None = None,
) -> DistributedSampler:
    """:func:`training_sampler` for one process of a distributed run: its share of every epoch's draws.

    ``num_replicas`` and ``rank`` default to those of the initialised process group.
    """
    fraction = check_tumour_fraction(tumour_fraction)
    common = dict(even_divisible=True, num_replicas=num_replicas, rank=rank, shuffle=True, seed=int(seed))
    if fraction is None:
        return DistributedSampler(dataset, **common)
    return DistributedWeightedRandomSampler(dataset, tumour_weights(items, fraction), **common)


class RunRefused(SystemExit):
    """A training run refused before it wrote anything, its message saying why and what to do instead.

    A ``SystemExit`` rather than an ``Exception``: the bundle runs its ``initialize`` expressions through MONAI's
    config parser, which wraps every ``Exception`` in ``RuntimeError: Failed to evaluate ConfigExpression`` under a
    50-line traceback, the reason buried in it. ``SystemExit`` passes through, and Python prints its message alone on
    stderr and exits with status 1 (``python -m monai.bundle run ...``; in a process of one's own, catch it).
    """

    def __init__(self, message: str) -> None:
        super().__init__(f"training refused: {message}")


def check_fresh_run(ckpt_dir: str | os.PathLike, resume: bool | str | int) -> None:
    """Refuses to start a fresh run (``resume`` false) in a checkpoint folder holding an earlier run's last checkpoint.

    That checkpoint would stay beside the new run's, and a later ``resume`` loads the one of the highest epoch,
    which may be the earlier run's. User files are not deleted: the run stops before writing anything.

    Raises:
        RunRefused: naming the folder, the checkpoint found and the two ways out (a ``SystemExit``: the bundle
            prints this one line, not a traceback).
    """
    if as_bool(resume, "resume"):
        return
    found = latest_checkpoint(ckpt_dir)
    if found is not None:
        raise RunRefused(
            f"{ckpt_dir} holds {Path(found).name} of an earlier run, and a fresh run there could later resume from "
            "it. Choose another --output_dir (or --ckpt_dir), or pass --resume true to continue that run."
        )


def _last_checkpoints(ckpt_dir: str | os.PathLike, prefix: str = LAST_CHECKPOINT_PREFIX) -> list[tuple[int, str]]:
    """(N, path) of every ``<prefix>_checkpoint_epoch=N.pt`` in ``ckpt_dir``, by N."""
    pattern = re.compile(rf"{re.escape(prefix)}_checkpoint_epoch=(\d+)\.pt$")
    return sorted((int(m.group(1)), p) for p in glob.glob(os.path.join(str(ckpt_dir), "*.pt"))
                  if (m := pattern.match(os.path.basename(p))))


def latest_checkpoint(ckpt_dir: str | os.PathLike, prefix: str = LAST_CHECKPOINT_PREFIX) -> str | None:
    """The newest ``last_checkpoint_epoch=N.pt`` in ``ckpt_dir`` (highest N), or ``None``."""
    found = _last_checkpoints(ckpt_dir, prefix)
    return found[-1][1] if found else None


def latest_epoch(ckpt_dir: str | os.PathLike, prefix: str = LAST_CHECKPOINT_PREFIX) -> int:
    """N of the newest ``last_checkpoint_epoch=N.pt`` in ``ckpt_dir``, 0 when there is none."""
    found = _last_checkpoints(ckpt_dir, prefix)
    return found[-1][0] if found else 0


class KeyMetricState:
    """The best key metric, its epoch and the best-model saver's record of it, as one checkpointable object.

    MONAI keeps the best metric in ``evaluator.state`` and the key-metric ``CheckpointSaver`` its score list, and no
    checkpoint holds either: a resumed run would take its first validation as a new best and overwrite the best model
    with it, however it compares with the epochs before the stop. Saved in the last checkpoint and loaded on resume,
    this restores both (the saver's list through its public ``load_state_dict``; higher scores are better, as with
    MONAI's default ``key_metric_negative_sign=False``).

    Args:
        evaluator: the validation engine with the key metric.
        saver: the ``CheckpointSaver`` with ``save_key_metric=True`` that writes the best model, if any.
        best_file: the file that saver writes (its ``save_dir`` / ``key_metric_filename``). Its record is restored
            only while the file is there: a moved or deleted best model is written afresh by the next validation.
    """

    def __init__(self, evaluator: Engine, saver: Any = None, best_file: str | os.PathLike | None = None) -> None:
        if saver is not None and best_file is None:
            raise ValueError("best_file is needed with saver: the file the saver writes (save_dir/key_metric_filename).")
        self.evaluator, self.saver, self.best_file = evaluator, saver, best_file

    def state_dict(self) -> dict:
        state = self.evaluator.state
        return {"best_metric": float(getattr(state, "best_metric", -1)),
                "best_metric_epoch": int(getattr(state, "best_metric_epoch", -1))}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.evaluator.state.best_metric = float(state["best_metric"])
        self.evaluator.state.best_metric_epoch = int(state["best_metric_epoch"])
        if self.saver is None or self.evaluator.state.best_metric_epoch < 1:
            return
        if Path(self.best_file).is_file():
            self.saver.load_state_dict(_saved_score(self.evaluator.state.best_metric))
        else:
            logger.warning("%s is missing: the next validation writes the best model afresh", self.best_file)


class ResumableEarlyStop(EarlyStopHandler):
    """MONAI's ``EarlyStopHandler`` whose count of validations without improvement and best score are checkpointable.

    MONAI's handler has no ``state_dict``, so a resumed run counted its patience afresh: a run stopped and resumed
    every few epochs would never stop early. Saved in the last checkpoint and loaded on resume, both carry on.
    The arguments are ``EarlyStopHandler``'s.
    """

    def state_dict(self) -> dict:
        stopping = self._stopping()
        best = stopping.best_score  # None until the first validation
        return {"counter": int(stopping.counter), "best_score": None if best is None else float(best)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        stopping = self._stopping()
        stopping.counter = int(state["counter"])
        stopping.best_score = None if state["best_score"] is None else float(state["best_score"])

    def _stopping(self) -> Any:
        """The ignite ``EarlyStopping`` that ``set_trainer`` made."""
        if self._handler is None:
            raise RuntimeError("early stopping has no trainer yet: call set_trainer() before saving or loading it.")
        return self._handler


def _saved_score(score: float) -> dict:
    """An ignite ``Checkpoint`` state recording one saved file of ``score``.

    The key of the list differs between ignite versions ("saved", "_saved"), so it is read from a fresh
    ``Checkpoint``'s public ``state_dict``. The file name is not used: MONAI's saver writes and removes its fixed
    ``key_metric_filename`` whatever the record says.
    """
    key = next(iter(Checkpoint({"score": torch.nn.Identity()}, save_handler=lambda *args: None).state_dict()))
    return {key: [(score, "best")]}


def resume_handlers(resume: bool, ckpt_dir: str | os.PathLike, load_dict: Mapping[str, Any], device: Any = "cpu") -> list:
    """``[CheckpointLoader]`` restoring network, optimizer, scheduler, epoch, best-metric tracking and early stopping
    when ``resume``.

    An entry of ``load_dict`` that a checkpoint from an older version lacks (``OPTIONAL_RESUME_KEYS``) is skipped
    with a warning. Without ``resume``: ``[]``.

    Raises:
        FileNotFoundError: when ``resume`` is set but ``ckpt_dir`` holds no last checkpoint.
        ValueError: when the last checkpoint cannot be read.
    """
    if not as_bool(resume, "resume"):
        return []
    path = latest_checkpoint(ckpt_dir)
    if path is None:
        raise FileNotFoundError(
            f"{ckpt_dir}: resume=true but no '{LAST_CHECKPOINT_PREFIX}_checkpoint_epoch=N.pt' is there; "
            "point ckpt_dir/output_dir at the interrupted run or start without --resume."
        )
    logger.info("resuming from %s", path)
    try:
        keys = set(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as err:  # torch raises several types for corrupt files
        raise ValueError(f"{path}: cannot read the checkpoint to resume from: {err}") from err
    skipped = [k for k in OPTIONAL_RESUME_KEYS if k in load_dict and k not in keys]
    if skipped:
        logger.warning("%s holds no %s (saved by an older version): that tracking starts afresh", path, skipped)
    load = {k: v for k, v in load_dict.items() if k not in skipped}
    return [CheckpointLoader(load_path=path, load_dict=load, map_location=str(resolve_device(device)))]


class LastCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` for the last checkpoint, which also removes those of the run it resumed.

    A saver keeps its ``n_saved`` newest files, but only those it wrote: a resumed run left the checkpoint it
    resumed from (``last_checkpoint_epoch=2.pt``) beside its own (``=3.pt``), and every later resume added one. After
    this run's first save, the last checkpoints up to the epoch it started from are removed: never before, so a
    resumed run that stops before saving leaves the checkpoint it started from. The arguments are
    ``CheckpointSaver``'s, ``file_prefix`` defaulting to ``last`` (the files read by ``resume``).
    """

    def __init__(self, *args: Any, file_prefix: str = LAST_CHECKPOINT_PREFIX, **kwargs: Any) -> None:
        super().__init__(*args, file_prefix=file_prefix, **kwargs)
        self.file_prefix = file_prefix
        #: the epoch this run started from (the resumed checkpoint's), until this run's own checkpoint supersedes it
        self._started_at: int | None = None

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        engine.add_event_handler(Events.STARTED, self._record_start)  # after the resume loader: its epoch
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._remove_resumed)  # after this saver's own save

    def _record_start(self, engine: Engine) -> None:
        self._started_at = int(engine.state.epoch)

    def _remove_resumed(self, engine: Engine) -> None:
        if not self._started_at or latest_epoch(self.save_dir, self.file_prefix) <= self._started_at:
            return  # a fresh run, or none of this run's own checkpoints is written yet
        for epoch, path in _last_checkpoints(self.save_dir, self.file_prefix):
            if epoch <= self._started_at:
                Path(path).unlink(missing_ok=True)
                logger.info("removed %s, the checkpoint this run resumed from: %s supersedes it",
                            path, latest_checkpoint(self.save_dir, self.file_prefix))
        self._started_at = None


FINAL_MODEL_FILENAME = "model_final.pt"


class FinalModelSaver:
    """Saves the network's weights when training completes (also after early stopping), beside ``model.pt``.

    ``model.pt`` is the best validation epoch; ``model_final.pt`` is the last one, the model to use when the schedule,
    not a held-out score, decides when training is done. It gets its own ``model_final.json`` (the run's settings
    from ``model.json``, without a threshold tuned for ``model.pt``), so tuning one model never retunes the other.
    A run that starts removes the previous final model, and the new one is written through a temporary file only
    on completion: an interrupted run leaves none. (MONAI's ``CheckpointSaver(save_final=True)`` also saves on an
    exception, under the same name, which would pass an interrupted model off as the finished one.)
    """

    def __init__(self, network: torch.nn.Module, save_dir: str | os.PathLike, filename: str = FINAL_MODEL_FILENAME):
        self.network = network
        self.path = Path(save_dir) / filename
        self.sidecar = own_sidecar(self.path)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.remove_previous)
        engine.add_event_handler(Events.COMPLETED, self)

    def remove_previous(self, engine: Engine) -> None:
        """A final model from an earlier run in the same folder is not this run's: remove it before training."""
        for path in (self.path, self.sidecar):
            if path.is_file():
                path.unlink()
                logger.info("removed %s of an earlier run: this run writes its own when it completes", path)

    def __call__(self, engine: Engine) -> None:
        network = getattr(self.network, "module", self.network)  # DistributedDataParallel wraps the network
        state = {"model": network.state_dict(), "epoch": int(engine.state.epoch)}
        write_atomic(self.path, lambda temporary: torch.save(state, temporary))
        write_untuned_sidecar(self.path, self.path.parent / MODEL_SIDECAR)  # model.json: written when training starts
        logger.info("training completed at epoch %d: saved %s", engine.state.epoch, self.path)


LR_SCHEDULES = ("plateau", "cosine")


def _check_schedule(name: str) -> None:
    if name not in LR_SCHEDULES:
        raise ValueError(f"unknown lr_schedule {name!r}; choose one of {LR_SCHEDULES}")


class _ScheduleCheck:
    """Records the schedule in the scheduler's state and refuses to resume from another schedule's state.

    Without it a checkpoint of one schedule loads silently into another, and a cosine run resumed with a different
    ``max_epochs`` keeps the old length: the rate reaches zero at the old end and then climbs back.
    """

    schedule: str = ""

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "schedule": self.schedule}  # type: ignore[misc]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # a state without the record comes from a plain torch scheduler: cosine ones have T_max
        saved = state_dict.get("schedule") or ("cosine" if "T_max" in state_dict else "plateau")
        if saved != self.schedule:
            raise ValueError(f"the checkpoint was trained with lr_schedule {saved!r}, this run asks for "
                             f"{self.schedule!r}: resume with the same lr_schedule, or start afresh (resume false)")
        saved_steps, steps = state_dict.get("T_max"), getattr(self, "T_max", None)
        if saved_steps != steps:
            raise ValueError(f"the checkpoint's cosine schedule spans {saved_steps} validations, this run's {steps}: "
                             f"resume with the max_epochs and val_interval it started with, or start afresh")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "schedule"})  # type: ignore[misc]


class PlateauSchedule(_ScheduleCheck, torch.optim.lr_scheduler.ReduceLROnPlateau):
    """``ReduceLROnPlateau`` (mode max) that resumes only from a plateau schedule's state."""

    schedule = "plateau"


class CosineSchedule(_ScheduleCheck, torch.optim.lr_scheduler.CosineAnnealingLR):
    """``CosineAnnealingLR`` that resumes only from a cosine schedule of the same length."""

    schedule = "cosine"


def get_lr_scheduler(
    name: str, optimizer: torch.optim.Optimizer, steps: int, patience: int = 5, factor: float = 0.5
) -> PlateauSchedule | CosineSchedule:
    """The learning-rate schedule, stepped once per validation (``steps``: validations in the run).

    ``plateau`` halves the rate (``factor``) after ``patience`` validations without a better validation Dice;
    ``cosine`` decays it to zero over ``steps`` validations regardless of the metric, so the last model is the
    finished one and no held-out score is needed to pick a checkpoint (what cross-validation and training on every
    patient need). Epochs after the last validation (``max_epochs`` not a multiple of ``val_interval``) train at 0.
    """
    _check_schedule(name)
    if name == "plateau":
        return PlateauSchedule(optimizer, mode="max", factor=factor, patience=patience)
    if int(steps) < 1:
        raise ValueError(f"the cosine schedule needs at least one step (max_epochs // val_interval), got {steps}")
    return CosineSchedule(optimizer, T_max=int(steps))


def lr_step_input(name: str, metric_name: str = "val_dice") -> Callable[[Engine], tuple]:
    """What ``LrScheduleHandler`` passes to ``step()``: the validation metric for ``plateau``, nothing otherwise."""
    _check_schedule(name)
    if name == "plateau":
        return lambda engine: (engine.state.metrics[metric_name],)
    return lambda engine: ()


def early_stop_patience(name: str, patience: int, max_epochs: int) -> int:
    """Early-stopping patience for ``lr_schedule`` ``name``: ``patience`` with ``plateau``; with ``cosine`` more
    validations than the run has, so the schedule, not a validation score, ends training."""
    _check_schedule(name)
    return int(patience) if name == "plateau" else int(max_epochs) + 1


def iteration_log_filter(every: int | str) -> bool | Callable[[Engine, int], bool]:
    """The ``iteration_log`` of the training ``StatsHandler`` (the bundle's ``log_every``): the loss line of every
    ``every``-th iteration, counted over the run; 1 logs each iteration, 0 none.

    A line per iteration buried the epoch lines (540 lines in the quickstart, about 500 an epoch on LGG); the epoch
    lines (validation Dice, best so far) stay, and TensorBoard records every iteration's loss whatever this is.

    Raises:
        ValueError: for anything but a whole number >= 0.
    """
    try:
        value = int(every)
    except (TypeError, ValueError):
        value = -1
    if isinstance(every, bool) or value < 0 or str(value) != str(every).strip():
        raise ValueError(f"log_every must be a whole number of iterations >= 0 (0: no iteration lines) but is {every!r}.")
    if value <= 1:
        return bool(value)
    return lambda engine, iteration: iteration % value == 0


def learning_rate_writer(optimizer: torch.optim.Optimizer, tag: str = "learning_rate") -> Callable:
    """An ``epoch_event_writer`` for ``TensorBoardStatsHandler`` that logs the first parameter group's lr."""

    def _write(engine: Engine, writer: Any) -> None:
        writer.add_scalar(tag, optimizer.param_groups[0]["lr"], engine.state.epoch)
        writer.flush()

    return _write


def _overlay_rgb(image: np.ndarray, truth: np.ndarray | None, pred: np.ndarray) -> np.ndarray:
    """(3, H, W) float in [0, 1]: grey image (dimmed, as `grey_window` shows it), truth in green, prediction in red
    (overlap yellow)."""
    grey = grey_window(image)
    rgb = np.stack([grey, grey, grey]) * 0.7
    if truth is not None:
        rgb[1] = np.where(truth > 0, 1.0, rgb[1])
    rgb[0] = np.where(pred > 0, 1.0, rgb[0])
    return rgb


class TensorBoardOverlayHandler:
    """Writes, at each validation, the validation sample with the most tumour as TensorBoard images.

    Three images per validation: the input channel ``channel``, the truth and the prediction, and an overlay
    (truth green, prediction red). For 3D the axial slice with the most truth (or prediction) is shown.
    MONAI's ``TensorBoardImageHandler`` shows the last batch only and has no overlay, hence this handler.

    Args:
        log_dir: TensorBoard folder (a ``SummaryWriter`` is created there).
        tag: prefix of the image tags.
        channel: the input channel shown (1 = FLAIR for the 3-channel (t1, flair, t1c) layout; clamped).
    """

    def __init__(self, log_dir: str, tag: str = "val", channel: int = 1) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=log_dir)
        self.tag = tag
        self.channel = int(channel)
        self._best: tuple[float, np.ndarray, np.ndarray | None, np.ndarray] | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self._best = None

    def _collect(self, engine: Engine) -> None:
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        for out in outputs:
            image = out["image"].detach().cpu().numpy()
            pred = out["pred"].detach().cpu().numpy()[0]
            truth = out["label"].detach().cpu().numpy()[0] if out.get("label") is not None else None
            ref = truth if truth is not None and truth.any() else pred
            if ref.ndim == 3:
                z = int(np.argmax(ref.reshape(-1, ref.shape[-1]).sum(0)))
                image, pred, ref = image[..., z], pred[..., z], ref[..., z]
                truth = None if truth is None else truth[..., z]
            score = float(ref.sum())
            if self._best is None or score > self._best[0]:
                channel = image[min(self.channel, image.shape[0] - 1)]
                self._best = (score, channel, truth, pred)

    def _write(self, engine: Engine) -> None:
        if self._best is None:
            return
        _, image, truth, pred = self._best
        step = engine.state.epoch
        # Arrays are in (x, y) order; TensorBoard wants rows first, hence the transposes.
        grey = (image - image.min()) / (np.ptp(image) + 1e-8)
        self.writer.add_image(f"{self.tag}/input", grey.T[None], step)
        if truth is not None:
            self.writer.add_image(f"{self.tag}/truth", truth.T[None].astype(np.float32), step)
        self.writer.add_image(f"{self.tag}/prediction", pred.T[None].astype(np.float32), step)
        self.writer.add_image(f"{self.tag}/overlay", _overlay_rgb(image, truth, pred).transpose(0, 2, 1), step)
        self.writer.flush()


def save_run_config(output_dir: str | os.PathLike, config: Mapping[str, Any], name: str = "config_resolved.json") -> Path:
    """Writes the run's resolved top-level settings next to its outputs (atomic), so a run can be reproduced."""
    text = json.dumps(dict(config), indent=2, default=str, sort_keys=True) + "\n"
    return write_text_atomic(Path(output_dir) / name, text)
