"""The hand-written tower backward (fpl_bench/text_tower/backward.py) equals autograd through the
same forward, in float64 to rounding: per-sample (vmapped) cotangents, a plain backward, a subset of
classes, clients stacked under vmap, vmap of grad, and open_clip's own modules; for exact GELU,
QuickGELU with LayerScale, and tanh GELU. A tower it does not cover falls back to autograd."""

import copy
import dataclasses
import json
from pathlib import Path

import open_clip
import pytest
import torch
from torch import nn
from torch.func import grad, vjp, vmap

from fpl_bench.compute import per_sample_backward
from fpl_bench.text_tower import TextTower

CONFIG = Path(__file__).resolve().parents[1] / "fpl_bench" / "model_configs" / "fpl-tiny-vit.json"
NAMES = ["red circle", "dark blue square", "green triangle", "yellow star", "a"]


def _tower(variant: str) -> TextTower:
    cfg = json.loads(CONFIG.read_text())
    quick = variant == "quickgelu_layerscale"
    if quick:
        cfg["text_cfg"]["ls_init_value"] = 0.7
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg, quick_gelu=quick).eval().double()
    if variant == "tanh_gelu":
        for block in model.transformer.resblocks:
            block.mlp.gelu = nn.GELU(approximate="tanh")
    if quick:  # a layer scale that is not 1 everywhere, so that its gradient factor shows
        for block in model.transformer.resblocks:
            for ls in (block.ls_1, block.ls_2):
                ls.gamma.data = torch.linspace(0.3, 1.5, ls.gamma.numel(), dtype=torch.float64)
    for p in model.parameters():
        p.requires_grad_(False)
    tower = TextTower.build(model, open_clip.get_tokenizer("fpl-tiny-vit"), NAMES, n_ctx=4)
    assert tower.hand_backward
    return tower


@pytest.fixture(autouse=True)
def _per_sample():
    """What privacy/per_sample.py does around a per-sample forward: the tower builds the
    hand-written backward only there (tested below)."""
    with per_sample_backward():
        yield


@pytest.fixture(scope="module", params=["exact_gelu", "quickgelu_layerscale", "tanh_gelu"])
def towers(request):
    hand = _tower(request.param)
    return hand, hand.with_options(hand_backward=False)


# "to rounding" in float64: the relative error in units of float64's epsilon (the vector unit,
# AVX2 / AVX-512 / default, changes the summation order; measured within 7 eps on each)
ROUNDING = 256 * torch.finfo(torch.float64).eps


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _data(*shape: int) -> torch.Tensor:
    return torch.randn(
        *shape, generator=torch.Generator().manual_seed(sum(shape)), dtype=torch.float64
    )


def test_values_are_the_plain_paths_bit_for_bit(towers):
    hand, auto = towers
    ctx = 0.1 * _data(2, 4, hand.width)
    with torch.no_grad():
        plain = auto.encode(ctx)
    assert torch.equal(hand.encode(ctx.clone().requires_grad_()), plain)
    assert plain.dtype == torch.float64


def test_per_sample_cotangents_equal_autograd(towers):
    hand, auto = towers
    ctx, cot = 0.1 * _data(2, 4, hand.width), _data(7, 2, len(NAMES), 64)

    def per_sample(tower):
        _, fn = vjp(tower.encode, ctx)
        return vmap(fn)(cot)[0]

    got, want = per_sample(hand), per_sample(auto)
    assert got.shape == (7, 2, 4, hand.width)
    assert _rel(got, want) < ROUNDING


def test_float64_tower_equals_open_clip_modules_to_float64_rounding(towers):
    """Against open_clip's own modules (F.gelu, nn.MultiheadAttention; autograd), features and
    per-sample gradients agree to float64 rounding: no op of the shared-prefix forward or of the
    hand-written backward rounds through float32 (exact GELU's did, 5e-8)."""
    hand, _ = towers
    modules = hand.with_options(share_prefix=False)
    ctx, cot = 0.1 * _data(2, 4, hand.width), _data(7, 2, len(NAMES), 64)

    def per_sample(tower):
        _, fn = vjp(tower.encode, ctx)
        return vmap(fn)(cot)[0]

    with torch.no_grad():
        assert _rel(hand.encode(ctx), modules.encode(ctx)) < ROUNDING
    assert _rel(per_sample(hand), per_sample(modules)) < ROUNDING


