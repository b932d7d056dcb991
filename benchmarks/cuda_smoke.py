"""CUDA checks of the library paths that CPU tests cannot reach; run by benchmarks/cuda_checks.sh.

No GPU has been lent to this project yet, so this script has never run on one: treat a failure
here as the first CUDA bug report, not as a broken check. Each check prints one line, PASS or
FAIL with the reason, and the script exits non-zero if any failed.

    python benchmarks/cuda_smoke.py [--device cuda] [--json out.json]

Checks, on SimpleCNN (the FashionMNIST model) at the library defaults:
- eval of the wrapped model at δλ = 0 equals the plain model's, exactly;
- fp32 Δ-STN steps: λ moves, every value stays finite;
- bf16 autocast (``autocast=torch.bfloat16``) and fp16 with ``torch.amp.GradScaler``: steps
  stay finite;
- ``torch.compile`` of the wrapped model: with ``aot_eager`` three steps equal eager's bit for
  bit; with inductor (its own random stream) steps run without graph breaks and stay finite;
- a Δ-STN train step's tangent path on CUDA matches the CPU result within 1e-4.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hypertune as ht  # noqa: E402
from hypertune.experiments import SimpleCNN  # noqa: E402


def _hparams() -> dict[str, ht.HParam]:
    return {"dropout": ht.DropoutRate(per_site=True), "cutout": ht.Cutout(), "wd": ht.WeightDecay(init=5e-4)}


def _batch(device: torch.device, n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g).to(device), torch.randint(0, 10, (n,), generator=g).to(device)


def _tuned(device: torch.device, **options) -> tuple[ht.HyperModel, ht.DeltaSTNOptimizer]:
    torch.manual_seed(0)
    model = ht.HyperModel.wrap(SimpleCNN(), _hparams()).to(device)
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), **options)
    return model, opt


def _finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def check_eval_equals_plain(device: torch.device) -> str:
    torch.manual_seed(0)
    plain = SimpleCNN().to(device).eval()
    model = ht.HyperModel.wrap(copy.deepcopy(plain), _hparams()).to(device).eval()
    x, _ = _batch(device)
    with torch.no_grad():
        if not torch.equal(plain(x), model(x)):
            raise AssertionError("wrapped eval output differs from the plain model's")
    return "eval at δλ = 0 equals the plain model exactly"


def check_fp32_steps(device: torch.device) -> str:
    model, opt = _tuned(device, response_every=1)
    before = model.hparams.unconstrained.detach().clone()
    for i in range(20):
        opt.train_step(*_batch(device, seed=i), F.cross_entropy)
        if i % 5 == 4:
            opt.val_step(*_batch(device, seed=100 + i), F.cross_entropy)
    if not _finite(model):
        raise AssertionError("a parameter is not finite after 20 fp32 steps")
    moved = (model.hparams.unconstrained.detach() - before).abs().max().item()
    if moved == 0:
        raise AssertionError("λ did not move in 4 λ steps")
    return f"20 fp32 steps, λ moved by up to {moved:.3g}"


def check_bf16(device: torch.device) -> str:
    model, opt = _tuned(device, autocast=torch.bfloat16)
    for i in range(10):
        opt.train_step(*_batch(device, seed=i), F.cross_entropy)
    opt.val_step(*_batch(device, seed=99), F.cross_entropy)
    if not _finite(model):
        raise AssertionError("a parameter is not finite after bf16 steps")
    return "10 bf16-autocast steps finite"


def check_fp16_grad_scaler(device: torch.device) -> str:
    scaler = torch.amp.GradScaler(device.type)
    model, opt = _tuned(device, autocast=torch.float16, grad_scaler=scaler)
    for i in range(10):
        opt.train_step(*_batch(device, seed=i), F.cross_entropy)
    opt.val_step(*_batch(device, seed=99), F.cross_entropy)
    if not _finite(model):
        raise AssertionError("a parameter is not finite after fp16 + GradScaler steps")
    return f"fp16 + GradScaler: 10 steps finite, scale now {scaler.get_scale():g}"


def _compiled_run(device: torch.device, backend: str | None, steps: int = 3) -> ht.HyperModel:
    model, _ = _tuned(device)
    runner = model if backend is None else torch.compile(model, backend=backend)
    opt = ht.DeltaSTNOptimizer(runner, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    torch.manual_seed(7)
    for i in range(steps):
        opt.train_step(*_batch(device, seed=i), F.cross_entropy)
        opt.val_step(*_batch(device, seed=50 + i), F.cross_entropy)
    return model


def _first_difference(a: torch.nn.Module, b: torch.nn.Module) -> str | None:
    other = b.state_dict()
    return next((k for k, v in a.state_dict().items() if not torch.equal(v, other[k])), None)


def check_compile_aot_eager_matches_eager(device: torch.device) -> str:
    """Bit-for-bit needs deterministic kernels: cuDNN's default convolution backward is not (two
    eager runs differ), so the comparison runs with ``cudnn.deterministic`` and checks that first."""
    torch._dynamo.reset()
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        eager = _compiled_run(device, None)
        again = _compiled_run(device, None)
        compiled = _compiled_run(device, "aot_eager")
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved
    if (k := _first_difference(eager, again)) is not None:
        raise AssertionError(f"two eager runs differ ({k}) even with cudnn.deterministic: nothing to compare")
    if (k := _first_difference(eager, compiled)) is not None:
        raise AssertionError(f"{k} differs between eager and aot_eager after 3 steps (two eager runs agree)")
    return "aot_eager steps equal eager bit for bit (cudnn.deterministic)"


def check_compile_inductor_runs(device: torch.device) -> str:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = _compiled_run(device, "inductor", steps=5)
    if not _finite(model):
        raise AssertionError("a parameter is not finite after inductor-compiled steps")
    breaks = dict(counters["graph_break"])
    if breaks:
        raise AssertionError(f"graph breaks: {breaks}")
    return "inductor: 5 train + 5 val steps finite, no graph breaks (its RNG differs from eager's)"


def check_tangent_matches_cpu(device: torch.device) -> str:
    torch.manual_seed(0)
    base = ht.HyperModel.wrap(SimpleCNN(), {"dropout": ht.DropoutRate(per_site=True)})
    with torch.no_grad():
        for p in base.response_parameters():
            p.normal_(0, 0.05)
    # TF32 (cuDNN's default for convolutions on Ampere and newer) alone differs from CPU by ~3e-3
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        outs = _linearized_on(base, (torch.device("cpu"), device))
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    err = (outs[0] - outs[1]).abs().max().item()
    if err > 1e-4:
        raise AssertionError(f"linearized output on {device} differs from CPU by {err:.3g}")
    return f"linearized output matches CPU with TF32 off (max |Δ| = {err:.2g})"


def _linearized_on(base: ht.HyperModel, devices) -> list[torch.Tensor]:
    from hypertune.context import Perturbation
    from hypertune.linearize import linearized_call

    outs = []
    for dev in devices:
        model = copy.deepcopy(base).to(dev).eval()
        x, _ = _batch(dev)
        lam = model.hparams.unconstrained.detach().unsqueeze(0)
        eps = torch.full((x.shape[0], len(model.hparams)), 0.3, device=dev, dtype=lam.dtype)
        point = Perturbation(model.hparams, lam + eps, eps, linearize=True)
        with torch.no_grad(), model.evaluated_at(point):
            outs.append(linearized_call(lambda m=model, x=x: m(x)).cpu())
    return outs


CHECKS: dict[str, Callable[[torch.device], str]] = {
    "eval_equals_plain": check_eval_equals_plain,
    "fp32_steps": check_fp32_steps,
    "bf16": check_bf16,
    "fp16_grad_scaler": check_fp16_grad_scaler,
    "compile_aot_eager_matches_eager": check_compile_aot_eager_matches_eager,
    "compile_inductor_runs": check_compile_inductor_runs,
    "tangent_matches_cpu": check_tangent_matches_cpu,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: nothing to check")
        return 2
    results = {}
    for name, check in CHECKS.items():
        try:
            results[name] = {"ok": True, "detail": check(device)}
        except Exception as err:  # one failing check must not hide the others
            results[name] = {"ok": False, "detail": f"{type(err).__name__}: {err}",
                             "traceback": traceback.format_exc()}
        print(f"{'PASS' if results[name]['ok'] else 'FAIL'} {name}: {results[name]['detail']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "results": results}, indent=1))
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
