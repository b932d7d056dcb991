"""CIFAR-10, AlexNet / VGG16 / ResNet18: tune every dropout plus Cutout, ColorJitter and RandomAffine.

The Δ-STN paper's set-up (Bae & Grosse 2020): per-site dropout rates (AlexNet 8, VGG16 16,
ResNet18 10 sites; see hypertune.experiments.cifar), each starting at 0.05 within [0, 0.95];
Cutout holes 1 (0..5) and length 4 (2..24); color jitter brightness, contrast, saturation and
hue 0.05 (hue within [0, 0.5], the others [0, 1]); random affine degrees 5 (0..45), translate
0.05 (0..0.5), scale 0.05 (0..0.5), shear 5 (0..45): 18 (AlexNet), 26 (VGG16) or 20 (ResNet18)
hyperparameters. Random horizontal flips are applied (untuned) to every training batch, as in the
paper's loader. SGD (momentum 0.9, lr 0.03, ×0.2 at epochs 60, 120, 180) for the weights,
RMSprop (lr 0.01) on λ and σ, τ = 1e-3, 5 train steps per val step, 5 warm-up epochs, 200
epochs, batch 128, 20% of the training set held out for validation.

The augmentations run on the device inside the wrapped model, per example, on normalized
images (ColorJitter un-normalizes, jitters in [0, 1] and normalizes back).

    python examples/cifar10.py --arch resnet18 --out runs/cifar_resnet18
    python examples/cifar10.py --arch vgg16 --smoke     # random tensors if CIFAR-10 is absent
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

import _common  # noqa: E402
from _common import sigma0  # noqa: E402
import hypertune as ht  # noqa: E402
from hypertune.experiments import load_image_classification  # noqa: E402
from hypertune.experiments.cifar import ARCHS, CIFAR_MEAN, CIFAR_STD, cifar_model  # noqa: E402


def hparams(init_scale: float | None = None) -> dict:
    def hp(init: float, low: float, high: float, discrete: bool = False) -> ht.HParam:
        return ht.HParam(init=init, low=low, high=high, discrete=discrete, **sigma0(init_scale))

    return {
        "dropout": ht.DropoutRate(init=0.05, low=0.0, high=0.95, per_site=True, **sigma0(init_scale)),
        "affine": ht.RandomAffine(degrees=hp(5, 0, 45), translate=hp(0.05, 0, 0.5), scale=hp(0.05, 0, 0.5),
                                  shear=hp(5, 0, 45)),
        "jitter": ht.ColorJitter(brightness=hp(0.05, 0, 1), contrast=hp(0.05, 0, 1), saturation=hp(0.05, 0, 1),
                                 hue=hp(0.05, 0, 0.5), mean=CIFAR_MEAN, std=CIFAR_STD),
        "cutout": ht.Cutout(holes=hp(1, 0, 5, discrete=True), length=hp(4, 2, 24, discrete=True)),
    }


def random_hflip(x: Tensor) -> Tensor:
    """Flip each image left-right with probability 1/2 (the paper's fixed augmentation)."""
    flip = torch.rand(x.shape[0], device=x.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def cifar_present(root: Path) -> bool:
    import torchvision

    try:
        torchvision.datasets.CIFAR10(str(root), train=True, download=False)
    except RuntimeError:
        return False
    return True


def synthetic_cifar(n_train: int, n_val: int, n_test: int, seed: int, device: torch.device) -> dict:
    """Random images of CIFAR-10's shape and normalization (3×32×32, 10 classes), for --smoke."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    out = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        x = (torch.randint(0, 256, (n, 3, 32, 32), generator=g).float() / 255 - mean) / std
        y = torch.randint(0, 10, (n,), generator=g)
        out[split] = (x.to(device), y.to(device))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = _common.base_parser(__doc__.splitlines()[0], epochs=200, batch_size=128, lr=3e-2, warmup_epochs=5,
                                 val_fraction=0.2)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="resnet18")
    parser.add_argument("--milestones", type=int, nargs="*", default=[60, 120, 180],
                        help="epochs at which the learning rate is multiplied by --lr-decay")
    parser.add_argument("--lr-decay", type=float, default=0.2)
    args = parser.parse_args(argv)
    if args.smoke:
        _common.smoke_overrides(args, batch_size=8)
    device = _common.setup(args)
    if args.smoke and not cifar_present(args.data_root):
        print(f"CIFAR-10 is not under {args.data_root}: smoke run on random tensors of its shape")
        data = synthetic_cifar(64, 32, 32, args.seed, device)
    else:
        data = load_image_classification("cifar10", args.data_root, val_fraction=args.val_fraction, seed=0,
                                         device=device)
    train_loader, val_loader, limit = _common.image_loaders(args, data, smoke_batches=(4, 2), smoke_limit=32)
    torch.manual_seed(args.seed)
    model = cifar_model(args.arch, num_classes=10, dropout=0.05)
    return _common.train(
        args, name=f"cifar10_{args.arch}", model=model, hparams=hparams(args.init_scale), device=device,
        train_loader=train_loader, val_loader=val_loader,
        evaluate=_common.classification_evaluator(data, batch_size=500, limit=limit),
        make_optimizer=lambda params: torch.optim.SGD(params, lr=args.lr, momentum=0.9),
        make_scheduler=lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, args.milestones, gamma=args.lr_decay),
        batch_transform=random_hflip,
    )


if __name__ == "__main__":
    main()
