"""The extension point for tuned data augmentation.

Augmentation runs inside the wrapped model's forward, on the device, per example: DataLoader
workers never see updated hyperparameters, and each example of the Θ step needs its own value.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

from torch import Tensor

from ..specs import HParam


class Augmentation(ABC):
    """A batched input transform whose parameters are tuned hyperparameters.

    Give one to ``HyperModel.wrap(hparams={"cutout": Cutout(...)})``; its sub-hyperparameters are
    tuned under the names ``"cutout:<sub>"``. It is applied, in the order given, to the model's
    first input in training mode only: at λ₀ in the w₀ step, at λ₀+ε in the Θ step, never in
    ``val_step``.
    """

    @abstractmethod
    def hparams(self) -> dict[str, HParam]:
        """The tuned sub-hyperparameters, by sub-name."""

    @abstractmethod
    def apply(self, x: Tensor, values: Mapping[str, Tensor]) -> Tensor:
        """Transform a batch ``x``; ``values[sub]`` has shape (R,), R = 1 (shared) or len(x)."""
