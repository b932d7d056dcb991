"""Is Δ-STN's hypergradient for a site biased? Θ's estimate against retraining, from one state.

At equal steps Δ-STN leaves the dropout that feeds the output layer far lower than centered STN
(RESULTS.md, "Δ-STN against centered STN at an equal number of steps"). This probe asks which
mode's hypergradient is closer to the truth at one point of a run:

1. run oracle_gap.py's tuned loop for ``--steps`` steps in ``--run-mode`` and keep that state;
2. from it, for each mode, fit Θ alone for ``--fit-steps`` steps (w₀ restored after every
   step, so only Θ moves) and read the hypergradient the λ step would follow:
   dV/du_i = ∇_δ V(w₀ + Θδ) at δ = 0, with V the loss on ``--val-rows`` validation images;
3. the truth at the horizon ``--horizon``: train w₀ alone (no Θ, no λ steps) for that many steps
   from the same state at u_i ± ``--delta`` with the same batches and random draws, and take
   (V₊ − V₋) / 2δ;
4. with ``--trace-steps N``: from the same state, train w₀ and Θ together in each mode for N
   steps at the state's λ (held: no λ steps), reading the hypergradient on each 5th step's
   validation batch, as val_step would. Under RMSprop a coordinate drifts at about
   mean / RMS of its hypergradient, so that ratio is how fast each mode would move each rate.

    python benchmarks/oracle_runs/response_probe.py --dataset fashionmnist --steps 1000 --seed 0

Prints one row per hyperparameter and the JSON of every number.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]

import compare  # noqa: E402

import hypertune as ht  # noqa: E402
from hypertune.context import Perturbation  # noqa: E402
from hypertune.experiments import TensorLoader, load_image_classification  # noqa: E402

T_TRAIN_PER_VAL = 5


def batches(data, batch_size: int, seed: int):
    loader = TensorLoader(*data["train"], batch_size, seed=seed)
    while True:
        yield from loader


def run_to(args, data) -> tuple[ht.HyperModel, ht.DeltaSTNOptimizer]:
    torch.manual_seed(args.seed)
    model = ht.HyperModel.wrap(compare.build_model(args.dataset, args.start), compare.hyper_specs(args.dataset, args.start))
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                               warmup_steps=200, mode=args.run_mode)
    train = batches(data, 128, args.seed)
    val = TensorLoader(*data["val"], 128, seed=args.seed + 1).cycle()
    for step in range(1, args.steps + 1):
        opt.train_step(*next(train), F.cross_entropy)
        if step % T_TRAIN_PER_VAL == 0:
            opt.val_step(*next(val), F.cross_entropy)
    return model, opt


def val_loss(model: ht.HyperModel, x, y) -> float:
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train()
    return float(F.cross_entropy(out, y))


def estimated_hypergradient(model: ht.HyperModel, x, y) -> torch.Tensor:
    """∇_δ V(w₀ + Θδ) at δ = 0 (centered modes): what val_step follows with σ held."""
    hp = model.hparams
    lam = hp.unconstrained.detach().unsqueeze(0)
    delta = torch.zeros_like(lam, requires_grad=True)
    model.eval()
    with model.evaluated_at(Perturbation(hp, lam, delta)):
        loss = F.cross_entropy(model(x), y)
    model.train()
    (grad,) = torch.autograd.grad(loss, delta)
    return grad[0]


def fit_response(model: ht.HyperModel, mode: str, data, args) -> ht.HyperModel:
    """Θ alone for ``fit_steps`` steps in ``mode``: w₀ (and its running state) restored each step."""
    model = copy.deepcopy(model)
    base = [(p, p.detach().clone()) for p in model.base_parameters()]
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.base_parameters(), lr=0.01, momentum=0.9),
                               mode=mode, response_every=1)
    torch.manual_seed(args.seed + 100)
    train = batches(data, 128, args.seed + 100)
    for _ in range(args.fit_steps):
        opt.train_step(*next(train), F.cross_entropy)
        with torch.no_grad():
            for p, saved in base:
                p.copy_(saved)
    return model


def retrained_loss(model: ht.HyperModel, index: int, shift: float, data, args, x, y) -> float:
    """V after ``horizon`` w₀-only steps at u_index + shift, same batches and draws for every shift."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.hparams.unconstrained[index] += shift
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.base_parameters(), lr=0.01, momentum=0.9),
                               mode="centered", response_every=10**9)
    torch.manual_seed(args.seed + 200)
    train = batches(data, 128, args.seed + 200)
    for _ in range(args.horizon):
        opt.train_step(*next(train), F.cross_entropy)
    with torch.no_grad():
        model.hparams.unconstrained[index] -= shift
    return val_loss(model, x, y)


