"""nn.Embedding as a centered hyper-layer: the modulation scales embedding features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import HyperLayer, row_view


class HyperEmbedding(HyperLayer, nn.Embedding):
    base_class = nn.Embedding
    modulated_dim = 1

    def _reset_response_weight(self) -> None:
        with torch.no_grad():
            nn.init.normal_(self.response_weight)
            if self.padding_idx is not None:
                # The padding row stays fixed at w₀'s value for every δλ.
                self.response_weight[self.padding_idx].zero_()

    def base_forward(self, x: Tensor) -> Tensor:
        return F.embedding(
            x, self.weight, self.padding_idx, self.max_norm, self.norm_type,
            self.scale_grad_by_freq, self.sparse,
        )

    def response(self, x: Tensor, s_w: Tensor, s_b: Tensor | None) -> Tensor:
        out = F.embedding(x, self.response_weight, self.padding_idx, None, 2.0, self.scale_grad_by_freq)
        where = f"HyperEmbedding '{self.hyper_path}'"
        return out * row_view(s_w, out.dim(), -1, x.dim() >= 1, x.shape[0] if x.dim() else 1, where)
