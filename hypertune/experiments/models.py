"""The papers' MNIST and FashionMNIST models, as plain modules a user would write."""

from __future__ import annotations

from torch import Tensor, nn


def mnist_mlp(hidden: int = 1200, dropout: float = 0.05) -> nn.Sequential:
    """784-1200-1200-1200-10 with dropout after the first two hidden layers (Δ-STN, MNIST).

    With an ``InputDropout`` spec this gives the paper's three tuned rates.
    """
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, 10),
    )


class SimpleCNN(nn.Module):
    """Two conv layers (32, 64 filters) and two fully connected, with four dropouts (FashionMNIST).

    Channel dropout on the input and after each conv block, element dropout after fc1.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, dropout: float = 0.05) -> None:
        super().__init__()
        self.drop_in = nn.Dropout2d(dropout)
        self.conv1 = nn.Conv2d(in_channels, 32, kernel_size=5, padding=2)
        self.drop1 = nn.Dropout2d(dropout)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=2)
        self.drop2 = nn.Dropout2d(dropout)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(64 * 7 * 7, 512)
        self.drop_fc = nn.Dropout(dropout)
        self.fc2 = nn.Linear(512, num_classes)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop_in(x)
        x = self.drop1(self.pool(self.act(self.conv1(x))))
        x = self.drop2(self.pool(self.act(self.conv2(x))))
        x = self.drop_fc(self.act(self.fc1(x.flatten(1))))
        return self.fc2(x)
