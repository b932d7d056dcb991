"""The spec layer: every refusal is a SpecError naming the problem; transforms round-trip."""

from __future__ import annotations

import math

import pytest
import numpy as np
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st
from torch import nn

import hypertune
from hypertune import DropoutRate, HParam, HyperParameters, InputDropout, SpecError, WeightDecay
from hypertune.specs import validate_specs
from hypertune.transforms import (
    Identity,
    LogScaledSigmoid,
    ReflectedExp,
    ScaledSigmoid,
    ShiftedExp,
    transform_for,
)

INF = math.inf
NAN = math.nan


def refused(match: str, fn, *args, **kwargs) -> SpecError:
    """``fn`` raises a SpecError whose message contains every word of ``match`` (case-folded)."""
    with pytest.raises(SpecError) as info:
        fn(*args, **kwargs)
    msg = str(info.value).lower()
    for word in match.lower().split("|"):
        assert word in msg, f"{word!r} not in {str(info.value)!r}"
    # SpecError is catchable as the library's base error and as a ValueError
    assert isinstance(info.value, hypertune.HyperTuneError)
    assert isinstance(info.value, ValueError)
    return info.value


# ---- construction refusals ------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(init=0.5, low=1.0, high=1.0),
        dict(init=0.5, low=2.0, high=1.0),
        dict(init=0.0, low=INF, high=INF),
        dict(init=0.0, low=-INF, high=-INF),
        dict(init=0.0, low=INF, high=-INF),
    ],
)
def test_low_not_below_high(kwargs):
    refused("low=|must be below high", HParam, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(init=0.0, low=0.0, high=1.0),  # at low
        dict(init=1.0, low=0.0, high=1.0),  # at high
        dict(init=-0.5, low=0.0, high=1.0),  # below
        dict(init=3.0, low=0.0, high=1.0),  # above
        dict(init=0.0, low=0.0),  # at a one-sided lower bound
        dict(init=5.0, high=5.0),  # at a one-sided upper bound
    ],
)
def test_init_not_strictly_inside(kwargs):
    refused(f"init={kwargs['init']}|strictly inside", HParam, **kwargs)


@pytest.mark.parametrize("cls", [DropoutRate, InputDropout, WeightDecay])
def test_subclass_defaults_are_valid_and_inside(cls):
    spec = cls()
    assert spec.low < spec.init < spec.high
    assert math.isfinite(spec.unconstrained_init())


@pytest.mark.parametrize("cls", [DropoutRate, InputDropout])
@pytest.mark.parametrize("high", [1.0, 1.5, 2.0])
def test_dropout_high_at_least_one(cls, high):
    refused(f"{cls.__name__}|high={high}|< 1", cls, init=0.5, high=high)


@pytest.mark.parametrize("cls", [DropoutRate, InputDropout])
def test_dropout_init_at_or_above_one(cls):
    # init=1 with default high is refused by the bounds check already
    refused(f"{cls.__name__}|init=1", cls, init=1.0)


@pytest.mark.parametrize("cls", [DropoutRate, InputDropout, WeightDecay])
def test_negative_low(cls):
    refused(f"{cls.__name__}|low=-0.1|>= 0", cls, init=0.05, low=-0.1, high=0.5)


@pytest.mark.parametrize("label", ["init", "low", "high", "init_scale"])
def test_nan_anywhere(label):
    kwargs = dict(init=0.5, low=0.0, high=1.0, init_scale=1.0)
    kwargs[label] = NAN
    refused(f"{label}|nan", HParam, **kwargs)


@pytest.mark.parametrize("init", [INF, -INF])
def test_infinite_init(init):
    refused("init=|not finite", HParam, init=init)


@pytest.mark.parametrize("label", ["init", "low", "high", "init_scale"])
@pytest.mark.parametrize("bad", ["0.5", None, True, torch.tensor([0.5, 0.6]), [0.5], np.array([0.5, 0.6])])
def test_non_numbers(label, bad):
    kwargs = dict(init=0.5, low=0.0, high=1.0, init_scale=1.0)
    kwargs[label] = bad
    refused(f"{label} must be a number", HParam, **kwargs)


@pytest.mark.parametrize("scale", [0.0, -1.0, INF, -INF])
def test_bad_init_scale(scale):
    refused(f"init_scale={scale}|positive finite", HParam, init=0.5, init_scale=scale)


