"""WeightDecay: a tuned L2 coefficient on the training loss only."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from ..errors import SpecError
from ..layers.base import HyperLayer
from ..penalties import WeightDecayPenalty
from ..sites import Target, as_targets, selects
from .base import Claim, FixedForm, FixedFormError, HParam, Installation, WrapSites, register_hparam_kind


@register_hparam_kind
@dataclass(frozen=True)
class WeightDecay(HParam):
    """An L2 coefficient ``c`` adding ``c/2 * ||w||^2`` to the training loss only.

    The ``1/2`` makes ``c`` mean the same as torch.optim's ``weight_decay``. ``targets`` selects
    the modules whose weights are penalised (default: every hyper-layer); biases are included
    only with ``include_bias=True``. A weight shared by several modules is counted once.
    Tuned on a log scale.
    """

    init: float = 1e-4
    low: float = 0.0
    high: float = math.inf
    targets: tuple[Target, ...] | None = field(default=None)
    include_bias: bool = False

    kind: ClassVar[str] = "weight_decay"
    panel: ClassVar[str | None] = "Weight decay"
    plot_log: ClassVar[bool] = True
    read_in_forward: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.low < 0:
            raise SpecError(f"WeightDecay: low={self.low} must be >= 0")
        object.__setattr__(self, "targets", as_targets(self.targets, "WeightDecay: targets"))

    def claim(self, name: str, sites: WrapSites) -> Claim:
        if self.targets is None:
            return Claim({name: self}, {name: list(sites.layers)})
        layer_ids = {id(s.module) for s in sites.layers}
        chosen = [
            s for s in sites.sites
            if selects(s, self.targets)
            and (isinstance(getattr(s.module, "weight", None), nn.Parameter) or id(s.module) in layer_ids)
        ]
        if not chosen:
            sites.problems.append(
                f"hparams[{name!r}] (WeightDecay) targets {list(self.targets)} match no module with "
                "a weight: check the module paths or types"
            )
        return Claim({name: self}, {name: chosen})

    def install(self, name: str, claim: Claim, into: Installation) -> None:
        layers: list[HyperLayer] = []
        plain: list[nn.Parameter] = []
        for site in claim.sites.get(name, []):
            m = into.module_at(site.path)
            if isinstance(m, HyperLayer):
                layers.append(m)
            else:
                plain.extend(_decayed(m, self.include_bias))
        into.penalties.append(WeightDecayPenalty(name, layers, plain, self.include_bias))

    def where(self, claim: Claim, value_name: str, model: nn.Module) -> dict[str, Any]:
        names: dict[int, str] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), n)  # a shared weight goes by its first name
        params: list[str] = []
        for site in claim.sites.get(value_name, []):
            m = model.get_submodule(site.path) if site.path else model
            decayed = m.decayed_parameters(self.include_bias) if isinstance(m, HyperLayer) else _decayed(m, self.include_bias)
            params.extend(names[id(p)] for p in decayed if id(p) in names)
        return {"params": sorted(set(params), key=params.index)}

    def fixed_form(self, model: nn.Module, where: Mapping[str, Any], value: float) -> FixedForm | None:
        names = where.get("params")
        if not names:
            return None
        return FixedWeightDecay(model, list(names), value)


def _decayed(module: nn.Module, include_bias: bool) -> list[nn.Parameter]:
    """A plain module's weights (``weight``, or ``weight_*`` matrices as nn.LSTM's), the same set
    its hyper-layer would decay; biases (``bias``, ``bias_*``) with ``include_bias``."""
    out: list[nn.Parameter] = []
    for n, p in module.named_parameters(recurse=False):
        if n == "weight" or (n.startswith("weight") and p.dim() >= 2):
            out.append(p)
        elif include_bias and n.startswith("bias"):
            out.append(p)
    return out


class FixedWeightDecay(FixedForm):
    """``c/2·‖w‖²`` over named parameters (each once), as a loss term or an optimizer's
    ``weight_decay`` (the same for SGD/Adam/RMSprop's coupled decay, not AdamW's)."""

    def __init__(self, model: nn.Module, names: list[str], value: float) -> None:
        params = dict(model.named_parameters(remove_duplicate=False))
        missing = [n for n in names if n not in params]
        if missing:
            raise FixedFormError([f"the model has no parameter(s) {missing[:5]}"])
        unique: dict[int, nn.Parameter] = {}
        for n in names:
            unique.setdefault(id(params[n]), params[n])
        self.params = list(unique.values())
        self.set_value(value)

    def decayed_parameters(self) -> list[nn.Parameter]:
        return list(self.params)

    def penalty(self) -> Tensor | None:
        return 0.5 * self.value * sum(p.pow(2).sum() for p in self.params)  # type: ignore[return-value]
