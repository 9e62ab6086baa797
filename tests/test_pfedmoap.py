"""pFedMoAP against its paper and reference forward pass, written here: the attention gate's
logits on the tiny tower (an nn.Linear multi-head attention over the present experts only,
class by class, as the reference's `forward`), the local prompt's logits alone before any
expert, exact per-sample gradients of the prompt and the gate (float64, against one ordinary
backward per sample), the server's pool, FedAvg and nearest-expert download on hand-written
prompts and through the driver, what crosses the wire under DP with both trust models, the
pairs it refuses (by name through the CLI: tests/test_new_presets_cli.py)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fpl_bench.driver import FederatedRun, NoisePlan, Schedule
from fpl_bench.learners import LEARNERS
from fpl_bench.learners._base import EncodeContext, InitContext
from fpl_bench.method import method_from_name, pair_problem
from fpl_bench.privacy.per_sample import step_gradients
from fpl_bench.schemes import SCHEMES
from fpl_bench.schemes._base import RoundEnd
from fpl_bench.schemes.pfedmoap import PFedMoAP
from fpl_bench.text_tower import TextTower
from tests.test_driver import make_federation


class Gate(nn.Module):
    """The paper's gating network as the reference writes it: Linear q, k, v, o of width d,
    heads split by view / transpose, scores times `scaling`, softmax over the experts."""

    def __init__(self, d: int, heads: int, scaling: float) -> None:
        super().__init__()
        self.heads, self.dk, self.scaling = heads, d // heads, scaling
        self.W_q, self.W_k, self.W_v, self.W_o = (nn.Linear(d, d) for _ in range(4))

    def split(self, x: Tensor) -> Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.heads, self.dk).transpose(1, 2)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q, k, v = self.split(self.W_q(q)), self.split(self.W_k(k)), self.split(self.W_v(v))
        attn = F.softmax(q @ k.transpose(-2, -1) * self.scaling, dim=-1)
        out = (attn @ v).transpose(1, 2).contiguous()
        return self.W_o(out.view(out.shape[0], out.shape[1], -1))


def gate_from(params: dict[str, Tensor], heads: int, scaling: float) -> Gate:
    d = params["gate.wq"].shape[0]
    gate = Gate(d, heads, scaling).to(params["gate.wq"].dtype)
    for name, layer in (("q", gate.W_q), ("k", gate.W_k), ("v", gate.W_v), ("o", gate.W_o)):
        layer.weight = nn.Parameter(params[f"gate.w{name}"].detach().clone())
        layer.bias = nn.Parameter(params[f"gate.b{name}"].detach().clone())
    return gate


def reference_logits(tower, prompt, experts, images, class_idx, gate, lam, stride):
    """pFedMoAP's forward: local logits, plus with non-local experts (their features without
    gradient) the gate's per-class mixture scored against the pooled image feature."""
    text = F.normalize(tower.encode(prompt, class_idx), dim=-1)
    image = F.normalize(images, dim=-1)
    scale = tower.logit_scale
    local = scale * image @ text.t()
    if not experts:
        return local
    with torch.no_grad():
        nonlocal_text = [
            F.normalize(tower.encode(e, class_idx), dim=-1)[:, ::stride] for e in experts
        ]
    n_class = text.shape[0]
    q = image[:, ::stride].repeat(n_class, 1, 1)  # (n_class, B, d)
    kv = torch.stack([text[:, ::stride], *nonlocal_text]).permute(1, 0, 2)  # (n_class, E, d)
    mixed = gate(q, kv, kv).permute(1, 2, 0)  # (B, d, n_class)
    return lam * local + scale * torch.bmm(image[:, ::stride].unsqueeze(1), mixed).squeeze(1)


SHIFTS = ("gate.bk", "gate.bv", "gate.bo")  # zero gradient in the paper's gate


def with_experts(method, params, tower, gen, present):
    """params with len(present) expert slots filled by random prompts where present."""
    params = dict(params)
    slots = params["experts"].clone()
    ids = params["expert_ids"].clone()
    for slot, on in enumerate(present):
        if on:
            slots[slot] = 0.5 * torch.randn(tower.n_ctx, tower.width, generator=gen).to(slots)
            ids[slot] = float(slot + 7)
    params["experts"], params["expert_ids"] = slots, ids
    return params


