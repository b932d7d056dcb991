"""A step as a transaction: compute and check every part, then write all of it, or put back.

A ``train_step`` has a w₀ part and a Θ part (one joint part in ``stn`` mode); a ``val_step`` has
a λ/σ part. Each part runs its forward and backward (:meth:`StepTransaction.backward`), which
writes only gradients and, in a train-mode forward, buffers such as BatchNorm's running
statistics. Nothing else is written until every part has been checked (:meth:`verdict`: finite
losses and gradients, one device sync for the whole step); then :meth:`commit` runs the inner
optimizers' ``step``. If anything raises or is refused before that, :meth:`rollback` restores
what the forwards wrote: the buffers, the RNG states (a refused step draws no noise), and the
gradients.

Why check before ``optimizer.step()`` instead of copying everything first: a copy of the weights
and every optimizer's state costs as much memory traffic as the step's writes, every step. Here the
common path copies only the buffers a train-mode forward writes (found by their version counters,
a few running statistics) and the RNG state. Full copies of the written parameters and optimizer
states are taken only where they are cheap or the risk is new:

- the λ/σ part, always (two short vectors): its update is also checked *after* writing, since a
  huge but finite hypergradient can overflow RMSprop's running square to inf and leave λ stuck;
- every part of the first step of each kind, so an optimizer that raises inside ``step`` (sparse
  gradients, an unsupported dtype) cannot leave a half-written model; those failures show on the
  first step.
"""

from __future__ import annotations

import copy
import math

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from ..errors import CHECKPOINTING_FIX, HyperTuneError, NonFiniteLossError

# torch >= 2.1; older torch raises a RuntimeError, which reaches the user as it is
_CheckpointError: Any = getattr(torch.utils.checkpoint, "CheckpointError", ())

#: What a refused step leaves unchanged, for error messages.
UNCHANGED = (
    "no weights, Θ, λ, σ, optimizer states, buffers (BatchNorm statistics), RNG states, counters or "
    "History were changed"
)


@dataclass
class Part:
    """One part of a step: its objective has been backpropagated, nothing written yet."""

    what: str
    data_loss: Tensor
    objective: Tensor
    params: Sequence[nn.Parameter]
    optimizers: Sequence[torch.optim.Optimizer]
    snapshot: bool = False
    loss_ok: Tensor | None = None
    grad_ok: Tensor | None = None


@contextmanager
def autocast_disabled() -> Iterator[None]:
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


def _finite_sum(tensors: Sequence[Tensor], like: Tensor) -> Tensor:
    """True where every element is finite: a sum carries any NaN/inf (inf - inf is NaN) at a
    fraction of a norm's cost."""
    if not tensors:
        return torch.ones((), dtype=torch.bool, device=like.device)
    # .to: a model split over devices sums each part where it lives (a no-op on one device)
    return torch.isfinite(torch.stack([_sum(t).to(like.device) for t in tensors]).sum())


def _sum(t: Tensor) -> Tensor:
    """A float32 (or wider) sum: a half-precision one overflows on large but finite tensors."""
    t = t.detach()
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.sum(dtype=torch.float32)
    return t.sum().float()


def _inner_optimizer(opt: Any) -> torch.optim.Optimizer | None:
    """The optimizer a wrapper (timm's Lookahead, a SAM) steps and keeps its state in, if its own
    ``state`` is not that one's (a wrapper that shares its inner optimizer's state, as hypertune's
    AccumulatingOptimizer does, is snapshotted like the optimizer it shares it with)."""
    for name in ("_base_optimizer", "base_optimizer", "optimizer"):
        inner = getattr(opt, name, None)
        if isinstance(inner, torch.optim.Optimizer) and inner is not opt and getattr(opt, "state", None) is not inner.state:
            return inner
    return None


