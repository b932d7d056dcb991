"""Which example each row of a tensor belongs to, inside a model that reshapes its batch.

A batch of B examples carries R ∈ {1, B} perturbation rows. Hyper-layers and tuned dropouts
see tensors whose leading axes are not always (B, ...): position ids are (1, T) and shared by
every example, window and patch attention runs on (B·k, ...) rows, sequence-first code runs on
(T, B, ...). :func:`layout` finds, from the shape alone, where the R rows go, and refuses only
what the shape cannot say; the wrapped model then falls back to one perturbation per batch,
which is correct for any layout.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

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
    # (site, call number in a pass) -> "dim0" | "dim1" | "grows"
    kinds: dict[tuple[str, int], str] = field(default_factory=dict)
    _calls: dict[str, int] = field(default_factory=dict)

    def start_pass(self) -> None:
        self._calls = {}

    def decide(self, where: str, shape: Shape, rows: int) -> RowLayout | None:
        """The layout of this call, or ``None`` to let the shape rules decide."""
        j = self._calls.get(where, 0)
        self._calls[where] = j + 1
        seen = self.probe.get(where, [])
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
        kind = self.kinds.get((where, j))
        if kind == "dim0" and shape[0] % rows == 0:
            return RowLayout(repeat=shape[0] // rows)
        if kind == "dim1" and len(shape) >= 2 and shape[1] == rows:
            return RowLayout(dim=1)
        if kind == "grows" and shape[0] == 1:
            return _grows(where)
        return None


_recording: dict[str, list[Shape]] | None = None
_guide: LayoutGuide | None = None
# the first site of the current guided pass whose batch-1 input gave it one output per example
_grown: list[str] = []


def grown_site() -> str | None:
    """The first site of the last guided pass whose output grew from 1 to R rows, if any: code
    after it that relies on the 1 (``pos.repeat(B, ...)``) breaks, and the pass must perturb
    per batch instead."""
    return _grown[0] if _grown else None


def _grows(where: str) -> RowLayout:
    if not _grown:
        _grown.append(where)
    return RowLayout(grows=True)


@contextmanager
def recording() -> Iterator[dict[str, list[Shape]]]:
    """Record every site's input shape during a pass (the probe pass of a :class:`LayoutGuide`)."""
    global _recording
    previous, _recording = _recording, {}
    try:
        yield _recording
    finally:
        _recording = previous


def note(where: str, shape: Shape | list[int]) -> None:
    """Record a site's input shape in a probe pass (a site that is idle in eval mode calls it)."""
    if _recording is not None:
        _recording.setdefault(where, []).append(tuple(shape))


@contextmanager
def guided_by(guide: LayoutGuide | None) -> Iterator[None]:
    """Let ``guide`` decide layouts during a pass."""
    global _guide
    previous, _guide = _guide, guide
    _grown.clear()
    if guide is not None:
        guide.start_pass()
    try:
        yield
    finally:
        _guide = previous


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
    if _guide is not None:
        decided = _guide.decide(where, shape, rows)
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
