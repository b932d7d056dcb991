"""Hyperparameter kinds, one a file: each spec class owns its kind's whole life cycle."""

from .base import (
    Claim,
    FixedForm,
    FixedFormError,
    HParam,
    Installation,
    WrapSites,
    hparam_from_json,
    kind_class,
    kind_of,
    register_hparam_kind,
)

__all__ = [
    "Claim",
    "FixedForm",
    "FixedFormError",
    "HParam",
    "Installation",
    "WrapSites",
    "hparam_from_json",
    "kind_class",
    "kind_of",
    "register_hparam_kind",
]
