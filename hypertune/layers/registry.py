"""Layer kinds: which module classes become which hyper-layer, and the classes that result.

A layer kind is one :class:`~hypertune.layers.HyperLayer` subclass: it names the class it handles
(``base_class``, or ``handles`` at registration), states its own checks (``check``) and its math
(``base_forward``, ``response``). :func:`register_layer_kind` adds one, the way torchao's
``register_quantize_module_handler`` or opacus' ``register_grad_sampler`` do. A kind may handle a
class by its dotted name (``"transformers.pytorch_utils.Conv1D"``) so hypertune never imports an
optional library to recognise its modules.

A module is matched by walking its class's MRO, most derived first. A subclass of a handled class
is tuned as that kind only if no class in between defines its own ``forward``: otherwise the
kind's math would not be the module's, so it stays w₀ and the wrap notice names it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from torch import nn

from .base import HyperLayer

K = TypeVar("K", bound=type[HyperLayer])

_KINDS: dict[type | str, type[HyperLayer]] = {}
_CONCRETE: dict[tuple[type, type], type] = {}


def dotted_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_layer_kind(
    kind: K | None = None, *, handles: type[nn.Module] | str | Sequence[type[nn.Module] | str] | None = None
) -> K:
    """Register a hyper-layer kind; usable as ``@register_layer_kind`` or with ``handles=...``.

    ``handles``: the module classes (or their dotted names) the kind replaces; default its
    ``base_class``. A later registration for the same class replaces the earlier one, so a user
    can override a built-in kind.
    """

    def register(cls: K) -> K:
        if not (isinstance(cls, type) and issubclass(cls, HyperLayer)):
            raise TypeError(f"register_layer_kind takes a HyperLayer subclass, got {cls!r}")
        missing = [m for m in ("base_forward", "response") if getattr(cls, m) is getattr(HyperLayer, m)]
        if missing and cls.forward is HyperLayer.forward:
            raise TypeError(f"{cls.__name__} must implement {' and '.join(missing)} to be a layer kind (or its own forward, as HyperLSTM does)")
        targets = handles if handles is not None else getattr(cls, "base_class", None)
        if targets is None:
            raise TypeError(f"{cls.__name__}: give base_class or handles=... (the module class it replaces)")
        for target in targets if isinstance(targets, (list, tuple)) else [targets]:
            if not (isinstance(target, str) or (isinstance(target, type) and issubclass(target, nn.Module))):
                raise TypeError(f"handles entries must be nn.Module classes or dotted names, got {target!r}")
            _KINDS[target] = cls
        return cls

    return register(kind) if kind is not None else register  # type: ignore[return-value]


@dataclass(frozen=True)
class Match:
    """The kind for a module, or why none fits (``kind is None`` and ``reason`` set)."""

    kind: type[HyperLayer] | None
    reason: str = ""


def match(module: nn.Module) -> Match | None:
    """The registered kind for ``module``; ``None`` if no kind handles its class or any base."""
    return match_class(type(module))


def match_class(module_type: type[nn.Module]) -> Match | None:
    """:func:`match` for a class (e.g. ``match_class(nn.LSTM).kind is HyperLSTM``)."""
    mro = module_type.__mro__
    for i, cls in enumerate(mro):
        kind = _KINDS.get(cls) or _KINDS.get(dotted_name(cls))
        if kind is None:
            continue
        own = [c for c in mro[:i] if "forward" in c.__dict__]
        if own:
            return Match(
                None,
                f"subclass of {cls.__name__} with its own forward ({own[0].__name__}.forward): "
                f"register a layer kind for {module_type.__name__} (hypertune.register_layer_kind)",
            )
        return Match(kind)
    return None


def concrete_class(kind: type[HyperLayer], module_type: type[nn.Module]) -> type[HyperLayer]:
    """The class a module of ``module_type`` becomes: the kind itself when it already derives
    from that type, else a subclass of both (so the module keeps its own class's methods and
    ``isinstance`` checks, and unwrap restores exactly ``module_type``)."""
    if issubclass(kind, module_type):
        return kind
    key = (kind, module_type)
    cls = _CONCRETE.get(key)
    if cls is None:
        # A name pickle can find (``torch.save`` of a wrapped model): this module's attribute,
        # rebuilt on demand by __getattr__ in a process that has not made it yet.
        name = f"{_PICKLE_PREFIX}{_encode(kind)}{_PICKLE_SEP}{_encode(module_type)}"
        cls = type(kind.__name__, (kind, module_type), {"__module__": __name__, "__qualname__": name})
        _CONCRETE[key] = cls
        globals()[name] = cls
    return cls


_PICKLE_PREFIX = "Hyper@"
_PICKLE_SEP = "@"


def _encode(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}".replace(".", "/")


def _decode(text: str) -> type:
    import importlib

    module, _, qualname = text.replace("/", ".").partition(":")
    obj: object = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[return-value]


def __getattr__(name: str) -> type:
    """Rebuild a concrete class pickle asks for (see :func:`concrete_class`)."""
    if name.startswith(_PICKLE_PREFIX):
        kind, _, module_type = name[len(_PICKLE_PREFIX) :].partition(_PICKLE_SEP)
        return concrete_class(_decode(kind), _decode(module_type))  # type: ignore[arg-type]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def kinds() -> dict[str, str]:
    """Handled class -> kind, for documentation and error messages."""
    return {
        (k if isinstance(k, str) else dotted_name(k)): v.__name__ for k, v in _KINDS.items()
    }
