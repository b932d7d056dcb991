"""Batches that models reshape: which example each row belongs to, found without the user.

Position ids of batch 1, batch-major windows and patches (B·k rows), and sequence-first
tensors are perturbed per example; the property checked is exact: in eval mode, example i of a
batch evaluated at per-example rows equals example i alone evaluated at its own row. Layouts
the shape cannot place fall back to per-batch perturbation with one notice naming the site.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypertune as ht
from hypertune.context import Perturbation
from hypertune.rows import BatchPerturbationNeeded, LayoutGuide, RowLayout, layout


class PositionIds(nn.Module):
    """GPT-2's pattern: token embeddings plus position embeddings of position ids (1, T)."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(20, 8)
        self.wpe = nn.Embedding(16, 8)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        return self.head(self.drop(self.wte(ids) + self.wpe(pos))).mean(1)


class Windows(nn.Module):
    """Swin's pattern: a feature map split into windows, (B, H, W, C) -> (B·nW, ws·ws, C)."""

    def __init__(self, ws: int = 2) -> None:
        super().__init__()
        self.ws = ws
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.qkv = nn.Linear(6, 18)
        self.attn_drop = nn.Dropout(0.1)
        self.proj = nn.Linear(6, 6)
        self.pw = nn.Conv2d(6, 6, 1)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)  # (B, C, H, W)
        b, c, hh, ww = h.shape
        ws = self.ws
        win = h.permute(0, 2, 3, 1).reshape(b, hh // ws, ws, ww // ws, ws, c)
        win = win.permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)  # (B·nW, ws², C)
        q, k, v = self.qkv(win).chunk(3, -1)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), dropout_p=self.attn_drop.p if self.training else 0.0
        ).squeeze(1)
        out = self.proj(out).reshape(b, hh // ws, ww // ws, ws, ws, c).permute(0, 5, 1, 3, 2, 4)
        out = self.pw(out.reshape(-1, c, ws, ws))  # window-batch convolution: (B·nW, C, ws, ws)
        return self.head(out.reshape(b, -1, c, ws * ws).mean((1, 3)))


class SequenceFirstInside(nn.Module):
    """Batch-first input, sequence-first inside: (B, T, F) -> (T, B, F) before a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.tanh(self.fc(x.transpose(0, 1))))  # (T, B, 6)
        return self.head(h.mean(0))


class LearnedQueries(nn.Module):
    """A tensor of batch 1 through a Linear, broadcast against the batch afterwards."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("queries", torch.randn(1, 3, 4))
        self.q_proj = nn.Linear(4, 4)
        self.k_proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q_proj(self.queries)  # (1, 3, 4)
        k = self.k_proj(x)  # (B, T, 4)
        return self.head(F.scaled_dot_product_attention(q, k, k).mean(1))


def _inputs(name: str, batch: int) -> torch.Tensor:
    if name == "position_ids":
        return torch.randint(0, 20, (batch, 5))
    if name == "windows":
        return torch.randn(batch, 3, 4, 4)
    if name == "sequence_first_inside":
        return torch.randn(batch, 6, 4)  # (6, B, 4) inside: 6 is a multiple of B, as B·k windows would be
    return torch.randn(batch, 7, 4)


MODELS = {
    "position_ids": PositionIds,
    "windows": Windows,
    "sequence_first_inside": SequenceFirstInside,
    "learned_queries": LearnedQueries,
}


def _wrap(name: str, dtype: torch.dtype = torch.float32) -> ht.HyperModel:
    net = MODELS[name]().to(dtype)
    specs: dict = {"wd": ht.WeightDecay()}
    if any(isinstance(m, nn.Dropout) for m in net.modules()):
        specs["dropout"] = ht.DropoutRate()
    return ht.HyperModel.wrap(net, specs)


@pytest.mark.parametrize("batch", [2, 3])
@pytest.mark.parametrize("name", list(MODELS))
def test_each_example_is_evaluated_at_its_own_row(name, batch):
    torch.manual_seed(0)
    model = _wrap(name, torch.float64).eval()
    with torch.no_grad():
        for p in model.response_parameters():
            p.normal_()
    x = _inputs(name, batch)
    x = x.double() if x.is_floating_point() else x
    lam = model.hparams.unconstrained.detach().unsqueeze(0)
    delta = torch.randn(batch, len(model.hparams), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with torch.no_grad(), model.evaluated_at(Perturbation(model.hparams, lam + delta, delta)):
            out = model(x)
        for i in range(batch):
            row = Perturbation(model.hparams, lam + delta[i : i + 1], delta[i : i + 1])
            with torch.no_grad(), model.evaluated_at(row):
                torch.testing.assert_close(out[i : i + 1], model(x[i : i + 1]), rtol=1e-10, atol=1e-12)
    assert model.perturbed_per_batch is None
    # and the rows matter: the response differs between examples
    with torch.no_grad(), model.evaluated_at(Perturbation(model.hparams, lam.expand(batch, -1), torch.zeros_like(delta))):
        base = model(x)
    assert not torch.allclose(out, base)


@pytest.mark.parametrize("mode", ["delta", "centered", "stn"])
@pytest.mark.parametrize("name", list(MODELS))
def test_layouts_train_per_example_in_every_mode(name, mode):
    torch.manual_seed(1)
    model = _wrap(name)
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05), mode=mode, warmup_steps=0)
    x = _inputs(name, 3)
    y = torch.tensor([0, 1, 1])
    before = model.hparams.unconstrained.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for _ in range(2):
            assert not opt.train_step(x, y, F.cross_entropy).skipped
            assert opt.val_step(x, y, F.cross_entropy).updated
    assert model.perturbed_per_batch is None
    assert not torch.equal(model.hparams.unconstrained.detach(), before)


