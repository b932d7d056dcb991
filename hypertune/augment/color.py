"""Color jitter with tuned strengths, per example, on the device.

The tuned value of each sub-hyperparameter is a *strength*, as in
``torchvision.transforms.v2.ColorJitter(brightness=b, ...)``: each example draws its own factor,
uniform in ``[max(0, 1 - b), 1 + b]`` for brightness, contrast and saturation and in ``[-h, h]``
(``h <= 0.5``) for hue. The random draw (:func:`jitter_factors`, :func:`jitter_order`) is
separate from the deterministic transform (:func:`apply_jitter` and the batched
``adjust_*`` functions), which equals torchvision's ``adjust_brightness``/``adjust_contrast``/
``adjust_saturation``/``adjust_hue`` for float images, one factor per example.

Value range: torchvision's functions take float images in ``[0, 1]`` and clamp their results to
``[0, 1]`` (brightness, contrast, saturation; hue keeps the value channel). Inputs that the model
sees are often normalized; give ``mean``/``std`` (the ones of your ``Normalize``) and the batch is
un-normalized (``x * std + mean``), jittered, and normalized again. Any affine value range works
this way, e.g. ``[-1, 1]`` is ``mean=0.5, std=0.5`` and ``[0, 255]`` is ``mean=0, std=1/255``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Literal, Union

import torch
from torch import Tensor

from ..errors import SpecError
from ..specs import HParam
from .base import Augmentation
from .cutout import _check_images, _per_example, _spec, channel_values

#: Operation indices of :func:`apply_jitter`'s ``order``, as in torchvision's ColorJitter.
OPS = ("brightness", "contrast", "saturation", "hue")
Stat = Union[float, Sequence[float], None]


def _col(f: Tensor | float, x: Tensor) -> Tensor:
    """A per-example factor (a number or shape (N,)) shaped to broadcast against x (N, ..., H, W)."""
    f = torch.as_tensor(f, dtype=x.dtype, device=x.device)
    if f.dim() == 0:
        return f
    return f.reshape(-1, *([1] * (x.dim() - 1)))


def _channels(x: Tensor, where: str) -> int:
    c = x.shape[-3]
    if c not in (1, 3):
        raise ValueError(f"{where} needs 1 (grayscale) or 3 (RGB) channels at dim -3, got {c}")
    return c


def _grayscale(x: Tensor) -> Tensor:
    """ITU-R 601-2 luma of an RGB batch (..., 3, H, W) -> (..., 1, H, W), as torchvision."""
    r, g, b = x.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3)


def _blend(x: Tensor, other: Tensor, ratio: Tensor) -> Tensor:
    return (x * ratio + other * (1.0 - ratio)).clamp_(0.0, 1.0)


# ---- deterministic, batched adjustments ----------------------------------------------------
def adjust_brightness(x: Tensor, factor: Tensor | float) -> Tensor:
    """``clamp(x * factor, 0, 1)``; ``factor`` is a number or one per example."""
    _check_images(x, "adjust_brightness", 4)
    _channels(x, "adjust_brightness")
    return (x * _col(factor, x)).clamp_(0.0, 1.0)


def adjust_contrast(x: Tensor, factor: Tensor | float) -> Tensor:
    """Blend each image with the mean of its grayscale version."""
    _check_images(x, "adjust_contrast", 4)
    gray = _grayscale(x) if _channels(x, "adjust_contrast") == 3 else x
    mean = gray.mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(x, mean, _col(factor, x))


def adjust_saturation(x: Tensor, factor: Tensor | float) -> Tensor:
    """Blend each image with its grayscale version; 1-channel images are unchanged (as torchvision)."""
    _check_images(x, "adjust_saturation", 4)
    if _channels(x, "adjust_saturation") == 1:
        return x
    return _blend(x, _grayscale(x), _col(factor, x))


def _rgb_to_hsv(x: Tensor) -> Tensor:
    r, g, _ = x.unbind(dim=-3)
    # amin/amax rather than aminmax: same values, and aminmax is very slow on small CPU tensors.
    minc, maxc = x.amin(dim=-3), x.amax(dim=-3)
    eqc = maxc == minc
    channels_range = maxc - minc
    ones = torch.ones_like(maxc)
    s = channels_range / torch.where(eqc, ones, maxc)
    divisor = torch.where(eqc, ones, channels_range).unsqueeze(-3)
    rc, gc, bc = ((maxc.unsqueeze(-3) - x) / divisor).unbind(dim=-3)
    maxc_neq_r = maxc != r
    maxc_eq_g = maxc == g
    hg = (rc + 2.0 - bc) * (maxc_eq_g & maxc_neq_r)
    hr = (bc - gc) * ~maxc_neq_r
    hb = (gc + 4.0 - rc) * (maxc_neq_r & ~maxc_eq_g)
    h = torch.fmod((hr + hg + hb) * (1.0 / 6.0) + 1.0, 1.0)
    return torch.stack((h, s, maxc), dim=-3)


def _hsv_to_rgb(x: Tensor) -> Tensor:
    h, s, v = x.unbind(dim=-3)
    h6 = h * 6
    i = torch.floor(h6)
    f = h6 - i
    i = i.to(torch.int64).remainder_(6)
    sxf = s * f
    one_minus_s = 1.0 - s
    q = ((1.0 - sxf) * v).clamp_(0.0, 1.0)
    t = ((sxf + one_minus_s) * v).clamp_(0.0, 1.0)
    p = (one_minus_s * v).clamp_(0.0, 1.0)
    vpqt = torch.stack((v, p, q, t), dim=-3)
    select = torch.tensor(
        [[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], dtype=torch.long, device=x.device
    )
    select = select[:, i].movedim(0, -3)  # (..., 3, H, W)
    return vpqt.gather(-3, select)


def adjust_hue(x: Tensor, factor: Tensor | float) -> Tensor:
    """Shift the hue by ``factor`` turns (in ``[-0.5, 0.5]``) via HSV; 1-channel images are unchanged.

    torchvision computes the HSV round trip in float32 even for float64 images; this one computes
    it in the input's dtype (differences are at float32 precision).
    """
    _check_images(x, "adjust_hue", 4)
    if _channels(x, "adjust_hue") == 1 or x.numel() == 0:
        return x
    h, s, v = _rgb_to_hsv(x).unbind(dim=-3)
    h = (h + _col(factor, h)).remainder(1.0)
    return _hsv_to_rgb(torch.stack((h, s, v), dim=-3))


_ADJUST = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def apply_jitter(
    x: Tensor, factors: Mapping[str, Tensor | float | None], order: Tensor | None = None
) -> Tensor:
    """Apply per-example jitter ``factors`` to a batch ``x`` (N, ..., C, H, W) with values in [0, 1].

    ``factors`` maps names of :data:`OPS` to a number or an (N,) tensor (missing or ``None``:
    not applied). ``order``: ``None`` applies brightness, contrast, saturation, hue in that
    order; an (N, 4) long tensor gives each example its own permutation of the op indices
    ``0..3`` (torchvision's ``fn_idx``), a (4,) one a permutation shared by the batch.
    For one image and one permutation this equals torchvision's ``adjust_*`` functions applied
    in that order. A per-example order evaluates every op at every position (4x the work).
    """
    _check_images(x, "apply_jitter", 4)
    _channels(x, "apply_jitter")
    unknown = set(factors) - set(OPS)
    if unknown:
        raise ValueError(f"unknown jitter ops {sorted(unknown)}; known ones are {list(OPS)}")
    ops = [(k, _ADJUST[k], factors[name]) for k, name in enumerate(OPS) if factors.get(name) is not None]
    n = x.shape[0]
    if order is not None and order.shape not in ((4,), (n, 4)):
        raise ValueError(f"order must have shape (4,) or (N={n}, 4), got {tuple(order.shape)}")
    if order is not None and order.dim() == 2 and len(ops) <= 1:
        order = None  # a single op: the order does not matter
    if order is None or order.dim() == 1:
        by_k = {k: (fn, f) for k, fn, f in ops}
        for k in range(4) if order is None else order.tolist():
            if k in by_k:
                fn, f = by_k[k]
                x = fn(x, f)
        return x
    order = order.to(x.device)
    shape = (n, *([1] * (x.dim() - 1)))
    for position in range(4):
        chosen = order[:, position].view(shape)
        out = x
        for k, fn, f in ops:
            out = torch.where(chosen == k, fn(x, f), out)
        x = out
    return x


# ---- the random draw ---------------------------------------------------------------------
def jitter_factors(
    strengths: Mapping[str, Tensor | float], n: int, *, generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None, device: torch.device | str | None = None,
) -> dict[str, Tensor]:
    """Draw one factor per example from each strength's range, as torchvision's ColorJitter.

    ``strengths[name]`` is a number or a tensor of shape (1,) or (n,). Brightness, contrast and
    saturation factors are uniform in ``[max(0, 1 - s), 1 + s]``, hue in ``[-s, s]``.
    """
    out = {}
    for name in OPS:  # a fixed order, so a seeded generator gives reproducible draws
        if name not in strengths:
            continue
        s = torch.as_tensor(strengths[name]).detach()
        dt = dtype or (s.dtype if s.is_floating_point() else torch.get_default_dtype())
        dev = device if device is not None else s.device
        s = s.to(device=dev, dtype=dt).reshape(-1).expand(n) if s.numel() == 1 else s.to(dev, dt).reshape(-1)
        if s.numel() != n:
            raise ValueError(f"strength {name!r} has {s.numel()} values for {n} examples")
        u = torch.rand(n, generator=generator, dtype=dt, device=dev)
        if name == "hue":
            out[name] = (2.0 * u - 1.0) * s
        else:
            low = (1.0 - s).clamp_min(0.0)
            out[name] = low + (1.0 + s - low) * u
    return out


def jitter_order(
    n: int, *, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> Tensor:
    """An (n, 4) long tensor: an independent uniform permutation of the 4 ops per example."""
    return torch.rand(n, 4, generator=generator, device=device).argsort(dim=1)


class ColorJitter(Augmentation):
    """Per-example color jitter whose four strengths are tuned.

    Sub-hyperparameters (give an HParam to change the range, ``None`` to leave the op out):
    ``brightness``, ``contrast``, ``saturation`` (defaults ``HParam(init=0.2, low=0, high=1)``;
    factor uniform in ``[max(0, 1 - s), 1 + s]``) and ``hue`` (default
    ``HParam(init=0.05, low=0, high=0.5)``; factor uniform in ``[-s, s]``, ``high`` at most 0.5).

    ``order="random"`` applies the ops in an independent random order per example, as
    torchvision's ColorJitter does per image; ``order="fixed"`` applies brightness, contrast,
    saturation, hue in that order, 4x cheaper. ``mean``/``std``: the normalization of the
    model's inputs (numbers or one per channel); the jitter acts on ``x * std + mean``, which
    should lie in ``[0, 1]`` (results are clamped there, as torchvision's), and the output is
    normalized back. Inputs are ``(N, ..., C, H, W)`` with 1 or 3 channels; saturation and hue
    leave 1-channel images unchanged (as torchvision), with a warning, since tuning them is then
    wasted: pass ``saturation=None, hue=None`` for grayscale data.
    """

    def __init__(
        self,
        brightness: HParam | None = HParam(init=0.2, low=0.0, high=1.0),
        contrast: HParam | None = HParam(init=0.2, low=0.0, high=1.0),
        saturation: HParam | None = HParam(init=0.2, low=0.0, high=1.0),
        hue: HParam | None = HParam(init=0.05, low=0.0, high=0.5),
        *,
        order: Literal["random", "fixed"] = "random",
        mean: Stat = None,
        std: Stat = None,
    ) -> None:
        given = {"brightness": brightness, "contrast": contrast, "saturation": saturation, "hue": hue}
        self.specs: dict[str, HParam] = {}
        for name, value in given.items():
            spec = _spec(value, name, "ColorJitter")
            if spec is None:
                continue
            if spec.low < 0:
                raise SpecError(f"ColorJitter: {name}.low={spec.low} must be >= 0 (it is a strength)")
            if name == "hue" and spec.high > 0.5:
                raise SpecError(f"ColorJitter: hue.high={spec.high} must be <= 0.5 (hue turns)")
            self.specs[name] = spec
        if not self.specs:
            raise SpecError("ColorJitter: every op is None; tune at least one")
        if order not in ("random", "fixed"):
            raise SpecError(f"ColorJitter: order={order!r} must be 'random' or 'fixed'")
        if (mean is None) != (std is None):
            raise SpecError("ColorJitter: give both mean and std (the input normalization) or neither")
        if mean is not None:
            channel_values(mean, "mean", "ColorJitter")
        if std is not None and (channel_values(std, "std", "ColorJitter") == 0).any():
            raise SpecError("ColorJitter: std must be non-zero")
        self.order = order
        self.mean = mean
        self.std = std
        self._warned = False

    def hparams(self) -> dict[str, HParam]:
        return dict(self.specs)

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        if self.mean is None:
            return None
        out = []
        for stat in (self.mean, self.std):
            t = torch.as_tensor(stat, dtype=x.dtype, device=x.device).reshape(-1)
            if t.numel() not in (1, x.shape[-3]):
                raise ValueError(
                    f"ColorJitter: mean/std have {t.numel()} values but the images have "
                    f"{x.shape[-3]} channels"
                )
            out.append(t.view(-1, 1, 1))
        return out[0], out[1]

    def apply(self, x: Tensor, values: Mapping[str, Tensor]) -> Tensor:
        _check_images(x, "ColorJitter", 4)
        n = x.shape[0]
        if _channels(x, "ColorJitter") == 1 and not self._warned and (
            "saturation" in self.specs or "hue" in self.specs
        ):
            self._warned = True
            warnings.warn(
                "ColorJitter: saturation and hue leave 1-channel images unchanged; pass "
                "saturation=None, hue=None so they are not tuned for nothing",
                stacklevel=2,
            )
        strengths = {name: _per_example(values[name], n, x, f"ColorJitter {name}") for name in self.specs}
        factors = jitter_factors(strengths, n, dtype=x.dtype, device=x.device)
        order = jitter_order(n, device=x.device) if self.order == "random" else None
        stats = self._stats(x)
        if stats is not None:
            mean, std = stats
            x = x * std + mean
        x = apply_jitter(x, factors, order)
        if stats is not None:
            x = (x - mean) / std
        return x

    def __repr__(self) -> str:
        subs = ", ".join(f"{k}={v}" for k, v in self.specs.items())
        return f"ColorJitter({subs}, order={self.order!r}, mean={self.mean}, std={self.std})"
