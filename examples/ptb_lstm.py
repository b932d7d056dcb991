"""Penn Treebank, 2-layer LSTM language model: tune 7 regularization hyperparameters, report perplexity.

The STN paper's PTB set-up (MacKay et al. 2019, AWD-LSTM regularizers): variational (locked)
dropout on the LSTM's input, between the two layers and on its output; embedding (word) dropout;
DropConnect on the hidden-to-hidden weights; activation regularization (AR, on the dropped
output) and temporal activation regularization (TAR, on the last LSTM's output). Every rate
starts at 0.05 within [0, 0.95], AR/TAR at 0.05. 650-unit embedding and LSTMs with tied
weights, SGD lr 30 with gradient clipping 0.25 (the learning rate divided by 4 when the
validation loss stops improving), batch 40, BPTT 70, 2 train steps per val step, 1 warm-up epoch,
RMSprop (lr 0.01) on λ and σ, τ = 1e-3. PTB has its own validation set: it serves both the
hyperparameter steps and model selection, as in the paper (``--val-fraction`` does not apply;
``--train-subset N`` keeps the first N training tokens); the test set is untouched.

DropConnect acts on nn.LSTM's weights, so it needs nn.LSTM to be a hyper-layer
(a registered layer kind, HyperLSTM). With a hypertune where it is not,
the spec is left out (6 hyperparameters) and the LSTMs train as plain w₀; Δ-STN's linearized
step also needs HyperLSTM (PyTorch's fused LSTM kernels have no forward-mode AD), so there
``--mode delta`` falls back to ``centered``, said at start-up.

Each BPTT window starts from a zero hidden state (the model is a pure function of its input),
which costs some perplexity against AWD-LSTM's stateful training and evaluation.

    python examples/ptb_lstm.py --out runs/ptb
    python examples/ptb_lstm.py --smoke
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import _common  # noqa: E402
from _common import sigma0  # noqa: E402
import hypertune as ht  # noqa: E402
from hypertune.layers import registry  # noqa: E402
from hypertune.experiments.ptb import BPTTLoader, Corpus, LSTMLanguageModel, batchify, evaluate_lm, lm_loss  # noqa: E402


def lstm_is_hyper_layer() -> bool:
    found = registry.match_class(nn.LSTM)
    return found is not None and found.kind is not None


def hparams(init_scale: float | None = None, dropconnect: bool | None = None) -> dict:
    """The 7 hyperparameters (6 while nn.LSTM cannot be a hyper-layer: no DropConnect)."""
    if dropconnect is None:
        dropconnect = lstm_is_hyper_layer()
    specs = {
        "dropout": ht.DropoutRate(init=0.05, low=0.0, high=0.95, targets=["drop_in", "drop_hidden", "drop_out"],
                                  per_site=True, locked_dim=1, **sigma0(init_scale)),
        "embedding_dropout": ht.EmbeddingDropout(init=0.05, targets=["encoder"], **sigma0(init_scale)),
        "ar": ht.ActivationRegularization(init=0.05, targets=["drop_out"], **sigma0(init_scale)),
        "tar": ht.TemporalActivationRegularization(init=0.05, targets=["rnn.1"], **sigma0(init_scale)),
    }
    if dropconnect:
        specs["dropconnect"] = ht.DropConnect(init=0.05, targets=["rnn.*"], **sigma0(init_scale))
    return specs


class ClippedSGD(torch.optim.SGD):
    """SGD that clips the gradient norm of its parameters before every step.

    ``max_norm`` is kept in ``defaults``, so the Θ optimizer hypertune clones from this one
    (``--response-optimizer clone``, this script's default) clips too.
    """

    def __init__(self, params, lr: float, max_norm: float = 0.25, **kwargs) -> None:
        super().__init__(params, lr=lr, **kwargs)
        self.defaults["max_norm"] = max_norm

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if grads and self.defaults["max_norm"] > 0:
            torch.nn.utils.clip_grad_norm_(grads, self.defaults["max_norm"])
        return super().step(closure)


def main(argv: list[str] | None = None) -> dict:
    parser = _common.base_parser(__doc__.splitlines()[0], epochs=100, batch_size=40, lr=30.0, warmup_epochs=1,
                                 train_steps=2, val_steps=1)
    parser.add_argument("--bptt", type=int, default=70)
    parser.add_argument("--emsize", type=int, default=650)
    parser.add_argument("--nhid", type=int, default=650)
    parser.add_argument("--no-tie", action="store_true", help="do not tie the decoder to the embedding")
    parser.add_argument("--clip", type=float, default=0.25, help="gradient-norm clipping")
    parser.add_argument("--lr-decay", type=float, default=4.0,
                        help="divide the learning rate by this when the validation loss stops improving")
    parser.add_argument("--eval-batch-size", type=int, default=10)
    # Θ keeps the paper's setting here, a clipped copy of the weights' SGD: Adam for Θ (the
    # library default) was measured on the image models only.
    parser.set_defaults(response_optimizer="clone")
    args = parser.parse_args(argv)
    if args.smoke:
        _common.smoke_overrides(args, batch_size=8)
        args.bptt = min(args.bptt, 20)
        args.emsize = min(args.emsize, 64)
        args.nhid = min(args.nhid, 64)
    device = _common.setup(args)
    swappable = lstm_is_hyper_layer()
    if not args.untuned and args.mode == "delta" and not swappable:
        print("nn.LSTM is not a hyper-layer in this hypertune, and its fused kernels have no forward-mode "
              "AD: running --mode centered instead of delta (and without DropConnect)")
        args.mode = "centered"
    try:
        corpus = Corpus(args.data_root)  # fetched into --data-root/ptb if missing and online
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from None
    tokens = corpus.train[: args.train_subset] if args.train_subset else corpus.train  # --train-subset: tokens
    train_data = batchify(tokens, args.batch_size, device)
    hyper_val = batchify(corpus.valid, args.batch_size, device)
    eval_sets = {"val": batchify(corpus.valid, args.eval_batch_size, device),
                 "test": batchify(corpus.test, args.eval_batch_size, device)}
    limit = 3 if args.smoke else None
    train_loader = BPTTLoader(train_data, args.bptt, max_batches=6 if args.smoke else None)
    val_loader = BPTTLoader(hyper_val, args.bptt, max_batches=4 if args.smoke else None)

    def evaluate(model: nn.Module, split: str) -> dict:
        loss = evaluate_lm(model, BPTTLoader(eval_sets[split], args.bptt, max_batches=limit))
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}

    torch.manual_seed(args.seed)
    model = LSTMLanguageModel(corpus.vocab_size, args.emsize, args.nhid, dropout=0.05, tie_weights=not args.no_tie)
    return _common.train(
        args, name="ptb_lstm", model=model, hparams=hparams(args.init_scale, dropconnect=swappable), device=device,
        train_loader=train_loader, val_loader=val_loader, evaluate=evaluate, loss_fn=lm_loss,
        make_optimizer=lambda params: ClippedSGD(params, lr=args.lr, max_norm=args.clip),
        make_scheduler=lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min", factor=1.0 / args.lr_decay, patience=0),
    )


if __name__ == "__main__":
    main()
