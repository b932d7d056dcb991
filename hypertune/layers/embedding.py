"""nn.Embedding as a centered hyper-layer: the modulation scales embedding features.

Embedding dropout (Gal & Ghahramani's word dropout) drops whole word types: every occurrence of
a dropped word in an example is zeroed, the rest scaled by 1/(1-p). Masks are drawn per example
over the vocabulary, so each example carries its own rate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import context
from .base import HyperLayer, row_view


class HyperEmbedding(HyperLayer, nn.Embedding):
    base_class = nn.Embedding
    modulated_dim = 1
    regularizer_attributes = ("dropconnect", "word_dropout")

    def _reset_response_weight(self) -> None:
        with torch.no_grad():
            nn.init.normal_(self.response_weight)
            if self.padding_idx is not None:
                # The padding row stays fixed at w₀'s value for every δλ.
                self.response_weight[self.padding_idx].zero_()

    def base_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.embedding(
            x, weight, self.padding_idx, self.max_norm, self.norm_type,
            self.scale_grad_by_freq, self.sparse,
        )

    def response(
        self, x: Tensor, s_w: Tensor, s_b: Tensor | None, weight: Tensor, bias: Tensor | None
    ) -> Tensor:
        out = F.embedding(x, weight, self.padding_idx, None, 2.0, self.scale_grad_by_freq)
        where = f"HyperEmbedding '{self.hyper_path}'"
        return out * row_view(
            s_w, out.dim(), -1, x.dim() >= 1, x.shape[0] if x.dim() else 1, where, shape=x.shape, feature_dims=0
        )

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        name = self.__dict__.get("word_dropout")
        p = context.current()
        if name is None or not self.training or p is None:
            return out
        rate = p.value(name).detach().to(self.weight.dtype)
        batched = x.dim() >= 2
        rows = rate.shape[0]
        context.rows_for(x.shape[0] if batched else 1, rows, f"embedding dropout '{self.hyper_path}'")
        keep = (1.0 - rate).unsqueeze(1)  # (R, 1)
        n = x.shape[0] if batched and rows > 1 else 1
        mask = (torch.rand(n, self.num_embeddings, device=x.device, dtype=keep.dtype) < keep) / keep
        if batched:
            flat = x.reshape(x.shape[0], -1)
            scale = torch.gather(mask.expand(x.shape[0], -1), 1, flat).reshape(x.shape)
        else:
            scale = mask[0][x]
        return out * scale.unsqueeze(-1)
