"""Hugging Face ``Trainer``: :class:`DeltaSTNTrainer` tunes a wrapped model's hyperparameters.

An existing Trainer script changes two things: wrap the model, and use this class with a
split of the *training* data for the λ steps (``tune_dataset``; the weights never train on
it)::

    model = GPT2LMHeadModel(config)
    model = ht.HyperModel.wrap(model, {"dropout": ht.DropoutRate(init=0.1, targets=[...]),
                                       "wd": ht.WeightDecay(init=1e-4)})
    trainer = DeltaSTNTrainer(model=model, args=TrainingArguments(..., weight_decay=0.0),
                              train_dataset=train, eval_dataset=valid, tune_dataset=tune,
                              tune_every=5)
    trainer.train()                      # λ, σ logged as hparam/<name>, sigma/<name>
    trainer.save_model("out")            # the plain model, tuned values baked in

Each optimizer step of the Trainer is one Δ-STN step: ``DeltaSTNOptimizer.train_step`` per
micro-batch (a w₀ and a Θ step; with ``gradient_accumulation_steps = k`` the updates of k
micro-batches are accumulated, :mod:`hypertune.integrations.accumulation`) and, every
``tune_every`` optimizer steps after ``tune_warmup_steps``, one ``val_step`` (λ, σ) on a
batch of ``tune_dataset``. The weights' optimizer is the one the Trainer builds from
``TrainingArguments`` (``optim``, learning rate, betas, ``weight_decay``), or the one passed
as ``optimizers=(opt, scheduler)``; its LR schedule and warm-up apply to w₀ (and Θ's
learning rate follows it). ``max_grad_norm`` clips w₀'s gradient before each update; ``bf16``
and ``fp16`` run the forwards under autocast (fp16 with the Trainer's GradScaler, on devices
that have it). Evaluation, metrics and logging are the Trainer's; the model is evaluated at
the current values λ₀ (regularizers off in eval mode).

Checkpoints (``save_steps``) hold the whole HyperModel (w₀, Θ, λ, σ) as ``pytorch_model.bin``
and the state of every inner optimizer, λ and σ, the step counters, the History and the
position in ``tune_dataset`` in ``optimizer.pt``: ``train(resume_from_checkpoint=...)`` continues
the run exactly (on CPU, bit for bit). :meth:`DeltaSTNTrainer.save_model` (called by you) saves the *unwrapped* model
from a copy, loadable with ``from_pretrained``, plus ``hypertune_values.json`` (final values; a
model's config cannot carry per-site dropout rates, :func:`load_tuned_dropout` applies them).
At the end of ``train()`` the schedule is written to ``output_dir`` as
``hypertune_schedule.csv`` and ``hypertune_schedule.png`` (with matplotlib).

Not supported, refused when the Trainer is built: DeepSpeed, FSDP, several processes or
several GPUs in one process (use the accelerate recipe in the README,
:func:`hypertune.integrations.accelerate.prepare`), ``torch_compile``, ``gradient_checkpointing``, ``model_init``, an
optimizer that is not one ``torch.optim.Optimizer``, and ``weight_decay > 0`` together with a
tuned ``WeightDecay`` (the decay would be applied twice). The loss is the model's own (or
``compute_loss_func``, or label smoothing) as a mean over each micro-batch: token-count
normalization across accumulated micro-batches (``num_items_in_batch``) is not used.

Needs transformers: ``pip install 'hypertune-stn[transformers]'``.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import HyperTuneError, StateDictError
from ..layers import HyperDropout
from ..model import HyperModel
from ..optim import DeltaSTNOptimizer
from ..specs import WeightDecay
from .accumulation import GradientAccumulation

try:
    from transformers import Trainer, TrainingArguments
    from transformers.utils import WEIGHTS_NAME, can_return_loss, find_labels, is_datasets_available
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "hypertune.integrations.transformers needs Hugging Face transformers, an optional dependency: "
        "pip install 'hypertune-stn[transformers]' (or pip install transformers accelerate)"
    ) from err

if is_datasets_available():  # pragma: no cover - datasets is not a test dependency
    import datasets

__all__ = ["DeltaSTNTrainer", "TuneBatches", "load_tuned_dropout", "hparam_logs"]

_FORMAT = "hypertune.DeltaSTNTrainer"
_VERSION = 1
VALUES_NAME = "hypertune_values.json"
SCHEDULE_NAME = "hypertune_schedule"
#: Options of DeltaSTNOptimizer the trainer sets itself (from TrainingArguments) or replaces.
_OWN_OPTIONS = {
    "warmup_steps": "tune_warmup_steps= (counted in optimizer steps)",
    "autocast": "TrainingArguments(bf16=True) or fp16=True",
    "grad_scaler": "TrainingArguments(fp16=True) (the Trainer's GradScaler is used)",
}


def hparam_logs(stn: DeltaSTNOptimizer, *, scales: bool = True) -> dict[str, float]:
    """``{"hparam/<name>": λ, "sigma/<name>": σ}``, for a Trainer's ``log``."""
    values, sigmas = stn.hyper_model.hparams.values_and_scales()
    out = {f"hparam/{n}": v for n, v in values.items()}
    if scales:
        out.update({f"sigma/{n}": v for n, v in sigmas.items()})
    return out