def _state_tensors(opt: torch.optim.Optimizer, params: Iterable[nn.Parameter]) -> list[Tensor]:
    """The floating-point state that lives beside each parameter. torch keeps Adam/RMSprop's
    ``step`` counter on the CPU for a CUDA parameter: a count, never non-finite, and on another
    device than the sums it would be stacked with."""
    state = opt.state
    inner = _inner_optimizer(opt)
    if inner is not None and not any(p in state for p in params):
        state = inner.state  # the wrapper keeps none of its own
    return [
        v
        for p in params
        if p in state
        for v in state[p].values()
        if torch.is_tensor(v) and v.is_floating_point() and v.device == p.device
    ]


class BufferTracker:
    """The buffers a train-mode forward writes, learnt from their version counters.

    BatchNorm's running statistics are known writers; any other buffer seen changing during a
    step (a spectral norm's power-iteration vector, a user's running average) joins them. They are
    kept as (module, name), not tensors: ``model.to(...)`` replaces buffer tensors.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.known: dict[tuple[int, str], tuple[nn.Module, str]] = {}
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase):
                for name in ("running_mean", "running_var", "num_batches_tracked"):
                    self.known[(id(m), name)] = (m, name)
        self._slots: list[tuple[nn.Module, str]] | None = None

    def slots(self, refresh: bool = False) -> list[tuple[nn.Module, str, Tensor]]:
        """Every buffer slot's live tensor: a step records their identities and versions (cheap)
        to put back a buffer the forward reassigned (``self.ema = 0.9 * self.ema + ...``) and to
        learn writers it did not know. The slot list is walked again on ``refresh`` (full steps)."""
        if self._slots is None or refresh:
            self._slots = [
                (m, name) for m in self.module.modules() for name, buf in m.named_buffers(recurse=False) if buf is not None
            ]
        return self._live(self._slots)

    def _live(self, slots: list[tuple[nn.Module, str]]) -> list[tuple[nn.Module, str, Tensor]]:
        out = []
        for m, name in slots:
            buf = getattr(m, name, None)
            if torch.is_tensor(buf):
                out.append((m, name, buf))
        return out

    def buffers(self, every: bool) -> list[tuple[nn.Module, str, Tensor]]:
        """The known writers' live tensors, or every buffer of the model (deduplicated)."""
        if not every:
            return self._live(list(self.known.values()))
        slots, seen = [], set()
        for m in self.module.modules():
            for name, buf in m.named_buffers(recurse=False):
                if buf is not None and id(buf) not in seen:
                    seen.add(id(buf))
                    slots.append((m, name))
        return self._live(slots)

    def learn(self, versions: list[tuple[nn.Module, str, Tensor, int]]) -> None:
        for m, name, buf, version in versions:
            if buf._version != version:
                self.known[(id(m), name)] = (m, name)


@dataclass
class WriteSnapshot:
    """Copies of parameters and of their optimizers' state, taken before ``optimizer.step()``:
    what an optimizer step writes, put back by :meth:`restore` if the step raises or leaves a
    non-finite value."""

    params: list[tuple[nn.Parameter, Tensor]] = field(default_factory=list)
    wrappers: list[tuple[Any, dict[str, Any]]] = field(default_factory=list)
    optimizer_states: list[tuple[torch.optim.Optimizer, nn.Parameter, dict[str, Any] | None]] = field(
        default_factory=list
    )

    @torch.no_grad()
    def add(self, params: Sequence[nn.Parameter], optimizers: Iterable[torch.optim.Optimizer]) -> None:
        self.params += [(p, p.detach().clone()) for p in params]
        for opt in optimizers:
            if _inner_optimizer(opt) is not None:
                # a wrapper's state lives in its inner optimizer and its counters in shared
                # param groups: its own state_dict round trip covers both
                self.wrappers.append((opt, copy.deepcopy(opt.state_dict())))
                continue
            owned = {id(q) for g in opt.param_groups for q in g["params"]}
            for p in params:
                if p in opt.state:
                    self.optimizer_states.append((opt, p, _clone_state(opt.state[p])))
                elif id(p) in owned:
                    self.optimizer_states.append((opt, p, None))

    def restore(self) -> None:
        with torch.no_grad():
            for p, value in self.params:
                p.copy_(value)
        for opt, state_dict in self.wrappers:
            opt.load_state_dict(state_dict)
        for opt, p, state in self.optimizer_states:
            if state is None:
                opt.state.pop(p, None)
            else:
                opt.state[p] = state


