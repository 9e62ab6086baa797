"""IVLP and VPT-deep against the equations, written here with open_clip's own modules: deep
language prompts replacing the context positions at each prompted text block, independent deep
vision prompts replacing the appended tokens at each prompted image block, CLIP's logits (the
frozen hand-written prompt's features for text_depth = 0); exact per-sample gradients of every
parameter group through both towers (float64, one backward per sample); runs through the
driver and by name through the CLI, without DP and under both trust models."""

import pytest
import torch
import torch.nn.functional as F

from fpl_bench.driver import FederatedRun, NoisePlan, Schedule
from fpl_bench.learners._base import EncodeContext, InitContext
from fpl_bench.learners._deep import prompt_depth
from fpl_bench.learners.ivlp import OWN
from fpl_bench.method import method_from_name
from fpl_bench.privacy.per_sample import step_gradients
from tests.test_driver import image_federation
from tests.test_maple import build, paper_image, paper_text

DEPTHS = [(9, 9), (0, 9), (1, 12), (12, 3)]  # (text_depth, vision_depth); 0: VPT-deep


@pytest.fixture(scope="module")
def towers():
    """(model, text tower, image tower) of the tiny model by dtype, each built once."""
    return {dtype: build(dtype) for dtype in (torch.float32, torch.float64)}


def hand_written(model, tower, classes):
    """CLIP's text side for "a photo of a {}.", by open_clip's own encode_text."""
    import open_clip

    texts = [f"a photo of a {tower.classnames[c]}." for c in classes.tolist()]
    tokens = open_clip.tokenize(texts, context_length=model.context_length)
    return F.normalize(model.encode_text(tokens).to(tower.positional.dtype), dim=-1)


def paper_logits(model, tower, params, pixels, classes, text_depth):
    """The context and P_1..J_t-1 through the text blocks (or the hand-written prompt); V_0
    appended to the image tokens and V_i replacing them at block i; scaled cosine."""
    if text_depth:
        text = paper_text(model, tower, params["prompt"], params["ivlp.text_deep"], classes)
    else:
        text = hand_written(model, tower, classes)
    vision = params["ivlp.vision"]
    rows = []
    for p in pixels:
        img = paper_image(model, p, vision[0], vision[1:])
        rows.append(tower.logit_scale * (img / img.norm()) @ text.T)
    return torch.stack(rows)


def start(method, tower, vision=None, dtype=torch.float64):
    """(params, consts) of `method` at init in `dtype`, every parameter then moved by
    N(0, 0.05^2) so that no check holds for an initial value's sake."""
    gen = torch.Generator().manual_seed(0)
    params, consts = method.init(InitContext(tower, gen, vision=vision))
    noise = {k: 0.05 * torch.randn(v.shape, generator=gen, dtype=dtype) for k, v in params.items()}
    return {k: v.to(dtype) + noise[k] for k, v in params.items()}, {
        k: v.to(dtype) for k, v in consts.items()
    }


def ivlp(text_depth=9, vision_depth=9):
    return method_from_name("ivlp", {"text_depth": text_depth, "vision_depth": vision_depth})


def encoded(method, params, ctx):
    """What the driver's step hands the loss: the method's encoding of `params`."""
    step, aux = method.step_params(params, torch.Generator())
    return method.encode(step, aux, ctx)


def assert_per_sample_rows_exact(method, params, ctx, batch, reference_loss):
    """The per-sample gradients `privacy/` takes (one encoder forward, vmapped cotangents)
    equal, row by row, the gradients of `reference_loss(leaves, i)` by one ordinary backward
    per sample; a parameter the reference never reads gets exactly zero. Returns the rows."""
    step, aux = method.step_params(params, torch.Generator())
    rows = step_gradients(
        lambda p: method.encode(p, aux, ctx),
        lambda z, *sample: method.sample_loss(z, *sample, ctx),
        step,
        batch,
        per_sample=True,
    ).data
    assert set(rows) == set(params)
    for i in range(len(batch[-1])):
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        reference_loss(leaves, i).backward()
        for k, leaf in leaves.items():
            want = torch.zeros_like(leaf) if leaf.grad is None else leaf.grad
            torch.testing.assert_close(rows[k][i], want, rtol=1e-9, atol=1e-11)
    return rows


