"""Suites: named grids of runs, `leaderboards/<name>.toml`, run and resumed as one job.

    suite = load_suite("dpfpl-table2")          # or a path to a .toml file
    rows = dry_run_rows(suite, out)             # one row per cell: config, paper number, ETA
    print(format_dry_run(suite, rows))
    run_suite(suite, out, log=print)            # runs the cells not finished in OUT/results.csv

A suite file (validated with pydantic, extra="forbid"; the name is the file stem):

    name, summary, paper, reference   what it reproduces
    metrics = ["local_acc", ...]      metrics whose published numbers the dry run shows
    paper_methods = {ours = "theirs"} a method's name in the paper, where it differs
    [notes]                           why a setting is what it is
    [run]                             ExperimentSpec fields shared by every cell
    [params.<method>]                 method options, as `--param METHOD.OPTION=VALUE`
    [[grid]]                          methods x datasets x eps x seeds, with its own `run`
                                      overrides (e.g. `run = { clients = 25 }`)

A grid's method or dataset may be a card file (`methods = ["coop", "cards/mine.toml"]`), a
relative path starting at the suite file's folder; its rows, and `[params.<method>]`, use the
card's name.

A cell is (method, dataset, eps, seed) plus the run fields of its grid. Machine settings
(`data_root`, `cache_dir`, `device`, `threads`) never live in the file: they come as
`overrides` from the command line, like any other field the user wants to change for a run of
the suite (e.g. `rounds=2` for a smoke run; that changes the config hash, hence the cells).

Resuming: a cell whose record key (`fpl_bench.report.records.KEY_COLUMNS`: method, learner,
scheme, dataset, protocol, trust, eps, seed, config_hash) is in OUT/results.csv with a status in
`DONE_STATUSES` is skipped. A diverged run is done (rerunning it with the same seed diverges
again); a failed one is run again. The config hash is computed exactly as `run_one` records it
(`run_records.run_config` + `run_records.config_hash`).

Time estimates (`estimate_cell`), best source first:
1. "measured": the median `wall_s` of finished rows in OUT/results.csv with the same method,
   dataset and config hash and the same privacy (eps none, or any eps), i.e. other seeds or
   budgets of the same configuration;
2. "bench": a bench file (default OUT/bench.json) of measured round times,
   `{"entries": [{"backbone": "ViT-B-16", "method": "dpfpl", "private": true,
   "round_s": 2.5, "dataset": "caltech101"}]}` (`dataset` optional: an entry without it applies
   to every dataset; one with it wins), estimate = round_s x rounds (x 1 for a method that
   trains nothing);
3. "model", shown with a leading '~': a cost model, the cell's training FLOPs
   (`estimates.training_flops`, from the dataset card's `train_images`, the backbone's text
   tower and the schedule; no data is read) over a FLOP rate, calibrated on the suite's cells
   with a measured time when there are any, else `ASSUMED_FLOPS_PER_S` for the device;
4. otherwise (the card does not say how many training images a cell with `shots = 0` uses)
   "unknown".
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator

from fpl_bench.catalog import (
    GROUPS,
    MethodChoice,
    add_preset_card,
    group_presets,
    read_toml_model,
    resolve_method,
)
from fpl_bench.data.catalog import card_path
from fpl_bench.errors import UsageError
from fpl_bench.report.records import KEY_COLUMNS, normalize_eps
from fpl_bench.spec import Epsilons, ExperimentSpec, FieldError, Seeds, build_spec, client_dp

SUITE_FOLDER = "leaderboards"
DONE_STATUSES: tuple[str, ...] = ("finished", "diverged")
# Fields a grid sets per cell, and machine settings given on the command line, not in a file.
CELL_FIELDS: tuple[str, ...] = ("methods", "dataset", "dataset_card", "eps", "seeds", "out")
MACHINE_FIELDS: tuple[str, ...] = ("data_root", "cache_dir", "device", "threads", "workers")
BENCH_FILE = "bench.json"


# ----------------------------------------------------------------------------- schema


class Grid(BaseModel):
    """methods x datasets x eps x seeds, with run-field overrides for these cells."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    methods: list[str] = Field(min_length=1)  # presets, LEARNER@SCHEME pairs, card files, ["all"]
    datasets: list[str] = Field(min_length=1)  # card names or card files
    eps: Epsilons = Field(min_length=1)  # "none" in the file = no DP
    seeds: Seeds = Field(min_length=1)
    run: dict[str, Any] = Field(default_factory=dict)

    @field_validator("methods", "datasets")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        words = [v.strip() for v in value]
        return _unique([w if card_path(w) else w.lower() for w in words], "name")


