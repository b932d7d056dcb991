"""Optimizers: steps and state, separate from the math of the hyper-layers."""

from .delta_stn import DEFAULT_RESPONSE_LR, DeltaSTNOptimizer, StepResult

__all__ = ["DEFAULT_RESPONSE_LR", "DeltaSTNOptimizer", "StepResult"]
