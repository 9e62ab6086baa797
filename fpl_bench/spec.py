"""ExperimentSpec: the one validator between the user (CLI flags, cards) and the core.

Everything below this module takes typed objects; nothing re-checks input. A validation error
becomes one `UsageError` line naming the flag and what to do.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fpl_bench.errors import UsageError

FLAG_OF = {  # spec field -> the CLI flag that sets it, for error messages
    "clients": "--clients",
    "rounds": "--rounds",
    "shots": "--shots",
    "alpha": "--alpha",
    "eps": "--eps",
    "delta": "--delta",
    "clip_norm": "--clip-norm",
    "seeds": "--seeds",
    "batch_size": "--batch-size",
    "lr": "--lr",
    "client_fraction": "--client-fraction",
    "local_epochs": "--local-epochs",
    "n_ctx": "--n-ctx",
    "eval_every": "--eval-every",
    "last_k": "--last-k",
    "methods": "--methods",
    "protocol": "--protocol",
    "partition": "--partition",
    "accountant": "--accountant",
    "device": "--device",
}


class ExperimentSpec(BaseModel):
    """A whole benchmark job: every method x eps x seed is one federated run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    methods: tuple[str, ...]
    method_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    dataset: str = "synthetic"
    data_root: Path | None = None
    dataset_options: dict[str, Any] = Field(default_factory=dict)
    protocol: Literal["personalized", "base2novel"] = "base2novel"
    partition: Literal["pathological", "dirichlet", "iid"] = "pathological"
    alpha: float = Field(0.5, gt=0)
    clients: int = Field(10, ge=1)
    client_fraction: float = Field(1.0, gt=0, le=1)
    shots: int = Field(16, ge=0)
    rounds: int = Field(20, ge=1)
    local_epochs: int = Field(2, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.005, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    n_ctx: int = Field(16, ge=1)
    ctx_init: str | None = None
    eval_every: int = Field(4, ge=1)
    last_k: int = Field(2, ge=1)
    backbone: str = "fpl-tiny-vit"
    pretrained: str | None = None
    checkpoint: Path | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1)
    eps: tuple[float | None, ...] = (None,)
    delta: float = Field(1e-5, gt=0, lt=1)
    clip_norm: float = Field(1.0, gt=0)
    accountant: Literal["rdp", "prv", "paper"] = "rdp"
    seeds: tuple[int, ...] = (0,)
    out: Path = Path("runs/default")
    cache_dir: Path = Path.home() / ".cache" / "fpl-bench"

    @field_validator("eps")
    @classmethod
    def _eps_positive(cls, value: tuple[float | None, ...]) -> tuple[float | None, ...]:
        for eps in value:
            if eps is not None and not (eps > 0 and math.isfinite(eps)):
                raise ValueError(f"epsilon must be > 0 (got {eps}); use e.g. --eps 0.5 or none")
        return value

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(s < 0 for s in value):
            raise ValueError("seeds must be non-negative integers, e.g. --seeds 0,1,2")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentSpec:
        if self.pretrained is not None and self.checkpoint is not None:
            raise ValueError("give either --pretrained or --checkpoint, not both")
        return self


def build_spec(**fields: Any) -> ExperimentSpec:
    """ExperimentSpec from keyword fields; a validation error becomes one UsageError line."""
    try:
        return ExperimentSpec(**fields)
    except ValidationError as err:
        first = err.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "spec"
        flag = FLAG_OF.get(field, field)
        value = fields.get(field, "?")
        message = first["msg"].removeprefix("Value error, ")
        raise UsageError(f"{flag} {value}: {message}") from None


def parse_eps(text: str) -> tuple[float | None, ...]:
    """'0.1,0.5,none' -> (0.1, 0.5, None); a bad word is a UsageError."""
    out: list[float | None] = []
    for word in text.split(","):
        word = word.strip().lower()
        if word in ("none", "inf", "off"):
            out.append(None)
            continue
        try:
            out.append(float(word))
        except ValueError:
            raise UsageError(
                f"--eps {text}: '{word}' is not a number or 'none'; e.g. --eps 0.5,none"
            ) from None
    return tuple(out)


def parse_int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise UsageError(
            f"{flag} {text}: expected comma-separated integers, e.g. {flag} 0,1,2"
        ) from None
