"""Optimizers: steps and state, separate from the math of the hyper-layers.

- ``delta_stn``: DeltaSTNOptimizer, the state and the transaction each step runs as;
- ``steps``: the three modes' step functions (delta, centered, stn) and the λ/σ step;
- ``transaction``: check every part of a step, then write all of it or put it back;
- ``noise``: the Θ steps' perturbations, independent or in antithetic pairs;
- ``arguments`` and ``state``: what the constructor and a load check before writing anything.
"""

from .delta_stn import DEFAULT_RESPONSE_LR, DeltaSTNOptimizer, StepResult

__all__ = ["DEFAULT_RESPONSE_LR", "DeltaSTNOptimizer", "StepResult"]
