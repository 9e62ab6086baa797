"""pFedMoAP (Luo, Chen, Wu, "Mixture of Experts Made Personalized: Federated Prompt Learning
for Vision-Language Models", ICLR 2025, arXiv:2410.10114; reference ljaiverson/pFedMoAP
`trainers/pfedmoap.py` and `federated_main.py`, read from the fork shabika0A/pFedMoAP and from
the port Yuqin-G/PMFLT `model/pFedMoAP.py`, `federated/server_pfedmoap.py`).

Each client i holds a local prompt p_i and a personal attention gate G_i; the server keeps a
pool of the clients' last uploaded (pre-aggregation) prompts. A round, in call order:

    download (round_download)  p_i <- pbar = sum_j n_j p_j / sum_j n_j over the previous
                               round's clients (FedAvg; round 1: the common initial prompt);
                               experts E_i = the K = num_experts - 1 pool prompts nearest to
                               client i's own last upload, ||p_j - p_i||_F, j != i (all of
                               them when at most K; none on a client's first participation)
    local steps                train p_i and G_i on the loss below (the experts are frozen)
    upload (client_round_end)  the trained p_i; the server stores pool[i] = p_i and averages
                               the round's uploads into pbar (server_round_end)

Scoring (`logits`): x^ = x / ||x|| the image feature, t_{e,c} the L2-normalised text feature of
class c under prompt e (e = 0: the local prompt, 1..K: the experts), s the logit scale and
pool(v) = v[::r] every r-th coordinate, r = D // gating_dim (reference: 512 // 128 = 4):

    local_c = s <x^, t_{0,c}>
    q = W_q pool(x^) + b_q,  k_{e,c} = W_k pool(t_{e,c}) + b_k,  v_{e,c} = W_v pool(t_{e,c}) + b_v
    a^h_{c,e} = softmax_e( scaling <q^h, k^h_{e,c}> )       (per head h; scaling 10, not
                                                             1 / sqrt(d_h), as the reference)
    o_c = W_o concat_h( sum_e a^h_{c,e} v^h_{e,c} ) + b_o
    logit_c = lambda local_c + s <pool(x^), o_c>             (with at least one expert)
    logit_c = local_c                                       (without: a first participation)

with per-sample cross-entropy. As the reference: the gate's keys include the local prompt's
features (with gradient), the experts' features carry none, the gate reads the pooled
normalised features without renormalising them, and dropout is declared but never applied.
(b_k, b_v and b_o shift all of a head's scores, or every class's logit, alike: they get no
gradient, in the reference as here.)

Where fpl-bench departs from the reference code (the paper's algorithm is followed in each):
- the experts a client trains with are chosen when its round starts, from the pool of earlier
  rounds; the reference's sequential loop lets a client pick prompts uploaded earlier in the
  same round by clients simulated before it;
- the gate trains with the prompt's SGD and learning rate (the reference gives it a second
  optimizer, OPTIMGATING; the PMFLT port freezes it, which leaves the mixture untrained);
- a client not sampled yet keeps the common initial prompt, and a client keeps the experts of
  its last round until it is sampled again (the reference evaluates such clients with the
  global prompt and re-selects their experts at evaluation): the same under full
  participation, the default.

Privacy: what crosses the wire. Up, at a round's end: each sampled client's trained prompt
p_i. Down, at a round's start: pbar and the experts p_j, which are OTHER clients' own prompts,
not an aggregate. The gate never leaves its client. So no client's prompt can hide inside a
sum that a trusted server noises: `shared` is empty and, under DP, every parameter gets its
DP-SGD noise from its own client under either trust model (privacy/placement.py, trust
"server" or "client": the same run). Each uploaded p_i is then the output of client i's
noised steps; the pool, pbar, the nearest-neighbour choice (distances between released
prompts) and every expert a client downloads are post-processing of released values and cost
no budget. The per-sample gradients of p_i and G_i are exact through the gate
(tests/test_pfedmoap.py, float64). Before a client's first expert its gate's gradient is zero,
and under DP the gate still gets its noise, as every trained parameter does.

Cost: each local step encodes the K expert prompts too, in a forward of their own without
gradient (no backward rows, so a private step's per-sample backward is CoOp's). Measured with
`fpl-bench bench` on the embedded default (10 clients, a loaded 2-core machine, 2026-12-07): a
round 2.3 s without DP (CoOp 0.44 s), 5.7 s at eps 0.5 (CoOp 4.1 s).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from fpl_bench.learners._base import InitContext, Params, PromptLearner, linear_init
from fpl_bench.schemes import SCHEMES
from fpl_bench.schemes._base import RoundEnd, Scheme

GATE = ("wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo")  # W_q, b_q, ..., W_o, b_o


def gate_key(part: str) -> str:
    """The stored parameter holding one tensor of the attention gate."""
    return f"gate.{part}"


def pool_stride(feature_dim: int, gating_dim: int) -> int:
    """r, the reference's `reduce_times`: D // gating_dim, at least 1."""
    return max(1, feature_dim // gating_dim)


def gate_width(feature_dim: int, gating_dim: int) -> int:
    """d, the width of pool(v) = v[::r] for v of width D."""
    return math.ceil(feature_dim / pool_stride(feature_dim, gating_dim))


def attention_gate(
    query: Tensor,
    keys: Tensor,
    present: Tensor,
    gate: Mapping[str, Tensor],
    *,
    heads: int,
    scaling: float,
) -> Tensor:
    """o [B, n, d]: multi-head attention of each image's pooled feature query [B, d] over the
    experts' pooled class features keys [E, n, d] (keys = values), class by class; experts
    with present[e] False get no weight (present [E] bool, present[0], the local prompt, True).
    """
    width = query.shape[-1]
    q = (query @ gate["wq"].T + gate["bq"]).unflatten(-1, (heads, width // heads))  # [B,H,dh]
    k = (keys @ gate["wk"].T + gate["bk"]).unflatten(-1, (heads, width // heads))  # [E,n,H,dh]
    v = (keys @ gate["wv"].T + gate["bv"]).unflatten(-1, (heads, width // heads))
    scores = scaling * torch.einsum("bhk,enhk->bnhe", q, k)  # [B, n, H, E]
    scores = torch.where(present, scores, torch.full_like(scores, float("-inf")))
    mixed = torch.einsum("bnhe,enhk->bnhk", scores.softmax(-1), v).flatten(-2)  # [B, n, d]
    return mixed @ gate["wo"].T + gate["bo"]


@SCHEMES.register("pfedmoap")
@dataclass(frozen=True)
class PFedMoAP(Scheme):
    """A FedAvg-initialised local prompt per client, mixed with K downloaded expert prompts
    by the client's attention gate."""

    lam: float  # lambda, the weight of the local prompt's own logits
    num_experts: int  # K + 1: the local prompt and at most K downloaded ones
    heads: int  # attention heads of the gate
    gating_dim: int  # the gate's width at D = 512 (reference 128); stride r = D // gating_dim
    scaling: float  # multiplies the attention scores (reference 10)

    scores: ClassVar[bool] = True

    @property
    def n_experts(self) -> int:
        """K, the expert slots a client holds (unused ones have id -1)."""
        return self.num_experts - 1

    def check(self, init: InitContext) -> None:
        from fpl_bench.errors import UsageError

        width = gate_width(init.tower.feature_dim, self.gating_dim)
        if width % self.heads:
            raise UsageError(
                f"pfedmoap.heads={self.heads} does not divide the gate's width {width} "
                f"(features of width {init.tower.feature_dim} taken every "
                f"{pool_stride(init.tower.feature_dim, self.gating_dim)}); choose heads "
                f"dividing {width}"
            )

    def init_params(self, init: InitContext, learner: PromptLearner) -> Params:
        tower = init.tower
        width = gate_width(tower.feature_dim, self.gating_dim)
        params = {"prompt": learner.init_prompt(init)}  # [n_ctx, W]
        for name in ("q", "k", "v", "o"):  # torch.nn.Linear(d, d)'s initialisation
            weight, bias = linear_init(width, width, init.generator)
            params[gate_key(f"w{name}")], params[gate_key(f"b{name}")] = weight, bias
        params["experts"] = torch.zeros(self.n_experts, tower.n_ctx, tower.width)
        params["expert_ids"] = torch.full((self.n_experts,), -1.0)  # pool index, -1: empty
        return params

    def step_params(
        self, params: Mapping[str, Tensor], generator: torch.Generator
    ) -> tuple[Params, Params]:
        """Trained: the prompt and the gate. Constants: the experts and their ids."""
        step = {"prompt": params["prompt"], **{gate_key(p): params[gate_key(p)] for p in GATE}}
        return step, {"experts": params["experts"], "expert_ids": params["expert_ids"]}

    def prompts(self, step: Mapping[str, Tensor], aux: Mapping[str, Tensor]) -> Tensor:
        return step["prompt"].unsqueeze(0)  # [1, n_ctx, W]

    def fixed_prompts(self, aux: Mapping[str, Tensor]) -> Tensor:
        return aux["experts"]  # [K, n_ctx, W]

    def score_inputs(self, step: Mapping[str, Tensor], aux: Mapping[str, Tensor]) -> Params:
        return {**{p: step[gate_key(p)] for p in GATE}, "expert_ids": aux["expert_ids"]}

    def logits(self, encoded: Mapping[str, Any], images: Tensor, logit_scale: float) -> Tensor:
        """lambda local + s <pool(x^), o> with experts, local alone without (module doc)."""
        x = F.normalize(images, dim=-1)
        single = x.dim() == 1
        x = x.unsqueeze(0) if single else x  # [B, D]
        local_text = encoded["text"][0]  # [n, D]
        local = logit_scale * x @ local_text.T  # [B, n]
        inputs = encoded["scheme"]
        on = inputs["expert_ids"] >= 0  # [K]
        present = torch.cat([torch.ones_like(on[:1]), on])  # [1 + K]
        stride = pool_stride(x.shape[-1], self.gating_dim)
        keys = torch.cat([local_text.unsqueeze(0), encoded["fixed"]])[..., ::stride]
        query = x[..., ::stride]  # [B, d]
        mixed = attention_gate(
            query, keys, present, inputs, heads=self.heads, scaling=self.scaling
        )  # [B, n, d]
        moe = logit_scale * torch.einsum("bd,bnd->bn", query, mixed)
        out = torch.where(on.any(), self.lam * local + moe, local)
        return out[0] if single else out

    # -- the pool of prompts: the server's state ------------------------------------------------
    def client_round_end(
        self, done: RoundEnd, state: Mapping[str, Tensor], server: Mapping[str, Tensor]
    ) -> tuple[Params, Params]:
        """Upload the trained prompt with the client's id and FedAvg weight."""
        prompt = done.end["prompt"]
        sent = {
            "client": torch.tensor(float(done.client), device=prompt.device),
            "weight": torch.tensor(done.weight, device=prompt.device),
            "prompt": prompt.clone(),
        }
        return dict(state), sent

    def server_round_end(
        self, server: Mapping[str, Tensor], sent: Sequence[Mapping[str, Tensor]], n_clients: int
    ) -> Params:
        """pool[i] = p_i for the round's clients; pbar = their FedAvg (weights n_i)."""
        if not sent:
            return dict(server)
        shape = sent[0]["prompt"].shape
        pool = server.get("pool")
        uploaded = server.get("uploaded")
        if pool is None or uploaded is None:
            pool = sent[0]["prompt"].new_zeros(n_clients, *shape)
            uploaded = sent[0]["prompt"].new_zeros(n_clients)
        pool, uploaded = pool.clone(), uploaded.clone()
        for message in sent:
            i = int(message["client"])
            pool[i], uploaded[i] = message["prompt"], 1.0
        weights = torch.stack([m["weight"] for m in sent])
        prompts = torch.stack([m["prompt"] for m in sent])
        mean = (weights.reshape(-1, *([1] * len(shape))) * prompts).sum(0) / weights.sum()
        return {"pool": pool, "uploaded": uploaded, "global": mean}

    def round_download(
        self,
        client: int,
        params: Mapping[str, Tensor],
        state: Mapping[str, Tensor],
        server: Mapping[str, Tensor],
    ) -> Params:
        """p_i <- pbar; the K pool prompts nearest client i's last upload as its experts."""
        out = dict(params)
        if "global" not in server:  # the first round: everyone's common initial prompt
            return out
        out["prompt"] = server["global"].clone()
        pool, uploaded = server["pool"], server["uploaded"] > 0
        experts = torch.zeros_like(params["experts"])
        ids = torch.full_like(params["expert_ids"], -1.0)
        if bool(uploaded[client]):  # not on a client's first participation
            others = uploaded.clone()
            others[client] = False
            dist = (pool - pool[client]).flatten(1).norm(dim=1)
            dist = torch.where(others, dist, torch.full_like(dist, math.inf))
            take = min(self.n_experts, int(others.sum()))
            chosen = torch.argsort(dist, stable=True)[:take]
            experts[:take] = pool[chosen]
            ids[:take] = chosen.to(ids.dtype)
        out["experts"], out["expert_ids"] = experts, ids
        return out
