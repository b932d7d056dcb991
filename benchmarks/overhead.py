"""Cost of one tuned step against one plain optimizer step, side by side in one process.

For each model the plain run is the same architecture with its dropout at the starting rate and
torch.optim's own weight decay, stepped by the same optimizer. The tuned cost is one
``train_step`` plus ``val_step`` amortized at the default T_train/T_valid = 5/1. Plain and
tuned steps are timed alternately (warm-up, many repeats, median), so machine noise hits both;
CUDA is timed with synchronize.

    python benchmarks/overhead.py --models mlp --device cpu --json out.json

``--memory`` adds, per row, the bytes of parameters and optimizer state after a step (plain:
w₀ and SGD's momentum; tuned: w₀, Θ, λ, σ and all their optimizers' state) and the peak memory
of a few steps: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU, in a fresh process running only that
configuration, how far the peak RSS rises above the RSS after imports (Linux).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hypertune as ht  # noqa: E402
from hypertune.experiments import SimpleCNN, mnist_mlp  # noqa: E402

T_TRAIN_PER_VAL = 5


def _resnet18_cifar() -> nn.Module:
    import torchvision

    net = torchvision.models.resnet18(weights=None, num_classes=10)
    net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def _lstm_lm() -> nn.Module:
    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10000, 650)
            self.drop_in = nn.Dropout(0.05)
            self.rnn = nn.LSTM(650, 650, num_layers=2, batch_first=True)
            self.drop_out = nn.Dropout(0.05)
            self.head = nn.Linear(650, 10000)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            h, _ = self.rnn(self.drop_in(self.emb(tokens)))
            return self.head(self.drop_out(h))

    return LM()


def _gpt2_small() -> nn.Module:
    """A small GPT-2 from its config (random weights): 4 layers, width 128, vocabulary 1000."""
    import transformers

    config = transformers.GPT2Config(
        vocab_size=1000, n_positions=128, n_embd=128, n_layer=4, n_head=4,
        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def _setup(name: str, device: torch.device, batch: int | None):
    """(model factory, hparams, inputs, targets, loss, learning rate)."""
    g = torch.Generator().manual_seed(0)
    if name == "mlp":
        b = batch or 128
        x, y = torch.randn(b, 1, 28, 28, generator=g), torch.randint(0, 10, (b,), generator=g)
        hparams = {"input_dropout": ht.InputDropout(), "dropout": ht.DropoutRate(per_site=True)}
        return mnist_mlp, hparams, x, y, F.cross_entropy, 0.01
    if name == "simple_cnn":
        b = batch or 128
        x, y = torch.randn(b, 1, 28, 28, generator=g), torch.randint(0, 10, (b,), generator=g)
        hparams = {"dropout": ht.DropoutRate(per_site=True), "cutout": ht.Cutout()}
        return SimpleCNN, hparams, x, y, F.cross_entropy, 0.01
    if name == "resnet18":
        b = batch or 128
        x, y = torch.randn(b, 3, 32, 32, generator=g), torch.randint(0, 10, (b,), generator=g)
        hparams = {"weight_decay": ht.WeightDecay(init=5e-4), "cutout": ht.Cutout()}
        return _resnet18_cifar, hparams, x, y, F.cross_entropy, 0.03
    if name == "lstm":
        b = batch or 20
        x = torch.randint(0, 10000, (b, 35), generator=g)
        y = torch.randint(0, 10000, (b, 35), generator=g)
        hparams = {"dropout": ht.DropoutRate(per_site=True, locked_dim=1), "edrop": ht.EmbeddingDropout()}

        def loss(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), t.reshape(-1))

        return _lstm_lm, hparams, x, y, loss, 0.03
    if name == "gpt2":
        b = batch or 16
        x = torch.randint(0, 1000, (b, 64), generator=g)
        hparams = {"dropout": ht.DropoutRate(init=0.1), "weight_decay": ht.WeightDecay(init=1e-4)}

        def lm_loss(out, t: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), t.reshape(-1))

        return _gpt2_small, hparams, x, x, lm_loss, 0.03
    raise SystemExit(f"unknown model {name!r}: choose mlp, simple_cnn, resnet18, lstm, gpt2")


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    def run(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) * 1000

    return run


def _cycle_median(times: list[float], every: int) -> float:
    """Mean over one ``response_every`` cycle of each position's median: with a Θ step on one
    train step in k, a plain median would pick the cheap steps and hide the Θ step's cost."""
    return statistics.fmean(statistics.median(times[r::every]) for r in range(min(every, len(times))))


