#!/usr/bin/env python
"""Why a linreg_toy run misses: Θ and the hypergradient against their exact values, during the run.

The toy's linear model has a closed-form best response w*(λ), so at any step of a run one can
compare what the tuner works with against the truth:

* ``w0_err``: |w₀ − w*(λ)| / |w*(λ)|, how far the weights lag the current λ;
* ``cos`` and ``ratio``: the direction and length of Θ's response dw/du (u: λ's tuning
  coordinate, ln c or the rate's logit) against the exact dw*/du (central difference of w*);
* ``est`` and ``exact``: the hypergradient dV/du the λ step follows (∇V(w₀)·Θ) and the true
  one (∇V(w*)·dw*/du); ``agree`` says whether their signs match.

It runs linreg_toy.py's own loop with its SETTINGS (or the same overrides), only reading the
model every ``--every`` steps, so the run itself is the one linreg_toy.py makes.

    python benchmarks/linreg_response_check.py --data-dir ../shared/datasets/uci/energy \\
        --hparam weight_decay --seed 2 --every 500 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import linreg_toy as lt  # noqa: E402

import hypertune as ht  # noqa: E402


def exact_response(problem: lt.Problem, hparam: str, model: ht.HyperModel, h: float = 1e-5):
    """(λ, w*(λ), dw*/du) at the model's current tuning coordinate u."""
    hp = model.hparams
    u = float(hp.unconstrained.detach()[0])
    path = lt.RidgePath(problem.X, problem.y, lt.penalty_diag(problem.X, hparam))

    def w_star(v: float) -> np.ndarray:
        lam = float(hp.constrain(torch.tensor([[v]], dtype=torch.float64), "lam")[0])
        return path.weights(lt.alpha_of(hparam, lam))

    lam = float(hp.constrain(torch.tensor([[u]], dtype=torch.float64), "lam")[0])
    return lam, w_star(u), (w_star(u + h) - w_star(u - h)) / (2 * h)


def learned_response(model: ht.HyperModel) -> tuple[np.ndarray, np.ndarray]:
    """(w₀, Θ's dw/du) of the toy's one hyper-layer: W(δu) = W₀ + diag(P δu) W_resp."""
    (layer,) = model.hyper_layers().values()
    s_w, _ = layer.split(layer.hyper_projection.weight.detach().T)  # (1, out): P for δu = 1
    theta = s_w.reshape(-1, 1) * layer.response_weight.detach()
    return layer.weight.detach().numpy().ravel(), theta.numpy().ravel()


def val_gradient(problem: lt.Problem, w: np.ndarray) -> np.ndarray:
    """∇_w of the validation MSE."""
    return 2.0 / len(problem.yv) * problem.Xv.T @ (problem.Xv @ w - problem.yv)


def probe_row(step: int, problem: lt.Problem, hparam: str, model: ht.HyperModel) -> dict:
    lam, w_star, jac = exact_response(problem, hparam, model)
    w0, theta = learned_response(model)
    est = float(val_gradient(problem, w0) @ theta)
    exact = float(val_gradient(problem, w_star) @ jac)
    norm_jac, norm_theta = np.linalg.norm(jac), np.linalg.norm(theta)
    return {
        "step": step,
        "lambda": lam,
        "w0_err": float(np.linalg.norm(w0 - w_star) / max(np.linalg.norm(w_star), 1e-300)),
        "cos": float(theta @ jac / (norm_theta * norm_jac)) if norm_theta > 0 and norm_jac > 0 else float("nan"),
        "ratio": float(norm_theta / norm_jac) if norm_jac > 0 else float("nan"),
        "est": est,
        "exact": exact,
        "agree": bool(np.sign(est) == np.sign(exact)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--hparam", choices=lt.HPARAMS, default="weight_decay")
    parser.add_argument("--method", choices=("delta", "centered"), default="delta")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=500, help="probe every this many steps")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--warmup-steps", type=int)
    parser.add_argument("--train-per-val", type=int)
    parser.add_argument("--response-every", type=int)
    parser.add_argument("--init-scale", type=float)
    parser.add_argument("--init", type=float, help="λ at step 0 (the toy's SETTINGS['init'] otherwise)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings = dict(lt.SETTINGS)
    for key in ("steps", "warmup_steps", "train_per_val", "response_every"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.init_scale is not None:
        settings["init_scale"] = dict.fromkeys(lt.HPARAMS, args.init_scale)
    if args.init is not None:
        settings["init"] = dict(settings["init"], **{args.hparam: args.init})
    problem = lt.load_problem(args.data_dir, args.seed, settings["train_per_feature"], settings["n_val"])
    optimum = lt.exact_optimum(problem, args.hparam)
    rows: list[dict] = []
    out = lt.run_method(
        problem, args.hparam, args.method, args.seed, settings,
        probe=lambda step, model: rows.append(probe_row(step, problem, args.hparam, model)),
        probe_every=args.every,
    )
    print(f"{problem.name} {args.hparam} seed {args.seed}: λ* = {optimum.lam:.5g}, final λ = {out['lambda']:.5g}")
    print(f"{'step':>6} {'λ':>10} {'w0_err':>8} {'cos':>7} {'ratio':>8} {'est':>10} {'exact':>10} agree")
    for r in rows:
        print(f"{r['step']:>6} {r['lambda']:>10.4g} {r['w0_err']:>8.2g} {r['cos']:>7.3f} {r['ratio']:>8.3g} "
              f"{r['est']:>10.3g} {r['exact']:>10.3g} {'yes' if r['agree'] else 'NO'}")
    after = [r for r in rows if r["step"] > settings["warmup_steps"]]
    if after:
        print(f"after the warm-up the λ step's sign was right at {sum(r['agree'] for r in after)} of {len(after)} probes")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"dataset": problem.name, "hparam": args.hparam, "seed": args.seed,
                                               "lambda_exact": optimum.lam, "lambda": out["lambda"],
                                               "settings": settings, "probes": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
