"""Training-loss penalties whose coefficients are tuned (they never enter the validation loss)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .context import Perturbation
from .layers import HyperLayer


@dataclass
class WeightDecayPenalty:
    """``c/2 * ||w(δλ)||²`` per perturbation row, for the modules one WeightDecay spec selects.

    Hyper-layer weights depend on δλ, so their norm is evaluated per row in closed form; other
    modules' weights are plain w₀ and add a constant.
    """

    hparam: str
    layers: list[HyperLayer]
    plain: list[nn.Parameter]
    include_bias: bool = False

    def __call__(self, p: Perturbation) -> Tensor:
        sq: Tensor | None = None
        for layer in self.layers:
            term = layer.weight_sq_norm(p.response_input, self.include_bias)
            sq = term if sq is None else sq + term
        for w in self.plain:
            term = w.pow(2).sum().reshape(1)
            sq = term if sq is None else sq + term
        if sq is None:
            return torch.zeros(1, device=p.hparams.device, dtype=p.hparams.dtype)
        return 0.5 * p.value(self.hparam) * sq
