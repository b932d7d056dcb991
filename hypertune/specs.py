"""Search-space specs: what a hyperparameter is, where it acts, and the scale it is tuned on.

Specs are immutable and validated on construction, so a bad search space fails at the line
that wrote it, with a one-line reason, before any model is touched. Each spec class is also its
kind's whole life cycle (:mod:`hypertune.kinds`); this module gathers them.
"""

from __future__ import annotations

from typing import Any

from .errors import SpecError
from .kinds.activation import ActivationRegularization, TemporalActivationRegularization
from .kinds.base import HParam, Perturb, hparam_from_json, register_hparam_kind
from .kinds.dropconnect import DropConnect
from .kinds.drop_path import DropPathRate
from .kinds.dropout import DropoutRate
from .kinds.embedding_dropout import EmbeddingDropout
from .kinds.input_dropout import InputDropout
from .kinds.variational_dropout import VariationalDropout
from .kinds.weight_decay import WeightDecay
from .sites import Target

__all__ = [
    "HParam",
    "DropoutRate",
    "DropPathRate",
    "InputDropout",
    "WeightDecay",
    "DropConnect",
    "VariationalDropout",
    "EmbeddingDropout",
    "ActivationRegularization",
    "TemporalActivationRegularization",
    "Perturb",
    "Target",
    "hparam_from_json",
    "register_hparam_kind",
    "validate_specs",
]


def validate_specs(hparams: object) -> dict[str, Any]:
    """Check the ``hparams`` mapping given to ``HyperModel.wrap``; one reason per refusal.

    Values are HParam specs or Augmentation objects (which expand into sub-hyperparameters).
    """
    from .augment.base import Augmentation
    if hasattr(hparams, "items"):
        pairs = list(hparams.items())  # type: ignore[attr-defined]
    elif isinstance(hparams, (list, tuple)) and all(
        isinstance(p, tuple) and len(p) == 2 for p in hparams
    ):
        pairs = list(hparams)
    else:
        raise SpecError(
            "hparams must be a mapping of name -> spec (e.g. {'dropout': DropoutRate()}) "
            f"or a list of (name, spec) pairs, got {type(hparams).__name__}"
        )
    names = [n for n, _ in pairs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SpecError(f"duplicate hyperparameter names {duplicates}: give each a unique name")
    specs = dict(pairs)
    if not specs:
        raise SpecError("hparams is empty: name at least one hyperparameter to tune")
    for name, spec in specs.items():
        if not isinstance(name, str) or not name or ":" in name or "." in name:
            raise SpecError(
                f"hyperparameter name {name!r} must be a non-empty string without ':' or '.'"
            )
        if isinstance(spec, Augmentation):
            subs = spec.hparams()
            if not subs:
                raise SpecError(f"hparams[{name!r}] ({type(spec).__name__}) tunes nothing")
            for sub, sub_spec in subs.items():
                if not isinstance(sub_spec, HParam) or ":" in sub or "." in sub or not sub:
                    raise SpecError(
                        f"hparams[{name!r}] ({type(spec).__name__}) gives sub-hyperparameter {sub!r} "
                        f"as {type(sub_spec).__name__}; each must be an HParam with a plain name"
                    )
            continue
        if not isinstance(spec, HParam):
            raise SpecError(
                f"hparams[{name!r}] is a {type(spec).__name__}; use a spec such as DropoutRate(), "
                "WeightDecay(), InputDropout(), HParam(...) or an Augmentation"
            )
    n_input = [n for n, s in specs.items() if isinstance(s, InputDropout)]
    if len(n_input) > 1:
        raise SpecError(f"only one InputDropout is allowed, got {n_input}")
    return specs
