"""On-device, per-example data augmentation with tuned parameters."""

from .base import Augmentation

__all__ = ["Augmentation"]
