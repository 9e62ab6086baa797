"""The audit beside the leaderboard (fpl_bench/report/audits.py): audit.csv joined to the
records on the run key, per-cell values, the notes in Markdown and HTML, the attack-success
figure (a valid PNG, embedded in the page) and `fpl-bench leaderboard` reading audit.csv.

Hand-built audit of conftest's records (promptfl and dpfpl at eps none and 0.4, seeds 0-2;
dpfpl 0.4 seed 2 diverged):

    promptfl none  loss 0.50 0.52 0.54 -> 52.0    shadow 0.55 0.57 0.59 -> 57.0 (the MIA shown)
    promptfl 0.4   loss 0.50 0.50 0.53 -> 51.0    canary 0.10 0.25 0.18 -> 0.25 (the largest)
                   + a row of an older configuration (loss 0.99): not shown, not counted
    dpfpl 0.4      loss 0.52 0.54 (0.99 of the diverged seed, not counted) -> 53.0
                   canary 0.30 0.20 (9.9 of the diverged seed) -> 0.30
    dpfpl none     not audited
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from fpl_bench.errors import UsageError
from fpl_bench.report.audits import AUDIT_FILE, audit_notes, audit_summary, read_audits
from fpl_bench.report.build import write_leaderboard
from fpl_bench.report.records import KEY_COLUMNS
from tests.cli import run_cli
from tests.report.conftest import SCHEMES

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
AUDIT = [  # method, eps, seed, attack, balanced_acc, eps_lower
    *[("promptfl", "none", s, "loss", a, None) for s, a in enumerate((0.50, 0.52, 0.54))],
    *[("promptfl", "none", s, "shadow", a, None) for s, a in enumerate((0.55, 0.57, 0.59))],
    *[("promptfl", "0.4", s, "loss", a, None) for s, a in enumerate((0.50, 0.50, 0.53))],
    *[("promptfl", "0.4", s, "canary", None, b) for s, b in enumerate((0.10, 0.25, 0.18))],
    *[("dpfpl", "0.4", s, "loss", a, None) for s, a in enumerate((0.52, 0.54, 0.99))],
    *[("dpfpl", "0.4", s, "canary", None, b) for s, b in enumerate((0.30, 0.20, 9.9))],
]


def audit_row(method: str, eps: str, seed: int, attack: str, acc, bound, **fields) -> dict:
    """One audit.csv row in fpl_bench/audit.py's columns (the ones the report reads and more)."""
    return {
        "method": method,
        "learner": "coop",
        "scheme": SCHEMES[method],
        "dataset": "caltech101",
        "protocol": "personalized",
        "trust": "server",
        "eps": eps,
        "seed": seed,
        "config_hash": "c0ffee",
        "attack": attack,
        "shadow_runs": 2 if attack == "shadow" else 0,
        "balanced_acc": math.nan if acc is None else acc,
        "auc": math.nan,
        "tpr_at_1fpr": math.nan,
        "eps_lower": math.nan if bound is None else bound,
        "run_id": f"run-{method}-{eps}-{seed}",
        **fields,
    }


def write_audit(folder: Path) -> Path:
    rows = [audit_row(*spec) for spec in AUDIT]
    rows.append(audit_row("promptfl", "0.4", 0, "loss", 0.99, None, config_hash="01d"))
    path = folder / AUDIT_FILE
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture
def audited(runs_dir: Path) -> Path:
    write_audit(runs_dir)
    return runs_dir


def cell(method: str, eps: str) -> tuple[str, ...]:
    return (method, "coop", SCHEMES[method], "caltech101", "personalized", "server", eps, "5e7a11")


def test_summary_joins_on_the_run_key_and_counts_only_shown_runs(records, audited) -> None:
    summary = audit_summary(records, read_audits(audited))
    by = {(r.method, r.eps, r.attack): r for r in summary.itertuples()}
    assert set(by) == {
        ("promptfl", "none", "loss"),
        ("promptfl", "none", "shadow"),
        ("promptfl", "0.4", "loss"),
        ("promptfl", "0.4", "canary"),
        ("dpfpl", "0.4", "loss"),
        ("dpfpl", "0.4", "canary"),
    }
    assert by[("promptfl", "none", "loss")].balanced_acc == pytest.approx(0.52)
    assert by[("promptfl", "none", "loss")].balanced_acc_std == pytest.approx(0.02)
    assert by[("promptfl", "none", "shadow")].balanced_acc == pytest.approx(0.57)
    assert by[("promptfl", "0.4", "loss")].balanced_acc == pytest.approx(0.51)  # not 0.99
    assert by[("promptfl", "0.4", "canary")].eps_lower == pytest.approx(0.25)
    assert by[("dpfpl", "0.4", "loss")].balanced_acc == pytest.approx(0.53)  # seed 2 diverged
    assert by[("dpfpl", "0.4", "loss")].n_seeds == 2
    assert by[("dpfpl", "0.4", "canary")].eps_lower == pytest.approx(0.30)  # not 9.9
    assert math.isnan(by[("dpfpl", "0.4", "canary")].balanced_acc)

    assert audit_notes(summary) == {
        cell("promptfl", "none"): "MIA 57.0",  # the strongest attack; no bound without DP
        cell("promptfl", "0.4"): "ε̂ ≥ 0.25 · MIA 51.0",
        cell("dpfpl", "0.4"): "ε̂ ≥ 0.30 · MIA 53.0",
    }