def trained(name, tower, fed, mode, vision=None, **schedule):
    """(the run, client 0's parameters before it, its output) of `name` trained without DP
    (mode "none") or with DP under the "server" or "client" trust model."""
    options = {"rounds": 1, "batch_size": 4, "lr": 0.05, **schedule}
    trust = "client" if mode == "client" else "server"
    run = FederatedRun(
        method_from_name(name), tower, fed, schedule=Schedule(**options), seed=0, trust=trust,
        vision=vision,
    )  # fmt: skip
    before = {k: v.clone() for k, v in run.view(0, evaluation=True).items()}
    if mode != "none":
        run.enable_privacy(NoisePlan(noise_multiplier=0.5, clip_norm=0.05))
    return run, before, run.run()


def test_depths_scale_to_each_tower_and_zero_means_no_text_prompt(towers):
    _, tower, vision = towers[torch.float32]
    assert prompt_depth(0, 4) == 0 and prompt_depth(9, 4) == 3 and prompt_depth(12, 4) == 4
    for depths, text_rows, vision_rows in (
        ((9, 9), 2, 3),
        ((0, 9), 0, 3),
        ((1, 12), 0, 4),
        ((12, 1), 3, 1),
    ):
        params, consts = start(ivlp(*depths), tower, vision)
        assert tuple(params["ivlp.text_deep"].shape) == (text_rows, 4, tower.width)
        assert tuple(params["ivlp.vision"].shape) == (vision_rows, 4, vision.width)
        assert set(OWN) <= set(params) and ("ivlp_text" in consts) == (depths[0] == 0)
    fresh, _ = ivlp().init(InitContext(tower, torch.Generator().manual_seed(0), vision=vision))
    assert abs(float(fresh["ivlp.vision"].std()) - 0.02) < 0.004  # N(0, 0.02^2)


@pytest.mark.parametrize(("text_depth", "vision_depth"), DEPTHS)
def test_logits_are_the_equations(towers, text_depth, vision_depth):
    model, tower, vision = towers[torch.float32]
    method = ivlp(text_depth, vision_depth)
    params, consts = start(method, tower, vision, torch.float32)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    classes = torch.tensor([0, 2, 3, 5])
    ctx = EncodeContext(tower, classes, consts, vision=vision)
    text, tokens = encoded(method, params, ctx), vision.embed(pixels)
    want = paper_logits(model, tower, params, pixels, classes, text_depth)
    torch.testing.assert_close(method.logits(text, None, tokens, ctx), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(method.logits(text, None, tokens[1], ctx), want[1])


@pytest.mark.parametrize(("text_depth", "vision_depth"), DEPTHS[:2])
def test_per_sample_gradients_equal_a_backward_per_sample_in_float64(
    towers, text_depth, vision_depth
):
    model, tower, vision = towers[torch.float64]
    method = ivlp(text_depth, vision_depth)
    params, consts = start(method, tower, vision)
    gen = torch.Generator().manual_seed(2)
    pixels = torch.randn(4, 3, 32, 32, generator=gen, dtype=torch.float64)
    labels, classes = torch.tensor([0, 3, 1, 1]), torch.arange(4)
    batch = (torch.zeros(4, 1, dtype=torch.float64), vision.embed(pixels), labels)

    def reference_loss(leaves, i):
        logits = paper_logits(model, tower, leaves, pixels[i : i + 1], classes, text_depth)
        return F.cross_entropy(logits, labels[i : i + 1])

    ctx = EncodeContext(tower, classes, consts, vision=vision)
    rows = assert_per_sample_rows_exact(method, params, ctx, batch, reference_loss)
    assert rows["ivlp.vision"].abs().sum() > 0
    assert (rows["prompt"].abs().sum() > 0) == bool(text_depth)  # VPT-deep: the context unread


@pytest.mark.parametrize("name", ["ivlp", "fedivlp"])
@pytest.mark.parametrize("mode", ["none", "server", "client"])
def test_runs_through_the_driver(towers, name, mode):
    _, tower, vision = towers[torch.float32]
    run, before, out = trained(name, tower, image_federation(vision), mode, vision)
    assert 0.0 <= out.history[-1]["base_acc"] <= 1.0
    after = run.view(0, evaluation=True)
    assert all(not torch.equal(before[k], after[k]) for k in before)  # every parameter trained
    assert set(run.method.shared) == (set() if name == "ivlp" else {"prompt", *OWN})
