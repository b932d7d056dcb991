"""Dropout whose rate is a tuned hyperparameter, drawn per example at that example's rate.

F.dropout takes one Python float for the whole batch; tuning needs a rate per example and a
tensor rate (a float per value would recompile under torch.compile), so the mask is built here.
"""

from __future__ import annotations

from torch import Tensor, nn
import torch

from .. import context
from ..errors import PerturbationError


def dropout_per_example(x: Tensor, rate: Tensor, shared_trailing_dims: int = 0, where: str = "dropout") -> Tensor:
    """Inverted dropout of ``x`` with rate ``rate[i]`` for example ``i`` (rate shape (R,), R ∈ {1, B}).

    ``shared_trailing_dims`` trailing axes share one mask entry (channel dropout: 1, 2 or 3).
    The rate carries no gradient: regularizers reach λ through the response path only.
    """
    rate = rate.detach().to(x.dtype)
    batched = x.dim() >= 2 + shared_trailing_dims
    rows = rate.shape[0]
    context.rows_for(x.shape[0] if batched else 1, rows, where)
    mask_shape = list(x.shape[: x.dim() - shared_trailing_dims]) + [1] * shared_trailing_dims
    keep = (1.0 - rate).reshape([rows] + [1] * (x.dim() - 1))
    mask = torch.rand(mask_shape, device=x.device, dtype=x.dtype) < keep
    return x * mask / keep


class HyperDropout(nn.Module):
    """Replaces nn.Dropout/Dropout1d/2d/3d; reads its rate from the active perturbation."""

    def __init__(self, hparam: str, base_class: type[nn.Module], shared_trailing_dims: int, path: str = "") -> None:
        super().__init__()
        self.hparam = hparam
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
            x, p.value(self.hparam), self.shared_trailing_dims, f"HyperDropout '{self.hyper_path}'"
        )

    def to_module(self, rate: float) -> nn.Module:
        plain = self.base_class(p=rate)
        plain.train(self.training)
        return plain

    def extra_repr(self) -> str:
        return f"hparam={self.hparam!r}, like={self.base_class.__name__}"
