"""Search-space specs: what a hyperparameter is, where it acts, and the scale it is tuned on.

Specs are immutable and validated on construction, so a bad search space fails at the line
that wrote it, with a one-line reason, before any model is touched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from torch import nn

from .errors import SpecError
from .transforms import Transform, transform_for

Perturb = Literal["example", "batch"]
# A module selector: a name pattern (fnmatch, matched against the module's path) or a module type.
Target = Union[str, type[nn.Module]]


def _as_targets(targets: Target | Sequence[Target] | None) -> tuple[Target, ...] | None:
    if targets is None:
        return None
    if isinstance(targets, (str, type)):
        return (targets,)
    out = tuple(targets)
    for t in out:
        if not isinstance(t, (str, type)):
            raise SpecError(
                f"targets must be module-path patterns (str) or module types, got {t!r}"
            )
    return out


@dataclass(frozen=True)
class HParam:
    """A generic tuned value in ``(low, high)``, readable by any module via :func:`hypertune.hparam`.

    ``init_scale`` is the initial perturbation std on the unconstrained scale (σ₀ in the papers).
    ``perturb="batch"`` shares one draw across the batch: needed when a consumer cannot act per
    example, or when layers see reshaped batches.
    """

    init: float
    low: float = -math.inf
    high: float = math.inf
    init_scale: float = 1.0
    discrete: bool = False
    perturb: Perturb = "example"
    log: bool = False

    def __post_init__(self) -> None:
        kind = type(self).__name__
        for label in ("init", "low", "high", "init_scale"):
            value = getattr(self, label)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise SpecError(f"{kind}: {label} must be a number, got {value!r}")
            if math.isnan(value):
                raise SpecError(f"{kind}: {label} is NaN; give a real number")
        if not math.isfinite(self.init):
            raise SpecError(f"{kind}: init={self.init} is not finite; give a finite starting value")
        if self.low >= self.high:
            raise SpecError(f"{kind}: low={self.low} must be below high={self.high}")
        if not (self.low < self.init < self.high):
            raise SpecError(
                f"{kind}: init={self.init} must lie strictly inside (low={self.low}, high={self.high}); "
                "the tuning scale is open at the bounds"
            )
        if not (math.isfinite(self.init_scale) and self.init_scale > 0):
            raise SpecError(f"{kind}: init_scale={self.init_scale} must be a positive finite std")
        if self.perturb not in ("example", "batch"):
            raise SpecError(f"{kind}: perturb={self.perturb!r} must be 'example' or 'batch'")
        if self.log and not (self.low > 0 and math.isfinite(self.high)):
            raise SpecError(
                f"{kind}: log=True needs finite bounds with low > 0, got ({self.low}, {self.high})"
            )
        if self.discrete and not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise SpecError(f"{kind}: a discrete hyperparameter needs finite low and high bounds")
        if self.discrete and math.ceil(self.low) > math.floor(self.high):
            raise SpecError(
                f"{kind}: discrete range ({self.low}, {self.high}) holds no integer; widen the bounds"
            )
        try:
            u = self.unconstrained_init()
        except (ValueError, ZeroDivisionError, OverflowError):
            u = math.inf
        if not math.isfinite(u):
            raise SpecError(
                f"{kind}: init={self.init} is too close to a bound of ({self.low}, {self.high}) to be "
                "represented on the tuning scale; move it inside"
            )

    @property
    def transform(self) -> Transform:
        return transform_for(float(self.low), float(self.high), self.log)

    def unconstrained_init(self) -> float:
        return self.transform.inverse(float(self.init))


def _rate_bounds(kind: str, spec: HParam) -> None:
    if spec.low < 0:
        raise SpecError(f"{kind}: low={spec.low} must be >= 0")
    if spec.high >= 1:
        raise SpecError(
            f"{kind}: high={spec.high} must be < 1; at rate 1 everything is dropped and inverted "
            "dropout divides by zero"
        )


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
    targets: tuple[Target, ...] | None = field(default=None)
    per_site: bool = False
    locked_dim: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.locked_dim is not None and (not isinstance(self.locked_dim, int) or self.locked_dim < 1):
            raise SpecError(
                f"DropoutRate: locked_dim={self.locked_dim!r} must be an axis >= 1 (the time axis of "
                "batch-first sequences, e.g. 1), or None"
            )
        _rate_bounds("DropoutRate", self)
        object.__setattr__(self, "targets", _as_targets(self.targets))


@dataclass(frozen=True)
class InputDropout(HParam):
    """Dropout on the model's first input tensor, applied before the user's forward."""

    init: float = 0.05
    low: float = 0.0
    high: float = 0.95

    def __post_init__(self) -> None:
        super().__post_init__()
        _rate_bounds("InputDropout", self)


@dataclass(frozen=True)
class WeightDecay(HParam):
    """An L2 coefficient ``c`` adding ``c/2 * ||w||^2`` to the training loss only.

    The ``1/2`` makes ``c`` mean the same as torch.optim's ``weight_decay``. ``targets`` selects
    the modules whose weights are penalised (default: every hyper-layer); biases are included
    only with ``include_bias=True``. Tuned on a log scale.
    """

    init: float = 1e-4
    low: float = 0.0
    high: float = math.inf
    targets: tuple[Target, ...] | None = field(default=None)
    include_bias: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.low < 0:
            raise SpecError(f"WeightDecay: low={self.low} must be >= 0")
        object.__setattr__(self, "targets", _as_targets(self.targets))


@dataclass(frozen=True)
class DropConnect(HParam):
    """DropConnect (Wan et al. 2013) on the weights of the selected hyper-layers.

    A weight mask is shared by every example in a batch, so the rate is perturbed per batch.
    ``targets`` defaults to every hyper-layer; for an LSTM it masks the hidden-to-hidden weights.
    """

    init: float = 0.05
    low: float = 0.0
    high: float = 0.95
    perturb: Perturb = "batch"
    targets: tuple[Target, ...] | None = field(default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        _rate_bounds("DropConnect", self)
        if self.perturb != "batch":
            raise SpecError(
                "DropConnect: perturb must be 'batch' because one weight mask serves the whole batch"
            )
        object.__setattr__(self, "targets", _as_targets(self.targets))


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
    on: Literal["input", "hidden"] = "hidden"
    targets: tuple[Target, ...] | None = field(default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        _rate_bounds("VariationalDropout", self)
        if self.on not in ("input", "hidden"):
            raise SpecError(f"VariationalDropout: on={self.on!r} must be 'input' or 'hidden'")
        object.__setattr__(self, "targets", _as_targets(self.targets))


@dataclass(frozen=True)
class EmbeddingDropout(HParam):
    """Word dropout on embedding layers: drops whole word types per example (Gal & Ghahramani)."""

    init: float = 0.05
    low: float = 0.0
    high: float = 0.95
    targets: tuple[Target, ...] | None = field(default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        _rate_bounds("EmbeddingDropout", self)
        object.__setattr__(self, "targets", _as_targets(self.targets))


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

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.low < 0:
            raise SpecError(f"{type(self).__name__}: low={self.low} must be >= 0")
        if self.targets is None:
            raise SpecError(
                f"{type(self).__name__}: give targets=[...] naming the modules whose output is penalised"
            )
        object.__setattr__(self, "targets", _as_targets(self.targets))


@dataclass(frozen=True)
class TemporalActivationRegularization(ActivationRegularization):
    """TAR: ``β · mean((h_t - h_{t-1})²)`` along ``time_dim`` of the selected outputs."""

    time_dim: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.time_dim, int) or self.time_dim < 1:
            raise SpecError(f"TemporalActivationRegularization: time_dim={self.time_dim!r} must be >= 1")


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