class SequenceFirstModel(nn.Module):
    """nn.TransformerEncoderLayer with its default batch_first=False on a (T, B, E) input."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=batch_first)
        self.head = nn.Linear(8, 2)
        self.batch_first = batch_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer(self.embed(x))
        return self.head(h.mean(1 if self.batch_first else 0))


@pytest.mark.parametrize("mode", ["delta", "centered", "stn"])
def test_sequence_first_transformer_falls_back_to_per_batch_with_one_notice(mode):
    torch.manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own nested-tensor notice
        net = SequenceFirstModel(batch_first=False)
    model = ht.HyperModel.wrap(net, {"dropout": ht.DropoutRate(), "wd": ht.WeightDecay()})
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05), mode=mode, warmup_steps=0)
    x, y = torch.randn(6, 3, 4), torch.tensor([0, 1, 1])  # T = 6 = 2·B: shapes alone would mislead
    with pytest.warns(UserWarning, match=r"'layer.self_attn' \(MultiheadAttention, batch_first=False\)") as record:
        for _ in range(2):
            assert math.isfinite(opt.train_step(x, y, F.cross_entropy).loss)
            opt.val_step(x, y, F.cross_entropy)
    assert sum("perturbation per example" in str(w.message) for w in record) == 1
    assert model.perturbed_per_batch is not None


def test_batch_first_transformer_is_perturbed_per_example():
    torch.manual_seed(3)
    model = ht.HyperModel.wrap(SequenceFirstModel(batch_first=True), {"dropout": ht.DropoutRate()})
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05), warmup_steps=0)
    x, y = torch.randn(3, 6, 4), torch.tensor([0, 1, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        opt.train_step(x, y, F.cross_entropy)
        opt.val_step(x, y, F.cross_entropy)
    assert model.perturbed_per_batch is None


class EncoderOnly(nn.Module):
    """nn.TransformerEncoder, batch first, whose output is used as it is (nothing tuned after it)."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(x, src_key_padding_mask=pad).mean(1)[:, :2]


def test_transformer_fast_path_does_not_bypass_hyper_layers():
    """torch's fused encoder-layer kernel (eval, no weight needing a gradient) reads linear1 and
    linear2's weights without calling them: λ steps got no gradient through the encoder (here,
    with nothing tuned after it, no gradient at all) and STN's Θ was ignored at inference."""
    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's nested-tensor notice about odd head counts etc.
        net = EncoderOnly()
    model = ht.HyperModel.wrap(net, {"wd": ht.WeightDecay()})
    assert len(model.hyper_layers()) == 4
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05), warmup_steps=0)
    x, y = torch.randn(3, 5, 8), torch.tensor([0, 1, 1])
    before = model.hparams.unconstrained.detach().clone()
    opt.train_step(x, y, F.cross_entropy)
    assert opt.val_step(x, y, F.cross_entropy).updated
    assert not torch.equal(model.hparams.unconstrained.detach(), before)
    # plain STN: inference under no_grad (the fused path's condition) sees Θ, as with grad on
    model.centered = False
    with torch.no_grad():
        for layer in model.hyper_layers().values():
            layer.hyper_projection.weight.normal_(0.0, 0.5)
    model.eval()
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    for mask in (None, pad):  # a padding mask would also turn the batch into a nested tensor
        with torch.no_grad():
            fused_conditions = model(x, mask)
        torch.testing.assert_close(fused_conditions, model(x, mask).detach())
    # unwrap gives torch its fast paths back
    plain = model.unwrap()
    assert plain.encoder.use_nested_tensor
    assert not any(m._forward_pre_hooks for m in plain.modules())


