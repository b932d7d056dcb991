"""AR and TAR (Merity et al. 2017): tuned penalties on selected modules' outputs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from ..errors import SpecError
from ..penalties import ActivationPenalty
from ..sites import Target, as_targets, selects
from .base import Claim, FixedForm, FixedFormError, HParam, Installation, WrapSites, as_axis, register_hparam_kind


@register_hparam_kind
@dataclass(frozen=True)
class ActivationRegularization(HParam):
    """AR (Merity et al. 2017): ``α · mean(h²)`` of the selected modules' outputs, per example.

    ``targets`` (required) selects the modules whose output h is penalised; a tuple output
    (as from nn.LSTM) uses its first element. Batch-first outputs. Training loss only.
    """

    init: float = 1e-3
    low: float = 0.0
    high: float = math.inf
    targets: tuple[Target, ...] | None = field(default=None)

    kind: ClassVar[str] = "activation_penalty"
    panel: ClassVar[str | None] = "Activation regularization"
    plot_log: ClassVar[bool] = True
    read_in_forward: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.low < 0:
            raise SpecError(f"{type(self).__name__}: low={self.low} must be >= 0")
        if self.targets is None:
            raise SpecError(
                f"{type(self).__name__}: give targets=[...] naming the modules whose output is penalised"
            )
        object.__setattr__(self, "targets", as_targets(self.targets, f"{type(self).__name__}: targets"))

    @property
    def time_dim(self) -> int | None:
        """The axis TAR differences along (None: AR)."""
        return None

    def claim(self, name: str, sites: WrapSites) -> Claim:
        assert self.targets is not None
        chosen = [s for s in sites.sites if selects(s, self.targets)]
        if not chosen:
            sites.problems.append(
                f"hparams[{name!r}] ({type(self).__name__}) targets {list(self.targets)} match no "
                "module: check the module paths"
            )
        return Claim({name: self}, {name: chosen})

    def install(self, name: str, claim: Claim, into: Installation) -> None:
        penalty = ActivationPenalty(name, self.time_dim)
        into.penalties.append(penalty)
        into.collectors.append(penalty)
        for site in claim.sites.get(name, []):
            into.hooks.append(into.module_at(site.path).register_forward_hook(penalty.hook))

    def fixed_form(self, model: nn.Module, where: Mapping[str, Any], value: float) -> FixedForm | None:
        paths = where.get("modules")
        return FixedActivationPenalty(model, list(paths), value, self.time_dim) if paths else None


@register_hparam_kind
@dataclass(frozen=True)
class TemporalActivationRegularization(ActivationRegularization):
    """TAR: ``β · mean((h_t - h_{t-1})²)`` along ``time_dim`` of the selected outputs."""

    time_dim: int = 1  # type: ignore[assignment]

    kind: ClassVar[str] = "temporal_activation_penalty"

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "time_dim", as_axis("TemporalActivationRegularization", "time_dim", self.time_dim))


class FixedActivationPenalty(FixedForm):
    """AR/TAR at a fixed coefficient on a plain model: hooks record the outputs of training
    passes while ``collecting`` is on; :meth:`penalty` consumes them."""

    def __init__(self, model: nn.Module, paths: list[str], value: float, time_dim: int | None) -> None:
        try:
            modules = [model.get_submodule(p) if p else model for p in paths]
        except AttributeError as err:
            raise FixedFormError([str(err)]) from None
        self.time_dim = time_dim
        self.collecting = True
        self.outputs: list[Tensor] = []
        self.handles = [m.register_forward_hook(self._hook) for m in modules]
        self.set_value(value)

    def _hook(self, module: nn.Module, args: Any, out: Any) -> None:
        if self.collecting and module.training:
            self.outputs.append(out[0] if isinstance(out, (tuple, list)) else out)

    def penalty(self) -> Tensor | None:
        total: Tensor | None = None
        for h in self.outputs:
            if self.time_dim is not None:
                steps = h.shape[self.time_dim]
                h = h.narrow(self.time_dim, 1, steps - 1) - h.narrow(self.time_dim, 0, steps - 1)
            if h.numel() == 0:  # TAR of a one-step sequence: no change over time, no penalty
                continue
            term = self.value * h.pow(2).mean()
            total = term if total is None else total + term
        self.outputs.clear()
        return total

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
