"""The presets that each prove a seam (CoCoOp: a learner's own parameters and image-conditioned
text; MaPLe: image-side prompts; SCAFFOLD and FedAdam: scheme state and a server optimizer;
central: pooled data) and the methods built on those seams since run by name through the CLI,
without DP and at eps 2 under both trust models, each private run spending at most its target
and each trained run beating chance. One job per trust model runs them all (one feature cache,
the runs spread over the workers). The client-trust job runs the frozen towers in bf16, the
precision CUDA GPUs and AMX CPUs get by default, with KgCoOp's and FedOTP's learners added, so
that every learner's bf16 path runs with and without DP (MaPLe, IVLP and PromptSRC once failed
there without DP: torch.func's vjp through the math attention kernel under autocast). central has
no client-trust DP (it pools raw records; the spec refuses it): that job runs the others."""

import pandas as pd
import pytest

from tests.cli import run_cli

PRESETS = [
    *("cocoop", "fedcocoop", "maple", "fedmaple", "scaffold", "fedadam", "central"),
    *("fedyogi", "promptfolio", "ivlp", "fedivlp", "fedclip", "fedtpg"),
    *("prograd", "fedprograd", "plot", "fedplot", "promptsrc", "fedpromptsrc"),
    *("proda", "fedproda", "bpl", "fedbpl", "pfedmoap", "fedpha"),
]
SMALL = [
    "--rounds", "2", "--local-epochs", "1", "--eval-every", "2", "--last-k", "1",
    "--clients", "2", "--shots", "4",
    "--dataset-option", "n_train_per_class=8",
    "--dataset-option", "n_test_per_class=4",
    "--dataset-option", "n_val_per_class=4",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("trust", ["server", "client"])
def test_each_runs_by_name_with_and_without_dp(tmp_path_factory, capsys, monkeypatch, trust):
    out = tmp_path_factory.mktemp(f"new-{trust}")
    bf16 = trust == "client"
    presets = [*(p for p in PRESETS if p != "central"), "fedkgcoop", "fedotp"] if bf16 else PRESETS
    args = [
        "run", "--methods", ",".join(presets), "--eps", "none,2", "--trust", trust,
        "--precision", "bf16" if bf16 else "fp32",
        *SMALL, "--out", str(out / "out"), "--cache-dir", str(out / "cache"),
    ]  # fmt: skip
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    frame = pd.read_csv(out / "out" / "results.csv")
    assert sorted(frame["method"].unique()) == sorted(presets)
    assert (frame["status"] == "finished").all()
    assert len(frame) == 2 * len(presets) and set(frame["trust"]) == {trust}
    private = frame[frame["eps"].astype(str) != "none"]
    assert (private["eps_spent"] <= 2.0 + 1e-9).all() and (private["eps_spent"] > 0).all()
    chance = 1 / 32  # base accuracy over the 32 base classes
    assert (frame["base_acc"] > 2 * chance).all(), frame[["method", "eps", "base_acc"]]
