"""Random affine transforms with tuned ranges, one matrix per example (``affine_grid`` + ``grid_sample``).

The random draw (:func:`affine_params`) is separate from the deterministic transform
(:func:`apply_affine`), which follows ``torchvision.transforms.v2.functional.affine``'s
conventions for tensors: the center of rotation is the image center (pixel ``((W-1)/2, (H-1)/2)``),
a positive angle rotates *clockwise* as displayed (x right, y down) -- ``F.affine``'s sign, which
is the opposite of ``F.rotate``'s -- ``translate`` is in pixels (x right, y down), ``shear`` is
the (x, y) shear angles in degrees, and pixels sampled from outside the input take ``fill``.
:func:`affine_theta` gives the per-example matrices in ``affine_grid``'s normalized coordinates
(``align_corners=False``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import SpecError
from ..specs import HParam
from .base import Augmentation
from .cutout import Fill, _check_images, _fill_tensor, _per_example, _spec, channel_values

Interpolation = Literal["nearest", "bilinear"]


def _vec(v: Tensor | float | Sequence[float], n: int, width: int | None = None) -> Tensor:
    """``v`` as a float64 tensor of shape (n,) or, with ``width``, (n, width)."""
    t = torch.as_tensor(v).detach().to(torch.float64)
    if width is None:
        return t.reshape(-1).expand(n) if t.numel() == 1 else t.reshape(n)
    if t.dim() <= 1:
        return t.reshape(1, width).expand(n, width)
    return t.reshape(n, width)


def affine_theta(
    angle: Tensor | float,
    translate: Tensor | Sequence[float],
    scale: Tensor | float,
    shear: Tensor | Sequence[float],
    height: int,
    width: int,
) -> Tensor:
    """Per-example (N, 2, 3) float64 matrices for ``F.affine_grid(..., align_corners=False)``.

    ``angle`` (N,) degrees, ``translate`` (N, 2) pixels (tx, ty), ``scale`` (N,), ``shear`` (N, 2)
    degrees (sx, sy); a single value (or a single pair) is shared by the batch. Each maps an
    output pixel to the input pixel it samples: torchvision's inverse affine matrix about the
    image center, rescaled from centered pixel coordinates to normalized ones.
    """
    n = max(
        torch.as_tensor(angle).numel(),
        torch.as_tensor(scale).numel(),
        torch.as_tensor(translate).numel() // 2,
        torch.as_tensor(shear).numel() // 2,
    )
    angle_, scale_ = _vec(angle, n), _vec(scale, n)
    tx, ty = _vec(translate, n, 2).unbind(-1)
    shx, shy = _vec(shear, n, 2).unbind(-1)
    device = next(
        (v.device for v in (angle, translate, scale, shear) if torch.is_tensor(v)), torch.device("cpu")
    )
    rot = torch.deg2rad(angle_)
    sx, sy = torch.deg2rad(shx), torch.deg2rad(shy)
    cos_sy, tan_sx = torch.cos(sy), torch.tan(sx)
    # Rotate-scale-shear R(a) S(s) SHy(sy) SHx(sx) without the scale, as torchvision.
    a = torch.cos(rot - sy) / cos_sy
    b = -(a * tan_sx + torch.sin(rot))
    c = torch.sin(rot - sy) / cos_sy
    d = torch.cos(rot) - c * tan_sx
    # Its inverse (det = 1) with scale, then the inverse translation (center at the origin).
    m0, m1, m3, m4 = d / scale_, -b / scale_, -c / scale_, a / scale_
    m2 = -m0 * tx - m1 * ty
    m5 = -m3 * tx - m4 * ty
    # Centered pixels (x in [-(w-1)/2, (w-1)/2]) are normalized coordinates times (w/2, h/2).
    theta = torch.stack(
        (
            torch.stack((m0, m1 * (height / width), m2 * (2.0 / width)), -1),
            torch.stack((m3 * (width / height), m4, m5 * (2.0 / height)), -1),
        ),
        dim=-2,
    )
    return theta.to(device)


def apply_affine(
    x: Tensor,
    angle: Tensor | float,
    translate: Tensor | Sequence[float],
    scale: Tensor | float,
    shear: Tensor | Sequence[float],
    *,
    interpolation: Interpolation = "nearest",
    fill: Fill | None = 0.0,
) -> Tensor:
    """Affine-transform each image of ``x`` (N, ..., H, W) with its own parameters.

    Parameters as :func:`affine_theta`. For one image this equals
    ``torchvision.transforms.v2.functional.affine(img, angle, [tx, ty], scale, [sx, sy],
    interpolation=..., fill=fill)`` (up to floating-point rounding of the sampling grid).
    ``fill=None`` is torchvision's ``fill=None`` (zero padding inside ``grid_sample``); a number,
    or one per channel, fills the outside, with bilinear blending at the border as torchvision
    does (``RandomAffine``'s default is ``fill=0``).
    """
    _check_images(x, "apply_affine")
    if interpolation not in ("nearest", "bilinear"):
        raise ValueError(f"interpolation must be 'nearest' or 'bilinear', got {interpolation!r}")
    n, height, width = x.shape[0], x.shape[-2], x.shape[-1]
    theta = affine_theta(angle, translate, scale, shear, height, width).to(device=x.device, dtype=x.dtype)
    if theta.shape[0] == 1 and n != 1:
        theta = theta.expand(n, 2, 3)
    if theta.shape[0] != n:
        raise ValueError(f"got {theta.shape[0]} sets of affine parameters for a batch of {n}")
    shape = x.shape
    img = x.reshape(n, -1, height, width)
    channels = img.shape[1]
    if fill is not None:
        img = torch.cat((img, torch.ones_like(img[:, :1])), dim=1)
    grid = F.affine_grid(theta, [n, img.shape[1], height, width], align_corners=False)
    out = F.grid_sample(img, grid, mode=interpolation, padding_mode="zeros", align_corners=False)
    if fill is not None:
        out, mask = out[:, :channels], out[:, channels:]
        f = _fill_tensor(fill, x)
        out = out.reshape(shape)
        mask = mask.reshape(n, *([1] * (x.dim() - 3)), height, width)
        if interpolation == "nearest":
            out = torch.where(mask < 0.5, f, out)
        else:
            out = (out - f) * mask + f
        return out
    return out.reshape(shape)


def affine_params(
    n: int,
    height: int,
    width: int,
    *,
    degrees: Tensor | float | None = None,
    translate: Tensor | float | None = None,
    scale: Tensor | float | None = None,
    shear: Tensor | float | None = None,
    round_translate: bool = True,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Draw per-example ``(angle (n,), translate (n, 2), scale (n,), shear (n, 2))``, as RandomAffine.

    Each range is a number or a tensor of shape (1,) or (n,) (``None``: that part is off):
    angle uniform in ``[-degrees, degrees]``; translation uniform in ``[-t W, t W]`` x
    ``[-t H, t H]`` pixels, rounded to whole pixels as torchvision does (unless
    ``round_translate=False``); scale uniform in ``[1 - s, 1 + s]``; x-shear uniform in
    ``[-sh, sh]`` degrees and no y-shear (torchvision's ``shear=sh``).
    """
    dtype = dtype or torch.get_default_dtype()

    def rng(v: Tensor | float) -> Tensor:
        t = torch.as_tensor(v).detach().to(device=device, dtype=dtype).reshape(-1)
        if t.numel() == 1:
            return t.expand(n)
        if t.numel() != n:
            raise ValueError(f"a range has {t.numel()} values for {n} examples")
        return t

    def uniform(width_: Tensor) -> Tensor:  # U(-width_, width_)
        return (2.0 * torch.rand(n, generator=generator, dtype=dtype, device=device) - 1.0) * width_

    zeros = torch.zeros(n, dtype=dtype, device=device)
    angle = uniform(rng(degrees)) if degrees is not None else zeros
    if translate is not None:
        t = rng(translate)
        tx, ty = uniform(t * width), uniform(t * height)
        if round_translate:
            tx, ty = tx.round(), ty.round()
        shift = torch.stack((tx, ty), -1)
    else:
        shift = torch.zeros(n, 2, dtype=dtype, device=device)
    factor = 1.0 + uniform(rng(scale)) if scale is not None else torch.ones_like(zeros)
    shear_x = uniform(rng(shear)) if shear is not None else zeros
    return angle, shift, factor, torch.stack((shear_x, torch.zeros_like(shear_x)), -1)


class RandomAffine(Augmentation):
    """Per-example random rotation, translation, scaling and shear with tuned ranges.

    Sub-hyperparameters (an HParam to change the range, ``None`` to leave the part out):
    ``degrees`` (default ``HParam(init=10, low=0, high=180)``; angle in ``[-d, d]``),
    ``translate`` (default ``HParam(init=0.1, low=0, high=0.5)``; a fraction of the width and
    height, rounded to whole pixels as torchvision), ``scale`` (default
    ``HParam(init=0.1, low=0, high=0.5)``; factor in ``[1 - s, 1 + s]``, so ``high < 1``) and
    ``shear`` (default ``HParam(init=5, low=0, high=45)``; x-shear in ``[-sh, sh]`` degrees,
    ``high < 90``). ``interpolation`` is ``"nearest"`` (torchvision's default) or ``"bilinear"``;
    ``fill`` as :func:`apply_affine`. Inputs are ``(N, ..., H, W)`` floating batches.
    """

    def __init__(
        self,
        degrees: HParam | None = HParam(init=10.0, low=0.0, high=180.0),
        translate: HParam | None = HParam(init=0.1, low=0.0, high=0.5),
        scale: HParam | None = HParam(init=0.1, low=0.0, high=0.5),
        shear: HParam | None = HParam(init=5.0, low=0.0, high=45.0),
        *,
        interpolation: Interpolation = "nearest",
        fill: Fill | None = 0.0,
        round_translate: bool = True,
    ) -> None:
        given = {"degrees": degrees, "translate": translate, "scale": scale, "shear": shear}
        limits = {"degrees": (math.inf, True), "translate": (1.0, True), "scale": (1.0, False),
                  "shear": (90.0, False)}
        self.specs: dict[str, HParam] = {}
        for name, value in given.items():
            spec = _spec(value, name, "RandomAffine")
            if spec is None:
                continue
            if spec.low < 0:
                raise SpecError(f"RandomAffine: {name}.low={spec.low} must be >= 0 (it is a range)")
            top, inclusive = limits[name]
            if spec.high > top or (spec.high == top and not inclusive):
                raise SpecError(
                    f"RandomAffine: {name}.high={spec.high} must be {'<=' if inclusive else '<'} {top}"
                )
            self.specs[name] = spec
        if not self.specs:
            raise SpecError("RandomAffine: every part is None; tune at least one")
        if interpolation not in ("nearest", "bilinear"):
            raise SpecError(f"RandomAffine: interpolation={interpolation!r} must be 'nearest' or 'bilinear'")
        if fill is not None:
            channel_values(fill, "fill", "RandomAffine")
        if isinstance(fill, Tensor):
            fill = fill.detach().cpu()
        self.interpolation = interpolation
        self.fill = fill
        self.round_translate = round_translate

    def hparams(self) -> dict[str, HParam]:
        return dict(self.specs)

    def apply(self, x: Tensor, values: Mapping[str, Tensor]) -> Tensor:
        _check_images(x, "RandomAffine")
        n = x.shape[0]
        ranges = {name: _per_example(values[name], n, x, f"RandomAffine {name}") for name in self.specs}
        angle, shift, factor, shear = affine_params(
            n, x.shape[-2], x.shape[-1], **ranges, round_translate=self.round_translate,
            dtype=x.dtype, device=x.device,
        )
        return apply_affine(x, angle, shift, factor, shear, interpolation=self.interpolation, fill=self.fill)

    def __repr__(self) -> str:
        subs = ", ".join(f"{k}={v}" for k, v in self.specs.items())
        return f"RandomAffine({subs}, interpolation={self.interpolation!r}, fill={self.fill})"
