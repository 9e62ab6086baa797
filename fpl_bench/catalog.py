"""Method cards: learners, schemes and the named methods that pair them (configs as data).

Three kinds of TOML card, each keyed by file stem and validated when read (a missing or unknown
field is a one-line error, never a skip):

    methods/learners/<name>.toml   a prompt learner: paper, and its options with their defaults
    methods/schemes/<name>.toml    a federation scheme: likewise
    methods/<name>.toml            a named method (preset): learner + scheme, option overrides,
                                   search space, paper and reference code

The cards are the single source of option defaults: the learner and scheme dataclasses declare
typed fields without defaults. An option card gives `default` (whose TOML type is the option's
type: bool, int, float or str) and optional bounds (`min`, `max` inclusive; `gt` exclusive;
`choices`). `resolve_method` turns a name on the command line, a preset (`dpfpl`) or a spelled
pair (`kgcoop@fedavg`), plus `--param` overrides into a `MethodChoice` of plain checked values.
This module imports no torch: a bad option is refused in well under a second, before any data
or model is loaded.
"""

from __future__ import annotations

import math
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fpl_bench.cards import cards_root
from fpl_bench.errors import UsageError

# Run settings a method's search space may tune besides its learner/scheme options.
RUN_SEARCH_KEYS = ("lr", "local_epochs", "clip_norm", "n_ctx", "batch_size")


class OptionCard(BaseModel):
    """One option of a learner or scheme: its default (which fixes its type) and bounds."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    default: bool | int | float | str
    help: str
    min: float | None = None
    max: float | None = None
    gt: float | None = None
    choices: list[Any] | None = None

    @property
    def kind(self) -> type:
        return type(self.default)

    def check(self, value: Any, where: str) -> Any:
        """`value` if it has this option's type and bounds, else UsageError naming `where`."""
        kind = self.kind
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise UsageError(
                f"{where}={value!r}: expected {kind.__name__} (default {self.default!r})"
            )
        if kind is float and not math.isfinite(value):
            raise UsageError(f"{where}={value!r}: must be a finite number")
        if self.choices is not None and value not in self.choices:
            raise UsageError(f"{where}={value!r}: choose one of {self.choices}")
        if self.min is not None and value < self.min:
            raise UsageError(f"{where}={value!r}: must be >= {self.min:g}")
        if self.max is not None and value > self.max:
            raise UsageError(f"{where}={value!r}: must be <= {self.max:g}")
        if self.gt is not None and not value > self.gt:
            raise UsageError(f"{where}={value!r}: must be > {self.gt:g}")
        return value


class ComponentCard(BaseModel):
    """A learner or a scheme card."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    summary: str
    paper: str
    reference: str
    options: dict[str, OptionCard] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _defaults_in_bounds(self) -> ComponentCard:
        for key, option in self.options.items():
            option.check(option.default, f"{self.name}.{key} default")
        return self

    def defaults(self) -> dict[str, Any]:
        return {key: option.default for key, option in self.options.items()}


class SearchRange(BaseModel):
    """A search-space entry: a float/int range (optionally log-scaled) or a list of choices."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _shape(self) -> SearchRange:
        if self.choices is None:
            if self.low is None or self.high is None:
                raise ValueError("a search range needs low and high, or choices")
            if self.low > self.high:
                raise ValueError(f"low {self.low} > high {self.high}")
            if self.log and self.low <= 0:
                raise ValueError(f"a log range needs low > 0, got {self.low}")
        elif not self.choices:
            raise ValueError("choices is empty")
        return self


