"""Dropout whose rate is a tuned hyperparameter, drawn per example at that example's rate.

F.dropout takes one Python float for the whole batch; tuning needs a rate per example and a
tensor rate (a float per value would recompile under torch.compile), so the mask is built here.
"""

from __future__ import annotations

from torch import Tensor, nn
import torch

from .. import context
from ..errors import PerturbationError
from .base import carry_hooks


def dropout_per_example(
    x: Tensor,
    rate: Tensor,
    shared_trailing_dims: int = 0,
    where: str = "dropout",
    locked_dim: int | None = None,
) -> Tensor:
    """Inverted dropout of ``x`` with rate ``rate[i]`` for example ``i`` (rate shape (R,), R ∈ {1, B}).

    ``shared_trailing_dims`` trailing axes share one mask entry (channel dropout: 1, 2 or 3);
    ``locked_dim`` shares the mask along one more axis (variational dropout over time).
    The rate carries no gradient: regularizers reach λ through the response path only.
    """
    # Rates and masks in float32 at least: a bf16 rate of 0.05 would round to about 0.051.
    rate = rate.detach().to(torch.promote_types(x.dtype, torch.float32))
    batched = x.dim() >= 2 + shared_trailing_dims
    rows = rate.shape[0]
    context.rows_for(x.shape[0] if batched else 1, rows, where)
    mask_shape = list(x.shape[: x.dim() - shared_trailing_dims]) + [1] * shared_trailing_dims
    if locked_dim is not None:
        if not batched or locked_dim >= x.dim():
            raise PerturbationError(
                f"{where}: locked_dim={locked_dim} needs a batched input with that axis, got shape "
                f"{tuple(x.shape)}"
            )
        mask_shape[locked_dim] = 1
    keep = (1.0 - rate).reshape([rows] + [1] * (x.dim() - 1))
    mask = torch.rand(mask_shape, device=x.device, dtype=keep.dtype) < keep
    return x * mask.to(x.dtype) / keep.to(x.dtype)


class HyperDropout(nn.Module):
    """Replaces nn.Dropout/Dropout1d/2d/3d; reads its rate from the active perturbation."""

    def __init__(
        self,
        hparam: str,
        base_class: type[nn.Module],
        shared_trailing_dims: int,
        path: str = "",
        locked_dim: int | None = None,
        inplace: bool = False,
    ) -> None:
        super().__init__()
        self.hparam = hparam
        self.locked_dim = locked_dim
        self.inplace = inplace  # kept only to give it back on unwrap
        self.base_class = base_class
        self.shared_trailing_dims = shared_trailing_dims
        self.hyper_path = path

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        p = context.current()
        if p is None:
            raise PerturbationError(
                f"HyperDropout '{self.hyper_path}' ran outside a HyperModel forward, so it has no rate; "
                "call the wrapped model rather than its inner module"
            )
        return dropout_per_example(
            x,
            p.value(self.hparam),
            self.shared_trailing_dims,
            f"HyperDropout '{self.hyper_path}'",
            self.locked_dim,
        )

    def to_module(self, rate: float) -> nn.Module:
        """The plain dropout at the tuned rate (a locked mask has no torch module: its eval
        behaviour, the identity, is the same)."""
        plain = self.base_class(p=rate, inplace=self.inplace)
        plain.train(self.training)
        carry_hooks(self, plain)
        return plain

    def extra_repr(self) -> str:
        locked = f", locked_dim={self.locked_dim}" if self.locked_dim is not None else ""
        return f"hparam={self.hparam!r}, like={self.base_class.__name__}{locked}"
