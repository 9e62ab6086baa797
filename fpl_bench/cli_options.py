"""Command-line options that several sub-commands take, declared once.

Every option that sets an ExperimentSpec field is one `SpecOption` in `SPEC_OPTIONS`: its
type on the command line, its help text, its default (the spec's, unless the flag's own
"not given" differs) and how its value becomes the field's. `spec_options` adds the options a
command takes to its signature; the command gets their values as one `SpecFlags`, and
`spec_from_flags` builds the spec from them, reporting a bad field as the flag that sets it:

    @spec_options("device", "batch_size")
    def command(*, methods: str = "all", flags: SpecFlags) -> None:
        spec = spec_from_flags(flags, methods=resolve(methods))  # '--batch-size 0: ...'

Machine settings that commands without a spec take too are aliases of the same declarations
(`DataRoot`, `Device`, `CacheDir`):

    def command(data_root: DataRoot = None, cache_dir: CacheDir = None) -> None:
        cache = cache_dir_or_env(cache_dir)
"""

from __future__ import annotations

import functools
import inspect
import os
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fpl_bench.errors import UsageError

if TYPE_CHECKING:
    from fpl_bench.spec import ExperimentSpec

CACHE_ENV = "FPL_BENCH_CACHE"
_FROM_SPEC: Any = object()  # a SpecOption's default: the spec field's


def spec_default(field: str) -> Any:
    """The ExperimentSpec default of `field`, so a command and the spec cannot disagree."""
    from fpl_bench.spec import ExperimentSpec

    return ExperimentSpec.model_fields[field].default


@dataclass(frozen=True)
class SpecOption:
    """A flag `--NAME` that sets the spec field `field` (default: NAME): the value's type on
    the command line, the help text, the default (the field's, unless given) and `convert`,
    the flag's value (None too: not given) -> the field's value. A value that is, or
    converts to, None sets nothing: the field keeps the spec's default."""

    name: str
    value_type: Any
    help: str
    field: str = ""
    default: Any = _FROM_SPEC
    decls: tuple[str, ...] = ()  # the option's own names, e.g. ("--resume",) for a switch
    convert: Callable[[Any], Any] | None = None

    @property
    def spec_field(self) -> str:
        return self.field or self.name

    @property
    def flag(self) -> str:
        return self.decls[0] if self.decls else "--" + self.name.replace("_", "-")

    @property
    def annotation(self) -> Any:
        """The typer annotation: Annotated[type, typer.Option(...)]."""
        return Annotated[self.value_type, typer.Option(*self.decls, help=self.help)]

    def parameter(self) -> inspect.Parameter:
        """The command parameter that takes this option."""
        default = spec_default(self.spec_field) if self.default is _FROM_SPEC else self.default
        kind = inspect.Parameter.KEYWORD_ONLY
        return inspect.Parameter(self.name, kind, annotation=self.annotation, default=default)

    def field_value(self, value: Any) -> Any:
        return value if self.convert is None else self.convert(value)


def dataset_options(items: list[str] | None) -> dict[str, Any]:
    """`--dataset-option KEY=VALUE` items as a dict, each value parsed as the catalog parses
    card values (numbers, booleans, lists)."""
    from fpl_bench.catalog import parse_value

    options = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--dataset-option {item}: expected KEY=VALUE, e.g. domain=noise")
        options[key.strip()] = parse_value(value.strip())
    return options


def cache_dir_or_env(cache_dir: Path | None) -> Path | None:
    """--cache-dir when given, else $FPL_BENCH_CACHE when set, else None (the spec's default)."""
    if cache_dir is not None:
        return cache_dir
    return Path(os.environ[CACHE_ENV]) if os.environ.get(CACHE_ENV) else None


def _words(text: str | None) -> tuple[str, ...]:
    """A comma list as its non-empty words (None: none)."""
    return tuple(w.strip() for w in (text or "").split(",") if w.strip())


