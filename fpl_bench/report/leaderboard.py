"""Records -> leaderboard: one row per (cell, metric) with mean and std over seeds.

A cell is (method, learner, scheme, dataset, protocol, trust, eps). Rules:

- One setup per table: rows with another `setup_hash` (the configuration without the method:
  data, protocol, partition, schedule, backbone, privacy settings) go to a table of their own,
  whose heading names what differs (`setup_labels`: 'rounds 1, local_epochs 1'). A method's own
  options and tuned values are its row's configuration (`config_hash`), not the table's.
- One configuration per cell: when a store holds several `config_hash` values for a cell of one
  setup (a rerun with other method options, a tuned config), the cell uses the configuration of
  its latest row (file order) and the others are reported by `superseded_configs`.
- Only `finished` seeds enter the mean. `std` is the sample std over seeds (n - 1; 0 for one
  seed). A cell's `status` is `finished` when every seed finished, else `failed` if any seed
  failed, else `diverged`; `n_seeds` counts the seeds in the mean, `n_runs` all seeds.
- `paper`: the DP-FPL paper's number for the cell (`paper.paper_number`) where the cell is in
  the paper's setting (`paper.applies`) and the run used one client count; else NaN.
- A table is one (dataset, protocol, trust, setup); its columns are eps ('none' first, then from the
  largest budget down), its rows methods in the order they first appear in the records. The
  best mean of a column is bold, among cells whose seeds all finished, compared at the shown
  precision (so a tie is bold twice).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

from fpl_bench.report.paper import applies, paper_number
from fpl_bench.report.records import (
    CONFIG_COLUMNS,
    STATUS_COLUMN,
    normalize_records,
    protocol_metrics,
    sorted_eps,
)

CELL_COLUMNS: tuple[str, ...] = (
    "method",
    "learner",
    "scheme",
    "dataset",
    "protocol",
    "trust",
    "eps",
)
TABLE_COLUMNS: tuple[str, ...] = ("dataset", "protocol", "trust", "setup_hash")
# What a leaderboard row records of its configuration: the run's config_hash and key fields,
# the seeds of its runs ('0,1,2') and the whole resolved configuration as JSON ('' when the
# store did not keep it), from which `fpl-bench regress` runs the cell again.
CELL_CONFIG_COLUMNS: tuple[str, ...] = ("config_hash", *CONFIG_COLUMNS, "seeds", "config")
LEADERBOARD_COLUMNS: tuple[str, ...] = (
    *CELL_COLUMNS,
    "metric",
    "mean",
    "std",
    "n_seeds",
    "n_runs",
    "status",
    "tuned",
    "paper",
    *CELL_CONFIG_COLUMNS,
)
METRIC_LABELS = {
    "local_acc": "local accuracy",
    "neighbor_acc": "neighbor accuracy",
    "base_acc": "base accuracy",
    "novel_acc": "novel accuracy",
    "hm": "harmonic mean of base and novel (HM)",
}
DIGITS = 1  # shown precision of a percentage


def latest_config(records: pd.DataFrame) -> pd.DataFrame:
    """Rows of each cell's latest configuration in each setup (the `config_hash` of its last
    row)."""
    cell = [*CELL_COLUMNS, "setup_hash"]
    latest = records.groupby(cell, sort=False)["config_hash"].transform("last")
    return records[records["config_hash"] == latest]


def superseded_configs(records: pd.DataFrame) -> pd.DataFrame:
    """Rows left out by `latest_config` (older configurations of a cell)."""
    return records.drop(latest_config(records).index)


def cell_status(statuses: pd.Series) -> str:
    """finished if every seed finished; else failed if any failed; else diverged."""
    values = set(statuses)
    if values <= {"finished"}:
        return "finished"
    return "failed" if "failed" in values else "diverged"


def seed_std(values: pd.Series) -> float:
    """Sample std (ddof 1) of the finite values; 0 for one value, NaN for none."""
    if len(values) == 0:
        return math.nan
    return 0.0 if len(values) == 1 else float(values.std(ddof=1))


def single_clients(group: pd.DataFrame) -> int | None:
    """The cell's client count when all its rows agree, else None."""
    values = pd.to_numeric(group["clients"], errors="coerce").dropna().unique()
    return int(values[0]) if len(values) == 1 else None


