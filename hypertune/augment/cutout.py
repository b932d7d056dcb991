"""Cutout (DeVries & Taylor, 2017) with a tuned number of holes and hole size, per example.

The random draw (:func:`cutout_boxes`) and the deterministic transform (:func:`apply_boxes`) are
separate functions: ``apply_boxes`` erases exactly what ``torchvision.transforms.v2.functional.erase``
erases for the same ``(i, j, h, w)`` boxes, for a whole batch at once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Union

import torch
from torch import Tensor

from ..errors import PerturbationError, SpecError
from ..specs import HParam
from .base import Augmentation

Fill = Union[float, Sequence[float], Tensor]


# ---- helpers shared by the augmentations of this package ------------------------------------
def _check_images(x: Tensor, where: str, min_dim: int = 3) -> None:
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise TypeError(f"{where} needs a floating-point image batch, got {getattr(x, 'dtype', type(x))}")
    if x.dim() < min_dim:
        shape = "(N, C, H, W)" if min_dim >= 4 else "(N, ..., H, W)"
        raise ValueError(f"{where} needs a batch of images shaped {shape}, got shape {tuple(x.shape)}")


def _per_example(value: Tensor | float, n: int, x: Tensor, where: str) -> Tensor:
    """``value`` (a number, or shape (), (1,) or (n,)) as a detached (n,) tensor on x's device/dtype.

    Augmentations are not differentiated through their hyperparameters, so values are detached.
    """
    v = torch.as_tensor(value).detach().to(device=x.device, dtype=x.dtype).reshape(-1)
    if v.numel() == 1:
        return v.expand(n)
    if v.numel() != n:
        raise PerturbationError(
            f"{where} got {v.numel()} values for a batch of {n} examples: give one value for the "
            "batch (shape (1,)) or one per example (shape (N,)); if the model reshapes its input "
            "before this point, give the hyperparameter perturb='batch'"
        )
    return v


def _spec(value: object, name: str, where: str, *, allow_none: bool = True) -> HParam | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, HParam):
        raise SpecError(
            f"{where}: {name} must be an HParam(init, low, high, ...)"
            + (" or None (not tuned, not applied)" if allow_none else "")
            + f", got {type(value).__name__}"
        )
    return value


def channel_values(value: object, label: str, where: str) -> Tensor:
    """``value`` checked as a number or one number per channel (a fill, a mean, a std), refused
    with the fix at construction instead of failing inside the first forward."""
    if isinstance(value, bool):
        raise SpecError(f"{where}: {label} must be a number or one number per channel, got {value!r}")
    try:
        t = torch.as_tensor(value.detach().cpu() if isinstance(value, Tensor) else value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise SpecError(f"{where}: {label} must be a number or one number per channel, got {value!r}") from None
    if t.dim() > 1 or t.numel() == 0 or not torch.isfinite(t).all():
        raise SpecError(
            f"{where}: {label} must be a finite number or a flat list of one per channel, got {value!r}"
        )
    return t


def _fill_tensor(fill: Fill, x: Tensor) -> Tensor:
    """``fill`` as a tensor broadcastable to (..., C, H, W): a scalar or one value per channel."""
    f = torch.as_tensor(fill, dtype=x.dtype, device=x.device)
    if f.dim() == 0:
        return f
    f = f.reshape(-1)
    if x.dim() < 4 or f.numel() not in (1, x.shape[-3]):
        raise ValueError(
            f"fill has {f.numel()} values but the images have shape {tuple(x.shape[1:])}: give one "
            "value, or one per channel of an (N, C, H, W) batch"
        )
    return f.view(-1, 1, 1)


# ---- the random draw ---------------------------------------------------------------------
def cutout_boxes(
    holes: Tensor,
    length: Tensor,
    height: int,
    width: int,
    max_holes: int,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw cutout squares: ``(N, max_holes, 4)`` long boxes ``(i, j, h, w)`` (top, left, height, width).

    ``holes`` and ``length`` have shape (N,) (rounded to integers here). Example ``n`` gets
    ``holes[n]`` (at most ``max_holes``) squares of side ``length[n]`` whose centers are uniform
    over the pixels; each square covers rows ``cy - length//2 .. cy - length//2 + length - 1``
    clipped to the image, as in DeVries & Taylor's reference code (which, for odd lengths, cuts
    one pixel less than ``length``; here the side is always ``length`` before clipping). Unused
    hole slots get ``h = w = 0``.
    """
    holes = torch.as_tensor(holes).detach().reshape(-1)
    n = holes.numel()
    device = holes.device
    holes = holes.round().long().clamp(0, max_holes)
    side = torch.as_tensor(length, device=device).detach().reshape(-1).round().long().clamp_min(0)
    if side.numel() == 1:
        side = side.expand(n)
    side = side.view(n, 1)
    cy = torch.randint(0, height, (n, max_holes), generator=generator, device=device)
    cx = torch.randint(0, width, (n, max_holes), generator=generator, device=device)
    top, left = cy - side // 2, cx - side // 2
    i = top.clamp(0, height)
    j = left.clamp(0, width)
    h = (top + side).clamp(0, height) - i
    w = (left + side).clamp(0, width) - j
    used = torch.arange(max_holes, device=device).view(1, -1) < holes.view(n, 1)
    h = torch.where(used, h, torch.zeros_like(h))
    w = torch.where(used, w, torch.zeros_like(w))
    return torch.stack((i, j, h, w), dim=-1)


