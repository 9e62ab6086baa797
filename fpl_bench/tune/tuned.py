"""Using the studies (`fpl-bench run --tuned`): each study's best parameters over the run's own
settings (`tuned_specs`), read from --storage or from the output folder's storages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna

from fpl_bench.catalog import resolve_method
from fpl_bench.errors import UsageError
from fpl_bench.spec import ExperimentSpec
from fpl_bench.tune.space import card_search, spec_with, split_values
from fpl_bench.tune.storage import StorageTarget, check_storage, open_storage, parse_storage
from fpl_bench.tune.study import DEFAULT_PREFIX, best_trial, study_name


def reading_targets(storage: str | None, out: Path) -> list[StorageTarget]:
    """Storages to look for studies in: --storage, else OUT/optuna.db and OUT/optuna.journal
    (those that exist)."""
    if storage is not None:
        target = parse_storage(storage, out=out)
        check_storage(target, create=False)
        return [target]
    candidates = [parse_storage(None, out=out), parse_storage(None, out=out, workers=2)]
    return [t for t in candidates if t.file is not None and t.file.is_file()]


def best_params(storage: str | StorageTarget, study_name: str, *, out: Path = Path(".")) -> dict:
    """The best COMPLETE trial's parameters of a study, keyed as on the card ('lr',
    'scheme.rank'); UsageError when the study or a complete trial is missing."""
    target = storage if isinstance(storage, StorageTarget) else parse_storage(storage, out=out)
    names = optuna.get_all_study_names(open_storage(target))
    if study_name not in names:
        raise UsageError(
            f"no study {study_name} in {target.shown}; run `fpl-bench tune` for it first"
        )
    best = best_trial(optuna.load_study(study_name=study_name, storage=open_storage(target)))
    if best is None:
        raise UsageError(f"study {study_name} in {target.shown} has no complete trial yet")
    return dict(best.params)


def tuned_specs(
    spec: ExperimentSpec, *, storage: str | None = None, prefix: str = DEFAULT_PREFIX
) -> list[ExperimentSpec]:
    """One spec per (method, eps) of `spec`, with that study's best parameters over the run's
    own settings, marked tuned=True. A method without a [search] table runs as it is (nothing
    to tune) and is marked tuned too."""
    from fpl_bench.run_records import setup_hash

    targets = reading_targets(storage, Path(spec.out))
    setup = setup_hash(spec)
    specs = []
    for choice in spec.methods:
        for eps in spec.eps:
            values = {}
            if choice.preset is not None and card_search(choice.label):
                name = study_name(
                    prefix,
                    method=choice.label,
                    dataset=spec.dataset,
                    protocol=spec.protocol,
                    trust=spec.trust,
                    eps=eps,
                )
                values = _best_anywhere(targets, name, storage, Path(spec.out))
            run, overrides = split_values(values)
            tuned = resolve_method(choice.label, {**choice.options(), **overrides})
            specs.append(spec_with(spec, run, tuned, eps=(eps,), tuned=True, tuned_from=setup))
    return specs


def _best_anywhere(
    targets: list[StorageTarget], name: str, storage: str | None, out: Path
) -> dict[str, Any]:
    for target in targets:
        if name in optuna.get_all_study_names(open_storage(target)):
            return best_params(target, name)
    where = storage or f"{out}/optuna.db or {out}/optuna.journal"
    raise UsageError(
        f"no study {name} in {where}; tune it first (fpl-bench tune --out {out}) or give "
        "--storage and --study"
    )