class TuneBatches:
    """Endless shuffled batches of ``dataset`` for the λ steps, resumable from a count.

    Pass ``p`` is a permutation drawn from ``seed + p``, so batch ``n`` is the same whatever
    happened before it: a resumed run draws the batches an uninterrupted run would have.
    A last incomplete batch of each pass is dropped (unless the dataset is smaller than one batch).
    """

    def __init__(self, dataset: Any, batch_size: int, collate: Callable[[list[Any]], Any], seed: int) -> None:
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise HyperTuneError(
                f"tune_dataset must be a map-style dataset (with __len__ and __getitem__), got "
                f"{type(dataset).__name__}"
            )
        if len(dataset) == 0:
            raise HyperTuneError("tune_dataset is empty: give it a held-out split of the training data")
        self.dataset = dataset
        self.batch_size = min(int(batch_size), len(dataset))
        self.collate = collate
        self.seed = int(seed)
        self.drawn = 0

    @property
    def per_pass(self) -> int:
        return len(self.dataset) // self.batch_size

    def __next__(self) -> Any:
        n_pass, index = divmod(self.drawn, self.per_pass)
        g = torch.Generator().manual_seed(self.seed + n_pass)
        order = torch.randperm(len(self.dataset), generator=g)
        rows = order[index * self.batch_size : (index + 1) * self.batch_size].tolist()
        self.drawn += 1
        return self.collate([self.dataset[i] for i in rows])

    def __iter__(self) -> TuneBatches:
        return self


