"""DDP: two CPU ranks on gloo, spawned from the test. One spawn runs every multi-rank check
(starting processes and DDP costs most of the time on 2 cores).

Equivalence with one process over the global batch: the model has no dropout, and the
perturbations ε are made deterministic and identical (``SharedNoise`` draws ε for the *global*
batch from a per-call seed and each rank takes its slice), so the only difference left is the
order of floating-point sums; float64 keeps that at ~1e-16 relative.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import hypertune as ht
from hypertune import checkpoint as htc
from hypertune import distributed as htd
from hypertune.linearize import linearized_call
from hypertune.optim.steps import no_grad_for as _no_grad_for

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")

WORLD = 2
GLOBAL_BATCH = 16
STEPS = 3
MODES = ("delta", "centered", "stn")


class SharedNoise:
    """ε for the global batch from a per-call seed; rank r takes rows [r·n, (r+1)·n)."""

    def __init__(self, hp: ht.HyperParameters, rank: int, world: int) -> None:
        self.hp, self.rank, self.world, self.calls = hp, rank, world, 0

    def __call__(self, rows: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(10_000 + self.calls)
        self.calls += 1
        z = torch.randn(rows * self.world, len(self.hp), generator=g, dtype=self.hp.unconstrained.dtype)
        return z[self.rank * rows : (self.rank + 1) * rows] * self.hp.scale


def _build(seed: int) -> ht.HyperModel:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    return ht.HyperModel.wrap(
        net,
        {
            "wd0": ht.WeightDecay(init=1e-2, targets=["0"]),
            "wd2": ht.WeightDecay(init=1e-2, targets=["2"], init_scale=0.5),
        },
    )


def _batch(step: int, rank: int, world: int, kind: str):
    g = torch.Generator().manual_seed(step * 2 + (kind == "val"))
    x = torch.randn(GLOBAL_BATCH, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)
    n = GLOBAL_BATCH // world
    return x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]


def _train(model: nn.Module, hm: ht.HyperModel, mode: str, rank: int, world: int, **kw):
    hm.hparams.sample_noise = SharedNoise(hm.hparams, rank, world)
    # σ tuned and a Θ step on every train step (the defaults hold σ and step Θ on every third), so
    # the averaging of every hyper-state gradient is exercised within the few steps.
    kw = {"tune_scales": True, "response_every": 1, **kw}
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(hm.parameters(), lr=0.1, momentum=0.9), mode=mode, **kw)
    for step in range(STEPS):
        opt.train_step(*_batch(step, rank, world, "train"), F.cross_entropy)
        opt.val_step(*_batch(step, rank, world, "val"), F.cross_entropy)
    return opt


def _state(hm: ht.HyperModel, opt: ht.DeltaSTNOptimizer) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.detach().clone() for k, v in hm.state_dict().items()}
    for name in ("optimizer", "response_optimizer", "hyper_optimizer"):
        for i, st in getattr(opt, name).state_dict()["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    out[f"{name}.{i}.{k}"] = v.detach().clone()
    return out


def _raises(exc: type[BaseException], match: str, fn, *args, **kwargs) -> None:
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


# ---- the spawned ranks -------------------------------------------------------------------------
def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        _wrong_orders(rank, world)
        _forward_ad_through_ddp(rank)
        results = {}
        for mode in MODES:
            hm = _build(seed=rank)  # different w₀ and Θ per rank: DDP and the optimizer broadcast
            with torch.no_grad():
                hm.hparams.unconstrained.add_(0.1 * rank)  # λ too
            opt = _train(htd.prepare_ddp(hm), hm, mode, rank, world)
            results[mode] = _state(hm, opt)
            if mode == "delta":
                _checkpoint_round_trip(hm, opt, rank, world, out)
        hm = _build(seed=rank)
        opt = _train(htd.prepare_ddp(hm, find_unused_parameters=True), hm, "delta", rank, world)
        results["find_unused"] = _state(hm, opt)
        _antithetic_round_trip(rank, world, out)
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        # Both ranks done before either tears down: a rank destroying its gloo group while the
        # other's last collective is still in flight aborted once ("terminate called without an
        # active exception", SIGABRT) in a CI run.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _wrong_orders(rank: int, world: int) -> None:
    # Wrapping a model already inside DDP.
    plain = nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.1), nn.Linear(4, 3))
    _raises(ht.WrapError, "wrap on the plain module first", ht.HyperModel.wrap,
            nn.parallel.DistributedDataParallel(plain), {"drop": ht.DropoutRate()})
    # DDP built without keeping Θ, λ, σ out of its buckets.
    hm = _build(0)
    raw = nn.parallel.DistributedDataParallel(hm)
    _raises(ht.HyperTuneError, "prepare_ddp", ht.DeltaSTNOptimizer, raw, torch.optim.SGD(hm.parameters(), lr=0.1))
    # The optimizer given the inner HyperModel of a DDP run: at construction ...
    hm = _build(0)
    early = ht.DeltaSTNOptimizer(hm, torch.optim.SGD(hm.parameters(), lr=0.1))  # before DDP: not yet known
    ddp = htd.prepare_ddp(hm)
    _raises(ht.HyperTuneError, "from the DDP module", ht.DeltaSTNOptimizer, hm, torch.optim.SGD(hm.parameters(), lr=0.1))
    # ... or, built before DDP, at its first step; nothing is changed.
    before = {k: v.clone() for k, v in hm.state_dict().items()}
    _raises(ht.HyperTuneError, "from the DDP module", early.train_step, *_batch(0, rank, world, "train"), F.cross_entropy)
    _raises(ht.HyperTuneError, "from the DDP module", early.val_step, *_batch(0, rank, world, "val"), F.cross_entropy)
    assert all(torch.equal(before[k], v) for k, v in hm.state_dict().items())
    # Preparing a DDP module again.
    _raises(ht.HyperTuneError, "already inside DistributedDataParallel", htd.prepare_ddp, ddp)


def _forward_ad_through_ddp(rank: int) -> None:
    """Δ-STN's linearized forward through DDP's forward: same output and Θ gradient as the inner module."""
    hm = _build(0)
    with torch.no_grad():
        for layer in hm.hyper_layers().values():
            layer.hyper_projection.weight.normal_()
    ddp = htd.prepare_ddp(hm)
    hp = hm.hparams
    x = _batch(0, rank, WORLD, "train")[0]
    eps = torch.randn(x.shape[0], len(hp), dtype=x.dtype)
    point = ht.Perturbation(hp, hp.unconstrained.detach() + eps, eps, linearize=True)
    outs, grads = [], []
    for module in (ddp, hm):
        with _no_grad_for(hm.base_parameters() + hm.hyper_parameters()), hm.evaluated_at(point):
            out = linearized_call(lambda: module(x))
        assert torch.is_tensor(out) and not torch.equal(out, hm(x))  # the tangent arrived
        theta = hm.response_parameters()
        grads.append(torch.autograd.grad(out.square().sum(), theta))
        outs.append(out.detach())
    assert torch.equal(outs[0], outs[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def _checkpoint_round_trip(hm, opt, rank: int, world: int, out: str) -> None:
    path = os.path.join(out, "ddp.ckpt")
    rng = torch.get_rng_state()
    htc.save(path, model=opt.model, optimizer=opt, extra={"step": STEPS})
    torch.manual_seed(1234 + rank)  # move the RNG on; load must bring each rank's own back
    fresh = _build(seed=99)
    fresh_opt = ht.DeltaSTNOptimizer(htd.prepare_ddp(fresh), torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9),
                                     tune_scales=opt.tune_scales)  # built as the saved run was
    extra = htc.load(path, model=fresh_opt.model, optimizer=fresh_opt)
    assert extra == {"step": STEPS}
    assert torch.equal(torch.get_rng_state(), rng)
    a, b = _state(hm, opt), _state(fresh, fresh_opt)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert fresh_opt.train_steps == STEPS


def _antithetic_round_trip(rank: int, world: int, out: str) -> None:
    """Each rank draws its own ε, so each waits on its own pair's second half: a checkpoint must
    give every rank its own back (it used to give every rank rank 0's)."""
    hm = _build(seed=rank)
    opt = _train(htd.prepare_ddp(hm), hm, "delta", rank, world, antithetic=True)
    mine = opt._noise.pending
    assert mine is not None  # three Θ steps: a pair's first half waits
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine)
    assert not torch.equal(everyone[0], everyone[1])  # the ranks' halves differ
    path = os.path.join(out, "antithetic.ckpt")
    htc.save(path, model=opt.model, optimizer=opt)
    fresh = _build(seed=99)
    fresh_opt = ht.DeltaSTNOptimizer(
        htd.prepare_ddp(fresh), torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9),
        tune_scales=True, response_every=1, antithetic=True,
    )
    htc.load(path, model=fresh_opt.model, optimizer=fresh_opt)
    assert torch.equal(fresh_opt._noise.pending, mine)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, args: tuple, timeout: float = 240.0) -> None:
    ctx = mp.start_processes(fn, args=args, nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the DDP ranks did not finish in {timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()


@pytest.fixture(scope="module")
def ranks():
    """Run every multi-rank check once; return each rank's final states."""
    with tempfile.TemporaryDirectory() as out:
        _spawn(_worker, (WORLD, _free_port(), out))
        yield [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(WORLD)]


# ---- tests ---------------------------------------------------------------------------------------
def test_ddp_ranks_hold_bit_identical_state(ranks):
    """After the steps, λ, σ, w₀, Θ and every optimizer state are the same bits on every rank,
    although each rank started from its own random w₀, Θ and a shifted λ."""
    for key in (*MODES, "find_unused"):
        a, b = ranks[0][key], ranks[1][key]
        assert a.keys() == b.keys()
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differ, (key, differ)


@pytest.mark.parametrize("mode", MODES)
def test_ddp_matches_one_process_over_the_global_batch(ranks, mode):
    hm = _build(seed=0)
    opt = _train(hm, hm, mode, rank=0, world=1)
    single, ddp = _state(hm, opt), ranks[0][mode]
    assert single.keys() == ddp.keys()
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-9, atol=1e-12, msg=k)
    # The run is not trivial: λ, σ and Θ all moved.
    start = _build(seed=0).state_dict()
    for k in ("hparams.unconstrained", "hparams.raw_scale", "module.0.response_weight"):
        assert not torch.equal(start[k], single[f"model.{k}"].to(start[k].dtype)), k


def test_prepare_ddp_needs_a_process_group():
    if dist.is_initialized():  # pragma: no cover
        pytest.skip("a process group is already up in this process")
    with pytest.raises(ht.HyperTuneError, match="init_process_group"):
        htd.prepare_ddp(_build(0))


def test_ignore_hyperstate_names_theta_lambda_sigma():
    hm = _build(0)
    names = htd.ignore_hyperstate(hm)
    assert set(names) == {n for n, p in hm.named_parameters() if any(p is q for q in hm.response_parameters() + hm.hyper_parameters())}
    assert "hparams.unconstrained" in names and "module.0.weight" not in names
    assert htd.ignore_hyperstate(hm) == names and hm._ddp_params_and_buffers_to_ignore == names


# ---- wrapping order (one process) ------------------------------------------------------------------
def test_optimizer_built_before_wrapping_is_fine():
    """Wrapping keeps the Parameter objects, so an optimizer built from the plain model holds
    exactly w₀: indistinguishable from one built from model.base_parameters(), and it trains the same."""
    results = []
    for before in (True, False):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 3))
        early = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9) if before else None
        hm = ht.HyperModel.wrap(net, {"drop": ht.DropoutRate(), "wd": ht.WeightDecay()})
        base = early if before else torch.optim.SGD(hm.parameters(), lr=0.1, momentum=0.9)
        opt = ht.DeltaSTNOptimizer(hm, base)
        assert {id(p) for g in opt.optimizer.param_groups for p in g["params"]} == {id(p) for p in hm.base_parameters()}
        torch.manual_seed(1)
        for _ in range(2):
            opt.train_step(torch.randn(8, 5), torch.randint(0, 3, (8,)), F.cross_entropy)
        results.append(hm.state_dict())
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


