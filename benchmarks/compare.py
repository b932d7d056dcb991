"""Tuning quality at an equal wall-clock budget: untuned, random search, Optuna TPE, STN,
centered STN and Δ-STN, on MNIST (MLP) and FashionMNIST (SimpleCNN).

Every method gets the same model, search space, data split (validation carved from the training
set, test untouched) and wall-clock budget. Search methods train the plain model once per trial
for ``--trial-epochs`` epochs; the STN modes spend the whole budget in one tuned run. Each
method's score is its best validation loss, with the test loss of the model that reached it.

    python benchmarks/compare.py --dataset fashionmnist --budget 600 --json out.json --png out.png

An STN method may name a cheaper Θ schedule: ``delta_every3`` takes the Θ step on every third
train step, ``delta_frac0.5`` on half of each batch (``DeltaSTNOptimizer``'s ``response_every`` /
``response_fraction``); ``delta_clone`` puts Θ on a copy of the weights' SGD (the reference code's
choice; the library's default in the centered modes is Adam, lr 1e-3, which ``_adam`` names).

Optuna is a benchmark-only dependency (pip install optuna); without it that method is skipped.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import math
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hypertune as ht  # noqa: E402
from hypertune.experiments import SimpleCNN, TensorLoader, load_image_classification, mnist_mlp  # noqa: E402
from hypertune.kinds.dropout import RATE_INIT_SCALE  # noqa: E402
from hypertune.layers import dropout_per_example  # noqa: E402

DROPOUT_INIT = 0.05
DROPOUT_HIGH = 0.95
DROPOUT_SCALE = RATE_INIT_SCALE  # σ₀ of every dropout rate on its logit scale: the library's default
UNLABELLED_SCALE = 1.0  # σ₀ of the runs whose JSON or schedule name does not say (the default before 2)


def search_space(dataset: str) -> dict[str, tuple[float, float, bool]]:
    """name -> (low, high, discrete). The same for every method."""
    if dataset == "mnist":
        return {"input_dropout": (0.0, DROPOUT_HIGH, False), "dropout:1": (0.0, DROPOUT_HIGH, False),
                "dropout:2": (0.0, DROPOUT_HIGH, False)}
    return {
        "dropout:in": (0.0, DROPOUT_HIGH, False), "dropout:1": (0.0, DROPOUT_HIGH, False),
        "dropout:2": (0.0, DROPOUT_HIGH, False), "dropout:fc": (0.0, DROPOUT_HIGH, False),
        "cutout:holes": (0.0, 4.0, True), "cutout:length": (0.0, 20.0, True),
    }


def initial_values(dataset: str, dropout_init: float = DROPOUT_INIT) -> dict[str, float]:
    values = {k: dropout_init for k in search_space(dataset)}
    if dataset != "mnist":
        values.update({"cutout:holes": 1.0, "cutout:length": 4.0})
    return values


def build_model(dataset: str, dropout_init: float = DROPOUT_INIT) -> nn.Module:
    return mnist_mlp(dropout=dropout_init) if dataset == "mnist" else SimpleCNN(dropout=dropout_init)


def dropout_modules(dataset: str, model: nn.Module) -> dict[str, nn.Module]:
    if dataset == "mnist":
        return {"dropout:1": model[4], "dropout:2": model[7]}  # type: ignore[index]
    return {"dropout:in": model.drop_in, "dropout:1": model.drop1, "dropout:2": model.drop2,
            "dropout:fc": model.drop_fc}


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    was = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(x), batch):
        total += F.cross_entropy(model(x[i : i + batch]), y[i : i + batch], reduction="sum").item()
    model.train(was)
    return total / len(x)


class Budget:
    """Seconds spent training; the clock stops while a model is being scored, so every method
    pays only for its own training, however often it is evaluated.

    ``clock="cpu"`` counts this process's CPU time instead of wall-clock: with one torch thread
    it equals the wall-clock of an idle machine, and stays fair when other jobs share the cores.
    """

    def __init__(self, seconds: float, clock: str = "wall") -> None:
        self.seconds = seconds
        self._now = time.process_time if clock == "cpu" else time.perf_counter
        self.spent = 0.0
        self._since: float | None = self._now()

    def elapsed(self) -> float:
        running = 0.0 if self._since is None else self._now() - self._since
        return self.spent + running

    def exhausted(self) -> bool:
        return self.elapsed() >= self.seconds

    def pause(self) -> None:
        self.spent = self.elapsed()
        self._since = None

    def resume(self) -> None:
        self._since = self._now()


class Tracker:
    """Best validation loss against training wall-clock for one method."""

    def __init__(self, name: str, budget: Budget) -> None:
        self.name, self.budget = name, budget
        self.curve: list[tuple[float, float]] = []
        self.best_val, self.best_test, self.best_hparams = math.inf, math.nan, {}

    def score(self, model: nn.Module, data, hparams: dict[str, float]) -> float:
        """Validation loss now; the best model so far is kept to be tested once, at the end."""
        self.budget.pause()
        val = evaluate(model, *data["val"])
        if val < self.best_val:
            self.best_val, self.best_hparams = val, dict(hparams)
            self._best = (model, copy.deepcopy(model.state_dict()))
        self.curve.append((self.budget.elapsed(), self.best_val))
        self.budget.resume()
        return val

    def result(self, data) -> dict[str, Any]:
        if getattr(self, "_best", None) is not None:
            model, state = self._best
            model.load_state_dict(state)
            self.best_test = evaluate(model, *data["test"])
            self._best = None
        return {"method": self.name, "best_val_loss": self.best_val, "test_loss": self.best_test,
                "best_hparams": self.best_hparams, "curve": self.curve}


def train_plain(
    dataset: str, values: dict[str, float], data, args, tracker: Tracker, seed: int,
    epochs: int, eval_every: int = 0,
) -> float:
    """The plain model at fixed hyperparameters for ``epochs`` epochs (or until the deadline);
    returns its final validation loss. ``eval_every`` also scores it along the way."""
    torch.manual_seed(seed)
    model = build_model(dataset)
    for name, module in dropout_modules(dataset, model).items():
        module.p = values[name]
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    cutout = ht.Cutout() if dataset != "mnist" else None
    loader = TensorLoader(*data["train"], args.batch_size, seed=seed)
    step = 0
    for _ in range(epochs):
        if tracker.budget.exhausted():
            break
        for x, y in loader:
            if tracker.budget.exhausted():
                break
            if dataset == "mnist" and values["input_dropout"] > 0:
                x = dropout_per_example(x, torch.tensor([values["input_dropout"]]))
            if cutout is not None:
                x = cutout.apply(x, {"holes": torch.tensor([round(values["cutout:holes"])]),
                                     "length": torch.tensor([round(values["cutout:length"])])})
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            step += 1
            if eval_every and step % eval_every == 0:
                tracker.score(model, data, values)
    return tracker.score(model, data, values)


def sample_random(space: dict[str, tuple[float, float, bool]], rng: random.Random) -> dict[str, float]:
    return {k: float(round(rng.uniform(lo, hi))) if disc else rng.uniform(lo, hi) for k, (lo, hi, disc) in space.items()}


def run_search(method: str, dataset: str, data, args, seed: int) -> dict[str, Any]:
    tracker = Tracker(method, Budget(args.budget, args.clock))
    space = search_space(dataset)
    rng = random.Random(seed)
    trial = 0
    if method == "untuned":  # one run at the initial values for the whole budget, like the STN runs
        train_plain(dataset, initial_values(dataset, args.dropout_init), data, args, tracker, seed, 10**9, args.eval_every)
        trial = 1
    elif method == "random":
        while not tracker.budget.exhausted():
            train_plain(dataset, sample_random(space, rng), data, args, tracker, seed + trial, args.trial_epochs)
            trial += 1
    elif method == "optuna":
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
        study.enqueue_trial(initial_values(dataset, args.dropout_init))

        def objective(t: "optuna.Trial") -> float:
            values = {k: float(t.suggest_int(k, int(lo), int(hi)) if disc else t.suggest_float(k, lo, hi))
                      for k, (lo, hi, disc) in space.items()}
            return train_plain(dataset, values, data, args, tracker, seed + t.number, args.trial_epochs)

        while not tracker.budget.exhausted():
            study.optimize(objective, n_trials=1)
            trial += 1
    out = tracker.result(data)
    out["trials"] = trial
    return out


def hyper_specs(dataset: str, dropout_init: float = DROPOUT_INIT,
                dropout_scale: float = DROPOUT_SCALE) -> dict[str, Any]:
    rate = {"init": dropout_init, "high": DROPOUT_HIGH, "init_scale": dropout_scale}
    if dataset == "mnist":
        return {"input_dropout": ht.InputDropout(**rate), "dropout": ht.DropoutRate(**rate, per_site=True)}
    return {"dropout": ht.DropoutRate(**rate, per_site=True),
            "cutout": ht.Cutout(holes=ht.HParam(init=1, low=0, high=4, discrete=True),
                                length=ht.HParam(init=4, low=0, high=20, discrete=True))}


STN_METHOD = re.compile(
    r"^(stn|centered|delta)(?:_every(\d+))?(?:_frac([0-9.]+))?(?:_(adam|clone))?(?:_lr([0-9.]+(?:e-\d+)?))?(_pinit)?(_fixscale)?$"
)


def stn_method(method: str) -> tuple[str, dict[str, Any]] | None:
    """``delta``, or a variant such as ``delta_every3`` / ``delta_frac0.5`` / ``delta_clone`` (Θ on a
    copy of the weights' SGD instead of the library's default) / ``delta_adam`` (Θ on Adam, lr 1e-3:
    the default of the centered modes, not of ``stn``) / ``delta_every3_lr3e-3`` (that Adam's learning
    rate) / ``delta_pinit`` (P, Θ's projection, starts at nn.Linear's default init instead of zero) /
    ``delta_fixscale`` (σ held at σ₀, ``tune_scales=False``: the reference code's default):
    (mode, optimizer options)."""
    match = STN_METHOD.match(method)
    if match is None:
        return None
    options: dict[str, Any] = {}
    if match.group(2):
        options["response_every"] = int(match.group(2))
    if match.group(3):
        options["response_fraction"] = float(match.group(3))
    if match.group(4):
        options["response_optimizer"] = match.group(4)
    if match.group(5):
        options["response_lr"] = float(match.group(5))
    if match.group(6):
        options["projection_init"] = True
    if match.group(7):
        options["tune_scales"] = False
    return match.group(1), options


def run_stn(method: str, dataset: str, data, args, seed: int, out_dir: Path | None) -> dict[str, Any]:
    mode, options = stn_method(method)  # type: ignore[misc]
    torch.manual_seed(seed)
    tracker = Tracker(method, Budget(args.budget, args.clock))
    specs = hyper_specs(dataset, args.dropout_init, args.dropout_scale)
    model = ht.HyperModel.wrap(build_model(dataset, args.dropout_init), specs)
    if options.pop("projection_init", False):
        # An experiment on the P = 0 saddle: at δλ = 0 the centered modes still compute w₀ exactly.
        for layer in model.hyper_layers().values():
            layer.hyper_projection.reset_parameters()
    opt = ht.DeltaSTNOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9), mode=mode,  # type: ignore[arg-type]
        warmup_steps=args.warmup_steps, **{**args.stn_options, **options},
    )
    loader = TensorLoader(*data["train"], args.batch_size, seed=seed)
    val_stream = TensorLoader(*data["val"], args.batch_size, seed=seed + 1).cycle()
    step, done = 0, False
    while not done:
        for x, y in loader:
            if tracker.budget.exhausted():
                done = True
                break
            opt.train_step(x, y, F.cross_entropy)
            step += 1
            if step % 5 == 0:
                opt.val_step(*next(val_stream), F.cross_entropy)
            if step % args.eval_every == 0:
                tracker.score(model, data, model.hparam_values())
    tracker.score(model, data, model.hparam_values())
    final_hparams = model.hparam_values()
    out = tracker.result(data)
    out["steps"] = step
    out["final_hparams"] = final_hparams
    if out_dir is not None:
        # λ moves only in val steps: their rows are the schedule (gzip keeps the files small).
        # σ (the perturbation std, tuned by the entropy term) is kept too: "scale:<name>".
        schedule = [{"step": r.step, "loss": round(r.loss, 5), **{k: round(v, 5) for k, v in r.hparams.items()},
                     **{f"scale:{k}": round(v, 5) for k, v in r.scales.items()}}
                    for r in opt.history if r.kind == "val"]
        start = "" if args.dropout_init == DROPOUT_INIT else f"-from{args.dropout_init:g}"
        start += f"-scale{args.dropout_scale:g}"
        with gzip.open(out_dir / f"schedule_{dataset}{start}_{method}_seed{seed}.json.gz", "wt") as f:
            json.dump(schedule, f)
    return out


def plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        if r["curve"]:
            t, v = zip(*r["curve"])
            ax.step(t, v, where="post", label=f"{r['method']} (seed {r['seed']})")
    ax.set_xlabel(f"training seconds ({results[0].get('clock', 'wall')} clock)" if results else "seconds")
    ax.set_ylabel("best validation loss")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def read_schedule(path: Path) -> tuple[str, str, int, list[dict[str, float]]]:
    """(dataset label, method, seed, rows) of a schedule file, from its name and content."""
    match = re.match(r"schedule_(mnist|fashionmnist)(?:-from([0-9.]+))?(?:-scale([0-9.]+))?_(.+)_seed(\d+)\.json\.gz$",
                     path.name)
    if match is None:
        raise SystemExit(f"{path}: not a compare.py schedule (schedule_<dataset>_<method>_seed<n>.json.gz)")
    start = float(match.group(2)) if match.group(2) else DROPOUT_INIT
    scale = float(match.group(3)) if match.group(3) else UNLABELLED_SCALE
    label = _dataset_label({"dataset": match.group(1), "dropout_init": start, "dropout_scale": scale})
    with gzip.open(path, "rt") as f:
        return label, match.group(4), int(match.group(5)), json.load(f)


def _rate_names(row: dict[str, float]) -> list[str]:
    """The dropout rates in a schedule row: not its step and loss, Cutout's integer counts or σ."""
    return [k for k in row if k not in ("step", "loss") and not k.startswith(("cutout", "scale:"))]


def schedule_table(paths: list[Path], steps: list[int]) -> str:
    """Each dropout rate and its σ (where the file has it) at the λ steps nearest ``steps``."""
    lines = ["| dataset | method | seed | step | rates (σ) |", "|---|---|---:|---:|---|"]
    for path in paths:
        dataset, method, seed, rows = read_schedule(path)
        for want in steps:
            row = min(rows, key=lambda r: abs(r["step"] - want))
            cells = [f"{k} {row[k]:.3f}" + (f" ({row['scale:' + k]:.2f})" if f"scale:{k}" in row else "")
                     for k in _rate_names(row)]
            lines.append(f"| {dataset} | {method} | {seed} | {row['step']} | {', '.join(cells)} |")
    return "\n".join(lines)


def plot_schedules(paths: list[Path], out: Path) -> None:
    """λ against step for each STN run: one row of panels per dataset, one column per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {}
    for path in paths:
        dataset, method, _, rows = read_schedule(path)
        if (dataset, method) in runs:
            raise SystemExit(f"{path}: a second seed of {method} on {dataset}; plot one seed at a time")
        runs[dataset, method] = rows
    datasets = sorted({d for d, _ in runs})
    methods = [m for m in ("stn", "centered", "delta") if any(k[1] == m for k in runs)]
    methods += sorted({m for _, m in runs} - set(methods))
    fig, axes = plt.subplots(len(datasets), len(methods), figsize=(3.2 * len(methods), 2.8 * len(datasets)),
                             sharey="row", squeeze=False)
    for i, dataset in enumerate(datasets):
        for j, method in enumerate(methods):
            ax = axes[i][j]
            rows = runs.get((dataset, method), [])
            for name in _rate_names(rows[0]) if rows else []:  # cutout counts and σ: in the JSON
                ax.plot([r["step"] for r in rows], [r[name] for r in rows], label=name.split(":")[-1])
            ax.set_title(f"{dataset}: {method}", fontsize=9)
            ax.set_xlabel("train step", fontsize=8)
            if j == 0:
                ax.set_ylabel("dropout rate")
            if rows:
                ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def _dataset_label(r: dict[str, Any]) -> str:
    """The dataset, and the dropout start and σ₀ where a run did not use the default ones."""
    init, scale = r.get("dropout_init", DROPOUT_INIT), r.get("dropout_scale", UNLABELLED_SCALE)
    if not stn_method(r.get("method", "stn")):
        scale = DROPOUT_SCALE  # σ₀ exists only in the STN modes
    notes = ([] if init == DROPOUT_INIT else [f"dropout from {init:g}"]) + \
        ([] if scale == DROPOUT_SCALE else [f"σ₀ {scale:g}"])
    return f"{r['dataset']} ({', '.join(notes)})" if notes else r["dataset"]


def markdown_table(results: list[dict[str, Any]]) -> str:
    """One row per method and seed, best validation loss first within each dataset."""
    lines = ["| dataset | method | seed | trials / steps | best val loss | its test loss | hyperparameters at the best |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in sorted(results, key=lambda r: (_dataset_label(r), r["seed"], r["best_val_loss"])):
        work = f"{r['steps']} steps" if "steps" in r else f"{r['trials']} trials"
        hp = ", ".join(f"{k}={v:.3g}" for k, v in r["best_hparams"].items())
        lines.append(f"| {_dataset_label(r)} | {r['method']} | {r['seed']} | {work} | {r['best_val_loss']:.4f} "
                     f"| {r['test_loss']:.4f} | {hp} |")
    return "\n".join(lines)


def summary_table(results: list[dict[str, Any]]) -> str:
    """One row per dataset and method: best validation loss per seed and their mean, lowest mean
    first. Seeds run with the same data, so a method's spread over seeds is its noise."""
    by: dict[tuple[str, str], dict[int, float]] = {}
    for r in results:
        by.setdefault((_dataset_label(r), r["method"]), {})[int(r["seed"])] = r["best_val_loss"]
    seeds = sorted({s for v in by.values() for s in v})
    lines = ["| dataset | method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | seeds |",
             "|---|---|" + "---:|" * (len(seeds) + 2)]
    rows = sorted(by.items(), key=lambda kv: (kv[0][0], sum(kv[1].values()) / len(kv[1])))
    for (dataset, method), values in rows:
        cells = " | ".join(f"{values[s]:.4f}" if s in values else "–" for s in seeds)
        mean = sum(values.values()) / len(values)
        lines.append(f"| {dataset} | {method} | {cells} | {mean:.4f} | {len(values)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["mnist", "fashionmnist"], default="fashionmnist")
    parser.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "datasets"))
    parser.add_argument("--methods", default="untuned,random,optuna,stn,centered,delta")
    parser.add_argument("--budget", type=float, default=600.0, help="training seconds per method")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="what the budget counts: wall-clock, or this process's CPU time (use with --threads 1)")
    parser.add_argument("--train-subset", type=int, default=0, help="use this many training examples (0: all)")
    parser.add_argument("--val-subset", type=int, default=0, help="score on this many validation examples (0: all)")
    parser.add_argument("--trial-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--warmup-steps", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--response-fraction", type=float, default=1.0)
    parser.add_argument("--dropout-init", type=float, default=DROPOUT_INIT,
                        help="every dropout rate starts here (untuned holds it; Optuna's first trial)")
    parser.add_argument("--dropout-scale", type=float, default=DROPOUT_SCALE,
                        help="σ₀, the STN modes' initial perturbation std of every dropout rate (logit scale)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--png", default=None)
    parser.add_argument("--table-from", nargs="+", default=None, metavar="JSON",
                        help="print the markdown tables of earlier runs' JSON files (with --png: plot the "
                             "--seeds runs' curves) and exit")
    parser.add_argument("--plot-schedules", nargs="+", default=None, metavar="JSON_GZ",
                        help="plot these schedule files into --png and exit")
    parser.add_argument("--schedule-table", nargs="+", default=None, metavar="JSON_GZ",
                        help="print each dropout rate and its σ in these schedule files at --at steps, and exit")
    parser.add_argument("--at", default="200,1000,2000,3000", help="steps for --schedule-table")
    args = parser.parse_args(argv)
    if args.schedule_table:
        print(schedule_table([Path(p) for p in args.schedule_table], [int(x) for x in args.at.split(",")]))
        return []
    if args.plot_schedules:
        if not args.png:
            parser.error("--plot-schedules needs --png OUT")
        plot_schedules([Path(p) for p in args.plot_schedules], Path(args.png))
        return []
    if args.table_from:
        results = [r for path in args.table_from for r in json.loads(Path(path).read_text())]
        print(markdown_table(results))
        print()
        print(summary_table(results))
        if args.png:  # the curves of the --seeds runs, one dataset per figure
            seeds = {int(x) for x in args.seeds.split(",")}
            shown = [r for r in results if int(r["seed"]) in seeds]
            datasets = sorted({r["dataset"] for r in shown})
            if len(datasets) != 1:
                parser.error(f"--png with --table-from plots one dataset; these files hold {datasets}")
            plot(shown, Path(args.png), f"{datasets[0]}: best validation loss at equal budget")
        return results
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in ("untuned", "random", "optuna") and stn_method(m) is None]
    if unknown:
        parser.error(f"unknown method(s) {unknown}: use untuned, random, optuna, stn, centered, delta, "
                     "or a variant such as delta_every3 / delta_frac0.5")
    args.stn_options = {} if args.response_fraction == 1.0 else {"response_fraction": args.response_fraction}
    torch.set_num_threads(args.threads)
    data = load_image_classification(args.dataset, args.data_root, val_fraction=0.15, seed=0)
    if args.train_subset:
        data["train"] = tuple(t[: args.train_subset] for t in data["train"])  # type: ignore[assignment]
    if args.val_subset:
        data["val"] = tuple(t[: args.val_subset] for t in data["val"])  # type: ignore[assignment]
    out_dir = Path(args.json).parent if args.json else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    print(f"{'method':>9} {'seed':>4} {'best val':>9} {'test':>8}  hyperparameters")
    for seed in [int(s) for s in args.seeds.split(",")]:
        for method in methods:
            if method == "optuna":
                try:
                    import optuna  # noqa: F401
                except ImportError:
                    print("optuna not installed: skipping (pip install optuna)")
                    continue
            if stn_method(method) is not None:
                r = run_stn(method, args.dataset, data, args, seed, out_dir)
            else:
                r = run_search(method, args.dataset, data, args, seed)
            r.update({"dataset": args.dataset, "seed": seed, "budget_s": args.budget, "clock": args.clock,
                      "dropout_init": args.dropout_init,
                      # σ₀ exists only in the STN modes: search runs keep the default label
                      "dropout_scale": args.dropout_scale if stn_method(method) else DROPOUT_SCALE})
            results.append(r)
            hp = ", ".join(f"{k}={v:.3g}" for k, v in r["best_hparams"].items())
            print(f"{method:>9} {seed:>4} {r['best_val_loss']:9.4f} {r['test_loss']:8.4f}  {hp}", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1))
    if args.png:
        plot(results, Path(args.png), f"{args.dataset}: best validation loss at equal budget")
    print(markdown_table(results))
    return results


if __name__ == "__main__":
    main()
