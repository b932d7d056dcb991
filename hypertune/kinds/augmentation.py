"""Augmentations as a kind: their sub-values are tuned, and they transform the model's input."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..augment.base import Augmentation
from ..errors import HyperTuneError
from .base import Claim, FixedForm, Installation, WrapSites


class AugmentationKind:
    """The claim/install life cycle of one Augmentation (it expands into ``"<name>:<sub>"``)."""

    def __init__(self, augmentation: Augmentation) -> None:
        self.augmentation = augmentation

    def claim_order(self) -> int:
        return 0

    def claim(self, name: str, sites: WrapSites) -> Claim:
        return Claim({f"{name}:{sub}": spec for sub, spec in self.augmentation.hparams().items()})

    def install(self, name: str, claim: Claim, into: Installation) -> None:
        aug = self.augmentation
        subs = list(aug.hparams())

        def transform(inputs: Any, point: Any) -> Any:
            args, kwargs = inputs
            x = args[0] if args else None
            if not torch.is_tensor(x):
                raise HyperTuneError(
                    f"augmentation {name!r} ({type(aug).__name__}) acts on the model's first positional "
                    f"input, which must be the image batch tensor, got {type(x).__name__}: call the model "
                    "with the images first"
                )
            if not x.is_floating_point():
                raise HyperTuneError(
                    f"augmentation {name!r} ({type(aug).__name__}) needs floating-point images, got "
                    f"{x.dtype}: convert them before the step (e.g. x.float() / 255, as "
                    "torchvision's ToTensor does)"
                )
            x = aug.apply(x, {sub: point.value(f"{name}:{sub}") for sub in subs})
            return (x, *args[1:]), kwargs

        into.input_transforms.append((0, transform))

    def fixed_form(self, values: Mapping[str, float]) -> FixedAugmentation:
        return FixedAugmentation(self.augmentation, values)


class FixedAugmentation(FixedForm):
    """An augmentation at fixed sub-values (by sub-name), as a batch transform."""

    def __init__(self, augmentation: Augmentation, values: Mapping[str, float]) -> None:
        self.augmentation = augmentation
        self.values = {k: float(v) for k, v in values.items()}

    def transform(self, x: Tensor) -> Tensor:
        return self.augmentation.apply(
            x, {k: torch.tensor([v], device=x.device, dtype=x.dtype) for k, v in self.values.items()}
        )
