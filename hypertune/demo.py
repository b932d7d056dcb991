"""The README's first command: tune dropout and weight decay on real data in well under a minute.

Trains the same MLP twice on scikit-learn's bundled handwritten digits (real scans, shipped with
scikit-learn, no download): once with the starting hyperparameters held fixed, once with
Δ-STN tuning them online, and prints both validation losses as training goes.

    python -m hypertune.demo [--epochs 150] [--seed 0]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

import hypertune as ht


def load_digits_split(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise SystemExit("the demo needs scikit-learn: pip install 'hypertune-stn[demo]'") from err
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    # A small training set, so that regularization decides the validation loss.
    n_train, n_val = 300, 300
    return {
        "train": (x[:n_train], y[:n_train]),
        "val": (x[n_train : n_train + n_val], y[n_train : n_train + n_val]),
        "test": (x[n_train + n_val :], y[n_train + n_val :]),
    }


def make_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 512), nn.ReLU(), nn.Dropout(0.05),
        nn.Linear(512, 512), nn.ReLU(), nn.Dropout(0.05),
        nn.Linear(512, 10),
    )


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    out = model(x)
    model.train()
    return F.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item()


def batches(x: torch.Tensor, y: torch.Tensor, size: int, gen: torch.Generator):
    order = torch.randperm(len(x), generator=gen)
    for i in range(0, len(x), size):
        idx = order[i : i + size]
        yield x[idx], y[idx]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=_positive_int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=_positive_int, default=32)
    parser.add_argument("--val-batch-size", type=_positive_int, default=32,
                        help="validation examples per λ step (a larger batch: a less noisy λ step)")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--lr-schedule", choices=["cosine", "constant"], default="cosine",
                        help="the weights' learning rate in both runs: cosine decay to 0 ends them on "
                             "settled weights, so the final comparison is not one epoch's SGD noise")
    parser.add_argument("--init-scale", type=float, default=None,
                        help="σ₀ of every hyperparameter (default: each kind's own)")
    parser.add_argument("--print-every", type=_positive_int, default=10)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    torch.manual_seed(args.seed)
    data = load_digits_split(args.seed)
    xt, yt = data["train"]
    xv, yv = data["val"]

    untuned = make_mlp()
    tuned_net = copy.deepcopy(untuned)  # both runs start from the same weights

    # The two lines a user adds: wrap the model, swap the optimizer.
    sigma0 = {} if args.init_scale is None else {"init_scale": args.init_scale}
    model = ht.HyperModel.wrap(
        tuned_net,
        hparams={
            "input_dropout": ht.InputDropout(init=0.05, **sigma0),
            "dropout": ht.DropoutRate(init=0.05, **sigma0),
            "weight_decay": ht.WeightDecay(init=1e-4, **sigma0),
        },
    )
    opt = ht.DeltaSTNOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9), warmup_steps=50
    )
    plain_opt = torch.optim.SGD(untuned.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    schedulers = []
    if args.lr_schedule == "cosine":
        schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=args.epochs) for o in (opt.optimizer, plain_opt)]

    gen_t, gen_p, gen_v = (torch.Generator().manual_seed(args.seed + k) for k in range(3))
    # Each run draws its dropout masks from its own random stream, so the untuned run is the same
    # whatever the tuned one does (both streams start from the seed).
    streams = {"untuned": torch.get_rng_state(), "tuned": torch.get_rng_state()}
    start = time.time()
    header = f"{'epoch':>5} {'val loss (untuned)':>19} {'val loss (Δ-STN)':>17}   hyperparameters"
    print(header)
    print("-" * len(header))
    step = 0
    for epoch in range(1, args.epochs + 1):
        torch.set_rng_state(streams["untuned"])
        for x, y in batches(xt, yt, args.batch_size, gen_p):
            plain_opt.zero_grad()
            F.cross_entropy(untuned(x), y).backward()
            plain_opt.step()
        streams["untuned"] = torch.get_rng_state()
        torch.set_rng_state(streams["tuned"])
        for x, y in batches(xt, yt, args.batch_size, gen_t):
            opt.train_step(x, y, F.cross_entropy)
            step += 1
            if step % 5 == 0:  # T_train / T_valid = 5 / 1, as in the paper
                idx = torch.randint(0, len(xv), (args.val_batch_size,), generator=gen_v)
                opt.val_step(xv[idx], yv[idx], F.cross_entropy)
        streams["tuned"] = torch.get_rng_state()
        for scheduler in schedulers:
            scheduler.step()
        if epoch % args.print_every == 0 or epoch == 1:
            vu = evaluate(untuned, xv, yv)[0]
            vt = evaluate(model, xv, yv)[0]
            hp = ", ".join(
                f"{k}={v:.3g}" for k, v in model.hparam_values().items()
            )
            print(f"{epoch:5d} {vu:19.4f} {vt:17.4f}   {hp}", flush=True)
    results = {}
    for name, net in (("untuned", untuned), ("tuned", model)):
        val_loss, val_acc = evaluate(net, xv, yv)
        test_loss, test_acc = evaluate(net, *data["test"])
        results.update({f"{name}_val_loss": val_loss, f"{name}_test_loss": test_loss,
                        f"{name}_test_acc": test_acc})
    print(
        f"\nafter {args.epochs} epochs ({time.time() - start:.0f} s): "
        f"validation loss {results['untuned_val_loss']:.4f} untuned vs {results['tuned_val_loss']:.4f} "
        f"tuned; test loss {results['untuned_test_loss']:.4f} vs {results['tuned_test_loss']:.4f}, "
        f"test accuracy {results['untuned_test_acc']:.3f} vs {results['tuned_test_acc']:.3f}"
    )
    print("tuned values:", {k: round(v, 5) for k, v in model.hparam_values().items()})
    results.update({f"final:{k}": v for k, v in model.hparam_values().items()})
    return results


if __name__ == "__main__":
    main()
