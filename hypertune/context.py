"""The perturbation context: what one forward pass of a wrapped model is evaluated at.

Hyper-layers and hyper-regularizers read it instead of taking extra forward arguments, which is
what lets ``HyperModel.wrap`` leave the user's ``forward`` untouched.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .errors import CHECKPOINTING_FIX, PerturbationError
from .rows import BatchPerturbationNeeded

if TYPE_CHECKING:
    from .hyperparameters import HyperParameters


@dataclass
class Perturbation:
    """One forward pass's hyperparameters.

    ``response_input`` is what the hypernetwork sees, shape (R, h) with R the batch size or 1:
    δλ = λ - λ₀ in the centered modes, λ itself in plain STN, ``None`` for the bare w₀ pass.
    ``hparams`` (R, h) are the unconstrained values at which regularizers act (λ₀ + ε).
    With ``linearize`` the hyper-layers add their response to the forward-AD tangent instead of
    the primal, so the output's tangent is J_yw Θ δλ (Δ-STN).
    ``at_center`` says δλ is exactly zero in value (the λ step with σ held, centered modes): Θ's
    term ``s(δλ) ⊙ W_resp x`` is then zero, and so is its derivative in the layer's input ``x``;
    only its derivative in δλ is not. Layers then keep ``x`` out of that term's graph, which
    saves one input-gradient pass per layer in the λ step and changes no gradient.
    """

    space: HyperParameters
    hparams: Tensor
    response_input: Tensor | None = None
    linearize: bool = False
    at_center: bool = False
    _values: dict[str, Tensor] = field(default_factory=dict, repr=False)

    @property
    def rows(self) -> int:
        return self.hparams.shape[0]

    def share_first_row(self) -> None:
        """Evaluate at one perturbation for the whole batch (row 0): per-batch perturbation, for
        models whose layout cannot carry one row per example."""
        if self.rows == 1:
            return
        self.hparams = self.hparams[:1]
        if self.response_input is not None:
            self.response_input = self.response_input[:1]
        self._values.clear()

    def value(self, name: str) -> Tensor:
        """Constrained value of ``name``, shape (R,), computed once per pass."""
        v = self._values.get(name)
        if v is None:
            v = self._values[name] = self.space.constrain(self.hparams, name)
        return v

    def values_read(self) -> set[str]:
        """Names some module read during this pass (a tuned value nobody reads is refused)."""
        return set(self._values)


# The perturbations of the forward passes running in this thread (or asyncio task), innermost
# last. A context variable, not a module-global list: a forward in another thread must not see a
# train_step's perturbed point (it would build forward-AD duals outside any dual level, or
# evaluate at the wrong λ).
_ACTIVE: ContextVar[tuple[Perturbation, ...]] = ContextVar("hypertune_active", default=())
# The point each HyperModel evaluates at instead of λ₀ (HyperModel.evaluated_at), by model id.
_PINNED: ContextVar[Mapping[int, Perturbation]] = ContextVar("hypertune_pinned", default={})
_LOCKS: weakref.WeakKeyDictionary[Any, FairLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


# torch.compile cannot trace ContextVar.set(): a forward being compiled keeps its perturbation
# here instead (the compiled graph reads it at trace time; the list is empty between calls).
_TRACED: list[Perturbation] = []


@contextmanager
def active(perturbation: Perturbation) -> Iterator[Perturbation]:
    if torch.compiler.is_compiling():
        _TRACED.append(perturbation)
        try:
            yield perturbation
        finally:
            _TRACED.pop()
        return
    token = _ACTIVE.set((*_ACTIVE.get(), perturbation))
    try:
        yield perturbation
    finally:
        _ACTIVE.reset(token)


def current() -> Perturbation | None:
    """The innermost active perturbation, or ``None`` outside a wrapped model's forward."""
    if _TRACED:
        return _TRACED[-1]
    stack = _ACTIVE.get()
    return stack[-1] if stack else None


