"""Integrations with training frameworks; each is an optional dependency imported on use.

* :mod:`hypertune.integrations.lightning`: :class:`DeltaSTNModule`, a LightningModule base class
  that trains with DeltaSTNOptimizer under Lightning's manual optimization
  (``pip install 'hypertune-stn[lightning]'``).
"""

__all__ = ["lightning"]
