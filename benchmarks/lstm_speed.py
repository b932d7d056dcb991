#!/usr/bin/env python
"""Forward+backward time of HyperLSTM's code paths against nn.LSTM, on PTB-like shapes.

Cases (each one training step's worth of LSTM work, the loss a fixed random projection of the
output sequence):

* ``nn.LSTM``: the plain module; gradients for its weights and its input.
* ``δλ=0``: HyperLSTM with no perturbation and no tuned regularizer — dispatched to
  nn.LSTM.forward; same gradients (the w₀ step of a run that tunes only other hyperparameters).
* ``δλ=0 +reg``: the w₀ step of a run tuning DropConnect + input/hidden variational dropout:
  one fused ``_VF.lstm`` call per layer with masked W_hh and inputs.
* ``perturbed +reg``: per-example δλ through the custom recurrence (centered-STN Θ step, and
  the λ step's forward); w₀ frozen, gradients for Θ.
* ``linearized +reg``: Δ-STN's Θ step: fused primal + hand-written JVP recurrence; w₀ frozen,
  gradients for Θ through the tangent.

Every ``--backends`` entry repeats the custom-recurrence cases with that cell backend
(``eager``, ``compile``: torch.compile of the per-step cells). Cases are timed round-robin
(``--repeats`` rounds) so load from other processes hits them alike; the table gives the
minimum and median and the ratio of minima to nn.LSTM.

    python benchmarks/lstm_speed.py --batch 20 --seq 35 --hidden 650 --json lstm.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any
from pathlib import Path

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hypertune as ht  # noqa: E402
from hypertune import context  # noqa: E402
from hypertune.context import Perturbation  # noqa: E402
from hypertune.hyperparameters import HyperParameters  # noqa: E402
from hypertune.layers import lstm as lstm_mod  # noqa: E402
from hypertune.layers.lstm import HyperLSTM  # noqa: E402


def build(args: argparse.Namespace) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    B, T, E, H = args.batch, args.seq, args.hidden, args.hidden
    plain = nn.LSTM(E, H, args.layers, batch_first=True).to(dtype)
    wrapped = nn.LSTM(E, H, args.layers, batch_first=True).to(dtype)
    wrapped.load_state_dict(plain.state_dict())
    specs = {
        "wdrop": ht.DropoutRate(init=0.3, perturb="batch"),
        "dropi": ht.DropoutRate(init=0.2),
        "droph": ht.DropoutRate(init=0.2),
    }
    space = HyperParameters(specs, dtype=dtype)
    bare_layer = HyperLSTM.from_module(wrapped, len(space), "rnn")
    reg_layer = HyperLSTM.from_module(
        wrapped, len(space), "rnn", dropconnect="wdrop", input_dropout="dropi", hidden_dropout="droph"
    )
    with torch.no_grad():
        for p in reg_layer.response_parameters():
            p.normal_(0, 0.05)
    base = [getattr(reg_layer, n) for n in reg_layer._flat_weights_names]
    x = torch.randn(B, T, E, dtype=dtype)
    proj = torch.randn(B, T, H, dtype=dtype)
    lam = space.unconstrained.detach().unsqueeze(0)
    eps = space.sample_noise(B).detach()

    def step_plain() -> None:
        xx = x.clone().requires_grad_()
        out, _ = plain(xx)
        (out * proj).sum().backward()

    def w0_step(layer: HyperLSTM) -> Callable[[], None]:
        def run() -> None:
            for p in base:
                p.requires_grad_(True)
            xx = x.clone().requires_grad_()
            with context.active(Perturbation(space, lam, None)):
                out, _ = layer(xx)
            (out * proj).sum().backward()

        return run

    def theta_step(linearize: bool) -> Callable[[], None]:
        def run() -> None:
            for p in base:
                p.requires_grad_(False)
            with context.active(Perturbation(space, lam + eps, eps, linearize=linearize)):
                if linearize:
                    with fwAD.dual_level():
                        out, _ = reg_layer(x)
                        primal, tangent = fwAD.unpack_dual(out)
                        out = primal + tangent
                else:
                    out, _ = reg_layer(x)
            (out * proj).sum().backward()

        return run

    cases: dict[str, Callable[[], None]] = {
        "nn.LSTM": step_plain,
        "δλ=0": w0_step(bare_layer),
        "δλ=0 +reg": w0_step(reg_layer),
    }
    cases["perturbed +reg"] = theta_step(False)
    cases["linearized +reg"] = theta_step(True)
    if args.reference:
        cases["perturbed +reg [autograd loop]"] = naive(theta_step(False))
        cases["linearized +reg [autograd loop]"] = naive(theta_step(True))
    return cases


def naive(fn: Callable[[], None]) -> Callable[[], None]:
    """The same pass with the recurrences as plain autograd loops over torch.mm (no custom
    backward, no oneDNN products): what the custom Functions are measured against."""

    def run() -> None:
        saved = (lstm_mod._ModulatedLSTM.apply, lstm_mod._TangentLSTM.apply, dict(lstm_mod._ONEDNN))
        lstm_mod._ModulatedLSTM.apply = lstm_mod._modulated_reference  # type: ignore[method-assign]
        lstm_mod._TangentLSTM.apply = lstm_mod._tangent_reference  # type: ignore[method-assign]
        lstm_mod._ONEDNN["ok"] = False
        try:
            fn()
        finally:
            lstm_mod._ModulatedLSTM.apply, lstm_mod._TangentLSTM.apply = saved[0], saved[1]  # type: ignore[method-assign]
            lstm_mod._ONEDNN.clear()
            lstm_mod._ONEDNN.update(saved[2])

    return run


def _cell_step(
    hh: torch.Tensor, x_t: torch.Tensor, s: torch.Tensor, c: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pointwise work of one perturbed step (what a fused cell kernel would replace)."""
    g = x_t.shape[1]
    n = g // 4
    a = torch.addcmul(hh[:, :g] + x_t, s, hh[:, g:])
    act = torch.sigmoid(a)
    gate = torch.tanh(a[:, 2 * n : 3 * n])
    c = act[:, n : 2 * n] * c + act[:, :n] * gate
    return act[:, 3 * n :] * torch.tanh(c), c, act, gate


