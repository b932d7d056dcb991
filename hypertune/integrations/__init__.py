"""Integrations with training frameworks; each is an optional dependency imported on use.

* :mod:`hypertune.integrations.lightning`: :class:`DeltaSTNModule`, a LightningModule base class
  that trains with DeltaSTNOptimizer under Lightning's manual optimization
  (``pip install 'hypertune-stn[lightning]'``).
* :mod:`hypertune.integrations.transformers`: :class:`DeltaSTNTrainer`, a Hugging Face
  ``Trainer`` that tunes a wrapped model (``pip install 'hypertune-stn[transformers]'``).
* :mod:`hypertune.integrations.accelerate`: ``prepare`` for a hand-written accelerate loop
  (``pip install 'hypertune-stn[accelerate]'``).
* :mod:`hypertune.integrations.accumulation`: gradient accumulation for DeltaSTNOptimizer
  (no extra dependency).
"""

__all__ = ["lightning", "transformers", "accelerate", "accumulation"]
