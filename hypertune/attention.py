"""Tuned dropout inside attention: a rate that a model reads as a float and hands to a kernel.

Attention code does not call its dropout module. It reads ``self.attn_drop.p`` (timm) or
``self.dropout.p`` (Hugging Face) and passes the float to ``F.scaled_dot_product_attention``
(``dropout_p=``) or to ``F.dropout`` on the attention probabilities (Hugging Face's eager
attention interface). A tuned dropout answers ``.p`` with a :class:`TunedRate`: a float equal to
the rate of the pass (so a batch that shares one rate runs exactly as ``nn.Dropout(p)`` would,
fused kernels included) that also says which site it is. In a pass that carries one rate per
example, :class:`TunedRateCalls` catches the calls that receive it and runs them with a mask
drawn per example: SDPA becomes the math kernel with its dropout on the attention
probabilities. Any other call that receives the rate cannot act per example, so the site
asks for per-batch perturbation (:class:`~hypertune.rows.BatchPerturbationNeeded`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .rows import BatchPerturbationNeeded, per_thread

if TYPE_CHECKING:
    from .layers.dropout import HyperDropout


class TunedRate(float):
    """A dropout rate read from a tuned site: the float value of this pass, and the site."""

    site: HyperDropout

    def __new__(cls, value: float, site: HyperDropout) -> TunedRate:
        rate = super().__new__(cls, value)
        rate.site = site
        return rate

    def __reduce__(self) -> tuple[type, tuple[float]]:
        return (float, (float(self),))  # a pickled rate is a plain number


@torch.compiler.disable
def tuned_rate(value: float, site: HyperDropout) -> TunedRate:
    """A :class:`TunedRate`, built outside any graph: dynamo cannot set an attribute on a float
    subclass, and may try to compile the constructor on its own when the caller runs eagerly."""
    return TunedRate(value, site)


def _tuned(value: Any) -> TunedRate | None:
    return value if isinstance(value, TunedRate) else None


def softmax(x: Tensor, dim: int, log: bool = False) -> Tensor:
    """``torch.softmax`` (or ``log_softmax``) from exp and sum: the same function, whose forward-AD
    tangent can be backpropagated even when the primal needs a gradient too (torch's fused
    softmax tangent fails there with "modified by an inplace operation")."""
    top = x.amax(dim, keepdim=True).detach()
    shifted = x - torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = shifted.exp()
    total = e.sum(dim, keepdim=True)
    if log:
        return shifted - total.log()
    return e / total.masked_fill(total == 0, 1.0)


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def math_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout: Callable[[Tensor], Tensor] | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """``F.scaled_dot_product_attention``'s math kernel, with ``dropout`` applied to the
    attention probabilities (so each example can draw its own mask)."""
    q_len, k_len = query.shape[-2], key.shape[-2]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if enable_gqa and query.dim() >= 3 and key.shape[-3] != query.shape[-3]:
        groups = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(groups, dim=-3)
        value = value.repeat_interleave(groups, dim=-3)
    scores = query @ key.transpose(-2, -1) * scale
    masked: Tensor | None = None
    if is_causal:
        masked = ~torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(masked, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    probs = softmax(scores, dim=-1)
    if is_causal or attn_mask is not None:
        # a query that may attend to nothing gets zeros, as the math kernel's safe softmax gives
        probs = probs.masked_fill(torch.isneginf(scores).all(-1, keepdim=True), 0.0)
    if dropout is not None:
        probs = dropout(probs)
    return probs @ value


class _Active:
    """How many TunedRateCalls modes are active, per thread as torch's function modes are."""

    count = 0


_active = per_thread(_Active)


def intercepting() -> bool:
    """Whether a :class:`TunedRateCalls` mode is active in this thread (a site's rate can act
    per example)."""
    return _active().count > 0


def sdpa_as_math(*args: Any, **kwargs: Any) -> Tensor:
    """``F.scaled_dot_product_attention`` called with the same arguments, as :func:`math_attention`
    (a float ``dropout_p`` drops like the kernel: whenever it is positive)."""
    bound = dict(zip(_SDPA_ARGS, args))
    bound.update(kwargs)
    rate = float(bound.get("dropout_p") or 0.0)
    return math_attention(
        bound["query"], bound["key"], bound["value"], bound.get("attn_mask"),
        (lambda probs: F.dropout(probs, rate)) if rate > 0 else None,
        bool(bound.get("is_causal", False)), bound.get("scale"), bool(bound.get("enable_gqa", False)),
    )


class TunedRateCalls(TorchFunctionMode):
    """Active during a wrapped forward whose tuned rates differ per example; see the module doc."""

    def __enter__(self) -> TunedRateCalls:
        _active().count += 1
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        _active().count -= 1
        super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            bound = dict(zip(_SDPA_ARGS, args))
            bound.update(kwargs)
            rate = _tuned(bound.get("dropout_p"))
            if rate is not None:
                site = rate.site
                site.mark_used()
                return math_attention(
                    bound["query"], bound["key"], bound["value"], bound.get("attn_mask"),
                    lambda probs: site.drop_per_example(probs, sequence_first=False),
                    bool(bound.get("is_causal", False)), bound.get("scale"), bool(bound.get("enable_gqa", False)),
                )
        elif func is F.dropout or func is torch.dropout:
            names = ("input", "p", "training", "inplace") if func is F.dropout else ("input", "p", "train")
            bound = dict(zip(names, args))
            bound.update(kwargs)
            rate = _tuned(bound.get("p"))
            if rate is not None:
                site = rate.site
                site.mark_used()
                x = bound["input"]
                if not bound.get("training", bound.get("train", True)):
                    return x
                # (B, heads, L, S) attention probabilities have heads, not examples, on axis 1
                out = site.drop_per_example(x, sequence_first=x.dim() != 4)
                if bound.get("inplace", False):
                    return x.copy_(out)
                return out
        else:
            for value in (*args, *kwargs.values()):
                rate = _tuned(value)
                if rate is not None:
                    where = f"tuned dropout '{rate.site.hyper_path}'"
                    raise BatchPerturbationNeeded(
                        where,
                        f"{where}: its rate is passed to {getattr(func, '__name__', func)}, which takes "
                        "one rate for the whole batch",
                    )
        return func(*args, **kwargs)
