"""A run's final prompts on disk: every client's parameters and the server's, with the
configuration that trained them, in one safetensors file.

    OUT/prompts/<method>-<dataset>-<trust>-eps<eps>-seed<seed>-<config hash>.safetensors

Tensors: `server/<name>` (the server's shared parameters) and `client/<i>/<name>` (client i's
stored parameters: its personal ones and its copy of the shared ones). String metadata:

- `fpl_bench.config`: the run's resolved configuration (`run_records.run_config`) as JSON, with
  `eps` and `seed`: enough to rebuild the same method, data partition and frozen constants;
- `fpl_bench.key`: the record key (`run_records.run_key`), as in results.csv;
- `fpl_bench.eval_round`: the round index of the run's last evaluation (evaluation streams are
  seeded per round, so re-evaluating at this round gives that evaluation's numbers again);
- `fpl_bench.version`: the fpl-bench version that wrote the file.

safetensors holds tensors and strings only, so loading a file never runs code from it.
`fpl-bench eval --prompts FILE` (`evaluate_saved`) rebuilds the run from its configuration,
loads the parameters and evaluates them, under the run's protocol or another one: personal
parameters are matched to clients by index, the same number of clients is required.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fpl_bench.errors import UsageError

SERVER = "server/"
CLIENT = "client/"
META = "fpl_bench."


@dataclass(frozen=True)
class SavedPrompts:
    """The content of one prompts file."""

    server: dict[str, Tensor]
    clients: list[dict[str, Tensor]]
    config: dict[str, Any]  # run_config + eps + seed
    key: dict[str, Any]
    eval_round: int
    version: str


def prompts_name(key: dict[str, Any]) -> str:
    """The file name of a run's prompts, from its record key."""
    return (
        f"{key['method'].replace('@', '+')}-{key['dataset']}-{key['trust']}-eps{key['eps']}"
        f"-seed{key['seed']}-{key['config_hash']}.safetensors"
    )


