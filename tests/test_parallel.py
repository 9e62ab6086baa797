"""Runs in worker processes: when workers are used, and that they change no result."""

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

import fpl_bench.parallel as parallel
from fpl_bench.parallel import PARALLEL_JOB_COST, job_workers
from tests.cli import run_main


@pytest.mark.parametrize(
    ("kw", "cores", "expected"),
    [
        (dict(requested=3, threads=None, device_type="cpu", n_runs=2, job_cost=0.0), 8, 2),
        (dict(requested=1, threads=None, device_type="cpu", n_runs=9, job_cost=1e15), 8, 1),
        (dict(requested=None, threads=None, device_type="cpu", n_runs=9, job_cost=1e15), 8, 8),
        (dict(requested=None, threads=2, device_type="cpu", n_runs=9, job_cost=1e15), 8, 4),
        (dict(requested=None, threads=None, device_type="cpu", n_runs=3, job_cost=1e15), 8, 3),
        (dict(requested=None, threads=None, device_type="cpu", n_runs=1, job_cost=1e15), 8, 1),
        (dict(requested=None, threads=None, device_type="cuda", n_runs=9, job_cost=1e15), 8, 1),
        (dict(requested=None, threads=3, device_type="cpu", n_runs=9, job_cost=1e15), 2, 1),
        (
            dict(
                requested=None,
                threads=None,
                device_type="cpu",
                n_runs=9,
                job_cost=PARALLEL_JOB_COST / 2,
            ),
            8,
            1,
        ),
    ],
)
def test_how_many_workers(monkeypatch, kw, cores, expected):
    monkeypatch.setattr(parallel, "usable_cores", lambda: cores)
    assert job_workers(**kw) == expected


ARGS = ["run", "--methods", "coop,zeroshot,dpfpl", "--eps", "0.5,none", "--rounds", "2"]
ARGS += ["--clients", "3", "--shots", "2", "--eval-every", "1", "--param", "dpfpl.rank=2"]
for _opt in ("n_train_per_class=4", "n_test_per_class=2", "n_val_per_class=2"):
    ARGS += ["--dataset-option", _opt]


@pytest.mark.slow
def test_two_workers_write_the_same_results_as_one_process(tmp_path, monkeypatch):
    """Also: workers forked from a fork server started earlier (in another folder, with another
    environment) work in the parent's folder and environment as they are at the job's start:
    relative paths and MLFLOW_TRACKING_URI (set only now) resolve as in the parent."""
    parallel.warm_workers()  # a no-op if an earlier test started the server
    monkeypatch.chdir(tmp_path)
    frames = {}
    for workers in ("1", "2"):
        out = tmp_path / f"out{workers}"
        uri = f"sqlite:///{tmp_path / f'tracking{workers}.db'}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        args = [*ARGS, "--workers", workers, "--out", out.name, "--cache-dir", "cache"]
        assert run_main(args, monkeypatch) == 0
        frames[workers] = pd.read_csv(out / "results.csv", dtype={"eps": str})
        client = MlflowClient(tracking_uri=uri)
        runs = client.search_runs(client.get_experiment_by_name("fpl-bench").experiment_id)
        assert sorted(r.info.run_id for r in runs) == sorted(frames[workers].mlflow_run_id)
        assert {r.info.status for r in runs} == {"FINISHED"}
        assert all(r.data.metrics for r in runs)  # final metrics logged by the workers
    one, two = (f.drop(columns=["wall_s", "mlflow_run_id"]) for f in frames.values())
    assert len(one) == 6 and set(one.status) == {"finished"}
    pd.testing.assert_frame_equal(one, two)  # same rows, same (cell) order


def test_memory_caps_the_automatic_worker_count(monkeypatch):
    monkeypatch.setattr(parallel, "usable_cores", lambda: 8)
    monkeypatch.setattr(parallel, "available_memory", lambda: 10e9)
    kw = dict(requested=None, threads=None, device_type="cpu", n_runs=9, job_cost=1e15)
    assert job_workers(**kw, worker_bytes=1e9) == 5  # half of 10 GB at 1 GB each
    assert job_workers(**kw, worker_bytes=8e9) == 1
    assert job_workers(**kw, worker_bytes=0.0) == 8


