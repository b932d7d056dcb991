"""The hyper-state: λ (unconstrained values) and σ (perturbation scales) of every tuned value.

It is a tiny module of two vectors, so distributed code can broadcast and all-reduce it as a
unit, and the optimizer can give it its own update rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .specs import HParam


def _softplus_inverse(x: float) -> float:
    return x + math.log(-math.expm1(-x))


class HyperParameters(nn.Module):
    """Holds λ and σ for an ordered set of named specs.

    ``unconstrained`` is λ on the tuning scale; σ is ``softplus(raw_scale)`` so it stays positive
    under unconstrained gradient steps.
    """

    def __init__(
        self,
        specs: Mapping[str, HParam],
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.specs: dict[str, HParam] = dict(specs)
        self.names: list[str] = list(self.specs)
        self._index = {n: i for i, n in enumerate(self.names)}
        factory = {"dtype": dtype or torch.get_default_dtype(), "device": device}
        self.unconstrained = nn.Parameter(torch.empty(len(self.names), **factory))
        self.raw_scale = nn.Parameter(torch.empty(len(self.names), **factory))
        self._transforms = [s.transform for s in self.specs.values()]
        batch_cols = [i for i, s in enumerate(self.specs.values()) if s.perturb == "batch"]
        self.register_buffer(
            "_batch_columns", torch.empty(len(batch_cols), dtype=torch.long, device=device), persistent=False
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """λ and σ at their specs' initial values. Also what fills them after ``to_empty`` on a
        model wrapped on the meta device, which leaves uninitialised memory behind."""
        if self.unconstrained.is_meta:
            return
        specs = list(self.specs.values())
        self.unconstrained.copy_(torch.tensor([s.unconstrained_init() for s in specs], dtype=torch.float64))
        self.raw_scale.copy_(torch.tensor([_softplus_inverse(s.init_scale) for s in specs], dtype=torch.float64))
        self._batch_columns.copy_(torch.tensor([i for i, s in enumerate(specs) if s.perturb == "batch"], dtype=torch.long))

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(
                f"no hyperparameter named {name!r}; tuned ones are {self.names}"
            ) from None

    @property
    def scale(self) -> Tensor:
        return F.softplus(self.raw_scale)

    def constrain(self, u: Tensor, name: str) -> Tensor:
        """Value of ``name`` for unconstrained rows ``u`` of shape (R, h); rounded if discrete."""
        i = self.index(name)
        value = self._transforms[i].forward(u[..., i])
        spec = self.specs[name]
        if spec.discrete:
            value = torch.round(value).clamp(math.ceil(spec.low), math.floor(spec.high))
        return value

    def _constrained_now(self) -> Tensor:
        u = self.unconstrained.detach().unsqueeze(0)
        return torch.stack([self.constrain(u, n)[0] for n in self.names])

    def values(self) -> dict[str, float]:
        """The current constrained values as Python floats (one device sync)."""
        with torch.no_grad():
            return dict(zip(self.names, self._constrained_now().tolist()))

    def scales(self) -> dict[str, float]:
        return dict(zip(self.names, self.scale.detach().tolist()))

    def values_and_scales(self) -> tuple[dict[str, float], dict[str, float]]:
        """Both, with one device sync instead of two (the optimizer records them every step)."""
        with torch.no_grad():
            vals, scales = torch.stack([self._constrained_now(), self.scale.detach()]).tolist()
        return dict(zip(self.names, vals)), dict(zip(self.names, scales))

    def sample_noise(self, rows: int) -> Tensor:
        """ε of shape (rows, h): one draw per example, shared down the batch for per-batch specs.

        When every spec is per-batch a single row is returned, which broadcasts over any batch
        layout (models that reshape their batch need exactly that).
        """
        if self._batch_columns.numel() == len(self):
            rows = 1
        z = torch.randn(rows, len(self), dtype=self.unconstrained.dtype, device=self.unconstrained.device)
        if self._batch_columns.numel():
            z[:, self._batch_columns] = z[:1, self._batch_columns]
        return z * self.scale

    def entropy(self) -> Tensor:
        """Entropy of the perturbation distribution N(0, diag σ²), up to nothing: exact."""
        return torch.sum(torch.log(self.scale)) + 0.5 * len(self) * math.log(2 * math.pi * math.e)

    def extra_repr(self) -> str:
        return ", ".join(f"{n}={type(s).__name__}" for n, s in self.specs.items())
