"""Time one optimizer step over a wrapped model's Θ: Adam's per-tensor loop, foreach and fused
kernels, and SGD with momentum (the clone of the weights' optimizer).

Θ holds as many values as w₀, so its optimizer step is not free; this is why hypertune builds
the fused Adam. Gradients are random: only the update's arithmetic is timed.

    python benchmarks/response_optimizer_step.py --models mlp --threads 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hypertune as ht  # noqa: E402
from overhead import _setup, _timer  # noqa: E402

VARIANTS = {
    "adam (per-tensor loop)": lambda p: torch.optim.Adam(p, lr=1e-3, foreach=False),
    "adam (foreach)": lambda p: torch.optim.Adam(p, lr=1e-3, foreach=True),
    "adam (fused)": lambda p: torch.optim.Adam(p, lr=1e-3, fused=True),
    "sgd momentum 0.9": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
}


def measure(name: str, device: torch.device, repeats: int, warmup: int) -> list[dict]:
    factory, hparams, *_ = _setup(name, device, None)
    model = ht.HyperModel.wrap(factory(), hparams).to(device)
    theta = model.response_parameters()
    size = sum(p.numel() for p in theta)
    timer = _timer(device)
    rows = []
    for label, build in VARIANTS.items():
        params = [torch.nn.Parameter(p.detach().clone()) for p in theta]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = build(params)
        for _ in range(warmup):
            opt.step()
        times = [timer(opt.step) for _ in range(repeats)]
        rows.append({"model": name, "device": str(device), "theta_values": size, "optimizer": label,
                     "step_ms": round(statistics.median(times), 3)})
        print(f"{name:>10} {str(device):>6} {size:>10} {label:>24} {rows[-1]['step_ms']:9.2f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp", help="comma list: mlp,simple_cnn,resnet18,lstm")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{'model':>10} {'device':>6} {'Θ values':>10} {'optimizer':>24} {'step ms':>9}")
    rows = [r for name in args.models.split(",") for r in measure(name.strip(), torch.device(args.device),
                                                                    args.repeats, args.warmup)]
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
