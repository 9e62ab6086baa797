"""CUDA against CPU on one seed, with bf16 tolerances (run by benchmarks/gpu_check.sh).

1. text features of the embedded tower: CUDA fp32 = CPU fp32 (1e-4), CUDA bf16 close (5e-2);
2. per-sample prompt gradients (DP): CUDA fp32 = CPU fp32 (1e-3), CUDA bf16 within 10%; the
   hand-written tower backward (text_tower/backward.py) = autograd's on CUDA (fp32 1e-4,
   bf16 5e-2);
3. two short runs (promptfl, dpfpl, no DP) on the same synthetic federation: the CUDA bf16
   parameter updates within 10% of the CPU fp32 ones; a DP round runs and stays finite;
4. host syncs inside the step loop: one round under torch.cuda.set_sync_debug_mode("warn"),
   counting the warnings per round for 1 and 3 local epochs (equal counts: none per step).

Prints one line per check and exits 1 when a check fails.
"""

from __future__ import annotations

import sys
import warnings

import torch
import torch.nn.functional as F

from fpl_bench.bench import Config, Sizes, bench_backbone, build_run
from fpl_bench.method import method_from_name
from fpl_bench.privacy.per_sample import step_gradients
from fpl_bench.text_tower import TextTower

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
FAILED: list[str] = []


def check(name: str, value: float, bound: float) -> None:
    ok = value < bound
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {value:.3g} (bound {bound:g})", flush=True)
    if not ok:
        FAILED.append(name)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def towers() -> dict[str, TextTower]:
    from fpl_bench.data.synthetic import CLASSNAMES

    out = {}
    for label, device, precision in (
        ("cpu32", CPU, "fp32"),
        ("cuda32", CUDA, "fp32"),
        ("cuda16", CUDA, "bf16"),
    ):
        bb = bench_backbone("embedded", device)
        out[label] = TextTower.build(
            bb.model, bb.tokenizer, CLASSNAMES[:32], n_ctx=16, precision=precision
        )
    out["cuda32-autograd"] = out["cuda32"].with_options(hand_backward=False)
    out["cuda16-autograd"] = out["cuda16"].with_options(hand_backward=False)
    return out


def check_tower_and_gradients() -> None:
    t = towers()
    g = torch.Generator().manual_seed(0)
    ctx = 0.02 * torch.randn(16, t["cpu32"].width, generator=g)
    feats = {k: tw.encode(ctx.to(tw.positional.device)) for k, tw in t.items()}
    check("features cuda fp32 vs cpu fp32", rel(feats["cuda32"], feats["cpu32"]), 1e-4)
    check("features cuda bf16 vs cpu fp32", rel(feats["cuda16"], feats["cpu32"]), 5e-2)
    images = torch.randn(32, feats["cpu32"].shape[-1], generator=g)
    labels = torch.randint(0, 32, (32,), generator=g)
    grads = {}
    for k, tw in t.items():
        dev = tw.positional.device

        def loss(z, x, y, scale=tw.logit_scale):
            logits = scale * F.normalize(x, dim=-1) @ z.T
            return F.cross_entropy(logits.unsqueeze(0), y.unsqueeze(0))

        grads[k] = step_gradients(
            lambda p, tw=tw: tw.encode(p["ctx"]),
            loss,
            {"ctx": ctx.to(dev)},
            (images.to(dev), labels.to(dev)),
            per_sample=True,
        ).data
    check(
        "per-sample grads cuda fp32 vs cpu fp32",
        rel(grads["cuda32"]["ctx"], grads["cpu32"]["ctx"]),
        1e-3,
    )
    check(
        "per-sample grads cuda bf16 vs cpu fp32",
        rel(grads["cuda16"]["ctx"], grads["cpu32"]["ctx"]),
        0.1,
    )
    for bits, bound in (("32", 1e-4), ("16", 5e-2)):  # the hand-written backward against autograd's
        check(
            f"per-sample grads cuda {'fp32' if bits == '32' else 'bf16'}: hand vs autograd",
            rel(grads[f"cuda{bits}"]["ctx"], grads[f"cuda{bits}-autograd"]["ctx"]),
            bound,
        )


def short_run(name: str, device: torch.device, *, eps: float | None, epochs: int = 1):
    method = method_from_name(name)
    bb = bench_backbone("embedded", device)
    sizes = Sizes(samples_per_client=64, local_epochs=epochs, rounds=2)
    return build_run(
        method,
        bb,
        clients=10,
        total_clients=10,
        eps=eps,
        config=Config(),
        sizes=sizes,
        device=device,
    )


def check_runs() -> None:
    for name in ("promptfl", "dpfpl"):
        finals = {}
        for label, device in (("cpu", CPU), ("cuda", CUDA)):
            run = short_run(name, device, eps=None)
            start = {k: v.clone() for k, v in run.view(0, evaluation=True).items()}
            for rnd in range(2):
                run.run_round(rnd)
            finals[label] = {
                k: (v - start[k]).cpu() for k, v in run.view(0, evaluation=True).items()
            }
        for key in finals["cpu"]:
            check(
                f"{name} 2 rounds: update of {key}, cuda ({run.tower.precision}) vs cpu fp32",
                rel(finals["cuda"][key], finals["cpu"][key]),
                0.1,
            )
        run = short_run(name, CUDA, eps=0.5)
        run.run_round(0)
        finite = all(bool(torch.isfinite(v).all()) for v in run.view(0, evaluation=True).values())
        check(f"{name} DP round on cuda is finite (0 = yes)", 0.0 if finite else 1.0, 0.5)


def count_syncs(name: str, eps: float | None, epochs: int) -> int:
    run = short_run(name, CUDA, eps=eps, epochs=epochs)
    run.run_round(0)  # warm-up
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run.run_round(1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def check_syncs() -> None:
    for name, eps in (("promptfl", None), ("promptfl", 0.5), ("dpfpl", 0.5)):
        one, three = count_syncs(name, eps, 1), count_syncs(name, eps, 3)
        label = "none" if eps is None else eps
        print(f"     host syncs per round, {name} eps {label}: {one} (1 epoch), {three} (3 epochs)")
        if name != "dpfpl":  # DP-FPL's factorization draws v0 on the host each step (schemes/)
            check(f"{name} eps {label}: syncs that grow with the local steps", three - one, 0.5)


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device visible")
        return 1
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    check_tower_and_gradients()
    check_runs()
    check_syncs()
    print("all checks passed" if not FAILED else f"{len(FAILED)} check(s) failed: {FAILED}")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