@pytest.mark.parametrize("present", [[True, True, True], [True, False, True], [False] * 3])
@pytest.mark.parametrize("gating_dim", [128, 16])
def test_logits_are_the_references_gate_over_the_present_experts(tiny_tower, present, gating_dim):
    opts = {"num_experts": 4, "lam": 0.3, "heads": 4, "gating_dim": gating_dim, "scaling": 7.0}
    method = method_from_name("pfedmoap", opts)
    gen = torch.Generator().manual_seed(0)
    params, consts = method.init(InitContext(tiny_tower, gen))
    params = with_experts(method, params, tiny_tower, gen, present)
    ctx = EncodeContext(tiny_tower, torch.tensor([0, 2, 3, 5]), consts)
    images = torch.randn(5, tiny_tower.feature_dim, generator=gen)
    step, aux = method.step_params(params, gen)
    encoded = method.encode(step, aux, ctx)
    got = method.logits(encoded, images, None, ctx)
    stride = max(1, tiny_tower.feature_dim // gating_dim)  # 64 // 16 = 4, as 512 // 128
    assert params["gate.wq"].shape == (math.ceil(tiny_tower.feature_dim / stride),) * 2
    experts = [params["experts"][i] for i, on in enumerate(present) if on]
    gate = gate_from(params, heads=4, scaling=7.0)
    want = reference_logits(
        tiny_tower, params["prompt"], experts, images, ctx.class_idx, gate, 0.3, stride
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    one = [method.logits(encoded, x, None, ctx) for x in images]  # one image [D] at a time
    torch.testing.assert_close(torch.stack(one), got, rtol=1e-5, atol=1e-5)
    if not any(present):  # before any expert: the CoOp prompt's own logits, not lambda times
        coop = method_from_name("promptfl")
        plain = coop.logits(coop.encode({"prompt": params["prompt"]}, {}, ctx), images, None, ctx)
        torch.testing.assert_close(got, plain)


def test_per_sample_gradients_of_prompt_and_gate_equal_a_backward_per_sample_in_float64(
    tiny_model,
):
    model, tokenizer = tiny_model
    names = ["red circle", "dark blue square", "green triangle", "yellow star"]
    tower = TextTower.build(copy.deepcopy(model).double(), tokenizer, names, n_ctx=4)
    opts = {"num_experts": 3, "heads": 4, "gating_dim": 16}
    method = method_from_name("pfedmoap", opts)
    gen = torch.Generator().manual_seed(0)
    params, consts = method.init(InitContext(tower, gen))
    params = {k: v.double() for k, v in params.items()}
    params = with_experts(method, params, tower, gen, [True, False])
    step, aux = method.step_params(params, gen)
    images = torch.randn(5, tower.feature_dim, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 3, 1, 1, 2])
    ctx = EncodeContext(tower, torch.arange(4), consts)

    def encode(p: dict[str, Tensor]) -> object:
        return method.encode(p, aux, ctx)

    def loss_one(z, x, t, y):
        return method.sample_loss(z, x, t, y, ctx)

    batch = (images, images.new_zeros(5, 0), labels)
    got = step_gradients(encode, loss_one, step, batch, per_sample=True)
    assert set(got.data) == set(step) and len(step) == 9  # the prompt and 8 gate tensors
    for i in range(len(labels)):  # the reference's loss, one sample, one ordinary backward
        prompt = step["prompt"].clone().requires_grad_(True)
        gate = gate_from(step, heads=4, scaling=10.0)
        logits = reference_logits(
            tower, prompt, [params["experts"][0]], images[i : i + 1], ctx.class_idx, gate, 0.5, 4
        )
        F.cross_entropy(logits, labels[i : i + 1]).backward()
        want = {"prompt": prompt.grad}
        for name in ("q", "k", "v", "o"):
            layer = getattr(gate, f"W_{name}")
            want[f"gate.w{name}"], want[f"gate.b{name}"] = layer.weight.grad, layer.bias.grad
        for k, grad in want.items():
            torch.testing.assert_close(got.data[k][i], grad, rtol=1e-9, atol=1e-11)
            # every tensor learns but b_k (it shifts all of a head's scores alike: softmax),
            # b_v and b_o (they shift every class's logit alike: cross-entropy)
            assert (grad.abs().max() > 1e-8) == (k not in SHIFTS), k


def prompts(*values: float) -> list[Tensor]:
    return [torch.full((2, 3), v) for v in values]


def sent(client: int, weight: float, prompt: Tensor) -> dict[str, Tensor]:
    scheme = PFedMoAP(lam=0.5, num_experts=3, heads=1, gating_dim=128, scaling=10.0)
    done = RoundEnd(start={}, end={"prompt": prompt}, steps=1, lr=0.1, client=client, weight=weight)
    state, message = scheme.client_round_end(done, {}, {})
    assert state == {} and set(message) == {"client", "weight", "prompt"}  # no gate goes up
    return message


def test_server_pools_the_uploads_and_averages_them_by_sample_count():
    scheme = PFedMoAP(lam=0.5, num_experts=3, heads=1, gating_dim=128, scaling=10.0)
    p = prompts(1.0, 2.0, 4.0)
    server = scheme.server_round_end({}, [sent(0, 1.0, p[0]), sent(2, 3.0, p[1])], n_clients=4)
    torch.testing.assert_close(server["global"], (1.0 * p[0] + 3.0 * p[1]) / 4.0)
    assert torch.equal(server["uploaded"], torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert torch.equal(server["pool"][2], p[1]) and torch.equal(
        server["pool"][1], torch.zeros(2, 3)
    )
    # the next round's clients overwrite their entries; pbar is over this round's alone
    later = scheme.server_round_end(server, [sent(2, 1.0, p[2])], n_clients=4)
    assert torch.equal(later["pool"][2], p[2]) and torch.equal(later["pool"][0], p[0])
    assert torch.equal(later["global"], p[2])
    assert torch.equal(server["pool"][2], p[1])  # the old state is not changed in place


def test_download_sets_pbar_and_the_k_nearest_other_clients_prompts():
    scheme = PFedMoAP(lam=0.5, num_experts=3, heads=1, gating_dim=128, scaling=10.0)  # K = 2
    client = {
        "prompt": torch.zeros(2, 3),
        "experts": torch.zeros(2, 2, 3),
        "expert_ids": torch.full((2,), -1.0),
    }
    assert scheme.round_download(0, client, {}, {}) == client  # before any upload: unchanged
    p = prompts(0.0, 5.0, 1.0, 0.5, -3.0)  # distances from client 0: 5, 1, 0.5, 3 (x sqrt 6)
    server = scheme.server_round_end({}, [sent(i, 1.0, p[i]) for i in range(4)], n_clients=5)
    out = scheme.round_download(0, client, {}, server)
    assert torch.equal(out["prompt"], server["global"])
    assert out["expert_ids"].tolist() == [3.0, 2.0]  # the two nearest, never itself
    assert torch.equal(out["experts"], torch.stack([p[3], p[2]]))
    # client 4 has not uploaded yet: pbar, but no experts (its first participation)
    first = scheme.round_download(4, client, {}, server)
    assert torch.equal(first["prompt"], server["global"])
    assert first["expert_ids"].tolist() == [-1.0, -1.0] and not first["experts"].any()
    # fewer uploaded others than K: all of them, the rest of the slots empty
    two = scheme.server_round_end({}, [sent(1, 1.0, p[1]), sent(3, 1.0, p[3])], n_clients=5)
    out = scheme.round_download(1, client, {}, two)
    assert out["expert_ids"].tolist() == [3.0, -1.0] and torch.equal(out["experts"][0], p[3])


def two_client_run(tower, fed, **kw):
    sched = Schedule(rounds=3, batch_size=8, lr=0.1)
    method = method_from_name("pfedmoap", {"heads": 4})
    return FederatedRun(method, tower, fed, schedule=sched, seed=0, **kw)


def test_driver_rounds_follow_the_algorithm(tiny_tower, monkeypatch):
    fed = make_federation(tiny_tower)
    run = two_client_run(tiny_tower, fed)
    base = {k: v.clone() for k, v in run.clients[0].params.items()}
    downloads: list[tuple[int, dict[str, Tensor]]] = []
    real = PFedMoAP.round_download

    def recording(self, client, params, state, server):
        out = real(self, client, params, state, server)
        downloads.append((client, {k: v.clone() for k, v in out.items()}))
        return out

    monkeypatch.setattr(PFedMoAP, "round_download", recording)
    run.run_round(0)
    # round 1: both start from the common prompt with no expert: the gate gets no gradient
    assert all(torch.equal(d["prompt"], base["prompt"]) for _, d in downloads)
    trained = [run.clients[c].params["prompt"].clone() for c in range(2)]
    for c in range(2):
        assert torch.equal(run.server_state["pool"][c], trained[c])
        assert torch.equal(run.clients[c].params["gate.wq"], base["gate.wq"])
    n = torch.tensor(run.n_train, dtype=torch.float32)
    pbar = (n[0] * trained[0] + n[1] * trained[1]) / n.sum()
    torch.testing.assert_close(run.server_state["global"], pbar)
    downloads.clear()
    run.run_round(1)
    # round 2: each starts from pbar with the other client's round-1 prompt as its expert
    for c, d in downloads:
        torch.testing.assert_close(d["prompt"], pbar)
        assert d["expert_ids"].tolist()[:1] == [float(1 - c)]
        assert (d["expert_ids"][1:] == -1).all()
        assert torch.equal(d["experts"][0], trained[1 - c])
        assert not torch.equal(run.clients[c].params["gate.wq"], base["gate.wq"])  # trained
    # evaluation scores each client's own trained prompt, not pbar
    view = run.view(0, evaluation=True)
    assert torch.equal(view["prompt"], run.clients[0].params["prompt"])
    assert not torch.equal(view["prompt"], run.server_state["global"])


def test_state_survives_a_checkpoint(tiny_tower):
    fed = make_federation(tiny_tower)
    whole = two_client_run(tiny_tower, fed)
    whole.run_round(0)
    whole.run_round(1)
    saved = copy.deepcopy(whole.state_dict())  # as torch.save would (momentum is in place)
    whole.run_round(2)
    resumed = two_client_run(tiny_tower, fed)
    resumed.load_state_dict(saved)
    resumed.run_round(2)
    for a, b in zip(resumed.clients, whole.clients, strict=True):
        assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    assert all(
        torch.equal(resumed.server_state[k], whole.server_state[k]) for k in saved["server_state"]
    )


def test_private_prompts_are_noised_by_each_client_under_both_trust_models(tiny_tower):
    fed = make_federation(tiny_tower)
    runs = {}
    for trust in ("server", "client"):
        run = two_client_run(tiny_tower, fed, trust=trust)
        run.enable_privacy(NoisePlan(noise_multiplier=1.0, clip_norm=1.0))
        runs[trust] = run
    fedavg = FederatedRun(
        method_from_name("promptfl"), tiny_tower, fed, schedule=runs["server"].sched, seed=0
    )
    fedavg.enable_privacy(NoisePlan(noise_multiplier=1.0, clip_norm=1.0))
    step_names = (
        "prompt",
        *(f"gate.{p}" for p in ("wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo")),
    )
    for run in runs.values():
        # nothing is aggregated under the server's noise: no prompt can hide in a sum
        assert run.server == {} and run.method.shared == ()
        assert run.placement.sync == "round" and run.placement.server == ()
        assert set(run.placement.client) == set(step_names)
        assert run.budget() == fedavg.budget()  # the same noisy steps: the same epsilon
    for rnd in range(2):
        for run in runs.values():
            run.run_round(rnd)
    a, b = runs["server"], runs["client"]
    for c in range(2):  # the two trust models are one run
        assert all(torch.equal(a.clients[c].params[k], b.clients[c].params[k]) for k in step_names)
        # the pool holds exactly what each client released: its noised, trained prompt
        assert torch.equal(a.server_state["pool"][c], a.clients[c].params["prompt"])
    # ... and the expert a client trained with in round 2 is the other's released round-1 prompt
    assert a.clients[0].params["expert_ids"][0] == 1.0


def test_pairs():
    scheme = SCHEMES.get("pfedmoap")
    for ok in ("coop", "kgcoop"):
        assert pair_problem(LEARNERS.get(ok), scheme) is None
    for name, why in [
        ("cocoop", "builds per image"),
        ("ot", "patch tokens"),
        ("plot", "prompt components of its own"),
        ("prograd", "its own sample_losses"),
        ("proda", "prompt components of its own"),
    ]:
        problem = pair_problem(LEARNERS.get(name), scheme)
        assert problem is not None and why in problem, (name, problem)


def test_a_gate_whose_heads_do_not_divide_its_width_is_refused(tiny_tower):
    from fpl_bench.errors import UsageError

    method = method_from_name("pfedmoap", {"heads": 3})  # the tiny gate is 64 wide
    with pytest.raises(UsageError, match="does not divide the gate's width 64"):
        method.init(InitContext(tiny_tower, torch.Generator().manual_seed(0)))