def test_a_workers_error_reaches_the_parent_as_it_would_in_one_process():
    from fpl_bench.errors import UsageError
    from fpl_bench.spec import FieldError

    usage = parallel._portable(UsageError("checkpoint x is damaged; delete it"))
    assert type(usage) is UsageError and str(usage) == "checkpoint x is damaged; delete it"
    field = FieldError("lr", -1, "must be > 0")
    assert type(parallel._portable(field)) is UsageError  # one line, exit 2, like in-process
    try:
        raise ValueError("a bug in a run")
    except ValueError as err:
        bug = parallel._portable(err)
    assert isinstance(bug, RuntimeError)
    assert "ValueError: a bug in a run" in str(bug) and "Traceback" in str(bug)


class Recorder:
    """A JobProgress that keeps what it was told."""

    def __init__(self):
        self.starts, self.advances = [], []

    def start_run(self, index, total, label, rounds):
        self.starts.append((index, total, label, rounds))

    def advance(self, rounds_done):
        self.advances.append(rounds_done)


def tiny_spec(tmp_path, names, **fields):
    """An ExperimentSpec of `names` on the tiny synthetic federation of ARGS (in-process)."""
    from fpl_bench.catalog import resolve_method
    from fpl_bench.spec import build_spec

    return build_spec(
        methods=tuple(resolve_method(n) for n in names),
        shots=2,
        dataset_options={"n_train_per_class": 4, "n_test_per_class": 2, "n_val_per_class": 2},
        out=tmp_path / "out",
        cache_dir=tmp_path / "cache",
        **fields,
    )


def test_the_progress_bar_moves_with_every_workers_rounds(tmp_path):
    from fpl_bench.experiment import run_experiment

    names = ["coop", "zeroshot", "promptfl"]
    spec = tiny_spec(tmp_path, names, rounds=3, clients=2, eval_every=3, last_k=1, workers=2)
    progress = Recorder()
    frame = run_experiment(spec, log=lambda line: None, progress=progress)
    assert list(frame.method) == ["coop", "zeroshot", "promptfl"]
    assert progress.starts == [(1, 3, "3 runs on 2 workers", 6)]  # zero-shot has no rounds
    assert progress.advances == sorted(progress.advances)  # never backwards
    assert progress.advances[-1] == 6
    assert len(progress.advances) >= 6  # per round, not only per finished run


def test_worker_queue_takes_the_longest_runs_first(tmp_path):
    """Under DP a step costs 1 forward pass per prompt component, B backward passes per
    component the loss reads and 1 per component for a prior: FedOTP (2 of 2) twice CoOp,
    FedPGP (2 components, 1 read by the loss, a prior) B + 4, KgCoOp (a prior) B + 2, CoOp
    and DP-FPL B + 1; zero-shot (no training) last."""
    from fpl_bench.estimates import cell_training_flops, longest_first
    from fpl_bench.prepare import prepare

    names = ["zeroshot", "coop", "fedpgp", "dpfpl", "kgcoop", "fedotp"]
    spec = tiny_spec(tmp_path, names, eps=(0.5,), rounds=2, clients=3)
    prep = prepare(spec, log=lambda _: None)
    cells = [(0, 0.5, choice) for choice in spec.methods]
    flops = {c[2].label: cell_training_flops(prep, c) for c in cells}
    assert flops["zeroshot"] == 0
    assert flops["fedotp"] == 2 * flops["coop"] == 2 * flops["dpfpl"] > 0
    b = spec.batch_size
    assert flops["fedpgp"] * (1 + b) == pytest.approx(flops["coop"] * (4 + b), rel=1e-12)
    assert flops["kgcoop"] * (1 + b) == pytest.approx(flops["coop"] * (2 + b), rel=1e-12)
    order = [cells[i][2].label for i in longest_first(prep, cells, list(range(len(cells))))]
    assert order == ["fedotp", "fedpgp", "kgcoop", "coop", "dpfpl", "zeroshot"]


