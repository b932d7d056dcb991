"""DropConnect: a tuned rate of masking the weights of hyper-layers (one mask per batch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..errors import SpecError
from ..sites import Target, as_targets, selects
from .base import Claim, HParam, Perturb, WrapSites, register_hparam_kind
from .dropout import RATE_INIT_SCALE, rate_bounds


@register_hparam_kind
@dataclass(frozen=True)
class DropConnect(HParam):
    """DropConnect (Wan et al. 2013) on the weights of the selected hyper-layers.

    A weight mask is shared by every example in a batch, so the rate is perturbed per batch.
    ``targets`` defaults to every hyper-layer; for an LSTM it masks the hidden-to-hidden weights.
    """

    init: float = 0.05
    low: float = 0.0
    high: float = 0.95
    init_scale: float = RATE_INIT_SCALE
    perturb: Perturb = "batch"
    targets: tuple[Target, ...] | None = field(default=None)

    kind: ClassVar[str] = "dropconnect"
    panel: ClassVar[str | None] = "Dropout rates"
    read_in_forward: ClassVar[bool] = False
    unwrap_loses: ClassVar[str | None] = "torch's layers have no DropConnect"

    def __post_init__(self) -> None:
        super().__post_init__()
        rate_bounds(self)
        if self.perturb != "batch":
            raise SpecError(
                "DropConnect: perturb must be 'batch' because one weight mask serves the whole batch"
            )
        object.__setattr__(self, "targets", as_targets(self.targets, "DropConnect: targets"))

    def claim(self, name: str, sites: WrapSites) -> Claim:
        chosen = [s for s in sites.layers if self.targets is None or selects(s, self.targets)]
        if not chosen:
            sites.problems.append(f"hparams[{name!r}] (DropConnect) matches no hyper-layer: check its targets")
        claim = Claim({name: self}, {name: []})
        for site in chosen:
            claim.take_role(sites, site, "dropconnect", name, "gets DropConnect", "give each layer one")
        return claim
