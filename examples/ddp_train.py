"""Δ-STN with DistributedDataParallel, launched by torchrun (CPU/gloo or GPU/NCCL).

Tunes a dropout rate and a weight decay of an MLP on a synthetic classification task, every rank
taking its slice of each global batch. Run it with::

    torchrun --nproc_per_node=2 examples/ddp_train.py --steps 300
    torchrun --nproc_per_node=2 examples/ddp_train.py --steps 300 --checkpoint run.pt   # resumes if run.pt exists
    torchrun --nproc_per_node=2 examples/ddp_train.py --steps 300 --checkpoint run.pt --stop-after 150   # then rerun
    torchrun --nproc_per_node=4 examples/ddp_train.py --amp bf16                        # autocast (fp16 adds a GradScaler)

The order that matters: ``HyperModel.wrap`` → ``.to(device)`` → ``prepare_ddp`` (DDP with Θ, λ
and σ kept out of its gradient buckets) → ``DeltaSTNOptimizer(ddp_model, ...)`` (broadcasts Θ,
λ, σ from rank 0; averages their gradients itself every step). Checkpoints are written by rank 0
with every rank's RNG state (``hypertune.checkpoint``); the data order is a function of the step,
so a resumed run continues where the interrupted one stopped.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import hypertune as ht  # noqa: E402
from hypertune import checkpoint  # noqa: E402
from hypertune.distributed import prepare_ddp  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="train steps (global batches)")
    p.add_argument("--batch-size", type=int, default=128, help="global batch size, split over ranks")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--hyper-lr", type=float, default=0.01)
    p.add_argument("--tune-every", type=int, default=5, help="train steps per val (λ) step")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--checkpoint", type=Path, default=None, help="save here every --save-every steps; resume if it exists")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--stop-after", type=int, default=None, help="stop at this step, as if interrupted (try resuming)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    return p.parse_args()


def make_data(seed: int, n_train: int = 8192, n_tune: int = 2048, dim: int = 32, classes: int = 10):
    """A noisy teacher MLP's labels: enough data to overfit without regularization."""
    g = torch.Generator().manual_seed(seed)
    teacher = [torch.randn(dim, 64, generator=g), torch.randn(64, classes, generator=g)]
    x = torch.randn(n_train + n_tune, dim, generator=g)
    logits = torch.tanh(x @ teacher[0]) @ teacher[1] + 2.0 * torch.randn(len(x), classes, generator=g)
    y = logits.argmax(1)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def batch(data, step: int, global_batch: int, rank: int, world: int, seed: int):
    """This rank's slice of global batch ``step``: a function of the step alone (resumable)."""
    x, y = data
    per_epoch = len(x) // global_batch
    epoch, b = divmod(step, per_epoch)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    idx = perm[b * global_batch : (b + 1) * global_batch]
    local = global_batch // world
    idx = idx[rank * local : (rank + 1) * local]
    return x[idx], y[idx]


def main() -> None:
    args = parse_args()
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the {world} ranks")

    train, tune = make_data(args.seed)
    torch.manual_seed(args.seed)
    net = nn.Sequential(
        nn.Linear(32, 256), nn.ReLU(), nn.Dropout(0.1),
        nn.Linear(256, 256), nn.ReLU(), nn.Dropout(0.1),
        nn.Linear(256, 10),
    )
    # 1. wrap, 2. move, 3. DDP with the hyper-state left out of its buckets, 4. the optimizer.
    hyper_model = ht.HyperModel.wrap(
        net, {"dropout": ht.DropoutRate(init=0.05), "weight_decay": ht.WeightDecay(init=1e-4)}
    ).to(device)
    ddp_model = prepare_ddp(hyper_model, device_ids=[local_rank] if use_cuda else None)
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None
    opt = ht.DeltaSTNOptimizer(
        ddp_model,
        torch.optim.SGD(hyper_model.parameters(), lr=args.lr, momentum=0.9),
        hyper_lr=args.hyper_lr,
        autocast=amp_dtype,
        grad_scaler=scaler,
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt.optimizer, T_max=args.steps)
    # Independent perturbations and dropout masks on every rank (Θ, λ, σ, w₀ are synced anyway).
    torch.manual_seed(args.seed * 1000 + rank + 1)

    start = 0
    if args.checkpoint is not None and args.checkpoint.exists():
        start = checkpoint.load(args.checkpoint, model=ddp_model, optimizer=opt, schedulers=[sched])["step"]
        if rank == 0:
            print(f"resumed from {args.checkpoint} at step {start}", flush=True)

    t0 = time.perf_counter()
    stop = args.steps if args.stop_after is None else min(args.steps, args.stop_after)
    for step in range(start, stop):
        x, y = batch(train, step, args.batch_size, rank, world, args.seed)
        result = opt.train_step(x.to(device), y.to(device), F.cross_entropy)
        if step % args.tune_every == 0:
            xv, yv = batch(tune, step // args.tune_every, args.batch_size, rank, world, args.seed + 1)
            opt.val_step(xv.to(device), yv.to(device), F.cross_entropy)
        sched.step()
        if rank == 0 and (step % args.log_every == 0 or step == stop - 1):
            values = ", ".join(f"{k}={v:.4g}" for k, v in result.hparams.items())
            print(f"step {step:5d}  loss {result.loss:.4f}  {values}", flush=True)
        if args.checkpoint is not None and ((step + 1) % args.save_every == 0 or step + 1 == stop):
            checkpoint.save(args.checkpoint, model=ddp_model, optimizer=opt, schedulers=[sched], extra={"step": step + 1})

    ddp_model.eval()
    with torch.no_grad():
        xt, yt = tune[0].to(device), tune[1].to(device)
        acc = (hyper_model(xt).argmax(1) == yt).float().mean().item()
    if rank == 0:
        print(
            f"done: {stop - start} steps on {world} rank(s) in {time.perf_counter() - t0:.1f} s; "
            f"tune accuracy {acc:.3f}; final {opt.hparams()}",
            flush=True,
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
