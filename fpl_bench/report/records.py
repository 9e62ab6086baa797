"""The records of a run store: one row per (method, ..., eps, seed, config), as in DIR/results.csv.

The columns are defined here, once; `fpl-bench run` writes them, `leaderboard` and `regress`
read them. Groups:

- key (`KEY_COLUMNS`): which run this is. Two rows with the same key are the same run; the
  later one replaces the earlier (`upsert_results`).
- `status`: finished | diverged | failed. Only finished rows enter a mean.
- metrics (`METRIC_COLUMNS`): fractions in [0, 1], NaN where the protocol does not define them;
  `protocol_metrics(protocol)` says which ones a protocol reports.
- privacy (`PRIVACY_COLUMNS`): the ledger of the run (NaN / empty without DP).
- other (`OTHER_COLUMNS`): schedule, provenance and cost.

`eps` is the string "none" (no DP) or a float; it is normalised to one canonical string
(`normalize_eps`: "none", "0.5", "0.01") so that 0.5 read from a CSV and 0.5 from a spec match.

>>> normalize_eps(None), normalize_eps("None"), normalize_eps(0.50), normalize_eps("1e-2")
('none', 'none', '0.5', '0.01')
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from fpl_bench.errors import UsageError
from fpl_bench.evaluate import METRICS
from fpl_bench.evaluate import PROTOCOL_METRICS as _PROTOCOL_METRICS

KEY_COLUMNS: tuple[str, ...] = (
    "method",
    "learner",
    "scheme",
    "dataset",
    "protocol",
    "trust",
    "eps",
    "seed",
    "config_hash",
)
STATUS_COLUMN = "status"
STATUSES: tuple[str, ...] = ("finished", "diverged", "failed")
TRUSTS: tuple[str, ...] = ("server", "client")
# The metric columns and which of them each protocol reports: one source, fpl_bench/evaluate.py.
METRIC_COLUMNS: tuple[str, ...] = METRICS
PROTOCOL_METRICS: dict[str, tuple[str, ...]] = dict(_PROTOCOL_METRICS)
PRIVACY_COLUMNS: tuple[str, ...] = (
    "eps_target",
    "eps_spent",
    "delta",
    "noise_multiplier",
    "clip_norm",
    "sample_rate",
    "steps",
    "calibration",
    "accountant",
)
# The configuration's key fields (the whole of it is in the run's MLflow params and its prompts
# file), `setup_hash` (the configuration without the method: what a leaderboard table shares),
# the saved prompts (relative to the output folder), schedule, provenance and cost.
CONFIG_COLUMNS: tuple[str, ...] = (
    "rounds",
    "local_epochs",
    "batch_size",
    "lr",
    "clients",
    "shots",
    "backbone",
    "setup_hash",
)
OTHER_COLUMNS: tuple[str, ...] = (
    *CONFIG_COLUMNS,
    "prompts",
    "tuned",
    "secure_noise",
    "wall_s",
    "version",
    "commit",
    "mlflow_run_id",
)
RESULT_COLUMNS: tuple[str, ...] = (
    *KEY_COLUMNS,
    STATUS_COLUMN,
    *METRIC_COLUMNS,
    *PRIVACY_COLUMNS,
    *OTHER_COLUMNS,
)
INTEGER_COLUMNS: tuple[str, ...] = (
    "steps",
    "rounds",
    "local_epochs",
    "batch_size",
    "clients",
    "shots",
)
NUMERIC_COLUMNS: tuple[str, ...] = (
    *METRIC_COLUMNS,
    "eps_target",
    "eps_spent",
    "delta",
    "noise_multiplier",
    "clip_norm",
    "sample_rate",
    "lr",
    "wall_s",
)
TEXT_COLUMNS: tuple[str, ...] = (
    "method",
    "learner",
    "scheme",
    "dataset",
    "protocol",
    "config_hash",
    "backbone",
    "setup_hash",
    "prompts",
)
NO_DP = "none"


def protocol_metrics(protocol: str) -> tuple[str, ...]:
    """The metric columns `protocol` reports (personalized: local, neighbor; base2novel: all)."""
    if protocol not in PROTOCOL_METRICS:
        raise UsageError(
            f"unknown protocol {protocol!r}; known: {', '.join(sorted(PROTOCOL_METRICS))}"
        )
    return tuple(PROTOCOL_METRICS[protocol])


def normalize_eps(value: Any) -> str:
    """'none' for no DP (None, NaN, '', 'none', 'None'), else the shortest repr of the float."""
    if value is None:
        return NO_DP
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("", NO_DP, "nan"):
            return NO_DP
        try:
            number = float(text)
        except ValueError:
            raise UsageError(f"eps {value!r} is not a number or 'none'") from None
    else:
        number = float(value)
    if math.isnan(number) or math.isinf(number):
        return NO_DP
    return repr(number)


def eps_order(eps: str) -> float:
    """Sort key for normalised eps values: 'none' first, then from the largest budget down.

    This is the order of the paper's tables (none, 0.4, 0.2, ..., 0.01): privacy grows to the right.
    """
    return -math.inf if eps == NO_DP else -float(eps)


def sorted_eps(values: Any) -> list[str]:
    """Distinct normalised eps values in table order (`eps_order`)."""
    return sorted({normalize_eps(v) for v in values}, key=eps_order)


def _to_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return bool(value)


def integers(values: pd.Series) -> pd.Series:
    """Nullable integers (written '20', not '20.0'; empty for NaN) when every number is whole,
    else floats."""
    numbers = pd.to_numeric(values, errors="coerce").astype(float)
    finite = numbers.dropna()
    if (finite == finite.round()).all():
        return numbers.astype("Int64")
    return numbers


def normalize_records(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy with canonical types: eps string, seed int, status/trust lower-case, tuned bool,
    counts nullable int, metrics and other numbers float. Assumes the columns are present (see
    `missing_columns`)."""
    seeds = pd.to_numeric(frame["seed"], errors="coerce")
    bad = frame["seed"][seeds.isna() | (seeds % 1 != 0)]
    if len(bad):
        raise UsageError(f"seed {bad.iloc[0]!r} is not an integer; fix the record or move it away")
    out = frame.copy()
    out["eps"] = out["eps"].map(normalize_eps).astype(object)
    out["seed"] = pd.to_numeric(out["seed"], errors="raise").astype(int)
    for column in TEXT_COLUMNS:
        out[column] = out[column].fillna("").astype(str)
    for column in ("status", "trust"):
        out[column] = out[column].fillna("").astype(str).str.strip().str.lower()
    for column in ("tuned", "secure_noise"):
        out[column] = out[column].map(_to_bool).astype(bool)
    for column in NUMERIC_COLUMNS:
        out[column] = pd.to_numeric(out[column], errors="coerce").astype(float)
    for column in INTEGER_COLUMNS:
        out[column] = integers(out[column])
    return out


