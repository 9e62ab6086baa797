"""MaPLe against its paper, written here from Sec. 3.3 with open_clip's own modules: deep
language prompts, vision prompts coupled by linear maps, the logits; exact per-sample gradients
of every parameter through the prompted image tower (float64, one backward per sample); and
runs through the driver with and without DP under both trust models."""

import json
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from fpl_bench.driver import FederatedRun, NoisePlan, Schedule
from fpl_bench.learners._base import EncodeContext, InitContext
from fpl_bench.learners.maple import OWN, prompt_depth
from fpl_bench.method import method_from_name
from fpl_bench.privacy.per_sample import step_gradients
from fpl_bench.text_tower import TextTower
from fpl_bench.vision import VisionTower
from tests.test_driver import image_federation

CONFIG = Path(__file__).resolve().parents[1] / "fpl_bench" / "model_configs" / "fpl-tiny-vit.json"
NAMES = ["red circle", "dark blue square", "green triangle", "yellow star", "pink heart", "a"]


def build(dtype):
    cfg = json.loads(CONFIG.read_text())
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg).eval().to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    tower = TextTower.build(model, open_clip.get_tokenizer("fpl-tiny-vit"), NAMES, n_ctx=4)
    return model, tower, VisionTower.of(model)


@pytest.fixture(scope="module")
def towers32():
    return build(torch.float32)


@pytest.fixture(scope="module")
def towers64():
    return build(torch.float64)


def paper_text(model, tower, ctx, deep, classes):
    """Eq. 3-4: the prompt "SOS P_0 class." through the text blocks, P_i replacing the context
    positions at the input of block i; EOT feature, projected, normalised."""
    feats = []
    for c in classes.tolist():
        x = torch.cat([tower.prefix[c], ctx, tower.suffix[c]])  # [S, W]
        x = x + model.positional_embedding[: x.shape[0]]
        mask = model.attn_mask[: x.shape[0], : x.shape[0]]
        for i, block in enumerate(model.transformer.resblocks):
            if 1 <= i <= deep.shape[0]:
                x = torch.cat([x[:1], deep[i - 1], x[1 + ctx.shape[0] :]])
            x = block(x[None], attn_mask=mask)[0]
        x = model.ln_final(x)[tower.eot[c]] @ model.text_projection
        feats.append(x / x.norm())
    return torch.stack(feats)


def paper_image(model, pixels, first, deep):
    """Eq. 5-6: image tokens plus F_0(P_0) at the input, F_i(P_i) replacing them at block i;
    the class token's output through ln_post and the projection."""
    v = model.visual
    x = v.conv1(pixels[None]).flatten(2).transpose(1, 2)[0]  # [P, Wv]
    x = torch.cat([v.class_embedding[None], x]) + v.positional_embedding
    x = v.ln_pre(torch.cat([x, first]))
    n = first.shape[0]
    for i, block in enumerate(v.transformer.resblocks):
        if 1 <= i <= deep.shape[0]:
            x = torch.cat([x[:-n], deep[i - 1]])
        x = block(x[None])[0]
    return v.ln_post(x[0]) @ v.proj


def paper_logits(model, tower, params, pixels, classes):
    ctx, own = params["prompt"], params
    first = ctx @ own["maple.w0"].T + own["maple.b0"]
    deep = torch.stack(
        [
            own["maple.text_deep"][i] @ own["maple.w_deep"][i].T + own["maple.b_deep"][i]
            for i in range(own["maple.text_deep"].shape[0])
        ]
    )
    text = paper_text(model, tower, ctx, own["maple.text_deep"], classes)
    rows = []
    for p in pixels:
        img = paper_image(model, p, first, deep)
        rows.append(tower.logit_scale * (img / img.norm()) @ text.T)
    return torch.stack(rows)


