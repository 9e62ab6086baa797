"""Hand-built run records: 2 methods x 2 eps x 3 seeds, one diverged row.

local_acc by (method, eps), seeds 0, 1, 2 (mean, sample std in %):
    promptfl none: 0.60 0.62 0.64 -> 62.0 ± 2.0      promptfl 0.4: 0.50 0.52 0.57 -> 53.0 ± 3.6
    dpfpl    none: 0.70 0.71 0.75 -> 72.0 ± 2.6      dpfpl    0.4: 0.55 0.58 (diverged) -> 56.5 ± 2.1
"""

import math
from pathlib import Path

import pandas as pd
import pytest

from fpl_bench.report.records import RESULT_COLUMNS, write_results

LOCAL = {
    ("promptfl", "none"): (0.60, 0.62, 0.64),
    ("promptfl", "0.4"): (0.50, 0.52, 0.57),
    ("dpfpl", "none"): (0.70, 0.71, 0.75),
    ("dpfpl", "0.4"): (0.55, 0.58, 0.10),
}
NEIGHBOR = {
    ("promptfl", "none"): (0.40, 0.40, 0.40),
    ("promptfl", "0.4"): (0.35, 0.35, 0.35),
    ("dpfpl", "none"): (0.30, 0.33, 0.36),
    ("dpfpl", "0.4"): (0.38, 0.40, 0.05),
}
SCHEMES = {"promptfl": "fedavg", "dpfpl": "dpfpl"}


def record(method: str, eps: str, seed: int, **fields) -> dict:
    """One results row with every schema column (NaN where not given)."""
    row = {column: math.nan for column in RESULT_COLUMNS}
    row.update(
        method=method,
        learner="coop",
        scheme=SCHEMES.get(method, "local"),
        dataset="caltech101",
        protocol="personalized",
        trust="server",
        eps=eps,
        seed=seed,
        config_hash="c0ffee",
        status="finished",
        local_acc=LOCAL[(method, eps)][seed],
        neighbor_acc=NEIGHBOR[(method, eps)][seed],
        eps_target=math.nan if eps == "none" else float(eps),
        accountant="" if eps == "none" else "rdp",
        rounds=20,
        local_epochs=2,
        batch_size=32,
        lr=0.005,
        clients=10,
        shots=16,
        backbone="ViT-B-16:openai",
        setup_hash="5e7a11",
        tuned=False,
        wall_s=1.0,
        version="0.1.0",
        commit="abc123",
        mlflow_run_id=f"run-{method}-{eps}-{seed}",
    )
    row.update(fields)
    return row


def make_records(**fields) -> pd.DataFrame:
    """The 12 rows; dpfpl at eps 0.4, seed 2 diverged."""
    rows = [
        record(method, eps, seed, **fields)
        for method in ("promptfl", "dpfpl")
        for eps in ("none", "0.4")
        for seed in range(3)
    ]
    rows[-1]["status"] = "diverged"
    return pd.DataFrame(rows)


@pytest.fixture
def records() -> pd.DataFrame:
    return make_records()


@pytest.fixture
def runs_dir(tmp_path: Path, records: pd.DataFrame) -> Path:
    """A run folder with results.csv holding `records`."""
    folder = tmp_path / "runs"
    write_results(records, folder / "results.csv")
    return folder