class PresetCard(BaseModel):
    """A named method: a learner, a scheme, overrides of their options, a search space."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    summary: str
    paper: str
    reference: str
    learner: str
    scheme: str
    learner_options: dict[str, Any] = Field(default_factory=dict)
    scheme_options: dict[str, Any] = Field(default_factory=dict)
    search: dict[str, SearchRange] = Field(default_factory=dict)
    notes: dict[str, str] = Field(default_factory=dict)  # why a default differs from a paper


def read_toml_model(path: Path, model: type[BaseModel], *, what: str) -> Any:
    """A TOML file validated by `model`, whose `name` must equal the file stem. Any problem is
    one UsageError line "bad <what> <path>: ..." naming the field (cards, suites)."""
    try:
        value = model.model_validate(tomllib.loads(path.read_text()))
    except OSError as err:
        raise UsageError(f"cannot read {what} {path}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"bad {what} {path}: {_one_line(str(err))}") from None
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or what
        message = first["msg"].removeprefix("Value error, ")
        raise UsageError(f"bad {what} {path}: {where}: {_one_line(message)}") from None
    except UsageError as err:
        raise UsageError(f"bad {what} {path}: {err}") from None
    if value.name != path.stem:
        raise UsageError(f"bad {what} {path}: name {value.name!r} differs from the file stem")
    return value


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _read(path: Path, model: type[BaseModel]) -> Any:
    return read_toml_model(path, model, what="card")


def _folder(*parts: str) -> Path:
    folder = cards_root().joinpath("methods", *parts)
    if not folder.is_dir():
        raise UsageError(f"missing card folder {folder}; reinstall fpl-bench")
    return folder


@cache
def learner_cards() -> dict[str, ComponentCard]:
    return {p.stem: _read(p, ComponentCard) for p in sorted(_folder("learners").glob("*.toml"))}


@cache
def scheme_cards() -> dict[str, ComponentCard]:
    return {p.stem: _read(p, ComponentCard) for p in sorted(_folder("schemes").glob("*.toml"))}


@cache
def preset_cards() -> dict[str, PresetCard]:
    cards = {p.stem: _read(p, PresetCard) for p in sorted(_folder().glob("*.toml"))}
    learners, schemes = learner_cards(), scheme_cards()
    for card in cards.values():
        where = cards_root() / "methods" / f"{card.name}.toml"
        if card.learner not in learners:
            raise UsageError(f"bad card {where}: unknown learner {card.learner!r}")
        if card.scheme not in schemes:
            raise UsageError(f"bad card {where}: unknown scheme {card.scheme!r}")
        _check_options(learners[card.learner], card.learner_options, f"{card.name}.learner")
        _check_options(schemes[card.scheme], card.scheme_options, f"{card.name}.scheme")
        for key in card.search:
            _search_target(card, key)
    return cards


# The order the benchmark reports presets in (others follow alphabetically).
PRESET_ORDER = ("zeroshot", "coop", "kgcoop", "promptfl", "fedprox", "fedkgcoop", "fedotp")
PRESET_ORDER += ("fedpgp", "dpfpl")


def list_presets() -> list[str]:
    order = {name: i for i, name in enumerate(PRESET_ORDER)}
    return sorted(preset_cards(), key=lambda n: (order.get(n, len(order)), n))


def _check_options(card: ComponentCard, values: dict[str, Any], where: str) -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        if key not in card.options:
            known = ", ".join(card.options) or "none"
            raise UsageError(f"{where}: {card.name} has no option {key!r}; its options: {known}")
        out[key] = card.options[key].check(value, f"{where}.{key}")
    return out


def _search_target(card: PresetCard, key: str) -> tuple[str, str]:
    """('run'|'learner'|'scheme', option) a search-space key tunes; UsageError if unknown."""
    if key in RUN_SEARCH_KEYS:
        return "run", key
    part, _, option = key.partition(".")
    components = {"learner": learner_cards()[card.learner], "scheme": scheme_cards()[card.scheme]}
    if part in components and option in components[part].options:
        return part, option
    raise UsageError(
        f"bad card methods/{card.name}.toml: search key {key!r} is neither a run setting "
        f"({', '.join(RUN_SEARCH_KEYS)}) nor learner.OPTION / scheme.OPTION of its components"
    )


class MethodChoice(BaseModel):
    """One method of a job, resolved: its label, its learner and scheme with checked options."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    label: str  # preset name, or "learner@scheme"
    learner: str
    scheme: str
    learner_options: dict[str, Any]
    scheme_options: dict[str, Any]
    preset: str | None = None

    def options(self) -> dict[str, Any]:
        """Flat {learner.X: .., scheme.Y: ..} for records."""
        return {
            **{f"learner.{k}": v for k, v in self.learner_options.items()},
            **{f"scheme.{k}": v for k, v in self.scheme_options.items()},
        }


