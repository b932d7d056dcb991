#!/usr/bin/env python
"""Global best-response vs training from scratch (hyper-training, Lorraine & Duvenaud 2018, Fig. 3/4).

An MLP (784-100-10) on an MNIST training subset, one regularization hyperparameter (weight decay
``c/2·‖w‖²`` on the weights, or the hidden dropout rate):

* **hypernetwork** (Algorithm 2): one HyperModel in uncentered STN form trained with λ drawn per
  example from a broad log-uniform (weight decay) / logit-uniform (dropout) prior, then its
  validation loss read off at every grid point without retraining, and λ optimized by gradient
  descent through it (Algorithm 2's second loop). Degree 3 (a cubic best response in λ, the
  default) and degree 1 (affine, the plain STN layer) are both reported.
* **from scratch**: the same MLP trained from the same initial weights, with the same optimizer
  and batch order, once per grid point (what grid search / cross-validation pays).

Both curves are on the same validation split (carved from MNIST's training set); the test set
scores the λ each method picks. Wall-clock time of each is reported.

    python benchmarks/global_response.py --data-root ../shared/datasets --hparam weight_decay \\
        --json out/global_response_wd.json --png benchmarks/global_response_wd.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hypertune as ht  # noqa: E402
from hypertune.experiments import TensorLoader, load_image_classification  # noqa: E402
from hypertune.global_response import GlobalBestResponse, log_grid  # noqa: E402

PRIORS = {"weight_decay": (1e-5, 1.0), "dropout": (0.02, 0.9)}


def mlp(hidden: int, dropout: float = 0.0) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 10))


def grid_for(hparam: str, num: int) -> list[float]:
    low, high = PRIORS[hparam]
    if hparam == "weight_decay":
        return log_grid(low, high, num)
    # evenly spaced on the logit scale, which is the dropout rate's tuning scale
    lo, hi = math.log(low / (1 - low)), math.log(high / (1 - high))
    return [1 / (1 + math.exp(-(lo + (hi - lo) * i / (num - 1)))) for i in range(num)]


@torch.no_grad()
def loss_acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    was = model.training
    model.eval()
    out = model(x)
    model.train(was)
    return F.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item()


def train_from_scratch(value: float, data, args) -> nn.Module:
    torch.manual_seed(args.seed)
    model = mlp(args.hidden, value if args.hparam == "dropout" else 0.0)
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs)
    loader = TensorLoader(*data["train"], args.batch_size, seed=args.seed)
    c = value if args.hparam == "weight_decay" else 0.0
    for _ in range(args.epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            if c:
                loss = loss + 0.5 * c * sum(w.pow(2).sum() for w in weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return model


def train_hypernet(data, args, degree: int) -> tuple[GlobalBestResponse, float, float]:
    torch.manual_seed(args.seed)
    if args.hparam == "weight_decay":
        spec = {"weight_decay": ht.WeightDecay(init=1e-3)}
    else:
        spec = {"dropout": ht.DropoutRate(init=0.1)}
    gbr = GlobalBestResponse.wrap(mlp(args.hidden, 0.1), spec, prior={args.hparam: PRIORS[args.hparam]}, degree=degree)
    epochs = args.epochs * args.hyper_epochs_factor
    opt = torch.optim.Adam(gbr.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    loader = TensorLoader(*data["train"], args.batch_size, seed=args.seed)
    start, cpu = time.time(), time.process_time()
    gbr.fit(loader, F.cross_entropy, opt, epochs=epochs, scheduler=sched)
    return gbr, time.time() - start, time.process_time() - cpu


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="../shared/datasets")
    p.add_argument("--hparam", choices=sorted(PRIORS), default="weight_decay")
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--val-size", type=int, default=5000)
    p.add_argument("--hidden", type=int, default=100)
    p.add_argument("--epochs", type=int, default=60, help="epochs of each from-scratch run")
    p.add_argument("--hyper-epochs-factor", type=int, default=3,
                   help="the hypernetwork trains this many times as many epochs as one run")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--grid", type=int, default=20, help="grid points trained from scratch")
    p.add_argument("--fine-grid", type=int, default=100, help="grid points the hypernetwork is read at")
    p.add_argument("--degrees", type=int, nargs="+", default=[3, 1])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a loaded machine)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--png", type=Path, default=None)
    p.add_argument("--markdown-from", type=Path, default=None,
                   help="print the RESULTS.md tables of a saved --json result and exit")
    args = p.parse_args(argv)
    if args.markdown_from:
        result = json.loads(args.markdown_from.read_text())
        print(markdown(result))
        return result
    torch.set_num_threads(args.threads)

    full = load_image_classification("mnist", args.data_root, seed=args.seed)
    g = torch.Generator().manual_seed(args.seed)
    tr = torch.randperm(len(full["train"][0]), generator=g)[: args.train_size]
    va = torch.randperm(len(full["val"][0]), generator=g)[: args.val_size]
    data = {
        "train": (full["train"][0][tr], full["train"][1][tr]),
        "val": (full["val"][0][va], full["val"][1][va]),
        "test": full["test"],
    }
    grid = grid_for(args.hparam, args.grid)
    fine = grid_for(args.hparam, args.fine_grid)
    val_batches = [(data["val"][0][i : i + 1000], data["val"][1][i : i + 1000]) for i in range(0, len(va), 1000)]
    print(f"MNIST {args.hparam}: {len(tr)} train, {len(va)} validation; MLP 784-{args.hidden}-10; "
          f"{args.grid} grid points in {PRIORS[args.hparam]}", flush=True)

    hyper: dict[int, dict] = {}
    for degree in args.degrees:
        gbr, train_s, train_cpu = train_hypernet(data, args, degree)
        curve = gbr.validation_curve({args.hparam: grid}, val_batches, F.cross_entropy)
        start = time.time()
        fine_curve = [loss for _, loss in gbr.validation_curve({args.hparam: fine}, val_batches, F.cross_entropy)]
        curve_s = time.time() - start
        j = min(range(len(fine)), key=fine_curve.__getitem__)
        start = time.time()
        found = gbr.optimize(val_batches, F.cross_entropy, steps=200)[args.hparam]
        opt_s = time.time() - start
        losses = [loss for _, loss in curve]
        k = min(range(len(grid)), key=losses.__getitem__)
        hyper[degree] = {
            "train_seconds": train_s, "train_cpu_seconds": train_cpu, "curve_seconds": curve_s,
            "optimize_seconds": opt_s,
            "curve": losses, "grid_argmin": grid[k], "grid_min": losses[k],
            "fine_curve": fine_curve, "fine_argmin": fine[j], "fine_min": fine_curve[j],
            "optimized": found, "estimate_at_optimized": gbr.evaluate({args.hparam: found}, val_batches, F.cross_entropy),
        }
        print(f"  hypernet degree {degree}: trained in {train_s:.1f} s ({train_cpu:.1f} s CPU), {len(fine)}-point curve in {curve_s:.2f} s; "
              f"min {losses[k]:.4f} at {grid[k]:.3g} on the coarse grid, {fine_curve[j]:.4f} at {fine[j]:.3g} "
              f"on the fine one; gradient descent on λ -> {found:.3g} ({opt_s:.1f} s)", flush=True)

    scratch, scratch_test = [], []
    scratch_s = scratch_cpu = 0.0
    for value in grid:
        start, cpu = time.time(), time.process_time()
        model = train_from_scratch(value, data, args)
        scratch.append(loss_acc(model, *data["val"])[0])
        scratch_s += time.time() - start
        scratch_cpu += time.process_time() - cpu
        scratch_test.append(loss_acc(model, *data["test"]))  # not timed: not part of the search
        print(f"  from scratch at {value:.3g}: validation loss {scratch[-1]:.4f}", flush=True)
    k = min(range(len(grid)), key=scratch.__getitem__)
    print(f"  from scratch: {len(grid)} runs in {scratch_s:.1f} s ({scratch_cpu:.1f} s CPU); "
          f"min {scratch[k]:.4f} at {grid[k]:.3g}")

    # What each method's choice is worth: a model trained from scratch at that λ, on the test set.
    chosen = {"from scratch (grid argmin)": grid[k]}
    for degree, h in hyper.items():
        chosen[f"hypernet deg {degree} (fine-grid argmin)"] = h["fine_argmin"]
        chosen[f"hypernet deg {degree} (gradient)"] = h["optimized"]
    picks = {}
    for name, value in chosen.items():
        model = train_from_scratch(value, data, args)
        val_loss = loss_acc(model, *data["val"])[0]
        test_loss, test_acc = loss_acc(model, *data["test"])
        picks[name] = {"value": value, "val_loss": val_loss, "test_loss": test_loss, "test_acc": test_acc}
        print(f"  {name}: λ={value:.3g} -> retrained validation {val_loss:.4f}, test {test_loss:.4f} / {test_acc:.4f}")

    result = {
        "args": {k_: (str(v) if isinstance(v, Path) else v) for k_, v in vars(args).items()},
        "cpu": os.cpu_count(),
        "grid": grid,
        "fine_grid": fine,
        "scratch": {"curve": scratch, "seconds": scratch_s, "cpu_seconds": scratch_cpu,
                    "seconds_per_run": scratch_s / len(grid),
                    "test_curve": [t[0] for t in scratch_test], "test_acc_curve": [t[1] for t in scratch_test],
                    "grid_argmin": grid[k], "grid_min": scratch[k]},
        "hypernet": {str(d): h for d, h in hyper.items()},
        "picks": picks,
        "load_average_at_end": os.getloadavg()[0],
    }
    print(markdown(result))
    if args.png:
        plot(result, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return result


def markdown(result: dict) -> str:
    """The tables of benchmarks/RESULTS.md for one result."""
    a = result["args"]
    grid, scratch, hyper = result["grid"], result["scratch"], result["hypernet"]
    degrees = list(hyper)
    fmt = (lambda v: f"{v:.3g}") if a["hparam"] == "weight_decay" else (lambda v: f"{v:.3f}")
    lines = [
        f"| {a['hparam']} | from scratch | " + " | ".join(f"hypernet, degree {d}" for d in degrees) + " |",
        "|---:|---:|" + "---:|" * len(degrees),
    ]
    for i, v in enumerate(grid):
        row = [fmt(v), f"{scratch['curve'][i]:.4f}"] + [f"{hyper[d]['curve'][i]:.4f}" for d in degrees]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "| | from scratch | " + " | ".join(f"hypernet, degree {d}" for d in degrees) + " |",
        "|---|---:|" + "---:|" * len(degrees),
        "| argmin on the grid (validation loss there) | "
        + f"{fmt(scratch['grid_argmin'])} ({scratch['grid_min']:.4f}) | "
        + " | ".join(f"{fmt(hyper[d]['grid_argmin'])} ({hyper[d]['grid_min']:.4f})" for d in degrees) + " |",
        f"| argmin on a {len(result['fine_grid'])}-point grid (estimate) | – | "
        + " | ".join(f"{fmt(hyper[d]['fine_argmin'])} ({hyper[d]['fine_min']:.4f})" for d in degrees) + " |",
        "| λ by gradient descent through the hypernetwork | – | "
        + " | ".join(fmt(hyper[d]["optimized"]) for d in degrees) + " |",
        "| mean abs. error of the estimate over the grid | – | "
        + " | ".join(f"{sum(abs(x - y) for x, y in zip(hyper[d]['curve'], scratch['curve'])) / len(grid):.4f}" for d in degrees)
        + " |",
        f"| training, wall s (CPU s) | {scratch['seconds']:.1f} ({scratch['cpu_seconds']:.1f}) for {len(grid)} runs | "
        + " | ".join(f"{hyper[d]['train_seconds']:.1f} ({hyper[d]['train_cpu_seconds']:.1f}), one run" for d in degrees)
        + " |",
        f"| reading the curve, wall s | – | "
        + " | ".join(
            f"{hyper[d]['curve_seconds']:.1f} for {len(result['fine_grid'])} points" for d in degrees
        ) + " |",
        "",
        "| λ picked by | λ | validation loss, retrained from scratch | test loss | test accuracy |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, pick in result["picks"].items():
        lines.append(f"| {name} | {fmt(pick['value'])} | {pick['val_loss']:.4f} | {pick['test_loss']:.4f} | {pick['test_acc']:.4f} |")
    return "\n".join(lines)


def plot(result: dict, args) -> None:
    from matplotlib.figure import Figure

    grid = result["grid"]
    fig = Figure(figsize=(7, 4.2), dpi=130, layout="constrained")
    ax = fig.subplots()
    scratch = result["scratch"]
    ax.plot(grid, scratch["curve"], "x", color="k", markersize=7,
            label=f"trained from scratch ({len(grid)} runs, {scratch['seconds']:.0f} s)")
    styles = {"3": ("C3", "-"), "1": ("C0", "--")}
    for degree, h in result["hypernet"].items():
        color, ls = styles.get(degree, ("C2", "-."))
        ax.plot(result["fine_grid"], h["fine_curve"], ls, color=color, linewidth=1.8,
                label=f"hypernetwork, degree {degree} (1 run, {h['train_seconds'] + h['curve_seconds']:.0f} s)")
        ax.axvline(h["fine_argmin"], color=color, linestyle=":", linewidth=1)
    ax.axvline(scratch["grid_argmin"], color="k", linestyle=":", linewidth=1)
    if args.hparam == "weight_decay":
        ax.set_xscale("log")
        ax.set_xlabel("weight decay c (penalty c/2·‖w‖²)")
    else:
        ax.set_xlabel("hidden dropout rate")
    ax.set_ylabel("validation loss (cross-entropy)")
    ax.set_title(f"MNIST, MLP 784-{args.hidden}-10, {args.train_size} training examples", fontsize=10)
    top = max(max(scratch["curve"]), *(max(h["fine_curve"]) for h in result["hypernet"].values()))
    low = min(min(scratch["curve"]), *(min(h["fine_curve"]) for h in result["hypernet"].values()))
    ax.set_ylim(low - 0.05 * (top - low), top + 0.05 * (top - low))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(args.png))


if __name__ == "__main__":
    main()