class Unplaceable(nn.Module):
    """T5's relative-position bias: an embedding of a (q, k) table with no batch axis, whose
    output is then added to every example's attention scores."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.norm = nn.BatchNorm1d(4)
        self.bias = nn.Embedding(9, 1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.fc(x).transpose(1, 2)).transpose(1, 2)  # (B, T, 4)
        t = h.shape[1]
        rel = torch.arange(t)[None, :] - torch.arange(t)[:, None] + 4
        scores = h @ h.transpose(1, 2) + self.bias(rel.clamp(0, 8)).squeeze(-1)
        return self.head(torch.softmax(scores, -1) @ h).mean(1)


@pytest.mark.parametrize("mode", ["delta", "centered", "stn"])
def test_a_site_without_a_batch_axis_falls_back_and_keeps_running_stats_single(mode):
    torch.manual_seed(4)
    model = ht.HyperModel.wrap(Unplaceable(), {"wd": ht.WeightDecay()})
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05), mode=mode, warmup_steps=0)
    # (q, k) = (4, 4) with a batch of 4: by shape alone the table's axis 0 would be the batch
    x, y = torch.randn(4, 4, 4), torch.tensor([0, 1, 1, 0])
    with pytest.warns(UserWarning, match="HyperEmbedding 'bias' cannot take one perturbation per example"):
        opt.train_step(x, y, F.cross_entropy)
    assert model.perturbed_per_batch == "HyperEmbedding 'bias'"
    # the interrupted pass did not count: one update from the pass that ran through (STN's
    # perturbed pass; the centered modes' w₀ pass, their Θ pass freezes running statistics)
    assert int(model.module.norm.num_batches_tracked) == 1
    opt.val_step(x, y, F.cross_entropy)
    assert math.isfinite(opt.train_step(x, y, F.cross_entropy).loss)


def test_guide_reads_the_batch_axis_from_a_one_example_pass():
    guide = LayoutGuide(probe={"s": [(1, 5, 8), (6, 3, 8), (5, 1, 8), (1, 7), (9, 9)]})
    guide.start_pass()
    assert guide.decide("s", (4, 5, 8), 4) == RowLayout()
    assert guide.decide("s", (24, 3, 8), 4) == RowLayout(repeat=6)
    assert guide.decide("s", (5, 4, 8), 4) == RowLayout(dim=1)
    assert guide.decide("s", (1, 7), 4) == RowLayout(grows=True)
    with pytest.raises(BatchPerturbationNeeded, match="does not change with the batch size"):
        guide.decide("s", (9, 9), 4)
    assert guide.decide("other", (8, 8), 4) is None  # never seen: the shape rules decide
    # later passes with other sizes keep the axis found, where the shape rules would be unsure
    guide.start_pass()
    assert guide.decide("s", (3, 5, 8), 3) == RowLayout()
    assert guide.decide("s", (12, 2, 8), 3) == RowLayout(repeat=4)
    assert guide.decide("s", (6, 3, 8), 3) == RowLayout(dim=1)


@pytest.mark.parametrize(
    "shape, rows, kw, expected",
    [
        ((4, 5, 8), 4, {}, RowLayout()),
        ((1, 5, 8), 4, {}, RowLayout(grows=True)),
        ((12, 5, 8), 4, {}, RowLayout(repeat=3)),
        ((5, 4, 8), 4, {}, RowLayout(dim=1)),
        ((5, 4), 4, {"feature_dims": 0}, RowLayout(dim=1)),
        ((8, 4, 3, 3), 4, {"sequence_first": False}, RowLayout(repeat=2)),
        ((7, 8), 1, {}, RowLayout()),
    ],
)
def test_layout_rules(shape, rows, kw, expected):
    assert layout(shape, rows, "site", **kw) == expected


@pytest.mark.parametrize(
    "shape, rows, kw",
    [((8, 4, 8), 4, {}), ((5, 3, 8), 4, {}), ((8,), 4, {}), ((6, 4, 8, 8), 4, {"feature_dims": 1})],
)
def test_layouts_the_shape_cannot_place_are_refused(shape, rows, kw):
    with pytest.raises(BatchPerturbationNeeded, match="'site'|site"):
        layout(shape, rows, "site", **kw)


class RepeatsItsPositions(nn.Module):
    """XCiT's positional encoding: a projection of a (1, ...) table, then ``.repeat(B, ...)``,
    which relies on the projection's batch of 1."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.pos = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        table = torch.linspace(0, 1, t * 3).reshape(1, t, 3)
        pos = self.pos(table).repeat(b, 1, 1)  # (B, T, 4) only if pos(table) kept its batch of 1
        return self.head(self.proj(x) + pos).mean(1)


