"""nn.Conv1d/2d/3d as centered hyper-layers (any stride, padding, dilation, groups, padding mode)."""

from __future__ import annotations

from torch import Tensor, nn

from .base import HyperLayer, row_view
from .registry import register_layer_kind


class _HyperConv(HyperLayer):
    spatial_dims: int

    def base_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return self._conv_forward(x, weight, bias)  # type: ignore[attr-defined]

    def response(
        self, x: Tensor, s_w: Tensor, s_b: Tensor | None, weight: Tensor, bias: Tensor | None
    ) -> Tensor:
        # Modulating output channels commutes with the convolution: scale W_resp * x per channel.
        out = self._conv_forward(x, weight, None)  # type: ignore[attr-defined]
        batched = x.dim() == self.spatial_dims + 2
        channel_dim = 1 if batched else 0
        where = f"{type(self).__name__} '{self.hyper_path}'"
        out = out * row_view(
            s_w, out.dim(), channel_dim, batched, x.shape[0], where,
            shape=x.shape, feature_dims=self.spatial_dims + 1, sequence_first=False,
        )
        if s_b is not None and bias is not None:
            sb = row_view(
                s_b, out.dim(), channel_dim, batched, x.shape[0], where,
                shape=x.shape, feature_dims=self.spatial_dims + 1, sequence_first=False,
            )
            shape = [1] * out.dim()
            shape[channel_dim] = -1
            out = out + sb * bias.reshape(shape)
        return out


@register_layer_kind
class HyperConv1d(_HyperConv, nn.Conv1d):
    base_class = nn.Conv1d
    spatial_dims = 1


@register_layer_kind
class HyperConv2d(_HyperConv, nn.Conv2d):
    base_class = nn.Conv2d
    spatial_dims = 2


@register_layer_kind
class HyperConv3d(_HyperConv, nn.Conv3d):
    base_class = nn.Conv3d
    spatial_dims = 3
