"""The papers' experimental set-ups (models and data splits), shared by examples/ and benchmarks/.

The models are ordinary nn.Modules with ordinary nn.Dropout layers, written the way a user would
write them; hypertune tunes them through ``HyperModel.wrap`` alone.
"""

from .cifar import alexnet_cifar, cifar_model, resnet18_cifar, vgg16_cifar
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
