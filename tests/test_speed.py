"""The speed paths compute the same thing as the plain ones: shared-prefix tower = open_clip's
modules, batched clients = clients one by one, vmapped per-sample gradients = one backward per
sample, bf16 = fp32 within a stated bound; no host sync per local step; threads by size."""

import math

import pytest
import torch
import torch.nn.functional as F

from fpl_bench.compute import PARALLEL_FLOPS, pick_threads, resolve_precision
from fpl_bench.driver import Compute, FederatedRun, NoisePlan, Schedule
from fpl_bench.method import method_from_name
from fpl_bench.privacy.per_sample import (
    client_step_gradients,
    encode_once,
    step_gradients,
)
from fpl_bench.text_tower import TextTower
from fpl_bench.text_tower.shared_prefix import exact_gelu
from tests.test_driver import make_federation

PRESETS = ["coop", "kgcoop", "promptfl", "fedprox", "fedotp", "fedpgp", "dpfpl"]
NAMES = ["red circle", "dark blue square", "green triangle", "yellow star"]


def _options(name: str) -> dict:
    return {"rank": 2} if name in ("dpfpl", "fedpgp") else {}


# Tolerances in units of the dtype's epsilon (machine rounding), not absolute numbers: the vector
# unit (AVX2, AVX-512, AMX; ATEN_CPU_CAPABILITY) changes how sums are ordered and rounded, never
# by more than a few ulps per op. Measured on AVX-512, AVX2 and default: the tiny tower's
# features within 2 eps (float32), a 2-round run's parameters within 16 eps (relative).
F32 = torch.finfo(torch.float32).eps
ENCODED = 32 * F32  # features of one forward, two compute paths (rtol and atol)
TRAINED = 128 * F32  # relative error of gradients and of parameters after a short run


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_shared_prefix_encode_equals_open_clip_modules(tiny_model):
    model, tokenizer = tiny_model
    fast = TextTower.build(model, tokenizer, NAMES, n_ctx=4)
    slow = fast.with_options(share_prefix=False)
    assert fast.share_prefix and not slow.share_prefix
    ctx = 0.1 * torch.randn(2, 3, 4, fast.width, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fast.encode(ctx), slow.encode(ctx), rtol=ENCODED, atol=ENCODED)
    subset = torch.tensor([3, 1])
    torch.testing.assert_close(
        fast.encode(ctx[1, 2], subset), slow.encode(ctx[1, 2], subset), rtol=ENCODED, atol=ENCODED
    )


def test_shared_prefix_gradients_equal_open_clip_modules(tiny_model):
    model, tokenizer = tiny_model
    fast = TextTower.build(model, tokenizer, NAMES, n_ctx=4)
    slow = TextTower.build(model, tokenizer, NAMES, n_ctx=4, truncate=False, share_prefix=False)
    g = torch.Generator().manual_seed(1)
    ctx = 0.1 * torch.randn(4, fast.width, generator=g)
    cot = torch.randn(len(NAMES), fast.encode(ctx).shape[-1], generator=g)
    grads = []
    for tower in (fast, slow):
        leaf = ctx.clone().requires_grad_()
        (tower.encode(leaf) * cot).sum().backward()
        grads.append(leaf.grad)
    assert rel_err(grads[0], grads[1]) < TRAINED
    assert fast.rows(len(NAMES)) < slow.rows(len(NAMES))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_exact_gelu_has_gelu_values_and_derivative(dtype):
    """Value and derivative equal F.gelu's to a few ulps of the input's dtype (float64 is
    computed in float64, not rounded through float32; bf16 in float32, as F.gelu does)."""
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64).to(dtype).requires_grad_()
    y = x.detach().clone().requires_grad_()
    exact_gelu(x).sum().backward()
    F.gelu(y).sum().backward()
    assert exact_gelu(x.detach()).dtype == x.grad.dtype == dtype
    tol = 16 * torch.finfo(dtype).eps  # measured: within 6 eps (float32), 1 eps (float64)
    torch.testing.assert_close(exact_gelu(x.detach()), F.gelu(y.detach()), rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad, y.grad, rtol=tol, atol=tol)


def _trained(tower, fed, name: str, compute: Compute, *, private: bool) -> FederatedRun:
    """A 2-round run of preset `name` (DP with sigma = 1, C = 1 when `private`)."""
    run = FederatedRun(
        method_from_name(name, _options(name)),
        tower,
        fed,
        schedule=Schedule(rounds=2, batch_size=8, lr=0.1),
        seed=0,
        compute=compute,
    )
    if private:
        run.enable_privacy(NoisePlan(noise_multiplier=1.0, clip_norm=1.0))
    run.run()
    return run