def traced_hypergradients(model: ht.HyperModel, mode: str, data, args) -> torch.Tensor:
    """(N // 5, h) hypergradients on the validation batches of N train steps in ``mode``, λ held."""
    model = copy.deepcopy(model)
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.base_parameters(), lr=0.01, momentum=0.9), mode=mode)
    torch.manual_seed(args.seed + 300)
    train = batches(data, 128, args.seed + 300)
    val = TensorLoader(*data["val"], 128, seed=args.seed + 301).cycle()
    rows = []
    for step in range(1, args.trace_steps + 1):
        opt.train_step(*next(train), F.cross_entropy)
        if step % T_TRAIN_PER_VAL == 0:
            rows.append(estimated_hypergradient(model, *next(val)))
    return torch.stack(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashionmnist", choices=["mnist", "fashionmnist"])
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "datasets"))
    parser.add_argument("--start", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=1000, help="steps of the tuned run before probing")
    parser.add_argument("--run-mode", default="centered", choices=["delta", "centered"])
    parser.add_argument("--fit-steps", type=int, default=600, help="Θ-only steps per mode")
    parser.add_argument("--horizon", type=int, default=400, help="w₀-only steps of each retraining (0: no truth)")
    parser.add_argument("--delta", type=float, default=0.25, help="shift of u (the rate's logit) for the truth")
    parser.add_argument("--val-rows", type=int, default=3000)
    parser.add_argument("--names", nargs="*", default=None, help="hyperparameters to retrain for (default: rates)")
    parser.add_argument("--trace-steps", type=int, default=0, help="w₀+Θ steps per mode for the drift statistics")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_image_classification(args.dataset, args.data_root, val_fraction=0.15, seed=0)
    data["train"] = tuple(t[:2000] for t in data["train"])
    x_val, y_val = (t[: args.val_rows] for t in data["val"])

    t0 = time.time()
    model, _ = run_to(args, data)
    names = model.hparams.names
    probe = args.names or [n for n in names if "cutout" not in n]
    out = {"settings": {k: str(v) for k, v in vars(args).items()}, "values": model.hparam_values(),
           "estimates": {}, "truth": {}}
    out["estimates"]["as run"] = estimated_hypergradient(model, x_val, y_val).tolist()
    for mode in ("delta", "centered"):
        fitted = fit_response(model, mode, data, args)
        out["estimates"][mode] = estimated_hypergradient(fitted, x_val, y_val).tolist()
    print(f"run and fits: {time.time() - t0:.0f} s", file=sys.stderr)
    if args.trace_steps:
        out["trace"] = {}
        for mode in ("delta", "centered"):
            g = traced_hypergradients(model, mode, data, args)
            out["trace"][mode] = {"mean": g.mean(0).tolist(), "rms": g.square().mean(0).sqrt().tolist(),
                                  "positive": (g > 0).double().mean(0).tolist()}
        print(f"traces: {time.time() - t0:.0f} s", file=sys.stderr)
    for name in probe if args.horizon else []:
        i = names.index(name)
        plus = retrained_loss(model, i, args.delta, data, args, x_val, y_val)
        minus = retrained_loss(model, i, -args.delta, data, args, x_val, y_val)
        out["truth"][name] = {"plus": plus, "minus": minus, "grad": (plus - minus) / (2 * args.delta)}
        print(f"truth {name}: {time.time() - t0:.0f} s", file=sys.stderr)

    print(f"{args.dataset}, {args.run_mode} run to step {args.steps}, seed {args.seed}; "
          f"Θ fitted {args.fit_steps} steps; truth over {args.horizon} steps, δu = ±{args.delta}")
    print(f"{'hparam':>16} {'value':>7} {'as run':>10} {'delta fit':>10} {'centered fit':>12} {'retrained':>10}")
    for name in probe:
        i = names.index(name)
        est = {k: v[i] for k, v in out["estimates"].items()}
        print(f"{name:>16} {out['values'][name]:7.3f} {est['as run']:10.2e} {est['delta']:10.2e} "
              f"{est['centered']:12.2e} {out['truth'][name]['grad'] if args.horizon else float('nan'):10.2e}")
    if args.trace_steps:
        print(f"drift over {args.trace_steps} steps at the state's λ: mean / RMS of the hypergradient "
              "(negative: the rate rises), and the share of λ steps that would lower the rate")
        print(f"{'hparam':>16} {'delta':>8} {'centered':>9} {'delta lowers':>13} {'centered lowers':>16}")
        for name in probe:
            i = names.index(name)
            t = out["trace"]
            drift = {m: t[m]["mean"][i] / t[m]["rms"][i] for m in t}
            print(f"{name:>16} {drift['delta']:8.3f} {drift['centered']:9.3f} {t['delta']['positive'][i]:13.2f} "
                  f"{t['centered']['positive'][i]:16.2f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
