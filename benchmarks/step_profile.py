"""Where a tuned step's time goes, against a plain step: torch.profiler over a few steps of each.

On a GPU a small model's step is bound by the host, not the device: the count of operator calls,
kernel launches and host-device synchronizations per step decides the ratio. This prints those
counts per step for the plain and the tuned step (the same models and batches as overhead.py),
and the operators that take the most host time in the tuned one.

    python benchmarks/step_profile.py --model simple_cnn --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

_spec = importlib.util.spec_from_file_location("overhead", Path(__file__).with_name("overhead.py"))
overhead = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(overhead)  # type: ignore[union-attr]
ht = overhead.ht  # the checkout's hypertune, which overhead.py puts first on the path

READS = {"tolist", "item", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"}
LAUNCH = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
SYNC = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
COPY = ("cudaMemcpyAsync", "cudaMemcpy")


def host_reads(fn: Callable[[], object]) -> list[str]:
    """Tensor reads back to the host (tolist, item, bool(tensor), ...) called from hypertune's own
    files while ``fn`` runs, as "name at file:line": each is a device synchronization on a GPU,
    and they are counted the same on any device."""
    package = str(Path(ht.__file__).resolve().parent)
    seen: list[str] = []

    def trace(frame, event, arg):
        if event == "c_call" and getattr(arg, "__name__", "") in READS and frame.f_code.co_filename.startswith(package):
            seen.append(f"{arg.__name__} at {Path(frame.f_code.co_filename).name}:{frame.f_lineno}")

    sys.setprofile(trace)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return seen


def count_reads(step: Callable[[], None], steps: int) -> float:
    """:func:`host_reads` per step, over ``steps`` steps."""
    return len(host_reads(lambda: [step() for _ in range(steps)])) / steps


def profile_steps(name: str, device: torch.device, config: str, steps: int, warmup: int, top: int) -> dict:
    """Counts per step over ``steps`` steps (after ``warmup``) of the plain run or a tuned mode."""
    step, _, _ = overhead._build_step(name, device, None, config, None)
    for _ in range(warmup):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.key_averages()
    reads = count_reads(step, steps)

    def count(names: tuple[str, ...]) -> float:
        return sum(e.count for e in events if e.key in names) / steps

    aten = [e for e in events if e.key.startswith("aten::")]
    ranked = sorted(aten, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {
        "model": name, "device": str(device), "config": config, "steps": steps,
        "aten_calls_per_step": sum(e.count for e in aten) / steps,
        "kernel_launches_per_step": count(LAUNCH),
        "syncs_per_step": count(SYNC),
        "memcpys_per_step": count(COPY),
        "host_ms_per_step": sum(e.self_cpu_time_total for e in events) / steps / 1000,
        "device_reads_per_step": reads,
        "top_host_ops": [{"op": e.key, "calls_per_step": e.count / steps,
                          "self_host_ms_per_step": e.self_cpu_time_total / steps / 1000} for e in ranked],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="simple_cnn", help="as in overhead.py: mlp, simple_cnn, resnet18, lstm, gpt2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--modes", default="delta", help="comma list of tuned modes profiled beside plain")
    parser.add_argument("--steps", type=int, default=15,
                        help="a multiple of 15 covers whole cycles of Θ (every 3rd) and λ (every 5th) steps")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = [profile_steps(args.model, device, c, args.steps, args.warmup, args.top)
            for c in ["plain", *args.modes.split(",")]]
    print(f"{'config':>9} {'aten calls':>11} {'launches':>9} {'syncs':>6} {'memcpys':>8} {'host ms':>8} "
          f"{'reads':>6}   (per step; reads: hypertune's tensor reads to the host)")
    for r in rows:
        print(f"{r['config']:>9} {r['aten_calls_per_step']:11.1f} {r['kernel_launches_per_step']:9.1f} "
              f"{r['syncs_per_step']:6.1f} {r['memcpys_per_step']:8.1f} {r['host_ms_per_step']:8.2f} "
              f"{r['device_reads_per_step']:6.1f}")
    for r in rows[1:]:
        print(f"\ntop host ops, {r['config']}:")
        for op in r["top_host_ops"]:
            print(f"  {op['op']:<40} {op['calls_per_step']:7.1f} calls {op['self_host_ms_per_step']:8.3f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
