"""The benchmark scripts' contracts: overhead.py's JSON rows, compare.py's budget and outputs.

Timings are never asserted (the machines are noisy); what is asserted is the arithmetic the
scripts do with them and the shape of what they write.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import time
from pathlib import Path

import pytest

import hypertune as ht

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


overhead = load("overhead")
compare = load("compare")
oracle_gap = load("oracle_gap")


def test_cycle_median_counts_the_response_step_once_per_cycle():
    # Θ step on one call in three: a plain median (1.0) would hide it; the cycle mean is 2.0.
    times = [1.0, 1.0, 4.0] * 5
    assert overhead._cycle_median(times, 3) == pytest.approx(2.0)
    assert overhead._cycle_median(times, 1) == 1.0


def test_overhead_writes_the_contract_rows(tmp_path):
    out = tmp_path / "rows.json"
    rows = overhead.main(["--models", "mlp", "--device", "cpu", "--modes", "delta,stn", "--repeats", "3",
                          "--warmup", "1", "--batch", "4", "--threads", "1", "--response-every", "2",
                          "--response-optimizer", "clone", "--json", str(out)])
    assert json.loads(out.read_text()) == rows
    assert [r["mode"] for r in rows] == ["delta", "stn"]
    for r in rows:
        assert {"model", "device", "mode", "plain_ms", "hyper_ms", "ratio"} <= r.keys()
        assert (r["model"], r["device"], r["response_every"], r["response_optimizer"]) == ("mlp", "cpu", 2, "clone")
        assert r["ratio"] == pytest.approx(r["hyper_ms"] / r["plain_ms"], rel=1e-2)
        assert r["hyper_ms"] >= r["train_step_ms"] > 0


def test_overhead_times_the_library_default_cadence_by_default():
    """Without --response-every the optimizer's own default cadence is timed and recorded; before,
    the row claimed k = 1 and the cycle median ran over one position, hiding the Θ step."""
    from hypertune.optim.delta_stn import DEFAULT_RESPONSE_EVERY

    rows = overhead.main(["--models", "mlp", "--device", "cpu", "--modes", "delta", "--repeats", "3",
                          "--warmup", "1", "--batch", "4", "--threads", "1"])
    assert [r["response_every"] for r in rows] == [DEFAULT_RESPONSE_EVERY]


def test_oracle_gap_fraction_closed():
    assert oracle_gap.gap_closed(untuned=1.0, tuned=0.625, oracle=0.5) == 0.75
    assert oracle_gap.gap_closed(untuned=1.0, tuned=0.25, oracle=0.5) == 1.5  # beat every grid value
    assert oracle_gap.gap_closed(untuned=1.0, tuned=1.25, oracle=0.5) == -0.5
    assert oracle_gap.gap_closed(untuned=0.5, tuned=0.4, oracle=0.5) is None  # the start is the oracle


def test_oracle_gap_summary_compares_each_start_with_its_own_untuned_run():
    runs = [{"kind": "fixed", "value": v, "best_val_loss": loss, "test_loss": 0.0, "method": f"fixed {v}",
             "cpu_seconds": 1.0} for v, loss in [(0.05, 1.0), (0.5, 0.5), (0.85, 0.75)]]
    runs += [{"kind": "tuned", "value": 0.05, "best_val_loss": 0.625, "test_loss": 0.7, "method": "t",
              "cpu_seconds": 2.0, "final_hparams": {"dropout": 0.4}},
             {"kind": "tuned", "value": 0.85, "best_val_loss": 0.5, "test_loss": 0.6, "method": "t",
              "cpu_seconds": 2.0, "final_hparams": {"dropout": 0.5}}]
    rows = oracle_gap.summarize(runs)
    assert [(r["start"], r["untuned"], r["oracle"], r["oracle_value"], r["closed"]) for r in rows] == [
        (0.05, 1.0, 0.5, 0.5, 0.75), (0.85, 0.75, 0.5, 0.5, 1.0)]
    table = oracle_gap.markdown(runs, rows)
    assert "| 0.05 | 1.0000 | 0.6250 | 0.5000 (0.5) | 75% | dropout=0.4 |" in table


def test_oracle_gap_refuses_a_start_outside_the_grid(capsys):
    with pytest.raises(SystemExit):
        oracle_gap.main(["--grid", "0.1,0.5", "--starts", "0.05"])
    assert "not in --grid" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        oracle_gap.main(["--grid", "0.1,1.5"])
    assert "dropout rates must lie in" in capsys.readouterr().err


@pytest.mark.skipif(not (DATA / "MNIST" / "raw").exists(), reason="MNIST not in ../shared/datasets")
def test_oracle_gap_runs_the_grid_and_both_starts(tmp_path):
    out = tmp_path / "gap.json"
    result = oracle_gap.main(["--dataset", "mnist", "--data-root", str(DATA), "--train-subset", "64",
                              "--epochs", "1", "--batch-size", "16", "--eval-every", "2",
                              "--grid", "0.05,0.5", "--starts", "0.05,0.5", "--json", str(out)])
    assert json.loads(out.read_text())["summary"] == json.loads(json.dumps(result["summary"]))
    assert [r["kind"] for r in result["runs"]] == ["fixed", "fixed", "tuned", "tuned"]
    assert [r["start"] for r in result["summary"]] == [0.05, 0.5]
    assert all(r["steps"] == 4 for r in result["runs"] if r["kind"] == "tuned")


@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_budget_stops_while_paused(clock):
    budget = compare.Budget(10.0, clock)
    budget.pause()
    before = budget.elapsed()
    end = time.perf_counter() + 0.05
    while time.perf_counter() < end:  # burn CPU and wall time while paused
        pass
    assert budget.elapsed() == before
    budget.resume()
    end = time.perf_counter() + 0.05
    while time.perf_counter() < end:
        pass
    assert budget.elapsed() > before


def test_stn_method_names():
    assert compare.stn_method("delta") == ("delta", {})
    assert compare.stn_method("centered_every3") == ("centered", {"response_every": 3})
    assert compare.stn_method("delta_frac0.5") == ("delta", {"response_fraction": 0.5})
    assert compare.stn_method("delta_every2_adam") == ("delta", {"response_every": 2, "response_optimizer": "adam"})
    assert compare.stn_method("centered_clone") == ("centered", {"response_optimizer": "clone"})
    assert compare.stn_method("delta_every3_lr3e-3") == ("delta", {"response_every": 3, "response_lr": 3e-3})
    assert compare.stn_method("delta_lr0.002") == ("delta", {"response_lr": 0.002})
    assert compare.stn_method("delta_pinit") == ("delta", {"projection_init": True})
    assert compare.stn_method("delta_fixscale") == ("delta", {"tune_scales": False})
    assert compare.stn_method("stn_every3_fixscale") == ("stn", {"response_every": 3, "tune_scales": False})
    assert compare.stn_method("optuna") is None


def test_compare_refuses_unknown_methods(capsys):
    with pytest.raises(SystemExit):
        compare.main(["--methods", "untuned,grid"])
    assert "unknown method(s) ['grid']" in capsys.readouterr().err


@pytest.mark.skipif(not (DATA / "MNIST" / "raw").exists(), reason="MNIST not in ../shared/datasets")
def test_compare_runs_each_method_within_its_budget(tmp_path):
    out = tmp_path / "results.json"
    budget = 1.0
    results = compare.main([
        "--dataset", "mnist", "--data-root", str(DATA), "--budget", str(budget), "--clock", "cpu",
        "--threads", "1", "--train-subset", "256", "--val-subset", "256", "--trial-epochs", "1",
        "--eval-every", "2", "--warmup-steps", "2", "--batch-size", "32",
        "--methods", "untuned,random,delta_every2", "--json", str(out), "--png", str(tmp_path / "curves.png"),
    ])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert [r["method"] for r in results] == ["untuned", "random", "delta_every2"]
    assert (tmp_path / "curves.png").stat().st_size > 0
    # the σ₀ is always in a new schedule's name (files without it were written at σ₀ 1)
    assert (tmp_path / f"schedule_mnist-scale{compare.DROPOUT_SCALE:g}_delta_every2_seed0.json.gz").exists()
    for r in results:
        assert math.isfinite(r["best_val_loss"]) and math.isfinite(r["test_loss"])
        times = [t for t, _ in r["curve"]]
        assert times == sorted(times)
        # the budget is checked before every step: at most one step (and one trial's last score) over
        assert times[-1] < budget + 1.0
        bests = [v for _, v in r["curve"]]
        assert bests == sorted(bests, reverse=True) and bests[-1] == r["best_val_loss"]


def test_compare_summary_averages_seeds_and_sorts_by_mean():
    rows = [{"dataset": "mnist", "method": m, "seed": s, "best_val_loss": v, "dropout_scale": compare.DROPOUT_SCALE}
            for m, s, v in [("stn", 0, 0.2), ("stn", 1, 0.4), ("delta", 0, 0.25), ("delta", 2, 0.27)]]
    lines = compare.summary_table(rows).splitlines()
    assert lines[0] == "| dataset | method | seed 0 | seed 1 | seed 2 | mean | seeds |"
    assert lines[2] == "| mnist | delta | 0.2500 | – | 0.2700 | 0.2600 | 2 |"
    assert lines[3] == "| mnist | stn | 0.2000 | 0.4000 | – | 0.3000 | 2 |"


def test_compare_tables_keep_runs_from_another_dropout_start_apart():
    rows = [{"dataset": "mnist", "method": "stn", "seed": 0, "best_val_loss": 0.2, "test_loss": 0.2,
             "best_hparams": {}, "steps": 10, "dropout_scale": compare.DROPOUT_SCALE},
            {"dataset": "mnist", "method": "stn", "seed": 0, "best_val_loss": 0.3, "test_loss": 0.3,
             "best_hparams": {}, "steps": 10, "dropout_init": 0.85, "dropout_scale": compare.DROPOUT_SCALE},
            # a JSON from before the label existed was a σ₀ = 1 run; a search method has no σ₀
            {"dataset": "mnist", "method": "stn", "seed": 0, "best_val_loss": 0.4, "test_loss": 0.4,
             "best_hparams": {}, "steps": 10},
            {"dataset": "mnist", "method": "random", "seed": 0, "best_val_loss": 0.5, "test_loss": 0.5,
             "best_hparams": {}, "trials": 3}]
    summary = compare.summary_table(rows).splitlines()[2:]
    assert summary == ["| mnist | stn | 0.2000 | 0.2000 | 1 |",
                       "| mnist | random | 0.5000 | 0.5000 | 1 |",
                       "| mnist (dropout from 0.85) | stn | 0.3000 | 0.3000 | 1 |",
                       "| mnist (σ₀ 1) | stn | 0.4000 | 0.4000 | 1 |"]
    assert "| mnist (dropout from 0.85) | stn | 0 |" in compare.markdown_table(rows)


def test_compare_starts_every_method_at_the_dropout_init():
    assert set(compare.initial_values("mnist", 0.85).values()) == {0.85}
    specs = compare.hyper_specs("fashionmnist", 0.85)
    model = ht.HyperModel.wrap(compare.build_model("fashionmnist", 0.85), specs)
    dropouts = {k: v for k, v in model.hparam_values().items() if k.startswith("dropout")}
    assert dropouts and all(abs(v - 0.85) < 1e-5 for v in dropouts.values())


def test_compare_dropout_scale_sets_sigma0_of_every_rate_and_names_the_runs():
    model = ht.HyperModel.wrap(compare.build_model("mnist"), compare.hyper_specs("mnist", 0.05, 2.5))
    scales = model.hparams.scales()
    assert scales and all(abs(v - 2.5) < 1e-5 for v in scales.values())
    default = ht.HyperModel.wrap(compare.build_model("mnist"), compare.hyper_specs("mnist"))
    assert all(abs(v - compare.DROPOUT_SCALE) < 1e-5 for v in default.hparams.scales().values())
    assert compare._dataset_label({"dataset": "mnist", "dropout_scale": 2.5}) == "mnist (σ₀ 2.5)"
    assert compare._dataset_label({"dataset": "mnist", "dropout_init": 0.85, "dropout_scale": 2.5}) == \
        "mnist (dropout from 0.85, σ₀ 2.5)"
    assert compare._dataset_label({"dataset": "mnist", "dropout_scale": compare.DROPOUT_SCALE}) == "mnist"


def test_compare_table_from_plots_the_chosen_seeds(tmp_path):
    rows = [{"dataset": "mnist", "method": m, "seed": s, "best_val_loss": v, "test_loss": v, "best_hparams": {},
             "steps": 10, "curve": [[1.0, v + 0.1], [2.0, v]]} for m, s, v in [("stn", 0, 0.2), ("delta", 1, 0.3)]]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    compare.main(["--table-from", str(tmp_path / "a.json"), "--png", str(tmp_path / "c.png"), "--seeds", "1"])
    assert (tmp_path / "c.png").stat().st_size > 0
    rows.append({**rows[0], "dataset": "fashionmnist"})
    (tmp_path / "b.json").write_text(json.dumps(rows))
    with pytest.raises(SystemExit):
        compare.main(["--table-from", str(tmp_path / "b.json"), "--png", str(tmp_path / "d.png")])


def test_response_optimizer_step_times_every_variant(tmp_path):
    bench = load("response_optimizer_step")
    out = tmp_path / "steps.json"
    rows = bench.main(["--models", "simple_cnn", "--repeats", "2", "--warmup", "1", "--threads", "1",
                       "--json", str(out)])
    assert json.loads(out.read_text()) == rows
    assert [r["optimizer"] for r in rows] == list(bench.VARIANTS)
    assert all(r["step_ms"] > 0 and r["theta_values"] > 10**6 for r in rows)


def test_summarize_runs_averages_the_last_epochs(tmp_path, capsys):
    summarize = load("summarize_runs")
    for name, tuned, losses in [("t", True, [0.9, 0.5, 0.4, 0.3]), ("u", False, [0.8, 0.4, 0.6, 0.7])]:
        run = tmp_path / name
        run.mkdir()
        (run / "epochs.csv").write_text("epoch,val_loss\n" + "".join(f"{i},{v}\n" for i, v in enumerate(losses)))
        (run / "metrics.json").write_text(json.dumps({
            "tuned": tuned, "epochs": 4, "val": {"loss": losses[-1]}, "test": {"loss": 1.0, "acc": 0.5},
            "wall_time_s": 1.0, "args": {"seed": 0, "train_subset": 100},
        }))
    rows = summarize.main([str(tmp_path / "u"), str(tmp_path / "t"), "--last", "2"])
    assert [r["tuned"] for r in rows] == [True, False]
    assert rows[0]["val_loss_last2"] == pytest.approx(0.35) and rows[1]["val_loss_last2"] == pytest.approx(0.65)
    assert [r["min_val_loss"] for r in rows] == [0.3, 0.4]
    assert "| 100 images × 4 epochs | 0 | tuned | 0.3000 | 0.3500 |" in capsys.readouterr().out


def test_plot_schedules_draws_one_panel_per_dataset_and_method(tmp_path):
    import gzip

    paths = []
    # a run from another dropout start is its own row, not a second seed of the same method
    for dataset, method in [("mnist", "stn"), ("mnist", "delta"), ("mnist-from0.85", "delta"), ("fashionmnist", "delta")]:
        path = tmp_path / f"schedule_{dataset}_{method}_seed0.json.gz"
        with gzip.open(path, "wt") as f:
            json.dump([{"step": s, "loss": 1.0, "input_dropout": 0.05 + s / 1e4, "cutout:holes": 1} for s in (5, 10)], f)
        paths.append(path)
    compare.main(["--plot-schedules", *map(str, paths), "--png", str(tmp_path / "s.png")])
    assert (tmp_path / "s.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        compare.plot_schedules([tmp_path / "other.json.gz"], tmp_path / "x.png")


def test_reference_overhead_needs_a_checkout(tmp_path):
    reference = load("reference_overhead")
    with pytest.raises(SystemExit, match="--reference-repo PATH is required"):
        reference.main([])
    with pytest.raises(SystemExit, match="no base_step_optimizer.py there"):
        reference.main(["--reference-repo", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"unknown mode\(s\) \['grid'\]"):
        reference.main(["--reference-repo", str(tmp_path), "--modes", "delta,grid"])


def test_compare_schedule_table_reads_rates_and_sigmas_at_the_nearest_steps(tmp_path):
    rows = [{"step": s, "loss": 0.3, "dropout:3": 0.05 + s / 1e4, "cutout:holes": 1.0, "scale:dropout:3": 2.0 - s / 1e3}
            for s in (200, 205, 600)]
    path = tmp_path / "schedule_mnist-scale0.5_delta_seed1.json.gz"
    for name in (path.name, "schedule_mnist_delta_seed1.json.gz", "schedule_mnist-scale2_delta_seed1.json.gz"):
        with gzip.open(tmp_path / name, "wt") as f:
            json.dump(rows, f)
    assert compare.read_schedule(path)[:3] == ("mnist (σ₀ 0.5)", "delta", 1)
    # no σ₀ in the name: written when the default was 1; σ₀ 2, the default now, is not labelled
    assert compare.read_schedule(tmp_path / "schedule_mnist_delta_seed1.json.gz")[0] == "mnist (σ₀ 1)"
    assert compare.read_schedule(tmp_path / "schedule_mnist-scale2_delta_seed1.json.gz")[0] == "mnist"
    lines = compare.schedule_table([path], [0, 500]).splitlines()[2:]
    assert lines == ["| mnist (σ₀ 0.5) | delta | 1 | 200 | dropout:3 0.070 (1.80) |",
                     "| mnist (σ₀ 0.5) | delta | 1 | 600 | dropout:3 0.110 (1.40) |"]
    with pytest.raises(SystemExit):
        compare.read_schedule(tmp_path / "other.json.gz")


def _oracle_part(tmp_path, name, runs, **settings):
    part = {"dataset": "mnist", "train_subset": 2000, "epochs": 30, "seed": 0, **settings, "runs": runs}
    path = tmp_path / name
    path.write_text(json.dumps(part))
    return str(path)


def _oracle_run(kind, value, loss):
    return {"kind": kind, "value": value, "best_val_loss": loss, "test_loss": 0.0, "method": f"{kind} {value}",
            "cpu_seconds": 1.0, **({"final_hparams": {}} if kind == "tuned" else {})}


def test_oracle_gap_merge_equals_one_run_over_the_whole_grid(tmp_path, capsys):
    a = [_oracle_run("fixed", 0.05, 1.0), _oracle_run("fixed", 0.2, 0.8), _oracle_run("tuned", 0.05, 0.55)]
    b = [_oracle_run("fixed", 0.4, 0.5), _oracle_run("fixed", 0.6, 0.9), _oracle_run("tuned", 0.6, 0.6)]
    out = tmp_path / "all.json"
    result = oracle_gap.main(["--merge", _oracle_part(tmp_path, "a.json", a), _oracle_part(tmp_path, "b.json", b),
                              "--json", str(out)])
    assert result["summary"] == oracle_gap.summarize(a + b)
    assert [(r["start"], r["oracle"]) for r in result["summary"]] == [(0.05, 0.5), (0.6, 0.5)]
    assert [r["closed"] for r in result["summary"]] == pytest.approx([0.9, 0.75])
    assert result["grid"] == [0.05, 0.2, 0.4, 0.6] and json.loads(out.read_text())["summary"] == result["summary"]
    assert "| 0.05 | 1.0000 | 0.5500 | 0.5000 (0.4) | 90% |" in capsys.readouterr().out


def test_oracle_gap_merge_refuses_parts_of_different_comparisons(tmp_path):
    a = _oracle_part(tmp_path, "a.json", [_oracle_run("fixed", 0.05, 1.0)])
    b = _oracle_part(tmp_path, "b.json", [_oracle_run("fixed", 0.4, 0.5)], seed=1)
    with pytest.raises(SystemExit, match="merge parts of one comparison only"):
        oracle_gap.merge([a, b])
    c = _oracle_part(tmp_path, "c.json", [_oracle_run("fixed", 0.05, 0.9)])
    with pytest.raises(SystemExit, match="more than one part"):
        oracle_gap.merge([a, c])


def test_curve_endpoints_separates_the_end_of_budget_score(tmp_path, capsys):
    endpoints = load("curve_endpoints")
    improved = {"method": "delta", "seed": 2, "steps": 1876, "best_val_loss": 0.385,
                "curve": [(20.0, 0.64), (400.0, 0.4067), (420.0, 0.385)]}
    kept = {"method": "centered", "seed": 0, "steps": 2133, "best_val_loss": 0.391,
            "curve": [(20.0, 0.5), (400.0, 0.391), (420.0, 0.391)]}
    (tmp_path / "compare_x_delta_seed2.json").write_text(json.dumps([improved]))
    (tmp_path / "compare_x_centered_seed0.json").write_text(json.dumps([kept]))
    rows = endpoints.main([str(tmp_path / "compare_x_delta_seed2.json"), str(tmp_path / "compare_x_centered_seed0.json")])
    assert [(r["best_periodic"], r["reported"], r["final_improved"]) for r in rows] == [
        (0.4067, 0.385, True), (0.391, 0.391, False)]
    assert "compare_x_delta" in capsys.readouterr().out
