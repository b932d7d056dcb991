"""The Hugging Face Trainer integration (DeltaSTNTrainer) and gradient accumulation.

A tiny GPT-2 (random init, from a config) learns counting sequences: token t+1 = token t + 1.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
import warnings
from pathlib import Path

import pytest

pytest.importorskip("transformers", minversion="5.0")  # DeltaSTNTrainer needs transformers 5
pytest.importorskip("accelerate")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import hypertune as ht  # noqa: E402
from hypertune.integrations.accumulation import AccumulatingOptimizer, GradientAccumulation  # noqa: E402
from hypertune.integrations.transformers import (  # noqa: E402
    VALUES_NAME,
    DeltaSTNTrainer,
    TuneBatches,
    load_tuned_dropout,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets"
VOCAB, LENGTH = 24, 12
DROPOUTS = ["transformer.drop", "*.attn.attn_dropout", "*.attn.resid_dropout", "*.mlp.dropout"]
DECAYED = ["transformer.wte", "*.c_attn", "*.c_proj", "*.c_fc"]


@pytest.fixture(autouse=True)
def _quiet():
    hf_logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class Counting(torch.utils.data.Dataset):
    """Sequences start, start+1, ... (mod VOCAB): learnable in a few steps."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, VOCAB, (n, 1), generator=g)
        self.rows = (starts + torch.arange(LENGTH)) % VOCAB

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


class Noted(Counting):
    """With a column the model does not take (the Trainer removes it from the batches)."""

    def __getitem__(self, i: int) -> dict:
        return {**super().__getitem__(i), "note": f"row {i}"}


def gpt2(seed: int = 0, dropout: float = 0.1) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=16, n_layer=1, n_head=2, resid_pdrop=dropout,
                        embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=0, eos_token_id=0, use_cache=False)
    return GPT2LMHeadModel(config)


def wrap(model: nn.Module, dropouts: list[str] = DROPOUTS) -> ht.HyperModel:
    return ht.HyperModel.wrap(
        model,
        {"dropout": ht.DropoutRate(init=0.1, targets=dropouts, per_site=True), "wd": ht.WeightDecay(init=1e-3, targets=DECAYED)},
        exclude=["transformer.wpe", "lm_head"],
    )


def args(out: Path, **kw) -> TrainingArguments:
    settings = dict(output_dir=str(out), per_device_train_batch_size=8, max_steps=6, learning_rate=1e-2,
                    weight_decay=0.0, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
                    logging_steps=1, seed=0, dataloader_num_workers=0)
    settings.update(kw)
    return TrainingArguments(**settings)


def trainer(out: Path, model: ht.HyperModel | None = None, *, tune_every: int = 2, **kw) -> DeltaSTNTrainer:
    trainer_kw = {k: kw.pop(k) for k in list(kw) if k in ("optimizers", "eval_dataset", "compute_metrics", "stn_options")}
    return DeltaSTNTrainer(
        model=model if model is not None else wrap(gpt2()), args=args(out, **kw), train_dataset=Counting(64, 0),
        tune_dataset=Counting(32, 1), tune_every=tune_every, stn_options=trainer_kw.pop("stn_options", {"hyper_lr": 0.05}),
        **trainer_kw,
    )


