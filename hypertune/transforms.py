"""Maps between a hyperparameter's constrained value and the unconstrained scale it is tuned on.

Gradient steps and Gaussian perturbations live on the unconstrained scale, so a bounded value
can never leave its bounds, and a scale value (weight decay) moves by factors, not increments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Transform:
    """Base: ``forward`` maps unconstrained tensors to values, ``inverse`` maps a value back."""

    def forward(self, u: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse(self, value: float) -> float:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class Identity(Transform):
    def forward(self, u: Tensor) -> Tensor:
        return u

    def inverse(self, value: float) -> float:
        return float(value)


@dataclass(frozen=True)
class ScaledSigmoid(Transform):
    """``low + (high - low) * sigmoid(u)``: both bounds finite, linear scale."""

    low: float
    high: float

    def forward(self, u: Tensor) -> Tensor:
        return self.low + (self.high - self.low) * torch.sigmoid(u)

    def inverse(self, value: float) -> float:
        t = (value - self.low) / (self.high - self.low)
        return math.log(t) - math.log1p(-t)


@dataclass(frozen=True)
class LogScaledSigmoid(Transform):
    """``exp`` of a scaled sigmoid: both bounds finite and positive, log scale."""

    low: float
    high: float

    def forward(self, u: Tensor) -> Tensor:
        lo, hi = math.log(self.low), math.log(self.high)
        return torch.exp(lo + (hi - lo) * torch.sigmoid(u))

    def inverse(self, value: float) -> float:
        lo, hi = math.log(self.low), math.log(self.high)
        t = (math.log(value) - lo) / (hi - lo)
        return math.log(t) - math.log1p(-t)


@dataclass(frozen=True)
class ShiftedExp(Transform):
    """``low + exp(u)``: only a lower bound; ``u`` is the log of the distance to it."""

    low: float

    def forward(self, u: Tensor) -> Tensor:
        return self.low + torch.exp(u)

    def inverse(self, value: float) -> float:
        return math.log(value - self.low)


@dataclass(frozen=True)
class ReflectedExp(Transform):
    """``high - exp(u)``: only an upper bound."""

    high: float

    def forward(self, u: Tensor) -> Tensor:
        return self.high - torch.exp(u)

    def inverse(self, value: float) -> float:
        return math.log(self.high - value)


def transform_for(low: float, high: float, log: bool) -> Transform:
    """The transform whose image is exactly the open interval (low, high)."""
    finite_low, finite_high = math.isfinite(low), math.isfinite(high)
    if finite_low and finite_high:
        return LogScaledSigmoid(low, high) if log else ScaledSigmoid(low, high)
    if finite_low:
        return ShiftedExp(low)
    if finite_high:
        return ReflectedExp(high)
    return Identity()