def test_leaderboard_shows_the_audit_and_the_attack_figure(records, audited, tmp_path) -> None:
    out = tmp_path / "board"
    written = write_leaderboard(records, out=out, name="lb", audits=read_audits(audited))
    markdown = written.markdown.read_text()
    assert (
        "| promptfl | 62.0 ± 2.0 (94.5) {MIA 57.0} | **53.0 ± 3.6** (82.5) "
        "{ε̂ ≥ 0.25 · MIA 51.0} |" in markdown
    )
    assert (
        "| dpfpl | **72.0 ± 2.6** (96.1) | 56.5 ± 2.1 [1/3 diverged] (95.7) {ε̂ ≥ 0.30 · MIA 53.0} |"
        in markdown
    )
    assert "{ε̂ ≥ x · MIA y}" in markdown  # the legend
    html = written.html.read_text()
    assert '<span class="audit">{ε̂ ≥ 0.25 · MIA 51.0}</span>' in html

    (figure,) = [p for p in written.pngs if p.name.endswith("-attack-vs-eps.png")]
    data = figure.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    with Image.open(io.BytesIO(data)) as image:
        image.verify()
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 200
    assert base64.b64encode(data).decode("ascii") in html  # embedded in the page

    summary = pd.read_csv(written.audit, dtype={"eps": str})
    row = summary[(summary.method == "dpfpl") & (summary.attack == "canary")].iloc[0]
    assert row.eps_lower == pytest.approx(0.30) and row.n_seeds == 2


def test_without_an_audit_the_leaderboard_is_unchanged(records, runs_dir, tmp_path) -> None:
    written = write_leaderboard(records, out=tmp_path / "b", audits=read_audits(runs_dir))
    assert read_audits(runs_dir) is None
    assert written.audit is None
    assert not any(p.name.endswith("-attack-vs-eps.png") for p in written.pngs)
    markdown = written.markdown.read_text()
    assert "ε̂" not in markdown and "MIA" not in markdown


def test_an_audit_of_other_runs_adds_nothing(records, runs_dir, tmp_path) -> None:
    rows = [audit_row("promptfl", "0.4", 0, "loss", 0.7, None, config_hash="other")]
    pd.DataFrame(rows).to_csv(runs_dir / AUDIT_FILE, index=False)
    assert audit_summary(records, read_audits(runs_dir)).empty
    written = write_leaderboard(records, out=tmp_path / "b", audits=read_audits(runs_dir))
    assert written.audit is None and "MIA" not in written.markdown.read_text()


def test_an_older_audit_without_bounds_reads_and_a_bad_one_is_one_line(runs_dir) -> None:
    rows = [audit_row("promptfl", "none", 0, "loss", 0.6, None)]
    pd.DataFrame(rows).drop(columns=["eps_lower"]).to_csv(runs_dir / AUDIT_FILE, index=False)
    frame = read_audits(runs_dir)
    assert frame is not None and math.isnan(frame["eps_lower"].iloc[0])
    assert set(KEY_COLUMNS) <= set(frame.columns)
    (runs_dir / AUDIT_FILE).write_text("method,eps\ncoop,none\n")
    with pytest.raises(UsageError, match=r"audit\.csv lacks the columns learner") as err:
        read_audits(runs_dir)
    assert "\n" not in str(err.value)


def test_leaderboard_command_reads_the_runs_audit(audited, tmp_path, capsys, monkeypatch):
    out = tmp_path / "lb"
    args = ["leaderboard", "--runs", str(audited), "--out", str(out), "--name", "emb"]
    code, stdout, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    assert f"wrote {out / 'emb-audit.csv'}" in stdout
    assert (out / "emb-plots").is_dir()
    pngs = [p.name for p in (out / "emb-plots").iterdir()]
    assert "caltech101-personalized-server-attack-vs-eps.png" in pngs
    assert "{ε̂ ≥ 0.25 · MIA 51.0}" in (out / "emb.md").read_text()
