"""CoCoOp against its paper, written here from Sec. 3.2 and Eq. 3: the meta-net, the
image-conditioned logits, exact per-sample gradients of the context and the meta-net (float64,
against one ordinary backward per sample), and which scheme shares the meta-net."""

import json
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from fpl_bench.catalog import resolve_method
from fpl_bench.errors import UsageError
from fpl_bench.learners._base import EncodeContext, InitContext
from fpl_bench.learners.cocoop import META
from fpl_bench.method import method_from_name
from fpl_bench.privacy.per_sample import step_gradients
from fpl_bench.text_tower import TextTower

CONFIG = Path(__file__).resolve().parents[1] / "fpl_bench" / "model_configs" / "fpl-tiny-vit.json"


def paper_logits(tower, ctx, own, images, class_idx):
    """Eq. 3 one image at a time: v_m(x) = v_m + pi(x), pi = W2 ReLU(W1 x + b1) + b2 on the
    normalised feature; logits = logit_scale * cos(g(t_i(x)), f(x))."""
    rows = []
    for x in images:
        x_hat = x / x.norm()
        pi = own["cocoop.w2"] @ torch.relu(own["cocoop.w1"] @ x_hat + own["cocoop.b1"])
        pi = pi + own["cocoop.b2"]
        text = tower.encode(ctx + pi, class_idx)  # [n, D], normalised
        rows.append(tower.logit_scale * (text @ x_hat))
    return torch.stack(rows)


def init(tower, seed=0):
    method = method_from_name("cocoop")
    params, consts = method.init(InitContext(tower, torch.Generator().manual_seed(seed)))
    return method, params, consts


def test_meta_net_is_linear_relu_linear_with_torch_init(tiny_tower):
    _, params, _ = init(tiny_tower)
    dim, width = tiny_tower.feature_dim, tiny_tower.width
    hidden = dim // 16
    shapes = {k: tuple(params[k].shape) for k in META}
    assert shapes == {
        "cocoop.w1": (hidden, dim),
        "cocoop.b1": (hidden,),
        "cocoop.w2": (width, hidden),
        "cocoop.b2": (width,),
    }
    for k, fan_in in (("cocoop.w1", dim), ("cocoop.b1", dim), ("cocoop.w2", hidden)):
        assert params[k].abs().max() <= 1 / fan_in**0.5  # nn.Linear's bound
        if params[k].numel() > 100:  # uniform on +-bound: std = bound / sqrt(3) = 0.577 bound
            assert params[k].std() > 0.5 / fan_in**0.5


def test_logits_are_eq3_per_image(tiny_tower):
    method, params, consts = init(tiny_tower)
    params = {**params, "prompt": params["prompt"] + 0.1}
    images = torch.randn(5, tiny_tower.feature_dim, generator=torch.Generator().manual_seed(1))
    classes = torch.tensor([0, 2, 3, 5])
    ctx = EncodeContext(tiny_tower, classes, consts)
    step, aux = method.step_params(params, torch.Generator())
    encoded = method.encode(step, aux, ctx)
    got = method.logits(encoded, images, None, ctx)
    want = paper_logits(tiny_tower, params["prompt"], params, images, classes)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # one image at a time gives its row
    torch.testing.assert_close(method.logits(encoded, images[2], None, ctx), want[2])
    assert torch.equal(method.predict(encoded, images, None, ctx), got.argmax(-1))


@pytest.fixture(scope="module")
def tower64():
    cfg = json.loads(CONFIG.read_text())
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg).eval().double()
    for p in model.parameters():
        p.requires_grad_(False)
    names = ["red circle", "dark blue square", "green triangle", "yellow star"]
    return TextTower.build(model, open_clip.get_tokenizer("fpl-tiny-vit"), names, n_ctx=4)


def test_per_sample_gradients_equal_a_backward_per_sample_in_float64(tower64):
    method, params, consts = init(tower64)
    params = {k: v.double() for k, v in params.items()}
    gen = torch.Generator().manual_seed(2)
    batch = 5
    images = torch.randn(batch, tower64.feature_dim, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 3, 1, 1, 2])
    tokens = images.new_zeros(batch, 0)
    ctx = EncodeContext(tower64, torch.arange(4), consts)
    step, aux = method.step_params(params, gen)

    def encode(p):
        return method.encode(p, aux, ctx)

    def loss_one(z, x, t, y):
        return method.sample_loss(z, x, t, y, ctx)

    got = step_gradients(encode, loss_one, step, (images, tokens, labels), per_sample=True)
    for i in range(batch):  # the paper's loss, one sample, one ordinary backward
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        logits = paper_logits(tower64, leaves["prompt"], leaves, images[i : i + 1], ctx.class_idx)
        F.cross_entropy(logits, labels[i : i + 1]).backward()
        for k, leaf in leaves.items():
            torch.testing.assert_close(got.data[k][i], leaf.grad, rtol=1e-10, atol=1e-12)


def test_fedavg_shares_the_meta_net_local_keeps_it():
    assert method_from_name("fedcocoop").shared == ("prompt", *META)
    assert method_from_name("cocoop").shared == ()


def test_a_scheme_whose_prior_needs_extra_prompt_features_is_refused():
    from fpl_bench.spec import build_spec

    with pytest.raises(UsageError, match="builds per image"):
        build_spec(methods=(resolve_method("cocoop@sigma_uv"),))
