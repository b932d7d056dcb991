"""Training-loss penalties whose coefficients are tuned (they never enter the validation loss)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import context
from .context import Perturbation
from .errors import PerturbationError
from .layers import HyperLayer


@dataclass
class WeightDecayPenalty:
    """``c/2 * ||w(δλ)||²`` per perturbation row, for the modules one WeightDecay spec selects.

    Hyper-layer weights depend on δλ, so their norm is evaluated per row in closed form; other
    modules' weights are plain w₀ and add a constant.
    """

    hparam: str
    layers: list[HyperLayer]
    plain: list[nn.Parameter]
    include_bias: bool = False
    # weights of modules that stay w₀ and are computed by a parametrization (weight_norm): the
    # penalty is on the weight the module uses, (module, attribute name)
    computed: list[tuple[nn.Module, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.computed = [(m, n) for m, n in self.computed if parametrize.is_parametrized(m, n)]
        # A weight tied across modules is one weight: counted once. Tied hyper-layers share
        # one response, so one of them measures ||w(δλ)||² for all; the others' biases are
        # their own (a tied LM head's bias), measured apart.
        seen: set[int] = set()
        layers: list[HyperLayer] = []
        self.bias_only: list[HyperLayer] = []
        for layer in self.layers:
            weights = {id(p) for p in layer.decayed_parameters(False)}
            ids = {id(p) for p in layer.decayed_parameters(self.include_bias)}
            if weights & seen:
                if ids - weights - seen:
                    self.bias_only.append(layer)
                seen |= ids
                continue
            seen |= ids
            layers.append(layer)
        plain: list[nn.Parameter] = []
        for w in self.plain:
            if id(w) not in seen:
                seen.add(id(w))
                plain.append(w)
        self.layers, self.plain = layers, plain

    def decayed_parameters(self) -> list[nn.Parameter]:
        """The w₀ weights this penalty reaches, each once."""
        biases = [layer.bias for layer in self.bias_only]
        originals = [p for m, name in self.computed for p in m.parametrizations[name].parameters()]  # type: ignore[index]
        return [p for layer in self.layers for p in layer.decayed_parameters(self.include_bias)] + biases + self.plain + originals

    def __call__(self, p: Perturbation) -> Tensor:
        sq: Tensor | None = None
        for layer in self.layers:
            term = layer.weight_sq_norm(p.response_input, self.include_bias)
            sq = term if sq is None else sq + term
        for layer in self.bias_only:
            term = layer.bias_sq_norm(p.response_input)
            sq = term if sq is None else sq + term
        for w in self.plain:
            term = w.pow(2).sum().reshape(1)
            sq = term if sq is None else sq + term
        for m, name in self.computed:
            term = getattr(m, name).pow(2).sum().reshape(1)
            sq = term if sq is None else sq + term
        if sq is None:
            return torch.zeros(1, device=p.hparams.device, dtype=p.hparams.dtype)
        return 0.5 * p.value(self.hparam) * sq


class ActivationPenalty:
    """AR or TAR (Merity et al. 2017) on the outputs of selected modules, per example.

    A forward hook collects the outputs only while the optimizer's training steps ask for them
    (so a user's own forward passes keep no graph alive). In the linearized Δ-STN step the
    collected output is the linearized one, primal + tangent.
    """

    def __init__(self, hparam: str, time_dim: int | None = None) -> None:
        self.hparam = hparam
        self.time_dim = time_dim
        self.collecting = False
        self.outputs: list[Tensor] = []

    def hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self.collecting or not module.training:
            return
        h = output[0] if isinstance(output, (tuple, list)) else output
        if not torch.is_tensor(h):
            raise PerturbationError(
                f"activation penalty {self.hparam!r} got a {type(h).__name__} output; target a module "
                "that returns a tensor (or a tuple whose first element is one), batch first"
            )
        primal, tangent = fwAD.unpack_dual(h)
        self.outputs.append(primal if tangent is None else primal + tangent)

    def __call__(self, p: Perturbation) -> Tensor:
        total: Tensor | None = None
        for h in self.outputs:
            if self.time_dim is not None:
                steps = h.shape[self.time_dim]
                h = h.narrow(self.time_dim, 1, steps - 1) - h.narrow(self.time_dim, 0, steps - 1)
            context.rows_for(h.shape[0], p.rows, f"activation penalty {self.hparam!r}")
            if h[0].numel() == 0:  # TAR of a one-step sequence: no change over time, no penalty
                continue
            per_example = h.pow(2).reshape(h.shape[0], -1).mean(1)
            total = per_example if total is None else total + per_example
        self.outputs.clear()
        if total is None:
            return torch.zeros(1, device=p.hparams.device, dtype=p.hparams.dtype)
        return p.value(self.hparam) * total