def plain_sgd_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, lr: float,
                   weight_decay: float = 0.0) -> Callable[[], None]:
    """The plain step every tuned step is compared with: SGD, momentum 0.9."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def time_side_by_side(
    timer: Callable[[Callable[[], object]], float],
    plain_step: Callable[[], object],
    train_step: Callable[[], object],
    val_step: Callable[[], object],
    repeats: int,
    warmup: int,
    response_every: int = 1,
) -> tuple[float, float, float]:
    """Median ms of (plain step, train step, val step), timed alternately so machine noise hits
    all three; the val step once per T_TRAIN_PER_VAL train steps, as in training."""
    for _ in range(warmup):
        plain_step()
        train_step()
        val_step()
    plain_ms, train_ms, val_ms = [], [], []
    for i in range(repeats):
        plain_ms.append(timer(plain_step))
        train_ms.append(timer(train_step))
        if i % T_TRAIN_PER_VAL == 0:
            val_ms.append(timer(val_step))
    return statistics.median(plain_ms), _cycle_median(train_ms, response_every), statistics.median(val_ms)


def result_row(model: str, device: torch.device, mode: str, batch: int, plain: float, train: float,
               val: float) -> dict:
    """One JSON row: the tuned cost is a train step plus the val step amortized over T_TRAIN_PER_VAL."""
    hyper = train + val / T_TRAIN_PER_VAL
    return {"model": model, "device": str(device), "mode": mode, "batch": batch, "plain_ms": round(plain, 3),
            "hyper_ms": round(hyper, 3), "train_step_ms": round(train, 3), "val_step_ms": round(val, 3),
            "ratio": round(hyper / plain, 3)}


def _tensor_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if torch.is_tensor(t):
            seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def _state_bytes(optimizers) -> int:
    return _tensor_bytes(v for opt in optimizers for state in opt.state.values() for v in state.values())


def _build_step(name: str, device: torch.device, batch: int | None, config: str, options: dict | None):
    """(step function, parameters, optimizers) of the plain run (config="plain") or a tuned mode."""
    factory, hparams, x, y, loss_fn, lr = _setup(name, device, batch)
    x, y = x.to(device), y.to(device)
    torch.manual_seed(0)
    base = factory().to(device)
    if config == "plain":
        wd = hparams["weight_decay"].init if "weight_decay" in hparams else 0.0
        opt = torch.optim.SGD(base.parameters(), lr=lr, momentum=0.9, weight_decay=wd)

        def plain() -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(base(x), y).backward()
            opt.step()

        return plain, list(base.parameters()), [opt]
    model = ht.HyperModel.wrap(base, hparams).to(device)
    tuned = ht.DeltaSTNOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), mode=config, **(options or {})
    )
    calls = [0]

    def step() -> None:
        tuned.train_step(x, y, loss_fn)
        calls[0] += 1
        if calls[0] % T_TRAIN_PER_VAL == 0:
            tuned.val_step(x, y, loss_fn)

    optimizers = [tuned.optimizer, tuned.response_optimizer, tuned.hyper_optimizer]
    return step, list(model.parameters()), optimizers


def memory_row(name: str, device: torch.device, batch: int | None, config: str, options: dict | None,
               steps: int = T_TRAIN_PER_VAL) -> dict:
    """Bytes of parameters and optimizer state, and the peak memory of ``steps`` steps."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        baseline = _reset_peak_rss()
    step, params, optimizers = _build_step(name, device, batch, config, options)
    for _ in range(steps):
        step()
    row = {"param_bytes": _tensor_bytes(params), "optimizer_state_bytes": _state_bytes(optimizers)}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        row["peak_bytes"] = torch.cuda.max_memory_allocated(device) - baseline
        row["peak_kind"] = "cuda max_memory_allocated"
    else:
        row["peak_bytes"] = _status_kib("VmHWM") * 1024 - baseline
        row["peak_kind"] = "peak RSS growth over the process after imports"
    return row


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> int:
    """Reset the process's peak RSS (Linux: write 5 to clear_refs) and return the RSS now, in bytes,
    so the peak measured afterwards is that of the model, its optimizers and its steps only."""
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def memory_in_fresh_process(name: str, device: torch.device, batch: int | None, config: str,
                            options: dict | None, threads: int) -> dict:
    """CPU peak RSS is per process: measure each configuration in its own."""
    cmd = [sys.executable, __file__, "--memory-child", json.dumps(
        {"name": name, "device": str(device), "batch": batch, "config": config, "options": options or {},
         "threads": threads})]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(
    name: str,
    device: torch.device,
    modes: list[str],
    repeats: int,
    warmup: int,
    batch: int | None,
    options: dict | None = None,
    compile_mode: str | None = None,
) -> list[dict]:
    """``compile_mode`` (a ``torch.compile`` mode, e.g. "reduce-overhead" for CUDA graphs) compiles
    the plain model and each tuned one alike, so the ratio compares compiled with compiled."""
    factory, hparams, x, y, loss_fn, lr = _setup(name, device, batch)
    x, y = x.to(device), y.to(device)
    torch.manual_seed(0)
    base = factory().to(device)
    timer = _timer(device)

    wd = hparams["weight_decay"].init if "weight_decay" in hparams else 0.0
    compiled = (lambda m: torch.compile(m, mode=compile_mode)) if compile_mode else (lambda m: m)
    plain_step = plain_sgd_step(compiled(copy.deepcopy(base)), x, y, loss_fn, lr, wd)

    tuned = {}
    for mode in modes:
        model = ht.HyperModel.wrap(copy.deepcopy(base), hparams).to(device)
        opt = ht.DeltaSTNOptimizer(
            compiled(model),
            torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9),
            mode=mode,  # type: ignore[arg-type]
            **(options or {}),
        )
        tuned[mode] = opt

    rows = []
    for mode, opt in tuned.items():
        plain, train, val = time_side_by_side(
            timer, plain_step, lambda: opt.train_step(x, y, loss_fn), lambda: opt.val_step(x, y, loss_fn),
            repeats, warmup, opt.response_every,  # the optimizer's own cadence, default or not
        )
        settings = {"response_every": opt.response_every, **(options or {})}
        if compile_mode:
            settings["compile"] = compile_mode
        rows.append({**result_row(name, device, mode, int(x.shape[0]), plain, train, val), **settings})
        print(f"{name:>10} {str(device):>6} {mode:>8} {plain:10.2f} {rows[-1]['hyper_ms']:10.2f} "
              f"{rows[-1]['ratio']:7.2f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp", help="comma list: mlp,simple_cnn,resnet18,lstm,gpt2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--modes", default="stn,centered,delta")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=None, help="override the model's batch size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--response-fraction", type=float, default=1.0,
                        help="DeltaSTNOptimizer(response_fraction=...): Θ step on this part of a batch")
    parser.add_argument("--response-every", type=int, default=None,
                        help="DeltaSTNOptimizer(response_every=...): Θ step every k train steps "
                             "(default: the library's)")
    parser.add_argument("--response-optimizer", choices=["adam", "clone"], default=None,
                        help="DeltaSTNOptimizer(response_optimizer=...); default: the library's (Adam in "
                             "the centered modes, a clone of the SGD in stn)")
    parser.add_argument("--memory", action="store_true",
                        help="also report parameter/optimizer-state bytes and peak memory against plain")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--compile", default=None, metavar="MODE",
                        help="torch.compile plain and tuned models alike with this mode (default, "
                             "reduce-overhead: CUDA graphs, max-autotune)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.memory_child is not None:
        job = json.loads(args.memory_child)
        torch.set_num_threads(job["threads"])
        row = memory_row(job["name"], torch.device(job["device"]), job["batch"], job["config"], job["options"])
        print(json.dumps(row))
        return [row]
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"{'model':>10} {'device':>6} {'mode':>8} {'plain ms':>10} {'tuned ms':>10} {'ratio':>7}")
    rows = []
    for name in args.models.split(","):
        options = {}
        if args.response_fraction != 1.0:
            options["response_fraction"] = args.response_fraction
        if args.response_every is not None:
            options["response_every"] = args.response_every
        if args.response_optimizer is not None:
            options["response_optimizer"] = args.response_optimizer
        timed = measure(
            name.strip(), device, args.modes.split(","), args.repeats, args.warmup, args.batch, options,
            args.compile,
        )
        if args.memory:
            def mem(config: str) -> dict:
                if device.type == "cuda":
                    return memory_row(name.strip(), device, args.batch, config, options)
                return memory_in_fresh_process(name.strip(), device, args.batch, config, options, args.threads)

            plain = mem("plain")
            for row in timed:
                tuned = mem(row["mode"])
                row.update({f"plain_{k}": v for k, v in plain.items()})
                row.update({f"tuned_{k}": v for k, v in tuned.items()})
                print(f"{'':>10} memory {row['mode']:>8}: params {plain['param_bytes'] / 2**20:.1f} -> "
                      f"{tuned['param_bytes'] / 2**20:.1f} MiB, optimizer state "
                      f"{plain['optimizer_state_bytes'] / 2**20:.1f} -> {tuned['optimizer_state_bytes'] / 2**20:.1f} "
                      f"MiB, peak {plain['peak_bytes'] / 2**20:.0f} -> {tuned['peak_bytes'] / 2**20:.0f} MiB "
                      f"({plain['peak_kind']})", flush=True)
        rows += timed
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