# ---- training, logging, evaluation ---------------------------------------------------------------
def test_train_tunes_logs_lambda_and_evaluates(tmp_path):
    t = trainer(tmp_path, eval_dataset=Counting(16, 2), eval_strategy="steps", eval_steps=3,
                lr_scheduler_type="linear", warmup_steps=2)
    before = t.hyper_model.hparam_values()
    t.train()
    stn = t.stn
    assert t.state.global_step == 6 == stn.train_steps
    assert stn.val_steps == 3  # one λ step every 2 optimizer steps
    assert stn.hparams() != pytest.approx(before)
    # The weights' optimizer followed the Trainer's schedule (linear decay to 0 after warm-up).
    assert stn.optimizer.param_groups[0]["lr"] == pytest.approx(t.lr_scheduler.get_last_lr()[0])
    assert t.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0)
    train_logs = [r for r in t.state.log_history if "loss" in r]
    assert [r["step"] for r in train_logs] == [1, 2, 3, 4, 5, 6]
    names = list(before)
    for row in train_logs:
        assert {f"hparam/{n}" for n in names} | {f"sigma/{n}" for n in names} <= set(row)
    assert train_logs[-1]["hparam/wd"] == pytest.approx(stn.hparams()["wd"])
    assert train_logs[-1]["sigma/wd"] == pytest.approx(stn.scales()["wd"])
    assert train_logs[-1]["tune/loss"] == pytest.approx(stn.history.of_kind("val")[-1].loss)
    # The logged training loss is the w₀ step's loss of that optimizer step.
    assert [r["loss"] for r in train_logs] == pytest.approx([r.loss for r in stn.history.of_kind("train")], rel=1e-6)
    evals = [r for r in t.state.log_history if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6] and all(math.isfinite(r["eval_loss"]) for r in evals)
    assert evals[-1]["eval_loss"] < math.log(VOCAB)  # it learned something
    rows = list(csv.DictReader(open(tmp_path / "hypertune_schedule.csv")))
    assert len(rows) == len(stn.history) and {r["kind"] for r in rows} == {"train", "val"}
    assert (tmp_path / "hypertune_schedule.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grad_clipping_and_warmup_of_lambda(tmp_path):
    t = trainer(tmp_path, max_grad_norm=1e-3, tune_every=1)
    t.tune_warmup_steps = 4
    t.train()
    assert t.stn.val_steps == 2  # steps 5 and 6
    norms = [r["grad_norm"] for r in t.state.log_history if "grad_norm" in r]
    assert len(norms) == 6 and all(n > 1e-3 for n in norms)  # the norm before clipping, as the Trainer logs it


def _resume_matches(tmp_path, dropouts: list[str]) -> None:
    full = trainer(tmp_path / "full", wrap(gpt2(), dropouts), max_steps=8, save_strategy="steps", save_steps=4)
    full.train()
    ckpt = tmp_path / "full" / "checkpoint-4"
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert saved["stn"]["counters"]["train_steps"] == 4 and saved["tune_batches_drawn"] == 2

    resumed = trainer(tmp_path / "resumed", wrap(gpt2(), dropouts), max_steps=8, save_strategy="steps", save_steps=4)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.stn.history.records == full.stn.history.records
    a, b = full.hyper_model.state_dict(), resumed.hyper_model.state_dict()
    assert a.keys() == b.keys()
    for key in a:  # w₀, Θ, λ and σ
        assert torch.equal(a[key], b[key]), key
    assert (resumed.stn.train_steps, resumed.stn.val_steps) == (8, 4)
    for name in ("optimizer", "response_optimizer", "hyper_optimizer"):
        sa, sb = getattr(full.stn, name).state_dict()["state"], getattr(resumed.stn, name).state_dict()["state"]
        for i in sa:
            for k, v in sa[i].items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb[i][k])), (name, i, k)


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path):
    _resume_matches(tmp_path, [d for d in DROPOUTS if "attn_dropout" not in d])


def test_resume_matches_with_attention_dropout_tuned(tmp_path):
    _resume_matches(tmp_path, DROPOUTS)


def test_load_best_model_at_end_restores_the_best_checkpoints_hypermodel(tmp_path):
    t = trainer(tmp_path, max_steps=4, eval_dataset=Counting(16, 2), eval_strategy="steps", eval_steps=2,
                save_strategy="steps", save_steps=2, load_best_model_at_end=True, metric_for_best_model="eval_loss")
    t.train()
    best = Path(t.state.best_model_checkpoint)
    saved = torch.load(best / "pytorch_model.bin", weights_only=True)
    now = t.hyper_model.state_dict()
    assert saved.keys() == now.keys() and all(torch.equal(saved[k], now[k]) for k in saved)


