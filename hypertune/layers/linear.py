"""nn.Linear as a centered hyper-layer."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import HyperLayer, row_view
from .registry import register_layer_kind


# timm's Linear only adds a cast under TorchScript; its eager forward is F.linear.
@register_layer_kind(handles=[nn.Linear, "timm.layers.linear.Linear"])
class HyperLinear(HyperLayer, nn.Linear):
    base_class = nn.Linear
    modulated_dims = (0, 1)  # output rows; input columns when tied to an embedding's features

    def base_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    def response(
        self, x: Tensor, s_w: Tensor, s_b: Tensor | None, weight: Tensor, bias: Tensor | None
    ) -> Tensor:
        batched = x.dim() >= 2
        where = f"HyperLinear '{self.hyper_path}'"
        if self.modulated_dim == 1:  # W_resp diag(s): scale the input features instead
            out = F.linear(x * row_view(s_w, x.dim(), -1, batched, x.shape[0], where, shape=x.shape), weight)
        else:
            out = F.linear(x, weight) * row_view(s_w, x.dim(), -1, batched, x.shape[0], where, shape=x.shape)
        if s_b is not None and bias is not None:
            out = out + row_view(s_b, x.dim(), -1, batched, x.shape[0], where, shape=x.shape) * bias
        return out
