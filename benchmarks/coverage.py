"""Share of each model's weights that hypertune tunes, and what stays w₀ (HyperModel.coverage()).

Models are built from configs with random weights (no download). Weight decay only, so no
dropout site matters:

    python benchmarks/coverage.py            # a table on stdout
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

import hypertune as ht


def _models() -> dict[str, Callable[[], nn.Module]]:
    import timm
    import torchvision
    import transformers as tr

    return {
        "torchvision r3d_18": lambda: torchvision.models.video.r3d_18(),
        "torchvision r2plus1d_18": lambda: torchvision.models.video.r2plus1d_18(),
        "GPT-2 (2 layers, d=64)": lambda: tr.GPT2LMHeadModel(
            tr.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=500, n_positions=64)
        ),
        "T5 (1+1 layers, d=64)": lambda: tr.T5ForConditionalGeneration(
            tr.T5Config(vocab_size=500, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=2,
                        decoder_start_token_id=0, pad_token_id=0)
        ),
        "timm nf_regnet_b0": lambda: timm.create_model("nf_regnet_b0"),
        "timm vit_tiny_patch16_224": lambda: timm.create_model("vit_tiny_patch16_224"),
        "timm tf_efficientnet_b0 (Conv2dSame)": lambda: timm.create_model("tf_efficientnet_b0"),
    }


def main() -> None:
    print(f"{'model':40s} {'tuned':>7s}  stays w₀")
    for name, build in _models().items():
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ht.WrapNotice)
            hm = ht.HyperModel.wrap(build(), {"weight_decay": ht.WeightDecay()})
        cov = hm.coverage()
        reasons: dict[str, int] = {}
        for why in cov.untuned.values():
            reasons[why] = reasons.get(why, 0) + 1
        left = "; ".join(f"{n}× {why}" for why, n in reasons.items()) or "-"
        print(f"{name:40s} {100 * cov.tuned_fraction:6.1f}%  {left}")


if __name__ == "__main__":
    main()
