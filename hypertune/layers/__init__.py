"""Hyper-layers: the math of centered best-response layers, one layer kind a file.

Importing this package registers the built-in kinds (see :mod:`.registry`).
"""

from .base import HyperLayer, HyperProjection, row_view, swap_class
from .conv import HyperConv1d, HyperConv2d, HyperConv3d
from .dropout import HyperDropout, dropout_per_example
from .embedding import HyperEmbedding
from .linear import HyperLinear
from .lstm import HyperLSTM
from .registry import register_layer_kind
from .timm_conv import HyperConv2dSame, HyperStdConv2d
from .transformers_conv1d import HyperConv1D

__all__ = [
    "HyperLayer",
    "HyperProjection",
    "HyperLinear",
    "HyperConv1d",
    "HyperConv2d",
    "HyperConv3d",
    "HyperConv1D",
    "HyperConv2dSame",
    "HyperStdConv2d",
    "HyperEmbedding",
    "HyperLSTM",
    "HyperDropout",
    "dropout_per_example",
    "register_layer_kind",
    "swap_class",
    "row_view",
]
