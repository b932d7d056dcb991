"""DeltaSTNOptimizer: online hyperparameter tuning behind an ordinary optimizer's interface.

One ``train_step`` = a w₀ step with the user's optimizer on the unperturbed training loss, then
a Θ step on the perturbed loss with w₀ held fixed. One ``val_step`` = a λ/σ step on the
validation loss minus τ·entropy with regularizers off. Modes (Bae & Grosse 2020, MacKay et al.
2019): ``delta`` (centered + linearized Θ step, the default), ``centered`` (no linearization) and
``stn`` (uncentered: all weights trained jointly on the perturbed loss).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .. import distributed as _distributed
from ..context import Perturbation
from ..errors import HyperTuneError, NonFiniteLossError, StateDictError
from ..history import History, Record
from ..linearize import linearized_call, needs_op_rewrites
from ..model import HyperModel

Mode = Literal["delta", "centered", "stn"]
NonFinite = Literal["raise", "skip"]
LossFn = Callable[[Any, Any], Tensor]
_FORMAT = "hypertune.DeltaSTNOptimizer"
#: Θ's default learning rate in the centered modes (Adam; benchmarks/RESULTS.md, compare.py).
DEFAULT_RESPONSE_LR = 1e-3
_VERSION = 1


@dataclass
class StepResult:
    """What a step did. Losses are Python floats; ``hparams`` are the values after the step."""

    loss: float
    hparams: dict[str, float]
    response_loss: float | None = None
    skipped: bool = False
    updated: bool = True
    extra: dict[str, float] = field(default_factory=dict)


def _adam(params: Sequence[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """Adam with its fused kernel where there is one: Θ is as large as w₀, and on CPU the
    per-tensor loop costs 8× the fused step (benchmarks/response_optimizer_step.py)."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError, TypeError):  # no fused kernel for this device or torch
        return torch.optim.Adam(params, lr=lr)


