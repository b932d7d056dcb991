"""Augmentations: the deterministic parts against torchvision, the draws, batching, and wiring."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import hypertune as ht
from hypertune.augment import (
    ColorJitter,
    Cutout,
    RandomAffine,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    affine_params,
    apply_affine,
    apply_boxes,
    apply_jitter,
    cutout_boxes,
    jitter_factors,
    jitter_order,
)
from hypertune.errors import PerturbationError, SpecError
from hypertune.hyperparameters import HyperParameters

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 2e-6, torch.float64: 1e-12}


def _images(seed: int, n: int, c: int, h: int, w: int, dtype=torch.float32, ties: bool = False):
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct levels: equal channels, gray pixels, max == several channels
        return (torch.randint(0, 4, (n, c, h, w), generator=g) / 3).to(dtype)
    return torch.rand(n, c, h, w, generator=g, dtype=dtype)


def _all_augmentations():
    return [
        Cutout(),
        ColorJitter(),
        ColorJitter(order="fixed", mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3]),
        RandomAffine(),
        RandomAffine(interpolation="bilinear", fill=0.5),
    ]


def _values(aug, n: int, *, dtype=torch.float32, device="cpu", rows=None, seed=0):
    """Random legal values for every sub-hyperparameter: (rows,) each, rows = n by default."""
    g = torch.Generator().manual_seed(seed)
    rows = n if rows is None else rows
    out = {}
    for sub, spec in aug.hparams().items():
        v = spec.low + (spec.high - spec.low) * torch.rand(rows, generator=g, dtype=torch.float64)
        if spec.discrete:
            v = v.round()
        out[sub] = v.to(dtype=dtype, device=device)
    return out


# ---- cutout ---------------------------------------------------------------------------------
@given(
    n=st.integers(1, 3), c=st.sampled_from([1, 3]), h=st.integers(1, 12), w=st.integers(1, 12),
    k=st.integers(0, 4), seed=st.integers(0, 2**16), per_channel=st.booleans(),
)
def test_apply_boxes_matches_torchvision_erase(n, c, h, w, k, seed, per_channel):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, h, w, generator=g)
    i = torch.randint(0, h + 1, (n, k), generator=g)
    j = torch.randint(0, w + 1, (n, k), generator=g)
    bh = torch.minimum(torch.randint(0, h + 1, (n, k), generator=g), h - i)
    bw = torch.minimum(torch.randint(0, w + 1, (n, k), generator=g), w - j)
    boxes = torch.stack((i, j, bh, bw), -1)
    fill = torch.rand(c, generator=g).tolist() if per_channel else -1.5
    out = apply_boxes(x, boxes, fill)
    for e in range(n):
        ref = x[e]
        for (bi, bj, hh, ww) in boxes[e].tolist():
            ref = TF.erase(ref, bi, bj, hh, ww, torch.tensor(fill).view(-1, 1, 1))
        assert torch.equal(out[e], ref)


@given(
    h=st.integers(1, 16), w=st.integers(1, 16), max_holes=st.integers(0, 5), seed=st.integers(0, 2**16)
)
def test_cutout_boxes_are_clipped_squares(h, w, max_holes, seed):
    g = torch.Generator().manual_seed(seed)
    n = 16
    holes = torch.randint(0, max_holes + 1, (n,), generator=g).double()
    length = torch.randint(0, 20, (n,), generator=g).double()
    boxes = cutout_boxes(holes, length, h, w, max_holes, generator=g)
    assert boxes.shape == (n, max_holes, 4) and boxes.dtype == torch.long
    i, j, bh, bw = boxes.unbind(-1)
    assert (i >= 0).all() and (j >= 0).all() and (i + bh <= h).all() and (j + bw <= w).all()
    L = length.long().view(n, 1)
    assert (bh <= L).all() and (bw <= L).all()
    expected = torch.arange(max_holes).view(1, -1) < holes.long().view(n, 1)
    # The first holes[n] slots are used; an unclipped side of a used hole is exactly `length`.
    assert ((bh == L) | (i == 0) | (i + bh == h) | ~expected).all()
    assert ((bw == L) | (j == 0) | (j + bw == w) | ~expected).all()
    # Every used hole contains its center pixel, so is non-empty.
    used = (bh > 0) & (bw > 0)
    assert torch.equal(used, expected & (L > 0))


def test_cutout_centers_cover_the_image_uniformly():
    g = torch.Generator().manual_seed(0)
    n, h, w = 4000, 5, 7
    boxes = cutout_boxes(torch.ones(n), torch.ones(n), h, w, 1, generator=g)
    counts = torch.bincount((boxes[:, 0, 0] * w + boxes[:, 0, 1]), minlength=h * w).double()
    expected = n / (h * w)
    assert counts.min() > 0.6 * expected and counts.max() < 1.4 * expected
    # A side-4 square centered on pixel c covers c-2 .. c+1 (DeVries & Taylor's offsets).
    boxes = cutout_boxes(torch.ones(n), torch.full((n,), 4.0), 20, 20, 1, generator=g)
    i, j, bh, bw = boxes[:, 0].unbind(-1)
    assert i.min() == 0 and (i + bh).max() == 20 and bh.min() == 2 and bw.min() == 2


def test_cutout_per_example_values_and_broadcasting():
    torch.manual_seed(0)
    x = torch.rand(6, 2, 16, 16)
    aug = Cutout(fill=-1.0)
    holes = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 2.0])
    length = torch.tensor([5.0, 0.0, 3.0, 4.0, 1.0, 6.0])
    out = aug.apply(x, {"holes": holes, "length": length})
    erased = (out == -1.0).all(dim=1)  # every channel of a hole pixel
    assert torch.equal((out == -1.0).any(dim=1), erased)
    count = erased.sum(dim=(1, 2))
    assert count[0] == 0 and count[1] == 0  # no holes / zero length
    bound = (holes * length**2).long()
    assert (count <= bound).all() and (count[2:] > 0).all()
    assert torch.equal(out[~(out == -1.0)], x[~(out == -1.0)])
    # One value for the batch: every example gets its own random squares.
    out = aug.apply(x, {"holes": torch.tensor([1.0]), "length": torch.tensor([6.0])})
    masks = (out == -1.0).all(dim=1)
    assert (masks.sum(dim=(1, 2)) > 0).all()
    assert len({tuple(m.flatten().tolist()) for m in masks}) > 1


def test_cutout_non_integral_values_are_rounded_and_capped():
    torch.manual_seed(0)
    x = torch.rand(3, 1, 10, 10)
    out = Cutout(fill=-1.0).apply(x, {"holes": torch.tensor([9.0]), "length": torch.tensor([1.4])})
    # At most max_holes = 4 single pixels each.
    assert ((out == -1.0).sum(dim=(1, 2, 3)) <= 4).all()
    assert Cutout(holes=None).hparams().keys() == {"length"}


def test_cutout_discrete_values_stay_integral_and_in_bounds():
    aug = Cutout(holes=ht.HParam(init=2, low=0, high=5, discrete=True, init_scale=3.0))
    subs = {f"cutout:{k}": v for k, v in aug.hparams().items()}
    space = HyperParameters(subs)
    for _ in range(5):
        u = space.unconstrained.detach() + space.sample_noise(256) * 4
        for name, spec in subs.items():
            v = space.constrain(u, name)
            assert torch.equal(v, v.round())
            assert v.min() >= math.ceil(spec.low) and v.max() <= math.floor(spec.high)
            assert len(v.unique()) > 2


def test_cutout_spec_checks():
    with pytest.raises(SpecError, match="holes.high"):
        Cutout(holes=ht.HParam(init=1, low=0))
    with pytest.raises(SpecError, match="length"):
        Cutout(length=8)  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="length.low"):
        Cutout(length=ht.HParam(init=1, low=-2, high=4))


# ---- color jitter ---------------------------------------------------------------------------
ADJUST = [
    (adjust_brightness, TF.adjust_brightness, (0.0, 2.0)),
    (adjust_contrast, TF.adjust_contrast, (0.0, 2.0)),
    (adjust_saturation, TF.adjust_saturation, (0.0, 2.0)),
    (adjust_hue, TF.adjust_hue, (-0.5, 0.5)),
]


@pytest.mark.parametrize("ours,theirs,bounds", ADJUST, ids=["brightness", "contrast", "saturation", "hue"])
@given(
    c=st.sampled_from([1, 3]), dtype=st.sampled_from(DTYPES), h=st.integers(1, 9), w=st.integers(1, 9),
    ties=st.booleans(), seed=st.integers(0, 2**16),
)
def test_adjust_matches_torchvision(ours, theirs, bounds, c, dtype, h, w, ties, seed):
    n = 4
    x = _images(seed, n, c, h, w, dtype, ties)
    g = torch.Generator().manual_seed(seed + 1)
    f = bounds[0] + (bounds[1] - bounds[0]) * torch.rand(n, generator=g, dtype=dtype)
    f[0] = 1.0 if bounds[0] == 0 else 0.0  # the identity factor
    out = ours(x, f)
    assert out.dtype == dtype and out.shape == x.shape
    # torchvision's hue runs its HSV round trip in float32 even for float64 images.
    tol = 2e-6 if theirs is TF.adjust_hue else TOL[dtype]
    for e in range(n):
        torch.testing.assert_close(out[e], theirs(x[e], float(f[e])), atol=tol, rtol=0)


@settings(max_examples=8)
@given(dtype=st.sampled_from(DTYPES), ties=st.booleans(), seed=st.integers(0, 2**16))
def test_apply_jitter_matches_torchvision_in_each_examples_order(dtype, ties, seed):
    n = 5
    x = _images(seed, n, 3, 5, 6, dtype, ties)
    g = torch.Generator().manual_seed(seed)
    strengths = {"brightness": 0.5, "contrast": 0.8, "saturation": 1.0, "hue": 0.5}
    factors = jitter_factors(strengths, n, generator=g, dtype=dtype)
    order = jitter_order(n, generator=g)
    assert torch.equal(order.sort(dim=1).values, torch.arange(4).expand(n, 4))
    tv = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    names = ["brightness", "contrast", "saturation", "hue"]

    def reference(e, ops):
        ref = x[e]
        for k in ops:
            ref = tv[k](ref, float(factors[names[k]][e]))
        return ref

    out = apply_jitter(x, factors, order)
    fixed = apply_jitter(x, factors)
    shared = apply_jitter(x, factors, torch.tensor([3, 1, 0, 2]))
    partial = apply_jitter(x, {"contrast": factors["contrast"], "hue": None}, order)
    for e in range(n):
        torch.testing.assert_close(out[e], reference(e, order[e].tolist()), atol=4e-6, rtol=0)
        torch.testing.assert_close(fixed[e], reference(e, [0, 1, 2, 3]), atol=4e-6, rtol=0)
        torch.testing.assert_close(shared[e], reference(e, [3, 1, 0, 2]), atol=4e-6, rtol=0)
        torch.testing.assert_close(
            partial[e], TF.adjust_contrast(x[e], float(factors["contrast"][e])), atol=TOL[dtype], rtol=0
        )


def test_jitter_factors_ranges_and_per_example_strengths():
    g = torch.Generator().manual_seed(0)
    n = 2000
    s = torch.rand(n, generator=g) * 1.5
    hue = torch.rand(n, generator=g) * 0.5
    f = jitter_factors({"brightness": s, "contrast": s, "saturation": s, "hue": hue}, n, generator=g)
    for name in ("brightness", "contrast", "saturation"):
        assert ((f[name] >= (1 - s).clamp_min(0)) & (f[name] <= 1 + s)).all()
    assert (f["hue"].abs() <= hue).all()
    # Each row uses its own strength: zero strength gives the identity factor.
    z = jitter_factors({"brightness": torch.tensor([0.0, 0.9]), "hue": torch.tensor([0.0, 0.4])}, 2)
    assert z["brightness"][0] == 1 and z["hue"][0] == 0
    # One shared strength: factors still differ per example, and fill the whole range.
    one = jitter_factors({"contrast": torch.tensor([0.5])}, n, generator=g)["contrast"]
    assert one.min() < 0.52 and one.max() > 1.48 and len(one.unique()) > n // 2


@pytest.mark.parametrize("order", ["random", "fixed"])
def test_color_jitter_unnormalizes_applies_and_renormalizes(order):
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    aug = ColorJitter(order=order, mean=mean, std=std)
    raw = _images(0, 8, 3, 6, 6)
    m, sd = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    x = (raw - m) / sd
    values = _values(aug, 8)
    torch.manual_seed(5)
    out = aug.apply(x, values)
    torch.manual_seed(5)
    factors = jitter_factors(values, 8)
    ref = apply_jitter(raw, factors, jitter_order(8) if order == "random" else None)
    torch.testing.assert_close(out, (ref - m) / sd, atol=1e-5, rtol=0)


def test_color_jitter_grayscale_and_channel_checks():
    x = _images(0, 4, 1, 5, 5)
    aug = ColorJitter()
    with pytest.warns(UserWarning, match="1-channel"):
        out = aug.apply(x, _values(aug, 4))
    assert out.shape == x.shape and not torch.equal(out, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        aug.apply(x, _values(aug, 4))  # warns once
        gray = ColorJitter(saturation=None, hue=None)
        assert gray.hparams().keys() == {"brightness", "contrast"}
        gray.apply(x, _values(gray, 4))
    with pytest.raises(ValueError, match="1 .* or 3"):
        ColorJitter(saturation=None, hue=None).apply(
            torch.rand(2, 2, 4, 4), {"brightness": torch.ones(1), "contrast": torch.ones(1)}
        )
    with pytest.raises(SpecError, match="hue.high"):
        ColorJitter(hue=ht.HParam(init=0.3, low=0, high=0.6))
    with pytest.raises(SpecError, match="brightness.low"):
        ColorJitter(brightness=ht.HParam(init=0.3, low=-1, high=1))
    with pytest.raises(SpecError, match="both mean and std"):
        ColorJitter(mean=0.5)
    with pytest.raises(SpecError, match="at least one"):
        ColorJitter(None, None, None, None)


def test_color_jitter_per_example_strengths():
    x = _images(1, 4, 3, 6, 6)
    aug = ColorJitter(contrast=None, saturation=None, hue=None)
    out = aug.apply(x, {"brightness": torch.tensor([0.0, 0.0, 0.9, 0.9])})
    assert torch.equal(out[:2], x[:2])  # factor exactly 1 (values are in [0, 1])
    assert not torch.equal(out[2], x[2]) and not torch.equal(out[3], x[3])
    ratio = out[2:].sum(dim=(1, 2, 3)) / x[2:].sum(dim=(1, 2, 3))
    assert not torch.isclose(ratio[0], ratio[1])


# ---- affine ---------------------------------------------------------------------------------
@given(
    c=st.sampled_from([1, 3]), h=st.integers(2, 12), w=st.integers(2, 12), dtype=st.sampled_from(DTYPES),
    interpolation=st.sampled_from(["nearest", "bilinear"]),
    fill=st.sampled_from([None, 0.0, 0.7, "per-channel"]), seed=st.integers(0, 2**16),
)
def test_apply_affine_matches_torchvision(c, h, w, dtype, interpolation, fill, seed):
    n = 4
    x = _images(seed, n, c, h, w, dtype)
    g = torch.Generator().manual_seed(seed)
    if fill == "per-channel":
        fill = torch.rand(c, generator=g).tolist()
    angle = torch.rand(n, generator=g, dtype=dtype) * 360 - 180
    translate = torch.randn(n, 2, generator=g, dtype=dtype) * 3
    translate[0] = translate[0].round()
    scale = 0.5 + torch.rand(n, generator=g, dtype=dtype)
    shear = torch.rand(n, 2, generator=g, dtype=dtype) * 100 - 50
    out = apply_affine(x, angle, translate, scale, shear, interpolation=interpolation, fill=fill)
    assert out.shape == x.shape and out.dtype == dtype
    for e in range(n):
        ref = TF.affine(
            x[e], angle=float(angle[e]), translate=translate[e].tolist(), scale=float(scale[e]),
            shear=shear[e].tolist(), interpolation=TF.InterpolationMode(interpolation), fill=fill,
        )
        if interpolation == "nearest":
            # Exact but for a sample landing within rounding error of a pixel boundary.
            assert (out[e] != ref).any(dim=0).sum() <= 1
        else:
            torch.testing.assert_close(out[e], ref, atol=1e-5 if dtype == torch.float32 else 1e-10, rtol=0)


def test_affine_conventions_and_identity():
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 1, 4] = 1.0  # three pixels above the center (4, 4)
    where = lambda y: (y[0, 0] > 0.5).nonzero().tolist()  # noqa: E731
    assert where(apply_affine(x, 90.0, [0.0, 0.0], 1.0, [0.0, 0.0])) == [[4, 7]]  # clockwise as shown
    assert where(apply_affine(x, 0.0, [2.0, 1.0], 1.0, [0.0, 0.0])) == [[2, 6]]  # right 2, down 1
    assert where(apply_affine(x, 0.0, [0.0, 0.0], 1.0, [45.0, 0.0])) == where(
        TF.affine(x[0], 0.0, [0, 0], 1.0, [45.0, 0.0]).unsqueeze(0)
    )
    y = torch.rand(3, 2, 7, 5, dtype=torch.float64)
    assert torch.equal(apply_affine(y, 0.0, [0.0, 0.0], 1.0, [0.0, 0.0]), y)
    torch.testing.assert_close(
        apply_affine(y, 0.0, [0.0, 0.0], 1.0, [0.0, 0.0], interpolation="bilinear"), y, atol=1e-12, rtol=0
    )


def test_affine_params_ranges():
    g = torch.Generator().manual_seed(0)
    n, h, w = 3000, 10, 20
    d = torch.rand(n, generator=g) * 90
    t = torch.rand(n, generator=g) * 0.5
    s = torch.rand(n, generator=g) * 0.5
    sh = torch.rand(n, generator=g) * 30
    angle, shift, scale, shear = affine_params(
        n, h, w, degrees=d, translate=t, scale=s, shear=sh, generator=g
    )
    assert (angle.abs() <= d).all() and (shear[:, 0].abs() <= sh).all() and (shear[:, 1] == 0).all()
    assert ((scale >= 1 - s) & (scale <= 1 + s)).all()
    assert torch.equal(shift, shift.round())  # whole pixels, as torchvision
    assert (shift[:, 0].abs() <= (t * w).round()).all() and (shift[:, 1].abs() <= (t * h).round()).all()
    off = affine_params(n, h, w)
    assert not off[0].any() and not off[1].any() and (off[2] == 1).all() and not off[3].any()
    # One shared range: every example draws its own value, filling the range.
    angle = affine_params(n, h, w, degrees=torch.tensor([30.0]), generator=g)[0]
    assert angle.min() < -29 and angle.max() > 29
    frac = affine_params(n, h, w, translate=0.5, round_translate=False, generator=g)[1]
    assert not torch.equal(frac, frac.round())


def test_random_affine_per_example_values():
    x = _images(0, 4, 3, 8, 8)
    aug = RandomAffine(translate=None, scale=None, shear=None)
    out = aug.apply(x, {"degrees": torch.tensor([0.0, 0.0, 60.0, 60.0])})
    assert torch.equal(out[:2], x[:2])
    assert not torch.equal(out[2], x[2]) and not torch.equal(out[3], x[3])
    with pytest.raises(SpecError, match="scale.high"):
        RandomAffine(scale=ht.HParam(init=0.5, low=0, high=1))
    with pytest.raises(SpecError, match="shear.high"):
        RandomAffine(shear=ht.HParam(init=5, low=0, high=100))
    with pytest.raises(SpecError, match="interpolation"):
        RandomAffine(interpolation="bicubic")  # type: ignore[arg-type]


# ---- every augmentation ---------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("aug", _all_augmentations(), ids=lambda a: type(a).__name__)
def test_devices_dtypes_rows_and_no_gradient(aug, dtype, device):
    torch.manual_seed(0)
    n = 5
    x = torch.rand(n, 3, 12, 10, dtype=dtype, device=device)
    for rows in (1, n):
        values = _values(aug, n, dtype=dtype, device=device, rows=rows)
        out = aug.apply(x, values)
        assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
        assert torch.isfinite(out).all()
    # Values that carry a graph are fine; the output is not differentiated through them.
    values = {k: v.clone().requires_grad_() for k, v in _values(aug, n, dtype=dtype, device=device).items()}
    assert not aug.apply(x, values).requires_grad
    with torch.no_grad():
        aug.apply(x, values)
    with torch.inference_mode():
        aug.apply(x, _values(aug, n, dtype=dtype, device=device))
    with fwAD.dual_level():  # Δ-STN's Θ step runs the forward under forward-mode AD
        aug.apply(x, values)
    with pytest.raises(PerturbationError, match="one per example"):
        aug.apply(x, _values(aug, n, dtype=dtype, device=device, rows=n - 1))
    with pytest.raises(TypeError, match="floating-point"):
        aug.apply((x * 255).to(torch.uint8), _values(aug, n))


@pytest.mark.parametrize("aug", _all_augmentations(), ids=lambda a: type(a).__name__)
def test_per_example_draws_are_independent(aug):
    torch.manual_seed(0)
    x = _images(3, 1, 3, 12, 12).expand(8, -1, -1, -1).contiguous()  # the same image 8 times
    out = aug.apply(x, _values(aug, 8, rows=1, seed=4))
    assert len({tuple(o.flatten().tolist()) for o in out}) > 1


# ---- end to end -----------------------------------------------------------------------------
class _SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(4 * 13 * 13, 10)

    def forward(self, x):
        return self.fc(self.drop(F.relu(self.conv(x))).flatten(1))


@pytest.mark.parametrize("mode", ["delta", "centered", "stn"])
def test_end_to_end_augmentation_only_in_train_step(mode, monkeypatch):
    torch.manual_seed(0)
    model = ht.HyperModel.wrap(_SmallCNN(), hparams={"cutout": Cutout(), "dropout": ht.DropoutRate()})
    # A Θ step on every train step (the default takes one on every third), so each is checked.
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05), mode=mode, response_every=1)
    calls: list[dict[str, torch.Tensor]] = []
    original = Cutout.apply

    def spy(self, x, values):
        calls.append({k: v.detach().clone() for k, v in values.items()})
        return original(self, x, values)

    monkeypatch.setattr(Cutout, "apply", spy)
    seen: list[torch.Tensor] = []
    model.module.conv.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    g = torch.Generator().manual_seed(1)
    n = 16
    for step in range(3):
        x, y = torch.rand(n, 1, 28, 28, generator=g) + 0.1, torch.randint(0, 10, (n,), generator=g)
        calls.clear(), seen.clear()
        r = opt.train_step(x, y, F.cross_entropy)
        assert math.isfinite(r.loss) and {"cutout:holes", "cutout:length", "dropout"} <= set(r.hparams)
        assert len(calls) == (1 if mode == "stn" else 2)
        rows = [len(next(iter(c.values()))) for c in calls]
        assert rows == ([n] if mode == "stn" else [1, n])  # w₀ step at λ₀, Θ step per example
        for c in calls:
            for v in c.values():
                assert torch.equal(v, v.round()) and v.min() >= 0
            assert c["holes"].max() <= 4 and c["length"].max() <= 20
        # the first perturbed pass is preceded by a one-example probe of the batch's layout
        # (hypertune.rows.LayoutGuide), run in eval mode: it sees x[:1] unaugmented
        assert all(torch.equal(s, x[:1]) for s in seen if len(s) == 1)
        seen = [s for s in seen if len(s) == n]
        assert seen and any((s == 0).any() for s in seen)  # x >= 0.1: zeros are cutout holes
        assert all(torch.equal(s[s != 0], x[s != 0]) for s in seen)
        calls.clear(), seen.clear()
        v = opt.val_step(x, y, F.cross_entropy)
        assert math.isfinite(v.loss) and not calls
        assert seen and all(torch.equal(s, x) for s in seen)  # untouched in eval mode


def test_end_to_end_all_augmentations():
    torch.manual_seed(0)
    augs = {
        "affine": RandomAffine(),
        "color": ColorJitter(saturation=None, hue=None, mean=0.1307, std=0.3081),
        "cutout": Cutout(),
        "dropout": ht.DropoutRate(),
    }
    model = ht.HyperModel.wrap(_SmallCNN(), hparams=augs)
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05))
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        x, y = torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)
        assert math.isfinite(opt.train_step(x, y, F.cross_entropy).loss)
        assert math.isfinite(opt.val_step(x, y, F.cross_entropy).loss)
    names = set(model.hparam_values())
    assert {"affine:degrees", "affine:translate", "affine:scale", "affine:shear"} <= names
    assert {"color:brightness", "color:contrast", "cutout:holes", "cutout:length"} <= names
