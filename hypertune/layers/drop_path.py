"""Stochastic depth (DropPath) whose rate is a tuned hyperparameter, drawn per example.

Stochastic depth drops a residual branch for a whole example: one mask entry per example, so
one rate per example costs nothing extra. The swapped-in module keeps the original one aside
and gives it back, at the tuned rate, on unwrap.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..linearize import scale_tangent_too
from ..rows import BatchPerturbationNeeded
from .base import carry_hooks
from .dropout import HyperDropout


def drop_path_per_example(x: Tensor, rate: Tensor, where: str, scale_by_keep: bool = True) -> Tensor:
    """Zero example ``i`` of ``x`` (axis 0) with probability ``rate[i]``, and scale the kept ones
    by ``1 / (1 - rate[i])`` when ``scale_by_keep`` (rate shape (R,), R ∈ {1, B})."""
    rate = rate.detach().to(torch.promote_types(x.dtype, torch.float32))
    rows, batch = rate.shape[0], x.shape[0] if x.dim() else 1
    if rows not in (1, batch):
        raise BatchPerturbationNeeded(
            where, f"{where}: its input's first axis ({batch}) is not the batch of {rows} examples"
        )
    shape = (batch,) + (1,) * (x.dim() - 1)
    keep = (1.0 - rate).reshape(-1, *shape[1:])
    mask = (torch.rand(shape, device=x.device, dtype=keep.dtype) < keep).to(x.dtype)
    scale = mask.div_(keep.to(x.dtype)) if scale_by_keep else mask
    return scale_tangent_too(x, scale)  # in Δ-STN's Θ step x carries a tangent


class HyperDropPath(HyperDropout):
    """Replaces a stochastic-depth module (timm ``DropPath``, torchvision ``StochasticDepth``,
    Hugging Face ``*DropPath``); reads its rate from the active perturbation."""

    def __init__(self, hparam: str, original: nn.Module, rate_attribute: str, path: str = "",
                 scale_by_keep: bool = True) -> None:
        super().__init__(hparam, type(original), 0, path)
        self.scale_by_keep = scale_by_keep
        self.rate_attribute = rate_attribute
        # the module it replaced, out of the module tree (no state, no parameters): unwrap's result
        self.__dict__["original"] = original

    def drop_per_example(self, x: Tensor, sequence_first: bool = True) -> Tensor:
        p = self._pass_using_the_rate()
        return drop_path_per_example(x, p.value(self.hparam), f"HyperDropPath '{self.hyper_path}'", self.scale_by_keep)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop_per_example(x) if self.training else x

    def to_module(self, rate: float) -> nn.Module:
        """The original module, at the tuned rate."""
        plain: Any = self.__dict__["original"]
        setattr(plain, self.rate_attribute, rate)
        plain.train(self.training)
        carry_hooks(self, plain)
        return plain

    def extra_repr(self) -> str:
        return f"hparam={self.hparam!r}, like={self.base_class.__name__}"