@pytest.mark.parametrize("perturb", ["examples", "Batch", "", None, 1])
def test_bad_perturb(perturb):
    refused(f"perturb={perturb!r}|'example' or 'batch'", HParam, init=0.5, perturb=perturb)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(init=0.5, low=0.0, high=1.0, log=True),  # low == 0
        dict(init=-0.5, low=-1.0, high=1.0, log=True),  # low < 0
        dict(init=2.0, low=1.0, log=True),  # high infinite
    ],
)
def test_log_needs_positive_finite_bounds(kwargs):
    refused("log=true|low > 0", HParam, **kwargs)


@pytest.mark.parametrize("kwargs", [dict(init=2.0, low=1.0), dict(init=2.0, high=3.0), dict(init=2.0)])
def test_discrete_needs_finite_bounds(kwargs):
    refused("discrete|finite", HParam, discrete=True, **kwargs)


@pytest.mark.parametrize("cls", [DropoutRate, WeightDecay])
@pytest.mark.parametrize("bad", [3, None, nn.Linear(1, 1), [["fc"]]])
def test_bad_target_entries(cls, bad):
    refused("targets must be", cls, targets=["fc", bad])


def test_targets_normalised_to_tuple():
    assert DropoutRate(targets="drop").targets == ("drop",)
    assert DropoutRate(targets=nn.Dropout).targets == (nn.Dropout,)
    assert WeightDecay(targets=["a", nn.Linear]).targets == ("a", nn.Linear)
    assert DropoutRate().targets is None


def test_specs_are_frozen():
    spec = DropoutRate()
    with pytest.raises(Exception):
        spec.init = 0.5  # type: ignore[misc]


# ---- the hparams mapping --------------------------------------------------------------------


def test_duplicate_names_in_pairs():
    err = refused(
        "duplicate|'a'|'b'",
        validate_specs,
        [("a", HParam(init=0.0)), ("b", WeightDecay()), ("a", DropoutRate()), ("b", HParam(init=1.0))],
    )
    assert "'c'" not in str(err)


def test_pairs_are_accepted():
    specs = validate_specs([("a", HParam(init=0.0)), ("wd", WeightDecay())])
    assert list(specs) == ["a", "wd"]


@pytest.mark.parametrize("empty", [{}, [], ()])
def test_empty_hparams(empty):
    refused("empty", validate_specs, empty)


@pytest.mark.parametrize("bad", [None, 3, "dropout", DropoutRate(), [("a", HParam(init=0.0), 1)], [["a", HParam(init=0.0)]]])
def test_hparams_not_a_mapping(bad):
    refused("mapping", validate_specs, bad)


@pytest.mark.parametrize("value", [0.1, "0.1", None, DropoutRate, nn.Dropout(), {"init": 0.1}])
def test_non_spec_values(value):
    refused("hparams['x']|use a spec", validate_specs, {"x": value})


@pytest.mark.parametrize("name", ["", "a:b", "a.b", ".", ":", 3, None, ("a",)])
def test_bad_names(name):
    refused(f"{name!r}|non-empty string", validate_specs, {name: HParam(init=0.0)})


def test_two_input_dropouts():
    refused("only one inputdropout|'a'|'b'", validate_specs, {"a": InputDropout(), "b": InputDropout()})


def test_wrap_runs_spec_validation_first():
    model = nn.Sequential(nn.Linear(2, 2))
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(SpecError, match="empty"):
        hypertune.HyperModel.wrap(model, {})
    with pytest.raises(SpecError, match="duplicate"):
        hypertune.HyperModel.wrap(model, [("a", HParam(init=0.0)), ("a", HParam(init=1.0))])
    assert type(model[0]) is nn.Linear
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ---- transforms -----------------------------------------------------------------------------


