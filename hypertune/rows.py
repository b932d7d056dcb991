"""Which example each row of a tensor belongs to, inside a model that reshapes its batch.

A batch of B examples carries R ∈ {1, B} perturbation rows. Hyper-layers and tuned dropouts
see tensors whose leading axes are not always (B, ...): position ids are (1, T) and shared by
every example, window and patch attention runs on (B·k, ...) rows, sequence-first code runs on
(T, B, ...). :func:`layout` finds, from the shape alone, where the R rows go, and refuses only
what the shape cannot say; the wrapped model then falls back to one perturbation per batch,
which is correct for any layout.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor

from .errors import PerturbationError


class BatchPerturbationNeeded(PerturbationError):
    """A site cannot tell which example its rows belong to; one row per batch serves it.

    ``HyperModel`` catches it inside its forward, switches the model to per-batch perturbation
    with a one-line notice naming ``site``, and runs the pass again.
    """

    def __init__(self, site: str, message: str) -> None:
        self.site = site
        super().__init__(message)


@dataclass(frozen=True)
class RowLayout:
    """Where the R perturbation rows sit in a tensor.

    ``dim``: the axis holding examples (0, or 1 for sequence-first tensors). ``repeat``: each
    row covers that many consecutive entries of the axis (batch-major windows/patches).
    ``grows``: the axis has size 1 and is shared by the batch, so per-example values give the
    result R entries along it (position embeddings of position ids (1, T)).
    """

    dim: int = 0
    repeat: int = 1
    grows: bool = False

    def place(self, values: Tensor, ndim: int, feature_dim: int | None = None) -> Tensor:
        """``values`` (R,) or (R, C) shaped to broadcast against a rank-``ndim`` tensor laid out
        like this one, with the C features on ``feature_dim``."""
        if self.repeat > 1:
            values = values.repeat_interleave(self.repeat, dim=0)
        shape = [1] * ndim
        shape[self.dim] = values.shape[0]
        if values.dim() == 2:
            assert feature_dim is not None
            shape[feature_dim] = values.shape[1]
        return values.reshape(shape)


SHARED = RowLayout()

Shape = tuple[int, ...]


@dataclass
class LayoutGuide:
    """What a pass on one example tells about each site's layout, kept for the model's later passes.

    ``HyperModel`` runs its first pass with per-example rows once more on the batch's first
    example alone (eval mode, no gradient) and records every site's input shape. Comparing a
    site's shape on B examples with its shape on one says which axis holds the examples, which
    the shape alone cannot when sizes coincide (a sequence of B tokens, B heads): an axis that
    grew B-fold holds them; a tensor that did not change has no batch axis (it is shared, or,
    like T5's relative-position table, it needs per-batch perturbation).
    """

    probe: dict[str, list[Shape]] = field(default_factory=dict)
    # sites whose input shapes differ between two examples probed alone: their rows are a
    # data-dependent subset of the batch (tokens routed to an expert, unpadded tokens)
    varies: set[str] = field(default_factory=set)
    # (site, call number in a pass) -> "dim0" | "dim1" | "grows"
    kinds: dict[tuple[str, int], str] = field(default_factory=dict)
    _calls: dict[str, int] = field(default_factory=dict)
    # whether the pass running is the one the probes were taken for (a bool, not a count: a
    # compiled forward guards on it, and a count would recompile on every pass)
    _first: bool = True
    _started: bool = False

    @classmethod
    def from_probes(cls, one: Probe, pair: Probe | None) -> LayoutGuide:
        """The guide from a pass on the batch's first example alone, checked against a pass on its
        first two examples at the same perturbation (eval mode: example 0 computes the same in
        both, unless its rows sit elsewhere in the pair's tensors or depend on the other example).

        A site that sees two examples' rows as twice one example's, with example 0's rows first,
        is batch-major. One whose pair shape is no layout of its one-example shape (a routed
        expert that took 3 tokens of example 0 and 1 of example 1), or whose first rows are not
        example 0's (experts that order tokens by routing slot), goes into ``varies``.
        """
        varies: set[str] = set()
        if pair is not None:
            for site in one.shapes.keys() | pair.shapes.keys():
                alone, both = one.shapes.get(site, []), pair.shapes.get(site, [])
                if len(alone) != len(both):
                    varies.add(site)
                    continue
                for j, (a, b) in enumerate(zip(alone, both)):
                    if a == b or len(a) != len(b):
                        continue  # no batch axis (a table), or a layout the shape rules judge
                    if len(a) >= 2 and a[1] == 1 and b[1] == 2 and a[0] == b[0] and a[2:] == b[2:]:
                        continue  # sequence-first
                    if b[0] != 2 * a[0] or b[1:] != a[1:]:
                        varies.add(site)
                        break
                    fa, fb = one.prints.get((site, j)), pair.prints.get((site, j))
                    if fa is not None and fb is not None and not _same_rows(fa, (fb[0][: a[0]], fb[1])):
                        varies.add(site)
                        break
        return cls(probe=one.shapes, varies=varies)

    def start_pass(self) -> None:
        self._calls = {}
        if self._started:
            self._first = False
        self._started = True

    def decide(self, where: str, shape: Shape, rows: int) -> RowLayout | None:
        """The layout of this call, or ``None`` to let the shape rules decide.

        A site whose shape differed between two examples, or, on the pass the probe was taken
        for, whose shape on the batch is no layout of the one-example shape or that the batch
        calls more often than one example did, sees a data-dependent subset of the batch's rows:
        no rule can say which example a row is, and a guess (a row count that happens to divide
        by B) would silently give rows another example's perturbation. Later passes (other
        sizes) keep the layouts that pass found.
        """
        j = self._calls.get(where, 0)
        self._calls[where] = j + 1
        seen = self.probe.get(where, [])
        first = self._first
        if where in self.varies or (first and seen and j >= len(seen)):
            raise BatchPerturbationNeeded(
                where,
                f"{where} sees a number of rows that depends on the data (it differs between examples, "
                "as for tokens routed to an expert or unpadded tokens), so its rows cannot be assigned "
                "to examples",
            )
        if j < len(seen) and len(seen[j]) == len(shape):
            one = seen[j]
            if one == shape:
                if shape[0] == 1:
                    self.kinds[(where, j)] = "grows"
                    return _grows(where)
                raise BatchPerturbationNeeded(
                    where,
                    f"{where} sees a tensor of shape {shape} that does not change with the batch size "
                    "(no batch axis), so its output cannot differ per example",
                )
            if shape[0] == rows * one[0] and shape[1:] == one[1:]:
                self.kinds[(where, j)] = "dim0"
                return RowLayout(repeat=one[0])
            if len(shape) >= 2 and one[1] == 1 and shape[1] == rows and shape[0] == one[0] and shape[2:] == one[2:]:
                self.kinds[(where, j)] = "dim1"
                return RowLayout(dim=1)
            if first:
                raise BatchPerturbationNeeded(
                    where,
                    f"{where} sees a tensor of shape {shape} for {rows} examples and {one} for one, which is "
                    "no layout of the batch (its rows are a data-dependent subset, as for tokens routed to "
                    "an expert), so its rows cannot be assigned to examples",
                )
        kind = self.kinds.get((where, j))
        if kind == "dim0" and shape[0] % rows == 0:
            return RowLayout(repeat=shape[0] // rows)
        if kind == "dim1" and len(shape) >= 2 and shape[1] == rows:
            return RowLayout(dim=1)
        if kind == "grows" and shape[0] == 1:
            return _grows(where)
        return None


@dataclass
class Probe:
    """What a probe pass recorded: every site's input shapes, per call, and a fingerprint of each
    call's input rows (the sum and the sum of squares of each leading-axis row, in float64)."""

    shapes: dict[str, list[Shape]] = field(default_factory=dict)
    prints: dict[tuple[str, int], tuple[Tensor, float]] = field(default_factory=dict)


def fingerprint(x: Tensor) -> tuple[Tensor, float]:
    """(each leading-axis row's sum and sum of squares in float64, the rounding of x's dtype)."""
    rows = x.detach().reshape(x.shape[0], -1).double()
    eps = float(torch.finfo(x.dtype).eps) if x.is_floating_point() else 0.0
    return torch.stack([rows.sum(1), rows.pow(2).sum(1)], 1), eps


def _same_rows(a: tuple[Tensor, float], b: tuple[Tensor, float]) -> bool:
    """Fingerprints equal up to the rounding a batched kernel may add: 1e-3 relative, or 16
    units of the inputs' precision (bfloat16 and float16 models)."""
    (x, eps), (y, _) = a, b
    if x.shape != y.shape:
        return False
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        return True  # a non-finite batch (refused later) says nothing about the layout
    rtol = max(1e-3, 16 * eps)
    return bool(torch.allclose(x, y, rtol=rtol, atol=1e-6 + rtol * 0.1 * float(x.abs().max())))


class _PassState:
    """What the passes are doing: a probe being recorded, the input of the site running in it,
    the guide deciding layouts, the first site whose output grew."""

    def __init__(self) -> None:
        self.recording: Probe | None = None
        self.pending: list[tuple[Shape, tuple[Tensor, float]]] = []
        self.guide: LayoutGuide | None = None
        self.grown: list[str] = []


T = TypeVar("T")


def per_thread(cls: type[T]) -> Callable[[], T]:
    """A getter of ``cls()`` state kept per thread (passes of two models in two threads must
    not see each other's), except in a forward torch.compile traces, which cannot trace a
    thread-local and gets one plain instance (the HyperModel's lock serializes its forwards)."""
    local = type(f"_Thread{cls.__name__}", (threading.local, cls), {})()
    traced = cls()

    def state() -> T:
        return traced if torch.compiler.is_compiling() else local

    return state


_state = per_thread(_PassState)


def grown_site() -> str | None:
    """The first site of the last guided pass whose output grew from 1 to R rows, if any: code
    after it that relies on the 1 (``pos.repeat(B, ...)``) breaks, and the pass must perturb
    per batch instead."""
    grown = _state().grown
    return grown[0] if grown else None


def _grows(where: str) -> RowLayout:
    grown = _state().grown
    if not grown:
        grown.append(where)
    return RowLayout(grows=True)


@contextmanager
def recording() -> Iterator[Probe]:
    """Record every site's input shapes during a pass (the probe passes of a :class:`LayoutGuide`)."""
    state = _state()
    previous, state.recording = state.recording, Probe()
    try:
        yield state.recording
    finally:
        state.recording = previous
        state.pending.clear()


def recording_input(x: Any) -> None:
    """A site's forward starts on ``x`` (a module pre-hook during probe passes): the notes its
    forward makes for an input of this shape carry ``x``'s fingerprint."""
    state = _state()
    if state.recording is not None and torch.is_tensor(x) and x.dim() >= 1:
        state.pending[:] = [(tuple(x.shape), fingerprint(x))]


def recording_done() -> None:
    _state().pending.clear()


def note(where: str, shape: Shape | list[int]) -> None:
    """Record a site's input shape in a probe pass (a site that is idle in eval mode calls it)."""
    state = _state()
    if state.recording is not None:
        calls = state.recording.shapes.setdefault(where, [])
        calls.append(tuple(shape))
        if state.pending and state.pending[0][0] == tuple(shape):
            state.recording.prints[(where, len(calls) - 1)] = state.pending[0][1]


@contextmanager
def guided_by(guide: LayoutGuide | None) -> Iterator[None]:
    """Let ``guide`` decide layouts during a pass."""
    state = _state()
    previous, state.guide = state.guide, guide
    state.grown.clear()
    if guide is not None:
        guide.start_pass()
    try:
        yield
    finally:
        state.guide = previous


def layout(
    shape: tuple[int, ...] | list[int], rows: int, where: str, feature_dims: int = 1, sequence_first: bool = True
) -> RowLayout:
    """How R = ``rows`` perturbation rows map onto a tensor of ``shape``.

    ``feature_dims`` trailing axes are never examples (1 for a Linear input, 0 for embedding
    ids). Examples sit on axis 1 only in a (T, B) layout: two leading axes, and
    ``sequence_first`` (False for convolutions, channel dropout and attention probabilities,
    whose axis 1 is channels or heads). A :class:`LayoutGuide` active for the pass decides first.

    The rules, in order: one row broadcasts; a leading axis of R is the batch; of 1, shared by
    the batch; a multiple of R with an axis 1 that is not R, batch-major (the k rows of example
    i are i·k … i·k+k-1, as ``x.reshape(B·k, ...)`` of a batch-first tensor gives); axis 1 of R
    with a leading axis that is no multiple of R, sequence-first. Anything else, including a
    shape that fits two of these, raises :class:`BatchPerturbationNeeded`.
    """
    shape = tuple(shape)
    note(where, shape)
    if rows == 1:
        return SHARED
    guide = _state().guide
    if guide is not None:
        decided = guide.decide(where, shape, rows)
        if decided is not None:
            return decided
    leading = len(shape) - feature_dims
    if leading < 1:
        raise BatchPerturbationNeeded(
            where,
            f"{where} got an unbatched input of shape {tuple(shape)} but the batch carries {rows} "
            "per-example perturbations: pass a batch, or give the hyperparameters perturb='batch'",
        )
    n = shape[0]
    if n == rows:
        return SHARED
    if n == 1:
        return _grows(where)
    batch_major = n % rows == 0
    seq_first = sequence_first and leading == 2 and shape[1] == rows
    if batch_major and not seq_first:
        return RowLayout(repeat=n // rows)
    if seq_first and not batch_major:
        return RowLayout(dim=1)
    why = (
        "could be batch-major windows or sequence-first"
        if batch_major
        else "has no axis that matches the batch"
    )
    raise BatchPerturbationNeeded(
        where,
        f"{where} got a tensor of shape {tuple(shape)} whose layout {why} for {rows} per-example "
        "perturbations: keep the batch dimension first, or give the hyperparameters perturb='batch'",
    )