def method_names(text: str) -> list[str]:
    """'all' -> every preset; else the comma list, each a preset or a learner@scheme pair."""
    words = [w.strip().lower() for w in text.split(",") if w.strip()]
    if not words:
        raise UsageError("the method list is empty; e.g. all, or coop,dpfpl, or kgcoop@fedavg")
    if words == ["all"]:
        return list_presets()
    if "all" in words:
        raise UsageError(
            f"--methods {text}: 'all' means every preset and cannot be combined with other "
            "names; give all alone, or list the methods"
        )
    if len(set(words)) != len(words):
        twice = sorted({w for w in words if words.count(w) > 1})
        raise UsageError(f"method {twice[0]!r} is listed twice; list each method once")
    return words


def resolve_method(name: str, overrides: dict[str, Any] | None = None) -> MethodChoice:
    """A preset name or a `learner@scheme` pair, with `overrides` {option or learner.option or
    scheme.option: value} over the cards' values; every value is type- and range-checked."""
    learners, schemes, presets = learner_cards(), scheme_cards(), preset_cards()
    if "@" in name:
        learner, _, scheme = name.partition("@")
        if learner not in learners:
            raise UsageError(
                f"unknown learner {learner!r} in {name!r}; known: {', '.join(learners)}"
            )
        if scheme not in schemes:
            raise UsageError(f"unknown scheme {scheme!r} in {name!r}; known: {', '.join(schemes)}")
        preset = None
        learner_options, scheme_options = {}, {}
    else:
        if name not in presets:
            raise UsageError(
                f"unknown method {name!r}; known: {', '.join(list_presets())} "
                "(or a LEARNER@SCHEME pair; `fpl-bench methods --all` lists them)"
            )
        card = presets[name]
        learner, scheme, preset = card.learner, card.scheme, name
        learner_options, scheme_options = dict(card.learner_options), dict(card.scheme_options)
    learner_options = {**learners[learner].defaults(), **learner_options}
    scheme_options = {**schemes[scheme].defaults(), **scheme_options}
    for key, value in (overrides or {}).items():
        part, dot, option = key.partition(".")
        if not dot:
            part, option = "", key
        in_learner = option in learners[learner].options and part in ("", "learner")
        in_scheme = option in schemes[scheme].options and part in ("", "scheme")
        where = f"{name}.{key}"
        if in_learner and in_scheme:
            raise UsageError(
                f"{where}: both {learner} and {scheme} have {option!r}; "
                f"say {name}.learner.{option} or {name}.scheme.{option}"
            )
        if in_learner:
            learner_options[option] = learners[learner].options[option].check(value, where)
        elif in_scheme:
            scheme_options[option] = schemes[scheme].options[option].check(value, where)
        else:
            known = [f"learner.{k}" for k in learners[learner].options]
            known += [f"scheme.{k}" for k in schemes[scheme].options]
            raise UsageError(
                f"{where}: {name} ({learner}@{scheme}) has no option {option!r}; "
                f"its options: {', '.join(known) or 'none'}"
            )
    return MethodChoice(
        label=name,
        learner=learner,
        scheme=scheme,
        learner_options=learner_options,
        scheme_options=scheme_options,
        preset=preset,
    )


def parse_value(text: str) -> Any:
    """A --param value as TOML reads it: true/false, integers, floats; anything else a string
    (so `no` stays the string 'no' and a bool option refuses it)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_params(items: list[str], methods: list[str]) -> dict[str, dict[str, Any]]:
    """['dpfpl.rank=4', 'kgcoop@fedavg.lam=2'] -> {'dpfpl': {'rank': 4}, ...}; the method must
    be one of the job's `methods`."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        method = next(
            (m for m in sorted(methods, key=len, reverse=True) if key.startswith(m + ".")), None
        )
        named, dot, _ = key.partition(".")
        if sep and dot and named and method is None:
            raise UsageError(
                f"--param {item}: {named!r} is not among this run's methods "
                f"({', '.join(methods)}); add it to --methods, or give METHOD.OPTION=VALUE "
                "for one of them"
            )
        if not sep or method is None or not key[len(method) + 1 :]:
            raise UsageError(
                f"--param {item}: expected METHOD.OPTION=VALUE with METHOD one of the job's "
                f"methods ({', '.join(methods)}), e.g. --param {methods[0]}.OPTION=VALUE"
            )
        out.setdefault(method, {})[key[len(method) + 1 :]] = parse_value(value.strip())
    return out


