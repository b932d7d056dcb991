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
from ..rows import layout
from .base import HyperLayer, row_view
from .registry import register_layer_kind


@register_layer_kind
class HyperEmbedding(HyperLayer, nn.Embedding):
    base_class = nn.Embedding
    modulated_dims = (1, 0)  # features; vocabulary rows when tied to a Linear that needs them
    regularizer_roles = ("dropconnect", "word_dropout")
    word_dropout: str | None = None

    @classmethod
    def check(cls, module: nn.Module) -> list[str]:
        if getattr(module, "max_norm", None) is not None:
            return ["uses max_norm, which rewrites weights during forward: set max_norm=None or add "
                    "the module to exclude"]
        return super().check(module)

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
        batched = x.dim() >= 1
        if self.modulated_dim == 1:
            return out * row_view(
                s_w, out.dim(), -1, batched, x.shape[0] if batched else 1, where, shape=x.shape, feature_dims=0
            )
        # Rows (vocabulary entries) modulated: each token's row is scaled by its example's s.
        if not batched:
            context.rows_for(1, s_w.shape[0], where)
            return out * s_w[0][x].unsqueeze(-1)
        lay = layout(x.shape, s_w.shape[0], where, feature_dims=0)
        example = lay.place(torch.arange(s_w.shape[0], device=x.device), x.dim())
        return out * s_w[example, x].unsqueeze(-1)

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        name = self.word_dropout
        p = context.current()
        if name is None or not self.training or p is None:
            return out
        rate = p.value(name).detach().to(self.weight.dtype)
        batched = x.dim() >= 2
        rows = rate.shape[0]
        context.rows_for(x.shape[0] if batched else 1, rows, f"embedding dropout '{self.hyper_path}'")
        keep = (1.0 - rate).unsqueeze(1)  # (R, 1)
        # one mask per example at every rate, as the Θ step and the fixed form draw them (the
        # w₀ pass has one shared row, R = 1, but its examples still get masks of their own)
        n = x.shape[0] if batched else 1
        mask = (torch.rand(n, self.num_embeddings, device=x.device, dtype=keep.dtype) < keep) / keep
        if batched:
            flat = x.reshape(x.shape[0], -1)
            scale = torch.gather(mask.expand(x.shape[0], -1), 1, flat).reshape(x.shape)
        else:
            scale = mask[0][x]
        return out * scale.unsqueeze(-1)
