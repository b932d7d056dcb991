"""The hyper-state: λ (unconstrained values) and σ (perturbation scales) of every tuned value.

It is a tiny module of two vectors, so distributed code can broadcast and all-reduce it as a
unit, and the optimizer can give it its own update rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import HyperTuneError
from .specs import HParam

#: Where a *tuned* σ may go, as multiples of each spec's σ₀ (``init_scale``). By default σ is not
#: tuned at all (``DeltaSTNOptimizer(tune_scales=False)``, the reference code's default): tuned
#: with the entropy bonus, σ shrank from 1 to 0.5–0.7 on MNIST within 2,000 steps, before Θ had
#: learned the hidden dropout rates' response, and those rates never moved (best validation
#: loss 0.232 against 0.188 with σ held at 1); and where a hyperparameter barely changes the
#: validation loss (Θ ≈ 0, e.g. an optimum on a bound) nothing opposes the entropy bonus and σ
#: grew to ~20 on the tuning scale (benchmarks/RESULTS.md, "σ₀" and "Defaults that tune"). When
#: a user tunes σ, these bounds keep it finite and away from zero; they do not stop the early
#: shrinking (holding σ does). σ₀/10 still lets σ settle where the linear toy's exact fixed
#: point puts it (0.07–0.27 from σ₀ = 0.5), and 4·σ₀ already sweeps a rate across most of its
#: range.
SCALE_RANGE: tuple[float, float] = (0.1, 4.0)


def _softplus_inverse(x: float) -> float:
    return x + math.log(-math.expm1(-x))


class _ProjectedClamp(torch.autograd.Function):
    """Clamp σ into [low, high]; pass the gradient unless it would push σ further out.

    A plain clamp has zero gradient outside its range, so a σ that touched a bound would stay
    there for good; this is projected gradient descent instead: the raw value passes the bound by
    at most the step that crossed it (for an optimizer without momentum, such as the default
    RMSprop), and the first gradient pointing back inside moves σ again.
    """

    @staticmethod
    def forward(ctx: Any, sigma: Tensor, low: Tensor, high: Tensor) -> Tensor:
        ctx.save_for_backward(sigma, low, high)
        return torch.minimum(torch.maximum(sigma, low), high)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        sigma, low, high = ctx.saved_tensors
        # A descent step moves σ along -grad: outward at the top when grad < 0, at the bottom when > 0.
        outward = ((sigma >= high) & (grad < 0)) | ((sigma <= low) & (grad > 0))
        return grad.masked_fill(outward, 0.0), None, None


class HyperParameters(nn.Module):
    """Holds λ and σ for an ordered set of named specs.

    ``unconstrained`` is λ on the tuning scale; σ is ``softplus(raw_scale)`` so it stays positive
    under unconstrained gradient steps, held inside ``scale_range`` × σ₀ of each spec when tuned.
    """

    def __init__(
        self,
        specs: Mapping[str, HParam],
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        scale_range: tuple[float, float] = SCALE_RANGE,
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
        self._init_scales = [float(s.init_scale) for s in self.specs.values()]
        self.register_buffer("_scale_low", torch.empty(len(self.names), **factory), persistent=False)
        self.register_buffer("_scale_high", torch.empty(len(self.names), **factory), persistent=False)
        self.scale_range = scale_range
        self._last_read: tuple[Any, list[float], list[float]] | None = None
        self.reset_parameters()

    @property
    def scale_range(self) -> tuple[float, float]:
        """(low, high) multiples of each spec's σ₀ between which a tuned σ stays."""
        return self._scale_range

    @scale_range.setter
    def scale_range(self, value: tuple[float, float]) -> None:
        try:
            low, high = (float(v) for v in value)
        except (TypeError, ValueError):
            raise HyperTuneError(
                f"scale_range={value!r} must be two numbers (low, high), multiples of each σ₀, e.g. {SCALE_RANGE}"
            ) from None
        if not (0 < low <= 1 <= high < math.inf):
            raise HyperTuneError(
                f"scale_range=({low}, {high}) must satisfy 0 < low <= 1 <= high < inf, so that every σ₀ "
                f"lies inside it; e.g. {SCALE_RANGE}"
            )
        self._scale_range = (low, high)
        with torch.no_grad():  # products in float64, then one rounding to the buffers' dtype
            for buffer, factor in ((self._scale_low, low), (self._scale_high, high)):
                buffer.copy_(torch.tensor([v * factor for v in self._init_scales], dtype=torch.float64))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """λ and σ at their specs' initial values. Also what fills them after ``to_empty`` on a
        model wrapped on the meta device, which leaves uninitialised memory behind."""
        if self.unconstrained.is_meta:
            return
        specs = list(self.specs.values())
        self.unconstrained.copy_(torch.tensor([s.unconstrained_init() for s in specs], dtype=torch.float64))
        self.raw_scale.copy_(torch.tensor([_softplus_inverse(s.init_scale) for s in specs], dtype=torch.float64))
        self.scale_range = self._scale_range  # refill the σ bounds too (meta → to_empty)
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
        """σ: softplus of the raw value, inside [low, high]·σ₀ (``scale_range``)."""
        return _ProjectedClamp.apply(F.softplus(self.raw_scale), self._scale_low, self._scale_high)

    def constrain(self, u: Tensor, name: str) -> Tensor:
        """Value of ``name`` for unconstrained rows ``u`` of shape (R, h); rounded if discrete."""
        i = self.index(name)
        value = self._transforms[i].forward(u[..., i])
        spec = self.specs[name]
        if spec.discrete:
            # The integer in the forward, the continuous value's gradient in the backward (a
            # straight-through estimator): round() alone has zero gradient, which left a discrete
            # value only the response's path to λ.
            rounded = torch.round(value).clamp(math.ceil(spec.low), math.floor(spec.high))
            value = rounded.detach() + (value - value.detach())  # exactly the integer: v - v = 0
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
        """Both, with one device sync instead of two (the optimizer records them every step).

        A read is reused while λ, σ and σ's bounds are unchanged (their version counters and
        storages): a train step does not move λ, so on a GPU it need not wait for the device here.
        """
        key = tuple((t._version, t.data_ptr()) for t in (self.unconstrained, self.raw_scale, self._scale_low, self._scale_high))
        cached = getattr(self, "_last_read", None)  # absent in models pickled by older versions
        if cached is None or cached[0] != key:
            with torch.no_grad():
                vals, scales = torch.stack([self._constrained_now(), self.scale.detach()]).tolist()
            cached = self._last_read = (key, vals, scales)
        return dict(zip(self.names, cached[1])), dict(zip(self.names, cached[2]))

    def noise_rows(self, rows: int) -> int:
        """How many rows :meth:`sample_noise` returns for a batch of ``rows``."""
        return 1 if self._batch_columns.numel() == len(self) else rows

    def sample_noise(self, rows: int) -> Tensor:
        """ε of shape (rows, h): one draw per example, shared down the batch for per-batch specs.

        When every spec is per-batch a single row is returned, which broadcasts over any batch
        layout (models that reshape their batch need exactly that).
        """
        rows = self.noise_rows(rows)
        z = torch.randn(rows, len(self), dtype=self.unconstrained.dtype, device=self.unconstrained.device)
        if self._batch_columns.numel():
            z[:, self._batch_columns] = z[:1, self._batch_columns]
        return z * self.scale

    def entropy(self) -> Tensor:
        """Entropy of the perturbation distribution N(0, diag σ²), up to nothing: exact."""
        return torch.sum(torch.log(self.scale)) + 0.5 * len(self) * math.log(2 * math.pi * math.e)

    def extra_repr(self) -> str:
        return ", ".join(f"{n}={type(s).__name__}" for n, s in self.specs.items())