def cell_backends(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """µs per call of one step's pointwise work: eager, torch.compile, torch.jit.script."""
    import warnings

    dtype = getattr(torch, args.dtype)
    B, H = args.batch, args.hidden
    gen = torch.Generator().manual_seed(0)
    inputs = [
        torch.randn(shape, generator=gen).to(dtype)
        for shape in ((B, 8 * H), (B, 4 * H), (B, 4 * H), (B, H))
    ]
    fns: dict[str, Callable[..., Any]] = {"eager": _cell_step}
    first: dict[str, float] = {}
    try:
        fns["torch.compile"] = torch.compile(_cell_step, dynamic=False)
    except Exception as err:  # pragma: no cover
        print(f"torch.compile unavailable: {err}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            fns["torch.jit.script"] = torch.jit.script(_cell_step)
        except Exception as err:  # pragma: no cover
            print(f"torch.jit.script unavailable: {err}")
    out: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(3):
                fn(*inputs)
            first[name] = time.perf_counter() - t0
        calls = 500
        per: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(args.repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn(*inputs)
                per[name].append((time.perf_counter() - t0) / calls * 1e6)
    for name in fns:
        out[name] = {"min_us": min(per[name]), "median_us": statistics.median(per[name]), "first_calls_s": first[name]}
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--seq", type=int, default=35)
    parser.add_argument("--hidden", type=int, default=650, help="embedding and hidden size")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--reference", action="store_true", help="also time the perturbed/linearized passes as plain autograd loops"
    )
    parser.add_argument(
        "--cells", action="store_true", help="also time one step's pointwise cell: eager / torch.compile / jit.script"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = build(args)
    warmup: dict[str, float] = {}
    for name, fn in cases.items():  # first calls: lazy init, torch.compile
        t0 = time.perf_counter()
        fn()
        warmup[name] = time.perf_counter() - t0
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    load_after = os.getloadavg()
    ref = min(times["nn.LSTM"])
    rows = [
        {
            "case": name,
            "min_ms": 1e3 * min(ts),
            "median_ms": 1e3 * statistics.median(ts),
            "ratio_min": min(ts) / ref,
            "first_call_ms": 1e3 * warmup[name],
        }
        for name, ts in times.items()
    ]
    meta = {
        "shape": {"batch": args.batch, "seq": args.seq, "hidden": args.hidden, "layers": args.layers},
        "dtype": args.dtype,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores",
        "loadavg_1min": [round(load_before[0], 2), round(load_after[0], 2)],
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
    }
    print(
        f"B={args.batch} T={args.seq} E=H={args.hidden} layers={args.layers} {args.dtype} "
        f"threads={meta['threads']} torch {torch.__version__} load {meta['loadavg_1min']}"
    )
    print(f"| {'case':32s} | {'min ms':>9s} | {'median ms':>9s} | {'× nn.LSTM':>9s} | {'1st call ms':>11s} |")
    print(f"|{'-' * 34}|{'-' * 11}|{'-' * 11}|{'-' * 11}|{'-' * 13}|")
    for r in rows:
        print(
            f"| {r['case']:32s} | {r['min_ms']:9.1f} | {r['median_ms']:9.1f} | {r['ratio_min']:9.2f} | "
            f"{r['first_call_ms']:11.1f} |"
        )
    result = {"meta": meta, "rows": rows, "times_s": times}
    if args.cells:
        cells = cell_backends(args)
        result["cells"] = cells
        print(f"\none step's pointwise cell (B={args.batch}, H={args.hidden}, no grad), µs per call:")
        for name, r in cells.items():
            print(f"  {name:18s} min {r['min_us']:8.1f}  median {r['median_us']:8.1f}  first 3 calls {r['first_calls_s']:.1f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