class Suite(BaseModel):
    """A named grid of runs (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    summary: str
    paper: str = ""
    reference: str = ""
    metrics: list[str] = Field(default_factory=list)
    paper_methods: dict[str, str] = Field(default_factory=dict)
    notes: dict[str, str] = Field(default_factory=dict)
    run: dict[str, Any] = Field(default_factory=dict)
    params: dict[str, dict[str, Any]] = Field(default_factory=dict)
    grid: list[Grid] = Field(min_length=1)


def _unique(values: list, what: str) -> list:
    twice = sorted({str(v) for v in values if values.count(v) > 1})
    if twice:
        raise ValueError(f"{what} {twice[0]} is listed twice; list each once")
    return values


# ----------------------------------------------------------------------------- loading


def suites_folder() -> Path:
    """`leaderboards/` of the checkout, or of the installed share dir."""
    from fpl_bench.cards import cards_root

    return cards_root() / SUITE_FOLDER


def list_suites() -> list[str]:
    """Names of the shipped suites (the .toml files in `leaderboards/`)."""
    return sorted(p.stem for p in suites_folder().glob("*.toml"))


def suite_path(name_or_path: str | Path) -> Path:
    """The file of a suite name (`leaderboards/<name>.toml`) or a path to a .toml file."""
    text = str(name_or_path)
    if text.endswith(".toml") or "/" in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise UsageError(f"suite file {path} does not exist")
        return path
    path = suites_folder() / f"{text}.toml"
    if not path.is_file():
        raise UsageError(
            f"unknown suite {text!r}; known: {', '.join(list_suites())} (or a path to a .toml)"
        )
    return path


def load_suite(name_or_path: str | Path) -> Suite:
    """Read and validate a suite: schema, run fields, methods and their options, datasets,
    and every cell's ExperimentSpec. Any problem is one UsageError line naming the file."""
    path = suite_path(name_or_path)
    suite = _anchor_card_files(read_toml_model(path, Suite, what="suite"), path.parent)
    try:
        _check(suite)
    except UsageError as err:
        raise UsageError(f"bad suite {path}: {err}") from None
    return suite


def _anchor_card_files(suite: Suite, folder: Path) -> Suite:
    """The suite with the card files of its grids as absolute paths (relative to `folder`)."""

    def anchored(words: list[str]) -> list[str]:
        return [str(folder / Path(w).expanduser()) if card_path(w) else w for w in words]

    grids = [
        grid.model_copy(
            update={"methods": anchored(grid.methods), "datasets": anchored(grid.datasets)}
        )
        for grid in suite.grid
    ]
    return suite.model_copy(update={"grid": grids})


def _check(suite: Suite) -> None:
    """Everything a dry run needs, checked before anything runs."""
    from fpl_bench.report.records import METRIC_COLUMNS

    for metric in suite.metrics:
        if metric not in METRIC_COLUMNS:
            raise UsageError(f"metrics: unknown {metric!r}; known: {', '.join(METRIC_COLUMNS)}")
    _check_run_fields(suite.run, "run")
    used = {name for grid in suite.grid for name in _method_names(grid.methods)}
    for name in suite.params:
        if name not in used:
            raise UsageError(f"params.{name}: no grid runs method {name!r}")
    for index, grid in enumerate(suite.grid):
        _check_run_fields(grid.run, f"grid.{index}.run")
        names = _method_names(grid.methods, client_dp=_grid_client_dp(suite, index, {}))
        for dataset in grid.datasets:
            _grid_spec(suite, index, dataset, names, overrides={})