@pytest.mark.parametrize("mode", ["delta", "centered", "stn"])
def test_code_that_relies_on_a_batch_of_one_falls_back_to_per_batch(mode):
    torch.manual_seed(5)
    model = ht.HyperModel.wrap(RepeatsItsPositions(), {"wd": ht.WeightDecay()})
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05), mode=mode, warmup_steps=0)
    x, y = torch.randn(3, 5, 4), torch.tensor([0, 1, 1])
    with pytest.warns(UserWarning, match="HyperLinear 'pos' cannot take one perturbation per example"):
        assert not opt.train_step(x, y, F.cross_entropy).skipped
    assert opt.val_step(x, y, F.cross_entropy).updated
    assert model.perturbed_per_batch == "HyperLinear 'pos'"


# ---- sites that see a data-dependent subset of the batch's rows --------------------------------------
class RoutedExpert(nn.Module):
    """A mixture-of-experts layer with one nn.Linear per expert: each expert sees only the tokens
    routed to it, gathered from the whole batch. ``slot_major`` orders a top-2 expert's tokens by
    routing slot first (as NLLB-MoE's torch.where over (slot, token) does), so even when every
    example routes the same number of tokens, the rows are not batch-major."""

    def __init__(self, slot_major: bool) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.expert = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        self.slot_major = slot_major

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, 4)
        h = self.inp(x)
        flat = h.reshape(-1, h.shape[-1])
        if self.slot_major:  # every token goes to the expert twice (two slots), slot-major
            tokens = torch.arange(flat.shape[0])
            routed = torch.cat([tokens, tokens])
            update = torch.zeros_like(flat).index_add(0, routed, self.expert(flat[routed]))
            return self.head((flat + update).reshape(h.shape)).mean(1)
        chosen = x.reshape(-1, 4)[:, 0] > 0
        out = flat.clone()
        out[chosen] = flat[chosen] + self.expert(flat[chosen])
        return self.head(out.reshape(h.shape)).mean(1)


def _routed_input(slot_major: bool) -> torch.Tensor:
    x = torch.randn(2, 4, 4, dtype=torch.float64)
    if not slot_major:  # example 0 routes 3 tokens, example 1 routes 1: 4 = 2·2 rows, not 2·3
        x[0, :, 0] = torch.tensor([1.0, 1.0, 1.0, -1.0])
        x[1, :, 0] = torch.tensor([1.0, -1.0, -1.0, -1.0])
    return x


@pytest.mark.parametrize("slot_major", [False, True])
def test_a_routed_expert_falls_back_to_per_batch_instead_of_taking_another_examples_row(slot_major):
    """Before, both layouts were read as batch-major (the row count divides by B) and example 0's
    tokens got example 1's perturbation with no warning; the second even has rows that scale exactly."""
    torch.manual_seed(0)
    model = ht.HyperModel.wrap(RoutedExpert(slot_major).double(), {"wd": ht.WeightDecay()}).eval()
    with torch.no_grad():
        for p in model.response_parameters():
            p.normal_()
    x = _routed_input(slot_major)
    lam = model.hparams.unconstrained.detach().unsqueeze(0)
    delta = torch.tensor([[2.0], [-2.0]], dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"HyperLinear 'expert' cannot take one perturbation per example \(.*depend"):
        with torch.no_grad(), model.evaluated_at(Perturbation(model.hparams, lam + delta, delta)):
            out = model(x)
    assert model.perturbed_per_batch == "HyperLinear 'expert'"
    # per batch: every example at row 0's perturbation, exactly as each alone at row 0
    for i in range(2):
        with torch.no_grad(), model.evaluated_at(Perturbation(model.hparams, lam + delta[:1], delta[:1])):
            torch.testing.assert_close(out[i : i + 1], model(x[i : i + 1]), rtol=1e-10, atol=1e-12)


