"""The centered hyper-layer: weights w(δλ) = w₀ + Θ δλ with STN's row-wise structure.

For weight W (out × ...) and bias b the response is
``W(δλ) = W₀ + diag(s_w) W_resp`` and ``b(δλ) = b₀ + s_b ⊙ b_resp`` with ``[s_w, s_b] = P δλ``.
Because the modulation scales output channels, a layer computes ``W₀x + b₀`` plus
``s_w ⊙ (W_resp x) + s_b ⊙ b_resp``: each example carries its own δλ for one extra matmul.
Θ = {P, W_resp, b_resp}; P starts at zero so a freshly wrapped model computes exactly w₀.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from .. import context
from ..rows import layout
from ..linearize import make_dual

_HOOK_DICTS = (
    "_parameters",
    "_buffers",
    "_modules",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
    "_non_persistent_buffers_set",
)

M = TypeVar("M", bound=nn.Module)


def carry_hooks(source: nn.Module, target: nn.Module) -> None:
    """Give ``target`` copies of ``source``'s hook registries, so a user's hooks survive a swap."""
    for attr in _HOOK_DICTS:
        if attr.endswith("hooks") or attr.endswith("hooks_with_kwargs") or attr.endswith("always_called"):
            if attr in source.__dict__:
                target.__dict__[attr] = copy.copy(source.__dict__[attr])


def swap_class(module: nn.Module, cls: type[M]) -> M:
    """A shallow copy of ``module`` of class ``cls`` holding the *same* Parameter objects.

    Sharing the Parameters keeps state_dict keys, values and any optimizer references valid
    (torchao's ``from_float`` pattern); copying the registries keeps the original module intact.
    """
    new = copy.copy(module)
    for attr in _HOOK_DICTS:
        if attr in new.__dict__:
            new.__dict__[attr] = copy.copy(new.__dict__[attr])
    new.__class__ = cls
    return new


class HyperLayer(nn.Module):
    """Mixin turning a Linear/Conv/Embedding into a centered hyper-layer.

    Subclasses name the torch class they replace in ``base_class`` and implement
    ``base_forward`` (the w₀ computation) and ``response`` (Θ's contribution for given s).
    """

    base_class: type[nn.Module]
    # Which weight dimension the modulation scales: 0 for output rows (Linear/Conv),
    # 1 for embedding columns.
    modulated_dim: int = 0
    weight: nn.Parameter
    bias: nn.Parameter | None
    response_weight: nn.Parameter
    response_bias: nn.Parameter | None
    hyper_projection: nn.Linear
    hyper_path: str
    # Instance attributes naming the hyperparameter of a weight regularizer, set by surgery.
    regularizer_attributes: tuple[str, ...] = ("dropconnect",)

    # ---- construction and undoing -------------------------------------------------------
    @classmethod
    def from_module(cls, module: nn.Module, num_hyper: int, path: str = "") -> HyperLayer:
        layer = swap_class(module, cls)
        layer.hyper_path = path
        layer._init_response(num_hyper)
        return layer

    def to_module(self) -> nn.Module:
        """The plain torch module with the same w₀ Parameters and no Θ."""
        plain = swap_class(self, self.base_class)
        for name in ("response_weight", "response_bias"):
            plain._parameters.pop(name, None)
        plain._modules.pop("hyper_projection", None)
        for attr in ("hyper_path", *self.regularizer_attributes):
            plain.__dict__.pop(attr, None)
        return plain

    @property
    def modulated_size(self) -> int:
        return self.weight.shape[self.modulated_dim]

    def _init_response(self, num_hyper: int) -> None:
        w = self.weight
        factory: dict[str, Any] = {"device": w.device, "dtype": w.dtype}
        self.response_weight = nn.Parameter(torch.empty_like(w, requires_grad=True))
        self._reset_response_weight()
        if getattr(self, "bias", None) is not None:
            bound = 1.0 / math.sqrt(max(1, self._fan_in()))
            self.response_bias = nn.Parameter(
                torch.empty_like(self.bias).uniform_(-bound, bound)  # type: ignore[arg-type]
            )
        else:
            self.register_parameter("response_bias", None)
        n_out = self.modulated_size * (2 if self.response_bias is not None else 1)
        self.hyper_projection = nn.Linear(num_hyper, n_out, bias=False, **factory)
        nn.init.zeros_(self.hyper_projection.weight)

    def _fan_in(self) -> int:
        return nn.init._calculate_fan_in_and_fan_out(self.weight)[0]

    def _reset_response_weight(self) -> None:
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.response_weight, a=math.sqrt(5))

    def response_parameters(self) -> list[nn.Parameter]:
        """Θ: everything this layer adds on top of the module it replaced."""
        params = [self.response_weight, self.hyper_projection.weight]
        if self.response_bias is not None:
            params.append(self.response_bias)
        return params

    # ---- the math ----------------------------------------------------------------------
    def base_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # pragma: no cover
        """The replaced module's computation with the given w₀ weights."""
        raise NotImplementedError

    def response(
        self, x: Tensor, s_w: Tensor, s_b: Tensor | None, weight: Tensor, bias: Tensor | None
    ) -> Tensor:  # pragma: no cover
        """Θ's contribution ``s_w ⊙ (W_resp x) + s_b ⊙ b_resp``; s has shape (R, modulated)."""
        raise NotImplementedError

    def split(self, s: Tensor) -> tuple[Tensor, Tensor | None]:
        n = self.modulated_size
        return s[:, :n], (s[:, n:] if self.response_bias is not None else None)

    def _weights(
        self, p: context.Perturbation | None
    ) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """(W₀, b₀, W_resp, b_resp) for this pass; DropConnect masks W(δλ) as a whole.

        A weight mask is shared by every example, so DropConnect is drawn once per batch at
        the batch's rate (its spec is per-batch).
        """
        w, b = self.weight, getattr(self, "bias", None)
        wr, br = self.response_weight, self.response_bias
        name = self.__dict__.get("dropconnect")
        if name is not None and self.training and p is not None:
            keep = 1.0 - p.value(name)[0].detach().to(w.dtype)
            mask = (torch.rand(w.shape, device=w.device, dtype=w.dtype) < keep).to(w.dtype) / keep
            w, wr = w * mask, wr * mask
        return w, b, wr, br

    def forward(self, x: Tensor) -> Tensor:
        p = context.current()
        w, b, wr, br = self._weights(p)
        if p is not None and p.linearize and p.response_input is not None:
            out = self.base_forward(fwAD.unpack_dual(x).primal, w, b)
        else:
            out = self.base_forward(x, w, b)
        if p is None or p.response_input is None:
            return out
        s_w, s_b = self.split(self.hyper_projection(p.response_input))
        if not p.linearize:
            return out + self.response(x, s_w, s_b, wr, br)
        # Δ-STN: the primal stays w₀'s output, Θ δλ enters only the tangent, so the primal path
        # never touches Θ and needs no graph. The layer's own tangent is written out rather than
        # left to forward AD, whose addmm/conv rules also multiply by the weight's (zero) tangent.
        x_p, x_t = fwAD.unpack_dual(x)
        tangent = self.response(x_p, s_w, s_b, wr, br)
        if x_t is not None:
            tangent = tangent + self.base_forward(x_t, w, None)
        if tangent.shape != out.shape:  # a batch-shared input (rows.RowLayout.grows)
            out = out.expand(tangent.shape).contiguous()
        return make_dual(out, tangent)

    def decayed_parameters(self, include_bias: bool = False) -> list[nn.Parameter]:
        """The w₀ Parameters ``weight_sq_norm`` measures."""
        bias = getattr(self, "bias", None)
        return [self.weight] + ([bias] if include_bias and bias is not None else [])

    def weight_sq_norm(self, response_input: Tensor | None, include_bias: bool = False) -> Tensor:
        """||w(δλ)||² per perturbation row (shape (R,)), in closed form from the row structure."""
        total = self._sq_norm(self.weight, self.response_weight, response_input, 0)
        if include_bias and getattr(self, "bias", None) is not None:
            total = total + self._sq_norm(self.bias, self.response_bias, response_input, 1)
        return total

    def _sq_norm(
        self, w0: Tensor, wr: Tensor | None, response_input: Tensor | None, part: int
    ) -> Tensor:
        base = w0.pow(2).sum()
        if response_input is None:
            return base.reshape(1)
        s = self.split(self.hyper_projection(response_input))[part]
        assert s is not None and wr is not None
        w0m = w0.movedim(self.modulated_dim, 0).reshape(w0.shape[self.modulated_dim], -1)
        wrm = wr.movedim(self.modulated_dim, 0).reshape(wr.shape[self.modulated_dim], -1)
        cross = (w0m * wrm).sum(1)
        resp = wrm.pow(2).sum(1)
        return base + 2 * (s @ cross) + s.pow(2) @ resp

    @torch.no_grad()
    def bake(self, response_input: Tensor) -> None:
        """Fold Θ at one point into w₀ in place (plain STN, whose w₀ is not the current weights)."""
        s_w, s_b = self.split(self.hyper_projection(response_input.reshape(1, -1)))
        shape = [1] * self.weight.dim()
        shape[self.modulated_dim] = -1
        self.weight.add_(s_w.reshape(shape) * self.response_weight)
        if s_b is not None and getattr(self, "bias", None) is not None and self.response_bias is not None:
            self.bias.add_(s_b.reshape(-1) * self.response_bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_hyper={self.hyper_projection.in_features}"


def row_view(
    s: Tensor,
    out_dim: int,
    channel_dim: int,
    batched: bool,
    batch: int,
    where: str,
    shape: Sequence[int] | None = None,
    feature_dims: int = 1,
    sequence_first: bool = True,
) -> Tensor:
    """Shape s (R, C) to broadcast against an output of rank ``out_dim`` whose channels are at
    ``channel_dim``; an unbatched input only takes one shared row.

    ``shape`` is the input's shape, from which :func:`hypertune.rows.layout` finds which example
    each row belongs to (batch first, position ids of batch 1, batch-major windows, sequence
    first); without it the leading dimension ``batch`` must be the batch.
    """
    rows, channels = s.shape
    if not batched:
        context.rows_for(1, rows, where)
        view = [1] * out_dim
        view[channel_dim] = channels
        return s.reshape(view)
    if shape is None:
        lay = layout((batch,), rows, where, feature_dims=0, sequence_first=False)
    else:
        lay = layout(tuple(shape), rows, where, feature_dims, sequence_first)
    return lay.place(s, out_dim, channel_dim)
