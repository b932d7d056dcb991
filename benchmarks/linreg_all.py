#!/usr/bin/env python
"""Run linreg_toy on every data set × hyperparameter × method and write the results table.

Each run is the exact acceptance command (``python benchmarks/linreg_toy.py --data-dir ...
--json ...``), run one after another so the timings are honest; the table goes between the
markers in the "## linreg_toy" section of benchmarks/RESULTS.md (other sections and any text
outside the markers are left alone), and the λ trajectories are plotted to
benchmarks/linreg_toy.png.

    python benchmarks/linreg_all.py --uci-root ../shared/datasets/uci --seed 0
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATASETS = ("bostonHousing", "concrete", "energy", "kin8nm")
HPARAMS = ("weight_decay", "input_dropout")
METHODS = ("delta", "centered", "stn")
TARGET = {"weight_decay": 0.05, "input_dropout": 0.02}
BEGIN, END = "<!-- linreg_all:begin -->", "<!-- linreg_all:end -->"
SECTION = "## linreg_toy"


def read_runs(seed: int, out: Path) -> list[dict]:
    rows = []
    for hparam in HPARAMS:
        for dataset in DATASETS:
            for method in METHODS:
                path = out / f"{dataset}_{hparam}_{method}_s{seed}.json"
                if path.exists():
                    rows.append(json.loads(path.read_text()))
    return rows


def run_all(uci_root: Path, seed: int, out: Path) -> list[dict]:
    rows = []
    out.mkdir(parents=True, exist_ok=True)
    for hparam in HPARAMS:
        for dataset in DATASETS:
            for method in METHODS:
                stem = out / f"{dataset}_{hparam}_{method}_s{seed}"
                cmd = [
                    sys.executable, str(HERE / "linreg_toy.py"),
                    "--data-dir", str(uci_root / dataset),
                    "--hparam", hparam, "--method", method, "--seed", str(seed),
                    "--json", f"{stem}.json", "--trace", f"{stem}.trace.json",
                ]
                start = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True)
                wall = time.perf_counter() - start
                if proc.returncode != 0:
                    print(proc.stdout, proc.stderr, file=sys.stderr)
                    rows.append({"dataset": dataset, "hparam": hparam, "method": method, "failed": proc.stderr.strip().splitlines()[-1:]})
                    continue
                row = json.loads(Path(f"{stem}.json").read_text())
                row["wall"] = wall
                rows.append(row)
                print(
                    f"{dataset:14s} {hparam:13s} {method:8s} λ={row['lambda']:.5g} λ*={row['lambda_exact']:.5g} "
                    f"error={row['error']:.4f} ({wall:.1f}s)",
                    flush=True,
                )
    return rows


def table(rows: list[dict]) -> str:
    head = "| dataset | hparam | method | λ | λ* | error | val_loss | val_loss_exact | steps | seconds | cpu s |"
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['dataset']} | {r['hparam']} | {r['method']} | failed: {' '.join(r['failed'])} | | | | | | | |")
            continue
        flag = "" if r["error"] <= TARGET[r["hparam"]] else " ✗"
        bound = " (on bound)" if r.get("lambda_exact_on_bound") else ""
        if r.get("diverged"):
            flag += " (diverged)"
        lines.append(
            f"| {r['dataset']} | {r['hparam']} | {r['method']} | {r['lambda']:.5g} | {r['lambda_exact']:.5g}{bound} | "
            f"{r['error']:.4f}{flag} | {r['val_loss']:.5f} | {r['val_loss_exact']:.5f} | {r['steps']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} |"
        )
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    out = ["| hparam | method | max error | mean error | target | runs within target |", "|---|---|---|---|---|---|"]
    for hparam in HPARAMS:
        for method in METHODS:
            errs = [r["error"] for r in rows if r.get("hparam") == hparam and r.get("method") == method and "error" in r]
            if not errs:
                continue
            ok = sum(e <= TARGET[hparam] for e in errs)
            out.append(
                f"| {hparam} | {method} | {max(errs):.4f} | {sum(errs) / len(errs):.4f} | {TARGET[hparam]} | {ok}/{len(errs)} |"
            )
    return "\n".join(out)


def write_section(results: Path, body: str) -> None:
    block = f"{BEGIN}\n{body}\n{END}"
    text = results.read_text() if results.exists() else "# Benchmark results\n"
    if SECTION not in text.splitlines():
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n{block}\n"
    elif BEGIN in text and END in text:
        pre, rest = text.split(BEGIN, 1)
        _, post = rest.split(END, 1)
        text = pre + block + post
    else:  # section exists without markers: put the block right under its heading
        lines = text.splitlines()
        i = lines.index(SECTION)
        text = "\n".join(lines[: i + 1] + ["", block] + lines[i + 1 :]) + "\n"
    results.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uci-root", default=str(REPO / ".." / "shared" / "datasets" / "uci"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="/tmp/linreg_toy_runs", help="per-run JSON and trace files")
    parser.add_argument("--results", default=str(HERE / "RESULTS.md"))
    parser.add_argument("--figure", default=str(HERE / "linreg_toy.png"))
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--from-runs", action="store_true", help="rebuild the table from the JSON files in --out")
    args = parser.parse_args()

    if args.from_runs:
        rows = read_runs(args.seed, Path(args.out))
    else:
        rows = run_all(Path(args.uci_root), args.seed, Path(args.out))
    body = (
        f"Seed {args.seed}. `seconds`: wall time of the online run (`cpu s`: its CPU time); the whole "
        "command adds ~3 s of start-up and exact solve. ✗ marks a run outside the target (0.05 for weight decay, "
        "0.02 for dropout).\n\n"
        + table(rows)
        + "\n\n"
        + summary(rows)
    )
    print(body)
    if not args.no_write:
        write_section(Path(args.results), body)
        print(f"updated {args.results}")
        subprocess.run(
            [sys.executable, str(HERE / "linreg_figure.py"), "--runs", args.out, "--out", args.figure, "--seed", str(args.seed)],
            check=False,
        )


if __name__ == "__main__":
    main()