@pytest.mark.parametrize("wrapper", ["DataParallel", "FullyShardedDataParallel"])
def test_unsupported_parallel_wrappers_are_refused(wrapper):
    hm = _build(0)
    if wrapper == "DataParallel":
        outer = nn.DataParallel(hm)  # without GPUs it just holds the module
    else:  # FSDP needs a process group and GPUs: a stand-in of the same name
        outer = type(wrapper, (nn.Module,), {})()
        outer.module = hm
    with pytest.raises(ht.HyperTuneError, match=f"{wrapper} is not supported.*prepare_ddp"):
        ht.DeltaSTNOptimizer(outer, torch.optim.SGD(hm.parameters(), lr=0.1))


@pytest.mark.slow
def test_torchrun_example_runs_and_resumes_exactly(tmp_path):
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "..", "examples", "ddp_train.py")
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}", script, "--steps", "40", "--log-every", "100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def final(*extra: str) -> str:
        out = subprocess.run(base + list(extra), env=env, capture_output=True, text=True, timeout=300, check=True)
        return next(line for line in out.stdout.splitlines() if line.startswith("done:")).split("final ")[1]

    straight = final()
    ckpt = str(tmp_path / "run.pt")
    final("--checkpoint", ckpt, "--stop-after", "20")
    assert final("--checkpoint", ckpt) == straight