# ---- the deterministic transform -----------------------------------------------------------
def cutout_mask(boxes: Tensor, height: int, width: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(N, H, W)`` bool mask of the pixels inside any of each example's ``(N, K, 4)`` boxes."""
    i, j, h, w = boxes.long().unbind(-1)  # each (N, K)
    rows = torch.arange(height, device=boxes.device).view(1, 1, -1)
    cols = torch.arange(width, device=boxes.device).view(1, 1, -1)
    in_rows = ((rows >= i.unsqueeze(-1)) & (rows < (i + h).unsqueeze(-1))).to(dtype)  # (N, K, H)
    in_cols = ((cols >= j.unsqueeze(-1)) & (cols < (j + w).unsqueeze(-1))).to(dtype)  # (N, K, W)
    # Number of boxes covering each pixel, without an (N, K, H, W) intermediate.
    return torch.bmm(in_rows.transpose(1, 2), in_cols) > 0


def apply_boxes(x: Tensor, boxes: Tensor, fill: Fill = 0.0) -> Tensor:
    """Set the pixels of ``x`` (N, ..., H, W) inside each example's boxes (N, K, 4) to ``fill``.

    For one image this equals applying ``torchvision.transforms.v2.functional.erase(img, i, j, h, w,
    v=fill)`` once per box. ``fill`` is a number or one value per channel.
    """
    _check_images(x, "apply_boxes")
    n, height, width = x.shape[0], x.shape[-2], x.shape[-1]
    if boxes.dim() != 3 or boxes.shape[0] != n or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape (N={n}, K, 4), got {tuple(boxes.shape)}")
    mask = cutout_mask(boxes.to(x.device), height, width, x.dtype)
    mask = mask.view(n, *([1] * (x.dim() - 3)), height, width)
    return torch.where(mask, _fill_tensor(fill, x), x)


class Cutout(Augmentation):
    """Cutout with a tuned number of square holes and hole side, each per example.

    Sub-hyperparameters: ``holes`` (default ``HParam(init=1, low=0, high=4, discrete=True)``) and
    ``length`` in pixels (default ``HParam(init=8, low=0, high=20, discrete=True)``); give your own
    HParam to change the range, or ``holes=None`` for exactly one hole per image (``length`` is
    always tuned). Values are rounded to integers; ``holes`` is capped at ``floor(holes.high)``,
    which must be finite. Each hole's center is uniform over the image and the square is clipped
    at the border; holes may overlap. The holes are set to ``fill`` (a number or one value per
    channel; the inputs are the model's, so with normalized inputs 0 is the mean color).

    Works on ``(N, ..., H, W)`` floating batches on any device.
    """

    def __init__(
        self,
        holes: HParam | None = HParam(init=1, low=0, high=4, discrete=True),
        length: HParam = HParam(init=8, low=0, high=20, discrete=True),
        *,
        fill: Fill = 0.0,
    ) -> None:
        self.holes = _spec(holes, "holes", "Cutout")
        self.length = _spec(length, "length", "Cutout", allow_none=False)
        if self.holes is not None:
            if not math.isfinite(self.holes.high):
                raise SpecError(
                    f"Cutout: holes.high={self.holes.high} must be finite: it sets the most holes per image"
                )
            if self.holes.low < 0:
                raise SpecError(f"Cutout: holes.low={self.holes.low} must be >= 0")
            self.max_holes = max(int(math.floor(self.holes.high)), 0)
        else:
            self.max_holes = 1
        if self.length.low < 0:  # type: ignore[union-attr]
            raise SpecError(f"Cutout: length.low={self.length.low} must be >= 0")  # type: ignore[union-attr]
        channel_values(fill, "fill", "Cutout")
        if isinstance(fill, Tensor):
            fill = fill.detach().cpu()
        self.fill = fill

    def hparams(self) -> dict[str, HParam]:
        out = {}
        if self.holes is not None:
            out["holes"] = self.holes
        out["length"] = self.length
        return out  # type: ignore[return-value]

    def apply(self, x: Tensor, values: Mapping[str, Tensor]) -> Tensor:
        _check_images(x, "Cutout")
        n = x.shape[0]
        holes = _per_example(values["holes"], n, x, "Cutout holes") if self.holes is not None else 1.0
        length = _per_example(values["length"], n, x, "Cutout length")
        holes = torch.as_tensor(holes, device=x.device).expand(n)
        boxes = cutout_boxes(holes, length, x.shape[-2], x.shape[-1], self.max_holes)
        return apply_boxes(x, boxes, self.fill)

    def __repr__(self) -> str:
        return f"Cutout(holes={self.holes}, length={self.length}, fill={self.fill})"