def _record_calls(monkeypatch) -> list[tuple[int, int]]:
    """(prompts, rows) of every call of the hand-written backward from now on."""
    from fpl_bench.text_tower import backward

    shapes: list[tuple[int, int]] = []
    original = backward._backward

    def counting(spec, saved, dz):
        shapes.append((dz.shape[0], dz.shape[2]))
        return original(spec, saved, dz)

    monkeypatch.setattr(backward, "_backward", counting)
    return shapes


def test_zero_cotangent_rows_are_skipped_and_get_zero(towers, monkeypatch):
    """FedPGP's pattern: the second prompt's features feed only a prior, so its per-sample
    cotangents are zero (the backward runs for the other prompts only) except in the row that
    carries the prior's cotangent (privacy/per_sample.py), which runs alone for that prompt.
    Same values as autograd."""

    hand, auto = towers
    ctx, cot = 0.1 * _data(3, 4, hand.width), _data(6, 3, len(NAMES), 64)
    shapes = _record_calls(monkeypatch)

    def per_sample(tower):
        _, fn = vjp(tower.encode, ctx)
        return vmap(fn)(cot)[0]

    cot[:, 1] = 0.0
    got, want = per_sample(hand), per_sample(auto)
    assert shapes == [(2, 6)]  # prompts 0 and 2 of 3, every row
    assert torch.equal(got[:, 1], torch.zeros_like(got[:, 1]))
    assert _rel(got, want) < ROUNDING
    cot[5, 1] = _data(len(NAMES), 64)[0]  # a prior's row
    shapes.clear()
    got, want = per_sample(hand), per_sample(auto)
    assert shapes == [(2, 6), (1, 1)]
    assert torch.equal(got[:5, 1], torch.zeros_like(got[:5, 1]))
    assert _rel(got, want) < ROUNDING
    cot[:, 1] = 1e-30  # not zero: every prompt and row goes through
    shapes.clear()
    per_sample(hand)
    assert shapes == [(3, 6)]


def test_plain_backward_and_class_subset_equal_autograd(towers):
    hand, auto = towers
    ctx, cot, subset = 0.1 * _data(4, hand.width), _data(2, 64), torch.tensor([3, 1])
    grads = []
    for tower in (hand, auto):
        leaf = ctx.clone().requires_grad_()
        (tower.encode(leaf, subset) * cot).sum().backward()
        grads.append(leaf.grad)
    assert _rel(grads[0], grads[1]) < ROUNDING


def test_clients_stacked_under_vmap_equal_autograd(towers):
    """client_step_gradients' pattern: vjp of vmap(encode) over clients, then vmap over samples
    of the vjp; and vmap of grad (the forward batched at the grad's own level)."""
    hand, auto = towers
    ctx, cot = 0.1 * _data(3, 4, hand.width), _data(5, 3, len(NAMES), 64)

    def clients(tower):
        _, fn = vjp(lambda p: vmap(tower.encode)(p), ctx)
        return vmap(fn)(cot)[0]

    assert _rel(clients(hand), clients(auto)) < ROUNDING

    def of_grad(tower):
        return vmap(grad(lambda c, v: (tower.encode(c) * v).sum()))(ctx, cot[0])

    assert _rel(of_grad(hand), of_grad(auto)) < ROUNDING


def test_unsupported_activation_keeps_autograd():
    tower = _tower("exact_gelu")
    transformer = copy.deepcopy(tower.transformer)
    transformer.resblocks[1].mlp.gelu = nn.SiLU()
    from fpl_bench.text_tower.backward import supported

    assert supported(tower.transformer) and not supported(transformer)
    other = dataclasses.replace(tower, transformer=transformer, hand_backward=False)
    assert not other.with_options(hand_backward=True).hand_backward


