"""Real image datasets as in-memory tensors, with a validation split carved from the training set.

Batches are cut from tensors already on the device: at the papers' model sizes a DataLoader with
per-image PIL transforms costs more than the step it feeds, and tuned augmentation happens on
the device inside ``train_step`` anyway.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

_MEAN_STD = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashionmnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


def _torchvision_dataset(name: str, root: str | Path, train: bool):
    import torchvision

    cls = {
        "mnist": torchvision.datasets.MNIST,
        "fashionmnist": torchvision.datasets.FashionMNIST,
        "cifar10": torchvision.datasets.CIFAR10,
    }[name]
    try:
        return cls(str(root), train=train, download=False)
    except RuntimeError:
        # Not under root: fetch it, as torchvision does on a machine with internet.
        try:
            return cls(str(root), train=train, download=True)
        except Exception as err:  # no network: say where the files were looked for
            raise FileNotFoundError(
                f"{cls.__name__} is not under {root!r} and could not be downloaded ({err}); pass "
                "--data-root pointing at a folder in torchvision's layout"
            ) from err


def _as_tensors(ds) -> tuple[Tensor, Tensor]:
    data = ds.data
    x = torch.as_tensor(data).float().div_(255.0)
    if x.dim() == 3:  # N, H, W
        x = x.unsqueeze(1)
    else:  # CIFAR: N, H, W, C
        x = x.permute(0, 3, 1, 2).contiguous()
    y = torch.as_tensor(ds.targets, dtype=torch.long)
    return x, y


def split_train_val(n: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """A fixed random split of ``range(n)`` into train and validation indices."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must lie in (0, 1)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * val_fraction))
    return order[n_val:], order[:n_val]


def load_image_classification(
    name: str,
    root: str | Path,
    *,
    val_fraction: float = 0.15,
    seed: int = 0,
    device: torch.device | str = "cpu",
    normalize: bool = True,
) -> dict[str, tuple[Tensor, Tensor]]:
    """``{"train", "val", "test"}`` tensors of MNIST, FashionMNIST or CIFAR-10.

    Validation is carved from the training set (15% by default, as in the papers); the test set
    is left untouched. Images are scaled to [0, 1] and, with ``normalize``, standardized per
    channel.
    """
    key = name.lower().replace("-", "").replace("_", "")
    if key not in _MEAN_STD:
        raise ValueError(f"unknown dataset {name!r}: choose mnist, fashionmnist or cifar10")
    x, y = _as_tensors(_torchvision_dataset(key, root, train=True))
    xt, yt = _as_tensors(_torchvision_dataset(key, root, train=False))
    if normalize:
        mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in _MEAN_STD[key])
        x, xt = (x - mean) / std, (xt - mean) / std
    tr, va = split_train_val(len(x), val_fraction, seed)
    out = {"train": (x[tr], y[tr]), "val": (x[va], y[va]), "test": (xt, yt)}
    return {k: (a.to(device), b.to(device)) for k, (a, b) in out.items()}


class TensorLoader:
    """Shuffled mini-batches of in-memory tensors; iterating is one epoch.

    ``cycle()`` gives an endless stream, for the validation batches of ``val_step``.
    """

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False) -> None:
        if len(x) != len(y):
            raise ValueError(f"inputs ({len(x)}) and targets ({len(y)}) differ in length")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self.x)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        order = order.to(self.x.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield self.x[idx], self.y[idx]

    def cycle(self) -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            yield from self
