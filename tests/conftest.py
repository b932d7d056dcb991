"""Shared test settings: a hypothesis profile sized so the suite runs in about a minute on 2 cores."""

import os

import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "hypertune",
    deadline=None,
    max_examples=20,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    deadline=None,
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "hypertune"))

torch.set_num_threads(min(2, torch.get_num_threads()))
