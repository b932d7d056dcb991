"""The papers' experimental set-ups (models and data splits), shared by examples/ and benchmarks/.

The models are ordinary nn.Modules with ordinary nn.Dropout layers, written the way a user would
write them; hypertune tunes them through ``HyperModel.wrap`` alone.
"""

from typing import Any

from .data import TensorLoader, load_image_classification, split_train_val
from .models import SimpleCNN, mnist_mlp
from .ptb import BPTTLoader, Corpus, LSTMLanguageModel, batchify, evaluate_lm, lm_loss

__all__ = [
    "TensorLoader",
    "load_image_classification",
    "split_train_val",
    "SimpleCNN",
    "mnist_mlp",
    "alexnet_cifar",
    "vgg16_cifar",
    "resnet18_cifar",
    "cifar_model",
    "Corpus",
    "batchify",
    "BPTTLoader",
    "LSTMLanguageModel",
    "lm_loss",
    "evaluate_lm",
]

# The CIFAR-10 models subclass torchvision's ResNet blocks: imported on first use, so that
# ``import hypertune.experiments`` does not pay for ``torchvision.models``.
_CIFAR = ("alexnet_cifar", "vgg16_cifar", "resnet18_cifar", "cifar_model")


def __getattr__(name: str) -> Any:
    if name in _CIFAR:
        from . import cifar

        return getattr(cifar, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