def test_a_learners_relative_cost_orders_the_runs(tmp_path):
    """Of equal training FLOPs (one prompt component, no prior), BPL with L = 4 draws (4 x
    8 CoOp runs) before CoCoOp (8), before PLOT with 4 prompts (4), before CoOp (1): the
    runs that took longest in `--methods all` start first."""
    from fpl_bench.estimates import cell_training_flops, longest_first
    from fpl_bench.learners._base import PER_IMAGE_COST
    from fpl_bench.method import build_method
    from fpl_bench.prepare import prepare

    names = ["coop", "plot", "cocoop", "bpl"]
    spec = tiny_spec(tmp_path, names, eps=(0.5,), rounds=2, clients=3)
    prep = prepare(spec, log=lambda _: None)
    cells = [(0, 0.5, choice) for choice in spec.methods]
    assert len({cell_training_flops(prep, c) for c in cells}) == 1
    costs = {c[2].label: build_method(c[2]).learner.relative_cost() for c in cells}
    assert costs == {"coop": 1.0, "plot": 4.0, "cocoop": PER_IMAGE_COST, "bpl": 4 * PER_IMAGE_COST}
    order = [cells[i][2].label for i in longest_first(prep, cells, list(range(len(cells))))]
    assert order == ["bpl", "cocoop", "plot", "coop"]


@pytest.mark.parametrize(
    ("flags", "warmed"),
    [
        (["--methods", "coop,promptfl"], True),
        (["--methods", "coop", "--eps", "none,0.5"], True),
        (["--methods", "coop"], False),  # one run: never parallel
        (["--methods", "coop,promptfl", "--workers", "1"], False),
        (["--methods", "coop,promptfl", "--device", "cuda"], False),  # one process on CUDA
    ],
)
def test_run_warms_the_fork_server_only_for_jobs_that_may_use_workers(
    monkeypatch, tmp_path, flags, warmed
):
    """`fpl-bench run` starts the fork server before it imports torch when the job may use
    workers (CPU, more than one run, --workers not 1): its imports overlap the parent's."""
    import fpl_bench.experiment as experiment

    calls = []
    monkeypatch.setattr(parallel, "warm_workers", lambda: calls.append(True))

    def stop(*args, **kwargs):
        raise SystemExit(0)

    monkeypatch.setattr(experiment, "run_experiment", stop)
    assert run_main(["run", *flags, "--out", str(tmp_path)], monkeypatch) == 0
    assert calls == ([True] if warmed else [])


def test_a_jobs_cost_weighs_each_run_by_its_learner(tmp_path, monkeypatch):
    """Whether workers pay is decided on training FLOPs times each learner's relative cost: a
    BPL run (L draws x 8) counts as 1 + 4 x 8 CoOp runs of the same schedule with it, and the
    job hands that sum to `job_workers`, so a suite's few BPL seeds go to worker processes."""
    import fpl_bench.experiment as experiment
    from fpl_bench.estimates import cell_training_flops, job_cost
    from fpl_bench.learners._base import PER_IMAGE_COST
    from fpl_bench.method import build_method
    from fpl_bench.prepare import prepare

    spec = tiny_spec(tmp_path, ["coop", "bpl"], eps=(0.5,), rounds=2, clients=3)
    prep = prepare(spec, log=lambda _: None)
    coop, bpl = cells = [(0, 0.5, choice) for choice in spec.methods]
    flops = cell_training_flops(prep, coop)
    assert cell_training_flops(prep, bpl) == flops > 0
    draws = build_method(bpl[2]).learner.samples
    assert job_cost(prep, cells) == pytest.approx((1 + draws * PER_IMAGE_COST) * flops)

    class Decided(Exception):
        pass

    handed = {}

    def decide(**kwargs):
        handed.update(kwargs)
        raise Decided  # the decision is what this test reads; the runs need not start

    monkeypatch.setattr(experiment, "job_workers", decide)
    with pytest.raises(Decided):
        experiment.run_experiment(spec, log=lambda _: None)
    assert handed["n_runs"] == 2
    assert handed["job_cost"] == pytest.approx(job_cost(prep, cells))
