"""How close does one default tuned run get to the best fixed hyperparameters, at equal steps?

For a model, data set and training budget (epochs over the same training subset, the same batch
order), it trains the plain model once per value of a grid of fixed dropout rates (every tuned
rate set to that value; FashionMNIST's Cutout held at its start), and takes the lowest best
validation loss as the oracle. It then runs Δ-STN at the library's defaults from each starting
value and reports, per start, the fraction of the gap from the untuned run at that start (the
grid run at the same value) to the oracle that the tuned run closes:

    closed = (untuned − tuned) / (untuned − oracle)

1 means the tuned run matched the oracle; above 1 it beat every grid value (it tunes each rate
on its own, the grid moves them together); ≤ 0 means it did no better than not tuning.

    python benchmarks/oracle_gap.py --dataset mnist --train-subset 2000 --epochs 30 \
        --grid 0.05,0.2,0.4,0.6,0.85 --starts 0.05,0.85 --json out.json

The model, data split, search space and plain training loop are compare.py's. To spread one
comparison over several processes, run parts of the grid (each start with its own value) with
``--json`` and combine them with ``--merge``:

    python benchmarks/oracle_gap.py --dataset fashionmnist --grid 0.05,0.2 --starts 0.05 --json a.json &
    python benchmarks/oracle_gap.py --dataset fashionmnist --grid 0.4,0.6 --starts 0.6 --json b.json &
    wait; python benchmarks/oracle_gap.py --merge a.json b.json --json all.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import compare  # noqa: E402

import hypertune as ht  # noqa: E402
from hypertune.experiments import TensorLoader, load_image_classification  # noqa: E402

T_TRAIN_PER_VAL = 5  # a λ step after every 5th train step, as in the papers and compare.py


def _settings(args: argparse.Namespace) -> SimpleNamespace:
    """What compare.py's plain loop reads, with a budget no run reaches (epochs decide)."""
    return SimpleNamespace(lr=args.lr, batch_size=args.batch_size, clock="cpu", budget=math.inf)


def fixed_run(dataset: str, value: float, data, args: argparse.Namespace) -> dict[str, Any]:
    """The plain model with every tuned rate held at ``value`` for ``args.epochs`` epochs."""
    tracker = compare.Tracker(f"fixed {value:g}", compare.Budget(math.inf, "cpu"))
    values = compare.initial_values(dataset, value)
    start = time.process_time()
    compare.train_plain(dataset, values, data, _settings(args), tracker, args.seed, args.epochs,
                        args.eval_every)
    out = tracker.result(data)
    out.update(kind="fixed", value=value, cpu_seconds=time.process_time() - start)
    return out


def tuned_run(dataset: str, start_value: float, data, args: argparse.Namespace, *,
              init_scale: float = compare.DROPOUT_SCALE, options: dict[str, Any] | None = None,
              trace_every: int = 400) -> dict[str, Any]:
    """Δ-STN at the library's defaults (only the weights' SGD and the warm-up are chosen here;
    ``init_scale`` and ``options``, DeltaSTNOptimizer keywords, vary one setting for a probe).

    ``final_hparams`` are the values at the end of training, ``trace`` the values every
    ``trace_every`` steps (the tracker's result restores the best-scoring state, λ included).
    """
    tracker = compare.Tracker(f"tuned from {start_value:g}", compare.Budget(math.inf, "cpu"))
    torch.manual_seed(args.seed)
    specs = compare.hyper_specs(dataset, start_value, init_scale)
    model = ht.HyperModel.wrap(compare.build_model(dataset, start_value), specs)
    opt = ht.DeltaSTNOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9), warmup_steps=args.warmup_steps,
        **(options or {}),
    )
    loader = TensorLoader(*data["train"], args.batch_size, seed=args.seed)
    val_stream = TensorLoader(*data["val"], args.batch_size, seed=args.seed + 1).cycle()
    start, step, trace = time.process_time(), 0, []
    for _ in range(args.epochs):
        for x, y in loader:
            opt.train_step(x, y, F.cross_entropy)
            step += 1
            if step % T_TRAIN_PER_VAL == 0:
                opt.val_step(*next(val_stream), F.cross_entropy)
            if step % args.eval_every == 0:
                tracker.score(model, data, model.hparam_values())
            if step % trace_every == 0:
                trace.append({"step": step, **{k: round(v, 4) for k, v in model.hparam_values().items()}})
    tracker.score(model, data, model.hparam_values())
    final_hparams = model.hparam_values()
    out = tracker.result(data)
    out.update(kind="tuned", value=start_value, steps=step, final_hparams=final_hparams, trace=trace,
               cpu_seconds=time.process_time() - start)
    return out


