"""CIFAR-10 models of the Δ-STN paper (AlexNet, VGG16, ResNet18) as plain torch modules.

Written the way a user would write them (ordinary ``nn.Conv2d``/``nn.Linear``/``nn.Dropout``),
for 32×32 inputs:

* :func:`alexnet_cifar`: the paper's AlexNet (Bae & Grosse 2020, after MacKay et al. 2019): five
  3×3 conv layers (64, 192, 384, 256, 256; the first with stride 2), three max-pools, fully
  connected 1024-4096-4096-10. Dropout (channel dropout, ``nn.Dropout2d``) on the input and after
  every conv block, element dropout after fc1 and fc2: 8 dropout sites.
* :func:`vgg16_cifar`: torchvision's VGG16 configuration ("D": 13 conv layers) on 32×32 inputs
  (feature map 512×1×1) with the paper's 512-512-10 classifier; channel dropout on the input and
  after every conv block, element dropout after fc1 and fc2: 16 sites. The paper's VGG16 has no
  BatchNorm (``batch_norm=False``, the default); ``batch_norm=True`` gives torchvision's
  ``vgg16_bn`` layout.
* :func:`resnet18_cifar`: torchvision's ResNet18 (``BasicBlock``, [2, 2, 2, 2]) with the usual
  CIFAR stem (3×3 stride-1 conv, no max-pool). torchvision's ResNet has no dropout; as in
  wide ResNets (Zagoruyko & Komodakis 2016), each residual block here drops channels between
  its two convolutions (``nn.Dropout2d``), plus channel dropout on the input and element
  dropout before the classifier: 10 sites.

Every dropout starts at ``dropout`` (default 0.05, the papers' starting value).
"""

from __future__ import annotations

import math

from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, ResNet

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class AlexNetCIFAR(nn.Module):
    """The Δ-STN paper's AlexNet for 32×32 images, in torchvision's features/classifier layout."""

    def __init__(self, num_classes: int = 10, dropout: float = 0.05) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Dropout2d(dropout),
            nn.Conv2d(3, 64, kernel_size=3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2), nn.Dropout2d(dropout),
            nn.Conv2d(64, 192, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2), nn.Dropout2d(dropout),
            nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True), nn.Dropout2d(dropout),
            nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True), nn.Dropout2d(dropout),
            nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2), nn.Dropout2d(dropout),
        )
        self.classifier = nn.Sequential(
            nn.Linear(256 * 2 * 2, 4096), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


def alexnet_cifar(num_classes: int = 10, dropout: float = 0.05) -> AlexNetCIFAR:
    """The paper's CIFAR-10 AlexNet with 8 dropout sites (see the module docstring)."""
    return AlexNetCIFAR(num_classes, dropout)


# torchvision's configuration "D" (VGG16): channels, "M" = 2×2 max-pool.
VGG16_CFG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGGCIFAR(nn.Module):
    """torchvision's VGG for 32×32 inputs, with a dropout after every conv block."""

    def __init__(
        self,
        cfg: list[int | str] = VGG16_CFG,
        num_classes: int = 10,
        dropout: float = 0.05,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Dropout2d(dropout)]
        channels = 3
        for i, v in enumerate(cfg):
            if v == "M":
                continue
            layers.append(nn.Conv2d(channels, int(v), kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(int(v)))
            layers.append(nn.ReLU(inplace=True))
            if i + 1 < len(cfg) and cfg[i + 1] == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            layers.append(nn.Dropout2d(dropout))
            channels = int(v)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(channels, 512), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(512, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # the paper's (and torchvision's) He initialization
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


def vgg16_cifar(num_classes: int = 10, dropout: float = 0.05, batch_norm: bool = False) -> VGGCIFAR:
    """VGG16 on 32×32 inputs with 16 dropout sites (see the module docstring)."""
    return VGGCIFAR(VGG16_CFG, num_classes, dropout, batch_norm)


class DropoutBasicBlock(BasicBlock):
    """torchvision's BasicBlock with channel dropout between its two convolutions (WRN style)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.dropout = nn.Dropout2d(0.05)

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.dropout(out)
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNetCIFAR(nn.Module):
    """Input dropout, then torchvision's ResNet with a CIFAR stem and dropout in every block."""

    def __init__(self, layers: list[int], num_classes: int = 10, dropout: float = 0.05) -> None:
        super().__init__()
        net = ResNet(DropoutBasicBlock, layers, num_classes=num_classes)
        for m in net.modules():
            if isinstance(m, DropoutBasicBlock):
                m.dropout.p = dropout
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
        net.fc = nn.Sequential(nn.Dropout(dropout), net.fc)
        self.drop_in = nn.Dropout2d(dropout)
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.drop_in(x))


def resnet18_cifar(num_classes: int = 10, dropout: float = 0.05) -> ResNetCIFAR:
    """ResNet18 for 32×32 inputs with 10 dropout sites (see the module docstring)."""
    return ResNetCIFAR([2, 2, 2, 2], num_classes, dropout)


ARCHS = {"alexnet": alexnet_cifar, "vgg16": vgg16_cifar, "resnet18": resnet18_cifar}


def cifar_model(arch: str, num_classes: int = 10, dropout: float = 0.05) -> nn.Module:
    """One of :data:`ARCHS` by name."""
    try:
        build = ARCHS[arch]
    except KeyError:
        raise ValueError(f"unknown arch {arch!r}: choose one of {sorted(ARCHS)}") from None
    return build(num_classes=num_classes, dropout=dropout)
