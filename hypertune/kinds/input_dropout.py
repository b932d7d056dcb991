"""InputDropout: dropout on the model's input, applied before the user's forward.

It drops the floating-point tensors of the input: the first positional argument (a tensor, or
the floating tensors of a dict/tuple), or, when the model is called with keywords only (Hugging
Face style), the floating tensors among them. Integer inputs (token ids) cannot be dropped this
way: that is EmbeddingDropout's job, and the first step says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..errors import HyperTuneError
from ..layers.dropout import dropout_per_example
from .base import Claim, FixedForm, HParam, Installation, register_hparam_kind
from .dropout import RATE_INIT_SCALE, rate_bounds


def drop_floating(inputs: Any, drop: Any) -> Any:
    """``inputs`` (args, kwargs) with ``drop`` applied to the floating tensors the kind acts on;
    refuses inputs that hold none."""
    args, kwargs = inputs
    found = False

    def visit(t: Any) -> Any:
        nonlocal found
        if torch.is_tensor(t) and t.is_floating_point():
            found = True
            return drop(t)
        return t

    if args:
        args = (tree_map(visit, args[0]), *args[1:])
    else:
        kwargs = tree_map(visit, kwargs)
    if not found:
        raise HyperTuneError(
            "InputDropout found no floating-point input tensor to drop"
            + (" (the input holds integer tensors, e.g. token ids)" if _has_tensor(args, kwargs) else "")
            + ": for token ids tune EmbeddingDropout on the embedding instead, or remove InputDropout"
        )
    return args, kwargs


def _has_tensor(args: Any, kwargs: Any) -> bool:
    from torch.utils._pytree import tree_leaves

    return any(torch.is_tensor(x) for x in tree_leaves((args, kwargs)))


@register_hparam_kind
@dataclass(frozen=True)
class InputDropout(HParam):
    """Dropout on the model's input (its floating tensors), applied before the user's forward."""

    init: float = 0.05
    low: float = 0.0
    high: float = 0.95
    init_scale: float = RATE_INIT_SCALE

    kind: ClassVar[str] = "input_dropout"
    panel: ClassVar[str | None] = "Dropout rates"
    baked_by_unwrap: ClassVar[bool] = True
    read_in_forward: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        rate_bounds(self)

    def install(self, name: str, claim: Claim, into: Installation) -> None:
        def transform(inputs: Any, point: Any) -> Any:
            rate = point.value(name)
            return drop_floating(inputs, lambda x: dropout_per_example(x, rate, 0, "input dropout"))

        into.input_transforms.append((1, transform))  # after augmentations

    def fixed_form(self, model: nn.Module, where: Mapping[str, Any], value: float) -> FixedForm | None:
        return FixedInputDropout(model, value)


class InputDropoutHook:
    """Forward pre-hook: the plain form of a tuned input-dropout rate (kwargs too)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate

    def __call__(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if not module.training or self.rate <= 0:
            return None
        return drop_floating((args, kwargs), lambda x: torch.nn.functional.dropout(x, self.rate, True))


class FixedInputDropout(FixedForm):
    """The model's InputDropoutHook at a fixed rate (one per model: an existing one is reused)."""

    def __init__(self, model: nn.Module, value: float) -> None:
        self.handle = None
        self.hook = next(
            (h for h in model._forward_pre_hooks.values() if isinstance(h, InputDropoutHook)), None
        )
        if self.hook is None:
            self.hook = InputDropoutHook(float(value))
            self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)
        self.set_value(value)

    def set_value(self, value: float) -> None:
        super().set_value(value)
        self.hook.rate = self.value  # type: ignore[union-attr]

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
