"""DeltaSTNOptimizer(antithetic=True): Θ's perturbations in pairs ε, −ε (hypertune.optim.noise)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypertune as ht


def _model(seed: int = 0, perturb: str = "example") -> ht.HyperModel:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))
    specs = {"drop": ht.DropoutRate(init=0.2, perturb=perturb), "wd": ht.WeightDecay(init=1e-3, perturb=perturb)}
    return ht.HyperModel.wrap(net, specs)


def _batch(seed: int, n: int = 32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _spy(opt: ht.DeltaSTNOptimizer) -> list[torch.Tensor]:
    """Record every ε the Θ steps draw."""
    draws: list[torch.Tensor] = []
    draw = opt._noise.draw

    def recording(hp, rows):
        eps = draw(hp, rows)
        draws.append(eps.clone())
        return eps

    opt._noise.draw = recording
    return draws


@pytest.mark.parametrize("perturb", ["example", "batch"])
@pytest.mark.parametrize("mode", ["delta", "centered", "stn"])
def test_draws_come_in_exact_negated_pairs(mode, perturb):
    model = _model(perturb=perturb)
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05), mode=mode, antithetic=True, response_every=1)
    draws = _spy(opt)
    for k in range(6):
        opt.train_step(*_batch(k), F.cross_entropy)
    assert len(draws) == 6
    for a, b in zip(draws[0::2], draws[1::2]):
        assert torch.equal(b, -a)
    # each pair starts with a fresh draw
    assert not torch.equal(draws[2], -draws[1]) and not torch.equal(draws[2], draws[0])
    assert draws[0].shape == ((32, 2) if perturb == "example" else (1, 2))


def test_off_by_default_draws_are_independent():
    model = _model()
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05), response_every=1)
    draws = _spy(opt)
    for k in range(2):
        opt.train_step(*_batch(k), F.cross_entropy)
    assert not opt.antithetic and not torch.equal(draws[1], -draws[0])


def test_pairs_follow_theta_steps_and_a_new_batch_size_starts_a_new_pair():
    model = _model()
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05), antithetic=True, response_every=2)
    draws = _spy(opt)
    for k in range(4):  # Θ steps at train steps 0 and 2: one pair
        opt.train_step(*_batch(k), F.cross_entropy)
    assert len(draws) == 2 and torch.equal(draws[1], -draws[0])
    opt.train_step(*_batch(4, n=20), F.cross_entropy)  # first half of a pair
    opt.train_step(*_batch(5), F.cross_entropy)  # no Θ step
    opt.train_step(*_batch(6, n=12), F.cross_entropy)  # the pair's half has 20 rows: a fresh draw
    assert [d.shape[0] for d in draws[2:]] == [20, 12]
    opt.train_step(*_batch(7), F.cross_entropy)
    opt.train_step(*_batch(8, n=12), F.cross_entropy)
    assert torch.equal(draws[4], -draws[3])


def test_a_refused_step_leaves_the_pair_where_it_was():
    model = _model()
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05), antithetic=True, response_every=1)
    draws = _spy(opt)
    opt.train_step(*_batch(0), F.cross_entropy)
    pending = opt._noise.pending.clone()
    x, y = _batch(1)
    with pytest.raises(ht.NonFiniteLossError):
        opt.train_step(x * float("nan"), y, F.cross_entropy)
    assert torch.equal(opt._noise.pending, pending) and opt.train_steps == 1
    opt.train_step(x, y, F.cross_entropy)
    assert torch.equal(draws[-1], -draws[0])
    # skipped steps (nonfinite="skip") leave it too
    opt.nonfinite = "skip"
    opt.train_step(*_batch(2), F.cross_entropy)  # a new pair
    pending = opt._noise.pending.clone()
    r = opt.train_step(x * float("nan"), y, F.cross_entropy)
    assert r.skipped and torch.equal(opt._noise.pending, pending)


def test_state_dict_resumes_inside_a_pair_exactly():
    def build():
        model = _model(seed=3)
        return model, ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05), antithetic=True, response_every=1)

    model, opt = build()
    for k in range(3):  # ends on a pair's first half
        opt.train_step(*_batch(k), F.cross_entropy)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert saved_opt["noise"]["pending"] is not None
    model2, opt2 = build()
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    for m, o in ((model, opt), (model2, opt2)):
        torch.manual_seed(7)
        o.train_step(*_batch(3), F.cross_entropy)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_state_without_noise_loads_and_a_bad_one_is_refused():
    model = _model()
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05), antithetic=True, response_every=1)
    opt.train_step(*_batch(0), F.cross_entropy)
    state = opt.state_dict()
    older = {k: v for k, v in state.items() if k != "noise"}  # saved before antithetic draws existed
    opt.load_state_dict(older)
    assert opt._noise.pending is None
    bad = dict(state, noise={"antithetic": True, "pending": torch.full((32, 2), float("nan"))})
    with pytest.raises(ht.StateDictError, match="noise.pending"):
        opt.load_state_dict(bad)
    with pytest.raises(ht.StateDictError, match="noise.pending"):
        opt.load_state_dict(dict(state, noise={"pending": torch.zeros(32, 5)}))


def test_bad_argument_is_refused_and_the_optimizer_unchanged():
    model = _model()
    base = torch.optim.SGD(model.parameters(), lr=0.05)
    groups = len(base.param_groups)
    with pytest.raises(ht.HyperTuneError, match="antithetic='yes' must be True or False"):
        ht.DeltaSTNOptimizer(model, base, antithetic="yes")
    assert len(base.param_groups) == groups


@pytest.mark.parametrize("mode", ["delta", "centered"])
def test_pairs_cancel_the_training_gradient_term_of_thetas_gradient(mode):
    """Full batch, one ε per step, w₀ far from its optimum: Θ's gradient is dominated by the
    zero-mean term ε·∇L_train(w₀). Summed over an antithetic pair it cancels, so the pair's sum
    varies far less than the sum over two independent draws (w₀, Θ and λ held fixed)."""

    def pair_sums(antithetic: bool) -> torch.Tensor:
        torch.manual_seed(0)
        net = nn.Linear(5, 1, bias=False)
        nn.init.zeros_(net.weight)
        model = ht.HyperModel.wrap(net, {"wd": ht.WeightDecay(init=0.1, perturb="batch", init_scale=0.5)})
        grads: list[torch.Tensor] = []

        class Recording(torch.optim.SGD):  # Θ held (lr 0); records the gradient each step gets
            def step(self, closure=None):
                grads.append(torch.cat([p.grad.flatten() for g in self.param_groups for p in g["params"]]))
                return super().step(closure)

        frozen = Recording(model.response_parameters(), lr=0.0)
        opt = ht.DeltaSTNOptimizer(
            model, torch.optim.SGD(model.parameters(), lr=0.0), mode=mode, response_optimizer=frozen,
            antithetic=antithetic, response_every=1,
        )
        with torch.no_grad():  # a Θ away from its start, so every part of its gradient is non-zero
            for p in model.response_parameters():
                p.copy_(torch.linspace(0.1, 0.5, p.numel()).reshape(p.shape))
        g = torch.Generator().manual_seed(1)
        x = torch.randn(64, 5, generator=g)
        y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0], [1.0]]) + 0.1 * torch.randn(64, 1, generator=g)
        for _ in range(200):
            opt.train_step(x, y, F.mse_loss)
        g_all = torch.stack(grads)
        return g_all[0::2] + g_all[1::2]

    independent, paired = pair_sums(False), pair_sums(True)
    var_ind = independent.var(0).sum()
    var_pair = paired.var(0).sum()
    assert var_pair < 0.02 * var_ind
    # and the pairs keep the mean: the same expected gradient within the independent draws' error
    err = (var_ind / independent.shape[0]).sqrt()
    assert (paired.mean(0) - independent.mean(0)).norm() < 4 * err


def test_a_step_that_raised_does_not_leave_its_draw_behind():
    model = _model()
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05), antithetic=True, response_every=2)
    draws = _spy(opt)
    opt.train_step(*_batch(0), F.cross_entropy)  # Θ step: a pair's first half
    opt.train_step(*_batch(1), F.cross_entropy)

    def broken(out, y):
        if len(draws) == 2:  # inside the Θ part, after its draw
            raise RuntimeError("user's loss failed")
        return F.cross_entropy(out, y)

    with pytest.raises(RuntimeError, match="user's loss failed"):
        opt.train_step(*_batch(2), broken)
    opt.train_step(*_batch(2), F.cross_entropy)  # Θ step: completes the pair
    assert torch.equal(draws[-1], -draws[0])
    assert opt._noise.pending is None  # the pair is complete
