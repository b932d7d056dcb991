"""EmbeddingDropout: word dropout inside nn.Embedding hyper-layers, per example."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..sites import Target, as_targets, selects
from .base import Claim, FixedForm, FixedFormError, HParam, WrapSites, register_hparam_kind
from .dropout import RATE_INIT_SCALE, rate_bounds


@register_hparam_kind
@dataclass(frozen=True)
class EmbeddingDropout(HParam):
    """Word dropout on embedding layers: drops whole word types per example (Gal & Ghahramani)."""

    init: float = 0.05
    low: float = 0.0
    high: float = 0.95
    init_scale: float = RATE_INIT_SCALE
    targets: tuple[Target, ...] | None = field(default=None)

    kind: ClassVar[str] = "embedding_dropout"
    panel: ClassVar[str | None] = "Dropout rates"
    read_in_forward: ClassVar[bool] = False
    baked_by_unwrap: ClassVar[bool] = True  # a forward hook on the plain nn.Embedding

    def __post_init__(self) -> None:
        super().__post_init__()
        rate_bounds(self)
        object.__setattr__(self, "targets", as_targets(self.targets, "EmbeddingDropout: targets"))

    def claim(self, name: str, sites: WrapSites) -> Claim:
        chosen = [
            s for s in sites.layers
            if isinstance(s.module, nn.Embedding) and (self.targets is None or selects(s, self.targets))
        ]
        if not chosen:
            sites.problems.append(
                f"hparams[{name!r}] (EmbeddingDropout) matches no nn.Embedding hyper-layer: check its targets"
            )
        claim = Claim({name: self}, {name: []})
        for site in chosen:
            claim.take_role(sites, site, "word_dropout", name, "gets EmbeddingDropout", "give each layer one")
        return claim

    def fixed_form(self, model: nn.Module, where: Mapping[str, Any], value: float) -> FixedForm | None:
        paths = where.get("modules")
        return FixedWordDropout(model, list(paths), value) if paths else None


class FixedWordDropout(FixedForm):
    """Word dropout at a fixed rate on plain nn.Embedding modules (forward hooks)."""

    def __init__(self, model: nn.Module, paths: list[str], value: float) -> None:
        modules = []
        for path in paths:
            m = model.get_submodule(path) if path else model
            if not isinstance(m, nn.Embedding):
                raise FixedFormError([f"module {path!r} is a {type(m).__name__}, not nn.Embedding"])
            modules.append(m)
        self.handles = [m.register_forward_hook(self._hook) for m in modules]
        self.set_value(value)

    def _hook(self, module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor | None:
        if not module.training or self.value <= 0:
            return None
        tokens = args[0]
        keep = 1.0 - self.value
        flat = tokens.reshape(tokens.shape[0], -1) if tokens.dim() else tokens.reshape(1, 1)
        vocab = module.num_embeddings  # type: ignore[attr-defined]
        mask = (torch.rand(flat.shape[0], vocab, device=out.device) < keep).to(out.dtype) / keep
        return out * torch.gather(mask, 1, flat).reshape(tokens.shape).unsqueeze(-1)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