# Columns added after records were first written, with the value an older record has: a
# results.csv or tracking store from before them still reads (its rows form a setup of their
# own, with unknown key fields), instead of being refused.
LATER_COLUMNS: dict[str, Any] = {
    "local_epochs": math.nan,
    "batch_size": math.nan,
    "lr": math.nan,
    "backbone": "",
    "setup_hash": "",
    "prompts": "",
    "secure_noise": False,
}


def missing_columns(columns: Any) -> list[str]:
    """The `RESULT_COLUMNS` not in `columns` (and not `LATER_COLUMNS`), in schema order."""
    present = set(columns)
    return [c for c in RESULT_COLUMNS if c not in present and c not in LATER_COLUMNS]


def with_later_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with each missing `LATER_COLUMNS` column at its older records' value."""
    missing = {c: v for c, v in LATER_COLUMNS.items() if c not in frame.columns}
    return frame.assign(**missing) if missing else frame


def check_values(frame: pd.DataFrame, source: str) -> None:
    """UsageError (one line naming `source`) on a status or trust outside the known values."""
    for column, allowed in ((STATUS_COLUMN, STATUSES), ("trust", TRUSTS)):
        bad = sorted(set(frame[column]) - set(allowed))
        if bad:
            raise UsageError(
                f"{source}: column {column!r} holds {', '.join(map(repr, bad))}; "
                f"allowed: {', '.join(allowed)}"
            )


def order_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """Schema columns first (in `RESULT_COLUMNS` order), then any extra columns as they came."""
    extra = [c for c in frame.columns if c not in RESULT_COLUMNS]
    return frame[[c for c in RESULT_COLUMNS if c in frame.columns] + extra]


def read_results(path: Path | str) -> pd.DataFrame:
    """Read a results.csv strictly: every `RESULT_COLUMNS` column must be there.

    Extra columns are kept (a protocol may add metrics). Raises UsageError, one line, naming the
    file and what is wrong: not found, empty, missing columns, unknown status or trust.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"results file {path} not found; run `fpl-bench run --out {path.parent}`")
    try:
        frame = pd.read_csv(
            path, dtype={c: str for c in ("eps", "config_hash", "setup_hash")}, keep_default_na=True
        )
    except pd.errors.EmptyDataError:
        raise UsageError(f"{path} is empty: no header, no rows") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        reason = " ".join(str(err).split())[:120]
        raise UsageError(
            f"{path} is not a readable results CSV ({reason}); move it away or use another folder"
        ) from None
    missing = missing_columns(frame.columns)
    if missing:
        raise UsageError(
            f"{path} does not have the results columns: missing {', '.join(missing)} "
            "(written by an older fpl-bench? rerun `fpl-bench run`)"
        )
    frame = normalize_records(with_later_columns(frame))
    check_values(frame, str(path))
    return order_columns(frame)


def _key_ids(frame: pd.DataFrame) -> pd.Series:
    """One string per row that identifies its key (eps normalised first)."""
    keys = frame[list(KEY_COLUMNS)].copy()
    keys["eps"] = keys["eps"].map(normalize_eps)
    return keys.astype(str).agg("\x1f".join, axis=1)


def upsert_results(existing: pd.DataFrame | None, new_rows: pd.DataFrame) -> pd.DataFrame:
    """Merge `new_rows` into `existing`: a row whose key (`KEY_COLUMNS`) is already there replaces
    it in place; other new rows are appended in their order. Within `new_rows` the last row of a
    key wins. Columns: the schema's first, then extras (union of both frames)."""
    missing = [c for c in KEY_COLUMNS if c not in new_rows.columns]
    if missing:
        raise ValueError(f"new rows lack key columns {missing}")
    frames = [f for f in (existing, new_rows) if f is not None and len(f.columns)]
    combined = pd.concat(frames, ignore_index=True) if len(frames) > 1 else new_rows.copy()
    combined = combined.reset_index(drop=True)
    if combined.empty:
        return order_columns(combined)
    combined["eps"] = combined["eps"].map(normalize_eps).astype(object)
    ids = _key_ids(combined)
    last_of = {key: index for index, key in ids.items()}
    order = [last_of[key] for key in ids.drop_duplicates(keep="first")]
    return order_columns(combined.loc[order].reset_index(drop=True))


def write_results(frame: pd.DataFrame, path: Path | str) -> None:
    """Write `frame` to `path` atomically (temp file + rename), schema columns first."""
    from fpl_bench.io import write_atomic

    ordered = order_columns(frame)
    write_atomic(Path(path), lambda tmp: ordered.to_csv(tmp, index=False))
