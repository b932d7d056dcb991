"""timm's convolutions with their own forward: 'same' padding and weight standardization.

``Conv2dSame`` pads like TensorFlow's SAME before an unpadded convolution: the response pads the
same way. ``StdConv2d`` / ``ScaledStdConv2d`` (NF-Nets, BiT) convolve with a standardized weight
std(W₀); here w₀ is that effective weight, and Θ's response is added to it:
``y = conv(x, std(W₀)) + s ⊙ conv(x, W_resp)``. Their weight decay measures the raw W₀ (the
response is in the standardized space, where the norm is fixed by the gain), and plain STN cannot
fold Θ back into W₀. Matched by dotted name: timm stays optional.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..errors import HyperTuneError
from .conv import HyperConv2d
from .registry import register_layer_kind


def _pad_same(x: Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...]) -> Tensor:
    from timm.layers.padding import pad_same  # present whenever a timm module is

    return pad_same(x, list(kernel), list(stride), list(dilation))


@register_layer_kind(handles="timm.layers.conv2d_same.Conv2dSame")
class HyperConv2dSame(HyperConv2d):
    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        x = _pad_same(x, tuple(weight.shape[-2:]), self.stride, self.dilation)
        return F.conv2d(x, weight, bias, self.stride, (0, 0), self.dilation, self.groups)


@register_layer_kind(
    handles=[
        "timm.layers.std_conv.StdConv2d",
        "timm.layers.std_conv.StdConv2dSame",
        "timm.layers.std_conv.ScaledStdConv2d",
        "timm.layers.std_conv.ScaledStdConv2dSame",
    ]
)
class HyperStdConv2d(HyperConv2d):
    def standardized(self, weight: Tensor) -> Tensor:
        """The weight the module convolves with, exactly as timm computes it."""
        gain = getattr(self, "gain", None)
        scale = getattr(self, "scale", None)
        affine = (gain * scale).view(-1) if gain is not None else None
        return F.batch_norm(
            weight.reshape(1, self.out_channels, -1), None, None, weight=affine,
            training=True, momentum=0.0, eps=self.eps,
        ).reshape_as(weight)

    def _pad(self, x: Tensor) -> Tensor:
        if getattr(self, "same_pad", False):
            return _pad_same(x, self.kernel_size, self.stride, self.dilation)
        return x

    def base_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv2d(
            self._pad(x), self.standardized(weight), bias, self.stride, self.padding, self.dilation, self.groups
        )

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        # the response: W_resp acts directly, in the standardized weight's space
        return F.conv2d(self._pad(x), weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def weight_sq_norm(self, response_input: Tensor | None, include_bias: bool = False) -> Tensor:
        rows = 1 if response_input is None else response_input.shape[0]
        return super().weight_sq_norm(None, include_bias).expand(rows)

    def bake_refusal(self) -> str | None:
        return (
            f"'{self.hyper_path}' ({self.original_class.__name__}) standardizes its weight, so plain STN's "
            "Θ cannot be folded back into it: unwrap in mode 'delta' or 'centered', or exclude it"
        )

    def bake(self, response_input: Tensor, *, untie: bool = False) -> None:
        raise HyperTuneError(self.bake_refusal())