@st.composite
def bounded_specs(draw):
    """(low, high, log, init) with moderate magnitudes: both-finite, one-sided or unbounded."""
    kind = draw(st.sampled_from(["both", "both_log", "low", "high", "none"]))
    frac = draw(st.floats(0.02, 0.98))
    if kind in ("both", "both_log"):
        if kind == "both_log":
            low = draw(st.floats(1e-6, 1e3))
            high = low * draw(st.floats(1.5, 1e4))
        else:
            low = draw(st.floats(-1e3, 1e3))
            high = low + draw(st.floats(1e-2, 1e3))
        init = low + frac * (high - low)
        assume(low < init < high)
        return low, high, kind == "both_log", init
    offset = draw(st.floats(1e-3, 1e3))
    if kind == "low":
        low = draw(st.floats(-1e3, 1e3))
        return low, INF, False, low + offset
    if kind == "high":
        high = draw(st.floats(-1e3, 1e3))
        return -INF, high, False, high - offset
    return -INF, INF, False, draw(st.floats(-1e3, 1e3))


@given(bounded_specs())
@example((0.0, 0.95, False, 0.05))
@example((1e-5, 1.0, True, 1e-4))
@example((0.0, INF, False, 1e-4))
def test_transform_round_trip(spec_args):
    low, high, log, init = spec_args
    spec = HParam(init=init, low=low, high=high, log=log)
    t = spec.transform
    u = spec.unconstrained_init()
    assert math.isfinite(u)
    back = t.forward(torch.tensor(u, dtype=torch.float64)).item()
    assert back == pytest.approx(init, rel=1e-9, abs=1e-9 * max(1.0, abs(high - low) if math.isfinite(high - low) else 1.0))


@given(bounded_specs(), st.lists(st.floats(-30.0, 30.0), min_size=1, max_size=20))
def test_transform_image_within_bounds(spec_args, us):
    low, high, log, _ = spec_args
    t = transform_for(low, high, log)
    v = t.forward(torch.tensor(us, dtype=torch.float64))
    assert torch.isfinite(v).all()
    assert (v >= low).all() and (v <= high).all(), (low, high, v)


@given(bounded_specs())
def test_hyperparameters_values_start_at_init(spec_args):
    low, high, log, init = spec_args
    hp = HyperParameters({"a": HParam(init=init, low=low, high=high, log=log)}, dtype=torch.float64)
    assert hp.values()["a"] == pytest.approx(init, rel=1e-9, abs=1e-9)


@given(st.floats(0.001, 0.999), st.floats(0.0, 0.5), st.floats(0.501, 0.99))
def test_dropout_rate_round_trip_in_float32(frac, low, high):
    init = low + frac * (high - low)
    assume(low < init < high)
    hp = HyperParameters({"d": DropoutRate(init=init, low=low, high=high)})
    value = hp.values()["d"]
    assert value == pytest.approx(init, abs=1e-6)
    assert low <= value <= high


def test_transform_kinds():
    assert isinstance(transform_for(0.0, 1.0, False), ScaledSigmoid)
    assert isinstance(transform_for(0.1, 1.0, True), LogScaledSigmoid)
    assert isinstance(transform_for(0.0, INF, False), ShiftedExp)
    assert isinstance(transform_for(-INF, 0.0, False), ReflectedExp)
    assert isinstance(transform_for(-INF, INF, False), Identity)
    # WeightDecay moves by factors: its tuning scale is the log of the coefficient
    assert isinstance(WeightDecay().transform, ShiftedExp)


def test_log_scale_moves_by_factors():
    t = LogScaledSigmoid(1e-4, 1e2)
    u = torch.linspace(-3, 3, 7, dtype=torch.float64)
    v = t.forward(u)
    # equal steps in u map to equal steps in log(value) near the middle only through the sigmoid;
    # the log-value is an affine map of sigmoid(u)
    expect = math.log(1e-4) + (math.log(1e2) - math.log(1e-4)) * torch.sigmoid(u)
    torch.testing.assert_close(torch.log(v), expect, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "spec",
    [
        # init strictly inside by one ulp: (init - low) / (high - low) rounds to exactly 1.0
        lambda: HParam(init=math.nextafter(1.0, 0.0), low=-1.0, high=1.0),
        # high - low overflows to inf, so the position in the interval is 0
        lambda: HParam(init=0.0, low=-1e308, high=1e308),
    ],
    ids=["init-one-ulp-below-high", "range-overflows"],
)
def test_accepted_spec_has_finite_tuning_value(spec):
    """A spec is refused with SpecError at construction, or it has a finite λ₀: never a bare
    ValueError later from HyperParameters / HyperModel.wrap."""
    try:
        s = spec()
    except SpecError:
        return
    u = s.unconstrained_init()  # currently: ValueError('math domain error')
    assert math.isfinite(u)


