"""DropoutRate: the rate of the model's dropout modules, each swapped for a HyperDropout."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import SpecError
from ..layers.base import carry_hooks
from ..layers.dropout import HyperDropout
from ..sites import Site, Target, as_targets, describe
from .base import Claim, FixedForm, HParam, Installation, WrapSites, as_axis, as_flag, modules_at, register_hparam_kind

# Dropout module type -> number of trailing axes that share one mask entry.
DROPOUTS: dict[type[nn.Module], int] = {
    nn.Dropout: 0,
    nn.Dropout1d: 1,
    nn.Dropout2d: 2,
    nn.Dropout3d: 3,
}


#: σ₀ of every dropout-type rate, on its logit scale. A rate near 0 barely changes the training loss
#: when perturbed by one logit unit, so Θ learns its response slowly and λ hardly drifts in the
#: first thousand steps; at 2 (one std up takes 0.05 to 0.28) it moves from the first few hundred
#: steps (benchmarks/RESULTS.md, "σ₀ = 2 for dropout rates"). Other kinds keep HParam's 1.0.
RATE_INIT_SCALE = 2.0


def rate_bounds(spec: HParam) -> None:
    kind = type(spec).__name__
    if spec.low < 0:
        raise SpecError(f"{kind}: low={spec.low} must be >= 0")
    if spec.high >= 1:
        raise SpecError(
            f"{kind}: high={spec.high} must be < 1; at rate 1 everything is dropped and inverted "
            "dropout divides by zero"
        )


def is_dropout_site(module: nn.Module) -> bool:
    """A module DropoutRate can take over (exact torch dropout types)."""
    return type(module) in DROPOUTS


@register_hparam_kind
@dataclass(frozen=True)
class DropoutRate(HParam):
    """The drop probability of dropout modules in the model.

    ``targets`` selects dropout modules by path pattern or type (default: every dropout module
    no other spec claims). ``per_site=True`` gives each selected module its own hyperparameter,
    named ``"<name>:<module path>"``. ``locked_dim`` makes it variational (locked) dropout: one
    mask shared along that axis, e.g. ``locked_dim=1`` for the time axis of (B, T, F) sequences.
    """

    init: float = 0.05
    low: float = 0.0
    high: float = 0.95
    init_scale: float = RATE_INIT_SCALE
    targets: tuple[Target, ...] | None = field(default=None)
    per_site: bool = False
    locked_dim: int | None = None

    kind: ClassVar[str] = "dropout"
    panel: ClassVar[str | None] = "Dropout rates"
    # unwrap gives each HyperDropout back as its torch dropout at the final rate (to_module); a
    # locked mask then has no torch form (its eval behaviour, the identity, is the same)
    baked_by_unwrap: ClassVar[bool] = False
    read_in_forward: ClassVar[bool] = False
    leads_lambda: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "per_site", as_flag("DropoutRate", "per_site", self.per_site))
        object.__setattr__(self, "locked_dim", as_axis("DropoutRate", "locked_dim", self.locked_dim, optional=True))
        rate_bounds(self)
        object.__setattr__(self, "targets", as_targets(self.targets, "DropoutRate: targets"))

    def claim_order(self) -> int:
        return 1 if self.targets is None else 0  # the catch-all takes what explicit specs left

    def claim(self, name: str, sites: WrapSites) -> Claim:
        def alpha(site: Site) -> str | None:
            if not isinstance(site.module, (nn.AlphaDropout, nn.FeatureAlphaDropout)):
                return None
            return (
                f"hparams[{name!r}] selects {describe(site.path, site.module)}: alpha dropout "
                "is not supported; target nn.Dropout/Dropout1d/2d/3d modules only"
            )

        chosen = sites.choose(name, self.kind, "DropoutRate", self.targets, is_dropout_site, "dropout module", alpha)
        if chosen is None:
            return Claim({})
        if not chosen:
            where = [s.path for s in sites.sites if is_dropout_site(s.module)]
            floats = attention_float_dropouts((s.path, s.module) for s in sites.sites)
            sites.problems.append(
                f"hparams[{name!r}] (DropoutRate) matches no dropout module; the model's dropout "
                f"modules are {where or 'none'}: add nn.Dropout modules or fix targets"
                + (
                    f" (nn.MultiheadAttention's dropout={floats[0][1]:g} is a float argument, not a module, "
                    "so no spec can tune it)" if floats else ""
                )
            )
            return Claim({})
        return sites.claim_each(self, name, chosen, self.per_site)

    def install(self, name: str, claim: Claim, into: Installation) -> None:
        for value, found in claim.sites.items():
            for site in found:
                into.replace(site, self.hyper_dropout(site, value))

    def hyper_dropout(self, site: Site, value: str) -> HyperDropout:
        """The HyperDropout that takes ``site``'s module over, driven by tuned value ``value``."""
        module = site.module
        drop = HyperDropout(
            value, type(module), DROPOUTS[type(module)], site.path, self.locked_dim,
            getattr(module, "inplace", False),
        )
        drop.train(module.training)
        carry_hooks(module, drop)
        return drop

    def fixed_form(self, model: nn.Module, where: Mapping[str, Any], value: float) -> FixedForm | None:
        paths = where.get("modules")
        if not paths:
            return None
        return FixedDropout(model, list(paths), value, self.locked_dim)

    def bakes_on_unwrap(self) -> bool:
        """A locked rate needs its hook on the plain nn.Dropout unwrap gives back (torch's
        dropouts draw a fresh mask per element, not one shared along time)."""
        return self.locked_dim is not None


def attention_float_dropouts(named: Iterable[tuple[str, nn.Module]]) -> list[tuple[str, float]]:
    """(path, rate) of each non-zero attention dropout that ``nn.MultiheadAttention`` keeps as a
    float (``F.multi_head_attention_forward(dropout_p=...)``): no module holds it, so it stays fixed."""
    return [(path, m.dropout) for path, m in named if isinstance(m, nn.MultiheadAttention) and m.dropout > 0]


class FixedDropout(FixedForm):
    """Sets ``p`` of the plain dropout modules; a locked mask is shared along its axis by a
    forward hook (torch's dropouts have no locked form)."""

    def __init__(self, model: nn.Module, paths: list[str], value: float, locked_dim: int | None) -> None:
        self.modules = modules_at(model, paths, lambda m: isinstance(m, tuple(DROPOUTS)), "nn.Dropout/1d/2d/3d")
        self.locked_dim = locked_dim
        self.handles = [m.register_forward_hook(self._locked) for m in self.modules] if locked_dim else []
        self.set_value(value)

    def set_value(self, value: float) -> None:
        super().set_value(value)
        for m in self.modules:
            m.p = self.value

    def _locked(self, module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor | None:
        if not module.training or self.value <= 0:
            return None
        x = args[0]
        shape = list(x.shape)
        shape[self.locked_dim] = 1  # type: ignore[index]
        keep = 1.0 - self.value
        return x * ((torch.rand(shape, device=x.device) < keep).to(x.dtype) / keep)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
