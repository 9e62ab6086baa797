"""The benchmark scripts run, and compute what their docstrings say (at tiny sizes)."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


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


def test_fedotp_eval_compares_with_a_git_revision(script, capsys):
    """The baseline learner is imported from git (HEAD) beside this tree's: one row per dim, the
    same predictions."""
    fedotp_eval = script("fedotp_eval")
    argv = ["--dims", "16", "--images", "6", "--classes", "4", "--patches", "9", "--repeats", "1"]
    assert fedotp_eval.main(argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("16 |")]
    assert len(rows) == 1 and rows[0].endswith("| True"), rows


def test_roofline_job_bound_counts_coops_passes(script):
    """CoOp's counted training: rounds x steps x (1 forward + B per-sample backwards) x one pass
    of 24 W^2 per token row and layer over 1 + n_ctx + 32 classes x 4 suffix rows = 145 rows of
    the embedded tower (W 64, 4 layers); zero-shot (trains nothing) and FedCLIP (no text tower)
    are not counted as doing CoOp's work."""
    roofline = script("roofline")
    coop, heavy, sizes = roofline.job_bound("coop,zeroshot,fedclip,bpl", 0.5)
    assert heavy == ["coop", "bpl"]
    pass_flops = 24 * 64**2 * 4 * 145
    steps = sum(2 * math.ceil(n / 32) for n in sizes)  # the run's 2 local epochs, batch 32
    assert len(sizes) == 10 and min(sizes) > 0
    assert coop == pytest.approx(20 * steps * pass_flops * (1 + 32), rel=1e-12)