class _StepOptimizer(torch.optim.Optimizer):
    """What the Trainer holds as its optimizer: the steps already happened in ``training_step``.

    Its groups are the weights' optimizer's (so the Trainer's LR scheduler drives w₀, and Θ
    follows), ``step`` does nothing, and its ``state_dict`` is the whole hypertune state, which
    the Trainer saves in ``optimizer.pt`` and restores on resume.
    """

    def __init__(self, stn: DeltaSTNOptimizer, base: torch.optim.Optimizer, tune: TuneBatches) -> None:
        # No Optimizer.__init__: groups, state and defaults are the weights' optimizer's.
        self.stn = stn
        self.base = base
        self.tune = tune

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.base.param_groups

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self.base.state

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        return self.base.defaults

    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        """Nothing: DeltaSTNTrainer.training_step took the Δ-STN step."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.stn.zero_grad()

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "stn": self.stn.state_dict(),
            "tune_batches_drawn": self.tune.drawn,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if not isinstance(state_dict, Mapping) or state_dict.get("format") != _FORMAT:
            raise StateDictError(
                "this checkpoint's optimizer.pt was not written by DeltaSTNTrainer (no hypertune "
                "state: λ, σ and Θ's optimizer cannot be restored); resume from a checkpoint of a "
                "DeltaSTNTrainer run"
            )
        if state_dict.get("version") != _VERSION:
            raise StateDictError(
                f"DeltaSTNTrainer state version {state_dict.get('version')} is not supported (this "
                f"hypertune writes {_VERSION})"
            )
        self.stn.load_state_dict(state_dict["stn"])
        self.tune.drawn = int(state_dict["tune_batches_drawn"])

    def __repr__(self) -> str:
        return f"DeltaSTNTrainer step optimizer over {self.base!r}"


def _unsupported(args: TrainingArguments, world_size: int) -> list[str]:
    """Every TrainingArguments setting DeltaSTNTrainer cannot run, with its fix."""
    problems = []
    if getattr(args, "deepspeed", None):
        problems.append(
            "deepspeed: DeepSpeed owns the backward and the optimizer step, which Δ-STN takes "
            "itself; drop deepspeed=..."
        )
    if getattr(args, "fsdp", None):
        problems.append(
            "fsdp: FSDP shards the weights that Θ's response layers read whole; drop fsdp=..."
        )
    if getattr(args, "torch_compile", False):
        problems.append(
            "torch_compile=True: the Trainer compiles the model after DeltaSTNTrainer has built its "
            "steps on the uncompiled one; drop it (DeltaSTNOptimizer takes a compiled model in a "
            "hand-written loop)"
        )
    if getattr(args, "gradient_checkpointing", False):
        problems.append(
            "gradient_checkpointing=True: its recomputation runs during backward, outside the "
            "HyperModel's forward, where tuned dropout has no per-example rate and Θ's tangents do "
            "not exist; drop it (a smaller per-device batch with gradient_accumulation_steps saves "
            "memory instead)"
        )
    if world_size > 1:
        problems.append(
            f"{world_size} processes: the λ steps are not synchronized across the Trainer's "
            "processes; run one process, or use the accelerate recipe "
            "(hypertune.integrations.accelerate.prepare)"
        )
    if getattr(args, "n_gpu", 1) > 1:
        problems.append(
            f"{args.n_gpu} GPUs in one process (DataParallel): not supported; set "
            "CUDA_VISIBLE_DEVICES to one GPU, or use the accelerate recipe"
        )
    return problems


class DeltaSTNTrainer(Trainer):
    """A ``transformers.Trainer`` that tunes a :class:`~hypertune.HyperModel` with Δ-STN.

    Args:
        model: the wrapped model (``HyperModel.wrap(hf_model, ...)``).
        tune_dataset: held-out examples of the *training* distribution for the λ steps (not the
            eval set you report on); collated with the Trainer's data collator.
        tune_every: one λ step every this many optimizer steps (T_train / T_valid).
        tune_warmup_steps: optimizer steps before the first λ step.
        tune_batch_size: batch size of the λ steps (default: ``per_device_train_batch_size``).
        stn_options: more keyword arguments of :class:`DeltaSTNOptimizer` (``mode``,
            ``hyper_lr``, ``response_lr``, ``entropy_weight``, ``tune_scales``, ...).
        log_scales: also log σ (``sigma/<name>``).
        write_schedule: write ``hypertune_schedule.csv`` / ``.png`` to ``output_dir`` at the end
            of ``train()``.
        **trainer_kwargs: everything ``transformers.Trainer`` takes (``args``, datasets,
            ``data_collator``, ``compute_metrics``, ``callbacks``, ``optimizers``, ...).
    """

    def __init__(
        self,
        model: HyperModel | None = None,
        args: TrainingArguments | None = None,
        *,
        tune_dataset: Any = None,
        tune_every: int = 5,
        tune_warmup_steps: int = 0,
        tune_batch_size: int | None = None,
        stn_options: Mapping[str, Any] | None = None,
        log_scales: bool = True,
        write_schedule: bool = True,
        **trainer_kwargs: Any,
    ) -> None:
        if args is None:
            args = TrainingArguments(output_dir="tmp_trainer")
        problems = _construction_problems(model, tune_dataset, tune_every, tune_warmup_steps, tune_batch_size,
                                          stn_options, trainer_kwargs)
        problems += _unsupported(args, args.world_size)
        if isinstance(model, HyperModel) and args.weight_decay > 0 and any(
            isinstance(s, WeightDecay) for s in model.hparams.specs.values()
        ):
            tuned = [n for n, s in model.hparams.specs.items() if isinstance(s, WeightDecay)]
            problems.append(
                f"weight_decay={args.weight_decay} while hypertune tunes weight decay {tuned}: the "
                "decay would be applied twice; set TrainingArguments(weight_decay=0.0)"
            )
        if problems:
            raise HyperTuneError(
                "DeltaSTNTrainer cannot run with these settings:\n" + "\n".join(f"  - {p}" for p in problems)
            )
        assert isinstance(model, HyperModel)
        optimizers = trainer_kwargs.pop("optimizers", (None, None))
        given = optimizers[0] if optimizers else None
        if given is not None:
            _check_given_optimizer(given, model)
        self.hyper_model = model
        self.tune_every = tune_every
        self.tune_warmup_steps = tune_warmup_steps
        self.stn_options = dict(stn_options or {})
        self.log_scales = log_scales
        self.write_schedule_at_end = write_schedule
        self.stn: DeltaSTNOptimizer | None = None
        self._given_optimizer = given
        self._tune_dataset = tune_dataset
        self._tune_batch_size = tune_batch_size
        self._accumulation: GradientAccumulation | None = None
        self._last_tune_loss: float | None = None
        self._w0_grad_norm: float | None = None
        self._clip_handle: Any = None
        inner = model.module
        if getattr(inner, "config", None) is not None and "config" not in model.__dict__:
            # The Trainer (and code around it) reads model.config: the HyperModel shows the
            # wrapped model's, as a plain attribute (no state-dict entry).
            model.config = inner.config
        # The Trainer builds the weights' optimizer in create_optimizer (or takes the given one).
        super().__init__(model=model, args=args, optimizers=(None, optimizers[1] if optimizers else None),
                         **trainer_kwargs)
        # The Trainer inspected HyperModel.forward(*args, **kwargs); the wrapped model's own
        # signature says which inputs are labels and which dataset columns to keep.
        if self.args.label_names is None:
            self.label_names = find_labels(type(inner))
        self.can_return_loss = can_return_loss(type(inner))
        self.model_accepts_loss_kwargs = False  # the loss is a per-micro-batch mean (see above)

    # ---- the Trainer's hooks ---------------------------------------------------------------------
    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            params = inspect.signature(self.hyper_model.module.forward).parameters
            self._signature_columns = list(params) + list({"label", "label_ids", *self.label_names})

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's (or the given) weights' optimizer, under a DeltaSTNOptimizer."""
        if self.stn is not None:
            return self.optimizer
        if self._given_optimizer is not None:
            base = self._given_optimizer
        else:
            self.optimizer = None
            base = super().create_optimizer(model)
        options = dict(self.stn_options)
        if self.args.fp16:
            scaler = getattr(self.accelerator, "scaler", None)
            if scaler is not None:
                options["grad_scaler"] = scaler
        stn = DeltaSTNOptimizer(self.hyper_model, base, **options)
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            self._clip_handle = base.register_step_pre_hook(self._clip_weights)
        if self.args.gradient_accumulation_steps > 1:
            self._accumulation = GradientAccumulation(stn)
        self.stn = stn
        self.optimizer = _StepOptimizer(stn, base, self._tune_batches())
        return self.optimizer

    def _tune_batches(self) -> TuneBatches:
        """Batches of ``tune_dataset``, with the columns the model does not take removed, as the
        Trainer does for its own loaders."""
        dataset, collate = self._tune_dataset, self.data_collator
        if is_datasets_available() and isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description="tune")
        else:
            collate = self._get_collator_with_removed_columns(collate, description="tune")
        size = self._tune_batch_size or self.args.per_device_train_batch_size
        return TuneBatches(dataset, size, collate, seed=self.args.seed + 1)

    def _clip_weights(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        """Clip w₀'s gradient to ``max_grad_norm`` right before each weights' update."""
        grads = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grads:
            norm = torch.nn.utils.clip_grad_norm_(grads, self.args.max_grad_norm)
            self._w0_grad_norm = float(norm)

    def _clip_grad_norm(self, model: nn.Module) -> Any:
        # Clipping happened inside the weights' update (the gradients are gone by now).
        return self._w0_grad_norm

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        return grad_norm if grad_norm is not None else self._w0_grad_norm

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> Tensor:
        """One micro-batch of a Δ-STN step; the λ step after the last micro-batch of every
        ``tune_every``-th optimizer step."""
        stn = self.stn
        if stn is None:  # pragma: no cover - create_optimizer always runs first
            raise HyperTuneError("DeltaSTNTrainer.training_step ran before create_optimizer")
        accelerated = self.optimizer
        if getattr(accelerated, "scaler", None) is not None:
            # accelerate would call GradScaler.step on an optimizer without gradients: the
            # scaler already served DeltaSTNOptimizer's steps.
            accelerated.scaler = None
        inputs = self._prepare_inputs(inputs)
        model_inputs, labels = self._split_labels(inputs)
        with self.compute_loss_context_manager():
            result = stn.train_step(model_inputs, labels, self._batch_loss)
        if self.accelerator.sync_gradients:
            if self._accumulation is not None:
                self._accumulation.flush()
            step = self.state.global_step + 1  # the optimizer step this micro-batch completes
            if step > self.tune_warmup_steps and step % self.tune_every == 0:
                self._tune_step()
        loss = result.loss / self.current_gradient_accumulation_steps
        return torch.tensor(loss if math.isfinite(loss) else float("nan"), device=self.args.device)

    def _tune_step(self) -> None:
        assert self.stn is not None
        batches = self._step_optimizer().tune
        batch = self._prepare_inputs(next(batches))
        model_inputs, labels = self._split_labels(batch)
        with self.compute_loss_context_manager():
            self._last_tune_loss = self.stn.val_step(model_inputs, labels, self._batch_loss).loss

    def _step_optimizer(self) -> _StepOptimizer:
        opt: Any = self.optimizer
        while not isinstance(opt, _StepOptimizer):
            opt = opt.optimizer  # accelerate's AcceleratedOptimizer around it
        return opt

    def _split_labels(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """Labels go to the model (it computes its own loss) unless the Trainer computes it."""
        if (self.label_smoother is not None or self.compute_loss_func is not None) and "labels" in inputs:
            rest = dict(inputs)
            return rest, rest.pop("labels")
        return inputs, None

    def _batch_loss(self, outputs: Any, labels: Any) -> Tensor:
        """The micro-batch's mean loss, as ``Trainer.compute_loss`` forms it."""
        if self.compute_loss_func is not None:
            return self.compute_loss_func(outputs, labels, num_items_in_batch=None)
        if labels is not None and self.label_smoother is not None:
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

            causal = self.hyper_model.module._get_name() in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
            return self.label_smoother(outputs, labels, shift_labels=causal)
        if isinstance(outputs, Mapping):
            if outputs.get("loss") is None:
                raise HyperTuneError(
                    f"the model returned no loss (keys {list(outputs)}): pass labels in the batch, "
                    "or a compute_loss_func=..."
                )
            return outputs["loss"]
        return outputs[0]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's logs, with λ (``hparam/<name>``), σ and the last λ step's loss on training logs."""
        if self.stn is not None and "loss" in logs:
            logs.update(hparam_logs(self.stn, scales=self.log_scales))
            if self._last_tune_loss is not None:
                logs["tune/loss"] = self._last_tune_loss
        super().log(logs, start_time)

    # ---- saving ----------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints (``_internal_call``) keep the whole HyperModel; otherwise the plain model
        with its tuned values baked in is saved (from a copy: training can go on)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        if _internal_call:
            torch.save(self.hyper_model.state_dict(), os.path.join(output_dir, WEIGHTS_NAME))
        else:
            plain, values = unwrapped_copy(self.hyper_model)
            if hasattr(plain, "save_pretrained"):
                plain.save_pretrained(output_dir)
            else:
                torch.save(plain.state_dict(), os.path.join(output_dir, WEIGHTS_NAME))
            Path(output_dir, VALUES_NAME).write_text(json.dumps(values, indent=2) + "\n")
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        path = os.path.join(resume_from_checkpoint, WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise StateDictError(
                f"{resume_from_checkpoint} holds no {WEIGHTS_NAME}, so it was not written by "
                "DeltaSTNTrainer: resume from a checkpoint-<step> folder of a DeltaSTNTrainer run"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        mine = self.hyper_model.state_dict()
        missing = sorted(set(mine) - set(state))
        unexpected = sorted(set(state) - set(mine))
        shapes = [k for k in set(mine) & set(state) if tuple(mine[k].shape) != tuple(state[k].shape)]
        if missing or unexpected or shapes:
            raise StateDictError(
                f"{path} does not fit this HyperModel (missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}, other shapes {shapes[:5]}): wrap the same model with the same "
                "hyperparameters as the run that wrote it"
            )
        self.hyper_model.load_state_dict(state)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is not None:
            self._load_from_checkpoint(best)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        output = super().train(*args, **kwargs)
        if self.write_schedule_at_end and self.args.should_save and self.stn is not None and len(self.stn.history):
            self.write_schedule(self.args.output_dir)
        return output

    def write_schedule(self, folder: str | os.PathLike[str]) -> list[Path]:
        """``hypertune_schedule.csv`` (every step's λ, σ, losses) and ``.png`` (needs matplotlib)."""
        from ..logging import write_csv

        if self.stn is None:
            raise HyperTuneError("no schedule yet: call train() first")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written = [write_csv(self.stn.history, folder / f"{SCHEDULE_NAME}.csv")]
        try:
            from ..plotting import plot_schedule

            steps = self.args.gradient_accumulation_steps
            per_epoch = None
            if self.state.max_steps and self.args.num_train_epochs and self.state.num_train_epochs:
                per_epoch = max(1, self.state.max_steps * steps // max(1, int(self.state.num_train_epochs)))
            fig = plot_schedule(self.stn.history, folder / f"{SCHEDULE_NAME}.png", model=self.hyper_model,
                                steps_per_epoch=per_epoch, title="Δ-STN schedule", dpi=90)
            import matplotlib.pyplot as plt

            plt.close(fig)
            written.append(folder / f"{SCHEDULE_NAME}.png")
        except ImportError as err:
            warnings.warn(f"no schedule plot ({err}): pip install matplotlib", stacklevel=2)
        return written


# ---- construction checks ---------------------------------------------------------------------------
def _construction_problems(
    model: Any,
    tune_dataset: Any,
    tune_every: Any,
    tune_warmup_steps: Any,
    tune_batch_size: Any,
    stn_options: Any,
    trainer_kwargs: Mapping[str, Any],
) -> list[str]:
    """Every problem of DeltaSTNTrainer's own arguments, with its fix."""
    problems = []
    if not isinstance(model, HyperModel):
        problems.append(
            f"model must be a HyperModel, got {type(model).__name__}: wrap it first with "
            "hypertune.HyperModel.wrap(model, hparams=...)"
        )
    if trainer_kwargs.get("model_init") is not None:
        problems.append("model_init: pass the wrapped model itself (model=HyperModel.wrap(...))")
    if tune_dataset is None:
        problems.append(
            "tune_dataset is missing: give a held-out split of the training data for the λ steps "
            "(the weights never train on it)"
        )
    if not (isinstance(tune_every, int) and tune_every >= 1):
        problems.append(f"tune_every={tune_every!r} must be an int >= 1")
    if not (isinstance(tune_warmup_steps, int) and tune_warmup_steps >= 0):
        problems.append(f"tune_warmup_steps={tune_warmup_steps!r} must be an int >= 0")
    if tune_batch_size is not None and not (isinstance(tune_batch_size, int) and tune_batch_size >= 1):
        problems.append(f"tune_batch_size={tune_batch_size!r} must be an int >= 1")
    for key, instead in _OWN_OPTIONS.items():
        if stn_options and key in stn_options:
            problems.append(f"stn_options[{key!r}] is set by DeltaSTNTrainer: use {instead}")
    optimizers = trainer_kwargs.get("optimizers")
    if optimizers is not None:
        if not isinstance(optimizers, (tuple, list)) or len(optimizers) != 2:
            problems.append("optimizers must be a pair (optimizer or None, lr_scheduler or None)")
        elif isinstance(optimizers[0], (tuple, list)):
            problems.append(
                f"optimizers[0] holds {len(optimizers[0])} optimizers: give one optimizer for the "
                "model's weights (hypertune builds the ones for Θ, λ and σ)"
            )
        elif isinstance(optimizers[0], DeltaSTNOptimizer):
            problems.append(
                "optimizers[0] is a DeltaSTNOptimizer: pass the plain optimizer over the model's "
                "weights, DeltaSTNTrainer builds the DeltaSTNOptimizer"
            )
        elif optimizers[0] is not None and not isinstance(optimizers[0], torch.optim.Optimizer):
            problems.append(f"optimizers[0] is a {type(optimizers[0]).__name__}, not a torch.optim.Optimizer")
    if trainer_kwargs.get("optimizer_cls_and_kwargs") is not None and optimizers is not None and optimizers[0] is not None:
        problems.append("pass either optimizers=(opt, ...) or optimizer_cls_and_kwargs, not both")
    return problems


def _check_given_optimizer(optimizer: torch.optim.Optimizer, model: HyperModel) -> None:
    owned = {id(p) for p in model.parameters()}
    foreign = sum(1 for g in optimizer.param_groups for p in g["params"] if id(p) not in owned)
    if foreign:
        raise HyperTuneError(
            f"DeltaSTNTrainer: the given optimizer holds {foreign} parameter(s) the wrapped model does "
            "not own: build it after HyperModel.wrap, from the wrapped model's parameters"
        )


# ---- the unwrapped model -----------------------------------------------------------------------------
def unwrapped_copy(hm: HyperModel) -> tuple[nn.Module, dict[str, Any]]:
    """The plain model of a copy of ``hm`` (tuned values baked in) and the values to record.

    ``hm`` itself stays a working HyperModel. The values are ``{"hparams": {name: value},
    "dropout": {module path: rate}}``: the rates of the tuned dropout modules, which a model's
    config cannot carry per site (see :func:`load_tuned_dropout`).
    """
    tuned_paths = [p for p, m in hm.module.named_modules() if isinstance(m, HyperDropout)]
    plain = copy.deepcopy(hm).unwrap()
    rates = {}
    for path in tuned_paths:
        m = plain.get_submodule(path) if path else plain
        rate = getattr(m, "p", None)
        if isinstance(rate, (int, float)):
            rates[path] = float(rate)
    return plain, {"hparams": hm.hparam_values(), "dropout": rates}


def load_tuned_dropout(model: nn.Module, folder: str | os.PathLike[str]) -> dict[str, float]:
    """Set the dropout rates that :meth:`DeltaSTNTrainer.save_model` recorded on ``model``.

    ``from_pretrained`` builds dropout modules from the config's rates; this puts each tuned
    site's final rate back. Returns ``{path: rate}``.
    """
    values = json.loads(Path(folder, VALUES_NAME).read_text())
    rates: dict[str, float] = values.get("dropout", {})
    missing = [p for p in rates if not _has_submodule(model, p)]
    if missing:
        raise HyperTuneError(f"the model has no module(s) {missing[:5]}: load the model saved next to {VALUES_NAME}")
    for path, rate in rates.items():
        module = model.get_submodule(path)
        if not hasattr(module, "p"):
            raise HyperTuneError(f"{path} is a {type(module).__name__}, not a dropout module")
        module.p = rate
    return rates


def _has_submodule(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True