def init(tower, vision, dtype=torch.float32, name="maple"):
    method = method_from_name(name)
    gen = torch.Generator().manual_seed(0)
    params, consts = method.init(InitContext(tower, gen, vision=vision))
    params = {
        k: v.to(dtype) + 0.05 * torch.randn(v.shape, generator=gen, dtype=dtype)
        for k, v in params.items()
    }
    return method, params, consts


def test_depth_scales_to_the_backbone_and_the_deep_maps_start_as_copies(towers32):
    _, tower, vision = towers32
    assert prompt_depth(9, 12) == 9 and prompt_depth(9, 4) == 3 and prompt_depth(1, 4) == 1
    method = method_from_name("maple")
    params, _ = method.init(InitContext(tower, torch.Generator().manual_seed(0), vision=vision))
    assert tuple(params["maple.text_deep"].shape) == (2, 4, tower.width)
    assert tuple(params["maple.w_deep"].shape) == (2, vision.width, tower.width)
    assert torch.equal(params["maple.w_deep"][0], params["maple.w_deep"][1])  # _get_clones
    assert not torch.equal(params["maple.w0"], params["maple.w_deep"][0])
    assert set(OWN) <= set(params)


def test_logits_are_the_papers(towers32):
    model, tower, vision = towers32
    method, params, consts = init(tower, vision)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    classes = torch.tensor([0, 2, 3, 5])
    ctx = EncodeContext(tower, classes, consts, vision=vision)
    step, aux = method.step_params(params, torch.Generator())
    encoded = method.encode(step, aux, ctx)
    tokens = vision.embed(pixels)
    got = method.logits(encoded, torch.zeros(3, 1), tokens, ctx)
    want = paper_logits(model, tower, params, pixels, classes)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(method.logits(encoded, torch.zeros(1), tokens[1], ctx), want[1])


def test_per_sample_gradients_equal_a_backward_per_sample_in_float64(towers64):
    model, tower, vision = towers64
    method, params, consts = init(tower, vision, torch.float64)
    gen = torch.Generator().manual_seed(2)
    pixels = torch.randn(4, 3, 32, 32, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 3, 1, 1])
    classes = torch.arange(4)
    ctx = EncodeContext(tower, classes, consts, vision=vision)
    step, aux = method.step_params(params, gen)
    batch = (torch.zeros(4, 1, dtype=torch.float64), vision.embed(pixels), labels)

    def encode(p):
        return method.encode(p, aux, ctx)

    def loss_one(z, x, t, y):
        return method.sample_loss(z, x, t, y, ctx)

    got = step_gradients(encode, loss_one, step, batch, per_sample=True)
    for i in range(4):  # the paper's loss, one sample, one ordinary backward
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        logits = paper_logits(model, tower, leaves, pixels[i : i + 1], classes)
        F.cross_entropy(logits, labels[i : i + 1]).backward()
        for k, leaf in leaves.items():
            torch.testing.assert_close(got.data[k][i], leaf.grad, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", ["maple", "fedmaple"])
@pytest.mark.parametrize("mode", ["none", "server", "client"])
def test_runs_through_the_driver(towers32, name, mode):
    _, tower, vision = towers32
    fed = image_federation(vision)
    run = FederatedRun(
        method_from_name(name),
        tower,
        fed,
        schedule=Schedule(rounds=1, batch_size=4, lr=0.05),
        seed=0,
        trust="client" if mode == "client" else "server",
        vision=vision,
    )
    before = {k: v.clone() for k, v in run.view(0, evaluation=True).items()}
    if mode != "none":
        run.enable_privacy(NoisePlan(noise_multiplier=0.5, clip_norm=0.05))
    out = run.run()
    assert 0.0 <= out.history[-1]["base_acc"] <= 1.0
    after = run.view(0, evaluation=True)
    assert all(not torch.equal(before[k], after[k]) for k in before)  # every parameter trained
    shared = set(run.method.shared)
    assert shared == (set() if name == "maple" else {"prompt", *OWN})
