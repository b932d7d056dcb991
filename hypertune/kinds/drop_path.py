"""DropPathRate: the rate of stochastic depth (DropPath), each module swapped for a HyperDropPath."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from ..layers.base import carry_hooks
from ..layers.drop_path import HyperDropPath
from ..sites import Target, as_targets, describe
from .base import Claim, FixedForm, HParam, Installation, WrapSites, as_flag, modules_at, register_hparam_kind
from .dropout import RATE_INIT_SCALE, rate_bounds


def rate_attribute(module: nn.Module) -> str | None:
    """The attribute holding a stochastic-depth module's rate, or None for other modules.

    Matched by dotted class name, so neither timm, torchvision nor transformers is imported:
    timm's ``DropPath`` (``drop_prob``), torchvision's ``StochasticDepth`` (``p``), and the
    ``*DropPath`` classes of Hugging Face models (``drop_prob``: ConvNeXt, Swin, BEiT, ...).
    """
    cls = type(module)
    where, name = cls.__module__, cls.__name__
    if name == "DropPath" and where.startswith("timm."):
        return "drop_prob"
    if name == "StochasticDepth" and where.startswith("torchvision."):
        return "p"
    if name.endswith("DropPath") and where.startswith("transformers.") and hasattr(module, "drop_prob"):
        return "drop_prob"
    return None


def is_drop_path_site(module: nn.Module) -> bool:
    return rate_attribute(module) is not None


@register_hparam_kind
@dataclass(frozen=True)
class DropPathRate(HParam):
    """The drop probability of stochastic depth (DropPath) in the model: each example skips a
    residual branch with this probability.

    ``targets`` selects modules by path pattern or type (default: every stochastic-depth module
    no other spec claims); ``per_site=True`` gives each its own hyperparameter. Libraries build
    these modules only for a rate above 0 (``drop_path_rate=0`` gives ``nn.Identity``), so build
    the model with a small rate. Every site starts at ``init``: a shared value replaces the
    per-block schedule (timm's linear ramp), and ``per_site=True`` lets each block find its own.
    """

    init: float = 0.05
    low: float = 0.0
    high: float = 0.95
    init_scale: float = RATE_INIT_SCALE
    targets: tuple[Target, ...] | None = field(default=None)
    per_site: bool = False

    kind: ClassVar[str] = "drop_path"
    panel: ClassVar[str | None] = "Dropout rates"
    baked_by_unwrap: ClassVar[bool] = False  # unwrap gives each module back at its final rate
    read_in_forward: ClassVar[bool] = False
    leads_lambda: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "per_site", as_flag("DropPathRate", "per_site", self.per_site))
        rate_bounds(self)
        object.__setattr__(self, "targets", as_targets(self.targets, "DropPathRate: targets"))

    def claim_order(self) -> int:
        return 1 if self.targets is None else 0

    def claim(self, name: str, sites: WrapSites) -> Claim:
        chosen = sites.choose(name, self.kind, "DropPathRate", self.targets, is_drop_path_site, "stochastic-depth module")
        if chosen is None:
            return Claim({})
        if not chosen:
            sites.problems.append(
                f"hparams[{name!r}] (DropPathRate) matches no stochastic-depth module (timm DropPath, "
                "torchvision StochasticDepth, Hugging Face *DropPath): models build them only for a "
                "rate above 0, so create the model with e.g. drop_path_rate=0.05, or fix targets"
            )
            return Claim({})
        per_example = []
        for site in chosen:
            if getattr(site.module, "mode", "row") == "row":
                per_example.append(site)
            else:
                sites.problems.append(
                    f"{describe(site.path, site.module)} uses mode={site.module.mode!r}, one draw for the "
                    "whole batch; a rate per example needs mode='row'"
                )
        return sites.claim_each(self, name, per_example, self.per_site)

    def install(self, name: str, claim: Claim, into: Installation) -> None:
        for value, found in claim.sites.items():
            for site in found:
                module = site.module
                drop = HyperDropPath(value, module, rate_attribute(module) or "drop_prob", site.path,
                                     bool(getattr(module, "scale_by_keep", True)))
                drop.train(module.training)
                carry_hooks(module, drop)
                into.replace(site, drop)

    def fixed_form(self, model: nn.Module, where: Mapping[str, Any], value: float) -> FixedForm | None:
        paths = where.get("modules")
        return FixedDropPath(model, list(paths), value) if paths else None


class FixedDropPath(FixedForm):
    """Sets the rate of the plain stochastic-depth modules."""

    def __init__(self, model: nn.Module, paths: list[str], value: float) -> None:
        found = modules_at(model, paths, is_drop_path_site, "a stochastic-depth module")
        self.modules: list[tuple[nn.Module, str]] = [(m, rate_attribute(m) or "drop_prob") for m in found]
        self.set_value(value)

    def set_value(self, value: float) -> None:
        super().set_value(value)
        for m, attribute in self.modules:
            setattr(m, attribute, self.value)