def test_hand_backward_only_for_per_sample_forwards():
    """A single backward (no DP) stays with autograd (faster for one cotangent); a forward under
    per_sample_backward, which privacy/per_sample.py's per-sample vjp sets, builds the node."""
    from fpl_bench import compute
    from fpl_bench.privacy.per_sample import step_gradients

    tower = _tower("exact_gelu")
    leaf = (0.1 * _data(4, tower.width)).requires_grad_()
    inside = type(tower.encode(leaf).grad_fn).__name__  # the autouse fixture's context
    token = compute._PER_SAMPLE_BACKWARD.set(False)  # as outside privacy/per_sample.py
    try:
        outside = type(tower.encode(leaf).grad_fn).__name__
        seen = []

        def encode(p):
            seen.append(compute.per_sample_backward_ahead())
            return tower.encode(p["ctx"])

        step_gradients(
            encode,
            lambda z, x: (z * x).sum(),
            {"ctx": leaf.detach()},
            (_data(3, 5, 64),),
            per_sample=True,
        )
    finally:
        compute._PER_SAMPLE_BACKWARD.reset(token)
    assert "SharedPrefixEncode" in inside and "SharedPrefixEncode" not in outside
    assert seen == [True]


def test_saving_forward_evaluates_the_gelu_once_per_block(monkeypatch):
    """The forward that saves for the hand-written backward takes GELU's value and slope from
    one erf (and one exp) per MLP, not one for the value and another for the slope; the
    features are those of the plain forward bit for bit (test above)."""
    tower = _tower("exact_gelu")
    calls = []
    erf = torch.erf

    def counting(x, *args, **kwargs):
        calls.append(tuple(x.shape))
        return erf(x, *args, **kwargs)

    monkeypatch.setattr(torch, "erf", counting)
    tower.encode((0.1 * _data(2, 4, tower.width)).requires_grad_())
    assert len(calls) == len(tower.transformer.resblocks)


def test_prompts_run_in_calls_of_bounded_rows_with_the_same_values(towers, monkeypatch):
    """On CPU the per-sample backward of many prompts (a batched step's clients) runs in
    calls of at most CPU_ROWS_PER_CALL rows, with the gradients of one call (to rounding: the
    BLAS may round a row differently in a matrix of another height)."""
    from fpl_bench.text_tower import backward

    hand, _ = towers
    ctx, cot = 0.1 * _data(5, 4, hand.width), _data(3, 5, len(NAMES), 64)
    shapes = _record_calls(monkeypatch)

    def per_sample():
        _, fn = vjp(hand.encode, ctx)
        return vmap(fn)(cot)[0]

    whole = per_sample()
    rows = hand.rows(len(NAMES))
    monkeypatch.setattr(backward, "CPU_ROWS_PER_CALL", 2 * 3 * rows)  # 2 prompts x 3 samples
    shapes.clear()
    assert _rel(per_sample(), whole) < ROUNDING
    assert shapes == [(2, 3), (2, 3), (1, 3)]


@pytest.mark.parametrize("depth", [1, 2, "all"])
def test_deep_prompts_equal_full_sequences_per_sample(towers, depth):
    """MaPLe's and IVLP's deep language prompts (`encode_deep`): the shared-prefix forward and
    the hand-written backward, where deeper[i - 1] replaces the context rows at block i's input,
    against every class's full sequence through open_clip's modules (autograd): features, and
    per-sample gradients of the context and of every deep prompt, clients stacked under vmap.
    "all" prompts every block after the first, the last block (EOT rows only) included."""
    hand, _ = towers
    full = hand.with_options(share_prefix=False)
    blocks = len(hand.transformer.resblocks)
    n_deep = blocks - 1 if depth == "all" else depth - 1
    ctx, deeper = 0.1 * _data(3, 4, hand.width), 0.1 * _data(3, n_deep, 4, hand.width)
    cot = _data(5, 3, len(NAMES), 64)
    with torch.no_grad():
        values = [vmap(t.encode_deep)(ctx, deeper) for t in (hand, full)]
    assert _rel(values[0], values[1]) < ROUNDING

    def per_sample(tower):
        _, fn = vjp(lambda c, d: vmap(tower.encode_deep)(c, d), ctx, deeper)
        return vmap(fn)(cot)

    (d_ctx, d_deep), (w_ctx, w_deep) = per_sample(hand), per_sample(full)
    assert d_ctx.shape == (5, 3, 4, hand.width) and d_deep.shape == (5, *deeper.shape)
    assert _rel(d_ctx, w_ctx) < ROUNDING
    if n_deep:
        assert _rel(d_deep, w_deep) < ROUNDING
        # each deep prompt gets its own gradient: the replaced rows pass nothing further down
        assert all(float(w_deep[:, :, i].norm()) > 0 for i in range(n_deep))
