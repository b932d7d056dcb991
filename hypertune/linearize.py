"""Linearization of a wrapped model's predictions in the weights, by forward-mode AD.

Δ-STN trains Θ on ``f(x, w₀, λ₀+ε) + J_yw Θε``. The hyper-layers put ``Θε`` into the forward-AD
tangent (their primal stays w₀'s output), and forward AD carries it through every other op of
the user's forward (activations, pooling, residuals, BatchNorm), so the output's tangent is
exactly ``J_yw Θε``. Unlike ``torch.func.jvp`` this works through DDP and train-mode BatchNorm,
and the primal path builds no autograd graph: only the tangent depends on Θ.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch.utils import _pytree as pytree


def _linearized(t: Any) -> Any:
    if not torch.is_tensor(t):
        return t
    primal, tangent = fwAD.unpack_dual(t)
    return primal if tangent is None else primal + tangent


def linearized_call(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` (a forward in linearize mode) and return every output as primal + tangent."""
    with fwAD.dual_level():
        out = fn()
        return pytree.tree_map(_linearized, out)