def _check_run_fields(fields: Mapping[str, Any], where: str) -> None:
    known = set(ExperimentSpec.model_fields) - set(CELL_FIELDS) - set(MACHINE_FIELDS)
    for key in fields:
        if key in MACHINE_FIELDS:
            raise UsageError(f"{where}.{key}: a machine setting; give it on the command line")
        if key in CELL_FIELDS:
            raise UsageError(f"{where}.{key}: set by the grid (methods, datasets, eps, seeds)")
        if key not in known:
            raise UsageError(f"{where}.{key}: not a run setting; known: {', '.join(sorted(known))}")


def _method_names(methods: Sequence[str], *, client_dp: bool = False) -> list[str]:
    """A grid's methods: a group's presets for ["all"] or ["default"] (`group_presets`), a card
    file by its card's name."""
    if len(methods) == 1 and methods[0] in GROUPS:
        return group_presets(methods[0], client_dp=client_dp)
    return [m if card_path(m) is None else add_preset_card(m) for m in methods]


def _grid_fields(suite: Suite, index: int, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The run settings of grid `index`: the suite's, the grid's over them, then `overrides`."""
    return {**suite.run, **suite.grid[index].run, **overrides}


def _grid_client_dp(suite: Suite, index: int, overrides: Mapping[str, Any]) -> bool:
    """Whether grid `index` runs DP under the client trust model."""
    trust = _grid_fields(suite, index, overrides).get("trust", "server")
    return client_dp(trust, suite.grid[index].eps)


def _check_overrides(overrides: Mapping[str, Any]) -> None:
    for key in overrides:
        if key in CELL_FIELDS or key not in ExperimentSpec.model_fields:
            raise UsageError(f"cannot override {key!r} for a suite; the suite's grid sets it")


# ----------------------------------------------------------------------------- cells


@dataclass(frozen=True)
class Cell:
    """One run of a suite: (method, dataset, eps, seed) and the spec of its grid."""

    grid: int
    method: MethodChoice
    dataset: str
    eps: float | None
    seed: int
    spec: ExperimentSpec  # the grid's spec for this dataset (all its methods, eps, seeds)
    config: dict[str, Any]  # run_records.run_config: what the config hash covers
    config_hash: str
    paper: dict[str, float | None]  # metric -> published number (fraction) or None

    @property
    def key(self) -> dict[str, Any]:
        """The record key (KEY_COLUMNS) `run_one` writes for this cell."""
        return {
            "method": self.method.label,
            "learner": self.method.learner,
            "scheme": self.method.scheme,
            "dataset": self.dataset,
            "protocol": self.spec.protocol,
            "trust": self.spec.trust,
            "eps": normalize_eps(self.eps),
            "seed": self.seed,
            "config_hash": self.config_hash,
        }


def key_id(key: Mapping[str, Any]) -> tuple[str, ...]:
    """A record key as a tuple of canonical strings (eps normalised)."""
    return tuple(
        normalize_eps(key[c]) if c == "eps" else str(int(key[c])) if c == "seed" else str(key[c])
        for c in KEY_COLUMNS
    )


@dataclass(frozen=True)
class CellFilter:
    """A subset of a suite's cells: the methods, eps values ('none', '0.5') and seeds to keep
    (None keeps all), e.g. `fpl-bench run --suite embedded --methods promptfl --eps none`."""

    methods: tuple[str, ...] | None = None
    eps: tuple[str, ...] | None = None
    seeds: tuple[int, ...] | None = None

    def keeps(self, cell: Cell) -> bool:
        return (
            (self.methods is None or cell.method.label in self.methods)
            and (self.eps is None or normalize_eps(cell.eps) in self.eps)
            and (self.seeds is None or cell.seed in self.seeds)
        )

    def check(self, suite: Suite, cells: Sequence[Cell]) -> None:
        """UsageError naming a value of the filter that no cell of the suite has."""
        for flag, wanted, present in (
            ("--methods", self.methods, [c.method.label for c in cells]),
            ("--eps", self.eps, [normalize_eps(c.eps) for c in cells]),
            ("--seeds", self.seeds, [c.seed for c in cells]),
        ):
            missing = [w for w in wanted or () if w not in present]
            if missing:
                has = ", ".join(map(str, dict.fromkeys(present)))
                raise UsageError(
                    f"{flag} {','.join(map(str, missing))}: suite {suite.name} has no such "
                    f"cell; it has {has}"
                )


def suite_cells(
    suite: Suite,
    *,
    overrides: Mapping[str, Any] | None = None,
    out: Path | None = None,
    only: CellFilter | None = None,
) -> list[Cell]:
    """Every cell of the suite (those `only` keeps), in table order: grid, dataset, method,
    eps, seed."""
    from fpl_bench.run_records import config_hash, run_config

    overrides = dict(overrides or {})
    _check_overrides(overrides)
    cells: list[Cell] = []
    for index, grid in enumerate(suite.grid):
        names = _method_names(grid.methods, client_dp=_grid_client_dp(suite, index, overrides))
        for dataset in grid.datasets:
            spec = _grid_spec(suite, index, dataset, names, overrides=overrides, out=out)
            for choice in spec.methods:
                config = run_config(spec, choice)
                digest = config_hash(config)
                for eps in grid.eps:
                    paper = _paper_numbers(suite, spec, choice.label, eps)
                    cells.extend(  # the spec's dataset: a card file's is its card's name
                        Cell(index, choice, spec.dataset, eps, seed, spec, config, digest, paper)
                        for seed in grid.seeds
                    )
    if only is None:
        return cells
    only.check(suite, cells)
    return [cell for cell in cells if only.keeps(cell)]


def _grid_spec(
    suite: Suite,
    index: int,
    dataset: str,
    names: Sequence[str],
    *,
    overrides: Mapping[str, Any],
    out: Path | None = None,
) -> ExperimentSpec:
    """The ExperimentSpec of one grid on one dataset (all its methods, eps and seeds)."""
    from fpl_bench.cards import dataset_card

    grid = suite.grid[index]
    where = f"grid.{index} {dataset}"
    dataset_card(dataset)  # an unknown dataset lists the known ones
    fields = _grid_fields(suite, index, overrides)
    methods = tuple(resolve_method(name, suite.params.get(name)) for name in names)
    fields.update(methods=methods, dataset=dataset, eps=grid.eps, seeds=grid.seeds)
    if out is not None:
        fields["out"] = out
    try:
        spec = build_spec(**fields)
    except FieldError as err:
        raise UsageError(f"{where}: {err}") from None
    _check_tokens(spec, where)
    return spec


def _check_tokens(spec: ExperimentSpec, where: str) -> None:
    """A learner that scores patch tokens (FedOTP's OT) needs a ViT image tower."""
    from fpl_bench.backbone import register_model_configs, resolve_model_name
    from fpl_bench.learners import LEARNERS

    scoring = [m.label for m in spec.methods if LEARNERS.get(m.learner).needs_tokens]
    if not scoring or spec.backbone.lower().endswith(".json"):
        return
    register_model_configs()
    import open_clip

    vision = open_clip.get_model_config(resolve_model_name(spec.backbone))["vision_cfg"]
    if isinstance(vision.get("layers"), list | tuple) or "timm_model_name" in vision:
        raise UsageError(
            f"{where}: {scoring[0]} scores image patch tokens, which backbone {spec.backbone} "
            "does not give (not a ViT); drop the method or use a ViT backbone"
        )


def _paper_numbers(
    suite: Suite, spec: ExperimentSpec, label: str, eps: float | None
) -> dict[str, float | None]:
    """The paper's number for each of the suite's metrics (None where it published none, or
    where the cell is outside the paper's protocol and trust model)."""
    from fpl_bench.report.paper import applies, paper_number

    in_setting = applies(spec.protocol, spec.trust, normalize_eps(eps))
    method = suite.paper_methods.get(label, label)
    return {
        metric: paper_number(spec.dataset, method, eps, metric, clients=spec.clients)
        if in_setting
        else None
        for metric in suite.metrics
    }


# ----------------------------------------------------------------------------- records


def read_records(out: Path) -> pd.DataFrame | None:
    """OUT/results.csv (validated), or None when there is none yet."""
    from fpl_bench.report.records import read_results

    path = Path(out) / "results.csv"
    return read_results(path) if path.is_file() else None


def cell_statuses(cells: Iterable[Cell], records: pd.DataFrame | None) -> list[str]:
    """Each cell's status in the records: finished, diverged, failed, or pending (no row)."""
    status: dict[tuple[str, ...], str] = {}
    if records is not None:
        for row in records[[*KEY_COLUMNS, "status"]].to_dict("records"):
            status[key_id(row)] = str(row["status"])
    return [status.get(key_id(cell.key), "pending") for cell in cells]


def pending_cells(
    suite: Suite,
    out: Path,
    *,
    overrides: Mapping[str, Any] | None = None,
    only: CellFilter | None = None,
) -> list[Cell]:
    """The cells (kept by `only`) without a done record (`DONE_STATUSES`) in OUT/results.csv."""
    cells = suite_cells(suite, overrides=overrides, out=out, only=only)
    statuses = cell_statuses(cells, read_records(out))
    return [c for c, s in zip(cells, statuses, strict=True) if s not in DONE_STATUSES]


def pending_specs(
    suite: Suite,
    out: Path,
    *,
    overrides: Mapping[str, Any] | None = None,
    only: CellFilter | None = None,
) -> list[ExperimentSpec]:
    """ExperimentSpecs that run exactly the pending cells.

    Cells of one grid and dataset share data, backbone and schedule, so they go into as few
    specs as possible (each spec runs methods x eps x seeds, so a partly finished group is cut
    into such blocks); the on-disk feature cache is shared by all of them.
    """
    groups: dict[tuple[int, str], list[Cell]] = {}
    for cell in pending_cells(suite, out, overrides=overrides, only=only):
        groups.setdefault((cell.grid, cell.dataset), []).append(cell)
    return [spec for cells in groups.values() for spec in _block_specs(cells)]


def _block_specs(cells: Sequence[Cell]) -> list[ExperimentSpec]:
    """Cut one group's pending cells into method x eps x seed blocks, one spec each."""
    base = cells[0].spec
    order = {m.label: i for i, m in enumerate(base.methods)}
    methods_of: dict[tuple[float | None, int], list[MethodChoice]] = {}
    for cell in cells:
        methods_of.setdefault((cell.eps, cell.seed), []).append(cell.method)
    # (methods) -> seed -> eps list, then seeds with the same eps list share a block
    blocks: dict[tuple[str, ...], dict[int, list[float | None]]] = {}
    for (eps, seed), methods in methods_of.items():
        labels = tuple(sorted((m.label for m in methods), key=order.__getitem__))
        blocks.setdefault(labels, {}).setdefault(seed, []).append(eps)
    specs = []
    for labels, eps_by_seed in blocks.items():
        seeds_by_eps: dict[tuple[float | None, ...], list[int]] = {}
        for seed, eps_list in eps_by_seed.items():
            seeds_by_eps.setdefault(tuple(eps_list), []).append(seed)
        chosen = tuple(m for m in base.methods if m.label in labels)
        for eps_list, seeds in seeds_by_eps.items():
            specs.append(
                base.model_copy(update={"methods": chosen, "eps": eps_list, "seeds": tuple(seeds)})
            )
    return specs


# ----------------------------------------------------------------------------- estimates


def load_bench(path: Path | None) -> list[dict[str, Any]]:
    """The entries of a bench file (see the module docstring); [] when there is none."""
    if path is None or not Path(path).is_file():
        return []
    try:
        entries = [_bench_entry(e) for e in json.loads(Path(path).read_text())["entries"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(
            f"bench file {path} is not {{'entries': [{{backbone, method, private, round_s}}]}}"
            f" ({type(err).__name__}: {err})"
        ) from None
    return entries


def _bench_entry(entry: Mapping[str, Any]) -> dict[str, Any]:
    """One bench entry with its types checked (KeyError / ValueError / TypeError if bad)."""
    out = {
        "backbone": str(entry["backbone"]),
        "method": str(entry["method"]),
        "private": bool(entry["private"]),
        "round_s": float(entry["round_s"]),
        "dataset": None if entry.get("dataset") is None else str(entry["dataset"]),
    }
    if not (out["round_s"] >= 0 and math.isfinite(out["round_s"])):
        raise ValueError(f"round_s {out['round_s']} must be a finite number >= 0")
    return out


def estimate_cell(
    cell: Cell, records: pd.DataFrame | None, bench: Sequence[Mapping[str, Any]]
) -> tuple[float | None, str]:
    """(seconds or None, source) for one cell: measured, bench, or unknown (module doc)."""
    private = cell.eps is not None
    if records is not None and len(records):
        same = records[
            (records["status"] == "finished")
            & (records["method"] == cell.method.label)
            & (records["dataset"] == cell.dataset)
            & (records["config_hash"] == cell.config_hash)
            & ((records["eps"] != "none") == private)
        ]
        walls = [w for w in same["wall_s"].astype(float) if math.isfinite(w)]
        if walls:
            return float(statistics.median(walls)), f"measured ({len(walls)} runs)"
    matches = [
        e
        for e in bench
        if e["backbone"] == cell.spec.backbone
        and e["method"] == cell.method.label
        and bool(e["private"]) == private
        and e.get("dataset") in (None, cell.dataset)
    ]
    if matches:
        best = max(matches, key=lambda e: e.get("dataset") == cell.dataset)
        from fpl_bench.learners import LEARNERS

        rounds = cell.spec.rounds if LEARNERS.get(cell.method.learner).trains else 1
        return float(best["round_s"]) * rounds, "bench"
    return None, "unknown"


# Training FLOP/s (as `cell_flops` counts them) a model estimate assumes until a cell of the
# suite has a measured time. cpu: one core on a private CoOp step of the embedded default
# (3.5 GFLOP by this count, 55 ms measured: README "Speed"); cuda: an assumption for small
# bf16 tower passes, not measured by this project yet.
ASSUMED_FLOPS_PER_S = {"cpu": 6e10, "cuda": 2.5e13}
# Token rows per class after the shared prefix: the class name, '.' and EOT (the longest name
# sets the truncated length for all); assumed, since a dry run reads no class names.
SUFFIX_TOKENS = 8


def cell_flops(cell: Cell) -> float | None:
    """Training FLOPs of one cell from the cost model (`estimates.training_flops`), without its
    data: the clients share the seen classes' training images equally (the dataset card's
    `train_images`, or `shots` per class and client when that is fewer), and one tower pass
    costs 24 W^2 per token row and layer as `TextTower.pass_flops` counts it, with W and the
    depth from the backbone's model config. None when the card gives no `train_images` and the
    cell trains on all of them (`shots = 0`)."""
    from fpl_bench.cards import dataset_card
    from fpl_bench.estimates import training_flops

    spec = cell.spec
    card = dataset_card(spec.dataset_source())
    if card.classes is None:  # counted from the class folders: not known before reading them
        return None
    seen = math.ceil(card.classes / 2) if spec.protocol == "base2novel" else card.classes
    pool = None if card.train_images is None else card.train_images * seen / card.classes
    if spec.shots > 0:
        holders = 1 if spec.partition == "pathological" else spec.clients  # clients per class
        wanted = spec.shots * seen * holders
        pool = wanted if pool is None else min(pool, wanted)
    if pool is None:
        return None
    width, layers = _text_tower_shape(spec.backbone)
    rows = 1 + spec.n_ctx + seen * SUFFIX_TOKENS
    return training_flops(
        spec=spec,
        choice=cell.method,
        eps=cell.eps,
        client_sizes=[max(1, round(pool / spec.clients))] * spec.clients,
        pass_flops=24.0 * width**2 * layers * rows,
    )


@cache
def _text_tower_shape(backbone: str) -> tuple[int, int]:
    """(width, layers) of the backbone's text tower, from its open_clip model config."""
    import open_clip

    from fpl_bench.backbone import register_model_configs, resolve_model_name

    register_model_configs()
    text = open_clip.get_model_config(resolve_model_name(backbone))["text_cfg"]
    return int(text.get("width", 512)), int(text.get("layers", 12))


def assumed_rate(device: str) -> tuple[float, str]:
    """(FLOP/s, device kind) a model estimate assumes for a spec's `device` (auto: CUDA when
    this machine sees one)."""
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = "cuda" if device.startswith("cuda") else "cpu"
    return ASSUMED_FLOPS_PER_S[kind], kind


def _rate_text(rate: float) -> str:
    """'25 TFLOP/s', '60 GFLOP/s'."""
    return f"{rate / 1e12:g} TFLOP/s" if rate >= 1e12 else f"{rate / 1e9:g} GFLOP/s"


def format_seconds(seconds: float | None) -> str:
    """'unknown', '45 s', '12 min', '3.2 h' or '23 days'."""
    if seconds is None:
        return "unknown"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


# ----------------------------------------------------------------------------- dry run


def dry_run_rows(
    suite: Suite,
    out: Path,
    *,
    overrides: Mapping[str, Any] | None = None,
    bench: Path | None = None,
    only: CellFilter | None = None,
    device: str | None = None,
) -> list[dict[str, Any]]:
    """One row per cell: key, status in OUT/results.csv, resolved config, the paper's numbers
    (`paper_<metric>`), and an estimate of its wall time (`estimate_s`, `estimate`,
    `estimate_source`). `bench` defaults to OUT/bench.json. `device`: where the model's
    estimates assume the runs execute (default: each cell's device, auto as this machine)."""
    out = Path(out)
    cells = suite_cells(suite, overrides=overrides, out=out, only=only)
    records = read_records(out)
    entries = load_bench(bench if bench is not None else out / BENCH_FILE)
    estimates = [estimate_cell(cell, records, entries) for cell in cells]
    flops = [cell_flops(cell) for cell in cells]
    # the model's rate: FLOPs per second of the suite's finished runs, if any
    walls: dict[tuple[str, ...], float] = {}
    if records is not None:
        finished = records[records["status"] == "finished"]
        for row in finished[[*KEY_COLUMNS, "wall_s"]].to_dict("records"):
            walls[key_id(row)] = float(row["wall_s"])
    measured = [
        f / walls[key_id(cell.key)]
        for cell, f in zip(cells, flops, strict=True)
        if f and walls.get(key_id(cell.key), 0) > 0 and math.isfinite(walls[key_id(cell.key)])
    ]
    rows = []
    for cell, status, (seconds, source), f in zip(
        cells, cell_statuses(cells, records), estimates, flops, strict=True
    ):
        if seconds is None and f is not None:
            if measured:
                rate = statistics.median(measured)
                source = f"model (calibrated on {len(measured)} runs)"
            else:
                rate, kind = assumed_rate(device or cell.spec.device)
                source = f"model (assumed {_rate_text(rate)} on {kind})"
            seconds = f / rate
        rows.append(
            {
                "suite": suite.name,
                "grid": cell.grid,
                **cell.key,
                "status": status,
                **{f"paper_{m}": v for m, v in cell.paper.items()},
                "estimate_s": seconds,
                "estimate": ("~" if source.startswith("model") else "") + format_seconds(seconds),
                "estimate_source": source,
                "config": cell.config,
            }
        )
    return rows


def format_dry_run(suite: Suite, rows: Sequence[Mapping[str, Any]]) -> str:
    """A plain-text listing: a header, each distinct config once, then one line per cell."""
    todo = [r for r in rows if r["status"] not in DONE_STATUSES]
    known = [r["estimate_s"] for r in todo if r["estimate_s"] is not None]
    unknown = len(todo) - len(known)
    sources: dict[str, int] = {}
    for row in todo:
        sources[row["estimate_source"]] = sources.get(row["estimate_source"], 0) + 1
    lines = [
        f"suite {suite.name}: {len(rows)} cells, {len(rows) - len(todo)} done, {len(todo)} to "
        f"run; estimated {format_seconds(sum(known)) if known else 'unknown'}"
        + (f" (+{unknown} cells of unknown time)" if known and unknown else ""),
        suite.summary,
    ]
    if sources:
        modelled = any(source.startswith("model") for source in sources)
        lines.append(
            "estimates: "
            + "; ".join(f"{source}: {n} cells" for source, n in sources.items())
            + (MODEL_NOTE if modelled else "")
        )
    configs: dict[str, dict[str, Any]] = {}
    for row in rows:
        configs.setdefault(row["config_hash"], row["config"])
    lines.append("configs:")
    for digest, config in configs.items():
        shown = " ".join(f"{k}={_show(v)}" for k, v in config.items() if v not in (None, {}))
        lines.append(f"  [{digest}] {shown}")
    metrics = [k for k in rows[0] if k.startswith("paper_")] if rows else []
    header = ["dataset", "method", "eps", "seed", "status", *metrics, "estimate", "config"]
    lines.append("  ".join(header))
    for row in rows:
        papers = ["-" if row[m] is None else f"{100 * row[m]:.2f}" for m in metrics]
        lines.append(
            "  ".join(
                [
                    row["dataset"],
                    row["method"],
                    row["eps"],
                    str(row["seed"]),
                    row["status"],
                    *papers,
                    row["estimate"],
                    row["config_hash"],
                ]
            )
        )
    return "\n".join(lines)


MODEL_NOTE = (
    " ('~': training FLOPs over a FLOP rate, evaluation and feature encoding left out; once"
    " cells finish in OUT the rate is calibrated on them)"
)


def _show(value: Any) -> str:
    return (
        json.dumps(value, separators=(",", ":")) if isinstance(value, dict | list) else str(value)
    )


# ----------------------------------------------------------------------------- run


def run_suite(
    suite: Suite,
    out: Path,
    *,
    log: Callable[[str], None] = print,
    overrides: Mapping[str, Any] | None = None,
    progress: Callable[[ExperimentSpec], Any] | None = None,
    only: CellFilter | None = None,
    executor: Any = None,
) -> pd.DataFrame:
    """Run every pending cell (`pending_specs`) into OUT; returns the rows of this call.

    `progress(spec)` may build a per-spec `experiment.JobProgress` (e.g. the CLI's
    `TqdmProgress`); it is closed (if it has `close`) when that spec's job ends.
    Interrupted, the finished cells are in OUT/results.csv and the next call skips them.
    `executor` (an `executors.options.ExecutorChoice`, not local) runs the cells on a
    cluster instead, as one job (`executors.dispatch.run_on_cluster`).
    """
    from fpl_bench.experiment import run_experiment
    from fpl_bench.report.records import RESULT_COLUMNS

    specs = pending_specs(suite, Path(out), overrides=overrides, only=only)
    total = sum(len(s.methods) * len(s.eps) * len(s.seeds) for s in specs)
    log(f"suite {suite.name}: {total} cells to run in {len(specs)} jobs, into {out}")
    if executor is not None and specs:
        from fpl_bench.executors.dispatch import run_on_cluster

        return run_on_cluster(specs, executor, log=log)
    frames = []
    for index, spec in enumerate(specs, start=1):
        log(
            f"job {index}/{len(specs)}: {spec.dataset}, {len(spec.methods)} methods x "
            f"{len(spec.eps)} eps x {len(spec.seeds)} seeds"
        )
        bar = progress(spec) if progress else None
        try:
            frames.append(run_experiment(spec, log=log, progress=bar))
        finally:
            if bar is not None and hasattr(bar, "close"):
                bar.close()
    if not frames:
        return pd.DataFrame(columns=list(RESULT_COLUMNS))
    return pd.concat(frames, ignore_index=True)