def test_resume_from_a_checkpoint_of_another_trainer_is_refused(tmp_path):
    plain = Trainer(model=gpt2(), args=args(tmp_path / "plain", max_steps=1, save_strategy="steps", save_steps=1),
                    train_dataset=Counting(16, 0))
    plain.train()
    t = trainer(tmp_path / "t", max_steps=2)
    with pytest.raises(ht.StateDictError, match="not written by DeltaSTNTrainer"):
        t.train(resume_from_checkpoint=str(tmp_path / "plain" / "checkpoint-1"))


def test_save_model_writes_the_plain_model_with_tuned_values(tmp_path):
    t = trainer(tmp_path, max_steps=4, tune_every=1)
    t.train()
    hm = t.hyper_model
    t.save_model(str(tmp_path / "final"))
    loaded = GPT2LMHeadModel.from_pretrained(str(tmp_path / "final"))
    rates = load_tuned_dropout(loaded, tmp_path / "final")
    values = hm.hparam_values()
    # Every tuned site got its own final rate (per-site names carry the module path).
    assert rates == pytest.approx({name.split(":", 1)[1]: v for name, v in values.items() if name.startswith("dropout:")})
    assert loaded.transformer.h[0].mlp.dropout.p == pytest.approx(values["dropout:transformer.h.0.mlp.dropout"])
    saved = json.loads((tmp_path / "final" / VALUES_NAME).read_text())
    assert saved["hparams"] == pytest.approx(values)
    ids = Counting(4, 5).rows
    hm.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, hm(input_ids=ids).logits)
    # The live model is still a HyperModel and keeps training.
    assert hm.hyper_layers()
    t.args.max_steps = 6
    t.train(resume_from_checkpoint=None)
    assert t.stn.train_steps > 4


def test_gradient_accumulation_counts_micro_batches(tmp_path):
    t = DeltaSTNTrainer(model=wrap(gpt2()), args=args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                                      max_steps=3), train_dataset=Noted(64, 0), tune_dataset=Noted(32, 1),
                        tune_every=1)
    t.train()
    assert t.state.global_step == 3
    assert t.stn.train_steps == 6 and t.stn.val_steps == 3
    assert isinstance(t.stn.optimizer, AccumulatingOptimizer)


def test_compute_loss_func_and_label_smoothing_give_the_loss(tmp_path):
    calls = []

    def shifted_loss(outputs, labels, num_items_in_batch=None):
        calls.append(labels.shape)
        logits = outputs.logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, VOCAB), labels[:, 1:].reshape(-1))

    t = DeltaSTNTrainer(model=wrap(gpt2()), args=args(tmp_path, max_steps=2), train_dataset=Counting(32, 0),
                        tune_dataset=Counting(16, 1), tune_every=1, compute_loss_func=shifted_loss,
                        stn_options={"response_every": 1})
    t.train()
    # Two optimizer steps: a w₀ and a Θ pass each, and a λ step each; the model got no labels.
    assert len(calls) == 6 and all(shape == (8, LENGTH) for shape in calls)
    # Label smoothing: the Trainer's LabelSmoother (shifting the labels of a causal LM) forms the
    # loss from the logits; the model is called without labels.
    smoothed = trainer(tmp_path / "smooth", max_steps=2, tune_every=1, label_smoothing_factor=0.5)
    got_labels = []
    smoothed.hyper_model.module.register_forward_pre_hook(
        lambda module, a, kw: got_labels.append("labels" in kw), with_kwargs=True
    )
    smoothed.train()
    assert len(got_labels) >= 6 and not any(got_labels)  # (a first perturbed pass may run twice)
    assert all(math.isfinite(r.loss) for r in smoothed.stn.history)


