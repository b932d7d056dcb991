"""Table of the step-matched FashionMNIST runs: best validation loss, test loss and final rates per
setting and seed (benchmarks/oracle_runs/modes and modes_variants, from tuned_only.py).

    python benchmarks/oracle_runs/summarize_variants.py
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
rows: dict[str, dict[int, dict]] = {}
for folder in ("modes", "modes_variants"):
    for f in sorted((HERE / folder).glob("fashionmnist_*_seed*.json")):
        text = f.read_text().strip()
        if not text:
            continue  # still running
        setting = f.stem[len("fashionmnist_"):].rsplit("_seed", 1)[0]
        rows.setdefault(setting, {})[int(f.stem.rsplit("seed", 1)[1])] = json.loads(text.splitlines()[-1])
print(f"{'setting':>22} {'seed':>4} {'best val':>9} {'test':>7} {'cpu s':>6}  final drop_in / drop1 / drop2 / drop_fc")
for setting, by_seed in rows.items():
    for seed, r in sorted(by_seed.items()):
        h = r["final_hparams"]
        rates = " / ".join(f"{h[k]:.2f}" for k in ("dropout:drop_in", "dropout:drop1", "dropout:drop2", "dropout:drop_fc"))
        print(f"{setting:>22} {seed:>4} {r['best_val_loss']:9.4f} {r['test_loss']:7.4f} {r['cpu_seconds']:6.0f}  {rates}")
    if len(by_seed) > 1:
        val = statistics.fmean(r["best_val_loss"] for r in by_seed.values())
        test = statistics.fmean(r["test_loss"] for r in by_seed.values())
        print(f"{setting:>22} {'mean':>4} {val:9.4f} {test:7.4f}  (seeds {sorted(by_seed)})")
