"""DeltaSTNOptimizer: online hyperparameter tuning behind an ordinary optimizer's interface.

One ``train_step`` = a w₀ step with the user's optimizer on the unperturbed training loss and a
Θ step on the perturbed loss with w₀ held fixed. One ``val_step`` = a λ/σ step on the
validation loss minus τ·entropy with regularizers off. Modes (Bae & Grosse 2020, MacKay et al.
2019): ``delta`` (centered + linearized Θ step, the default), ``centered`` (no linearization) and
``stn`` (uncentered: all weights trained jointly on the perturbed loss).

This class holds the state (inner optimizers, counters, History) and runs each step as one
transaction; the modes' step functions are in :mod:`.steps`, the transaction in
:mod:`.transaction`, argument checks in :mod:`.arguments`, the saved layout in :mod:`.state`,
the Θ steps' perturbations in :mod:`.noise`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .. import distributed as _distributed
from ..errors import CHECKPOINTING_FIX, HyperTuneError, NonFiniteLossError, StateDictError, add_note
from ..history import History, Record
from ..linearize import needs_op_rewrites
from ..model import HyperModel
from ..notices import listing, notice
from . import state as saved_state
from .arguments import (
    BYPASSING_DDP, Mode, NonFinite, argument_problems, frozen_error, frozen_layers, layer_weights, placement,
    take_over_problems,
)
from .inner import (
    DEFAULT_RESPONSE_LR, doubled_decay_notice, float16_notice, hyper_optimizer_for, reference_lr, response_optimizer_for, take_over,
)
from .noise import ResponseNoise
from .steps import TRAIN_STEPS, Batch, LossFn, StepContext, hyper_part, mode as model_mode, scalar_loss
from .transaction import UNCHANGED, BufferTracker, StepTransaction, refusal, unrestored_note

_FORMAT = saved_state.FORMAT
_VERSION = saved_state.VERSION
#: Θ step on every k-th train step by default: a default step costs about 2× a plain one instead
#: of ~3×. With σ₀ = 2, k = 3 kept k = 1's tuning quality on MNIST and FashionMNIST; with σ held
#: (the default now) that is still to be measured (benchmarks/RESULTS.md, "Defaults that tune").
DEFAULT_RESPONSE_EVERY = 3


@dataclass
class StepResult:
    """What a step did. Losses are Python floats; ``hparams`` are the values after the step."""

    loss: float
    hparams: dict[str, float]
    response_loss: float | None = None
    skipped: bool = False
    updated: bool = True
    extra: dict[str, float] = field(default_factory=dict)


def _resolve(model: nn.Module) -> HyperModel:
    """The HyperModel inside ``model``: itself, or under DDP and/or torch.compile wrappers."""
    try:
        return _distributed._inner_hyper_model(model)
    except HyperTuneError as err:
        inside = None
        if isinstance(model, nn.Module) and "wrap the model first" in str(err):  # not a known wrapper
            inside = next((path for path, m in model.named_modules() if isinstance(m, HyperModel)), None)
        if inside is not None:
            raise HyperTuneError(
                f"DeltaSTNOptimizer: the HyperModel sits inside {type(model).__name__} (at {inside!r}): a "
                "wrapper (e.g. peft's get_peft_model) was applied after HyperModel.wrap. Apply it to the "
                "plain model first, then wrap the result"
            ) from None
        raise HyperTuneError(f"DeltaSTNOptimizer: {err}") from None


class DeltaSTNOptimizer(torch.optim.Optimizer):
    """Tunes a HyperModel's hyperparameters while ``optimizer`` trains its weights.

    Args:
        model: the HyperModel (or a DistributedDataParallel around it).
        optimizer: any torch.optim optimizer over the model's weights. If it was built from
            ``model.parameters()`` the hyper-state and Θ are moved out of it into their own
            optimizers; every trainable weight of the model must be in it.
        mode: ``"delta"`` (default), ``"centered"`` or ``"stn"``.
        response_optimizer: optimizer over Θ, or ``"adam"`` / ``"clone"`` to have hypertune build
            one. ``"adam"`` (the default in the centered modes) is ``Adam(lr=response_lr)``: there
            Θ learns only from how the perturbed loss correlates with ε, a gradient orders of
            magnitude smaller than w₀'s whose scale moves with λ, so the weights' SGD barely moves
            Θ off its start at P = 0 and λ waits thousands of steps; Adam is scale-free
            (benchmarks/RESULTS.md). ``"clone"`` (the default in ``stn`` mode, where Θ is trained
            jointly with w₀ on the same loss, and the reference code's choice) is the same class
            and settings as ``optimizer``. Built ones have no weight decay (Θ estimates a
            Jacobian; shrinking it biases it) and follow ``optimizer``'s learning-rate schedule.
        response_lr: the learning rate of the ``"adam"`` Θ optimizer (default 1e-3).
        hyper_optimizer: optimizer over λ and σ; default RMSprop(lr=hyper_lr) as in the paper.
        entropy_weight: τ, the weight of the perturbation entropy bonus.
        tune_scales: tune σ (with the entropy bonus, inside ``HyperParameters.scale_range``);
            by default σ is held at each spec's σ₀ and λ steps are unperturbed, as in the
            reference code: a tuned σ shrank before Θ had learned (benchmarks/RESULTS.md).
        warmup_steps: train steps before val_step starts moving λ.
        response_every: take the Θ step on every k-th train step only (centered modes; default 3,
            made for a λ step every few train steps: keep at least one Θ step per λ step).
        response_fraction: take the Θ step on this leading fraction of each batch. Both trade
            Θ's sample count for speed (benchmarks/overhead.py measures the cost; the paper's
            setting is 1 and 1.0).
        antithetic: draw the Θ steps' perturbations in pairs, ε then −ε on the next Θ step. It
            cancels, between the two, the zero-mean term ε·∇L_train(w₀) that dominates Θ's
            gradient while w₀ converges; each draw is still N(0, σ²), so Θ's objective is the
            same (:mod:`hypertune.optim.noise`). Off by default (benchmarks/RESULTS.md).
        nonfinite: ``"raise"`` a NonFiniteLossError or ``"skip"`` (and count) a step whose loss
            or gradients are not finite; either way nothing is written.
        autocast: a reduced dtype (``torch.bfloat16``, or ``torch.float16`` with a
            ``grad_scaler``) to run every forward and loss of the steps under ``torch.autocast``
            on the model's device; backward passes and the weight-decay penalty stay in full
            precision. Wrapping the step calls in ``torch.autocast`` yourself works the same.
        grad_scaler: a ``torch.amp.GradScaler`` for float16: every step's loss is scaled before
            backward and every inner optimizer's gradients unscaled before the non-finite check;
            a step whose *scaled* gradients overflow is skipped (counted in ``skipped_steps``)
            and the scale lowered, as GradScaler does, whatever ``nonfinite`` says. Save its
            state with :func:`hypertune.checkpoint.save`.

    Every step is a transaction: it checks both of its parts (finite losses and gradients,
    nothing raised) before writing either, and a refused step leaves the weights, Θ, λ, σ, every
    inner optimizer's state, buffers, RNG states, counters and History as they were
    (:mod:`hypertune.optim.transaction`). LR schedulers attach to this object or to
    ``optimizer`` alike: :attr:`param_groups` are ``optimizer``'s.

    Distributed: pass the DistributedDataParallel module built by
    :func:`hypertune.distributed.prepare_ddp`; Θ, λ and σ are broadcast from rank 0 here and their
    gradients averaged across ranks at every step. A compiled model (``torch.compile``) runs the
    w₀ and λ steps compiled and the linearized Θ step of ``delta`` mode eagerly (compiled graphs
    drop forward-AD tangents).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        mode: Mode = "delta",
        response_optimizer: torch.optim.Optimizer | Literal["adam", "clone"] | None = None,
        response_lr: float | None = None,
        hyper_optimizer: torch.optim.Optimizer | None = None,
        hyper_lr: float = 1e-2,
        entropy_weight: float = 1e-3,
        tune_scales: bool = False,
        warmup_steps: int = 0,
        nonfinite: NonFinite = "raise",
        response_every: int = DEFAULT_RESPONSE_EVERY,
        response_fraction: float = 1.0,
        antithetic: bool = False,
        autocast: torch.dtype | None = None,
        grad_scaler: Any = None,
    ) -> None:
        # Check everything first, build the inner optimizers next, and only then change the
        # user's optimizer: a refusal leaves it as it was.
        problems = argument_problems(
            optimizer=optimizer, mode=mode, response_optimizer=response_optimizer, response_lr=response_lr,
            hyper_optimizer=hyper_optimizer, hyper_lr=hyper_lr, entropy_weight=entropy_weight,
            tune_scales=tune_scales, warmup_steps=warmup_steps, nonfinite=nonfinite,
            response_every=response_every, response_fraction=response_fraction, antithetic=antithetic,
            autocast=autocast,
            grad_scaler=grad_scaler,
        )
        hm = _resolve(model)
        where = placement(model, hm, mode)
        problems += where.problems
        base, response, hyper = hm.base_parameters(), hm.response_parameters(), hm.hyper_parameters()
        if isinstance(optimizer, torch.optim.Optimizer):
            problems += take_over_problems(hm, optimizer, base, response, hyper, response_optimizer, hyper_optimizer)
        if problems:
            raise _arguments_error(problems)
        # Θ's learning rate follows the user's schedule only when hypertune built its optimizer;
        # a user-supplied one keeps whatever schedule the user attaches to it.
        follows_lr = not isinstance(response_optimizer, torch.optim.Optimizer)
        response_optimizer = response_optimizer_for(response_optimizer, mode, optimizer, response, response_lr)
        hyper_optimizer = hyper_optimizer_for(hm, hyper_optimizer, hyper_lr, tune_scales)
        take_over(optimizer, response + hyper)  # the only write to the user's objects
        if (doubled := doubled_decay_notice(optimizer, hm.decayed_parameters())) is not None:
            notice(doubled)
        if (half := float16_notice(hm)) is not None:
            notice(half)
        if mode == "stn":
            unfoldable = {path: r for path, layer in hm.hyper_layers().items() if (r := layer.bake_refusal()) is not None}
            if unfoldable:
                notice(
                    "hypertune: mode='stn' folds Θ into the weights when the run ends (unwrap), and "
                    f"hyper-layer(s) {listing([repr(k) for k in unfoldable])} cannot take that (the first: "
                    f"{next(iter(unfoldable.values()))}). "
                    "The run trains, but unwrap() will refuse; the centered modes ('delta', the default, "
                    "or 'centered') need no fold"
                )

        self.model = model
        self.hyper_model = hm
        self.mode: Mode = mode
        self.entropy_weight = float(entropy_weight)
        self.tune_scales = tune_scales
        self.warmup_steps = warmup_steps
        self.nonfinite: NonFinite = nonfinite
        self.response_every = response_every
        self.response_fraction = float(response_fraction)
        self._noise = ResponseNoise(antithetic)
        self.autocast = autocast
        self.grad_scaler = grad_scaler
        self._ddp = where.ddp
        self._compiled = where.compiled
        self._follows_lr = follows_lr
        self._ctx = StepContext(
            model=model, local_model=where.local_model, hyper_model=hm, base_params=base,
            response_params=response, hyper_params=hyper, optimizer=optimizer,
            response_optimizer=response_optimizer, hyper_optimizer=hyper_optimizer,
            autocast=autocast, rewrite_ops=mode == "delta" and needs_op_rewrites(hm), noise=self._noise,
        )
        self._lr_reference = (reference_lr(optimizer.param_groups[0]), [float(g["lr"]) for g in response_optimizer.param_groups])
        self._buffers = BufferTracker(hm)
        self._layer_weights = layer_weights(hm)  # re-checked each step: a layer frozen later
        self._tuning_params = [hm.hparams.unconstrained, *response]  # λ and Θ: re-checked too
        # Step kinds that have committed once, with the placement they did it at (see
        # transaction.py: a first step, or the first after model.to(...), is fully snapshotted).
        self._proven: dict[str, tuple[Any, ...]] = {}
        hm.centered = mode != "stn"
        self.train_steps = 0
        self.val_steps = 0
        self.skipped_steps = 0
        self.history = History()
        self._averaged: set[int] = set()
        if where.ddp is not None:
            # Every rank starts from rank 0's Θ, λ, σ (DDP's constructor broadcast w₀ already).
            _distributed.broadcast_hyperstate(hm, where.ddp.process_group)
            self._averaged = {id(p) for p in (*response, *hyper)}

    # ---- the inner optimizers (reassignable: the Lightning integration wraps the first) ------
    @property
    def optimizer(self) -> Any:
        """The user's optimizer over w₀."""
        return self._ctx.optimizer

    @optimizer.setter
    def optimizer(self, value: Any) -> None:
        self._ctx.optimizer = value

    @property
    def response_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer over Θ."""
        return self._ctx.response_optimizer

    @response_optimizer.setter
    def response_optimizer(self, value: torch.optim.Optimizer) -> None:
        self._ctx.response_optimizer = value

    @property
    def hyper_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer over λ and σ."""
        return self._ctx.hyper_optimizer

    @hyper_optimizer.setter
    def hyper_optimizer(self, value: torch.optim.Optimizer) -> None:
        self._ctx.hyper_optimizer = value

    # ---- what LR schedulers and loggers read: the user's optimizer's ------------------------
    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        """The user's optimizer's groups, so LR schedulers attached to this object drive w₀'s
        learning rate (and Θ's, which follows it)."""
        return self.optimizer.param_groups

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self.optimizer.state

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        """Refused: a step needs the batch. Use :meth:`train_step` and :meth:`val_step`."""
        raise HyperTuneError(
            "DeltaSTNOptimizer.step() cannot take a step without the batch: call "
            "opt.train_step(inputs, target, loss_fn) for the weights and Θ (it counts as the "
            "optimizer step for LR schedulers) and opt.val_step(inputs, target, loss_fn) for λ and σ"
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise HyperTuneError(
            "add parameters to your optimizer before building the DeltaSTNOptimizer (and wrap "
            "every module first): its parameters are split between w₀, Θ, λ and σ when it is built"
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        """For loops that call it out of habit: steps already leave every gradient cleared."""
        ctx = self._ctx
        for p in (*ctx.base_params, *ctx.response_params, *ctx.hyper_params):
            p.grad = None

    def __repr__(self) -> str:
        return f"DeltaSTNOptimizer(mode={self.mode!r}, optimizer={type(self.optimizer).__name__})"

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if "_noise" not in state:  # pickled before antithetic draws existed
            self._noise = self._ctx.noise = ResponseNoise(False)
        if "_layer_weights" not in state:
            self._layer_weights = layer_weights(self.hyper_model)

    @property
    def antithetic(self) -> bool:
        """Whether the Θ steps draw their perturbations in antithetic pairs."""
        return self._noise.antithetic

    # ---- steps -------------------------------------------------------------------------------
    def train_step(self, inputs: Any, target: Any, loss_fn: LossFn) -> StepResult:
        """One w₀ step and one Θ step on a training batch (one joint step in ``stn`` mode).

        ``inputs`` is what the model is called with: a tensor, a tuple of positional arguments
        or a dict of keyword arguments. Both parts are checked before either is written.
        """
        self._check_can_step("train_step")
        hm = self.hyper_model
        batch = self._batch(inputs, target)
        response = None
        if self.mode != "stn" and self.train_steps % self.response_every == 0:
            response = batch.first(max(1, round(batch.rows * self.response_fraction)))
        with hm.exclusive(), model_mode(self.model, True), self._placement_followed():
            self._follow_lr()
            self.zero_grad()
            tx = self._transaction("train")
            self._noise.discard()  # a draw left by a refused step, or one that raised, is not this step's
            with _Rollback(tx, "train_step", self.zero_grad, inputs):
                loss, response_loss = TRAIN_STEPS[self.mode](
                    self._ctx, tx, batch, loss_fn, census=self.train_steps == 0, response=response
                )
                taken, losses = self._finish(tx, "train_step", loss, response_loss)
            if taken:
                self.train_steps += 1
                self._noise.commit()
            # LR schedulers attached to this object warn unless they see its step was called.
            self._opt_called = True
            return self._record("train", losses, taken)

    def val_step(self, inputs: Any, target: Any, loss_fn: LossFn) -> StepResult:
        """One λ (and σ) step on a validation batch, regularizers off (eval mode).

        During warm-up, and while every learning rate of the weights' optimizer is 0 (the end of
        a schedule: neither w₀ nor Θ can follow λ any more, so a λ step would only drift the
        values reported), it only reports the loss.
        """
        self._check_can_step("val_step")
        hm = self.hyper_model
        batch = self._batch(inputs, target)
        with hm.exclusive(), model_mode(self.model, False), self._placement_followed():
            self.zero_grad()
            if self.train_steps < self.warmup_steps or self._weights_frozen_by_lr():
                with torch.no_grad(), self._ctx.autocast_region():
                    out = self._ctx.local_model(*batch.args, **batch.kwargs)
                    loss = scalar_loss(loss_fn(out, batch.target))
                return StepResult(loss=float(loss), hparams=hm.hparam_values(), updated=False)
            tx = self._transaction("val")
            with _Rollback(tx, "val_step", self.zero_grad, inputs):
                loss = hyper_part(self._ctx, tx, batch, loss_fn, self.tune_scales, self.entropy_weight)
                taken, losses = self._finish(tx, "val_step", loss, None)
            if taken:
                self.val_steps += 1
            return self._record("val", losses, taken)

    def _weights_frozen_by_lr(self) -> bool:
        """Whether the weights' optimizer has a learning rate of exactly 0 in every group (a
        tensor rate counts as non-zero: reading it would sync a device)."""
        rates = [g.get("lr") for g in self.optimizer.param_groups]
        return bool(rates) and all(isinstance(r, (int, float)) and r == 0 for r in rates)

    def _batch(self, inputs: Any, target: Any) -> Batch:
        try:
            return Batch.of(self.hyper_model, inputs, target)
        except HyperTuneError as err:
            if self._ddp is not None:
                # raised on this process alone, before any collective: the others would wait
                add_note(
                    err,
                    "hypertune: under DDP every process must take the step with at least one example, "
                    "or the other processes wait for this one (drop_last=True on the DistributedSampler "
                    "avoids an empty last batch)",
                )
            raise

    def _check_can_step(self, what: str) -> None:
        if torch.is_inference_mode_enabled() or not torch.is_grad_enabled():
            raise HyperTuneError(
                f"{what} computes gradients, so it cannot run under torch.no_grad() or "
                "torch.inference_mode(): call it outside that block (evaluate with model(...) "
                f"inside it); {UNCHANGED}"
            )
        if self._ddp is None and _distributed.prepared_for_ddp(self.hyper_model):
            raise HyperTuneError(BYPASSING_DDP)
        frozen = frozen_layers(self._layer_weights)
        if frozen:
            self.hyper_model.hyper_layers()  # layers replaced after wrapping (peft adapters): that error first
            raise HyperTuneError(f"{frozen_error(frozen)}; {UNCHANGED}")
        if not all(p.requires_grad for p in self._tuning_params):
            raise HyperTuneError(
                "λ or Θ (the HyperModel's own parameters) were frozen (requires_grad=False), e.g. by "
                "model.requires_grad_(False): their steps would move nothing. Unfreeze them with "
                "model.hparams.requires_grad_(True) and, for Θ, "
                "[p.requires_grad_(True) for p in model.response_parameters()]; " + UNCHANGED
            )
        checkpointed = self.hyper_model.checkpointed_modules() if what == "train_step" else []
        if checkpointed:
            raise HyperTuneError(
                f"activation (gradient) checkpointing is on in {listing(checkpointed)}. It recomputes "
                "the forward during backward, outside the HyperModel's forward, where tuned dropout "
                f"has no per-example rate and Δ-STN's tangents do not exist: {CHECKPOINTING_FIX}; {UNCHANGED}"
            )

    def _transaction(self, kind: str) -> StepTransaction:
        scaler = self.grad_scaler if self.grad_scaler is not None and self.grad_scaler.is_enabled() else None
        average = None
        if self._ddp is not None:
            group = self._ddp.process_group
            averaged = self._averaged

            def average(params: Any, ok: Tensor) -> Tensor:
                return _distributed.average_gradients([p for p in params if id(p) in averaged], ok, group)

        return StepTransaction(
            buffers=self._buffers,
            full=self._proven.get(kind) != self._placement(),
            device=self.hyper_model.hparams.unconstrained.device,
            scaler=scaler,
            average=average,
        ).begin()

    @contextmanager
    def _placement_followed(self) -> Iterator[None]:
        """After ``model.to(dtype/device)``, bring Θ's and λ's optimizer state along (fused Adam
        refuses a float32 moment for a float64 Θ); the user's optimizer is left as the user built
        it. A step that raises takes the conversion back with everything else."""
        placement = self._placement()
        previous = getattr(self, "_state_placement", placement)
        undo: list[tuple[Any, Tensor, str, Tensor]] = []
        if previous != placement:
            with torch.no_grad():
                for opt in (self.response_optimizer, self.hyper_optimizer):
                    for p, entry in getattr(opt, "state", {}).items():
                        if not torch.is_tensor(p):
                            continue
                        for key, value in list(entry.items()):
                            if torch.is_tensor(value) and value.is_floating_point() and value.shape == p.shape:
                                undo.append((opt, p, key, value))
                                entry[key] = value.to(dtype=p.dtype, device=p.device)
        try:
            yield
        except BaseException:
            for opt, p, key, value in undo:  # into the entry a rolled-back step put back
                if p in opt.state:
                    opt.state[p][key] = value
            raise
        self._state_placement = placement

    def _placement(self) -> tuple[Any, ...]:
        """Dtypes and devices of the parameters (a model moved after the optimizer was built can
        make an inner optimizer raise inside ``step``)."""
        ctx = self._ctx
        return tuple((p.dtype, p.device) for p in (*ctx.base_params[:1], *ctx.response_params[:1], *ctx.hyper_params[:1]))

    def _finish(
        self, tx: StepTransaction, what: str, loss: Tensor, response_loss: Tensor | None
    ) -> tuple[bool, tuple[float, float | None]]:
        """Check every part, then write all of them; False if the step is skipped. The losses
        come back as floats from the check's own device sync, not one more."""
        read = [loss] if response_loss is None else [loss, response_loss]
        problems, overflow_only, floats = tx.verdict(read)
        losses = (floats[0], floats[1] if response_loss is not None else None)
        if not problems:
            problems = tx.commit()
        if not problems:
            self._proven["train" if what == "train_step" else "val"] = self._placement()
            return True, losses
        unrestored = tx.rollback()
        if self.nonfinite == "skip" or overflow_only:
            # With a GradScaler, overflowing scaled gradients are routine: skip, as it does.
            self.skipped_steps += 1
            if unrestored:
                notice(f"hypertune: {what} was skipped, {unrestored_note(unrestored)[len('hypertune: '):]}")
            return False, losses
        err = refusal(problems, what)
        if unrestored:
            add_note(err, unrestored_note(unrestored))
        raise err

    def _record(self, kind: Literal["train", "val"], losses: tuple[float, float | None], taken: bool) -> StepResult:
        values, scales = self.hyper_model.hparams.values_and_scales()
        loss, r_loss = losses
        self.history.append(Record(self.train_steps, kind, loss, values, scales, r_loss, skipped=not taken))
        return StepResult(loss=loss, hparams=values, response_loss=r_loss, skipped=not taken, updated=taken)

    def _follow_lr(self) -> None:
        """Scale Θ's learning rates with the user's schedule on their optimizer."""
        captured, resp0 = self._lr_reference
        base0 = reference_lr(self.optimizer.param_groups[0], captured)
        if not self._follows_lr or base0 == 0:
            return
        ratio = float(self.optimizer.param_groups[0]["lr"]) / base0
        for group, lr0 in zip(self.response_optimizer.param_groups, resp0):
            group["lr"] = lr0 * ratio

    # ---- state -------------------------------------------------------------------------------
    def _inner(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer,
            "response_optimizer": self.response_optimizer,
            "hyper_optimizer": self.hyper_optimizer,
        }

    def state_dict(self) -> dict[str, Any]:
        hp = self.hyper_model.hparams
        with self.hyper_model.exclusive():
            return {
                "format": _FORMAT,
                "version": _VERSION,
                "mode": self.mode,
                "hparam_names": list(hp.names),
                "specs": saved_state.spec_signature(hp.specs),
                "optimizer": self.optimizer.state_dict(),
                "response_optimizer": self.response_optimizer.state_dict(),
                "hyper_optimizer": self.hyper_optimizer.state_dict(),
                "param_shapes": {k: saved_state.param_shapes(o) for k, o in self._inner().items()},
                "hparams": {
                    "unconstrained": hp.unconstrained.detach().clone(),
                    "raw_scale": hp.raw_scale.detach().clone(),
                },
                "counters": {
                    "train_steps": self.train_steps,
                    "val_steps": self.val_steps,
                    "skipped_steps": self.skipped_steps,
                },
                "lr_reference": [self._lr_reference[0], list(self._lr_reference[1])],
                "history": self.history.state_dict(),
                "noise": self._noise.state_dict(),
            }

    def state_dict_problems(self, state: Any) -> list[str]:
        """Every reason ``state`` cannot be loaded into this optimizer (empty if it can)."""
        hp = self.hyper_model.hparams
        return saved_state.state_problems(
            state,
            mode=self.mode,
            names=hp.names,
            hyper={"unconstrained": hp.unconstrained, "raw_scale": hp.raw_scale},
            inner=self._inner(),
            response_groups=len(self.response_optimizer.param_groups),
            specs=saved_state.spec_signature(hp.specs),
        )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore everything ``state_dict`` saved; refuses, listing every problem, before
        writing anything."""
        problems = self.state_dict_problems(state)
        if problems:
            raise saved_state.refuse(problems)
        hp = self.hyper_model.hparams
        with self.hyper_model.exclusive():
            inner = self._inner()
            backup = saved_state.backup(inner)
            hyper_backup = (hp.unconstrained.detach().clone(), hp.raw_scale.detach().clone())
            try:
                for key, opt in inner.items():
                    opt.load_state_dict(state[key])
                with torch.no_grad():
                    hp.unconstrained.copy_(state["hparams"]["unconstrained"])
                    hp.raw_scale.copy_(state["hparams"]["raw_scale"])
                history = History()
                history.load_state_dict(state.get("history", {"records": []}))
            except Exception as err:
                for key, opt in inner.items():
                    opt.load_state_dict(backup[key])
                with torch.no_grad():
                    hp.unconstrained.copy_(hyper_backup[0])
                    hp.raw_scale.copy_(hyper_backup[1])
                raise StateDictError(
                    f"the state could not be applied ({type(err).__name__}: {err}); everything was put back"
                ) from err
            counters = state["counters"]
            self.train_steps = int(counters["train_steps"])
            self.val_steps = int(counters["val_steps"])
            self.skipped_steps = int(counters["skipped_steps"])
            base0, resp0 = state["lr_reference"]
            self._lr_reference = (float(base0), [float(v) for v in resp0])
            self.history = history
            self._noise.load_state_dict(state.get("noise", {}), hp)

    def _local_state(self) -> dict[str, Any]:
        """What differs between DDP ranks and the state dict (rank 0's) cannot hold: the pending
        half of this rank's antithetic pair (each rank draws its own ε)."""
        noise = self._noise.state_dict()
        if noise["pending"] is not None:
            noise["pending"] = noise["pending"].cpu()
        return {"noise": noise}

    def _load_local_state(self, state: Mapping[str, Any]) -> None:
        self._noise.load_state_dict(state.get("noise", {}), self.hyper_model.hparams)

    # ---- conveniences ------------------------------------------------------------------------
    def hparams(self) -> dict[str, float]:
        return self.hyper_model.hparam_values()

    def scales(self) -> dict[str, float]:
        return self.hyper_model.hparams.scales()


class _Rollback:
    """Puts a step back when anything in it raises, and says so on the error."""

    def __init__(self, tx: StepTransaction, what: str, clear_grads: Callable[[], None], inputs: Any = None) -> None:
        self.tx = tx
        self.what = what
        self.clear_grads = clear_grads  # a part that raised in its backward left partial gradients
        self.inputs = inputs

    def __enter__(self) -> StepTransaction:
        return self.tx

    def __exit__(self, kind: Any, err: BaseException | None, tb: Any) -> None:
        if err is None or self.tx.committed or isinstance(err, NonFiniteLossError):
            return
        undone = self.tx.can_undo_writes() or not self.tx.writing
        unrestored = self.tx.rollback()
        self.clear_grads()
        if isinstance(err, TypeError) and isinstance(self.inputs, list) and "list" in str(err):
            add_note(
                err,
                f"hypertune: {self.what} passes inputs to the model as they are given, and a list is one "
                "argument (a model may take a list, as torchvision's detection models do): pass several "
                "positional arguments as a tuple, or keyword arguments as a dict",
            )
        if undone:
            add_note(err, f"hypertune: {self.what} was rolled back: {UNCHANGED}.")
            if unrestored:
                add_note(err, unrestored_note(unrestored))
        else:
            add_note(
                err,
                f"hypertune: an inner optimizer raised while {self.what} wrote its update: buffers, "
                "RNG states, counters and History were put back, but parameters it had already "
                "updated may have moved.",
            )


def _arguments_error(problems: list[str]) -> HyperTuneError:
    if len(problems) == 1:
        return HyperTuneError(f"{problems[0]}; your optimizer was not changed")
    lines = "\n".join(f"  - {p}" for p in problems)
    return HyperTuneError(
        f"DeltaSTNOptimizer found {len(problems)} problem(s); your optimizer was not changed:\n{lines}"
    )