def writes_finite(params: Sequence[nn.Parameter], optimizers: Iterable[torch.optim.Optimizer], like: Tensor) -> Tensor:
    """True (a tensor, no device read) where ``params`` and their optimizers' state are finite."""
    state = [t for opt in optimizers for t in _state_tensors(opt, params)]
    return _finite_sum([*params, *state], like)


#: The problem a write check reports.
BAD_WRITE = (
    "update left a non-finite value in its parameters or its optimizer's state (e.g. "
    "RMSprop/Adam's running square of a huge gradient overflowed)"
)


@dataclass
class _Saved:
    """What a transaction can put back."""

    rng: list[tuple[Callable[[Tensor], None], Tensor]] = field(default_factory=list)
    buffers: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    versions: list[tuple[nn.Module, str, Tensor, int]] = field(default_factory=list)  # every buffer slot
    writes: WriteSnapshot = field(default_factory=WriteSnapshot)


def _clone_state(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in state.items()}


class StepTransaction:
    """One step's parts, checked together and written together.

    Args:
        buffers: the tracker of buffers the step's forwards may write.
        full: snapshot every buffer, and every part's parameters and optimizer state, instead of
            the known buffer writers and the parts marked ``snapshot`` (the first step of a kind).
        device: the model's device, whose RNG is saved with the CPU's.
        scaler: an enabled GradScaler, or None.
        average: DDP's gradient averaging of (params, loss_ok) -> agreed loss_ok, or None.
    """

    def __init__(
        self,
        *,
        buffers: BufferTracker,
        full: bool,
        device: torch.device,
        scaler: Any = None,
        average: Callable[[Sequence[nn.Parameter], Tensor], Tensor] | None = None,
    ) -> None:
        self.parts: list[Part] = []
        self._tracker = buffers
        self._full = full
        self._device = device
        self._scaler = scaler
        self._average = average
        self._saved = _Saved()
        self.committed = False
        self.writing = False
        self._unrestored: list[str] | None = None
        self._scaler_saved: list[tuple[Tensor, Tensor]] = []

    # ---- begin ---------------------------------------------------------------------------------
    def begin(self) -> StepTransaction:
        saved = self._saved
        saved.rng.append((torch.set_rng_state, torch.get_rng_state()))
        if self._device.type == "cuda":
            index = self._device.index if self._device.index is not None else torch.cuda.current_device()
            saved.rng.append(
                (lambda s, i=index: torch.cuda.set_rng_state(s, i), torch.cuda.get_rng_state(index))
            )
        buffers = self._tracker.buffers(every=self._full)
        with torch.no_grad():
            saved.buffers = [(b, b.detach().clone()) for _, _, b in buffers]
        saved.versions = [(m, name, b, b._version) for m, name, b in self._tracker.slots(refresh=self._full)]
        return self

    # ---- parts ---------------------------------------------------------------------------------
    def backward(
        self,
        what: str,
        data_loss: Tensor,
        objective: Tensor,
        params: Sequence[nn.Parameter],
        optimizers: Sequence[torch.optim.Optimizer],
        *,
        snapshot: bool = False,
    ) -> Part:
        """Backpropagate one part's objective; its gradients land in ``params``' ``.grad`` and
        nowhere else: an input that requires grad, or a target still carrying a graph (a teacher's
        logits), gets no gradient from hypertune's passes, and its graph is not walked (or freed)."""
        inputs = [p for p in params if p.requires_grad]
        if any(p.grad is not None for p in inputs):  # every step starts with none
            raise HyperTuneError(
                f"the {what}'s parameters had gradients before its backward: loss_fn (or a hook) ran a "
                "backward pass itself, and the step's own would add to it. Return the loss from loss_fn "
                "without calling .backward(): the step runs the backward"
            )
        try:
            with autocast_disabled():
                if inputs:
                    (objective if self._scaler is None else self._scaler.scale(objective)).backward(inputs=inputs)
        except RuntimeError as err:
            if "backward through the graph a second time" in str(err):
                raise HyperTuneError(
                    f"the {what}'s backward found part of the graph already freed by an earlier backward: "
                    "either loss_fn calls .backward() itself (return the loss instead: the step runs the "
                    "backward), or the model keeps a tensor from an earlier step in its graph (detach a "
                    "recurrent hidden state or a cache between steps) (torch's error is chained below)"
                ) from err
            reentrant = "use_reentrant=True" in str(err)  # torch's reentrant checkpoint refuses inputs=
            if not (reentrant or isinstance(err, _CheckpointError)):  # (a CheckpointError is one too)
                raise
            if reentrant:
                what_happened = (
                    f"the {what} met activation (gradient) checkpointing with use_reentrant=True, which cannot "
                    "give gradients to one part's parameters only, as hypertune's passes need"
                )
            else:
                what_happened = (
                    f"the {what}'s backward recomputed a region under activation (gradient) checkpointing "
                    "outside the HyperModel's forward, where hyper-layers have no Θ or tangents, so torch "
                    "found another graph than the forward's"
                )
            raise HyperTuneError(f"{what_happened} (torch's error is chained below): {CHECKPOINTING_FIX}") from err
        part = Part(what, data_loss.detach(), objective.detach(), list(params), list(optimizers), snapshot)
        part.loss_ok = torch.isfinite(part.objective)
        self.parts.append(part)
        return part

    # ---- check ---------------------------------------------------------------------------------
    def verdict(self, read: Sequence[Tensor] = ()) -> tuple[list[str], bool, list[float]]:
        """Every part's problems (empty if the step may be written) in one device sync, whether
        the only problem is a GradScaler overflow (a routine skip), and the scalars ``read`` as
        floats, fetched in that same sync (the losses the step reports)."""
        scaler = self._scaler
        if self._average is not None:
            for part in self.parts:
                part.loss_ok = self._average(part.params, part.loss_ok)
        unscaled: list[torch.optim.Optimizer] = []
        if scaler is not None:
            for part in self.parts:
                for opt in part.optimizers:
                    if opt not in unscaled and any(
                        p.grad is not None for g in opt.param_groups for p in g["params"]
                    ):
                        scaler.unscale_(opt)
                        unscaled.append(opt)
        flags = []
        for part in self.parts:
            part.grad_ok = _finite_sum([p.grad for p in part.params if p.grad is not None], part.objective)
            flags += [part.loss_ok, part.grad_ok]
        if scaler is not None and unscaled:
            # A step the write check refuses later must not count as a good step: keep the
            # scaler's counters to put back then (tensors, no device read).
            self._scaler_saved = [
                (t, t.clone()) for t in (getattr(scaler, "_scale", None), getattr(scaler, "_growth_tracker", None))
                if torch.is_tensor(t)
            ]
            scaler.update()  # lowers the scale if unscale_ found inf/NaN, else counts a good step
        both = [f.to(self._device, torch.float32) for f in flags]
        both += [r.detach().to(self._device, torch.float32).reshape(()) for r in read]
        values = torch.stack(both).tolist() if both else []
        problems = []
        loss_bad = False
        for i, part in enumerate(self.parts):
            loss_fine, grad_fine = values[2 * i], values[2 * i + 1]
            if not loss_fine:
                loss_bad = True
                value = part.objective.item()
                if math.isfinite(value):  # DDP: the ranks agreed on another rank's verdict
                    problems.append(f"the {part.what}'s loss is not finite on another process (here {value})")
                else:
                    problems.append(f"the {part.what}'s loss is {value}")
            elif not grad_fine:
                problems.append(f"the {part.what}'s gradients are not finite")
        overflow_only = scaler is not None and bool(problems) and not loss_bad
        return problems, overflow_only, values[len(flags):]

    # ---- write ---------------------------------------------------------------------------------
    def commit(self) -> list[str]:
        """Run every part's optimizers. Returns problems found in snapshotted parts' writes (then
        everything is already put back); an optimizer raising is put back where a snapshot allows."""
        saved = self._saved
        for part in self.parts:
            if part.snapshot or self._full:
                saved.writes.add(part.params, part.optimizers)
        self.writing = True
        stepped: set[int] = set()
        for part in self.parts:
            for opt in part.optimizers:
                if id(opt) not in stepped:
                    opt.step()
                    stepped.add(id(opt))
        problems = []
        written = [part for part in self.parts if part.snapshot or self._full]
        if written:
            checks = [writes_finite(part.params, part.optimizers, part.objective) for part in written]
            values = torch.stack([c.to(self._device) for c in checks]).tolist()
            problems = [f"the {part.what}'s {BAD_WRITE}" for part, fine in zip(written, values) if not fine]
        if problems:
            self.rollback()
            with torch.no_grad():
                for live, saved in self._scaler_saved:  # not a good step after all
                    live.copy_(saved)
            return problems
        self.committed = True
        self._clear_grads()
        self._tracker.learn(saved.versions)
        return []

    # ---- undo ----------------------------------------------------------------------------------
    def rollback(self) -> list[str]:
        """Put back everything the step wrote: buffers, RNG, gradients, and snapshotted writes.

        Returns the buffers the forward wrote in place that no snapshot covered (a writer seen for
        the first time on a step that is not a full one): they could not be put back, and are
        snapshotted from the next step on.
        """
        if self._unrestored is not None:  # already put back (commit found a bad write)
            return self._unrestored
        saved = self._saved
        snapshotted = {id(buf) for buf, _ in saved.buffers}
        unrestored = [
            (m, name) for m, name, buf, version in saved.versions if buf._version != version and id(buf) not in snapshotted
        ]
        with torch.no_grad():
            for buf, value in saved.buffers:
                buf.copy_(value)
        saved.writes.restore()
        for m, name, buf, _ in saved.versions:  # a buffer the forward replaced: the old tensor back
            if getattr(m, name, None) is not buf:
                setattr(m, name, buf)
        for set_state, value in saved.rng:
            set_state(value)
        self._clear_grads()
        for m, name in unrestored:
            self._tracker.known[(id(m), name)] = (m, name)
        self._unrestored = sorted({_buffer_path(self._tracker.module, m, name) for m, name in unrestored})
        return self._unrestored

    def can_undo_writes(self) -> bool:
        """Whether every part's optimizer writes were snapshotted (so a raise in ``step`` is undone)."""
        return all(part.snapshot for part in self.parts) or self._full

    def _clear_grads(self) -> None:
        for part in self.parts:
            for p in part.params:
                p.grad = None


def _buffer_path(root: nn.Module, module: nn.Module, name: str) -> str:
    for path, m in root.named_modules():
        if m is module:
            return f"{path}.{name}" if path else name
    return name


def unrestored_note(paths: Sequence[str]) -> str:
    """What a step that was put back could not restore (see :meth:`StepTransaction.rollback`)."""
    return (
        f"hypertune: except buffer(s) {list(paths)}, which the forward wrote in place for the first "
        "time on this step and no snapshot covered: they keep this step's values (they are "
        "snapshotted from now on)"
    )


def refusal(problems: Sequence[str], kind: str) -> NonFiniteLossError:
    return NonFiniteLossError(
        f"{kind} was refused: " + "; ".join(problems) + f". Nothing was written: {UNCHANGED}. "
        "Lower the learning rate, check the batch, or pass nonfinite='skip' to skip and count "
        "such steps"
    )