@pytest.mark.parametrize("name", [*PRESETS, "pfedmoap", "fedpha"])
@pytest.mark.parametrize("private", [False, True])
def test_batched_clients_equal_clients_one_by_one(tiny_tower, name, private):
    """Final parameters of every client and of the server agree to float rounding."""
    fed = make_federation(tiny_tower)
    runs = []
    for compute in (
        Compute(batch_clients=True, group_elements=2**40),
        Compute(batch_clients=False),
    ):
        runs.append(_trained(tiny_tower, fed, name, compute, private=private))
    batched, sequential = runs
    for c in range(len(batched.clients)):
        a, b = batched.view(c, evaluation=True), sequential.view(c, evaluation=True)
        for key in b:
            assert rel_err(a[key], b[key]) < TRAINED, (c, key)


@pytest.mark.parametrize(
    ("name", "shared"), [("promptfl", True), ("fedprox", True), ("dpfpl", False)]
)
def test_clients_with_equal_step_params_share_one_forward(tiny_tower, monkeypatch, name, shared):
    """A private step one client at a time encodes a step's prompt once for all clients whose
    step parameters and aux are equal (the global prompt under step synchronisation); every
    parameter ends bit for bit as with one forward per client. DP-FPL's step parameters are
    per client (its local low-rank factors, from each client's own random stream): no sharing."""
    import fpl_bench.step_compute as step_compute

    fed = make_federation(tiny_tower)
    finals, forwards = [], []
    # one client at a time with client batching on (sharing), and off (the reference compute
    # pattern of bench.py: every client its own forward)
    for compute in (Compute(group_elements=1), Compute(batch_clients=False)):
        count = []

        def once(*args, count=count, **kwargs):
            count.append(1)
            return encode_once(*args, **kwargs)

        monkeypatch.setattr(step_compute, "encode_once", once)
        run = _trained(tiny_tower, fed, name, compute, private=True)
        finals.append([run.view(c, evaluation=True) for c in range(len(run.clients))])
        forwards.append(len(count))
    for a, b in zip(*finals, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    client_steps = sum(run.steps[c] for r in run.rounds_schedule for c in r)
    steps = sum(max(run.steps[c] for c in r) for r in run.rounds_schedule)
    assert forwards[1] == client_steps
    assert forwards[0] == (steps if shared else client_steps)


@pytest.mark.parametrize(
    ("name", "private", "shared"),
    [
        ("promptfl", False, True),
        ("fedkgcoop", False, True),
        ("dpfpl", False, False),
        ("promptfl", True, False),
    ],
)
def test_batched_steps_share_the_forward_of_equal_clients(
    tiny_tower, monkeypatch, name, private, shared
):
    """A non-private batched step encodes once when every client's step parameters and aux
    are equal: the first step of a round, where every client starts from the global prompt
    (later steps differ: these methods average once per round without DP). DP-FPL's step
    parameters hold per-client factors; a private step keeps one forward per client (sharing
    measured slower there). Numbers: test_batched_clients_equal_clients_one_by_one."""
    import fpl_bench.step_compute as step_compute

    calls: list[bool] = []

    def spy(*args, **kwargs):
        calls.append(kwargs["shared"])
        return client_step_gradients(*args, **kwargs)

    monkeypatch.setattr(step_compute, "client_step_gradients", spy)
    run = _trained(tiny_tower, make_federation(tiny_tower), name, Compute(), private=private)
    steps = max(run.steps)
    assert len(calls) == steps * len(run.rounds_schedule) and steps > 1
    assert calls == [shared and s == 0 for _ in run.rounds_schedule for s in range(steps)]


def test_private_steps_on_cpu_batch_the_clients(tiny_tower):
    """On CPU a private step's clients go through one forward (their per-sample backward runs
    in chunks inside text_tower/backward.py), as non-private ones do; without client batching,
    one by one."""
    fed = make_federation(tiny_tower)
    for compute, groups in ((Compute(), [[0, 1]]), (Compute(batch_clients=False), [[0], [1]])):
        run = FederatedRun(
            method_from_name("coop", {}),
            tiny_tower,
            fed,
            schedule=Schedule(rounds=1, batch_size=1024),  # samples x rows x width > 2^20
            seed=0,
            compute=compute,
        )
        run.enable_privacy(NoisePlan(noise_multiplier=1.0, clip_norm=1.0))
        assert run.steps_computer.groups([0, 1]) == groups


def test_per_sample_loop_equals_vmapped_per_sample_gradients(tiny_tower):
    fed = make_federation(tiny_tower)
    finals = []
    for compute in (Compute(per_sample_loop=True), Compute()):
        run = FederatedRun(
            method_from_name("dpfpl", {"rank": 2}),
            tiny_tower,
            fed,
            schedule=Schedule(rounds=1, batch_size=8, lr=0.1),
            seed=0,
            compute=compute,
        )
        run.enable_privacy(NoisePlan(noise_multiplier=1.0, clip_norm=1.0))
        run.run_round(0)
        finals.append(run.view(0, evaluation=True))
    for key in finals[0]:
        assert rel_err(finals[0][key], finals[1][key]) < TRAINED, key


def _toy_case(n_cls: int = 5, width: int = 8):
    g = torch.Generator().manual_seed(3)
    proj = torch.randn(width, width, generator=g, dtype=torch.float64)
    classes = torch.randn(n_cls, width, generator=g, dtype=torch.float64)

    def encode(p, extra):
        return torch.tanh((classes + p["ctx"].sum(0) + extra["shift"]) @ proj)  # [n_cls, width]

    def sample_loss(z, x, y):
        return F.cross_entropy((F.normalize(x, dim=-1) @ z.T).unsqueeze(0), y.unsqueeze(0))

    def prior(z, p, extra):
        return 0.1 * (p["ctx"] ** 2).sum() + 0.01 * z.sum()

    return encode, sample_loss, prior, g


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("per_sample", [True, False])
def test_client_step_gradients_equal_step_gradients_per_client(per_sample, shared):
    """Unequal batches (one of them empty) padded and batched = each client on its own; with
    `shared` (equal params and extra, one forward for all clients) as well."""
    encode, sample_loss, prior, g = _toy_case()
    sizes = [3, 0, 5]
    width = max(sizes)
    params = {"ctx": torch.randn(3, 2, 8, generator=g, dtype=torch.float64)}
    extra = {"shift": torch.randn(3, 8, generator=g, dtype=torch.float64)}
    if shared:
        params = {"ctx": params["ctx"][:1].repeat(3, 1, 1)}
        extra = {"shift": extra["shift"][:1].repeat(3, 1)}
    images = torch.randn(3, width, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (3, width), generator=g)
    out = client_step_gradients(
        encode,
        sample_loss,
        params,
        extra,
        (images, labels),
        sizes,
        per_sample=per_sample,
        prior=prior,
        shared=shared,
    )
    for k, n in enumerate(sizes):
        e = {"shift": extra["shift"][k]}
        ref = step_gradients(
            lambda p, e=e: encode(p, e),
            sample_loss,
            {"ctx": params["ctx"][k]},
            (images[k, :n], labels[k, :n]),
            per_sample=per_sample,
            prior=lambda z, p, e=e: prior(z, p, e),
        )
        got = out.data["ctx"][k, :n] if per_sample else out.data["ctx"][k]
        torch.testing.assert_close(got, ref.data["ctx"])
        torch.testing.assert_close(out.losses[k, :n], ref.losses)
        if per_sample:
            assert torch.count_nonzero(out.data["ctx"][k, n:]) == 0  # padded rows
            torch.testing.assert_close(out.prior["ctx"][k], ref.prior["ctx"])


def test_bf16_per_sample_gradients_stay_close_to_fp32(tiny_model):
    """The accuracy cost of bf16 autocast on the frozen tower: per-sample prompt gradients
    within 12 bf16 eps (9.4%, Frobenius over the batch) and each norm within 32 bf16 eps (25%)
    of fp32 (measured on the tiny CLIP: 1.4-2.7% median per sample, 4-19% worst sample).
    Clipping, noise and updates stay fp32 (the gradients come back in fp32)."""
    model, tokenizer = tiny_model
    names = [*NAMES, "purple heart", "orange cross"]
    fp32 = TextTower.build(model, tokenizer, names, n_ctx=4)
    bf16 = fp32.with_options(precision="bf16")
    g = torch.Generator().manual_seed(0)
    ctx = 0.02 * torch.randn(4, fp32.width, generator=g)
    images = torch.randn(12, fp32.encode(ctx).shape[-1], generator=g)
    labels = torch.randint(0, len(names), (12,), generator=g)

    def loss(z, x, y):
        logits = fp32.logit_scale * F.normalize(x, dim=-1) @ z.T
        return F.cross_entropy(logits.unsqueeze(0), y.unsqueeze(0))

    grads = {}
    for label, tower in (("fp32", fp32), ("bf16", bf16)):
        grads[label] = step_gradients(
            lambda p, t=tower: t.encode(p["ctx"]),
            loss,
            {"ctx": ctx},
            (images, labels),
            per_sample=True,
        ).data
    a, b = grads["bf16"]["ctx"], grads["fp32"]["ctx"]
    assert a.dtype == torch.float32
    bf16_eps = torch.finfo(torch.bfloat16).eps  # 2**-7
    assert rel_err(a, b) < 12 * bf16_eps
    ratio = a.flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)
    assert float((ratio - 1).abs().max()) < 32 * bf16_eps