def _bf16_run(tmp_path, exclude: list[str]) -> None:
    hm = ht.HyperModel.wrap(gpt2(), {"dropout": ht.DropoutRate(init=0.1, targets=DROPOUTS, per_site=True),
                                     "wd": ht.WeightDecay(init=1e-3, targets=DECAYED)},
                            exclude=["transformer.wpe", "lm_head", *exclude])
    t = trainer(tmp_path, hm, bf16=True, max_steps=3, tune_every=1)
    before = t.hyper_model.hparam_values()
    t.train()
    assert all(math.isfinite(r.loss) for r in t.stn.history)
    assert t.stn.hparams() != pytest.approx(before)


def test_bf16_autocast_on_cpu(tmp_path):
    _bf16_run(tmp_path, exclude=["*.c_attn", "*.c_proj", "*.c_fc"])


def test_bf16_autocast_with_conv1d_hyper_layers(tmp_path):
    _bf16_run(tmp_path, exclude=[])


def test_fp16_steps_go_through_the_accelerators_grad_scaler(tmp_path):
    # accelerate makes a GradScaler for fp16 on GPUs only; give this CPU run one to take that path.
    t = trainer(tmp_path, fp16=True, max_steps=3, tune_every=1)
    t.accelerator.scaler = scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20, growth_interval=1)
    before = t.hyper_model.hparam_values()
    t.train()
    assert t.stn.grad_scaler is scaler
    # The steps' updates went through the scaler (growth_interval=1: it doubles after each good
    # update), and none overflowed.
    assert scaler.get_scale() >= 2.0 ** (20 + 6) and t.stn.skipped_steps == 0
    assert t.stn.hparams() != pytest.approx(before)


def test_tune_batches_are_reproducible_from_their_count():
    data = [{"i": torch.tensor(i)} for i in range(10)]
    a = TuneBatches(data, 4, torch.utils.data.default_collate, seed=3)
    first = [next(a)["i"] for _ in range(5)]  # 2 per pass (the last 2 rows are dropped): passes 0, 1, 2
    b = TuneBatches(data, 4, torch.utils.data.default_collate, seed=3)
    b.drawn = 3
    assert torch.equal(next(b)["i"], first[3])
    assert len(set(torch.cat(first[:2]).tolist())) == 8  # a pass draws without replacement
    assert not torch.equal(torch.cat(first[:2]), torch.cat(first[2:4]))  # and each pass reshuffles


