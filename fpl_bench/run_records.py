"""What a run records: its configuration and hashes, its key and columns in results.csv, and
the files it writes under the output folder.

run_config(spec, choice)    the resolved configuration of one method's runs (`config_hash`)
setup_hash(spec)            the hash of the job's setup, without the method (one per table)
run_key(...)                a run's record key; `finished_row` finds it in results.csv (--resume)
privacy_columns, backbone_label, provenance    columns of a run's row
save_configs                OUT/configs/<config hash>.json, one per method
save_run_prompts            OUT/prompts/<run>.safetensors, the run's final parameters
save_checkpoint, load_checkpoint    OUT/checkpoints/<hash of the key>.pt (`checkpoint_path`)
save_partition              OUT/partitions/<dataset>-<clients>c-seed<seed>.json
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from fpl_bench.cards import dataset_card
from fpl_bench.catalog import MethodChoice
from fpl_bench.driver import FederatedRun, Federation, RunOutput
from fpl_bench.errors import UsageError
from fpl_bench.privacy.accountant import PrivacyLedger
from fpl_bench.report.records import normalize_eps
from fpl_bench.spec import ExperimentSpec


def run_config(spec: ExperimentSpec, choice: MethodChoice) -> dict[str, Any]:
    """The resolved configuration of one method's runs (without eps and seed): what the
    config hash covers, and the MLflow params."""
    cfg = spec.model_dump(
        mode="json",
        exclude={
            "methods",
            "eps",
            "seeds",
            "out",
            "cache_dir",
            "data_root",
            "threads",
            "workers",
            "curve",  # which rounds are evaluated besides those the result averages
            "device",
            "precision",
            "resume",
            "tuned_from",
            "dataset_card",
        },
    )
    if spec.dataset_card is not None:  # a card of one's own: its content, and where it lies
        card = dataset_card(spec.dataset_source())
        blob = card.model_dump_json().encode()
        cfg["dataset_card_sha256"] = hashlib.sha256(blob).hexdigest()[:16]
        cfg["dataset_card"] = str(spec.dataset_card)
    cfg.update({"method": choice.label, "learner": choice.learner, "scheme": choice.scheme})
    cfg.update(choice.options())
    return cfg


# What a method's own config adds to the job's setup: excluded from the setup hash.
_METHOD_FIELDS = ("method", "learner", "scheme", "tuned")


def setup_hash(spec: ExperimentSpec) -> str:
    """The hash of the job's setup: the resolved configuration without the method (its name,
    learner, scheme and options) and without whether it was tuned. Rows with one setup hash
    ran on the same data, protocol, partition, schedule, backbone and privacy settings, so a
    leaderboard table holds one setup only. A tuned spec keeps the setup of the spec it was
    tuned from (`tuned_from`): its tuned values are part of its method's configuration."""
    if spec.tuned_from is not None:
        return spec.tuned_from
    cfg = run_config(spec, spec.methods[0])
    for name in (*_METHOD_FIELDS, *spec.methods[0].options()):
        cfg.pop(name, None)
    return config_hash(cfg)


def run_key(spec: ExperimentSpec, choice: MethodChoice, eps: float | None, seed: int) -> dict:
    """The record key of one run (fpl_bench/report/records.py KEY_COLUMNS)."""
    return {
        "method": choice.label,
        "learner": choice.learner,
        "scheme": choice.scheme,
        "dataset": spec.dataset,
        "protocol": spec.protocol,
        "trust": spec.trust,
        "eps": "none" if eps is None else eps,
        "seed": seed,
        "config_hash": config_hash(run_config(spec, choice)),
    }


def run_name(key: Mapping[str, Any]) -> str:
    """A run's MLflow name from its `run_key`: METHOD-DATASET-TRUST-epsEPS-seedSEED."""
    return f"{key['method']}-{key['dataset']}-{key['trust']}-eps{key['eps']}-seed{key['seed']}"


def finished_row(previous: pd.DataFrame | None, key: dict[str, Any]) -> dict | None:
    """The finished row of `previous` with this key, if any (what --resume skips)."""
    if previous is None or previous.empty:
        return None
    match = previous["status"] == "finished"
    for column, value in key.items():
        if column == "eps":
            match &= previous["eps"].map(normalize_eps) == normalize_eps(value)
        else:
            match &= previous[column].astype(str) == str(value)
    rows = previous[match]
    return None if rows.empty else rows.iloc[-1].to_dict()


# Where a configuration's files lie, recorded so it can be run again but not hashed: the same
# card moved elsewhere is the same configuration (its content is hashed).
UNHASHED_KEYS: tuple[str, ...] = ("dataset_card",)


