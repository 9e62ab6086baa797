"""What tuning records and prints: `TrialLogger` makes each ended trial an MLflow run nested
under its study's run (experiment `EXPERIMENT`, not the leaderboard's) and prints its line
(`trial_line`); `summary_line` is a study's closing line."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from fpl_bench.tune.study import Tally, best_trial, tally

Log = Callable[[str], None]
EXPERIMENT = "fpl-bench-tune"  # MLflow experiment of studies and trials (not the leaderboard's)
MLFLOW_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


def _ms(moment: Any) -> int | None:
    return None if moment is None else int(moment.timestamp() * 1000)


def format_params(params: dict[str, Any]) -> str:
    return " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )


class TrialLogger:
    """Optuna callback: each ended trial becomes one MLflow run under its study's run (tags
    mlflow.parentRunId, optuna.trial), and one printed line. Also called for trials that the
    heartbeat failed (their worker died)."""

    def __init__(self, tracker: Any, metric: str, log: Log) -> None:
        self.tracker, self.metric, self.log = tracker, metric, log
        self.parents: dict[str, str] = {}

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        from mlflow.entities import Metric, Param, RunTag

        client, state = self.tracker.client, trial.state.name
        run = client.create_run(
            self.tracker.experiment_id,
            run_name=f"{study.study_name}-trial{trial.number}",
            start_time=_ms(trial.datetime_start),
            tags={
                "mlflow.parentRunId": self.parents[study.study_name],
                "optuna.study": study.study_name,
                "optuna.trial": str(trial.number),
                "optuna.state": state,
                "fpl.role": "trial",
                "status": str(trial.user_attrs.get("status", state.lower())),
            },
        )
        run_id, now = run.info.run_id, int(time.time() * 1000)
        params = [Param(k, str(v)) for k, v in trial.params.items()]
        retried = trial.system_attrs.get("failed_trial")
        tags = [RunTag("optuna.retry_of", str(retried))] if retried is not None else []
        metrics = [
            Metric(f"round/{self.metric}", float(v), now, int(step))
            for step, v in trial.intermediate_values.items()
        ]
        numbers = {k: v for k, v in trial.user_attrs.items() if isinstance(v, int | float)}
        if trial.state == TrialState.COMPLETE:
            numbers[f"objective/{self.metric}"] = trial.value
        metrics += [Metric(k, float(v), now, 0) for k, v in numbers.items()]
        client.log_batch(run_id, metrics=metrics, params=params, tags=tags)
        client.set_terminated(
            run_id, status=MLFLOW_STATUS[state], end_time=_ms(trial.datetime_complete)
        )
        self.log(trial_line(study.study_name, trial, self.metric))

    def open_parent(self, name: str, params: dict[str, Any]) -> str:
        """The study's MLflow run (found by tag, else created; the caller holds the lock)."""
        client = self.tracker.client
        found = client.search_runs(
            [self.tracker.experiment_id],
            filter_string=f"tags.`fpl.study` = '{name}' AND tags.`fpl.role` = 'study'",
            max_results=1,
        )
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
        else:
            run_id = self.tracker.start(name, params, {"fpl.study": name, "fpl.role": "study"})
        self.parents[name] = run_id
        return run_id

    def close_parent(self, study: optuna.Study, count: Tally, budget: int) -> None:
        """Record the study's best trial on its run; FINISHED once every trial has ended."""
        from mlflow.entities import Metric, RunTag

        run_id, now = self.parents[study.study_name], int(time.time() * 1000)
        metrics = [Metric(f"trials/{k.lower()}", v, now, 0) for k, v in count.states.items()]
        tags = []
        best = best_trial(study)
        if best is not None:
            metrics.append(Metric(f"best/{self.metric}", float(best.value), now, 0))
            tags = [RunTag(f"best.{k}", str(v)) for k, v in best.params.items()]
            tags.append(RunTag("best.trial", str(best.number)))
        self.tracker.client.log_batch(run_id, metrics=metrics, tags=tags)
        if count.ended >= budget and count.running == 0 and count.waiting == 0:
            self.tracker.client.set_terminated(run_id, status="FINISHED")


def trial_line(name: str, trial: FrozenTrial, metric: str) -> str:
    """'tune-...: trial 3 COMPLETE lr=0.01 local_epochs=2 -> hm=0.6123 (41 s)'."""
    wall = trial.user_attrs.get("wall_s")
    took = f" ({wall:.0f} s)" if isinstance(wall, float) else ""
    head = f"{name}: trial {trial.number} {trial.state.name} {format_params(trial.params)}"
    if trial.state == TrialState.COMPLETE:
        return f"{head} -> {metric}={trial.value:.4f}{took}"
    if trial.state == TrialState.PRUNED:
        return f"{head} pruned at round {trial.user_attrs.get('pruned_at', '?')}{took}"
    why = trial.user_attrs.get("status", "worker stopped (no heartbeat)")
    return f"{head} failed: {why}{took}"


def summary_line(study: optuna.Study, metric: str) -> str:
    """'NAME: 5 complete, 3 pruned; best hm=0.81 with lr=0.01 local_epochs=1 (trial 4)'."""
    count, best = tally(study), best_trial(study)
    states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(count.states.items()))
    found = "no complete trial"
    if best is not None:
        found = f"best {metric}={best.value:.4f} with {format_params(best.params)}"
        found += f" (trial {best.number})"
    return f"{study.study_name}: {states or 'no trials'}; {found}"