def test_a_guide_built_from_probes_names_the_sites_whose_rows_are_not_batch_major():
    from hypertune.rows import Probe, fingerprint

    a = torch.randn(3, 8, dtype=torch.float64)
    b = torch.randn(3, 8, dtype=torch.float64)
    one = Probe({"ok": [(3, 8)], "mixed": [(3, 8)], "count": [(3, 8)], "table": [(5, 5)]})
    one.prints = {("ok", 0): fingerprint(a), ("mixed", 0): fingerprint(a)}
    pair = Probe({"ok": [(6, 8)], "mixed": [(6, 8)], "count": [(4, 8)], "table": [(5, 5)]})
    pair.prints = {("ok", 0): fingerprint(torch.cat([a, b])), ("mixed", 0): fingerprint(torch.cat([a[:1], b[:1], a[1:], b[1:]]))}
    guide = LayoutGuide.from_probes(one, pair)
    assert guide.varies == {"mixed", "count"}
    guide.start_pass()
    assert guide.decide("ok", (12, 8), 4) == RowLayout(repeat=3)
    with pytest.raises(BatchPerturbationNeeded, match="depends on the data"):
        guide.decide("mixed", (12, 8), 4)


# ---- a batch given as a list of examples (torchvision detection) --------------------------------------
class ListOfImages(nn.Module):
    """Takes a list of (3, H, W) images, as torchvision's detection models do, and stacks them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(4, 2)

    def forward(self, images: list[torch.Tensor], labels: list[dict] | None = None) -> torch.Tensor:
        h = self.drop(self.conv(torch.stack(images))).mean((2, 3))
        out = self.head(h)
        if labels is not None:
            assert len(labels) == len(images)
        return out


def test_a_list_of_images_is_a_batch_of_that_many_examples_and_response_fraction_cuts_lists():
    torch.manual_seed(0)
    model = ht.HyperModel.wrap(ListOfImages(), {"dropout": ht.DropoutRate(), "wd": ht.WeightDecay()})
    images = [torch.randn(3, 5, 5) for _ in range(4)]  # 3 channels: the old reading took 3 examples
    labels = [{"boxes": torch.randn(3, 4), "label": torch.tensor(i % 2)} for i in range(4)]
    y = torch.tensor([0, 1, 1, 0])
    assert model.batch_rows((images, labels)) == 4  # one label dict per image: the list is the batch
    assert model.batch_rows((images,), None, y) == 4  # a target of the list's length says so too
    # a list of tensors that share a batch (a multi-input model) keeps their leading axis
    assert model.batch_rows(([torch.randn(6, 2), torch.randn(6, 5)],), None, torch.zeros(6)) == 6
    assert model.batch_rows(([torch.randn(6, 2), torch.randn(6, 5)],)) == 6
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05), response_fraction=0.5, warmup_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for _ in range(2):
            assert not opt.train_step((images, labels), y, F.cross_entropy).skipped
            assert opt.val_step((images, labels), y, F.cross_entropy).updated
    assert model.perturbed_per_batch is None
    from hypertune.optim.steps import Batch

    half = Batch.of(model, (images, labels), y).first(2)
    assert len(half.args[0]) == 2 and half.args[0][0].shape == (3, 5, 5)  # images kept whole
    assert len(half.args[1]) == 2 and half.args[1][0]["boxes"].shape == (3, 4)  # one dict per example
    assert half.target.shape == (2,)


def test_layout_probes_and_guides_are_per_thread():
    """Two models' passes in two threads: one's probe must not record the other's sites, nor
    its guide decide them (they were module globals)."""
    import threading

    from hypertune import attention, rows

    inside, done = threading.Event(), threading.Event()
    seen: dict = {}

    def other_thread():
        inside.wait()
        rows.note("HyperLinear 'b.fc'", (6, 4))  # another model's site, mid-probe of the first
        seen["guide"] = rows._state().guide
        seen["intercepting"] = attention.intercepting()
        done.set()

    t = threading.Thread(target=other_thread)
    t.start()
    guide = LayoutGuide()
    with rows.recording() as probe, rows.guided_by(guide), attention.TunedRateCalls():
        inside.set()
        done.wait(5)
    t.join()
    assert "HyperLinear 'b.fc'" not in probe.shapes
    assert seen == {"guide": None, "intercepting": False}