@contextmanager
def _no_grad_for(params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Hold parameters fixed so no graph is built through them."""
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


@contextmanager
def _running_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Batch-norm layers use batch statistics but leave running statistics to the w₀ pass."""
    norms = [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats and m.training
    ]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


def _running_stats(module: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """Copies of the statistics a train-mode forward updates, to restore if the step is refused."""
    return [
        (buf, buf.detach().clone())
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats and m.training
        for buf in (m.running_mean, m.running_var, m.num_batches_tracked)
        if buf is not None
    ]


@contextmanager
def _mode(module: nn.Module, training: bool) -> Iterator[None]:
    """Put the model in train/eval mode for a step; a model already there is left as the user set it."""
    if module.training == training:
        yield
        return
    flags = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _split_inputs(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, tuple):
        return inputs, {}
    return (inputs,), {}


@contextmanager
def _call_census(hm: HyperModel, active: bool) -> Iterator[set[str]]:
    """Record which hyper-layers a forward pass calls (first step only: hooks cost a little)."""
    called: set[str] = set()
    handles = []
    if active:
        for path, layer in hm.hyper_layers().items():
            handles.append(layer.register_forward_pre_hook(lambda *_, p=path: called.add(p)))
    try:
        yield called
    finally:
        for h in handles:
            h.remove()


def _uncalled_error(hm: HyperModel, called: set[str]) -> HyperTuneError | None:
    missing = hm.unreached_layers(called)
    unread = hm.unread_hparams()
    problems = []
    if missing:
        problems.append(
            f"the model's forward never called hyper-layer(s) {missing}: it uses their weights directly "
            "(e.g. F.linear(x, self.proj.weight)), so their response Θ could never learn. Wrap the "
            f"original model with HyperModel.wrap(..., exclude={missing!r})"
        )
    if unread:
        problems.append(
            f"no module read hyperparameter(s) {unread} during the training forward pass (no "
            "hypertune.hparam(name) call), so tuning them would change nothing: read them in a module's "
            "forward, or leave them out of hparams"
        )
    if not problems:
        return None
    return HyperTuneError("; ".join(problems) + "; nothing was updated")


def _first_rows(tree: Any, rows: int, n: int) -> Any:
    """The first ``n`` examples of every batched tensor in ``tree`` (others unchanged)."""
    if n == rows:
        return tree

    def take(t: Any) -> Any:
        if torch.is_tensor(t) and t.dim() >= 1 and t.shape[0] == rows:
            return t[:n]
        return t

    return pytree.tree_map(take, tree)


def _resolve(model: nn.Module) -> HyperModel:
    """The HyperModel inside ``model``: itself, or under DDP and/or torch.compile wrappers."""
    try:
        return _distributed._inner_hyper_model(model)
    except HyperTuneError as err:
        raise HyperTuneError(f"DeltaSTNOptimizer: {err}") from None


@contextmanager
def _autocast_disabled() -> Iterator[None]:
    """Leave any autocast region the caller opened: backward passes must not run under autocast."""
    with ExitStack() as stack:
        for device_type in ("cpu", "cuda"):
            try:
                enabled = torch.is_autocast_enabled(device_type)
            except TypeError:  # torch < 2.4 has no per-device query
                enabled = torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
            if enabled:
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


@contextmanager
def _eager() -> Iterator[None]:
    """Run compiled modules eagerly: a compiled graph would drop forward-AD tangents."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:  # torch < 2.6: compiled HyperModels are refused in delta mode
        yield
        return
    with set_stance("force_eager"):
        yield


class DeltaSTNOptimizer:
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
        tune_scales: tune σ (with the entropy bonus); if False, λ steps are unperturbed.
        warmup_steps: train steps before val_step starts moving λ.
        response_every: take the Θ step on every k-th train step only (centered modes).
        response_fraction: take the Θ step on this leading fraction of each batch. Both trade
            Θ's sample count for speed (benchmarks/overhead.py measures the cost; the paper's
            setting is 1 and 1.0).
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
        tune_scales: bool = True,
        warmup_steps: int = 0,
        nonfinite: NonFinite = "raise",
        response_every: int = 1,
        response_fraction: float = 1.0,
        autocast: torch.dtype | None = None,
        grad_scaler: Any = None,
    ) -> None:
        if mode not in ("delta", "centered", "stn"):
            raise HyperTuneError(f"mode={mode!r}: choose 'delta' (default), 'centered' or 'stn'")
        if nonfinite not in ("raise", "skip"):
            raise HyperTuneError(f"nonfinite={nonfinite!r}: choose 'raise' or 'skip'")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise HyperTuneError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if isinstance(optimizer, torch.optim.LBFGS):
            raise HyperTuneError(
                "LBFGS needs a closure that re-evaluates the loss, which train_step cannot give it: "
                "use a first-order optimizer such as SGD or Adam"
            )
        if not (isinstance(warmup_steps, int) and warmup_steps >= 0):
            raise HyperTuneError(f"warmup_steps={warmup_steps!r} must be a non-negative int")
        if not (isinstance(response_every, int) and response_every >= 1):
            raise HyperTuneError(f"response_every={response_every!r} must be an int >= 1")
        if not 0 < response_fraction <= 1:
            raise HyperTuneError(f"response_fraction={response_fraction!r} must lie in (0, 1]")
        built = isinstance(response_optimizer, str) and response_optimizer in ("adam", "clone")
        if not (built or response_optimizer is None or isinstance(response_optimizer, torch.optim.Optimizer)):
            raise HyperTuneError(
                f"response_optimizer={response_optimizer!r}: pass a torch.optim.Optimizer over "
                "model.response_parameters(), 'adam' (default in the centered modes) or 'clone'"
            )
        if response_optimizer is None:
            response_optimizer = "clone" if mode == "stn" else "adam"
        if response_lr is not None:
            if response_optimizer != "adam":
                theirs = response_optimizer if isinstance(response_optimizer, str) else "yours"
                raise HyperTuneError(
                    f"response_lr sets the learning rate of the Adam hypertune builds for Θ, but Θ's "
                    f"optimizer here is {theirs!r} (in mode='stn' the default is a clone of your "
                    "optimizer): drop response_lr, or pass response_optimizer='adam'"
                )
            if not (isinstance(response_lr, (int, float)) and math.isfinite(response_lr) and response_lr > 0):
                raise HyperTuneError(f"response_lr={response_lr!r} must be a positive finite float")
        if not entropy_weight >= 0:
            raise HyperTuneError(f"entropy_weight={entropy_weight!r} must be >= 0")
        if autocast is not None and autocast not in (torch.bfloat16, torch.float16):
            raise HyperTuneError(f"autocast={autocast!r}: choose torch.bfloat16, torch.float16 or None")
        if grad_scaler is not None and not all(
            hasattr(grad_scaler, a) for a in ("scale", "unscale_", "update", "is_enabled")
        ):
            raise HyperTuneError(
                f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}"
            )
        self.model = model
        self.hyper_model = hm = _resolve(model)
        # DDP averages w₀'s gradients; Θ, λ and σ stay out of its buckets and are averaged here.
        self._ddp = _distributed.find_ddp(model)
        if self._ddp is not None:
            _distributed.check_ddp(self._ddp)
        else:
            self._check_not_bypassing_ddp()
        # Θ and λ steps run on this rank's module: through DDP they would give it no gradient.
        self._local_model: nn.Module = self._ddp.module if self._ddp is not None else model
        self._compiled = any(
            type(m).__name__ == "OptimizedModule" for m in (model, self._local_model)
        ) or getattr(hm, "_compiled_call_impl", None) is not None
        if self._compiled and mode == "delta" and getattr(torch.compiler, "set_stance", None) is None:
            raise HyperTuneError(
                "a compiled model in mode='delta' needs torch >= 2.6 (torch.compiler.set_stance) to "
                "run its linearized Θ step eagerly: upgrade torch, or use mode='centered'"
            )
        self.autocast = autocast
        self.grad_scaler = grad_scaler
        self._rewrite_ops = mode == "delta" and needs_op_rewrites(hm)
        self.mode: Mode = mode
        self.entropy_weight = float(entropy_weight)
        self.tune_scales = tune_scales
        self.warmup_steps = warmup_steps
        self.nonfinite: NonFinite = nonfinite
        self.response_every = response_every
        self.response_fraction = float(response_fraction)

        self._base_params = hm.base_parameters()
        self._response_params = hm.response_parameters()
        self._hyper_params = hm.hyper_parameters()
        self._take_over(optimizer)
        self.optimizer = optimizer

        # Θ's learning rate follows the user's schedule only when hypertune built its optimizer;
        # a user-supplied one keeps whatever schedule the user attaches to it.
        self._follows_lr = isinstance(response_optimizer, str)
        if response_optimizer == "clone":
            response_optimizer = self._clone_for_response(optimizer)
        elif response_optimizer == "adam":
            lr = DEFAULT_RESPONSE_LR if response_lr is None else float(response_lr)
            response_optimizer = _adam(self._response_params, lr)
        self.response_optimizer = response_optimizer
        if hyper_optimizer is None:
            groups: list[dict[str, Any]] = [{"params": [hm.hparams.unconstrained]}]
            if tune_scales:
                groups.append({"params": [hm.hparams.raw_scale]})
            hyper_optimizer = torch.optim.RMSprop(groups, lr=hyper_lr)
        self.hyper_optimizer = hyper_optimizer
        self._lr_reference = (
            float(optimizer.param_groups[0]["lr"]),
            [float(g["lr"]) for g in response_optimizer.param_groups],
        )
        hm.centered = mode != "stn"
        self.train_steps = 0
        self.val_steps = 0
        self.skipped_steps = 0
        self.history = History()
        if self._ddp is not None:
            # Every rank starts from rank 0's Θ, λ, σ (DDP's constructor broadcast w₀ already).
            _distributed.broadcast_hyperstate(hm, self._ddp.process_group)
            self._averaged = {id(p) for p in (*self._response_params, *self._hyper_params)}

    # ---- set-up ----------------------------------------------------------------------------
    def _take_over(self, optimizer: torch.optim.Optimizer) -> None:
        """Check the user's optimizer covers w₀ exactly; move Θ/λ/σ out of it."""
        base = {id(p) for p in self._base_params}
        special = {id(p) for p in self._response_params} | {id(p) for p in self._hyper_params}
        held = [p for g in optimizer.param_groups for p in g["params"]]
        foreign = [p for p in held if id(p) not in base and id(p) not in special]
        if foreign:
            shapes = ", ".join(str(tuple(p.shape)) for p in foreign[:5])
            raise HyperTuneError(
                f"the optimizer holds {len(foreign)} parameter(s) the wrapped model does not own "
                f"(shapes {shapes}): build it after HyperModel.wrap, from the wrapped model's "
                "parameters (model.parameters() or model.base_parameters())"
            )
        held_ids = {id(p) for p in held}
        names = {id(p): n for n, p in self.hyper_model.named_parameters()}
        missing = [names.get(id(p), "?") for p in self._base_params if p.requires_grad and id(p) not in held_ids]
        if missing:
            raise HyperTuneError(
                f"{len(missing)} trainable parameter(s) of the model are in no optimizer and would "
                f"never train: {missing[:8]}; build the optimizer from model.parameters() "
                "(or freeze them with requires_grad_(False))"
            )
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in special]
        for p in [p for p in held if id(p) in special]:
            optimizer.state.pop(p, None)

    def _clone_for_response(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        settings = dict(optimizer.defaults)
        settings["lr"] = optimizer.param_groups[0]["lr"]
        if "weight_decay" in settings:
            settings["weight_decay"] = 0.0
        try:
            return type(optimizer)(self._response_params, **settings)
        except (TypeError, ValueError) as err:
            raise HyperTuneError(
                f"could not build a {type(optimizer).__name__} for the response parameters ({err}); "
                "pass response_optimizer=... built over model.response_parameters()"
            ) from err

    def _follow_lr(self) -> None:
        """Scale Θ's learning rates with the user's schedule on their optimizer."""
        base0, resp0 = self._lr_reference
        if not self._follows_lr or base0 == 0:
            return
        ratio = float(self.optimizer.param_groups[0]["lr"]) / base0
        for group, lr0 in zip(self.response_optimizer.param_groups, resp0):
            group["lr"] = lr0 * ratio

    # ---- the guarded update ----------------------------------------------------------------
    def _update(
        self,
        loss: Tensor,
        params: Sequence[nn.Parameter],
        optimizers: Sequence[torch.optim.Optimizer],
        what: str,
        buffers: Sequence[tuple[Tensor, Tensor]] = (),
    ) -> bool:
        """Backward, refuse non-finite loss or gradients, step. True if the step was taken.

        ``buffers`` are (buffer, copy before the forward) pairs restored on refusal, so a bad
        batch cannot leave NaN in BatchNorm's running statistics either.
        """
        scaler = self.grad_scaler if self.grad_scaler is not None and self.grad_scaler.is_enabled() else None
        with _autocast_disabled():
            (loss if scaler is None else scaler.scale(loss)).backward()
        loss_ok = torch.isfinite(loss.detach())
        if self._ddp is not None:
            # Average the gradients DDP does not (Θ, λ, σ) and agree on finiteness, so every rank
            # takes or refuses the same step.
            loss_ok = _distributed.average_gradients(
                [p for p in params if id(p) in self._averaged], loss_ok, self._ddp.process_group
            )
        if scaler is not None:
            unscaled = [o for o in optimizers if any(p.grad is not None for g in o.param_groups for p in g["params"])]
            for opt in unscaled:
                scaler.unscale_(opt)
        grads = [p.grad for p in params if p.grad is not None]
        ok = loss_ok
        if grads:
            # A sum carries any NaN/inf through (inf - inf is NaN) at a fraction of a norm's cost.
            ok = ok & torch.isfinite(torch.stack([g.sum() for g in grads]).sum())
        if scaler is not None and unscaled:
            scaler.update()  # lowers the scale if unscale_ found inf/NaN, else counts a good step
        if not bool(ok):
            for p in params:
                p.grad = None
            with torch.no_grad():
                for buf, saved in buffers:
                    buf.copy_(saved)
            if self.nonfinite == "skip" or (scaler is not None and bool(loss_ok)):
                # With a GradScaler, overflowing scaled gradients are routine: skip, as it does.
                self.skipped_steps += 1
                return False
            raise NonFiniteLossError(
                f"the {what} produced a non-finite loss or gradient (loss={loss.item()}); the step was "
                "refused and no weights, Θ, λ or σ were changed. Lower the learning rate, check the "
                "batch, or pass nonfinite='skip' to skip and count such steps"
            )
        for opt in optimizers:
            opt.step()
        for p in params:
            p.grad = None
        return True

    def _zero_grad(self) -> None:
        for p in (*self._base_params, *self._response_params, *self._hyper_params):
            p.grad = None

    def _autocast(self) -> Any:
        """The autocast region of a step's forward and loss (``autocast=``), else nothing."""
        if self.autocast is None:
            return nullcontext()
        device = self.hyper_model.hparams.unconstrained.device.type
        return torch.autocast(device, dtype=self.autocast)

    def _check_not_bypassing_ddp(self) -> None:
        """Refuse the bare HyperModel of a multi-rank DDP run: its w₀ gradients would not be averaged."""
        if _distributed.prepared_for_ddp(self.hyper_model):
            raise HyperTuneError(
                "this HyperModel is used through DistributedDataParallel (it was prepared for DDP "
                "and this is one of several ranks) but DeltaSTNOptimizer was given the inner "
                "HyperModel, so w₀, Θ, λ and σ would drift apart across ranks: build the optimizer "
                "after DDP, from the DDP module: ddp = hypertune.distributed.prepare_ddp(hyper_model, "
                "...); opt = DeltaSTNOptimizer(ddp, ...)"
            )

    def _objective(self, out: Any, target: Any, loss_fn: LossFn, point: Perturbation) -> tuple[Tensor, Tensor]:
        data_loss = loss_fn(out, target)
        if not torch.is_tensor(data_loss) or data_loss.dim() != 0:
            raise HyperTuneError(
                "loss_fn must return a scalar tensor (use reduction='mean'), got "
                f"{type(data_loss).__name__}{tuple(data_loss.shape) if torch.is_tensor(data_loss) else ''}"
            )
        with _autocast_disabled():  # ||w(δλ)||² in the weights' precision, not autocast's
            penalty = self.hyper_model.training_penalty(point)
        total = data_loss if penalty is None else data_loss + penalty.mean()
        return data_loss, total

    # ---- steps -----------------------------------------------------------------------------
    def train_step(self, inputs: Any, target: Any, loss_fn: LossFn) -> StepResult:
        """One w₀ step and one Θ step on a training batch (one joint step in ``stn`` mode).

        ``inputs`` is what the model is called with: a tensor, a tuple of positional arguments
        or a dict of keyword arguments.
        """
        hm = self.hyper_model
        if self._ddp is None:
            self._check_not_bypassing_ddp()
        args, kwargs = _split_inputs(inputs)
        rows = hm.batch_rows(args, kwargs)
        self._zero_grad()
        with _mode(self.model, True):
            if self.mode == "stn":
                loss, taken = self._stn_step(args, kwargs, target, loss_fn, rows)
                response_loss = None
            else:
                loss, taken = self._base_step(args, kwargs, target, loss_fn)
                response_loss = None
                if self.train_steps % self.response_every == 0:
                    n = max(1, round(rows * self.response_fraction))
                    sub_args, sub_kwargs, sub_target = _first_rows((args, kwargs, target), rows, n)
                    response_loss, taken_r = self._response_step(
                        sub_args, sub_kwargs, sub_target, loss_fn, n
                    )
                    taken = taken and taken_r
        self.train_steps += 1
        return self._record("train", loss, taken, response_loss)

    def _record(self, kind: Literal["train", "val"], loss: float, taken: bool, response_loss: float | None = None) -> StepResult:
        hp = self.hyper_model.hparams
        values, scales = hp.values_and_scales()
        self.history.append(
            Record(self.train_steps, kind, loss, values, scales, response_loss, skipped=not taken)
        )
        return StepResult(loss=loss, hparams=values, response_loss=response_loss, skipped=not taken)

    def _base_step(self, args: tuple[Any, ...], kwargs: dict[str, Any], target: Any, loss_fn: LossFn) -> tuple[float, bool]:
        hm = self.hyper_model
        point = hm.current_point()
        stats = _running_stats(hm)
        with (
            _no_grad_for(self._response_params + self._hyper_params),
            hm.evaluated_at(point),
            hm.collecting_activations(),
        ):
            with self._autocast(), _call_census(hm, self.train_steps == 0) as called:
                out = self.model(*args, **kwargs)
                data_loss, total = self._objective(out, target, loss_fn, point)
            if self.train_steps == 0:
                self._refuse_uncalled(called, stats)
            taken = self._update(total, self._base_params, [self.optimizer], "w₀ step", stats)
        return float(data_loss.detach()), taken

    def _perturbed_point(self, rows: int, linearize: bool) -> Perturbation:
        hp = self.hyper_model.hparams
        with torch.no_grad():
            eps = hp.sample_noise(rows)
            lam = hp.unconstrained.detach().unsqueeze(0)
        response_input = eps if self.hyper_model.centered else lam + eps
        return Perturbation(hp, lam + eps, response_input, linearize=linearize)

    def _response_step(self, args: tuple[Any, ...], kwargs: dict[str, Any], target: Any, loss_fn: LossFn, rows: int) -> tuple[float, bool]:
        hm = self.hyper_model
        point = self._perturbed_point(rows, linearize=self.mode == "delta")
        self._follow_lr()
        with (
            _no_grad_for(self._base_params + self._hyper_params),
            _running_stats_frozen(hm),
            hm.evaluated_at(point),
            hm.collecting_activations(),
        ):
            try:
                with self._autocast():
                    if point.linearize:
                        with _eager():
                            out = linearized_call(
                                lambda: self._local_model(*args, **kwargs), self._rewrite_ops
                            )
                    else:
                        out = self._local_model(*args, **kwargs)
                    data_loss, total = self._objective(out, target, loss_fn, point)
                taken = self._update(total, self._response_params, [self.response_optimizer], "Θ step")
            except (NotImplementedError, RuntimeError) as err:
                # NotImplementedError: no forward-AD formula ("... has not been implemented yet",
                # "You must implement the jvp function ..."); RuntimeError: no backward of one.
                inplace = "modified by an inplace operation" in str(err)
                if not point.linearize or (
                    not isinstance(err, NotImplementedError)
                    and "not implemented" not in str(err).lower()
                    and not inplace
                ):
                    raise
                for p in self._response_params:
                    p.grad = None
                if inplace:
                    raise HyperTuneError(
                        "an in-place op in the model's forward overwrote a tensor that the backward of "
                        f"Δ-STN's linearized Θ step needs ({err}). Make that op out of place (x += y -> "
                        "x = x + y, inplace=True -> False), or use mode='centered', which does not "
                        "linearize; Θ was not updated"
                    ) from err
                raise HyperTuneError(
                    "Δ-STN's linearized Θ step needs forward-mode derivatives (and their backward) of "
                    f"every op in the model's forward, and PyTorch lacks one here: {err}. Use "
                    "mode='centered', which does not linearize; Θ was not updated"
                ) from err
        return float(data_loss.detach()), taken

    def _refuse_uncalled(self, called: set[str], stats: Sequence[tuple[Tensor, Tensor]]) -> None:
        error = _uncalled_error(self.hyper_model, called)
        if error is None:
            return
        with torch.no_grad():
            for buf, saved in stats:
                buf.copy_(saved)
        self._zero_grad()
        raise error

    def _stn_step(self, args: tuple[Any, ...], kwargs: dict[str, Any], target: Any, loss_fn: LossFn, rows: int) -> tuple[float, bool]:
        hm = self.hyper_model
        point = self._perturbed_point(rows, linearize=False)
        self._follow_lr()
        stats = _running_stats(hm)
        with _no_grad_for(self._hyper_params), hm.evaluated_at(point), hm.collecting_activations():
            with self._autocast(), _call_census(hm, self.train_steps == 0) as called:
                out = self.model(*args, **kwargs)
                data_loss, total = self._objective(out, target, loss_fn, point)
            if self.train_steps == 0:
                self._refuse_uncalled(called, stats)
            taken = self._update(
                total,
                self._base_params + self._response_params,
                [self.optimizer, self.response_optimizer],
                "STN step",
                stats,
            )
        return float(data_loss.detach()), taken

    def val_step(self, inputs: Any, target: Any, loss_fn: LossFn) -> StepResult:
        """One λ (and σ) step on a validation batch, regularizers off (eval mode).

        As in the reference code, the λ step evaluates the response w₀ + Θ(λ+ε-λ₀) exactly (no
        linearization) in every centered mode. During warm-up it only reports the loss.
        """
        hm = self.hyper_model
        if self._ddp is None:
            self._check_not_bypassing_ddp()
        args, kwargs = _split_inputs(inputs)
        rows = hm.batch_rows(args, kwargs)
        hp = hm.hparams
        self._zero_grad()
        with _mode(self.model, False), _no_grad_for(self._base_params + self._response_params):
            if self.train_steps < self.warmup_steps:
                with torch.no_grad(), self._autocast():
                    out = self._local_model(*args, **kwargs)
                    loss = loss_fn(out, target)
                return StepResult(loss=float(loss), hparams=hm.hparam_values(), updated=False)
            lam = hp.unconstrained
            if self.tune_scales:
                eps = hp.sample_noise(rows)
            else:
                eps = torch.zeros(1, len(hp), dtype=lam.dtype, device=lam.device)
            perturbed = lam.unsqueeze(0) + eps
            response_input = perturbed - lam.detach() if hm.centered else perturbed
            point = Perturbation(hp, perturbed.detach(), response_input)
            with self._autocast():
                with hm.evaluated_at(point):
                    out = self._local_model(*args, **kwargs)
                loss = loss_fn(out, target)
            objective = loss - self.entropy_weight * hp.entropy() if self.tune_scales else loss
            taken = self._update(objective, self._hyper_params, [self.hyper_optimizer], "λ step")
        self.val_steps += 1
        return self._record("val", float(loss.detach()), taken)

    # ---- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        hp = self.hyper_model.hparams
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "mode": self.mode,
            "hparam_names": list(hp.names),
            "optimizer": self.optimizer.state_dict(),
            "response_optimizer": self.response_optimizer.state_dict(),
            "hyper_optimizer": self.hyper_optimizer.state_dict(),
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
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore everything ``state_dict`` saved; refuses another layout, mode or model whole."""
        hp = self.hyper_model.hparams
        if not isinstance(state, Mapping) or state.get("format") != _FORMAT:
            raise StateDictError("not a DeltaSTNOptimizer state dict (missing format tag)")
        if state.get("version") != _VERSION:
            raise StateDictError(
                f"state dict version {state.get('version')} is not supported (this hypertune writes {_VERSION})"
            )
        if state.get("mode") != self.mode:
            raise StateDictError(
                f"state dict was saved in mode {state.get('mode')!r} but this optimizer runs {self.mode!r}"
            )
        if list(state.get("hparam_names", [])) != hp.names:
            raise StateDictError(
                f"state dict tunes {state.get('hparam_names')} but this model tunes {hp.names}"
            )
        saved = state["hparams"]
        for key, param in (("unconstrained", hp.unconstrained), ("raw_scale", hp.raw_scale)):
            if tuple(saved[key].shape) != tuple(param.shape):
                raise StateDictError(f"hparams.{key} has shape {tuple(saved[key].shape)}, expected {tuple(param.shape)}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.response_optimizer.load_state_dict(state["response_optimizer"])
        self.hyper_optimizer.load_state_dict(state["hyper_optimizer"])
        with torch.no_grad():
            hp.unconstrained.copy_(saved["unconstrained"])
            hp.raw_scale.copy_(saved["raw_scale"])
        counters = state["counters"]
        self.train_steps = int(counters["train_steps"])
        self.val_steps = int(counters["val_steps"])
        self.skipped_steps = int(counters["skipped_steps"])
        base0, resp0 = state["lr_reference"]
        self._lr_reference = (float(base0), [float(v) for v in resp0])
        self.history.load_state_dict(state.get("history", {"records": []}))

    # ---- conveniences ------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """For loops that call it out of habit: steps already leave every gradient cleared."""
        self._zero_grad()

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The user's optimizer's groups, so LR schedulers and loggers that read them still work."""
        return self.optimizer.param_groups

    def hparams(self) -> dict[str, float]:
        return self.hyper_model.hparam_values()

    def scales(self) -> dict[str, float]:
        return self.hyper_model.hparams.scales()
