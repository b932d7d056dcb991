"""transformers' ``Conv1D`` (GPT-2's projections) as a centered hyper-layer.

It is a linear layer whose weight is stored transposed, (in, out), so the modulation scales the
weight's columns (dimension 1, the outputs). Matched by dotted name: transformers stays optional.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import HyperLayer, row_view
from .registry import register_layer_kind


def _addmm(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Conv1D's own computation, kept to the same kernel so outputs match it bit for bit."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.addmm(bias, flat, weight) if bias is not None else flat @ weight
    return out.view(*x.shape[:-1], weight.shape[1])


@register_layer_kind(handles="transformers.pytorch_utils.Conv1D")
class HyperConv1D(HyperLayer):
    modulated_dims = (1,)

    def _fan_in(self) -> int:
        return self.weight.shape[0]

    def _reset_response_weight(self) -> None:
        with torch.no_grad():  # the (out, in) view gets nn.Linear's init
            nn.init.kaiming_uniform_(self.response_weight.T, a=math.sqrt(5))

    def base_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return _addmm(x, weight, bias)

    def response(
        self, x: Tensor, s_w: Tensor, s_b: Tensor | None, weight: Tensor, bias: Tensor | None
    ) -> Tensor:
        batched = x.dim() >= 2
        where = f"HyperConv1D '{self.hyper_path}'"
        out = _addmm(x, weight, None) * row_view(s_w, x.dim(), -1, batched, x.shape[0], where)
        if s_b is not None and bias is not None:
            out = out + row_view(s_b, x.dim(), -1, batched, x.shape[0], where) * bias
        return out