def gap_closed(untuned: float, tuned: float, oracle: float) -> float | None:
    """Fraction of the untuned→oracle gap closed; None when the start already is the oracle."""
    gap = untuned - oracle
    return None if gap <= 0 else (untuned - tuned) / gap


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    fixed = {r["value"]: r["best_val_loss"] for r in runs if r["kind"] == "fixed"}
    best_value = min(fixed, key=fixed.__getitem__)
    rows = []
    for r in runs:
        if r["kind"] != "tuned":
            continue
        if r["value"] not in fixed:
            raise SystemExit(f"start {r['value']} is not in the grid {sorted(fixed)}: its untuned run is missing")
        untuned = fixed[r["value"]]
        rows.append({"start": r["value"], "untuned": untuned, "tuned": r["best_val_loss"],
                     "oracle": fixed[best_value], "oracle_value": best_value,
                     "closed": gap_closed(untuned, r["best_val_loss"], fixed[best_value]),
                     "tuned_test": r["test_loss"], "final_hparams": r.get("final_hparams", {})})
    return rows


def markdown(runs: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    lines = ["| run | best val loss | its test loss | CPU s |", "|---|---:|---:|---:|"]
    for r in runs:
        lines.append(f"| {r['method']} | {r['best_val_loss']:.4f} | {r['test_loss']:.4f} | {r['cpu_seconds']:.0f} |")
    lines += ["", "| start | untuned | tuned | oracle (value) | gap closed | tuned's final values |",
              "|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        closed = "n/a (the start is the oracle)" if row["closed"] is None else f"{100 * row['closed']:.0f}%"
        final = ", ".join(f"{k}={v:.3g}" for k, v in row["final_hparams"].items())
        lines.append(f"| {row['start']:g} | {row['untuned']:.4f} | {row['tuned']:.4f} | "
                     f"{row['oracle']:.4f} ({row['oracle_value']:g}) | {closed} | {final} |")
    return "\n".join(lines)


def merge(paths: list[str]) -> dict[str, Any]:
    """One result from parts run with the same settings; refuses parts that differ in them."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    keys = ("dataset", "train_subset", "epochs", "seed")
    first = {k: parts[0].get(k) for k in keys}
    for path, part in zip(paths, parts):
        mine = {k: part.get(k) for k in keys}
        if mine != first:
            raise SystemExit(f"{path} was run with {mine}, {paths[0]} with {first}: merge parts of one comparison only")
    runs = [r for part in parts for r in part["runs"]]
    values = [r["value"] for r in runs if r["kind"] == "fixed"]
    if len(values) != len(set(values)):
        raise SystemExit(f"a grid value was run in more than one part: {sorted(values)}")
    grid = sorted(values)
    starts = [r["value"] for r in runs if r["kind"] == "tuned"]
    return {**first, "grid": grid, "starts": starts, "runs": runs, "summary": summarize(runs), "merged_from": paths}


def _save(result: dict[str, Any], path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=1))


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated numbers, e.g. 0.05,0.3,0.6") from None
    if not all(0.0 <= v < compare.DROPOUT_HIGH for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: dropout rates must lie in [0, {compare.DROPOUT_HIGH})")
    return values


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["mnist", "fashionmnist"], default="mnist")
    parser.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "datasets"))
    parser.add_argument("--train-subset", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=30, help="the budget of every run")
    parser.add_argument("--grid", type=_floats, default=[0.05, 0.2, 0.4, 0.6, 0.85])
    parser.add_argument("--starts", type=_floats, default=None,
                        help="tuned runs' starting rates, each in the grid (default: 0.05 and the "
                             "issue's high start, 0.85 on MNIST, 0.6 on FashionMNIST)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--warmup-steps", type=int, default=0, help="DeltaSTNOptimizer's (library default 0)")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    parser.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                        help="combine the --json files of runs split over processes, print and save the table")
    args = parser.parse_args(argv)
    if args.merge:
        result = merge(args.merge)
        print(markdown(result["runs"], result["summary"]))
        _save(result, args.json)
        return result
    starts = args.starts or [0.05, 0.85 if args.dataset == "mnist" else 0.6]
    missing = [s for s in starts if s not in args.grid]
    if missing:
        parser.error(f"--starts {missing} not in --grid {args.grid}: each start's untuned run is a grid run")
    torch.set_num_threads(args.threads)
    data = load_image_classification(args.dataset, args.data_root, val_fraction=0.15, seed=0)
    data["train"] = tuple(t[: args.train_subset] for t in data["train"])  # type: ignore[assignment]
    runs = []
    for value in args.grid:
        runs.append(fixed_run(args.dataset, value, data, args))
        print(f"fixed {value:g}: best val {runs[-1]['best_val_loss']:.4f}", flush=True)
    for value in starts:
        runs.append(tuned_run(args.dataset, value, data, args))
        print(f"tuned from {value:g}: best val {runs[-1]['best_val_loss']:.4f}", flush=True)
    rows = summarize(runs)
    print(markdown(runs, rows))
    result = {"dataset": args.dataset, "train_subset": args.train_subset, "epochs": args.epochs,
              "seed": args.seed, "grid": args.grid, "starts": starts, "runs": runs, "summary": rows}
    _save(result, args.json)
    return result


if __name__ == "__main__":
    main()
