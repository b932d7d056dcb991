"""Sites: the module objects of a model and the paths that reach them, and how selectors match.

A module reached by several paths (a shared module) is one site, so it is claimed and swapped
once. Selectors are fnmatch patterns over module paths, module types, or (for ``HyperModel.wrap``'s
``targets``/``exclude``) module objects of the model itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Union

from torch import nn

from .errors import SpecError

# A module selector: a name pattern (fnmatch, matched against the module's path) or a module type.
Target = Union[str, type[nn.Module]]


@dataclass
class Site:
    """One module object and every path it is reachable at (shared modules have several)."""

    module: nn.Module
    paths: list[str]

    @property
    def path(self) -> str:
        return self.paths[0]


def sites_of(model: nn.Module) -> list[Site]:
    by_id: dict[int, Site] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        site = by_id.get(id(module))
        if site is None:
            by_id[id(module)] = Site(module, [path])
        else:
            site.paths.append(path)
    return list(by_id.values())


def matches(path: str, module: nn.Module, selectors: Sequence[object]) -> bool:
    for sel in selectors:
        if isinstance(sel, str):
            if fnmatchcase(path, sel):
                return True
        elif isinstance(sel, type):
            if isinstance(module, sel):
                return True
        elif sel is module:
            return True
    return False


def selects(site: Site, selectors: Sequence[object]) -> bool:
    return any(matches(p, site.module, selectors) for p in site.paths)


def is_exact_path(selector: object) -> bool:
    """A selector naming one module: an exact path (no wildcard) or a module object."""
    if isinstance(selector, nn.Module):
        return True
    return isinstance(selector, str) and not any(c in selector for c in "*?[")


def describe(path: str, module: nn.Module) -> str:
    return f"'{path or '<root>'}' ({type(module).__name__})"


def as_targets(targets: object, where: str, modules_allowed: bool = False) -> tuple | None:
    """Normalise a ``targets``/``exclude`` argument to a tuple of selectors, or one clear error.

    Specs take path patterns and module types only (they are data, saved with schedules);
    ``HyperModel.wrap`` also takes module objects of the model.
    """
    if targets is None:
        return None
    kinds = "module-path patterns (str) or module types" + (" or modules of the model" if modules_allowed else "")
    if isinstance(targets, (str, type)) or (modules_allowed and isinstance(targets, nn.Module)):
        targets = (targets,)
    if isinstance(targets, nn.Module):
        raise SpecError(
            f"{where} got a module object ({type(targets).__name__}); specs take {kinds}: give its path, "
            "e.g. 'fc1', or its type"
        )
    try:
        out = tuple(targets)  # type: ignore[arg-type]
    except TypeError:
        raise SpecError(f"{where} must be a sequence of {kinds}, got {type(targets).__name__} {targets!r}") from None
    for t in out:
        ok = isinstance(t, (str, type)) and (not isinstance(t, type) or issubclass(t, nn.Module))
        if not ok and not (modules_allowed and isinstance(t, nn.Module)):
            raise SpecError(f"{where} must be {kinds}; got an entry {type(t).__name__} {t!r}")
    return out