def cell_rows(
    cell: tuple, group: pd.DataFrame, configs: Mapping[str, dict] | None = None
) -> Iterator[dict]:
    """The leaderboard rows of one cell: one per metric of its protocol; `configs` maps a
    config hash to its resolved configuration (OUT/configs/)."""
    keys = dict(zip(CELL_COLUMNS, cell, strict=True))
    finished = group[group[STATUS_COLUMN] == "finished"]
    in_paper = applies(keys["protocol"], keys["trust"], keys["eps"])
    clients = single_clients(group)
    for metric in protocol_metrics(keys["protocol"]):
        values = finished[metric].dropna().astype(float)
        paper = (
            paper_number(keys["dataset"], keys["method"], keys["eps"], metric, clients)
            if in_paper and clients is not None
            else None
        )
        yield {
            **keys,
            "metric": metric,
            "mean": float(values.mean()) if len(values) else math.nan,
            "std": seed_std(values),
            "n_seeds": len(values),
            "n_runs": int(group["seed"].nunique()),
            "status": cell_status(group[STATUS_COLUMN]),
            "tuned": bool(group["tuned"].any()),
            "paper": math.nan if paper is None else paper,
            **{c: group[c].iloc[-1] for c in CELL_CONFIG_COLUMNS[:-2]},
            "seeds": ",".join(str(s) for s in sorted(set(group["seed"].astype(int)))),
            "config": config_json(group["config_hash"].iloc[-1], configs),
        }


def config_json(config_hash: str, configs: Mapping[str, dict] | None) -> str:
    """The configuration of `config_hash` as one line of JSON ('' when unknown)."""
    import json

    if not configs or config_hash not in configs:
        return ""
    return json.dumps(configs[config_hash], sort_keys=True, default=str)


def summarize(records: pd.DataFrame, configs: Mapping[str, dict] | None = None) -> pd.DataFrame:
    """The leaderboard in long format (`LEADERBOARD_COLUMNS`), eps in table order; `configs`
    (config hash -> resolved configuration) fills the `config` column."""
    chosen = latest_config(normalize_records(records))
    rows = [
        row
        for cell, group in chosen.groupby([*CELL_COLUMNS, "setup_hash"], sort=False)
        for row in cell_rows(cell[: len(CELL_COLUMNS)], group, configs)
    ]
    frame = pd.DataFrame(rows, columns=list(LEADERBOARD_COLUMNS))
    return sort_leaderboard(frame)


def merge_cells(earlier: pd.DataFrame, latest: pd.DataFrame) -> pd.DataFrame:
    """An earlier leaderboard (`regression.read_leaderboard`) with `latest` (`summarize` of new
    runs) added: a cell (`CELL_COLUMNS` and `setup_hash`) that `latest` holds takes all its rows
    from `latest`, every other cell of `earlier` stays as it was. So presets added to a suite
    join its committed leaderboard without rerunning the cells already there."""
    key = [*CELL_COLUMNS, "setup_hash"]
    kept = earlier[~row_ids(earlier, key).isin(set(row_ids(latest, key)))]
    merged = pd.concat([kept[list(LEADERBOARD_COLUMNS)], latest], ignore_index=True)
    return sort_leaderboard(merged)


def dropped_seeds(earlier: pd.DataFrame, latest: pd.DataFrame) -> list[str]:
    """The cells `merge_cells` takes from `latest` whose `earlier` rows held seeds that `latest`
    does not, one line per cell ('coop synthetic base2novel server eps 0.5: seeds 0 of the
    earlier cell are not in the runs (they hold 1,2)'): a cell is replaced, not pooled (the CSV
    keeps a mean and a std, not each seed's value), so those seeds' runs belong in the same
    runs folder. An earlier cell that does not record its seeds is not reported."""
    key = [*CELL_COLUMNS, "setup_hash"]
    seeds_of = dict(zip(row_ids(latest, key), latest["seeds"].astype(str), strict=True))
    lines: list[str] = []
    seen: set[str] = set()
    for row_id, (_, row) in zip(row_ids(earlier, key), earlier.iterrows(), strict=True):
        if row_id not in seeds_of or row_id in seen:  # kept as it was, or said already
            continue
        seen.add(row_id)
        now, before = (
            set(filter(None, str(s).split(","))) for s in (seeds_of[row_id], row["seeds"])
        )
        missing = before - now
        if missing:
            where = " ".join(str(row[c]) for c in ("method", "dataset", "protocol", "trust"))
            lines.append(
                f"{where} eps {row['eps']}: seeds {','.join(sorted(missing, key=int))} of the "
                f"earlier cell are not in the runs (they hold {','.join(sorted(now, key=int))})"
            )
    return lines


