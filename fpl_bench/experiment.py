"""The job loop: every method x eps x seed of an ExperimentSpec, run and recorded.

run_one(...)            one method x eps x seed: privacy plan, federated run, MLflow run
run_experiment(spec)    all of them, in this process or on worker processes; results.csv is
                        rewritten (rows replaced by key) after every run, so an interrupted job
                        keeps what it finished
What the runs share is prepared by fpl_bench/prepare.py; what a run writes is
fpl_bench/run_records.py's; the cost estimates that pick threads and workers are
fpl_bench/estimates.py's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any
from typing import Protocol as Interface

import numpy as np
import pandas as pd
import torch

from fpl_bench.catalog import MethodChoice
from fpl_bench.data.partition import ClientSplit
from fpl_bench.driver import (
    Diverged,
    FederatedRun,
    Federation,
    NoisePlan,
    RunOutput,
    Schedule,
)
from fpl_bench.errors import UsageError
from fpl_bench.estimates import job_cost, longest_first, prepared_bytes, set_threads
from fpl_bench.evaluate import final_metrics
from fpl_bench.learners import LEARNERS
from fpl_bench.method import Method, build_method
from fpl_bench.parallel import (
    job_workers,
    run_parallel,
    threads_per_worker,
    warm_workers_if_needed,
)
from fpl_bench.prepare import Prepared, Transfer, federation, prepare, resolve_device
from fpl_bench.privacy.accountant import PrivacyLedger
from fpl_bench.privacy.planning import plan_for_clients
from fpl_bench.protocols import make_protocol
from fpl_bench.report.records import (
    METRIC_COLUMNS,
    RESULT_COLUMNS,
    read_results,
    upsert_results,
    write_results,
)
from fpl_bench.run_records import (
    backbone_label,
    checkpoint_path,
    finished_row,
    load_checkpoint,
    privacy_columns,
    provenance,
    run_config,
    run_key,
    run_name,
    save_checkpoint,
    save_configs,
    save_partition,
    save_run_prompts,
    setup_hash,
)
from fpl_bench.spec import ExperimentSpec


class JobProgress(Interface):
    """What the CLI shows: run k of N, round r of R (and from both, an ETA for the job)."""

    def start_run(self, index: int, total: int, label: str, rounds: int) -> None: ...

    def advance(self, rounds_done: int) -> None: ...


def transfer_accuracy(run: FederatedRun, target: Transfer, seed: int) -> float:
    """Mean over clients of the accuracy of each client's trained prompt on every test image of
    `target`, with logits over its classes (the learner's constants rebuilt for its classes)."""
    labels = target.test.labels.cpu().numpy()
    protocol = make_protocol("transfer", n_classes=target.tower.n_classes, test_labels=labels)
    everything = np.arange(len(labels))
    n = len(run.clients)
    split = ClientSplit(
        train=(everything,) * n,
        test=(everything,) * n,
        classes=(protocol.seen_classes,) * n,
    )
    fed = Federation(train=target.test, test=target.test, split=split, protocol=protocol)
    scorer = FederatedRun(
        run.method, target.tower, fed, schedule=run.sched, seed=seed, vision=run.vision
    )
    scorer.load_state_dict(run.state_dict())
    metrics, _ = scorer.evaluate(0)
    return metrics["target_acc"]


def plan_run_privacy(run: FederatedRun, spec: ExperimentSpec, eps: float) -> PrivacyLedger:
    """One sigma for every client of the run (fpl_bench/privacy/planning.py)."""
    return plan_for_clients(
        run.budget(),
        eps=eps,
        delta=spec.delta,
        clip_norm=spec.clip_norm,
        rounds=spec.rounds,
        calibration=spec.accountant,
    )


def schedule_of(spec: ExperimentSpec) -> Schedule:
    """The driver's schedule of a spec's runs."""
    return Schedule(
        rounds=spec.rounds,
        local_epochs=spec.local_epochs,
        batch_size=spec.batch_size,
        lr=spec.lr,
        momentum=spec.momentum,
        client_fraction=spec.client_fraction,
        eval_every=spec.eval_every,
        eval_last=None if spec.curve else spec.last_k,
    )


def federated_run(
    prep: Prepared, fed: Federation, method: Method, seed: int, schedule: Schedule
) -> FederatedRun:
    """One federated run of `method` as the spec sets it up (trust model, ctx_init)."""
    spec = prep.spec
    return FederatedRun(
        method,
        prep.tower,
        fed,
        schedule=schedule,
        seed=seed,
        trust=spec.trust,
        ctx_init=spec.ctx_init,
        vision=prep.vision,
    )


def job_run(
    prep: Prepared, fed: Federation, choice: MethodChoice, eps: float | None, seed: int
) -> tuple[FederatedRun, PrivacyLedger | None]:
    """The federated run of `choice` at `eps` and `seed` on `fed`, set up as a job's (threads,
    the spec's schedule; under DP one sigma calibrated for its clients' sizes), and its
    privacy ledger (None without DP)."""
    spec = prep.spec
    method = build_method(choice)
    torch.manual_seed(seed)
    private = eps is not None and method.trains
    n_seen = len(fed.protocol.seen_classes)
    set_threads(spec, private=private, device=prep.device, tower=prep.tower, n_classes=n_seen)
    run = federated_run(prep, fed, method, seed, schedule_of(spec))
    ledger = plan_run_privacy(run, spec, eps) if private and eps is not None else None
    if ledger is not None:
        run.enable_privacy(
            NoisePlan(
                noise_multiplier=ledger.noise_multiplier,
                clip_norm=spec.clip_norm,
                secure=spec.secure_noise,
            )
        )
    return run, ledger


def run_one(
    prep: Prepared,
    fed: Federation,
    choice: MethodChoice,
    eps: float | None,
    seed: int,
    tracker: Any,
    log: Callable[[str], None],
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    spec = prep.spec
    run, ledger = job_run(prep, fed, choice, eps, seed)
    config = run_config(spec, choice)
    key = run_key(spec, choice, eps, seed)
    params = {**config, "eps": key["eps"], "seed": seed, "config_hash": key["config_hash"]}
    if ledger is not None:
        params.update({f"privacy.{k}": v for k, v in asdict(ledger).items()})
    title = run_name(key)
    tags = {k: str(v) for k, v in key.items()}
    checkpoint = checkpoint_path(Path(spec.out), key)
    start, run_id = None, None
    if spec.resume and checkpoint.is_file():
        start, run_id = load_checkpoint(checkpoint, run, tracker)
        log(f"{title}: resuming after round {start.rounds_done} of {spec.rounds}")
        if progress:
            progress(start.rounds_done)
    if run_id is None:
        run_id = tracker.start(title, params, tags)

    def save_round(rounds_done: int, output: RunOutput) -> None:
        save_checkpoint(checkpoint, run, output, run_id)

    t0 = time.perf_counter()
    status = "failed"
    try:
        out = run.run(
            on_eval=lambda r, m: tracker.log_round(run_id, r, m),
            progress=progress,
            start=start,
            on_round_end=save_round if run.method.trains else None,
        )
        status = "finished"
    except Diverged as err:
        status = "diverged"
        log(f"{title}: diverged ({err}); recorded without accuracy")
    except KeyboardInterrupt:
        status = "killed"
        raise
    finally:
        if status in ("failed", "killed"):
            tracker.finish(
                run_id, {}, {}, status=status.upper(), tags={"status": status}, quiet=True
            )
    wall = time.perf_counter() - t0
    checkpoint.unlink(missing_ok=True)
    metrics = dict.fromkeys(METRIC_COLUMNS, math.nan)
    if status == "finished":
        final = final_metrics(
            [{k: v for k, v in h.items() if k not in ("round", "train_loss")} for h in out.history],
            spec.last_k,
        )
        if prep.transfers:  # cross-dataset: the trained prompts scored on every target
            final["target_acc"] = float(
                np.mean([transfer_accuracy(run, t, seed) for t in prep.transfers])
            )
        metrics.update({m: final.get(m, math.nan) for m in fed.protocol.metrics})
    privacy = privacy_columns(spec, eps, ledger)
    artifacts: dict[str, Any] = {"partition.json": fed.split.to_json()}
    prompts_file = ""
    if status == "finished":
        artifacts["schedule.json"] = {"sampled_clients": out.schedule}
        artifacts["history.json"] = out.history
        saved = save_run_prompts(Path(spec.out), run, config, key, run.method.trains)
        artifacts["prompts.safetensors"] = saved
        prompts_file = str(saved.relative_to(spec.out))
    # columns of the row that MLflow's params do not already hold as they are: run tags too
    recorded = {
        "backbone": backbone_label(spec),
        "setup_hash": setup_hash(spec),
        "prompts": prompts_file,
    }
    tracker.finish(
        run_id,
        {
            **{f"final/{m}": v for m, v in metrics.items()},
            **{k: v for k, v in privacy.items() if isinstance(v, float | int)},
            "wall_s": wall,
        },
        artifacts,
        status="FINISHED" if status == "finished" else "FAILED",
        tags={"status": status, **recorded},
    )
    row = {
        **key,
        "status": status,
        **metrics,
        **privacy,
        "rounds": spec.rounds,
        "local_epochs": spec.local_epochs,
        "batch_size": spec.batch_size,
        "lr": spec.lr,
        "clients": spec.clients,
        "shots": spec.shots,
        **recorded,
        "tuned": spec.tuned,
        "secure_noise": spec.secure_noise,
        "wall_s": round(wall, 2),
        **provenance(),
        "mlflow_run_id": run_id,
    }
    shown = ", ".join(f"{m}={metrics[m]:.3f}" for m in fed.protocol.metrics)
    spent = f", eps_spent={privacy['eps_spent']:.3f}" if eps is not None else ""
    log(f"{title}: {status}, {shown}{spent} ({wall:.1f}s)")
    return row


def run_experiment(
    spec: ExperimentSpec,
    *,
    log: Callable[[str], None] = print,
    progress: JobProgress | None = None,
) -> pd.DataFrame:
    """Run every method x eps x seed of the spec; returns this job's rows (also merged into
    DIR/results.csv, where a row with the same key replaces the old one)."""
    from fpl_bench.jobs import Job, check_tracking_uri, check_writable_folder, output_lock
    from fpl_bench.tracking import tracking_uri

    out = Path(spec.out)
    check_writable_folder(out, "output folder")
    check_writable_folder(Path(spec.cache_dir), "cache folder")
    check_tracking_uri(tracking_uri(out))
    csv_path = out / "results.csv"
    if csv_path.exists() and not csv_path.is_file():
        raise UsageError(f"{csv_path} is not a file; move it away or use another --out")
    previous = read_results(csv_path) if csv_path.is_file() else None
    with output_lock(out):
        save_configs(spec, out)
        job = Job(out)
        try:
            rows = _run_cells(spec, out, csv_path, previous, job, log, progress)
        except KeyboardInterrupt:
            job.end("interrupted")
            raise
        except BaseException as err:
            job.fail(err)  # its reason; no record when input was refused before any run
            raise
        job.end("finished")
    return pd.DataFrame(rows, columns=list(RESULT_COLUMNS))


def _run_cells(
    spec: ExperimentSpec,
    out: Path,
    csv_path: Path,
    previous: pd.DataFrame | None,
    job: Any,
    log: Callable[[str], None],
    progress: JobProgress | None,
) -> list[dict[str, Any]]:
    """Every run of the spec not finished before (--resume): in this process, or spread over
    worker processes when the job is large enough (fpl_bench/parallel.py)."""
    from fpl_bench.tracking import Tracker

    cells = [
        (seed, eps, choice) for seed in spec.seeds for eps in spec.eps for choice in spec.methods
    ]
    # workers may be needed: their imports run while this process prepares
    warm_workers_if_needed(
        workers=spec.workers, device=resolve_device(spec.device).type, runs=len(cells)
    )
    prep = prepare(spec, log)
    for seed in spec.seeds:
        save_partition(federation(prep, seed), out, spec.dataset, seed)
    rows: list[dict[str, Any] | None] = [None] * len(cells)
    pending = []
    for index, (seed, eps, choice) in enumerate(cells):
        done = finished_row(previous, run_key(spec, choice, eps, seed)) if spec.resume else None
        if done is None:
            pending.append(index)
        else:
            log(f"{_cell_label(cells[index])}: finished in an earlier job; skipped (--resume)")
            rows[index] = done
            if progress:  # the bar's total counts every run of the job
                rounds = _rounds_of(spec, choice)
                progress.start_run(index + 1, len(cells), _cell_label(cells[index]), rounds)
                progress.advance(rounds)
    frozen = [row for row in rows if row is not None]

    def record(index: int, row: dict[str, Any]) -> None:
        rows[index] = row
        job.add_run(row["mlflow_run_id"])
        frame = pd.DataFrame([r for r in rows if r is not None], columns=list(RESULT_COLUMNS))
        write_results(upsert_results(previous, frame), csv_path)

    workers = job_workers(
        requested=spec.workers,
        threads=spec.threads,
        device_type=prep.device.type,
        n_runs=len(pending),
        job_cost=job_cost(prep, [cells[i] for i in pending]),
        worker_bytes=prepared_bytes(prep),
    )
    tracker = Tracker(out)  # creates or migrates the tracking store before any worker opens it
    if workers > 1:
        log(f"{len(pending)} runs on {workers} worker processes")
        rounds_of = {i: _rounds_of(spec, cells[i][2]) for i in pending}
        done_rounds = dict.fromkeys(pending, 0)
        if progress:  # one bar segment for all parallel runs, moved by every worker's rounds
            label = f"{len(pending)} runs on {workers} workers"
            progress.start_run(len(frozen) + 1, len(cells), label, sum(rounds_of.values()))

        def on_round(index: int, rounds_done: int) -> None:
            done_rounds[index] = rounds_done
            if progress:
                progress.advance(sum(done_rounds.values()))

        def record_parallel(index: int, row: dict[str, Any]) -> None:
            record(index, row)
            on_round(index, rounds_of[index])

        threads = threads_per_worker(workers, spec.threads)
        order = longest_first(prep, cells, pending)
        del prep  # each worker prepares its own copy (from the warm cache)
        run_parallel(
            spec.model_copy(update={"threads": threads}),
            cells,
            order,
            workers=workers,
            on_row=record_parallel,
            on_round=on_round,
            log=log,
        )
        return [row for row in rows if row is not None]
    _run_in_process(prep, cells, pending, tracker, log, progress, record, n_done=len(frozen))
    return [row for row in rows if row is not None]


def _rounds_of(spec: ExperimentSpec, choice: MethodChoice) -> int:
    """Rounds a run of `choice` trains (0 for a learner with nothing to train): its progress."""
    return spec.rounds if LEARNERS.get(choice.learner).trains else 0


def _cell_label(cell: tuple[int, float | None, MethodChoice]) -> str:
    seed, eps, choice = cell
    return f"{choice.label} eps={'none' if eps is None else eps} seed={seed}"


def _run_in_process(
    prep: Prepared,
    cells: list[tuple[int, float | None, MethodChoice]],
    pending: list[int],
    tracker: Any,
    log: Callable[[str], None],
    progress: JobProgress | None,
    record: Callable[[int, dict[str, Any]], None],
    *,
    n_done: int,
) -> None:
    """The pending runs one after the other in this process."""
    feds: dict[int, Federation] = {}
    for k, index in enumerate(pending):
        seed, eps, choice = cells[index]
        if seed not in feds:
            feds = {seed: federation(prep, seed)}
        if progress:
            rounds = _rounds_of(prep.spec, choice)
            progress.start_run(n_done + k + 1, len(cells), _cell_label(cells[index]), rounds)
        row = run_one(
            prep,
            feds[seed],
            choice,
            eps,
            seed,
            tracker,
            log,
            progress=progress.advance if progress else None,
        )
        record(index, row)