def test_step_loop_reads_no_tensor_values(tiny_tower, monkeypatch):
    """No host sync per local step: the number of tensor-to-Python reads in a round does not
    grow with the number of local steps (only the round's loss and finite check read)."""
    fed = make_federation(tiny_tower)
    counts = []
    for epochs in (1, 3):
        run = FederatedRun(
            method_from_name("promptfl"),
            tiny_tower,
            fed,
            schedule=Schedule(rounds=1, batch_size=8, lr=0.1, local_epochs=epochs),
            seed=0,
        )
        reads = []
        for attr in ("item", "__float__", "__bool__", "__int__", "tolist"):
            real = getattr(torch.Tensor, attr)

            def counted(self, *args, _real=real, _reads=reads, **kwargs):
                _reads.append(1)
                return _real(self, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, attr, counted)
        loss = run.run_round(0)
        monkeypatch.undo()
        counts.append(len(reads))
        assert math.isfinite(loss)
    assert counts[0] == counts[1]


def test_threads_by_work_size_and_idle_cores():
    assert pick_threads(PARALLEL_FLOPS / 10, cores=8, busy_elsewhere=0.0) == 1
    assert pick_threads(PARALLEL_FLOPS * 10, cores=8, busy_elsewhere=0.0) == 8
    assert pick_threads(PARALLEL_FLOPS * 10, cores=2, busy_elsewhere=1.0) == 1
    assert pick_threads(PARALLEL_FLOPS * 10, cores=2, busy_elsewhere=5.0) == 1


