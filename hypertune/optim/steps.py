"""The three modes' step functions, each a sequence of parts of one :class:`StepTransaction`.

``delta`` and ``centered`` take a w₀ part on the unperturbed training loss and a Θ part on the
perturbed loss with w₀ held fixed (linearized in ``delta``); ``stn`` takes one joint part. The λ/σ
part of a ``val_step`` is shared. A part computes its forward and backward and writes nothing but
gradients (and a train-mode forward's buffers): the transaction writes the updates.

Both parts of a centered train step see the same w₀, the one before this step's update, as in a
simultaneous gradient step: it lets the step check the Θ part before writing the w₀ part, so a
refused step needs no copy of the weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from ..context import Perturbation
from ..errors import HyperTuneError
from ..linearize import linearized_call
from ..model import HyperModel, batch_size, first_examples
from ..notices import listing, notice
from .noise import ResponseNoise
from .transaction import StepTransaction, autocast_disabled

LossFn = Callable[[Any, Any], Tensor]


# ---- contexts a step runs under ------------------------------------------------------------------
@contextmanager
def no_grad_for(params: Sequence[nn.Parameter]) -> Iterator[None]:
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
def running_stats_frozen(module: nn.Module) -> Iterator[None]:
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


@contextmanager
def mode(module: nn.Module, training: bool) -> Iterator[None]:
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


@contextmanager
def eager() -> Iterator[None]:
    """Run compiled modules eagerly: a compiled graph would drop forward-AD tangents."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:  # torch < 2.6: compiled HyperModels are refused in delta mode
        yield
        return
    with set_stance("force_eager"):
        yield


@contextmanager
def call_census(hm: HyperModel, active: bool) -> Iterator[set[str]]:
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


def census_error(hm: HyperModel, called: set[str], data_loss: Tensor) -> HyperTuneError | None:
    """The first step's census: hyper-layers the forward bypassed while still using their weights,
    and hyperparameters no module read, are an error (tuning either would change nothing).

    A layer never called whose weights the loss does not depend on either is unused on this
    batch (a head the forward skips, an expert no token was routed to, a layer LayerDrop
    skipped): that is not an error, its Θ learns from the data on the steps that call it, and a
    notice says so. A tied weight counts as reached through any module that shares it.
    """
    missing = hm.unreached_layers(called)
    used = graph_leaves(data_loss) if missing else set()
    layers = hm.hyper_layers()
    bypassed = [path for path in missing if any(id(p) in used for p in layers[path].parameters())]
    unused = [path for path in missing if path not in bypassed]
    if unused:
        notice(
            f"hypertune: the first training step's forward did not call hyper-layer(s) {listing(unused)} "
            "and does not use their weights (a branch this batch did not take, a layer LayerDrop skipped, "
            "or a module the forward never uses); their response learns from the data only on steps "
            "that call them. To tune without them, wrap with exclude=[...]"
        )
    unread = hm.unread_hparams()
    problems = []
    if bypassed:
        problems.append(
            f"the model's forward never called hyper-layer(s) {bypassed} but uses their weights directly "
            "(e.g. F.linear(x, self.proj.weight)), so their response Θ could never learn. wrap() changed "
            "the model in place, so undo it first and wrap the plain model again without them: "
            f"plain = hyper_model.unwrap(); hyper_model = HyperModel.wrap(plain, ..., exclude={bypassed!r}), "
            "then build the optimizers again"
        )
    if unread:
        problems.append(
            f"no module read hyperparameter(s) {unread} during the training forward pass (no "
            "hypertune.hparam(name) call), so tuning them would change nothing: read them in a module's "
            "forward, or leave them out of hparams"
        )
    if not problems:
        return None
    return HyperTuneError("; ".join(problems))


def _inplace_error(err: BaseException) -> bool:
    """PyTorch's "a tensor the backward needs was overwritten in place" (the fix depends on the pass)."""
    return "modified by an inplace operation" in str(err)


