"""FedTPG's prompt generator against its equations, written out here one head at a time
(LN, softmax(Q K^T / sqrt(d)) V, GEGLU feed-forward with a residual) and against torch.nn's
MultiheadAttention as the reference builds it; the context is the task's (conditioned on the
scored class set, one for every class); exact per-sample gradients of the queries and every
generator weight (float64, one backward per sample), one client and clients in lockstep;
FedAvg shares the generator; runs through the driver and by name through the CLI."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fpl_bench.driver import FederatedRun, NoisePlan, Schedule
from fpl_bench.errors import UsageError
from fpl_bench.learners._base import EncodeContext, InitContext
from fpl_bench.learners.fedtpg import NAMES, OWN, cross_attention, generate
from fpl_bench.method import method_from_name
from fpl_bench.privacy.per_sample import client_step_gradients, step_gradients
from tests.test_cocoop import tower64  # noqa: F401  (a float64 tiny tower, module fixture)
from tests.test_driver import make_federation


def layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def paper_context(own, queries, names, heads):
    """P = FF(A) + A, A = [head_1 .. head_h] W_o^T + b_o, head_j = softmax(q_j k_j^T / sqrt(d))
    v_j on LN_q(Q) and LN_t(T); FF(x) = W2 (a * gelu(g)) + b2 with [a, g] = W1 LN_f(x) + b1."""
    p = {k.removeprefix("fedtpg."): v for k, v in own.items()}
    q = layer_norm(queries, p["ln_q.weight"], p["ln_q.bias"])
    t = layer_norm(names, p["ln_t.weight"], p["ln_t.bias"])
    width = queries.shape[-1]
    d = width // heads
    parts = []
    for j in range(heads):
        rows = slice(j * d, (j + 1) * d)
        qj = q @ p["wq"][rows].T + p["bq"][rows]
        kj = t @ p["wk"][rows].T + p["bk"][rows]
        vj = t @ p["wv"][rows].T + p["bv"][rows]
        scores = qj @ kj.T / math.sqrt(d)
        weights = torch.exp(scores - scores.max(-1, keepdim=True).values)
        parts.append(weights / weights.sum(-1, keepdim=True) @ vj)
    attended = torch.cat(parts, dim=-1) @ p["wo"].T + p["bo"]
    hidden = layer_norm(attended, p["ln_f.weight"], p["ln_f.bias"]) @ p["w1"].T + p["b1"]
    a, g = hidden[..., : hidden.shape[-1] // 2], hidden[..., hidden.shape[-1] // 2 :]
    gelu = 0.5 * g * (1 + torch.erf(g / math.sqrt(2)))
    return (a * gelu) @ p["w2"].T + p["b2"] + attended


def start(tower, name="fedtpg", seed=0, jitter=0.1):
    """(method, params, consts); the LayerNorms and zero biases moved off their initial values
    (so an equation test sees every term)."""
    method = method_from_name(name)
    gen = torch.Generator().manual_seed(seed)
    params, consts = method.init(InitContext(tower, gen))
    dtype = tower.positional.dtype

    def moved(name, value):
        return value + jitter * torch.randn(value.shape, generator=gen) if name in OWN else value

    return method, {k: moved(k, v).to(dtype) for k, v in params.items()}, consts


def test_generator_shapes_and_torch_initialisation(tiny_tower):
    method = method_from_name("fedtpg")
    params, consts = method.init(InitContext(tiny_tower, torch.Generator().manual_seed(0)))
    w, d, r = tiny_tower.width, tiny_tower.feature_dim, 4
    shapes = {k: tuple(v.shape) for k, v in params.items()}
    assert shapes == {
        "prompt": (tiny_tower.n_ctx, w),
        **{f"fedtpg.ln_{n}.{p}": (w,) for n in "qf" for p in ("weight", "bias")},
        **{f"fedtpg.ln_t.{p}": (d,) for p in ("weight", "bias")},
        "fedtpg.wq": (w, w), "fedtpg.wk": (w, d), "fedtpg.wv": (w, d), "fedtpg.wo": (w, w),
        **{f"fedtpg.b{n}": (w,) for n in "qkvo"},
        "fedtpg.w1": (2 * r * w, w), "fedtpg.b1": (2 * r * w,),
        "fedtpg.w2": (w, r * w), "fedtpg.b2": (w,),
    }  # fmt: skip
    for n in "qtf":  # LayerNorms at one and zero
        weight, bias = params[f"fedtpg.ln_{n}.weight"], params[f"fedtpg.ln_{n}.bias"]
        assert torch.equal(weight, torch.ones_like(weight)) and not bias.any()
    assert not any(params[f"fedtpg.b{n}"].any() for n in "qkvo")  # MultiheadAttention: zeros
    packed = torch.cat([params[f"fedtpg.w{n}"] for n in "qkv"])  # in_proj_weight [3W, W]
    bound = math.sqrt(6 / (w + 3 * w))  # xavier_uniform_ on it
    assert packed.abs().max() <= bound and packed.std() > 0.5 * bound
    for k, fan_in in (("wo", w), ("w1", w), ("b1", w), ("w2", r * w), ("b2", r * w)):
        assert params[f"fedtpg.{k}"].abs().max() <= 1 / math.sqrt(fan_in)  # nn.Linear's bound
    assert abs(float(params["prompt"].std()) - 0.02) < 0.005  # the queries: N(0, 0.02^2)
    torch.testing.assert_close(consts[NAMES], tiny_tower.encode_text(tiny_tower.classnames))


def test_heads_must_divide_the_text_width(tiny_tower):
    method = method_from_name("fedtpg", {"heads": 3})
    with pytest.raises(UsageError, match=r"fedtpg\.heads=3 does not divide"):
        method.init(InitContext(tiny_tower, torch.Generator()))


def test_generator_is_the_equations(tower64):  # noqa: F811
    _, params, consts = start(tower64)
    names = consts[NAMES][torch.tensor([0, 2, 3])].double()
    queries = params["prompt"] + 0.3  # [n_ctx, W]
    want = paper_context(params, queries, names, heads=4)
    torch.testing.assert_close(generate(params, queries, names, 4), want)
    stacked = torch.stack([queries, -queries])  # leading prompt dims go through as batch dims
    got = generate(params, stacked, names, 4)
    torch.testing.assert_close(got[1], paper_context(params, -queries, names, heads=4))


@pytest.mark.parametrize(("width", "dim"), [(8, 8), (8, 12)])
def test_attention_is_torch_multihead_attention(width, dim):
    """The reference's `nn.MultiheadAttention(W, 4, kdim=D, vdim=D, batch_first=True)`: packed
    in_proj_weight when D == W, separate q/k/v_proj_weight otherwise."""
    gen = torch.Generator().manual_seed(3)
    mha = nn.MultiheadAttention(width, 4, kdim=dim, vdim=dim, batch_first=True).double()
    own = {
        f"fedtpg.{k}": torch.randn(shape, generator=gen, dtype=torch.float64)
        for k, shape in (("wq", (width, width)), ("wk", (width, dim)), ("wv", (width, dim)),
                         ("bq", width), ("bk", width), ("bv", width), ("wo", (width, width)),
                         ("bo", width))
    }  # fmt: skip
    with torch.no_grad():
        if dim == width:
            mha.in_proj_weight.copy_(torch.cat([own[f"fedtpg.w{n}"] for n in "qkv"]))
        else:
            for n in "qkv":
                getattr(mha, f"{n}_proj_weight").copy_(own[f"fedtpg.w{n}"])
        mha.in_proj_bias.copy_(torch.cat([own[f"fedtpg.b{n}"] for n in "qkv"]))
        mha.out_proj.weight.copy_(own["fedtpg.wo"])
        mha.out_proj.bias.copy_(own["fedtpg.bo"])
        q = torch.randn(3, width, generator=gen, dtype=torch.float64)
        t = torch.randn(5, dim, generator=gen, dtype=torch.float64)
        want, _ = mha(q[None], t[None], t[None])
    torch.testing.assert_close(cross_attention(own, q, t, 4), want[0])


def test_text_is_the_task_context_through_the_tower(tower64):  # noqa: F811
    method, params, consts = start(tower64)
    classes = torch.tensor([0, 2, 3])
    ctx = EncodeContext(tower64, classes, consts)
    step, aux = method.step_params(params, torch.Generator())
    text = method.encode(step, aux, ctx)["text"]  # [1, n, D]
    context = paper_context(params, params["prompt"], consts[NAMES][classes], heads=4)
    torch.testing.assert_close(text[0], tower64.encode(context, classes))
    # the task is the scored class SET: another set, another context; an order, the same
    other = method.encode(step, aux, EncodeContext(tower64, torch.tensor([0, 2, 1]), consts))
    assert not torch.allclose(other["text"][0, :2], text[0, :2])
    perm = torch.tensor([2, 0, 1])
    shuffled = method.encode(step, aux, EncodeContext(tower64, classes[perm], consts))
    torch.testing.assert_close(shuffled["text"][0], text[0, perm])


def _loss_fns(method, ctx):
    def loss_one(z, x, t, y):
        return method.sample_loss(z, x, t, y, ctx)

    return loss_one


def _batch(tower, n, seed):
    gen = torch.Generator().manual_seed(seed)
    images = F.normalize(
        torch.randn(n, tower.feature_dim, generator=gen, dtype=torch.float64), dim=-1
    )
    labels = torch.randint(0, 4, (n,), generator=gen)
    return images, images.new_zeros(n, 0), labels


def reference_loss(tower, params, consts, classes, image, label):
    context = paper_context(params, params["prompt"], consts[NAMES][classes], heads=4)
    text = tower.encode(context, classes)  # [n, D]
    logits = tower.logit_scale * F.normalize(image, dim=-1) @ text.T
    return F.cross_entropy(logits[None], label[None])


def test_per_sample_gradients_equal_a_backward_per_sample_in_float64(tower64):  # noqa: F811
    method, params, consts = start(tower64)
    classes = torch.arange(4)
    ctx = EncodeContext(tower64, classes, consts)
    batch = _batch(tower64, 5, seed=1)
    step, aux = method.step_params(params, torch.Generator())
    got = step_gradients(
        lambda p: method.encode(p, aux, ctx), _loss_fns(method, ctx), step, batch, per_sample=True
    )
    assert set(got.data) == {"prompt", *OWN}
    for i in range(5):  # the equations' loss, one sample, one ordinary backward
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        reference_loss(tower64, leaves, consts, classes, batch[0][i], batch[2][i]).backward()
        for k, leaf in leaves.items():
            torch.testing.assert_close(got.data[k][i], leaf.grad, rtol=1e-9, atol=1e-12)
    # every tensor is read, but the key bias: it adds q . b_k to every key of a query, which
    # the softmax over keys cancels, so its gradient is zero (to rounding) for every sample
    scale = max(float(g.abs().max()) for g in got.data.values())
    assert float(got.data["fedtpg.bk"].abs().max()) < 1e-12 * scale
    assert all(float(got.data[k].abs().sum()) > 1e-6 * scale for k in got.data if k != "fedtpg.bk")


def test_clients_in_lockstep_equal_each_client_alone(tower64):  # noqa: F811
    method, first, consts = start(tower64, seed=0)
    _, second, _ = start(tower64, seed=1)
    ctx = EncodeContext(tower64, torch.arange(4), consts)
    loss_one = _loss_fns(method, ctx)
    batches = [_batch(tower64, 3, seed=2), _batch(tower64, 3, seed=3)]
    stacked = {k: torch.stack([first[k], second[k]]) for k in first}
    got = client_step_gradients(
        lambda p, e: method.encode(p, {}, ctx),
        loss_one,
        stacked,
        {},
        tuple(torch.stack(parts) for parts in zip(*batches, strict=True)),
        [3, 3],
        per_sample=True,
    )
    for c, (params, batch) in enumerate(zip((first, second), batches, strict=True)):
        alone = step_gradients(
            lambda p: method.encode(p, {}, ctx), loss_one, params, batch, per_sample=True
        )
        for k in params:
            torch.testing.assert_close(got.data[k][c], alone.data[k], rtol=1e-9, atol=1e-12)


def test_fedavg_shares_the_generator_and_its_queries_local_keeps_them():
    assert method_from_name("fedtpg").shared == ("prompt", *OWN)
    assert method_from_name("fedtpg@local").shared == ()


@pytest.mark.parametrize("mode", ["none", "server", "client"])
def test_runs_through_the_driver_training_the_generator(tiny_tower, mode):
    schedule, trust = Schedule(rounds=2, batch_size=8, lr=0.1), mode.replace("none", "server")
    fed = make_federation(tiny_tower)
    run = FederatedRun(
        method_from_name("fedtpg"), tiny_tower, fed, schedule=schedule, seed=0, trust=trust
    )
    before = run.view(0, evaluation=True)
    if mode != "none":
        run.enable_privacy(NoisePlan(noise_multiplier=1.0, clip_norm=1.0))
    out = run.run()
    assert all(0.0 <= out.history[-1][k] <= 1.0 for k in ("local_acc", "base_acc", "novel_acc"))
    views = [run.view(c, evaluation=True) for c in range(2)]
    for k in ("prompt", *OWN):
        assert not torch.equal(before[k], views[0][k]), k  # the queries and F trained
        assert torch.equal(views[0][k], views[1][k]), k  # and the server averaged them
