"""Optimizers: steps and state, separate from the math of the hyper-layers."""

from .delta_stn import DeltaSTNOptimizer, StepResult

__all__ = ["DeltaSTNOptimizer", "StepResult"]
