"""On-device, per-example data augmentation with tuned parameters."""

from .affine import RandomAffine, affine_params, affine_theta, apply_affine
from .base import Augmentation
from .color import (
    ColorJitter,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    apply_jitter,
    jitter_factors,
    jitter_order,
)
from .cutout import Cutout, apply_boxes, cutout_boxes, cutout_mask

__all__ = [
    "Augmentation",
    "Cutout",
    "ColorJitter",
    "RandomAffine",
    "cutout_boxes",
    "cutout_mask",
    "apply_boxes",
    "jitter_factors",
    "jitter_order",
    "apply_jitter",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_hue",
    "affine_params",
    "affine_theta",
    "apply_affine",
]