@contextmanager
def pinned(owner: object, point: Perturbation) -> Iterator[Perturbation]:
    """Make ``owner``'s forwards in this thread/task run at ``point`` (see HyperModel.evaluated_at)."""
    token = _PINNED.set({**_PINNED.get(), id(owner): point})
    try:
        yield point
    finally:
        _PINNED.reset(token)


def pinned_point(owner: object) -> Perturbation | None:
    return _PINNED.get().get(id(owner))


class FairLock:
    """A re-entrant lock that threads take in the order they asked for it.

    ``threading.RLock`` lets the thread that just released it take it straight back, so a thread
    evaluating in a loop takes it many times between two training steps (over a hundred, in a
    tiny model's run) and slows training; here the two take turns.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._depth = 0
        self._next_ticket = 0
        self._serving = 0
        self._abandoned: set[int] = set()  # tickets whose waiter left (Ctrl-C while waiting)

    def acquire(self) -> bool:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return True
            ticket = self._next_ticket
            self._next_ticket += 1
            try:
                while self._serving != ticket:
                    self._cond.wait()
            except BaseException:
                # A KeyboardInterrupt (or any error) in the wait: give the ticket up, or every
                # later forward, step and save would wait for it forever.
                if self._serving == ticket and self._owner is None:
                    self._advance()
                else:
                    self._abandoned.add(ticket)
                raise
            self._owner, self._depth = me, 1
            return True

    def release(self) -> None:
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError("release of a hypertune model lock this thread does not hold")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._advance()

    def _advance(self) -> None:
        """Serve the next ticket that still has a waiter (the condition's lock is held)."""
        self._serving += 1
        while self._serving in self._abandoned:
            self._abandoned.discard(self._serving)
            self._serving += 1
        self._cond.notify_all()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_for(owner: object) -> FairLock:
    """The lock that serializes ``owner``'s forwards and optimizer steps across threads.

    Kept here, keyed weakly by the model, rather than on the module, so models still pickle and
    deep-copy.
    """
    with _LOCKS_GUARD:
        lock = _LOCKS.get(owner)
        if lock is None:
            lock = _LOCKS[owner] = FairLock()
        return lock


def outside_forward_fix() -> str:
    """The fix for a tuned module run outside a HyperModel forward: inside a backward pass that
    is activation checkpointing's recomputation, else a call of an inner module."""
    if torch._C._current_graph_task_id() != -1:
        return (
            "it ran during backward, so activation (gradient) checkpointing is recomputing the forward, "
            f"which hypertune cannot take: {CHECKPOINTING_FIX}"
        )
    return "call the wrapped model rather than its inner module"


def hparam(name: str) -> Tensor:
    """Per-example value (shape (R,)) of a tuned hyperparameter, for use in custom modules.

    Call it inside the forward of a module that runs under a ``HyperModel``.
    """
    p = current()
    if p is None:
        raise PerturbationError(
            f"hypertune.hparam({name!r}) was called outside a HyperModel forward; call the wrapped "
            "model (or run inside DeltaSTNOptimizer.train_step/val_step)"
        )
    return p.value(name)


def rows_for(batch: int, rows: int, where: str) -> None:
    """Refuse a batch whose leading dimension does not match per-example perturbation rows.

    Inside a HyperModel forward the refusal switches the model to per-batch perturbation
    (:class:`~hypertune.rows.BatchPerturbationNeeded`); elsewhere it is the error.
    """
    if rows != 1 and batch != rows:
        raise BatchPerturbationNeeded(
            where,
            f"{where} got a leading dimension of {batch} but the batch carries {rows} per-example "
            "perturbations: the model reshapes or reorders its batch before this module. Give every "
            "hyperparameter perturb='batch', or keep the batch dimension first, or exclude the "
            "module from wrapping (HyperModel.wrap(..., exclude=[...]))"
        )
