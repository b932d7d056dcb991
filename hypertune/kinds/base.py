"""The hyperparameter kind contract: one class owns a kind's whole life cycle.

A kind is a frozen spec dataclass (its search space, validated on construction) whose methods
say, in order of use:

* :meth:`HParam.claim` — which sites of the model it acts on (checked before the model changes;
  problems go to one WrapError);
* :meth:`HParam.install` — how it is put into the wrapped model (module swaps, layer
  regularizers, training penalties, input transforms);
* acting — the installed pieces read its per-example value from the perturbation context;
* :meth:`HParam.fixed_form` — its plain form at a fixed value on an ordinary model, the one
  implementation ``unwrap``, schedule replay and untuned baselines share;
* :attr:`HParam.kind`, :meth:`HParam.to_json` — its serialized form, so schedules reload without
  guessing a kind from a name (optuna's ``distribution_to_json``).

Adding a kind is one file with one such class, registered with :func:`register_hparam_kind`.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

import torch
from torch import Tensor, nn

from ..errors import SpecError
from ..sites import Site, Target, describe, selects
from ..transforms import Transform, transform_for

if TYPE_CHECKING:
    from ..context import Perturbation

Perturb = Literal["example", "batch"]
H = TypeVar("H", bound=type["HParam"])

_REGISTRY: dict[str, type[HParam]] = {}


def register_hparam_kind(cls: H) -> H:
    """Make ``cls`` (an HParam subclass with its own ``kind``) known to schedules and plots."""
    if not (isinstance(cls, type) and issubclass(cls, HParam)):
        raise TypeError(f"register_hparam_kind takes an HParam subclass, got {cls!r}")
    if "kind" not in cls.__dict__:
        raise TypeError(f"{cls.__name__} must set its own class attribute kind = '...'")
    _REGISTRY[cls.kind] = cls
    return cls


def kind_class(kind: str) -> type[HParam] | None:
    return _REGISTRY.get(kind)


def kind_of(name: str, spec: object) -> str:
    """The serialized kind of tuned value ``name``; a generic HParam inside an augmentation
    (``"<aug>:<sub>"``) is an ``augmentation`` value."""
    if type(spec) is HParam and ":" in name:
        return "augmentation"
    return getattr(spec, "kind", "hparam")


def _as_number(kind: str, label: str, value: object) -> float:
    """Python, numpy and 0-d tensor numbers alike; bools and arrays are refused."""
    if isinstance(value, torch.Tensor) or (hasattr(value, "__array__") and hasattr(value, "shape")):
        size = value.numel() if isinstance(value, torch.Tensor) else value.size  # type: ignore[union-attr]
        if size != 1:
            raise SpecError(
                f"{kind}: {label} must be a number, got an array of shape {tuple(value.shape)}"  # type: ignore[union-attr]
            )
        value = value.item()  # type: ignore[union-attr]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SpecError(f"{kind}: {label} must be a number, got {value!r}")
    return float(value) if not isinstance(value, int) else value  # type: ignore[return-value]


def as_flag(kind: str, label: str, value: object) -> bool:
    """A yes/no option: a bool (numpy's too), never a string or a number read by truthiness
    (``log="no"`` would turn log scale on)."""
    if isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")):
        return bool(value)
    raise SpecError(f"{kind}: {label} must be True or False, got {value!r}")


def as_axis(kind: str, label: str, value: object, *, optional: bool = False) -> int | None:
    """A tensor axis >= 1: a Python or numpy integer, not a bool (``True`` would mean axis 1)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        allowed = ", or None" if optional else ""
        raise SpecError(
            f"{kind}: {label}={value!r} must be an axis >= 1 (the time axis of batch-first "
            f"sequences, e.g. 1){allowed}"
        )
    return int(value)


# ---- what claim() sees and returns ----------------------------------------------------------------
@dataclass
class WrapSites:
    """The model as claims see it: every site, the planned hyper-layers, the claims so far."""

    sites: list[Site]
    layers: list[Site]
    problems: list[str] = field(default_factory=list)
    module_owner: dict[int, str] = field(default_factory=dict)
    role_owner: dict[tuple[int, str], str] = field(default_factory=dict)
    # kind -> the spec that claims every site of that kind no other spec named (one per kind)
    catch_all: dict[str, str] = field(default_factory=dict)

    def claim_catch_all(self, kind: str, name: str, what: str) -> bool:
        """Let spec ``name`` be the one that takes every remaining site of its kind."""
        owner = self.catch_all.get(kind)
        if owner is not None:
            self.problems.append(
                f"{what} specs {[owner, name]} both claim every {kind} module: give all but one explicit targets"
            )
            return False
        self.catch_all[kind] = name
        return True

    def claim_module(self, site: Site, name: str) -> bool:
        """Give ``site``'s module to spec ``name``; refuses a module two specs want."""
        owner = self.module_owner.get(id(site.module))
        if owner is not None:
            self.problems.append(
                f"{describe(site.path, site.module)} is claimed by both hparams[{owner!r}] and "
                f"hparams[{name!r}]: give each dropout module one spec"
            )
            return False
        self.module_owner[id(site.module)] = name
        return True

    def choose(
        self,
        name: str,
        kind: str,
        label: str,
        targets: tuple[Target, ...] | None,
        is_site: Callable[[nn.Module], bool],
        what: str,
        refusal: Callable[[Site], str | None] | None = None,
    ) -> list[Site] | None:
        """The sites spec ``name`` of a module-swapping kind acts on. Without ``targets``: every
        site of its kind no other spec took (``None`` if another spec is already the catch-all).
        With them: the selected sites; a selected leaf that is not one (``what``, e.g. "dropout
        module") is refused, with ``refusal``'s reason first when it gives one."""
        if targets is None:
            if not self.claim_catch_all(kind, name, label):
                return None
            return [s for s in self.sites if is_site(s.module) and id(s.module) not in self.module_owner]
        chosen = []
        for site in self.sites:
            if not selects(site, targets):
                continue
            if is_site(site.module):
                chosen.append(site)
            elif refusal is not None and (why := refusal(site)) is not None:
                self.problems.append(why)
            elif not list(site.module.children()):
                self.problems.append(
                    f"hparams[{name!r}] selects {describe(site.path, site.module)}, which is not a "
                    f"{what}: narrow its targets"
                )
        return chosen

    def claim_each(self, spec: HParam, name: str, chosen: list[Site], per_site: bool) -> Claim:
        """Claim every module of ``chosen`` for spec ``name``: one tuned value for all, or one per
        module (``"<name>:<path>"``) with ``per_site``; a module another spec owns is refused."""
        claim = Claim({})
        for site in chosen:
            if not self.claim_module(site, name):
                continue
            value = f"{name}:{site.path}" if per_site else name
            claim.values[value] = spec
            claim.sites.setdefault(value, []).append(site)
        return claim

    def claim_role(self, site: Site, role: str, name: str, what: str, fix: str) -> bool:
        """Give hyper-layer ``site``'s regularizer ``role`` to spec ``name``, unless another has it."""
        owner = self.role_owner.get((id(site.module), role))
        if owner is not None:
            self.problems.append(
                f"{describe(site.path, site.module)} {what} from both hparams[{owner!r}] and "
                f"hparams[{name!r}]: {fix}"
            )
            return False
        self.role_owner[(id(site.module), role)] = name
        return True


@dataclass
class Claim:
    """What one spec acts on, found before the model changes.

    ``values``: the tuned values it adds to λ (name -> spec; usually just its own name).
    ``sites``: per tuned value, the modules it acts on. ``roles``: (hyper-layer site, regularizer
    role, tuned value) for regularizers that run inside a hyper-layer.
    """

    values: dict[str, HParam]
    sites: dict[str, list[Site]] = field(default_factory=dict)
    roles: list[tuple[Site, str, str]] = field(default_factory=list)

    def take_role(self, sites: WrapSites, site: Site, role: str, value: str, what: str, fix: str) -> bool:
        """Claim hyper-layer ``site``'s regularizer ``role`` for tuned value ``value`` (refused,
        with a problem in ``sites``, when another spec has it)."""
        if not sites.claim_role(site, role, value, what, fix):
            return False
        self.roles.append((site, role, value))
        self.sites.setdefault(value, []).append(site)
        return True


# ---- what install() writes into ---------------------------------------------------------------------
@dataclass
class Installation:
    """The wrapped model a spec installs into, and what runs at every training pass."""

    root: nn.Module
    # per perturbation row: (R,) tensors summed into the training loss
    penalties: list[Callable[[Perturbation], Tensor]] = field(default_factory=list)
    # training-only transforms of the model's (args, kwargs), run in increasing order (stable):
    # augmentations (0) before input dropout (1)
    input_transforms: list[tuple[int, Callable[[Any, Perturbation], Any]]] = field(default_factory=list)
    # forward hooks the HyperModel removes on unwrap
    hooks: list[Any] = field(default_factory=list)
    # hooks that collect activations during training passes (AR/TAR)
    collectors: list[Any] = field(default_factory=list)

    def module_at(self, path: str) -> nn.Module:
        return self.root.get_submodule(path) if path else self.root

    def replace(self, site: Site, new: nn.Module) -> None:
        for path in site.paths:
            if path == "":
                self.root = new
            else:
                parent_path, _, child = path.rpartition(".")
                setattr(self.module_at(parent_path), child, new)


# ---- the plain form at a fixed value ------------------------------------------------------------------
class FixedForm:
    """A kind at a fixed value on a plain model. Callers: ``unwrap`` (final values), schedule
    replay (values per step) and untuned baselines (``init`` values)."""

    def set_value(self, value: float) -> None:
        self.value = float(value)

    def transform(self, x: Any) -> Any:
        """Training-only input transform (identity unless the kind acts on the input)."""
        return x

    def penalty(self) -> Tensor | None:
        """Training-loss term at the current value (None: the kind has none)."""
        return None

    def decayed_parameters(self) -> list[nn.Parameter]:
        """Weights an optimizer's ``weight_decay`` should decay at this value (L2 kinds)."""
        return []

    def remove(self) -> None:
        """Take the form off the model (its hooks), leaving the modules as they are."""


class FixedFormError(ValueError):
    """A saved ``where`` that does not fit the model (each entry one problem)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def modules_at(model: nn.Module, paths: list[str], fits: Callable[[nn.Module], bool], what: str) -> list[nn.Module]:
    """The modules at ``paths`` (a saved ``where``), each one ``fits`` accepts; every path that
    is missing or holds another module (not ``what``) goes into one FixedFormError."""
    modules: list[nn.Module] = []
    problems: list[str] = []
    for path in paths:
        try:
            m = model.get_submodule(path) if path else model
        except AttributeError:
            problems.append(f"the model has no module {path!r}")
            continue
        if not fits(m):
            problems.append(f"module {path!r} is a {type(m).__name__}, not {what}")
            continue
        modules.append(m)
    if problems:
        raise FixedFormError(problems)
    return modules


# ---- the base kind: a generic tuned value -----------------------------------------------------------
@dataclass(frozen=True)
class HParam:
    """A generic tuned value in ``(low, high)``, readable by any module via :func:`hypertune.hparam`.

    ``init_scale`` is the initial perturbation std on the unconstrained scale (σ₀ in the papers).
    ``perturb="batch"`` shares one draw across the batch: needed when a consumer cannot act per
    example, or when layers see reshaped batches. Numbers may be Python, numpy or 0-d tensors.
    """

    init: float
    low: float = -math.inf
    high: float = math.inf
    init_scale: float = 1.0
    discrete: bool = False
    perturb: Perturb = "example"
    log: bool = False

    kind: ClassVar[str] = "hparam"
    # Title of the schedule-plot panel its values share (None: a panel of its own).
    panel: ClassVar[str | None] = None
    # Plotted on a log axis.
    plot_log: ClassVar[bool] = False
    # Whether unwrap() leaves its fixed form in the returned model (module state, hooks).
    baked_by_unwrap: ClassVar[bool] = False
    # What unwrap() cannot give the plain model, for its notice (None: nothing is lost).
    unwrap_loses: ClassVar[str | None] = None
    # Whether only the forward can use it (read with hypertune.hparam): checked at the first step.
    read_in_forward: ClassVar[bool] = True
    # Whether its values come first in λ (in claim order); λ's layout is what checkpoints store.
    leads_lambda: ClassVar[bool] = False

    def __post_init__(self) -> None:
        kind = type(self).__name__
        for label in ("discrete", "log"):
            object.__setattr__(self, label, as_flag(kind, label, getattr(self, label)))
        for label in ("init", "low", "high", "init_scale"):
            value = _as_number(kind, label, getattr(self, label))
            object.__setattr__(self, label, value)
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

    # ---- life cycle ------------------------------------------------------------------------
    def claim_order(self) -> int:
        """Specs claim in increasing order (a catch-all claims after the explicit ones)."""
        return 0

    def claim(self, name: str, sites: WrapSites) -> Claim:
        """Which sites this spec acts on; append problems to ``sites.problems``, never raise."""
        return Claim({name: self})

    def install(self, name: str, claim: Claim, into: Installation) -> None:
        """Put the spec into the wrapped model (called once the whole model validated). By
        default: give each claimed hyper-layer role its tuned value; kinds that swap or hook
        modules override this."""
        for site, role, value in claim.roles:
            into.module_at(site.path).attach_regularizer(role, value)  # type: ignore[operator]

    def where(self, claim: Claim, value_name: str, model: nn.Module) -> dict[str, Any]:
        """Where tuned value ``value_name`` acts, as plain data (saved with schedules)."""
        found = claim.sites.get(value_name, [])
        return {"modules": [s.path for s in found]} if found else {}

    def fixed_form(self, model: nn.Module, where: Mapping[str, Any], value: float) -> FixedForm | None:
        """This kind at ``value`` on the plain ``model``; None if it has no plain form."""
        return None

    def bakes_on_unwrap(self) -> bool:
        """Whether unwrap() installs this spec's fixed form on the returned model."""
        return self.baked_by_unwrap

    # ---- serial form ------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The spec as JSON-able data with its kind; :func:`hparam_from_json` reads it back."""
        out: dict[str, Any] = {"kind": self.kind}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                value = repr(value)  # 'inf' / '-inf': JSON has no infinities
            elif isinstance(value, tuple):
                value = [_selector_to_json(v) for v in value]
            out[f.name] = value
        return out


def _selector_to_json(selector: object) -> Any:
    if isinstance(selector, type):
        return {"type": f"{selector.__module__}.{selector.__qualname__}"}
    return selector


def _selector_from_json(data: Any) -> Any:
    if isinstance(data, dict) and "type" in data:
        module, _, qualname = data["type"].rpartition(".")
        try:
            obj: Any = importlib.import_module(module)
            for part in qualname.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError):
            raise SpecError(f"target type {data['type']!r} cannot be imported here") from None
        return obj
    return data


def hparam_from_json(data: Mapping[str, Any]) -> HParam:
    """The spec :meth:`HParam.to_json` wrote, of its registered kind."""
    kind = data.get("kind")
    cls = _REGISTRY.get(str(kind))
    if cls is None:
        raise SpecError(f"unknown hyperparameter kind {kind!r}; known kinds are {sorted(_REGISTRY)}")
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key == "kind":
            continue
        if key not in names:
            raise SpecError(f"{cls.__name__} has no field {key!r}")
        if isinstance(value, str) and value in ("inf", "-inf"):
            value = float(value)
        elif isinstance(value, list):
            value = tuple(_selector_from_json(v) for v in value)
        kwargs[key] = value
    return cls(**kwargs)


register_hparam_kind(HParam)