def test_auto_precision_is_bf16_only_where_native(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert resolve_precision("auto", cpu) == "bf16"


@pytest.mark.slow
def test_bench_measures_and_compares(tmp_path):
    """A tiny `fpl-bench bench --compare-reference` cell: every config measured, speedups
    relative to the fast config, JSON records with the documented fields."""
    import json

    from fpl_bench.bench import (
        Sizes,
        bench_backbone,
        contributions,
        reference_configs,
        run_bench,
        with_speedups,
        write_json,
    )

    device = torch.device("cpu")
    bench_backbone("embedded", device)  # the shipped weights load offline
    sizes = Sizes(samples_per_client=8, batch_size=4, local_epochs=1, n_ctx=4)
    records = run_bench(
        [method_from_name("promptfl")],
        backbones=["embedded"],
        eps_list=[None, 0.5],
        client_counts=[2],
        configs=reference_configs(),
        sizes=sizes,
        device=device,
        log=lambda _: None,
    )
    records = with_speedups(records)
    assert {r.config for r in records} >= {
        "fast",
        "reference",
        "per-sample-loop",
        "autograd-backward",
    }
    assert all(r.seconds_per_round > 0 and r.peak_mem_bytes > 0 for r in records)
    assert all(r.speedup is not None for r in records)
    rows = contributions(records)
    assert {row["eps"] for row in rows} == {None, 0.5}
    path = tmp_path / "bench.json"
    write_json(records, path)
    data = json.loads(path.read_text())
    assert set(data[0]) >= {
        "method",
        "eps",
        "clients",
        "backbone",
        "config",
        "seconds_per_round",
        "samples_per_second",
        "peak_mem_bytes",
        "speedup",
    }


def test_freed_tensor_memory_is_reused_without_page_faults():
    """retain_freed_memory: a 16 MB tensor allocated, touched and freed ten times faults its
    pages in once, not ten times (4096 faults each without it, on glibc's default mmap)."""
    import resource

    from fpl_bench.process import retain_freed_memory

    if not retain_freed_memory():
        pytest.skip("mallopt needs Linux with glibc")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # every page is touched, and counted, on this thread
    try:
        for _ in range(3):  # the heap grows to hold it
            torch.empty(4 << 20).fill_(1.0)
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        for _ in range(10):
            torch.empty(4 << 20).fill_(1.0)
        faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before
    finally:
        torch.set_num_threads(threads)
    assert faults < 1000


def test_exact_gelu_without_gradients_is_the_same_tensor() -> None:
    """Evaluation (gradients off) computes only exact_gelu's value: bit for bit the value with
    gradients on, in every dtype, and F.gelu's to float rounding."""
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = torch.randn(4096, generator=torch.Generator().manual_seed(0)).to(dtype) * 4
        x[:4] = torch.tensor([0.0, 30.0, -30.0, 1e-30])
        with_grad = exact_gelu(x.clone().requires_grad_(dtype != torch.bfloat16))
        with torch.no_grad():
            without = exact_gelu(x)
        assert torch.equal(with_grad.detach(), without)
        tol = 1e-12 if dtype == torch.float64 else 1e-5 if dtype == torch.float32 else 1e-2
        assert torch.allclose(without.double(), F.gelu(x.double()), atol=tol, rtol=tol)
