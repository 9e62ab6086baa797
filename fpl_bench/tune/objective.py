"""One trial: `Objective` trains the run being tuned for (`train_seed`, its first
`trial_rounds` rounds per seed, on the validation split), reports each evaluation to the
pruner, and returns the mean over seeds of the last-k mean of the metric. `Workbench` is what a
worker keeps across trials."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import optuna

from fpl_bench.catalog import MethodChoice, resolve_method
from fpl_bench.spec import ExperimentSpec
from fpl_bench.tune.space import SearchParam, spec_with, split_values, suggest
from fpl_bench.tune.storage import StudyLock
from fpl_bench.tune.study import TuneJob


def train_seed(
    prep: Any,
    fed: Any,
    choice: MethodChoice,
    eps: float | None,
    seed: int,
    on_eval: Callable[[int, dict[str, float]], None] | None,
    *,
    trial_rounds: int | None = None,
    plans: dict[tuple, Any] | None = None,
) -> tuple[list[dict[str, float]], Any]:
    """The first `trial_rounds` rounds (all when None) of the federated run `prep.spec`
    describes, set up as `fpl_bench.experiment.run_one` does, without tracking. Under DP the
    noise is calibrated for all `spec.rounds` rounds, so a trial trains at the noise level of
    the run it tunes for. Returns (evaluation history, privacy ledger of the full run or None).

    `plans` memoizes the calibration, a pure function of the clients' (sample rate, steps) and
    the privacy settings that takes seconds: trials that differ only in lr share it.
    """
    import torch

    from fpl_bench.driver import NoisePlan
    from fpl_bench.estimates import set_threads
    from fpl_bench.experiment import federated_run, plan_run_privacy, schedule_of
    from fpl_bench.method import build_method

    spec = prep.spec
    method = build_method(choice)
    full = schedule_of(spec)
    # every evaluation of the trial's rounds: the pruner reads them all
    schedule = replace(full, rounds=min(trial_rounds or spec.rounds, spec.rounds), eval_last=None)
    torch.manual_seed(seed)
    private = eps is not None and method.trains
    set_threads(spec, private=private, device=prep.device)

    run = federated_run(prep, fed, method, seed, schedule)
    ledger = None
    if private:
        planned = run if schedule == full else federated_run(prep, fed, method, seed, full)
        key = (tuple(sorted(set(planned.budget()))), eps, spec.delta, spec.clip_norm)
        key += (spec.rounds, spec.accountant)
        plans = {} if plans is None else plans
        if key not in plans:
            plans[key] = plan_run_privacy(planned, spec, eps)
        ledger = plans[key]
        run.enable_privacy(
            NoisePlan(noise_multiplier=ledger.noise_multiplier, clip_norm=spec.clip_norm)
        )
    return run.run(on_eval=on_eval).history, ledger


@dataclass
class Workbench:
    """What a worker keeps across trials: prepared data and features, federations by seed,
    text towers by n_ctx, noise calibrations."""

    prep: Any
    feds: dict[int, Any] = field(default_factory=dict)
    towers: dict[int, Any] = field(default_factory=dict)
    plans: dict[tuple, Any] = field(default_factory=dict)

    def federation(self, seed: int) -> Any:
        from fpl_bench.prepare import federation

        if seed not in self.feds:
            self.feds[seed] = federation(self.prep, seed)
        return self.feds[seed]

    def for_spec(self, spec: ExperimentSpec) -> Any:
        """The prepared data with this trial's spec (and a tower for its n_ctx)."""
        from fpl_bench.text_tower import TextTower

        prep = self.prep
        if spec.n_ctx == prep.spec.n_ctx:
            return replace(prep, spec=spec)
        if spec.n_ctx not in self.towers:
            model, tokenizer = prep.backbone.model, prep.backbone.tokenizer
            self.towers[spec.n_ctx] = TextTower.build(
                model, tokenizer, prep.splits.classnames, n_ctx=spec.n_ctx
            )
        return replace(prep, spec=spec, tower=self.towers[spec.n_ctx])


class Objective:
    """The study's objective: one trial = one federated run per seed on the validation split."""

    def __init__(
        self,
        job: TuneJob,
        bench: Workbench,
        choice: MethodChoice,
        eps: float | None,
        params: list[SearchParam],
        lock: StudyLock,
    ) -> None:
        self.job, self.bench, self.choice, self.eps = job, bench, choice, eps
        self.params, self.lock = params, lock

    def __call__(self, trial: optuna.Trial) -> float:
        from fpl_bench.driver import Diverged
        from fpl_bench.evaluate import final_metrics

        self.lock.release()  # the trial exists now: other workers may count it
        t0 = time.perf_counter()
        run, overrides = split_values(suggest(trial, self.params))
        choice = resolve_method(self.choice.label, {**self.choice.options(), **overrides})
        spec = spec_with(self.job.spec, run, choice, eps=(self.eps,))
        prep = self.bench.for_spec(spec)
        metric, finals, spent = self.job.metric, [], []
        for i, seed in enumerate(spec.seeds):
            on_eval = self._reporter(trial, t0) if i == 0 else None
            try:
                history, ledger = train_seed(
                    prep,
                    self.bench.federation(seed),
                    choice,
                    self.eps,
                    seed,
                    on_eval,
                    trial_rounds=self.job.trial_rounds,
                    plans=self.bench.plans,
                )
            except Diverged:
                trial.set_user_attr("status", "diverged")
                trial.set_user_attr("wall_s", time.perf_counter() - t0)
                raise
            final = final_metrics(
                [{k: v for k, v in h.items() if k not in ("round", "train_loss")} for h in history],
                spec.last_k,
            )
            finals.append(final)
            if ledger is not None:
                spent.append(ledger.eps_spent)
        for name in finals[0]:
            trial.set_user_attr(f"val/{name}", float(np.nanmean([f[name] for f in finals])))
        if spent:
            trial.set_user_attr("eps_spent", max(spent))
        trial.set_user_attr("status", "finished")
        trial.set_user_attr("wall_s", time.perf_counter() - t0)
        return float(np.mean([f[metric] for f in finals]))

    def _reporter(self, trial: optuna.Trial, t0: float) -> Callable[[int, dict], None]:
        """Report each evaluation's metric (step = round); prune before the last round."""
        rounds = self.job.rounds_trained

        def on_eval(round_no: int, metrics: dict[str, float]) -> None:
            value = float(metrics[self.job.metric])
            if math.isfinite(value):
                trial.report(value, round_no)
            if round_no < rounds and trial.should_prune():
                trial.set_user_attr("status", "pruned")
                trial.set_user_attr("pruned_at", round_no)
                trial.set_user_attr("wall_s", time.perf_counter() - t0)
                raise optuna.TrialPruned(f"round {round_no}: {value:.4f} below the median")

        return on_eval
