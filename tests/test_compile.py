"""torch.compile: a compiled HyperModel runs train_step/val_step, matches eager bit for bit, has no
graph breaks, and moving λ or σ compiles nothing new.

The backends are eager and aot_eager (AOT autograd tracing, no code generation) to keep CPU CI
fast. aot_eager is the one on which a linearized forward *inside* a compiled graph silently lost
its forward-AD tangent (Θ trained on the wrong loss), which is why delta mode runs that one pass
eagerly; the delta test runs on it.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import hypertune as ht

pytestmark = pytest.mark.skipif(
    getattr(torch.compiler, "set_stance", None) is None, reason="needs torch >= 2.6"
)


class Counting:
    """A compile backend that counts the graphs it is handed, then hands them to ``inner``."""

    def __init__(self, inner: str = "aot_eager") -> None:
        self.inner = torch._dynamo.lookup_backend(inner)
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.inner(gm, example_inputs)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _build() -> ht.HyperModel:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))
    return ht.HyperModel.wrap(net, {"drop": ht.DropoutRate(init=0.2), "wd": ht.WeightDecay(init=1e-3)})


def _batches(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)) for _ in range(n)]


def _run(mode: str, backend=None, steps: int = 3):
    hm = _build()
    model = hm if backend is None else torch.compile(hm, backend=backend)
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(hm.parameters(), lr=0.05, momentum=0.9), mode=mode)
    torch.manual_seed(7)
    for x, y in _batches(steps):
        opt.train_step(x, y, F.cross_entropy)
        opt.val_step(x, y, F.cross_entropy)
    return hm, opt


@pytest.mark.parametrize(
    "mode,backend",
    [
        ("delta", "aot_eager"),
        ("centered", "eager"),
        pytest.param("stn", "eager", marks=pytest.mark.slow),
        pytest.param("centered", "aot_eager", marks=pytest.mark.slow),
    ],
)
def test_compiled_steps_match_eager_bit_for_bit(mode, backend):
    eager, _ = _run(mode, steps=2)
    compiled, opt = _run(mode, backend=Counting(backend), steps=2)
    for k, v in eager.state_dict().items():
        assert torch.equal(v, compiled.state_dict()[k]), k
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert opt.history.series("loss")[1]


def test_moving_lambda_and_sigma_compiles_nothing_new():
    backend = Counting("eager")
    hm, opt = _run("delta", backend=backend, steps=2)  # warm-up: the w₀-step and λ-step graphs
    graphs = backend.graphs
    assert 1 <= graphs <= 4
    with torch.no_grad():
        hm.hparams.unconstrained.add_(torch.tensor([0.7, -1.3]))
        hm.hparams.raw_scale.sub_(0.5)
    before = hm.hparams.values()
    for x, y in _batches(3, seed=2):
        opt.train_step(x, y, F.cross_entropy)
        opt.val_step(x, y, F.cross_entropy)
    assert hm.hparams.values() != before
    assert backend.graphs == graphs
    assert not counters["recompiles"] and not counters["graph_break"]


@pytest.mark.slow
def test_module_compile_in_place_is_handled():
    """``model.compile()`` compiles in place (no OptimizedModule): the Θ step still runs eagerly."""
    eager, _ = _run("delta", steps=2)
    hm = _build()
    hm.compile(backend=Counting("eager"))
    opt = ht.DeltaSTNOptimizer(hm, torch.optim.SGD(hm.parameters(), lr=0.05, momentum=0.9))
    torch.manual_seed(7)
    for x, y in _batches(2):
        opt.train_step(x, y, F.cross_entropy)
        opt.val_step(x, y, F.cross_entropy)
    for k, v in eager.state_dict().items():
        assert torch.equal(v, hm.state_dict()[k]), k


@pytest.mark.parametrize("mode", ["centered", "stn"])
def test_a_compiled_model_stops_compiling_after_its_first_perturbed_passes(mode):
    """The layout guide's first-pass flag is a bool: a pass count, which dynamo guards on,
    recompiled every perturbed pass until the recompile limit sent the model back to eager."""
    graphs = [0]
    inner = torch._dynamo.lookup_backend("eager")

    def counting(gm, example_inputs):
        graphs[0] += 1
        return inner(gm, example_inputs)

    torch._dynamo.reset()
    hm = _build()
    opt = ht.DeltaSTNOptimizer(
        torch.compile(hm, backend=counting), torch.optim.SGD(hm.parameters(), lr=0.05), mode=mode, response_every=1
    )
    seen = []
    for x, y in _batches(8):
        opt.train_step(x, y, F.cross_entropy)
        opt.val_step(x, y, F.cross_entropy)
        seen.append(graphs[0])
    assert seen[2:] == [seen[2]] * len(seen[2:]), seen


class _ReadsRate(nn.Module):
    """timm's attention pattern: the dropout's rate handed to SDPA as ``self.attn_drop.p``."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.attn_drop = nn.Dropout(0.1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, c // 2).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.head(o.transpose(1, 2).reshape(b, n, c).mean(1))


@pytest.mark.parametrize("mode", ["delta", "centered"])
def test_a_compiled_model_whose_attention_reads_a_tuned_rate_matches_eager(mode):
    """The rate used to be a float subclass carrying its site, which dynamo cannot build (a raw
    AssertionError). A pass with one rate now reads a plain float; the per-example interception
    builds its rates outside the graph (a graph break), and the run equals the eager one."""
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        torch._dynamo.reset()
        x, y = torch.randn(4, 5, 8), torch.randint(0, 3, (4,))
        hm = ht.HyperModel.wrap(_ReadsRate(), {"drop": ht.DropoutRate(init=0.1)})
        model = torch.compile(hm, backend="eager") if compiled else hm
        opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(hm.parameters(), lr=0.05), mode=mode, response_every=1)
        torch.manual_seed(1)
        for _ in range(3):
            assert math.isfinite(opt.train_step(x, y, F.cross_entropy).loss)
            assert opt.val_step(x, y, F.cross_entropy).updated
        assert hm.perturbed_per_batch is None
        runs.append([p.detach().clone() for p in hm.parameters()] + [hm.hparams.unconstrained.detach().clone()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