def row_ids(frame: pd.DataFrame, columns: Sequence[str]) -> pd.Series:
    """One text id per row from `columns` (values as text), to compare rows across frames."""
    if frame.empty:  # agg over no rows gives a frame, not a series
        return pd.Series([], index=frame.index, dtype=str)
    return frame[list(columns)].astype(str).agg("\x1f".join, axis=1)


def sort_leaderboard(frame: pd.DataFrame) -> pd.DataFrame:
    """Stable order: tables as first seen, then eps (table order), methods as first seen."""
    if frame.empty:
        return frame
    rank_eps = {e: i for i, e in enumerate(sorted_eps(frame["eps"]))}
    table_ids = row_ids(frame, TABLE_COLUMNS)
    order = pd.DataFrame(
        {
            "table": table_ids.map({t: i for i, t in enumerate(dict.fromkeys(table_ids))}),
            "eps": frame["eps"].map(rank_eps),
            "method": frame["method"].map(
                {m: i for i, m in enumerate(dict.fromkeys(frame["method"]))}
            ),
            "position": range(len(frame)),
        }
    )
    index = order.sort_values(["table", "eps", "method", "position"], kind="stable").index
    return frame.loc[index].reset_index(drop=True)


@dataclass(frozen=True)
class Cell:
    """One shown cell: `value` ('71.2 ± 1.0'; '71.2' from one seed; 'diverged', '—'), `note`
    ('1/3 diverged' when some seeds did not finish), `paper` ('94.5' or ''), `best` (bold),
    `audit` (the audit of its runs, 'ε̂ ≥ 0.21 · MIA 51.2', or '': report/audits.py)."""

    value: str
    note: str
    paper: str
    best: bool
    audit: str = ""


@dataclass(frozen=True)
class CellTable:
    """One metric of one (dataset, protocol, trust, setup): rows of (method, cells by eps).
    `setup` is '' when the store holds one setup of the (dataset, protocol, trust), else what
    tells it apart ('rounds 1, local_epochs 1')."""

    dataset: str
    protocol: str
    trust: str
    metric: str
    eps: list[str]
    rows: list[tuple[str, list[Cell]]]
    setup: str = ""
    config: str = ""  # the setup's key fields ('rounds 10, local_epochs 1, ...'): `setup_text`

    @property
    def has_paper(self) -> bool:
        return any(cell.paper for _, cells in self.rows for cell in cells)


def percent(value: float) -> str:
    """A fraction shown as a percentage at `DIGITS` decimals."""
    return f"{100 * value:.{DIGITS}f}"


def make_cell(row: pd.Series | None, best_shown: str | None, audit: str = "") -> Cell:
    """The shown cell of one leaderboard row (None: the cell was not run), with the audit
    note of its runs (`audit`, '' when none)."""
    if row is None:
        return Cell("—", "", "", False)
    paper = "" if pd.isna(row["paper"]) else percent(row["paper"])
    if row["n_seeds"] == 0 or pd.isna(row["mean"]):
        value = row["status"] if row["status"] != "finished" else "n/a"
        return Cell(value, "", paper, False, audit)
    value = percent(row["mean"])
    if int(row["n_seeds"]) > 1:  # one seed has no spread: its value alone, never '± 0.0'
        value += f" ± {percent(row['std'])}"
    note = ""
    if row["status"] != "finished":
        bad = int(row["n_runs"]) - int(row["n_seeds"])
        note = f"{bad}/{int(row['n_runs'])} {row['status']}"
    best = row["status"] == "finished" and percent(row["mean"]) == best_shown
    return Cell(value, note, paper, best, audit)


def best_shown(column: pd.DataFrame) -> str | None:
    """The best mean of one eps column at shown precision, among fully finished cells."""
    eligible = column[(column["status"] == "finished") & column["mean"].notna()]
    if eligible.empty:
        return None
    return percent(eligible["mean"].max())


# The configuration fields a table heading names when one (dataset, protocol, trust) holds
# several setups (records.CONFIG_COLUMNS without the hash).
SETUP_FIELDS: tuple[str, ...] = tuple(c for c in CONFIG_COLUMNS if c != "setup_hash")


def setup_row(rows: pd.DataFrame) -> pd.Series:
    """The row that speaks for a setup's key fields: its first untuned row (a tuned row's lr
    or epochs are its study's), else its first row."""
    untuned = rows[~rows["tuned"].astype(bool)]
    return (untuned if len(untuned) else rows).iloc[0]


