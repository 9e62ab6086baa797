"""A run store's audit beside its leaderboard: OUT/audit.csv (`fpl-bench audit`, written by
fpl_bench/audit.py) joined to the records on the run key, summarised per cell.

    audits = read_audits(Path("runs/default"))           # None where there is no audit.csv
    summary = audit_summary(records, audits)              # one row per (cell, setup, attack)
    notes = audit_notes(summary)                          # {cell key: 'ε̂ ≥ 0.21 · MIA 51.2'}

The join: an audit row belongs to the run whose results.csv key (`records.KEY_COLUMNS`:
method, learner, scheme, dataset, protocol, trust, eps, seed, config_hash) it carries, and
counts only where that run is one the leaderboard shows (finished, of its cell's latest
configuration: `leaderboard.latest_config`). Per (cell, setup, attack):

- `balanced_acc`: mean over seeds of the membership attack's balanced accuracy
  (`balanced_acc_std` their sample std, 0 for one seed); the cell's MIA success is the
  strongest attack's, the largest mean;
- `eps_lower`: the canary attack's one-run lower bound on epsilon (95% per run), the largest
  over the cell's seeds, i.e. the strongest evidence against the claimed epsilon (each seed's
  bound holds at 95%, so the largest of n holds at 1 - 0.05 n at worst);
- `n_seeds`: the seeds audited.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from fpl_bench.errors import UsageError
from fpl_bench.report.leaderboard import CELL_COLUMNS, latest_config, percent, seed_std
from fpl_bench.report.records import KEY_COLUMNS, normalize_eps, normalize_records

AUDIT_FILE = "audit.csv"
CANARY_ATTACK = "canary"  # the attack that bounds epsilon; the others infer membership
# the attacks whose rows carry a lower bound on epsilon: the white-box canary audit and the
# black-box input canaries (which also infer the canaries' membership, not the data's)
BOUND_ATTACKS: tuple[str, ...] = (CANARY_ATTACK, "input")
NEEDED_COLUMNS: tuple[str, ...] = (*KEY_COLUMNS, "attack", "balanced_acc")
CELL_KEY: tuple[str, ...] = (*CELL_COLUMNS, "setup_hash")
SUMMARY_COLUMNS: tuple[str, ...] = (
    *CELL_KEY,
    "attack",
    "balanced_acc",
    "balanced_acc_std",
    "eps_lower",
    "n_seeds",
)
AUDIT_LEGEND = (
    "{ε̂ ≥ x · MIA y}: the audit of the cell's runs (`fpl-bench audit`, docs/audit.md): x the "
    "canary audits' lower bound on epsilon (one run, 95% confidence; the largest over seeds "
    "and over the white-box and input canaries; "
    "it should stay below the cell's ε), y the balanced accuracy in % of the strongest "
    "membership-inference attack on the released prompts, mean over seeds (chance 50)."
)


def read_audits(folder: Path) -> pd.DataFrame | None:
    """FOLDER/audit.csv with its key normalised like the records', or None where there is
    none; UsageError (one line) for a file that is not an audit."""
    path = Path(folder) / AUDIT_FILE
    if not path.is_file():
        return None
    try:
        frame = pd.read_csv(path, dtype={"eps": str, "config_hash": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: not a CSV file ({type(err).__name__}); move it away") from None
    missing = [c for c in NEEDED_COLUMNS if c not in frame.columns]
    if missing:
        raise UsageError(f"{path} lacks the columns {', '.join(missing)}; move it away")
    if "eps_lower" not in frame.columns:  # written before the canary attack
        frame["eps_lower"] = np.nan
    frame["eps"] = frame["eps"].map(normalize_eps).astype(object)
    frame["seed"] = pd.to_numeric(frame["seed"], errors="raise").astype(int)
    for column in ("method", "learner", "scheme", "dataset", "protocol", "config_hash"):
        frame[column] = frame[column].fillna("").astype(str)
    frame["trust"] = frame["trust"].fillna("").astype(str).str.strip().str.lower()
    frame["attack"] = frame["attack"].astype(str)
    for column in ("balanced_acc", "eps_lower"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
    return frame


def audit_summary(records: pd.DataFrame, audits: pd.DataFrame | None) -> pd.DataFrame:
    """One row per (cell, setup, attack) of the audited runs the leaderboard shows
    (`SUMMARY_COLUMNS`; the module docstring has the join and the statistics). Empty where
    there is no audit or no audited run is shown."""
    if audits is None or audits.empty or records.empty:
        return pd.DataFrame(columns=list(SUMMARY_COLUMNS))
    shown = latest_config(normalize_records(records))
    shown = shown[shown["status"] == "finished"][[*KEY_COLUMNS, "setup_hash"]]
    rows = audits.drop_duplicates([*KEY_COLUMNS, "attack"], keep="last")
    joined = rows.merge(shown, on=list(KEY_COLUMNS), how="inner")
    out = []
    for key, group in joined.groupby([*CELL_KEY, "attack"], sort=False):
        accuracy = group["balanced_acc"].dropna()
        bounds = group["eps_lower"].dropna()
        out.append(
            {
                **dict(zip([*CELL_KEY, "attack"], key, strict=True)),
                "balanced_acc": float(accuracy.mean()) if len(accuracy) else math.nan,
                "balanced_acc_std": seed_std(accuracy),
                "eps_lower": float(bounds.max()) if len(bounds) else math.nan,
                "n_seeds": int(group["seed"].nunique()),
            }
        )
    return pd.DataFrame(out, columns=list(SUMMARY_COLUMNS))


def audit_notes(summary: pd.DataFrame) -> dict[tuple[str, ...], str]:
    """{(method, learner, scheme, dataset, protocol, trust, eps, setup_hash): 'ε̂ ≥ 0.21 · MIA
    51.2'} per audited cell: the epsilon lower bound where a canary audit ran (private cells),
    the strongest membership attack's mean balanced accuracy (%) where one ran."""
    notes: dict[tuple[str, ...], str] = {}
    for key, group in summary.groupby(list(CELL_KEY), sort=False):
        parts = []
        bounds = group[group["attack"].isin(BOUND_ATTACKS)]["eps_lower"].dropna()
        if len(bounds):
            parts.append(f"ε̂ ≥ {bounds.max():.2f}")
        attacks = group[~group["attack"].isin(BOUND_ATTACKS)]["balanced_acc"].dropna()
        if len(attacks):
            parts.append(f"MIA {percent(attacks.max())}")
        if parts:
            notes[tuple(map(str, key))] = " · ".join(parts)
    return notes
