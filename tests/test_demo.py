"""python -m hypertune.demo: the README's first command."""

from __future__ import annotations

import pytest

pytest.importorskip("sklearn")

import hypertune as ht  # noqa: E402
from hypertune import demo  # noqa: E402


def test_untuned_run_does_not_depend_on_the_tuned_one(monkeypatch, capsys):
    """Each run draws dropout masks from its own stream: changing how the tuned run steps (and so
    how many random numbers it draws) leaves the untuned run's numbers bit for bit the same."""
    args = ["--epochs", "2", "--print-every", "1"]
    first = demo.main(args)
    monkeypatch.setitem(ht.DeltaSTNOptimizer.__init__.__kwdefaults__, "response_every", 1)
    second = demo.main(args)
    assert first["tuned_val_loss"] != second["tuned_val_loss"]
    for key in ("untuned_val_loss", "untuned_test_loss", "untuned_test_acc"):
        assert first[key] == second[key], key
    assert "tuned values:" in capsys.readouterr().out


def test_the_learning_rate_schedule_applies_to_both_runs():
    """Cosine decay (the default) changes the second epoch of the untuned run as well."""
    args = ["--epochs", "2", "--print-every", "1"]
    cosine = demo.main(args)
    constant = demo.main([*args, "--lr-schedule", "constant"])
    assert cosine["untuned_val_loss"] != constant["untuned_val_loss"]
    assert cosine["tuned_val_loss"] != constant["tuned_val_loss"]
