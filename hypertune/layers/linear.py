"""nn.Linear as a centered hyper-layer."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import HyperLayer, row_view


class HyperLinear(HyperLayer, nn.Linear):
    base_class = nn.Linear

    def base_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    def response(
        self, x: Tensor, s_w: Tensor, s_b: Tensor | None, weight: Tensor, bias: Tensor | None
    ) -> Tensor:
        batched = x.dim() >= 2
        where = f"HyperLinear '{self.hyper_path}'"
        out = F.linear(x, weight) * row_view(
            s_w, x.dim(), -1, batched, x.shape[0], where, shape=x.shape
        )
        if s_b is not None and bias is not None:
            out = out + row_view(s_b, x.dim(), -1, batched, x.shape[0], where, shape=x.shape) * bias
        return out
