#!/usr/bin/env python
"""Replay the schedule Δ-STN found in plain training runs (STN paper, Sec. 4.3 / Δ-STN Fig. 6).

1. One Δ-STN run tunes the four dropout rates of SimpleCNN (input, after each conv block, after
   fc1; one rate each) and its weight decay on a FashionMNIST training subset, with λ steps on a
   separate tuning split (T_train / T_valid = 5 / 1). Its schedule is exported to JSON.
2. Three plain runs of a *fresh* SimpleCNN (no hypernetwork, plain torch SGD, same initial
   weights and batch order as the Δ-STN run) are driven by ScheduleReplayer:
   * ``schedule``: the Δ-STN schedule, step for step;
   * ``final``: its final values held fixed from the start;
   * ``untuned``: the starting values held fixed.
   Each is repeated for ``--replay-seeds`` (the seed sets the initial weights and dropout masks;
   the Δ-STN run uses the first one's weights).
3. Test loss / accuracy of every run (and of the Δ-STN model itself) on the official test set.

    python benchmarks/replay_schedule.py --data-root ../shared/datasets \\
        --json out/replay_schedule.json --png benchmarks/replay_schedule.png

Runs in about 10-15 minutes on 2 shared CPU cores at the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hypertune as ht  # noqa: E402
from hypertune.experiments import SimpleCNN, TensorLoader, load_image_classification  # noqa: E402
from hypertune.logging import format_summary  # noqa: E402
from hypertune.plotting import plot_schedule  # noqa: E402
from hypertune.schedule import Schedule, ScheduleReplayer  # noqa: E402

INIT = {"dropout": 0.05, "weight_decay": 1e-4}


def specs() -> dict[str, ht.HParam]:
    return {
        "dropout": ht.DropoutRate(init=INIT["dropout"], per_site=True),
        "weight_decay": ht.WeightDecay(init=INIT["weight_decay"]),
    }


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> tuple[float, float]:
    was = model.training
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(x), batch):
        out = model(x[i : i + batch])
        loss += F.cross_entropy(out, y[i : i + batch], reduction="sum").item()
        correct += (out.argmax(1) == y[i : i + batch]).sum().item()
    model.train(was)
    return loss / len(x), correct / len(x)


def run_stn(data, args) -> tuple[Schedule, dict, ht.DeltaSTNOptimizer]:
    torch.manual_seed(args.replay_seeds[0])
    model = ht.HyperModel.wrap(SimpleCNN(), specs())
    opt = ht.DeltaSTNOptimizer(
        model,
        torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9),
        hyper_lr=args.hyper_lr,
        warmup_steps=args.warmup_steps,
        response_optimizer=args.response_optimizer,
    )
    train = TensorLoader(*data["train"], args.batch_size, seed=args.data_seed, drop_last=True)
    tune = TensorLoader(*data["tune"], args.batch_size, seed=args.data_seed + 1, drop_last=True).cycle()
    start, cpu = time.time(), time.process_time()
    for epoch in range(args.epochs):
        for x, y in train:
            opt.train_step(x, y, F.cross_entropy)
            if opt.train_steps % args.tune_every == 0:
                opt.val_step(*next(tune), F.cross_entropy)
        print(f"  Δ-STN epoch {epoch + 1}: {format_summary(opt, window=50)} ({time.time() - start:.0f} s)", flush=True)
    seconds, cpu = time.time() - start, time.process_time() - cpu
    schedule = Schedule.from_optimizer(opt)
    test = evaluate(model, *data["test"])
    val = evaluate(model, *data["tune"])
    return schedule, {"seconds": seconds, "cpu_seconds": cpu, "test_loss": test[0], "test_acc": test[1],
                      "val_loss": val[0]}, opt


def run_replay(schedule: Schedule, data, args, seed: int) -> dict:
    torch.manual_seed(seed)
    model = SimpleCNN()
    replayer = ScheduleReplayer(schedule, model)
    optimizer = torch.optim.SGD(replayer.param_groups(), lr=args.lr, momentum=0.9)
    train = TensorLoader(*data["train"], args.batch_size, seed=args.data_seed, drop_last=True)
    start, cpu = time.time(), time.process_time()
    step = 0
    for _ in range(args.epochs):
        for x, y in train:
            replayer.apply(step, optimizer)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            step += 1
    seconds, cpu = time.time() - start, time.process_time() - cpu
    test = evaluate(model, *data["test"])
    val = evaluate(model, *data["tune"])
    return {"seconds": seconds, "cpu_seconds": cpu, "test_loss": test[0], "test_acc": test[1], "val_loss": val[0]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="../shared/datasets")
    p.add_argument("--train-size", type=int, default=4000)
    p.add_argument("--tune-size", type=int, default=2000, help="λ-step split, carved from the validation split")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.03)
    p.add_argument("--hyper-lr", type=float, default=0.03)
    p.add_argument("--response-optimizer", choices=["adam", "clone"], default=None,
                   help="Θ's optimizer (default: the library's, Adam; the recorded runs used clone)")
    p.add_argument("--tune-every", type=int, default=5)
    p.add_argument("--warmup-steps", type=int, default=40)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--replay-seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--schedule-out", type=Path, default=None, help="write the schedule JSON here")
    p.add_argument("--png", type=Path, default=None, help="plot of the Δ-STN run's schedule")
    p.add_argument("--markdown-from", type=Path, default=None,
                   help="print the RESULTS.md table of a saved --json result and exit")
    args = p.parse_args(argv)
    if args.markdown_from:
        result = json.loads(args.markdown_from.read_text())
        print(markdown(result))
        return result
    torch.set_num_threads(args.threads)
    total_start, total_cpu = time.time(), time.process_time()

    full = load_image_classification("fashionmnist", args.data_root, seed=args.data_seed)
    g = torch.Generator().manual_seed(args.data_seed)
    tr = torch.randperm(len(full["train"][0]), generator=g)[: args.train_size]
    va = torch.randperm(len(full["val"][0]), generator=g)[: args.tune_size]
    data = {
        "train": (full["train"][0][tr], full["train"][1][tr]),
        "tune": (full["val"][0][va], full["val"][1][va]),
        "test": full["test"],
    }
    print(f"FashionMNIST: {len(tr)} train, {len(va)} tuning, {len(data['test'][0])} test; "
          f"{args.epochs} epochs of {len(tr) // args.batch_size} steps", flush=True)

    schedule, stn, opt = run_stn(data, args)
    print(f"Δ-STN: test loss {stn['test_loss']:.4f}, acc {stn['test_acc']:.4f} "
          f"({stn['seconds']:.0f} s wall, {stn['cpu_seconds']:.0f} s CPU)")
    print("  final values:", {k: round(v, 5) for k, v in schedule.final().items()}, flush=True)
    if args.schedule_out:
        args.schedule_out.parent.mkdir(parents=True, exist_ok=True)
        schedule.to_json(args.schedule_out)
    if args.png:
        args.png.parent.mkdir(parents=True, exist_ok=True)
        steps_per_epoch = len(tr) // args.batch_size
        plot_schedule(opt, args.png, model=opt.hyper_model, steps_per_epoch=steps_per_epoch,
                      title=f"Δ-STN on FashionMNIST ({len(tr)} train examples, SimpleCNN)")

    baselines = {
        "schedule": schedule,
        "final": Schedule.constant(schedule.final(), schedule.meta, schedule.total_steps),
        "untuned": Schedule.constant(schedule.initial(), schedule.meta, schedule.total_steps),
    }
    runs: dict[str, list[dict]] = {name: [] for name in baselines}
    for seed in args.replay_seeds:
        for name, sched in baselines.items():
            r = run_replay(sched, data, args, seed)
            runs[name].append(r)
            print(f"  seed {seed} {name:8s}: test loss {r['test_loss']:.4f}, acc {r['test_acc']:.4f}, "
                  f"tuning-split loss {r['val_loss']:.4f} ({r['seconds']:.0f} s wall, {r['cpu_seconds']:.0f} s CPU)",
                  flush=True)

    summary = {}
    for name, rs in runs.items():
        losses = [r["test_loss"] for r in rs]
        summary[name] = {
            "test_loss_mean": statistics.mean(losses),
            "test_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
            "test_acc_mean": statistics.mean(r["test_acc"] for r in rs),
            "val_loss_mean": statistics.mean(r["val_loss"] for r in rs),
            "seconds_mean": statistics.mean(r["seconds"] for r in rs),
            "cpu_seconds_mean": statistics.mean(r["cpu_seconds"] for r in rs),
        }
    print("\nrun        test loss (mean ± std over seeds)   test acc   tuning-split loss")
    for name, s in summary.items():
        print(f"{name:9s}  {s['test_loss_mean']:.4f} ± {s['test_loss_std']:.4f}"
              f"                   {s['test_acc_mean']:.4f}     {s['val_loss_mean']:.4f}")
    total, total_cpu = time.time() - total_start, time.process_time() - total_cpu
    print(f"total {total:.0f} s wall, {total_cpu:.0f} s CPU (all threads); load average now "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    result = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "cpu": os.cpu_count(),
        "stn": stn,
        "initial_values": schedule.initial(),
        "final_values": schedule.final(),
        "schedule_changes": len(schedule.steps),
        "total_steps": schedule.total_steps,
        "runs": runs,
        "summary": summary,
        "total_seconds": total,
        "total_cpu_seconds": total_cpu,
        "load_average_at_end": os.getloadavg()[0],
    }
    print(markdown(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return result


def markdown(result: dict) -> str:
    """The RESULTS.md table for one result."""
    seeds = result["args"]["replay_seeds"]
    stn = result["stn"]
    label = {
        "schedule": "replayed Δ-STN schedule",
        "final": "final values held fixed",
        "untuned": "starting values held fixed (untuned)",
    }

    def cpu(d: dict, key: str) -> str:
        return f" ({d[key]:.0f})" if key in d else ""

    lines = [
        f"| plain run ({len(seeds)} seeds) | test loss | test accuracy | tuning-split loss | wall s per run (CPU s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, s in result["summary"].items():
        lines.append(
            f"| {label.get(name, name)} | {s['test_loss_mean']:.4f} ± {s['test_loss_std']:.4f} | "
            f"{s['test_acc_mean']:.4f} | {s['val_loss_mean']:.4f} | {s['seconds_mean']:.0f}{cpu(s, 'cpu_seconds_mean')} |"
        )
    lines.append(
        f"| *the Δ-STN run itself (seed {seeds[0]}, one run)* | {stn['test_loss']:.4f} | {stn['test_acc']:.4f} | "
        f"{stn['val_loss']:.4f} | {stn['seconds']:.0f}{cpu(stn, 'cpu_seconds')} |"
    )
    per_seed = "; ".join(
        f"{name}: " + ", ".join(f"{r['test_loss']:.4f}" for r in runs) for name, runs in result["runs"].items()
    )
    fmt = lambda d: ", ".join(f"{k.split(':')[-1]} {v:.3g}" for k, v in d.items())  # noqa: E731
    lines += [
        "",
        f"Test loss per seed ({', '.join(map(str, seeds))}): {per_seed}.",
        f"Starting values: {fmt(result['initial_values'])}. Final values: {fmt(result['final_values'])}.",
        f"{result['total_steps']} train steps, the schedule changes at {result['schedule_changes']} of them. "
        f"Whole script: {result['total_seconds']:.0f} s wall"
        + (f", {result['total_cpu_seconds']:.0f} s CPU (load average {result['load_average_at_end']:.1f} at the end)"
           if "total_cpu_seconds" in result else "")
        + ".",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
