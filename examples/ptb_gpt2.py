"""Penn Treebank, a small GPT-2 trained from scratch with Hugging Face's Trainer: tune its dropouts and weight decay.

The model is ``GPT2LMHeadModel`` built from a small config (random weights, nothing
downloaded) over PTB's 10,000-word vocabulary, trained on fixed-length blocks of the token
stream with ``transformers.Trainer``'s own loop through :class:`DeltaSTNTrainer`. Tuned, each
site on its own (``per_site=True``): the embedding dropout (``transformer.drop``), the
residual dropouts after attention and after the MLP of every block (``attn.resid_dropout``,
``mlp.dropout``), the attention-probability dropouts (``attn.attn_dropout``, when this
hypertune can tune them, see below), and one weight decay over the embedding and the
attention and MLP projections (an L2 penalty 0.5·λ·‖w‖²). Every rate starts at
``--init-dropout`` (0.05), the decay at ``--init-wd``.

The λ steps use a held-out piece of the *training* stream (``--tune-tokens`` after the
``--train-subset`` tokens), never trained on; PTB's validation and test sets are only
evaluated. ``--untuned`` trains the same model with plain ``transformers.Trainer``, every
dropout at its starting rate (the config's rates) and the decay at its starting value (the
same penalty, :class:`_common.FixedRegularizers`).

Outputs under ``--out DIR``: ``hypertune_schedule.csv`` and ``hypertune_schedule.png`` (tuned
runs), ``log_history.json`` (the Trainer's logs, λ and σ included) and ``metrics.json``
(validation and test loss and perplexity, final values, wall time, arguments).

GPT-2's attention hands ``self.attn_dropout.p`` to its attention function; a hypertune that
cannot tune such a site keeps it as a plain dropout at ``--init-dropout`` in both runs, and
this script says so at start-up. Its ``Conv1D`` projections take weight decay as plain
weights (no best-response) unless ``Conv1D`` is a hyper-layer kind. The position embedding
``wpe`` and the ``lm_head`` (which shares ``wte``'s weight) are left unwrapped: the
best-responses live in ``wte`` (and the projections, where ``Conv1D`` is a kind).

    python examples/ptb_gpt2.py --out runs/gpt2
    python examples/ptb_gpt2.py --untuned --out runs/gpt2_untuned
    python examples/ptb_gpt2.py --smoke
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

import _common  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import hypertune as ht  # noqa: E402
from hypertune.experiments.ptb import Corpus  # noqa: E402
from hypertune.integrations.transformers import DeltaSTNTrainer  # noqa: E402

DROPOUT_SITES = ["transformer.drop", "*.attn.resid_dropout", "*.mlp.dropout"]
ATTENTION_SITES = ["*.attn.attn_dropout"]
DECAY_SITES = ["transformer.wte", "*.attn.c_attn", "*.attn.c_proj", "*.mlp.c_fc", "*.mlp.c_proj"]
UNWRAPPED = ["transformer.wpe", "lm_head"]


class Blocks(torch.utils.data.Dataset):
    """Consecutive, non-overlapping ``block``-token windows of a token stream; labels = inputs
    (the model shifts them)."""

    def __init__(self, tokens: Tensor, block: int) -> None:
        n = (len(tokens) // block) * block
        if n == 0:
            raise ValueError(f"{len(tokens)} tokens cannot fill one block of {block}")
        self.rows = tokens[:n].view(-1, block)

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def attention_dropout_tunable() -> bool:
    """Whether this hypertune tunes a dropout that the attention reads as ``.p`` (issue 12)."""
    from torch import nn

    from hypertune.layers import HyperDropout

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(3, 3)
            self.attn_dropout = nn.Dropout(0.1)

        def forward(self, x: Tensor) -> Tensor:
            return self.attn_dropout(self.proj(x)) * (1 - self.attn_dropout.p)

    try:
        hm = ht.HyperModel.wrap(Probe(), {"d": ht.DropoutRate(init=0.1, targets=["attn_dropout"])})
        hm.eval()
        hm(torch.ones(2, 3))
        return isinstance(hm.module.attn_dropout, HyperDropout)
    except (AttributeError, ht.HyperTuneError):
        return False


def hparams(init_dropout: float, init_wd: float, init_scale: float | None, attention: bool) -> dict[str, ht.HParam]:
    sites = DROPOUT_SITES + (ATTENTION_SITES if attention else [])
    sigma0 = _common.sigma0(init_scale)
    return {
        "dropout": ht.DropoutRate(init=init_dropout, low=0.0, high=0.95, targets=sites, per_site=True, **sigma0),
        "weight_decay": ht.WeightDecay(init=init_wd, targets=DECAY_SITES, **sigma0),
    }


class FixedValueTrainer(Trainer):
    """``transformers.Trainer`` adding the starting values' penalties (weight decay) to the loss."""

    def __init__(self, fixed: _common.FixedRegularizers, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fixed = fixed

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            penalty = self.fixed.penalty()
            # A loss normalized over the accumulated batch is not divided by the accumulation
            # steps afterwards: give each micro-batch its share of the penalty.
            if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
                penalty = penalty / self.current_gradient_accumulation_steps
            loss = loss + penalty
        return (loss, outputs) if return_outputs else loss


@torch.no_grad()
def token_loss(model: torch.nn.Module, data: torch.utils.data.Dataset, device: torch.device, batch_size: int = 64) -> float:
    """Mean next-token cross-entropy over every predicted token of ``data``, in eval mode.

    Computed here rather than by ``Trainer.evaluate``: for a GPT-2 built from a config (no
    ``loss_type``), transformers 5 counts position 0 of every block as a predicted token when
    it normalizes the loss (``Trainer._loss_shifts_labels`` is False), which scales the plain
    Trainer's losses by (T-1)/T.
    """
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(data), batch_size):
            ids = torch.stack([data[i]["input_ids"] for i in range(start, min(len(data), start + batch_size))]).to(device)
            logits = model(input_ids=ids).logits[:, :-1]
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
            count += ids[:, 1:].numel()
    finally:
        model.train(was)
    return total / count