def graph_leaves(root: Tensor) -> set[int]:
    """``id`` of every leaf tensor (parameter) that ``root``'s autograd graph reaches."""
    leaves: set[int] = set()
    seen: set[Any] = set()
    stack = [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf's gradient sink
        if variable is not None:
            leaves.add(id(variable))
        stack.extend(child for child, _ in node.next_functions)
    return leaves


# ---- a batch -------------------------------------------------------------------------------------
@dataclass
class Batch:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    target: Any
    rows: int
    list_examples: bool = False  # the examples are the entries of lists (detection images)

    @classmethod
    def of(cls, hm: HyperModel, inputs: Any, target: Any) -> Batch:
        """``inputs`` is what the model is called with: a tensor, a tuple or a dict of arguments."""
        if isinstance(inputs, Mapping):
            args, kwargs = (), dict(inputs)
        elif isinstance(inputs, tuple):
            args, kwargs = inputs, {}
        else:
            args, kwargs = (inputs,), {}
        found = batch_size(args, kwargs, target)
        if found is None:
            hm.batch_rows(args, kwargs, target)  # raises its error
        rows, lists = found  # type: ignore[misc]
        if rows == 0:
            raise HyperTuneError("the batch is empty (0 rows): skip empty batches before the step")
        return cls(args, kwargs, target, rows, lists)

    def first(self, n: int) -> Batch:
        """The first ``n`` examples of every batched tensor (others unchanged)."""
        if n == self.rows:
            return self
        args, kwargs, target = first_examples((self.args, self.kwargs, self.target), self.rows, n, self.list_examples)
        return Batch(args, kwargs, target, n, self.list_examples)


# ---- what the step functions work on -------------------------------------------------------------
@dataclass
class StepContext:
    """The models and parameter roles a step works on, fixed when the optimizer is built."""

    model: nn.Module  # what the w₀ (and joint STN) forward runs through: DDP or the HyperModel
    local_model: nn.Module  # this rank's module, for the Θ and λ steps
    hyper_model: HyperModel
    base_params: list[nn.Parameter]
    response_params: list[nn.Parameter]
    hyper_params: list[nn.Parameter]
    optimizer: Any
    response_optimizer: torch.optim.Optimizer
    hyper_optimizer: torch.optim.Optimizer
    autocast: torch.dtype | None
    rewrite_ops: bool
    noise: ResponseNoise  # the Θ steps' ε (independent or antithetic pairs)

    def autocast_region(self) -> Any:
        if self.autocast is None:
            return nullcontext()
        return torch.autocast(self.hyper_model.hparams.unconstrained.device.type, dtype=self.autocast)


def objective(ctx: StepContext, out: Any, target: Any, loss_fn: LossFn, point: Perturbation) -> tuple[Tensor, Tensor]:
    """(data loss, data loss + tuned training penalties)."""
    data_loss = scalar_loss(loss_fn(out, target))
    with autocast_disabled():  # ||w(δλ)||² in the weights' precision, not autocast's
        penalty = ctx.hyper_model.training_penalty(point)
    total = data_loss if penalty is None else data_loss + penalty.mean()
    return data_loss, total


def scalar_loss(loss: Any) -> Tensor:
    """``loss_fn``'s result, refused unless it is one number as a tensor (every step reads it so)."""
    if not torch.is_tensor(loss) or loss.dim() != 0:
        raise HyperTuneError(
            "loss_fn must return a scalar tensor (use reduction='mean'), got "
            f"{type(loss).__name__}{tuple(loss.shape) if torch.is_tensor(loss) else ''}"
        )
    if not loss.is_floating_point():
        raise HyperTuneError(
            f"loss_fn must return a floating-point loss, got a {loss.dtype} tensor (a count or a "
            "comparison has no gradient): compute the loss from the output with differentiable operations"
        )
    return loss


def _require_graph(data_loss: Tensor, params: Sequence[nn.Parameter], learner: str = "the weights") -> None:
    """A detached loss would train w₀ on the penalties alone, silently (or give λ nothing)."""
    if not data_loss.requires_grad and any(p.requires_grad for p in params):
        raise HyperTuneError(
            "loss_fn's result does not depend on the model's output (it was detached, or built "
            f"from .item() or numpy), so {learner} would get no gradient from the data: compute "
            "the loss from the output with torch operations"
        )


def perturbed_point(hm: HyperModel, noise: ResponseNoise, rows: int, linearize: bool) -> Perturbation:
    hp = hm.hparams
    with torch.no_grad():
        eps = noise.draw(hp, rows)
        lam = hp.unconstrained.detach().unsqueeze(0)
    response_input = eps if hm.centered else lam + eps
    return Perturbation(hp, lam + eps, response_input, linearize=linearize)


# ---- parts ---------------------------------------------------------------------------------------
def base_part(ctx: StepContext, tx: StepTransaction, batch: Batch, loss_fn: LossFn, census: bool) -> Tensor:
    """w₀ on the unperturbed training loss; running statistics come from this pass only."""
    hm = ctx.hyper_model
    point = hm.current_point()
    with no_grad_for(ctx.response_params + ctx.hyper_params), hm.evaluated_at(point), hm.collecting_activations():
        data_loss, total = _checked_forward(ctx, batch, loss_fn, point, census)
        tx.backward("w₀ step", data_loss, total, ctx.base_params, [ctx.optimizer])
    return data_loss.detach()


def _checked_forward(
    ctx: StepContext, batch: Batch, loss_fn: LossFn, point: Perturbation, census: bool
) -> tuple[Tensor, Tensor]:
    """The forward and loss of a part that trains w₀; on a census step, refuse hyper-layers the
    forward never reached and hyperparameters no module read."""
    hm = ctx.hyper_model
    with ctx.autocast_region(), call_census(hm, census) as called:
        out = ctx.model(*batch.args, **batch.kwargs)
        data_loss, total = objective(ctx, out, batch.target, loss_fn, point)
    if census and (error := census_error(hm, called, data_loss)) is not None:
        raise error
    _require_graph(data_loss, ctx.base_params)
    return data_loss, total


def response_part(ctx: StepContext, tx: StepTransaction, batch: Batch, loss_fn: LossFn, linearize: bool) -> Tensor:
    """Θ on the perturbed loss with w₀ fixed; linearized in the weights in ``delta`` mode."""
    hm = ctx.hyper_model
    point = perturbed_point(hm, ctx.noise, batch.rows, linearize)
    with (
        no_grad_for(ctx.base_params + ctx.hyper_params),
        running_stats_frozen(hm),
        hm.evaluated_at(point),
        hm.collecting_activations(),
    ):
        try:
            with ctx.autocast_region():
                if linearize:
                    with eager():
                        out = linearized_call(
                            lambda: ctx.local_model(*batch.args, **batch.kwargs), ctx.rewrite_ops
                        )
                else:
                    out = ctx.local_model(*batch.args, **batch.kwargs)
                data_loss, total = objective(ctx, out, batch.target, loss_fn, point)
            tx.backward("Θ step", data_loss, total, ctx.response_params, [ctx.response_optimizer])
        except (NotImplementedError, RuntimeError) as err:
            # NotImplementedError: no forward-AD formula ("... has not been implemented yet",
            # "You must implement the jvp function ..."); RuntimeError: no backward of one.
            if not linearize:
                raise
            if _inplace_error(err):
                raise HyperTuneError(
                    "an in-place op in the model's forward overwrote a tensor that the backward of "
                    f"Δ-STN's linearized Θ step needs ({err}). Make that op out of place (x += y -> "
                    "x = x + y, inplace=True -> False), or use mode='centered', which does not "
                    "linearize"
                ) from err
            if not isinstance(err, NotImplementedError) and "not implemented" not in str(err).lower():
                raise
            hint = ""
            if "custom autograd.Function" in str(err):
                hint = (
                    " (hypertune derives a custom Function's jvp from its backward when the forward "
                    "calls MyFunction.apply(...) itself: an apply stored earlier, e.g. "
                    "self.act = MyFunction.apply, bypasses that; give the Function a jvp, or call "
                    "apply in the forward)"
                )
            raise HyperTuneError(
                "Δ-STN's linearized Θ step needs forward-mode derivatives (and their backward) of "
                f"every op in the model's forward, and PyTorch lacks one here: {err}{hint}. Use "
                "mode='centered', which does not linearize"
            ) from err
    return data_loss.detach()


def stn_part(ctx: StepContext, tx: StepTransaction, batch: Batch, loss_fn: LossFn, census: bool) -> Tensor:
    """Plain STN: w₀ and Θ jointly on the perturbed training loss."""
    hm = ctx.hyper_model
    point = perturbed_point(hm, ctx.noise, batch.rows, linearize=False)
    with no_grad_for(ctx.hyper_params), hm.evaluated_at(point), hm.collecting_activations():
        data_loss, total = _checked_forward(ctx, batch, loss_fn, point, census)
        tx.backward(
            "STN step",
            data_loss,
            total,
            ctx.base_params + ctx.response_params,
            [ctx.optimizer, ctx.response_optimizer],
        )
    return data_loss.detach()


def hyper_part(
    ctx: StepContext, tx: StepTransaction, batch: Batch, loss_fn: LossFn, tune_scales: bool, entropy_weight: float
) -> Tensor:
    """λ (and σ) on the validation loss minus τ·entropy, regularizers off (eval mode).

    As in the reference code, it evaluates the response w₀ + Θ(λ+ε-λ₀) exactly (no
    linearization) in every centered mode.
    """
    hm = ctx.hyper_model
    hp = hm.hparams
    lam = hp.unconstrained
    if tune_scales:
        eps = hp.sample_noise(batch.rows)
    else:
        eps = torch.zeros(1, len(hp), dtype=lam.dtype, device=lam.device)
    perturbed = lam.unsqueeze(0) + eps
    response_input = perturbed - lam.detach() if hm.centered else perturbed
    point = Perturbation(hp, perturbed.detach(), response_input, at_center=hm.centered and not tune_scales)
    with no_grad_for(ctx.base_params + ctx.response_params):
        with ctx.autocast_region():
            with hm.evaluated_at(point):
                out = ctx.local_model(*batch.args, **batch.kwargs)
            loss = scalar_loss(loss_fn(out, batch.target))
        if not loss.requires_grad:
            if any(t.requires_grad for t in pytree.tree_leaves(out) if torch.is_tensor(t)):
                _require_graph(loss, ctx.hyper_params, "the hyperparameters")
            raise HyperTuneError(
                "the model's eval-mode output does not depend on the tuned hyperparameters (no "
                "hyper-layer's response reached it), so val_step has nothing to differentiate: "
                "check model.coverage() and that targets=/exclude= leave some layer wrapped"
            )
        total = loss - entropy_weight * hp.entropy() if tune_scales else loss
        try:
            tx.backward("λ step", loss, total, ctx.hyper_params, [ctx.hyper_optimizer], snapshot=True)
        except RuntimeError as err:
            if not _inplace_error(err):
                raise
            raise HyperTuneError(
                "val_step differentiates the validation loss through the model's eval-mode forward, "
                f"and that forward overwrote in place a tensor its backward needs ({err}). Models that "
                "update a cache or state in eval mode do this (Hugging Face's RWKV: pass use_cache=False "
                "with the validation inputs, or set model.config.use_cache = False); otherwise make the op "
                "out of place (x += y -> x = x + y)"
            ) from err
    return loss.detach()


def centered_train_step(
    ctx: StepContext, tx: StepTransaction, batch: Batch, loss_fn: LossFn, *, census: bool, response: Batch | None, linearize: bool
) -> tuple[Tensor, Tensor | None]:
    loss = base_part(ctx, tx, batch, loss_fn, census)
    response_loss = None if response is None else response_part(ctx, tx, response, loss_fn, linearize)
    return loss, response_loss


def delta_train_step(
    ctx: StepContext, tx: StepTransaction, batch: Batch, loss_fn: LossFn, *, census: bool, response: Batch | None
) -> tuple[Tensor, Tensor | None]:
    """Δ-STN (the default): centered, with the Θ step linearized in the weights."""
    return centered_train_step(ctx, tx, batch, loss_fn, census=census, response=response, linearize=True)


def plain_centered_train_step(
    ctx: StepContext, tx: StepTransaction, batch: Batch, loss_fn: LossFn, *, census: bool, response: Batch | None
) -> tuple[Tensor, Tensor | None]:
    """Centered STN: the Θ step evaluates w₀ + Θ δλ exactly."""
    return centered_train_step(ctx, tx, batch, loss_fn, census=census, response=response, linearize=False)


def stn_train_step(
    ctx: StepContext, tx: StepTransaction, batch: Batch, loss_fn: LossFn, *, census: bool, response: Batch | None
) -> tuple[Tensor, Tensor | None]:
    """Plain STN: one joint step (``response`` is unused: there is no separate Θ step)."""
    return stn_part(ctx, tx, batch, loss_fn, census), None


TRAIN_STEPS: dict[str, Callable[..., tuple[Tensor, Tensor | None]]] = {
    "delta": delta_train_step,
    "centered": plain_centered_train_step,
    "stn": stn_train_step,
}
