"""ExperimentSpec: the one validator between the user (CLI flags, cards, suites) and the core.

Every rule that needs no data is checked here: field bounds, rules across fields (alpha under
the dirichlet partition only, transfer datasets with cross-dataset only), each method's learner
x scheme pair, the budgets and seeds (whose types suites reuse: `Epsilons`, `Seeds`). Below this
module code takes typed objects and checks only what needs data (a folder's content, a split
file). A validation error becomes one `FieldError` line naming the field (the CLI names its
flag: fpl_bench/cli_options.py `spec_from_flags`).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fpl_bench.catalog import MethodChoice, pools_clients
from fpl_bench.errors import UsageError

# The largest target epsilon a spec takes; the accountant refuses, per (q, steps, delta), any
# smaller one whose noise would fall below its floor (privacy/accountant.py SIGMA_FLOOR).
MAX_EPS = 1000.0
DEFAULT_ALPHA = 0.5


def _eps_words(value: Any) -> Any:
    """'none' (any case) in a list of budgets as written in a TOML file: no DP."""
    if not isinstance(value, list | tuple):
        return value
    return [None if isinstance(v, str) and v.strip().lower() == "none" else v for v in value]


def check_eps(value: Sequence[float | None]) -> Sequence[float | None]:
    """Target epsilons: each > 0, finite and at most MAX_EPS, or None (no DP); each once."""
    for eps in value:
        if eps is not None and not (eps > 0 and math.isfinite(eps)):
            raise ValueError(f"epsilon must be > 0 and finite (got {eps}); e.g. 0.5, or none")
        if eps is not None and eps > MAX_EPS:
            raise ValueError(
                f"epsilon must be <= {MAX_EPS:g} (a larger one calls for noise too small "
                "to protect anything); e.g. 8, or none for no privacy"
            )
    if len(set(value)) != len(value):
        raise ValueError("an epsilon is listed twice; list each once")
    return value


def check_seeds(value: Sequence[int]) -> Sequence[int]:
    """Seeds: at least one, each a non-negative integer, each once."""
    if not value or any(s < 0 for s in value):
        raise ValueError("seeds must be non-negative integers, e.g. 0,1,2")
    if len(set(value)) != len(value):
        raise ValueError("a seed is listed twice; list each seed once")
    return value


# The budgets and seeds of a job, as the spec and a suite's grids (fpl_bench/suite.py) take them.
Epsilons = Annotated[
    tuple[float | None, ...], BeforeValidator(_eps_words), AfterValidator(check_eps)
]
Seeds = Annotated[tuple[int, ...], AfterValidator(check_seeds)]


class ExperimentSpec(BaseModel):
    """A whole benchmark job: every method x eps x seed is one federated run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    methods: tuple[MethodChoice, ...]
    dataset: str = "synthetic"  # a card name; given a card file (PATH.toml), its card's name
    # the file of a dataset card given by path (fpl_bench/data/catalog.py card_path), resolved;
    # None for fpl-bench's own cards. Workers and `spec_from_config` read the card from it.
    dataset_card: Path | None = None
    data_root: Path | None = None
    dataset_options: dict[str, Any] = Field(default_factory=dict)
    protocol: Literal[
        "personalized",
        "base2novel",
        "multi-domain",
        "cross-domain",
        "cross-dataset",
        "global",
        "dual",
    ] = "base2novel"
    transfer_datasets: tuple[str, ...] = ()  # cross-dataset: where the prompts are scored
    target_domain: str | None = None  # cross-domain: the held-out domain (default: the last)
    partition: Literal["pathological", "dirichlet", "iid", "by_domain"] = "pathological"
    # the Dirichlet concentration: another value than the default needs partition dirichlet
    alpha: float = Field(DEFAULT_ALPHA, gt=0, allow_inf_nan=False)
    clients: int = Field(10, ge=1)
    client_fraction: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    shots: int = Field(16, ge=0)
    rounds: int = Field(20, ge=1)
    local_epochs: int = Field(2, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.005, gt=0, allow_inf_nan=False)
    momentum: float = Field(0.9, ge=0, lt=1)
    n_ctx: int = Field(16, ge=1)
    ctx_init: str | None = None
    eval_every: int = Field(4, ge=1)
    last_k: int = Field(2, ge=1)
    # evaluate at every eval_every-th round (a learning curve); else only at the last_k of
    # them, the evaluations the result averages (the same result, less evaluation time)
    curve: bool = False
    backbone: str = "fpl-tiny-vit"
    pretrained: str | None = None
    checkpoint: Path | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1)
    workers: int | None = Field(None, ge=1)  # None: fpl_bench.parallel.job_workers decides
    # frozen text tower: bf16 autocast or fp32; auto = bf16 where the device multiplies bf16
    # natively (CUDA, CPU with AMX), fp32 elsewhere (fpl_bench/compute.py)
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    eps: Epsilons = (None,)
    delta: float = Field(1e-5, gt=0, lt=1, allow_inf_nan=False)
    clip_norm: float = Field(1.0, gt=0, allow_inf_nan=False)
    # privacy/accountant.py CALIBRATIONS; "pld" needs dp-accounting (a dependency)
    accountant: Literal["rdp", "prv", "pld", "paper"] = "rdp"
    trust: Literal["server", "client"] = "server"
    # "val": evaluate on the dataset's validation split (carved from training data), never
    # test: what tuning optimises. "test": the reported numbers.
    eval_split: Literal["test", "val"] = "test"
    secure_noise: bool = False
    resume: bool = False  # continue checkpointed runs, skip finished ones
    tuned: bool = False  # hyperparameters from `fpl-bench tune` studies (recorded per row)
    # a tuned spec: the setup hash of the spec it was tuned from, so that its rows share a
    # leaderboard table with that spec's untuned rows (fpl_bench/run_records.py setup_hash)
    tuned_from: str | None = None
    seeds: Seeds = (0,)
    out: Path = Path("runs/default")
    cache_dir: Path = Path.home() / ".cache" / "fpl-bench"

    @model_validator(mode="before")
    @classmethod
    def _card_files(cls, data: Any) -> Any:
        """A dataset given as a card file: read and checked here (a bad card is one line
        naming the file), then `dataset` is its name and `dataset_card` its file. Transfer
        datasets given as files are checked too and keep their resolved paths."""
        from fpl_bench.data.catalog import card_path, dataset_card

        if not isinstance(data, dict):
            return data
        data = dict(data)
        name, file = data.get("dataset"), data.get("dataset_card")
        if isinstance(name, str) and card_path(name) is not None:
            if file is not None:
                raise ValueError("give the dataset as a card name or a card file, not both")
            file = card_path(name)
            data["dataset"], data["dataset_card"] = dataset_card(name).name, file
        elif file is not None:  # a spec rebuilt from another (tuning) or from a saved config
            data["dataset_card"] = Path(file).expanduser().resolve()
            card = dataset_card(str(data["dataset_card"]))
            if card.name != name:
                raise ValueError(f"dataset {name!r} but its card file {file} is {card.name!r}")
        transfers = data.get("transfer_datasets")
        if isinstance(transfers, list | tuple):
            resolved = []
            for text in transfers:
                path = card_path(text) if isinstance(text, str) else None
                if path is not None:
                    dataset_card(text)  # a bad card: one line now, before any data is read
                resolved.append(text if path is None else str(path))
            data["transfer_datasets"] = tuple(resolved)
        return data

    def dataset_source(self) -> str:
        """What `dataset_card` reads this spec's dataset from: its card file, else its name
        (a worker process has not read the file the job's process was given)."""
        return self.dataset if self.dataset_card is None else str(self.dataset_card)

    @field_validator("alpha")
    @classmethod
    def _alpha_dirichlet_only(cls, value: float, info: ValidationInfo) -> float:
        partition = info.data.get("partition")
        if partition is not None and partition != "dirichlet" and value != DEFAULT_ALPHA:
            raise ValueError(f"applies to partition dirichlet only, not {partition}")
        return value

    @field_validator("accountant")
    @classmethod
    def _accountant_installed(cls, value: str) -> str:
        if value == "pld" and importlib.util.find_spec("dp_accounting") is None:
            raise ValueError(
                "needs Google's dp-accounting: pip install dp-accounting (fpl-bench depends on "
                "it), or use rdp or prv"
            )
        return value

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: tuple[MethodChoice, ...]) -> tuple[MethodChoice, ...]:
        if not value:
            raise ValueError("no method given; e.g. all, or coop,dpfpl, or kgcoop@fedavg")
        labels = [m.label for m in value]
        twice = sorted({x for x in labels if labels.count(x) > 1})
        if twice:
            raise ValueError(f"method {twice[0]!r} is listed twice; list each method once")
        for choice in value:
            problem = _pair_problem(choice)
            if problem:
                pair = f"{choice.learner}@{choice.scheme}"
                named = choice.label if choice.label == pair else f"{choice.label} ({pair})"
                raise ValueError(f"{named} cannot work: {problem}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentSpec:
        if (self.protocol == "cross-dataset") != bool(self.transfer_datasets):
            raise ValueError(
                "the cross-dataset protocol needs transfer datasets, and only it takes them"
            )
        if self.pretrained is not None and self.checkpoint is not None:
            raise ValueError("give either pretrained or checkpoint, not both")
        if client_dp(self.trust, self.eps):
            pooled = [m.label for m in self.methods if pools_clients(m.scheme)]
            if pooled:
                raise ValueError(
                    f"{pooled[0]} cannot be private under trust client: it pools every client's "
                    "raw records at one trainer, which only a trusted curator may hold (central "
                    "DP, not local); run it with --trust server, or at --eps none"
                )
        return self


def client_dp(trust: str, eps: Sequence[float | None]) -> bool:
    """Whether runs at these epsilons are private under the client trust model (local DP)."""
    return trust == "client" and any(e is not None for e in eps)


def _pair_problem(choice: MethodChoice) -> str | None:
    """Why the method's learner or scheme cannot be built from its card (`fields_problem`), or
    the learner cannot work under the scheme (fpl_bench/method.py), or None."""
    from fpl_bench.catalog import fields_problem, learner_cards, scheme_cards
    from fpl_bench.learners import LEARNERS
    from fpl_bench.method import pair_problem
    from fpl_bench.schemes import SCHEMES

    learner, scheme = LEARNERS.get(choice.learner), SCHEMES.get(choice.scheme)
    for kind, cls, card in (
        ("learner", learner, learner_cards()[choice.learner]),
        ("scheme", scheme, scheme_cards()[choice.scheme]),
    ):
        problem = fields_problem(cls, card)
        if problem:
            return f"its {kind} {card.name}: {problem}"
    return pair_problem(learner, scheme)


class FieldError(UsageError):
    """A spec field with a bad value: names the field (the CLI maps it to its flag)."""

    def __init__(self, field: str, value: Any, message: str) -> None:
        super().__init__(f"{field}={value}: {message}")
        self.field, self.value, self.message = field, value, message


def build_spec(**fields: Any) -> ExperimentSpec:
    """ExperimentSpec from keyword fields; a validation error becomes one FieldError line."""
    try:
        return ExperimentSpec(**fields)
    except ValidationError as err:
        first = err.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "spec"
        value = fields.get(field, "?")
        if isinstance(value, tuple) and all(isinstance(v, int | float | None) for v in value):
            value = ",".join("none" if v is None else f"{v:g}" for v in value)
        elif isinstance(value, tuple) and all(isinstance(v, MethodChoice) for v in value):
            value = ",".join(v.label for v in value)
        message = first["msg"].removeprefix("Value error, ")
        raise FieldError(field, value, message) from None


def spec_from_config(
    config: dict[str, Any],
    *,
    eps: tuple[float | None, ...],
    seeds: tuple[int, ...],
    **overrides: Any,
) -> ExperimentSpec:
    """The spec of one method's resolved configuration (`run_records.run_config`: the spec's
    fields, method, learner options `learner.X` and scheme options `scheme.Y`) at `eps` and
    `seeds`, with `overrides` (out, cache_dir, data_root, device, ...; None values ignored)
    on top. Its runs have the configuration's config hash again."""
    from fpl_bench.catalog import preset_cards, resolve_method

    options = {k: v for k, v in config.items() if k.startswith(("learner.", "scheme."))}
    fields = {k: v for k, v in config.items() if k in ExperimentSpec.model_fields}
    label = str(config["method"])
    if "@" in label or label in preset_cards():
        choice = resolve_method(label, options)
    else:  # a card given by path to another process: the config holds all its options
        pair = f"{config['learner']}@{config['scheme']}"
        choice = resolve_method(pair, options).model_copy(update={"label": label})
    fields.update(
        methods=(choice,),
        eps=eps,
        seeds=seeds,
        **{k: v for k, v in overrides.items() if v is not None},
    )
    return build_spec(**fields)


def parse_eps(text: str) -> tuple[float | None, ...]:
    """'0.1,0.5,none' -> (0.1, 0.5, None); a bad word is a UsageError."""
    out: list[float | None] = []
    for word in text.split(","):
        word = word.strip().lower()
        if word in ("none", "off"):
            out.append(None)
            continue
        if word in ("inf", "infinity", "+inf"):
            raise UsageError(f"--eps {text}: for no privacy say 'none', not '{word}'")
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
