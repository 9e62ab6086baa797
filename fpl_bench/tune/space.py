"""What is searched: a preset card's `[search]` table as `SearchParam`s, checked before any
training (`check_search_space`); a trial's values (`suggest`) and where they go (`split_values`,
`spec_with`); the TPE sampler and the median pruner that choose and stop trials."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna

from fpl_bench.catalog import (
    RUN_SEARCH_KEYS,
    MethodChoice,
    SearchRange,
    learner_cards,
    preset_cards,
    resolve_method,
    scheme_cards,
)
from fpl_bench.errors import UsageError
from fpl_bench.spec import ExperimentSpec, build_spec

RUN_KINDS: dict[str, type] = {
    "lr": float,
    "clip_norm": float,
    "local_epochs": int,
    "n_ctx": int,
    "batch_size": int,
}


@dataclass(frozen=True)
class SearchParam:
    """One entry of a card's [search] table: what it sets ('run', 'learner', 'scheme'), the
    value's type and its range."""

    key: str  # as on the card: "lr", "scheme.rank"
    target: str
    kind: type
    space: SearchRange


def search_space(method: str) -> list[SearchParam]:
    """The preset card's [search] table, checked; UsageError (one line) when there is none or
    an entry cannot be sampled."""
    presets = preset_cards()
    if method not in presets:
        raise UsageError(
            f"{method} cannot be tuned: only presets have a [search] table "
            f"(fpl-bench methods lists them)"
        )
    card = presets[method]
    if not card.search:
        raise UsageError(f"{method} cannot be tuned: methods/{method}.toml has no [search] table")
    params = []
    for key, space in card.search.items():
        if key in RUN_SEARCH_KEYS:
            target, kind = "run", RUN_KINDS[key]
        else:
            target, _, option = key.partition(".")
            cards = learner_cards() if target == "learner" else scheme_cards()
            component = card.learner if target == "learner" else card.scheme
            kind = cards[component].options[option].kind
        param = SearchParam(key, target, kind, space)
        _check_range(method, param)
        params.append(param)
    return params


def card_search(method: str) -> dict[str, SearchRange]:
    return dict(preset_cards()[method].search)


def _check_range(method: str, param: SearchParam) -> None:
    where = f"methods/{method}.toml [search] {param.key}"
    space = param.space
    if space.choices is not None:
        return
    if space.low is None or space.high is None or space.low > space.high:
        raise UsageError(f"{where}: low {space.low} > high {space.high}; swap them")
    if param.kind not in (int, float):
        raise UsageError(f"{where}: a {param.kind.__name__} option needs choices = [...]")
    if space.log and space.step is not None:
        raise UsageError(f"{where}: give log = true or step, not both")
    if param.kind is int and not all(float(v).is_integer() for v in (space.low, space.high)):
        raise UsageError(f"{where}: integer option with bounds {space.low}, {space.high}")


def endpoint_values(param: SearchParam) -> list[Any]:
    """The values a search entry can reach at its edges (or all its choices)."""
    space = param.space
    if space.choices is not None:
        return list(space.choices)
    return [param.kind(space.low), param.kind(space.high)]


def check_search_space(method: str, base: ExperimentSpec) -> list[SearchParam]:
    """`search_space`, with every edge value checked by the same validators as a run (option
    bounds, spec fields), so a bad range fails before any training."""
    params = search_space(method)
    for param in params:
        for value in endpoint_values(param):
            try:
                if param.target == "run":
                    spec_with(base, {param.key: value}, resolve_method(method))
                else:
                    resolve_method(method, {param.key: value})
            except UsageError as err:
                raise UsageError(f"methods/{method}.toml [search] {param.key}: {err}") from None
    return params


def suggest(trial: optuna.Trial, params: list[SearchParam]) -> dict[str, Any]:
    """One value per search entry, keyed as on the card."""
    values = {}
    for param in params:
        space = param.space
        if space.choices is not None:
            values[param.key] = trial.suggest_categorical(param.key, space.choices)
        elif param.kind is int:
            step = int(space.step or 1)
            values[param.key] = trial.suggest_int(
                param.key, int(space.low), int(space.high), step=step, log=space.log
            )
        else:
            values[param.key] = trial.suggest_float(
                param.key, space.low, space.high, step=space.step, log=space.log
            )
    return values


def split_values(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """{card key: value} -> (run settings for the spec, learner./scheme. method overrides)."""
    run = {k: v for k, v in values.items() if k in RUN_SEARCH_KEYS}
    return run, {k: v for k, v in values.items() if k not in RUN_SEARCH_KEYS}


def spec_with(base: ExperimentSpec, run: dict[str, Any], choice: MethodChoice, **extra: Any):
    """`base` with the run settings `run`, the one method `choice` and `extra` fields, checked
    by the spec's validators."""
    fields = {name: getattr(base, name) for name in type(base).model_fields}
    return build_spec(**{**fields, **run, "methods": (choice,), **extra})


def sampler_seed(study_seed: int, worker_index: int) -> int:
    """A 32-bit seed from (study seed, worker index); workers of a study never share one."""
    return int(np.random.SeedSequence([study_seed, worker_index]).generate_state(1)[0])


def make_pruner(trials: int) -> optuna.pruners.BasePruner:
    """MedianPruner: a trial stops when its metric at an evaluation round is below the median
    of earlier trials at that round; it needs a few complete trials first."""
    return optuna.pruners.MedianPruner(n_startup_trials=max(1, min(5, trials // 4)))


def make_sampler(trials: int, seed: int) -> optuna.samplers.BaseSampler:
    """TPE; random for its first third of a small budget (at most 10); a constant liar so that
    parallel workers spread out."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=max(2, min(10, trials // 3)), constant_liar=True
        )
