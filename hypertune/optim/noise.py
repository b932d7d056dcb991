"""The perturbations ε of the Θ steps, drawn independently or in antithetic pairs.

Θ's gradient at a draw ε carries a term linear in ε, the training gradient at w₀ times the
response's change (ε·∇L_train(w₀) in the simplest case). Its mean is zero, but while w₀ is still
converging it is far larger than the curvature term Θ learns from, and an optimizer on Θ follows
it. Drawing ε and then −ε on the next Θ step cancels that term between the two steps to the extent
the training gradient is the same at both (fully for a batch-shared draw on a full batch; its
batch-mean part for per-example draws), while each draw keeps the N(0, σ²) marginal, so Θ's
objective is unchanged. The idea is the classic antithetic variate; here it costs nothing.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..hyperparameters import HyperParameters


class ResponseNoise:
    """ε for Θ steps; with ``antithetic`` every second draw is the previous one negated.

    A draw only becomes the pair's first half when its step commits (:meth:`commit`), so a
    refused step leaves the stream as it was. The stored half is in units of σ, so a σ tuned in
    between scales the negated draw like a fresh one.
    """

    def __init__(self, antithetic: bool) -> None:
        self.antithetic = bool(antithetic)
        self.pending: Tensor | None = None  # z = ε/σ of a pair's first half, waiting for its −z
        self._next: Tensor | None = None  # what pending becomes if the drawing step commits
        self._drawn = False  # whether the current step drew

    def draw(self, hp: HyperParameters, rows: int) -> Tensor:
        self._drawn = True
        if not self.antithetic:
            return hp.sample_noise(rows)
        scale = hp.scale.detach()
        pending = self.pending
        if pending is not None and pending.shape == (hp.noise_rows(rows), len(hp)) and pending.device == scale.device:
            self._next = None  # the pair is complete
            return -pending.to(scale.dtype) * scale
        eps = hp.sample_noise(rows)
        self._next = eps / scale
        return eps

    def commit(self) -> None:
        """The step that drew last was taken (a step without a Θ part drew nothing)."""
        if self.antithetic and self._drawn:
            self.pending = self._next
        self._drawn = False

    def discard(self) -> None:
        """Forget a draw no taken step committed (called as each step starts)."""
        self._drawn = False

    # ---- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"antithetic": self.antithetic, "pending": None if self.pending is None else self.pending.detach().clone()}

    def load_state_dict(self, state: Any, hp: HyperParameters) -> None:
        """``state`` passed :func:`hypertune.optim.state.state_problems`; a state saved without a
        pending half (before antithetic draws existed, or between pairs) starts a new pair."""
        pending = state.get("pending") if self.antithetic else None
        self.pending = None if pending is None else pending.detach().to(hp.unconstrained.device).clone()
        self._next, self._drawn = None, False