_OPTIONS = (
    SpecOption("delta", float, "Target delta."),
    SpecOption("clip_norm", float, "Per-sample clipping norm C."),
    SpecOption(
        "accountant",
        str,
        "Noise calibration: rdp, prv, pld (needs dp-accounting), or paper (DP-FPL closed form).",
    ),
    SpecOption(
        "dataset", str, "Dataset card name (see `fpl-bench datasets`) or card file PATH.toml."
    ),
    SpecOption("data_root", Path | None, "Folder holding the dataset files."),
    SpecOption(
        "dataset_option",
        list[str] | None,
        "Dataset option KEY=VALUE (repeatable), e.g. domain=noise.",
        field="dataset_options",
        default=None,
        convert=dataset_options,
    ),
    SpecOption(
        "protocol",
        str,
        "base2novel, personalized, multi-domain, cross-domain, cross-dataset "
        "(with --transfer-datasets), or FLiP's global or dual.",
    ),
    SpecOption(
        "transfer_datasets",
        str | None,
        "cross-dataset: comma list of datasets the prompts are scored on.",
        default=None,
        convert=_words,
    ),
    SpecOption(
        "target_domain", str | None, "cross-domain: the held-out domain (default: the last)."
    ),
    SpecOption("partition", str, "pathological, dirichlet, iid or by_domain."),
    SpecOption(
        "alpha",
        float | None,
        f"Dirichlet concentration (--partition dirichlet; default {spec_default('alpha')}).",
        default=None,
    ),
    SpecOption("clients", int, "Number of clients."),
    SpecOption("client_fraction", float, "Fraction of clients sampled per round."),
    SpecOption("rounds", int, "Communication rounds."),
    SpecOption("local_epochs", int, "Local epochs per round."),
    SpecOption("shots", int, "Training shots per class per client (0 = all)."),
    SpecOption("batch_size", int, "Local batch size (expected size under DP)."),
    SpecOption("lr", float, "SGD learning rate."),
    SpecOption("n_ctx", int, "Number of learnable context vectors."),
    SpecOption(
        "ctx_init",
        str | None,
        "Start the context from this phrase's embedding (CoCoOp's and KgCoOp's 'a photo of "
        "a'); --n-ctx must equal its token count. Default: random N(0, 0.02^2).",
    ),
    SpecOption("eval_every", int, "Evaluate every N rounds."),
    SpecOption("last_k", int, "Final figure: mean over the last k evaluations."),
    SpecOption(
        "curve",
        bool,
        "Evaluate every --eval-every rounds, a learning curve in MLflow (default: only the last "
        "--last-k of those evaluations, which the result averages).",
        decls=("--curve",),
    ),
    SpecOption(
        "backbone",
        str,
        "open_clip model name or a model-config .json (default: the embedded tiny CLIP).",
    ),
    SpecOption(
        "pretrained",
        str | None,
        "open_clip tag (e.g. openai), a weights file (.pt/.safetensors, OpenAI's TorchScript "
        ".pt), or none (random weights).",
    ),
    SpecOption("checkpoint", Path | None, "Local checkpoint (state dict) for --backbone."),
    SpecOption("device", str, "auto, cpu or cuda."),
    SpecOption(
        "threads", int | None, "CPU threads for training (default: 1 for the embedded model)."
    ),
    SpecOption(
        "workers",
        int | None,
        "Runs in parallel processes (default: on CPU, the usable cores for a job large enough "
        "to pay for starting them; 1 on CUDA).",
    ),
    SpecOption(
        "trust",
        str,
        "Trust model under DP: server (trusted aggregator adds the noise to shared parameters) "
        "or client (every client noises everything it sends).",
    ),
    SpecOption(
        "resume",
        bool,
        "Continue the job in --out: skip finished runs, continue checkpointed ones.",
        decls=("--resume",),
    ),
    SpecOption(
        "precision",
        str,
        "Frozen towers' precision: auto (bf16 where the hardware multiplies it natively: CUDA "
        "with bf16, CPUs with AMX; else fp32), bf16 (autocast) or fp32.",
    ),
    SpecOption(
        "secure_noise",
        bool,
        "Draw DP noise and Poisson batches from the OS's cryptographically secure source "
        "(not seeded; for prompts you release).",
        decls=("--secure-noise",),
    ),
    SpecOption(
        "cache_dir",
        Path | None,
        f"Feature/data cache (default ${CACHE_ENV}, else ~/.cache/fpl-bench).",
        default=None,
        convert=cache_dir_or_env,
    ),
)
SPEC_OPTIONS: dict[str, SpecOption] = {option.name: option for option in _OPTIONS}

DataRoot = SPEC_OPTIONS["data_root"].annotation
Device = SPEC_OPTIONS["device"].annotation
CacheDir = SPEC_OPTIONS["cache_dir"].annotation


@dataclass(frozen=True)
class SpecFlags:
    """The values of a command's spec options as parsed, by option name."""

    values: Mapping[str, Any]

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def client_dp(self, eps: Sequence[float | None] | None) -> bool:
        """Whether runs at `eps` (None: the spec's default) are private under the trust model
        the flags set and it is the client's (`spec.client_dp`)."""
        from fpl_bench.spec import client_dp

        trust = self.values.get("trust") or spec_default("trust")
        return client_dp(trust, spec_default("eps") if eps is None else eps)

    def fields(self) -> dict[str, Any]:
        """The spec fields the flags set (a flag not given sets none: the spec's default)."""
        out = {}
        for name, value in self.values.items():
            option = SPEC_OPTIONS[name]
            converted = option.field_value(value)
            if converted is not None:
                out[option.spec_field] = converted
        return out


def spec_options(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: the command takes the spec options `names` (of SPEC_OPTIONS), in the place of
    its keyword-only parameter `flags`, and receives their values as `flags: SpecFlags`."""
    chosen = [SPEC_OPTIONS[name] for name in names]

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(command, include_extras=True)
        params: list[inspect.Parameter] = []
        for param in inspect.signature(command).parameters.values():
            if param.name == "flags":
                params += [option.parameter() for option in chosen]
            else:
                kind = inspect.Parameter.KEYWORD_ONLY
                params.append(param.replace(kind=kind, annotation=hints[param.name]))

        @functools.wraps(command)
        def with_flags(**kwargs: Any) -> Any:
            values = {option.name: kwargs.pop(option.name) for option in chosen}
            return command(**kwargs, flags=SpecFlags(values))

        # typer reads the parameters from the signature and their types from the annotations
        with_flags.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
        with_flags.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
        return with_flags

    return decorate


def flag_of(field: str) -> str:
    """The flag that sets the spec field `field` (--FIELD-NAME where no option names it)."""
    for option in SPEC_OPTIONS.values():
        if option.spec_field == field:
            return option.flag
    return "--" + field.replace("_", "-")


def spec_from_flags(flags: SpecFlags, **fields: Any) -> ExperimentSpec:
    """build_spec from the fields the flags set and the command's own `fields` on top (None:
    not given, the spec's default); a bad field is reported as the flag that sets it
    ('--clients 0: ...'), a rule across fields by its message."""
    from fpl_bench.spec import FieldError, build_spec

    given = {name: value for name, value in fields.items() if value is not None}
    try:
        return build_spec(**{**flags.fields(), **given})
    except FieldError as err:
        if err.field == "spec":
            raise UsageError(err.message) from None
        raise UsageError(f"{flag_of(err.field)} {err.value}: {err.message}") from None
