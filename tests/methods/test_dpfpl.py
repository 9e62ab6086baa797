"""DP-FPL: the factorization, Eq. 4 with the paper's sign, and what is privatized where."""

import torch

from fpl_bench.learners._base import EncodeContext, InitContext
from fpl_bench.learners.coop import CoOp
from fpl_bench.method import Method
from fpl_bench.privacy.placement import place_noise
from fpl_bench.schemes.dpfpl import DPFPL, low_rank_gradient, orthonormal_columns, power_factorize


def test_power_factorize_is_exact_with_residual_and_orthonormal():
    p = torch.randn(16, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    u, v, r = power_factorize(p, rank=4, generator=torch.Generator().manual_seed(1))
    assert u.shape == (16, 4) and v.shape == (4, 64)
    torch.testing.assert_close(u @ v + r, p)
    torch.testing.assert_close(u.T @ u, torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(v @ v.T, torch.eye(4, dtype=torch.float64))


def test_orthonormal_columns_matches_gram_schmidt():
    m = torch.tensor([[3.0, 1.0], [4.0, 2.0]])
    q = orthonormal_columns(m)
    torch.testing.assert_close(q[:, 0], torch.tensor([0.6, 0.8]))  # first column normalised
    torch.testing.assert_close(q[:, 1], torch.tensor([-0.8, 0.6]))  # remainder, positive R diag


def test_eq4_has_the_papers_minus_sign():
    """grad p_L = gu v + u gv - u u^T gu v (the reference code adds the last term)."""
    u = torch.tensor([[1.0], [0.0]])
    v = torch.tensor([[0.0, 1.0, 0.0]])
    gu = torch.tensor([[2.0], [3.0]])
    gv = torch.tensor([[1.0, 1.0, 1.0]])
    # gu v = [[0,2,0],[0,3,0]]; u gv = [[1,1,1],[0,0,0]]; u u^T gu v = [[0,2,0],[0,0,0]]
    expected = torch.tensor([[1.0, 1.0, 1.0], [0.0, 3.0, 0.0]])
    torch.testing.assert_close(low_rank_gradient(u, v, gu, gv), expected)


def test_prompt_equals_global_plus_local_and_no_residual_drops_it(tiny_tower):
    method = DPFPL(rank=2, residual=True)
    params = method.init_params(
        InitContext(tower=tiny_tower, generator=torch.Generator().manual_seed(0)), CoOp()
    )
    step, aux = method.step_params(params, torch.Generator().manual_seed(3))
    (prompt,) = method.prompts(step, aux)
    torch.testing.assert_close(prompt, params["p_global"] + params["p_local"])
    lora = DPFPL(rank=2, residual=False)
    step2, aux2 = lora.step_params(params, torch.Generator().manual_seed(3))
    (prompt2,) = lora.prompts(step2, aux2)
    torch.testing.assert_close(prompt2, params["p_global"] + step2["u"] @ step2["v"])


def test_server_trust_noises_global_at_the_server_and_factors_at_the_client():
    assert DPFPL.sync == "step" and DPFPL.shared == ("p_global",)
    steps = ["p_global", "u", "v"]
    server = place_noise(
        step_names=steps, shared=DPFPL.shared, scheme_sync="step", trust="server", private=True
    )
    assert server.server == ("p_global",) and set(server.client) == {"u", "v"}
    client = place_noise(
        step_names=steps, shared=DPFPL.shared, scheme_sync="step", trust="client", private=True
    )
    assert client.server == () and set(client.client) == {"p_global", "u", "v"}


def test_param_grads_maps_factor_grads_to_p_local(tiny_tower):
    method = DPFPL(rank=2, residual=True)
    params = method.init_params(
        InitContext(tower=tiny_tower, generator=torch.Generator().manual_seed(0)), CoOp()
    )
    step, _ = method.step_params(params, torch.Generator().manual_seed(3))
    gu, gv = torch.randn_like(step["u"]), torch.randn_like(step["v"])
    out = method.param_grads(params, step, {"u": gu, "v": gv})
    assert set(out) == {"p_local"}
    torch.testing.assert_close(out["p_local"], low_rank_gradient(step["u"], step["v"], gu, gv))
    ctx = EncodeContext(tower=tiny_tower, class_idx=torch.arange(tiny_tower.n_classes))
    pair = Method(label="dpfpl", learner=CoOp(), scheme=method)
    feats = pair.encode(step, {"r": torch.zeros_like(params["p_local"])}, ctx)
    assert feats["text"].shape == (1, tiny_tower.n_classes, 64)