# ---- accumulation math ------------------------------------------------------------------------------
class RowNoise:
    """ε handed out row by row from one fixed sequence: a batch of 8 draws what two batches of 4 do."""

    def __init__(self, hp: ht.HyperParameters) -> None:
        self.hp = hp
        self.z = torch.randn(256, len(hp), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        self.used = 0

    def __call__(self, rows: int) -> torch.Tensor:
        out = self.z[self.used : self.used + rows] * self.hp.scale
        self.used += rows
        return out


def _mlp_stn() -> tuple[ht.HyperModel, ht.DeltaSTNOptimizer]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    hm = ht.HyperModel.wrap(net, {"wd": ht.WeightDecay(init=1e-2)})
    hm.hparams.sample_noise = RowNoise(hm.hparams)
    # Θ on every micro-batch: with response_every=k the Θ cadence counts micro-batches (train_step calls)
    return hm, ht.DeltaSTNOptimizer(hm, torch.optim.SGD(hm.parameters(), lr=0.1, momentum=0.9), response_every=1)


def test_accumulated_micro_batches_update_like_their_union():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=g)
    hm_a, stn_a = _mlp_stn()
    with GradientAccumulation(stn_a) as acc:
        for half in (slice(0, 4), slice(4, 8)):
            stn_a.train_step(x[half], y[half], F.cross_entropy)
        assert acc.pending == 2
        assert acc.flush() and acc.pending == 0
    hm_b, stn_b = _mlp_stn()
    with GradientAccumulation(stn_b) as acc:
        stn_b.train_step(x, y, F.cross_entropy)
        acc.flush()
    for (name, a), b in zip(hm_a.named_parameters(), hm_b.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    # w₀'s update does not depend on when Θ steps: it equals a plain train_step on the union.
    hm_c, stn_c = _mlp_stn()
    stn_c.train_step(x, y, F.cross_entropy)
    for a, c in zip(hm_a.base_parameters(), hm_c.base_parameters()):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
    assert stn_a.optimizer is not None and not isinstance(stn_a.optimizer, AccumulatingOptimizer)  # closed
    theta = stn_a.response_optimizer.state_dict()["state"]
    assert all(int(s["step"]) == 1 for s in theta.values())  # Θ stepped once for the two micro-batches


def test_a_refused_micro_batch_adds_nothing():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=g)
    hm, stn = _mlp_stn()
    stn.nonfinite = "skip"
    bad = x[:4].clone()
    bad[0, 0] = float("nan")
    acc = GradientAccumulation(stn)
    stn.train_step(bad, y[:4], F.cross_entropy)
    assert acc.pending == 0
    stn.train_step(x[4:], y[4:], F.cross_entropy)
    acc.flush()
    acc.close()
    hm_ref, stn_ref = _mlp_stn()
    hm_ref.hparams.sample_noise.used = hm.hparams.sample_noise.used - 4  # the same ε rows as the good batch
    stn_ref.train_step(x[4:], y[4:], F.cross_entropy)
    for a, b in zip(hm.base_parameters(), hm_ref.base_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ---- refusals -----------------------------------------------------------------------------------------
def _refusal(tmp_path, **change):
    model = change.pop("model", None)
    training = {k: change.pop(k) for k in list(change) if k in ("torch_compile", "weight_decay", "fsdp", "deepspeed", "gradient_checkpointing")}
    a = args(tmp_path, **{k: v for k, v in training.items() if k not in ("fsdp", "deepspeed")})
    for k in ("fsdp", "deepspeed"):  # TrainingArguments validates these itself; set them as a loaded config would
        if k in training:
            object.__setattr__(a, k, training[k])
    kw = dict(model=model if model is not None else wrap(gpt2()), args=a, train_dataset=Counting(8, 0),
              tune_dataset=Counting(8, 1))
    kw.update(change)
    return kw


def _foreign_optimizer():
    return (torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), None)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(model="plain"), "model must be a HyperModel"),
        (dict(tune_dataset=None), "tune_dataset is missing"),
        (dict(torch_compile=True), "torch_compile"),
        (dict(gradient_checkpointing=True), "gradient_checkpointing=True"),
        (dict(weight_decay=0.01), "decay would be applied twice"),
        (dict(fsdp=["full_shard"]), "fsdp"),
        (dict(deepspeed={"zero_optimization": {"stage": 2}}), "deepspeed"),
        (dict(optimizers=((torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1),) * 2, None)), "2 optimizers"),
        (dict(optimizers="foreign"), "does not own"),
        (dict(stn_options={"warmup_steps": 5}), "tune_warmup_steps"),
        (dict(tune_every=0), "tune_every=0"),
        (dict(model_init=lambda: None), "model_init"),
    ],
)
def test_unsupported_settings_are_refused_at_construction(tmp_path, change, match):
    change = dict(change)
    if change.get("model") == "plain":
        change["model"] = gpt2()
        kw = _refusal(tmp_path, **change)
        kw["model"] = change["model"]
    else:
        if change.get("optimizers") == "foreign":
            change["optimizers"] = _foreign_optimizer()
        kw = _refusal(tmp_path, **change)
    model = kw["model"]
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ht.HyperTuneError, match=match):
        DeltaSTNTrainer(**kw)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snapshot.items())


def test_a_second_optimizer_from_the_stn_is_refused(tmp_path):
    hm = wrap(gpt2())
    stn = ht.DeltaSTNOptimizer(hm, torch.optim.SGD(hm.parameters(), lr=0.1))
    with pytest.raises(ht.HyperTuneError, match="pass the plain optimizer"):
        DeltaSTNTrainer(**_refusal(tmp_path, model=hm, optimizers=(stn, None)))