def build_model(vocab: int, args: argparse.Namespace) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=vocab, n_positions=args.block_size, n_embd=args.n_embd, n_layer=args.n_layer,
        n_head=args.n_head, resid_pdrop=args.init_dropout, embd_pdrop=args.init_dropout,
        attn_pdrop=args.init_dropout, bos_token_id=0, eos_token_id=0, use_cache=False,
    )
    torch.manual_seed(args.seed)
    return GPT2LMHeadModel(config)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = _common.base_parser(__doc__.splitlines()[0], epochs=8, batch_size=16, lr=3e-3, warmup_epochs=1,
                            train_steps=2, val_steps=1)
    # A short run on a small subset, where the untuned model overfits within a few epochs: λ
    # gets ~35 steps, so its RMSprop learning rate is 3e-2 rather than the library's 1e-2.
    p.set_defaults(train_subset=10_000, hyper_lr=3e-2)
    p.add_argument("--block-size", type=int, default=64, help="tokens per training example")
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--init-dropout", type=float, default=0.05, help="starting rate of every dropout site")
    p.add_argument("--init-wd", type=float, default=1e-5, help="starting weight decay (L2 coefficient)")
    p.add_argument("--tune-tokens", type=int, default=12_000,
                   help="training tokens after the --train-subset ones held out for the λ steps")
    p.add_argument("--grad-accum", type=int, default=1, help="TrainingArguments.gradient_accumulation_steps")
    p.add_argument("--lr-warmup-steps", type=int, default=20, help="linear LR warm-up (optimizer steps)")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N blocks only")
    p.add_argument("--monitor-blocks", type=int, default=64,
                   help="validation blocks the Trainer evaluates after each epoch (the final numbers use all)")
    for action in p._actions:
        if action.dest == "out":
            action.help = ("folder for hypertune_schedule.csv/.png, log_history.json, metrics.json and the "
                           "Trainer's output (trainer/)")
    args = p.parse_args(argv)
    # The Trainer takes one λ step per --train-steps optimizer steps on the --tune-tokens held out
    # of the training set: the shared parser's T_valid and validation split do not apply here.
    if args.val_steps != 1:
        p.error("--val-steps does not apply: DeltaSTNTrainer takes one λ step every --train-steps steps")
    if args.val_fraction != p.get_default("val_fraction"):
        p.error("--val-fraction does not apply: the λ steps use the --tune-tokens training tokens after --train-subset")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if args.smoke:
        args.epochs, args.batch_size, args.block_size = 1, 8, 32
        args.n_embd, args.n_layer, args.n_head = 32, 1, 2
        args.train_subset, args.tune_tokens, args.eval_limit, args.monitor_blocks = 32 * 8 * 6, 32 * 8 * 2, 16, 16
        args.train_steps, args.warmup_epochs, args.lr_warmup_steps = 2, 0, 2
    device = _common.setup(args)
    hf_logging.set_verbosity_error()
    try:
        corpus = Corpus(args.data_root)  # fetched into --data-root/ptb if missing and online
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from None
    train_tokens = corpus.train[: args.train_subset]
    tune_tokens = corpus.train[args.train_subset : args.train_subset + args.tune_tokens]
    if len(tune_tokens) < args.block_size:
        raise SystemExit(f"--train-subset {args.train_subset} leaves no training tokens for --tune-tokens")
    train_set, tune_set = Blocks(train_tokens, args.block_size), Blocks(tune_tokens, args.block_size)
    eval_sets = {"val": Blocks(corpus.valid, args.block_size), "test": Blocks(corpus.test, args.block_size)}
    if args.eval_limit:
        eval_sets = {k: torch.utils.data.Subset(v, range(min(len(v), args.eval_limit))) for k, v in eval_sets.items()}
    monitor = torch.utils.data.Subset(eval_sets["val"], range(min(len(eval_sets["val"]), args.monitor_blocks)))
    steps_per_epoch = math.ceil(len(train_set) / (args.batch_size * args.grad_accum))
    out = args.out if args.out is not None else Path("runs") / ("ptb_gpt2_untuned" if args.untuned else "ptb_gpt2")
    attention = attention_dropout_tunable()
    if not attention:
        print(f"attention dropout cannot be tuned by this hypertune: {ATTENTION_SITES} stay plain dropouts "
              f"at {args.init_dropout}", flush=True)
    specs = hparams(args.init_dropout, args.init_wd, args.init_scale, attention)
    training_args = TrainingArguments(
        output_dir=str(out / "trainer"), num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64, gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr,
        lr_scheduler_type="cosine", warmup_steps=args.lr_warmup_steps, weight_decay=0.0, max_grad_norm=1.0,
        eval_strategy="epoch", logging_steps=max(1, steps_per_epoch // 4), save_strategy="no", report_to=[],
        seed=args.seed, use_cpu=device.type == "cpu", disable_tqdm=args.no_progress, dataloader_num_workers=0,
    )
    model = build_model(corpus.vocab_size, args)
    start, start_cpu = time.time(), time.process_time()
    if args.untuned:
        trainer: Trainer = FixedValueTrainer(
            _common.FixedRegularizers(model, specs), model=model, args=training_args, train_dataset=train_set,
            eval_dataset=monitor,
        )
    else:
        hm = ht.HyperModel.wrap(model, specs, exclude=UNWRAPPED)
        trainer = DeltaSTNTrainer(
            model=hm, args=training_args, train_dataset=train_set, eval_dataset=monitor,
            tune_dataset=tune_set, tune_every=args.train_steps, tune_warmup_steps=args.warmup_epochs * steps_per_epoch,
            stn_options={"mode": args.mode, "hyper_lr": args.hyper_lr, "entropy_weight": args.entropy_weight,
                         "response_lr": args.response_lr, "response_optimizer": args.response_optimizer,
                         "tune_scales": args.tune_scales,
                         **({} if args.response_every is None else {"response_every": args.response_every})},
            write_schedule=False,
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    wall, cpu = time.time() - start, time.process_time() - start_cpu
    evaluated = trainer.hyper_model if isinstance(trainer, DeltaSTNTrainer) else model
    results = {}
    for split, data in eval_sets.items():
        loss = token_loss(evaluated, data, device)
        results[split] = {"loss": loss, "ppl": math.exp(min(loss, 50.0))}
    out.mkdir(parents=True, exist_ok=True)
    final = trainer.stn.hparams() if isinstance(trainer, DeltaSTNTrainer) else _common._initial_values(specs)
    if isinstance(trainer, DeltaSTNTrainer):
        trainer.write_schedule(out)
    metrics = {
        "example": "ptb_gpt2", "tuned": not args.untuned, "mode": None if args.untuned else args.mode,
        "epochs": args.epochs, "optimizer_steps": trainer.state.global_step, "val": results["val"],
        "test": results["test"], "final_hparams": final, "attention_dropout_tuned": attention and not args.untuned,
        "wall_time_s": round(wall, 1), "cpu_time_s": round(cpu, 1), "device": str(device), "torch": torch.__version__,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1) + "\n")
    kind = "untuned" if args.untuned else f"tuned ({args.mode})"
    for split in ("val", "test"):
        print(f"final ptb_gpt2 [{kind}] {split}: loss={results[split]['loss']:.4f} ppl={results[split]['ppl']:.2f}")
    print(f"wall time {wall:.0f} s, CPU time {cpu:.0f} s; wrote {out}/", flush=True)
    return metrics


if __name__ == "__main__":
    main()