def describe_method(name: str) -> list[str]:
    """What `fpl-bench methods NAME` prints for a preset or a `learner@scheme` pair: its
    learner and scheme, every option `--param NAME.OPTION=VALUE` accepts (type, default, bounds,
    help), its search space, paper, reference code and notes. UsageError for an unknown name."""
    name = name.strip().lower()
    choice = resolve_method(name)  # an unknown name: one line listing the known ones
    learner, scheme = learner_cards()[choice.learner], scheme_cards()[choice.scheme]
    preset = preset_cards().get(choice.preset) if choice.preset else None
    summary = preset.summary if preset else f"{learner.name} learner under the {scheme.name} scheme"
    lines = [
        f"{name}: {summary}",
        f"  learner    {learner.name}: {learner.summary}",
        f"  scheme     {scheme.name}: {scheme.summary}",
    ]
    if preset:
        lines += [f"  paper      {preset.paper}", f"  reference  {preset.reference}"]
    else:
        for part, card in (("learner", learner), ("scheme", scheme)):
            lines += [f"  paper      {card.paper} ({part})"]
            lines += [f"  reference  {card.reference} ({part})"]
    lines += ["", f"options (--param {name}.OPTION=VALUE):"]
    options = [("learner", learner, choice.learner_options)]
    options += [("scheme", scheme, choice.scheme_options)]
    both = set(learner.options) & set(scheme.options)
    rows = [
        (f"{part}.{key}" if key in both else key, part, card, key, values[key])
        for part, card, values in options
        for key in card.options
    ]
    width = max((len(row[0]) for row in rows), default=0)
    for shown, part, card, key, value in rows:
        option = card.options[key]
        facts = [option.kind.__name__, f"default {_toml_text(value)}"]
        if value != option.default:
            facts[-1] += f" (the {card.name} {part}'s own: {_toml_text(option.default)})"
        facts += _bounds(option)
        lines.append(f"  {shown:{width}s}  {', '.join(facts)} [{part} {card.name}]")
        lines.append(f"  {'':{width}s}  {option.help}")
    lines += [f"  ({card.name} has no options)" for _, card, _ in options if not card.options]
    lines += ["", "search space (fpl-bench tune):"]
    if preset is None:
        lines.append("  none: only a preset card has a [search] table")
    elif not preset.search:
        lines.append(f"  none: methods/{name}.toml has no [search] table")
    width = max((len(key) for key in preset.search), default=0) if preset else 0
    for key, space in (preset.search if preset else {}).items():
        lines.append(f"  {key:{width}s}  {_search_text(space)}")
    if preset and preset.notes:
        lines += ["", "notes (why a default differs from the paper):"]
        width = max(map(len, preset.notes))
        lines += [f"  {key:{width}s}  {text}" for key, text in preset.notes.items()]
    return lines


def _toml_text(value: Any) -> str:
    """A value as it is written on a card or after `--param ...=`: true, 8, 0.01, "a {}."."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def _bounds(option: OptionCard) -> list[str]:
    """An option's bounds as text: ['>= 1'], ['> 0', '<= 10'], ['one of 1, 2']."""
    out = []
    if option.choices is not None:
        out.append("one of " + ", ".join(_toml_text(c) for c in option.choices))
    if option.gt is not None:
        out.append(f"> {option.gt:g}")
    if option.min is not None:
        out.append(f">= {option.min:g}")
    if option.max is not None:
        out.append(f"<= {option.max:g}")
    return out


def _search_text(space: SearchRange) -> str:
    """'one of 1, 2, 4, 8' or '0.0005 to 0.1, log scale' (and its step, if any)."""
    if space.choices is not None:
        return "one of " + ", ".join(_toml_text(c) for c in space.choices)
    text = f"{space.low:g} to {space.high:g}"
    if space.log:
        text += ", log scale"
    if space.step is not None:
        text += f", step {space.step:g}"
    return text