def test_every_problem_is_listed_in_one_error(tmp_path):
    with pytest.raises(ht.HyperTuneError) as err:
        DeltaSTNTrainer(**_refusal(tmp_path, tune_dataset=None, torch_compile=True, weight_decay=0.1))
    text = str(err.value)
    assert "tune_dataset" in text and "torch_compile" in text and "weight_decay" in text


def test_a_given_optimizer_and_scheduler_are_used(tmp_path):
    hm = wrap(gpt2())
    opt = torch.optim.SGD(hm.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    t = trainer(tmp_path, hm, optimizers=(opt, sched), max_steps=4)
    t.train()
    assert t.stn.optimizer is opt
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**2)


# ---- the example ---------------------------------------------------------------------------------------
@pytest.mark.skipif(not (DATA / "ptb").exists(), reason=f"{DATA / 'ptb'} is missing")
def test_ptb_gpt2_smoke_tuned_and_untuned(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    import importlib.util

    spec = importlib.util.spec_from_file_location("example_ptb_gpt2", ROOT / "examples" / "ptb_gpt2.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    common = ["--smoke", "--data-root", str(DATA), "--device", "cpu", "--no-progress"]
    tuned = example.main([*common, "--out", str(tmp_path / "tuned")])
    untuned = example.main([*common, "--untuned", "--out", str(tmp_path / "untuned")])
    for m in (tuned, untuned):
        assert math.isfinite(m["val"]["loss"]) and math.isfinite(m["test"]["loss"])
        assert m["val"]["ppl"] == pytest.approx(math.exp(m["val"]["loss"]))
    assert tuned["tuned"] and not untuned["tuned"]
    sites = 3 + example.attention_dropout_tunable()  # per site, in the 1-layer smoke model
    assert len(tuned["final_hparams"]) == sites + 1  # and the weight decay
    assert untuned["final_hparams"] == {"dropout": 0.05, "weight_decay": 1e-5}  # the starting values
    rows = list(csv.DictReader(open(tmp_path / "tuned" / "hypertune_schedule.csv")))
    assert {r["kind"] for r in rows} == {"train", "val"}
    assert (tmp_path / "tuned" / "hypertune_schedule.png").is_file()
    assert not (tmp_path / "untuned" / "hypertune_schedule.csv").exists()


@pytest.mark.parametrize("module, missing, extra", [
    ("hypertune.integrations.transformers", "transformers", "hypertune-stn[transformers]"),
    ("hypertune.integrations.accelerate", "accelerate", "hypertune-stn[accelerate]"),
])
def test_a_missing_extra_is_named(monkeypatch, module, missing, extra):
    import importlib

    monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.setitem(sys.modules, missing, None)  # what an uninstalled package looks like to import
    with pytest.raises(ImportError, match=extra.replace("[", r"\[").replace("]", r"\]")):
        importlib.import_module(module)


@pytest.mark.skipif(not (DATA / "ptb").exists(), reason=f"{DATA / 'ptb'} is missing")
def test_ptb_gpt2_passes_its_tuning_flags_and_refuses_those_that_do_not_apply(tmp_path, capsys):
    """--tune-scales, --response-every and --response-optimizer were parsed and silently ignored."""
    spec = importlib.util.spec_from_file_location("example_ptb_gpt2", ROOT / "examples" / "ptb_gpt2.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    for flag in (["--val-steps", "2"], ["--val-fraction", "0.3"]):
        with pytest.raises(SystemExit):
            example.parse(flag)
        assert "does not apply" in capsys.readouterr().err
    common = ["--smoke", "--data-root", str(DATA), "--device", "cpu", "--no-progress", "--out", str(tmp_path)]
    example.main([*common, "--tune-scales", "--response-every", "1"])
    rows = list(csv.DictReader(open(tmp_path / "hypertune_schedule.csv")))
    sigma = [c for c in rows[0] if c.startswith("sigma/")][0]
    assert len({r[sigma] for r in rows}) > 1  # σ was tuned
    train = [r for r in rows if r["kind"] == "train"]
    assert all(r["response_loss"] not in ("", "None") for r in train)  # a Θ step on every train step
