"""VariationalDropout: locked dropout inside nn.LSTM hyper-layers (input or between layers)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from torch import nn

from ..errors import SpecError
from ..sites import Target, as_targets, describe, selects
from .base import Claim, HParam, WrapSites, register_hparam_kind
from .dropout import RATE_INIT_SCALE, rate_bounds


@register_hparam_kind
@dataclass(frozen=True)
class VariationalDropout(HParam):
    """Variational (locked) dropout inside nn.LSTM hyper-layers (Gal & Ghahramani 2016).

    One mask per example and feature, the same at every time step, at each example's own rate.
    ``on="input"`` drops the input of each selected LSTM (AWD-LSTM's ``dropouti`` when the LSTM
    reads the embeddings); ``on="hidden"`` drops the hidden states one layer of a multi-layer
    LSTM passes to the next (``dropouth``; it takes the place of nn.LSTM's own ``dropout``, which
    must be 0). ``targets`` selects LSTM modules (default: every nn.LSTM hyper-layer; with
    ``on="hidden"``, every multi-layer one).
    """

    init: float = 0.05
    low: float = 0.0
    high: float = 0.95
    init_scale: float = RATE_INIT_SCALE
    on: Literal["input", "hidden"] = "hidden"
    targets: tuple[Target, ...] | None = field(default=None)

    kind: ClassVar[str] = "variational_dropout"
    panel: ClassVar[str | None] = "Dropout rates"
    read_in_forward: ClassVar[bool] = False
    unwrap_loses: ClassVar[str | None] = "torch's nn.LSTM has no variational (locked) dropout"

    def __post_init__(self) -> None:
        super().__post_init__()
        rate_bounds(self)
        if self.on not in ("input", "hidden"):
            raise SpecError(f"VariationalDropout: on={self.on!r} must be 'input' or 'hidden'")
        object.__setattr__(self, "targets", as_targets(self.targets, "VariationalDropout: targets"))

    def claim(self, name: str, sites: WrapSites) -> Claim:
        role = f"{self.on}_dropout"
        lstms = [s for s in sites.layers if isinstance(s.module, nn.LSTM)]
        if self.targets is not None:
            lstms = [s for s in lstms if selects(s, self.targets)]
        claim = Claim({name: self}, {name: []})
        refused = len(sites.problems)
        for site in lstms:
            lstm = site.module
            if self.on == "hidden" and lstm.num_layers < 2:
                if self.targets is not None:
                    sites.problems.append(
                        f"hparams[{name!r}] (VariationalDropout, on='hidden') selects "
                        f"{describe(site.path, lstm)}, which has one layer and so no hidden state "
                        "between layers: use on='input' or narrow targets"
                    )
                continue
            if self.on == "hidden" and lstm.dropout > 0:
                sites.problems.append(
                    f"{describe(site.path, lstm)} already drops between layers (dropout={lstm.dropout}), "
                    f"which hparams[{name!r}] would replace: build the LSTM with dropout=0"
                )
                continue
            claim.take_role(sites, site, role, name, f"gets on={self.on!r} VariationalDropout", "give each LSTM one")
        if not claim.roles and len(sites.problems) == refused:
            sites.problems.append(
                f"hparams[{name!r}] (VariationalDropout, on={self.on!r}) matches no nn.LSTM "
                f"hyper-layer{' with two or more layers' if self.on == 'hidden' else ''}: check its targets"
            )
        return claim
