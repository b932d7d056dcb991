"""WeightDecay: a tuned L2 coefficient on the training loss only."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..errors import SpecError
from ..layers.base import HyperLayer
from ..penalties import WeightDecayPenalty
from ..sites import Target, as_targets, selects
from .base import Claim, FixedForm, FixedFormError, HParam, Installation, WrapSites, as_flag, register_hparam_kind


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
        object.__setattr__(self, "include_bias", as_flag("WeightDecay", "include_bias", self.include_bias))
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
            and (
                isinstance(getattr(s.module, "weight", None), nn.Parameter)
                or parametrize.is_parametrized(s.module, "weight")
                or id(s.module) in layer_ids
            )
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
        computed: list[tuple[nn.Module, str]] = []
        for site in claim.sites.get(name, []):
            m = into.module_at(site.path)
            if isinstance(m, HyperLayer):
                layers.append(m)
            else:
                plain.extend(_decayed(m, self.include_bias))
                computed.extend((m, n) for n in _computed(m))
        into.penalties.append(WeightDecayPenalty(name, layers, plain, self.include_bias, computed))

    def where(self, claim: Claim, value_name: str, model: nn.Module) -> dict[str, Any]:
        """The Parameters decayed (by name) and, under ``"computed"``, the weights a
        parametrization computes (weight_norm's ``w = g·v/‖v‖``): the penalty is on those
        weights, not on their originals g and v, so a replay decays the same thing."""
        names: dict[int, str] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), n)  # a shared weight goes by its first name
        params: list[str] = []
        computed: list[str] = []
        for site in claim.sites.get(value_name, []):
            m = model.get_submodule(site.path) if site.path else model
            prefix = f"{site.path}." if site.path else ""
            own = _computed(m)
            computed.extend(prefix + n for n in own)
            if isinstance(m, HyperLayer):
                decayed = m.decayed_parameters(self.include_bias)
                if own:  # the originals stand for the computed weight: keep only the bias
                    originals = {id(q) for n in own for q in m.parametrizations[n].parameters()}  # type: ignore[index]
                    decayed = [q for q in decayed if id(q) not in originals]
            else:
                decayed = _decayed(m, self.include_bias)
            params.extend(names[id(p)] for p in decayed if id(p) in names)
        where: dict[str, Any] = {"params": sorted(set(params), key=params.index)}
        if computed:
            where["computed"] = sorted(set(computed), key=computed.index)
        return where

    def fixed_form(self, model: nn.Module, where: Mapping[str, Any], value: float) -> FixedForm | None:
        names = where.get("params")
        computed = where.get("computed") or []
        if not names and not computed:
            return None
        return FixedWeightDecay(model, list(names or []), value, list(computed))


def _computed(module: nn.Module) -> list[str]:
    """Names of the module's weights that a parametrization computes (weight_norm, orthogonal)."""
    if not parametrize.is_parametrized(module):
        return []
    return [n for n in module.parametrizations if n == "weight" or n.startswith("weight")]  # type: ignore[union-attr]


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

    def __init__(self, model: nn.Module, names: list[str], value: float, computed: list[str] | None = None) -> None:
        params = dict(model.named_parameters(remove_duplicate=False))
        missing = [n for n in names if n not in params]
        self.computed: list[tuple[nn.Module, str]] = []
        for path in computed or []:
            owner, _, attr = path.rpartition(".")
            try:
                m = model.get_submodule(owner) if owner else model
            except AttributeError:
                missing.append(path)
                continue
            if not parametrize.is_parametrized(m, attr):
                missing.append(f"{path} (a weight computed by a parametrization, e.g. weight_norm)")
                continue
            self.computed.append((m, attr))
        if missing:
            raise FixedFormError([f"the model has no parameter(s) {missing[:5]}"])
        unique: dict[int, nn.Parameter] = {}
        for n in names:
            unique.setdefault(id(params[n]), params[n])
        self.params = list(unique.values())
        self.set_value(value)

    def decayed_parameters(self) -> list[nn.Parameter]:
        """What an optimizer's ``weight_decay`` can decay: Parameters, not computed weights."""
        return list(self.params)

    def penalty(self) -> Tensor | None:
        terms = [p.pow(2).sum() for p in self.params] + [getattr(m, n).pow(2).sum() for m, n in self.computed]
        return 0.5 * self.value * sum(terms)  # type: ignore[return-value]