def config_hash(config: dict[str, Any]) -> str:
    hashed = {k: v for k, v in config.items() if k not in UNHASHED_KEYS}
    blob = json.dumps(hashed, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def provenance() -> dict[str, str]:
    """Package version and the git commit of the checkout it runs from ('' when not a git
    checkout, e.g. an installed wheel)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg = version("fpl-bench")
    except PackageNotFoundError:
        pkg = "unknown"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"version": pkg, "commit": commit}


def privacy_columns(spec: ExperimentSpec, eps: float | None, ledger: PrivacyLedger | None) -> dict:
    if eps is None:
        return {"eps_target": math.nan, "eps_spent": math.nan, "delta": math.nan}
    if ledger is None:  # a method that trains nothing spends nothing
        return {"eps_target": eps, "eps_spent": 0.0, "delta": spec.delta, "steps": 0}
    return {
        "eps_target": eps,
        "eps_spent": ledger.eps_spent,
        "delta": spec.delta,
        "noise_multiplier": ledger.noise_multiplier,
        "clip_norm": spec.clip_norm,
        "sample_rate": ledger.sample_rate,
        "steps": ledger.steps,
        "calibration": ledger.calibration,
        "accountant": ledger.accountant,
    }


CONFIGS_FOLDER = "configs"


def save_configs(spec: ExperimentSpec, out: Path) -> None:
    """OUT/configs/<config hash>.json: the resolved configuration of each method's runs (what
    the hash covers), so that a leaderboard can record it and `fpl-bench regress` can run the
    same configuration again (fpl_bench/report/sources.py load_configs)."""
    from fpl_bench.io import write_atomic

    for choice in spec.methods:
        config = run_config(spec, choice)
        blob = json.dumps(config, sort_keys=True, default=str)
        path = out / CONFIGS_FOLDER / f"{config_hash(config)}.json"
        if not path.is_file():
            write_atomic(path, lambda tmp, b=blob: Path(tmp).write_text(b))


def save_run_prompts(
    out: Path, run: FederatedRun, config: dict[str, Any], key: dict[str, Any], trains: bool
) -> Path:
    """OUT/prompts/<run>.safetensors: the run's final parameters, server's and every client's,
    with its configuration (fpl_bench/saved_prompts.py); `fpl-bench eval` reads it back."""
    from fpl_bench.saved_prompts import prompts_name, save_prompts

    return save_prompts(
        out / "prompts" / prompts_name(key),
        server=run.server,
        clients=[state.params for state in run.clients],
        config={**config, "eps": key["eps"], "seed": key["seed"]},
        key=key,
        eval_round=run.sched.rounds - 1 if trains else 0,
        version=provenance()["version"],
    )


def backbone_label(spec: ExperimentSpec) -> str:
    """The backbone as results.csv shows it: the model name, with its pretrained tag or the
    checkpoint's file name when one is given ('ViT-B-16:openai')."""
    weights = spec.pretrained or spec.checkpoint
    return spec.backbone if weights is None else f"{spec.backbone}:{Path(weights).name}"


def checkpoint_path(out: Path, key: dict[str, Any]) -> Path:
    """OUT/checkpoints/<hash of the run's key>.pt: one checkpoint per run."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return out / "checkpoints" / f"{digest[:16]}.pt"


def save_checkpoint(path: Path, run: FederatedRun, output: RunOutput, run_id: str) -> None:
    """The run's state after a complete round, written atomically (a kill during the write
    leaves the previous checkpoint)."""
    from fpl_bench.features import save_atomic

    save_atomic(
        {
            "state": run.state_dict(),
            "history": output.history,
            "per_client": output.per_client,
            "rounds_done": output.rounds_done,
            "mlflow_run_id": run_id,
        },
        path,
    )


def load_checkpoint(path: Path, run: FederatedRun, tracker: Any) -> tuple[RunOutput, str | None]:
    """Restore `run` from its checkpoint (weights_only): the output so far and the MLflow run
    to continue (None when the tracking store no longer has it)."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        run.load_state_dict(blob["state"])
    except (RuntimeError, KeyError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
        raise UsageError(
            f"checkpoint {path} is damaged ({type(err).__name__}); delete it to restart that run"
        ) from None
    start = RunOutput(blob["history"], run.rounds_schedule, blob["per_client"], blob["rounds_done"])
    run_id = blob["mlflow_run_id"] if tracker.reopen(blob["mlflow_run_id"]) else None
    return start, run_id


def save_partition(fed: Federation, out: Path, dataset: str, seed: int) -> Path:
    path = out / "partitions" / f"{dataset}-{fed.split.n_clients}c-seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fed.split.to_json()))
    return path
