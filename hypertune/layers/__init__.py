"""Hyper-layers: the math of centered best-response layers, one layer kind a file."""

from .base import HyperLayer, swap_class
from .conv import HyperConv1d, HyperConv2d, HyperConv3d
from .dropout import HyperDropout, dropout_per_example
from .embedding import HyperEmbedding
from .linear import HyperLinear
from .lstm import HyperLSTM

__all__ = [
    "HyperLayer",
    "HyperLinear",
    "HyperConv1d",
    "HyperConv2d",
    "HyperConv3d",
    "HyperEmbedding",
    "HyperLSTM",
    "HyperDropout",
    "dropout_per_example",
    "swap_class",
]
