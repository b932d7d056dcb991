"""MNIST, 784-1200-1200-1200-10 MLP: tune input dropout and two hidden dropouts (3 hyperparameters).

The Δ-STN paper's set-up (Bae & Grosse 2020, after MacKay et al. 2019): SGD (momentum 0.9, lr
0.01) on the weights, RMSprop (lr 0.01) on λ and σ, τ = 1e-3, 5 train steps per val step, 5
warm-up epochs, every rate starting at 0.05 within [0, 0.95], 15% of the training set held out
for validation, the test set untouched.

    python examples/mnist_mlp.py --epochs 20 --out runs/mnist_mlp
    python examples/mnist_mlp.py --smoke
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common  # noqa: E402
from _common import sigma0  # noqa: E402
import hypertune as ht  # noqa: E402
from hypertune.experiments import load_image_classification, mnist_mlp  # noqa: E402


def hparams(init_scale: float | None = None) -> dict:
    return {
        "input_dropout": ht.InputDropout(init=0.05, **sigma0(init_scale)),
        "dropout": ht.DropoutRate(init=0.05, low=0.0, high=0.95, per_site=True, **sigma0(init_scale)),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = _common.base_parser(__doc__.splitlines()[0], epochs=500, batch_size=128, lr=1e-2, warmup_epochs=5)
    args = parser.parse_args(argv)
    if args.smoke:
        _common.smoke_overrides(args)
    device = _common.setup(args)
    data = load_image_classification("mnist", args.data_root, val_fraction=args.val_fraction, seed=0, device=device)
    train_loader, val_loader, limit = _common.image_loaders(args, data)
    torch.manual_seed(args.seed)
    model = mnist_mlp(hidden=1200, dropout=0.05)
    return _common.train(
        args, name="mnist_mlp", model=model, hparams=hparams(args.init_scale), device=device,
        train_loader=train_loader, val_loader=val_loader,
        evaluate=_common.classification_evaluator(data, limit=limit),
        make_optimizer=lambda params: torch.optim.SGD(params, lr=args.lr, momentum=0.9),
    )


if __name__ == "__main__":
    main()
