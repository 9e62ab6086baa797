"""The benchmark scripts run, and compute what their docstrings say (at tiny sizes)."""

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def in_git_checkout() -> bool:
    found = subprocess.run(["git", "-C", str(BENCHMARKS), "rev-parse"], capture_output=True)
    return found.returncode == 0


@pytest.fixture
def script(monkeypatch):
    """Import a benchmarks/ script as `python benchmarks/NAME.py` would (its folder on the path)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))

    def load(name):
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, module)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.mark.skipif(not in_git_checkout(), reason="reads the baseline learner with git show")
def test_fedotp_eval_compares_with_a_git_revision(script, capsys):
    """The baseline learner is imported from git (HEAD) beside this tree's: one row per dim, the
    same predictions."""
    fedotp_eval = script("fedotp_eval")
    assert fedotp_eval.baseline_learner("HEAD").__module__ == "fpl_bench_baseline_learner"
    argv = ["--dims", "16", "--images", "6", "--classes", "4", "--patches", "9", "--repeats", "1"]
    assert fedotp_eval.main(argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("16 |")]
    assert len(rows) == 1 and rows[0].endswith("| True"), rows


def test_roofline_job_bound_counts_each_presets_passes(script):
    """CoOp's counted training: rounds x steps x (1 forward + B per-sample backwards) x one pass
    of 24 W^2 per token row and layer over 1 + n_ctx + 32 classes x 4 suffix rows = 145 rows of
    the embedded tower (W 64, 4 layers); BPL counts CoOp's passes (its tower per image is not
    counted), KgCoOp one more for its prior; zero-shot (trains nothing) and FedCLIP (no text
    tower) count nothing."""
    roofline = script("roofline")
    flops, sizes = roofline.job_bound("coop,zeroshot,fedclip,bpl,kgcoop", 0.5)
    pass_flops = 24 * 64**2 * 4 * 145
    steps = sum(2 * math.ceil(n / 32) for n in sizes)  # the run's 2 local epochs, batch 32
    assert len(sizes) == 10 and min(sizes) > 0
    coop = 20 * steps * pass_flops * (1 + 32)
    assert flops == pytest.approx(
        {"coop": coop, "zeroshot": 0, "fedclip": 0, "bpl": coop, "kgcoop": coop * 34 / 33},
        rel=1e-12,
    )


def test_roofline_counts_every_matmul_of_a_job(script):
    """The whole-job count: zero-shot trains nothing and evaluates once; CoOp's counted matmuls
    (its last block runs only the EOT rows, attention's products are counted too) are 75-100%
    of its 24 W^2-per-row passes, and its evaluation is counted apart."""
    roofline = script("roofline")
    counted = roofline.job_counted("coop,zeroshot", 0.5, sampled_rounds=1, log=lambda _: None)
    passes, _ = roofline.job_bound("coop", 0.5)
    (coop_train, coop_eval), (zs_train, zs_eval) = counted["coop"], counted["zeroshot"]
    assert zs_train == 0 and 0 < zs_eval < coop_eval
    assert 0.75 < coop_train / passes["coop"] < 1.0


def test_roofline_prints_the_bound(script, capsys):
    """The whole script at a small batch: both rates, and the bound of a CoOp-only job."""
    roofline = script("roofline")
    assert roofline.main(["--methods", "coop", "--batch", "4", "--target-min", "6"]) == 0
    out = capsys.readouterr().out
    assert "CoOp private step (B = 4, 32 classes, 145 token rows per sample)" in out
    assert "1 presets train through the text tower" in out
    assert "target 6 min: the bound is" in out
