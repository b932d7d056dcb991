"""The papers' experimental set-ups (models and data splits), shared by examples/ and benchmarks/.

The models are ordinary nn.Modules with ordinary nn.Dropout layers, written the way a user would
write them; hypertune tunes them through ``HyperModel.wrap`` alone.
"""

from .data import TensorLoader, load_image_classification, split_train_val
from .models import SimpleCNN, mnist_mlp

__all__ = ["TensorLoader", "load_image_classification", "split_train_val", "SimpleCNN", "mnist_mlp"]