def setup_text(part: pd.DataFrame) -> str:
    """The key fields of one table's setup, from its untuned rows ('rounds 10, local_epochs 1,
    batch_size 32, lr 0.005, clients 10, shots 16, backbone fpl-tiny-vit'); tuned rows are
    said to use their studies' values."""
    first = setup_row(part)
    text = ", ".join(f"{f} {shown(first[f])}" for f in SETUP_FIELDS)
    if part["tuned"].astype(bool).any():
        text += "; tuned rows: their studies' values"
    return text


def shown(value: object) -> str:
    """A configuration value as text, the same whether read from a CSV or computed: '—' when
    missing, whole numbers without '.0' ('20', '0.005', 'fpl-tiny-vit')."""
    if value is None or value == "" or (not isinstance(value, str) and pd.isna(value)):
        return "—"
    if isinstance(value, float | int) and not isinstance(value, bool):
        return str(int(value)) if float(value) == int(value) else f"{value:g}"
    return str(value)


def cell_table(
    part: pd.DataFrame,
    metric: str,
    setup: str = "",
    notes: Mapping[tuple[str, ...], str] | None = None,
) -> CellTable:
    """The method x eps table of `metric` from the leaderboard rows of one (dataset, protocol,
    trust, setup); `notes`: the audit note per cell (report/audits.py `audit_notes`)."""
    rows = part[part["metric"] == metric]
    eps_values = sorted_eps(part["eps"])
    methods = list(dict.fromkeys(part["method"]))
    bests = {e: best_shown(rows[rows["eps"] == e]) for e in eps_values}
    table_rows = []
    for method in methods:
        cells = []
        for eps in eps_values:
            match = rows[(rows["method"] == method) & (rows["eps"] == eps)]
            row = match.iloc[-1] if len(match) else None
            audit = "" if row is None or not notes else notes.get(_note_key(row), "")
            cells.append(make_cell(row, bests[eps], audit))
        table_rows.append((method, cells))
    first = part.iloc[0]
    return CellTable(
        dataset=str(first["dataset"]),
        protocol=str(first["protocol"]),
        trust=str(first["trust"]),
        metric=metric,
        eps=eps_values,
        rows=table_rows,
        setup=setup,
        config=setup_text(part),
    )


def setup_labels(leaderboard: pd.DataFrame) -> dict[tuple[str, ...], str]:
    """{(dataset, protocol, trust, setup_hash): label}: '' where the (dataset, protocol,
    trust) has one setup, else the key fields whose values differ between its setups
    ('rounds 1, local_epochs 1'; untuned rows speak for a setup), or 'setup <hash>' when they
    differ elsewhere (partition, alpha, ...: the runs' MLflow params hold the whole)."""
    labels: dict[tuple[str, ...], str] = {}
    for triple, part in leaderboard.groupby(list(TABLE_COLUMNS[:3]), sort=False):
        setups = list(dict.fromkeys(part["setup_hash"]))
        values = {}
        for setup in setups:
            first = setup_row(part[part["setup_hash"] == setup])
            values[setup] = {f: str(first[f]) for f in SETUP_FIELDS}
        differ = [f for f in SETUP_FIELDS if len({v[f] for v in values.values()}) > 1]
        for setup in setups:
            if len(setups) == 1:
                label = ""
            elif differ:
                label = ", ".join(f"{f} {values[setup][f]}" for f in differ)
            else:
                label = f"setup {setup}"
            labels[(*map(str, triple), str(setup))] = label
    return labels


def table_groups(leaderboard: pd.DataFrame) -> list[tuple[tuple[str, str, str, str], pd.DataFrame]]:
    """(dataset, protocol, trust, setup label) and its rows, in order of first appearance
    (`setup_labels`: '' unless the (dataset, protocol, trust) holds several setups)."""
    labels = setup_labels(leaderboard)
    return [
        ((*map(str, key[:3]), labels[tuple(map(str, key))]), part)  # type: ignore[misc]
        for key, part in leaderboard.groupby(list(TABLE_COLUMNS), sort=False)
    ]


def _note_key(row: pd.Series) -> tuple[str, ...]:
    """The key of a leaderboard row in `audit_notes`: its cell and setup_hash."""
    return tuple(str(row[c]) for c in (*CELL_COLUMNS, "setup_hash"))


def cell_tables(
    leaderboard: pd.DataFrame, notes: Mapping[tuple[str, ...], str] | None = None
) -> list[CellTable]:
    """Every table: per (dataset, protocol, trust, setup), one per metric of the protocol;
    `notes` puts each cell's audit beside it."""
    return [
        cell_table(part, metric, setup, notes)
        for (_, protocol, _, setup), part in table_groups(leaderboard)
        for metric in protocol_metrics(protocol)
    ]