def named(server: dict[str, Tensor], clients: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """{'server/<name>': .., 'client/<i>/<name>': ..}: the file's names of the tensors."""
    flat = {f"{SERVER}{name}": t for name, t in server.items()}
    for i, params in enumerate(clients):
        flat.update({f"{CLIENT}{i}/{name}": t for name, t in params.items()})
    return flat


def flatten(server: dict[str, Tensor], clients: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """`named`, as contiguous CPU copies (what safetensors stores)."""
    return {
        name: t.detach().to("cpu").contiguous().clone()
        for name, t in named(server, clients).items()
    }


def unflatten(flat: dict[str, Tensor], n_clients: int) -> tuple[dict, list[dict]]:
    """The inverse of `flatten` for `n_clients` clients."""
    server: dict[str, Tensor] = {}
    clients: list[dict[str, Tensor]] = [{} for _ in range(n_clients)]
    for name, tensor in flat.items():
        if name.startswith(SERVER):
            server[name[len(SERVER) :]] = tensor
        elif name.startswith(CLIENT):
            index, _, param = name[len(CLIENT) :].partition("/")
            clients[int(index)][param] = tensor
        else:
            raise ValueError(f"unexpected tensor {name!r}")
    return server, clients


def save_prompts(
    path: Path,
    *,
    server: dict[str, Tensor],
    clients: list[dict[str, Tensor]],
    config: dict[str, Any],
    key: dict[str, Any],
    eval_round: int,
    version: str,
) -> Path:
    """Write the prompts file atomically (a kill during the write leaves no partial file)."""
    from safetensors.torch import save_file

    from fpl_bench.io import write_atomic

    metadata = {
        f"{META}config": json.dumps(config, sort_keys=True, default=str),
        f"{META}key": json.dumps(key, sort_keys=True, default=str),
        f"{META}eval_round": str(eval_round),
        f"{META}n_clients": str(len(clients)),
        f"{META}version": version,
    }
    tensors = flatten(server, clients)
    write_atomic(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return Path(path)


def load_prompts(path: Path) -> SavedPrompts:
    """Read a prompts file; UsageError (one line) when it is missing or not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UsageError(
            f"--prompts {path}: no such file; a finished run writes OUT/prompts/*.safetensors"
        )
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        flat = load_file(str(path))
        config = json.loads(metadata[f"{META}config"])
        key = json.loads(metadata[f"{META}key"])
        n_clients = int(metadata[f"{META}n_clients"])
        server, clients = unflatten(flat, n_clients)
        return SavedPrompts(
            server=server,
            clients=clients,
            config=config,
            key=key,
            eval_round=int(metadata[f"{META}eval_round"]),
            version=metadata.get(f"{META}version", ""),
        )
    except (SafetensorError, KeyError, ValueError, OSError) as err:
        raise UsageError(
            f"--prompts {path}: not a prompts file written by fpl-bench ({type(err).__name__}); "
            "give OUT/prompts/<run>.safetensors of a finished run"
        ) from None


def saved_spec(saved: SavedPrompts, **overrides: Any) -> Any:
    """The one-run spec that trained `saved` (method with its options, eps, seed), with
    `overrides` (protocol, data_root, cache_dir, device, out) on top."""
    from fpl_bench.report.records import normalize_eps
    from fpl_bench.spec import spec_from_config

    config = {k: v for k, v in saved.config.items() if k not in ("eps", "seed")}
    eps = normalize_eps(saved.config["eps"])
    return spec_from_config(
        config,
        eps=(None if eps == "none" else float(eps),),
        seeds=(int(saved.config["seed"]),),
        **overrides,
    )


def evaluate_saved(
    saved: SavedPrompts, spec: Any, log: Callable[[str], None] = print
) -> dict[str, float]:
    """Rebuild the run of `spec` (one method, eps, seed), load the saved parameters and evaluate
    them at the saved evaluation round: the mean over clients of each metric of the protocol."""
    import numpy as np

    from fpl_bench.experiment import federated_run, schedule_of, transfer_accuracy
    from fpl_bench.method import build_method
    from fpl_bench.prepare import federation, prepare

    prep = prepare(spec, log)
    seed = spec.seeds[0]
    fed = federation(prep, seed)
    method = build_method(spec.methods[0])
    run = federated_run(prep, fed, method, seed, schedule_of(spec))
    load_into(run, saved)
    metrics, _ = run.evaluate(saved.eval_round)
    if prep.transfers:
        metrics["target_acc"] = float(
            np.mean([transfer_accuracy(run, t, seed) for t in prep.transfers])
        )
    return {m: float(metrics[m]) for m in fed.protocol.metrics if m in metrics}


def load_into(run: Any, saved: SavedPrompts) -> None:
    """Put the saved parameters into a freshly built run; UsageError when the run's clients or
    parameter shapes differ from the file's (another configuration)."""
    if len(saved.clients) != len(run.clients):
        raise UsageError(
            f"the prompts hold {len(saved.clients)} clients, the run has {len(run.clients)}: "
            "evaluate with the same --clients"
        )
    built = named(run.server, [state.params for state in run.clients])
    expected = {name: t.shape for name, t in built.items()}
    found = {name: t.shape for name, t in named(saved.server, saved.clients).items()}
    wrong = sorted(n for n in set(expected) | set(found) if expected.get(n) != found.get(n))
    if wrong:
        raise UsageError(
            f"the prompts do not fit the rebuilt run ({wrong[0]}: name or shape differs); was "
            "the file written by another fpl-bench version?"
        )
    device = next(iter(built.values())).device if built else torch.device("cpu")
    run.server = {k: v.to(device) for k, v in saved.server.items()}
    for state, params in zip(run.clients, saved.clients, strict=True):
        state.params = {k: v.to(device) for k, v in params.items()}