# ---- discrete values ------------------------------------------------------------------------


@st.composite
def discrete_bounds(draw):
    low = draw(st.floats(-20.0, 20.0))
    high = low + draw(st.floats(0.05, 10.0))
    init = low + draw(st.floats(0.01, 0.99)) * (high - low)
    assume(low < init < high)
    return low, high, init


@given(discrete_bounds(), st.lists(st.floats(-40.0, 40.0), min_size=1, max_size=16))
@example((0.5, 0.7, 0.6), [0.0])  # no integer inside the bounds
@example((-0.5, 2.5, 1.0), [-40.0, 0.0, 40.0])
@example((1.0, 1.5, 1.2), [-40.0, 40.0])
def test_discrete_values_are_integral_and_within_bounds(bounds, us):
    low, high, init = bounds
    has_integer = math.ceil(low) <= math.floor(high)
    if not has_integer:
        # A discrete range with no integer in it cannot hold any value: refuse it.
        with pytest.raises(SpecError):
            HParam(init=init, low=low, high=high, discrete=True)
        return
    spec = HParam(init=init, low=low, high=high, discrete=True)
    hp = HyperParameters({"n": spec}, dtype=torch.float64)
    u = torch.tensor(us, dtype=torch.float64).unsqueeze(1)
    v = hp.constrain(u, "n")
    assert v.shape == (len(us),)
    assert torch.equal(v, torch.round(v))
    assert (v >= low).all() and (v <= high).all(), (low, high, v)
    start = hp.values()["n"]
    assert start == round(start) and low <= start <= high


def test_discrete_value_is_nearest_integer_to_init():
    hp = HyperParameters({"n": HParam(init=3.2, low=0.5, high=10.5, discrete=True)}, dtype=torch.float64)
    assert hp.values()["n"] == 3.0


def test_constrain_unknown_name():
    hp = HyperParameters({"a": HParam(init=0.0)})
    with pytest.raises(KeyError, match="'b'.*'a'"):
        hp.constrain(torch.zeros(1, 1), "b")


def test_batch_perturb_shares_noise_down_the_batch():
    torch.manual_seed(0)
    hp = HyperParameters(
        {"e": HParam(init=0.0), "b": HParam(init=0.0, perturb="batch"), "e2": WeightDecay()}
    )
    z = hp.sample_noise(7)
    assert z.shape == (7, 3)
    assert torch.equal(z[:, 1], z[:1, 1].expand(7))
    assert not torch.equal(z[:, 0], z[:1, 0].expand(7))
    assert not torch.equal(z[:, 2], z[:1, 2].expand(7))


def test_init_scale_sets_sigma():
    hp = HyperParameters({"a": HParam(init=0.0, init_scale=0.3), "b": DropoutRate(init_scale=2.5)})
    scales = hp.scales()
    assert scales["a"] == pytest.approx(0.3, rel=1e-5)
    assert scales["b"] == pytest.approx(2.5, rel=1e-5)


def test_dropout_kinds_default_to_the_rate_sigma0():
    """Every dropout-type rate starts at σ₀ = RATE_INIT_SCALE on its logit scale; other kinds at 1."""
    from hypertune.kinds.dropout import RATE_INIT_SCALE

    rates = [DropoutRate(), InputDropout(), hypertune.DropConnect(), hypertune.EmbeddingDropout(),
             hypertune.VariationalDropout(), hypertune.DropPathRate()]
    assert RATE_INIT_SCALE == 2.0
    assert [spec.init_scale for spec in rates] == [RATE_INIT_SCALE] * len(rates)
    assert WeightDecay().init_scale == 1.0 and HParam(init=0.0).init_scale == 1.0
    hp = HyperParameters({"rate": DropoutRate(), "wd": WeightDecay()})
    assert hp.scales()["rate"] == pytest.approx(RATE_INIT_SCALE, rel=1e-5)
    assert hp.scales()["wd"] == pytest.approx(1.0, rel=1e-5)
    # positional order is unchanged: (init, low, high, init_scale)
    assert DropoutRate(0.1, 0.0, 0.9, 0.5).init_scale == 0.5
