"""The perturbation context: what one forward pass of a wrapped model is evaluated at.

Hyper-layers and hyper-regularizers read it instead of taking extra forward arguments, which is
what lets ``HyperModel.wrap`` leave the user's ``forward`` untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import Tensor

from .errors import PerturbationError
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
    """

    space: HyperParameters
    hparams: Tensor
    response_input: Tensor | None = None
    linearize: bool = False
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


_STACK: list[Perturbation] = []


@contextmanager
def active(perturbation: Perturbation) -> Iterator[Perturbation]:
    _STACK.append(perturbation)
    try:
        yield perturbation
    finally:
        _STACK.pop()


def current() -> Perturbation | None:
    """The innermost active perturbation, or ``None`` outside a wrapped model's forward."""
    return _STACK[-1] if _STACK else None


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
