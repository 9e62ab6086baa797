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

Beyond the shipped cards:
- a preset card file (`--methods path/to/mine.toml`, alone or in a list with names, or in a
  suite's grid) is validated like a shipped preset and joins this process's presets under its
  name (`add_preset_card`), which labels its rows; it may not take a shipped preset's name.
- learners and schemes of other installed packages (entry points, `fpl_bench/registry.py`)
  bring their cards with them: the class's `card` attribute, a TOML file beside its module or
  a `ComponentCard`; they join `learner_cards()` / `scheme_cards()` and so `fpl-bench methods
  --all` and `--methods NAME@SCHEME`. (Torch is imported then: the plugin's module needs it.)
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import tomllib
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fpl_bench.cards import cards_root
from fpl_bench.data.catalog import card_path, check_card_name
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

    @model_validator(mode="after")
    def _bounds_of_a_number(self) -> OptionCard:
        numeric = isinstance(self.default, int | float) and not isinstance(self.default, bool)
        bounds = [k for k in ("min", "max", "gt") if getattr(self, k) is not None]
        if bounds and not numeric:
            raise ValueError(
                f"{', '.join(bounds)} bound a number, but the default {self.default!r} is a "
                f"{type(self.default).__name__}; give a numeric default or drop the bounds"
            )
        return self

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
def _shipped(folder: str) -> dict[str, ComponentCard]:
    return {p.stem: _read(p, ComponentCard) for p in sorted(_folder(folder).glob("*.toml"))}


def learner_cards() -> dict[str, ComponentCard]:
    """The shipped learner cards, then those of plugin learners."""
    return {**_shipped("learners"), **_plugin_cards("learners")}


def scheme_cards() -> dict[str, ComponentCard]:
    """The shipped scheme cards, then those of plugin schemes."""
    return {**_shipped("schemes"), **_plugin_cards("schemes")}


def _plugin_cards(folder: str) -> dict[str, ComponentCard]:
    if folder == "learners":
        from fpl_bench.learners import LEARNERS as registry
    else:
        from fpl_bench.schemes import SCHEMES as registry
    return {name: _plugin_card(registry.kind, cls) for name, cls in registry.plugins().items()}


@cache
def _plugin_card(kind: str, cls: type) -> ComponentCard:
    """The card a plugin class gives in its `card` attribute: a TOML file (a relative path is
    beside the class's module) or a `ComponentCard`, validated like a shipped card; its name
    must be the plugin's and its options the class's dataclass fields."""
    name = getattr(cls, "name", "?")
    where = f"plugin {kind} {name!r} ({cls.__module__}.{cls.__qualname__})"
    given = getattr(cls, "card", None)
    if isinstance(given, ComponentCard):
        card = given
    elif isinstance(given, str | Path):
        path = Path(given)
        if not path.is_absolute():
            path = Path(inspect.getfile(cls)).parent / path
        card = read_toml_model(path, ComponentCard, what=f"card of {where}")
    else:
        raise UsageError(
            f"{where} has no card: give its class a `card` attribute, the path of a TOML card "
            "beside its module or a fpl_bench.catalog.ComponentCard"
        )
    if card.name != name:
        raise UsageError(f"{where}: its card is named {card.name!r}; name it {name!r}")
    problem = fields_problem(cls, card)
    if problem:
        raise UsageError(f"{where}: {problem}")
    return card


def fields_problem(cls: type, card: ComponentCard) -> str | None:
    """Why a learner or scheme class cannot be built from its card's options (the class's
    dataclass fields must be exactly the card's options), or None."""
    if not dataclasses.is_dataclass(cls):
        return None
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    if fields == set(card.options):
        return None
    missing, extra = sorted(fields - set(card.options)), sorted(set(card.options) - fields)
    fix = "; ".join(
        [*(f"add [options.{k}] to its card" for k in missing[:1]),
         *(f"drop [options.{k}] or add the field" for k in extra[:1])]
    )  # fmt: skip
    return (
        f"its card's options ({', '.join(card.options) or 'none'}) are not its dataclass "
        f"fields ({', '.join(sorted(fields)) or 'none'}): {fix}"
    )


def _check_preset(card: PresetCard, where: Path) -> None:
    """A preset's learner, scheme, option values and search keys exist (UsageError if not)."""
    learners, schemes = learner_cards(), scheme_cards()
    if card.learner not in learners:
        known = ", ".join(learners)
        raise UsageError(f"bad card {where}: unknown learner {card.learner!r}; known: {known}")
    if card.scheme not in schemes:
        known = ", ".join(schemes)
        raise UsageError(f"bad card {where}: unknown scheme {card.scheme!r}; known: {known}")
    try:
        _check_options(learners[card.learner], card.learner_options, f"{card.name}.learner")
        _check_options(schemes[card.scheme], card.scheme_options, f"{card.name}.scheme")
    except UsageError as err:
        raise UsageError(f"bad card {where}: {err}") from None
    for key in card.search:
        _search_target(card, key, where)


@cache
def _shipped_presets() -> dict[str, PresetCard]:
    cards = {p.stem: _read(p, PresetCard) for p in sorted(_folder().glob("*.toml"))}
    for card in cards.values():
        _check_preset(card, cards_root() / "methods" / f"{card.name}.toml")
    return cards


# Preset cards read from a path in this process: name -> (resolved file, card).
_ADDED: dict[str, tuple[Path, PresetCard]] = {}


def preset_cards() -> dict[str, PresetCard]:
    """The shipped presets, then the preset card files read in this process."""
    return {**_shipped_presets(), **{name: card for name, (_, card) in _ADDED.items()}}


def add_preset_card(path: str | Path) -> str:
    """Read the preset card file `path` (validated like a shipped preset: fields, learner,
    scheme, option values, search keys) into this process's presets; returns its name, the
    label of its rows. A name of a shipped preset, or of another file's card, is refused."""
    path = Path(path).expanduser().resolve()
    for name, (file, _) in _ADDED.items():
        if file == path:  # read once per process, as the shipped cards are
            return name
    if not path.is_file():
        why = "a folder, not a card file" if path.is_dir() else "no such file"
        raise UsageError(f"method card {path}: {why}")
    card = read_toml_model(path, PresetCard, what="card")
    shipped = [*_shipped_presets(), *GROUPS]  # `--methods all|default` name groups of presets
    check_card_name(card.name, path, shipped=shipped, added=_ADDED, what="method")
    _check_preset(card, path)
    _ADDED[card.name] = (path, card)
    return card.name


def remember_cards(choices: Iterable[MethodChoice]) -> None:
    """Read again the card files of resolved methods (a worker process gets the job's
    choices, not its command line), so their names resolve here too."""
    for choice in choices:
        if choice.card is not None:
            add_preset_card(choice.card)


# The order the benchmark reports presets in (others follow alphabetically).
PRESET_ORDER = ("zeroshot", "coop", "kgcoop", "promptfl", "fedprox", "fedkgcoop", "fedotp")
PRESET_ORDER += ("fedpgp", "dpfpl")


def list_presets() -> list[str]:
    """The shipped presets, in report order (`--methods all`)."""
    order = {name: i for i, name in enumerate(PRESET_ORDER)}
    return sorted(_shipped_presets(), key=lambda n: (order.get(n, len(order)), n))


def default_presets() -> list[str]:
    """`--methods default`, the default job: every preset whose text features do not depend on
    the image. CoCoOp runs the text tower once per image and class, MaPLe, IVLP and PromptSRC
    the image tower once per image, which makes each of their runs 20-60x a CoOp run on a CPU;
    `all` or their names run them."""
    from fpl_bench.learners import LEARNERS

    cards = preset_cards()
    return [n for n in list_presets() if not LEARNERS.get(cards[n].learner).reads_images]


GROUPS = {"all": list_presets, "default": default_presets}  # --methods words naming a group


def pools_clients(scheme: str) -> bool:
    """Whether scheme `scheme` trains one model on every client's records pooled (central):
    a method of it has no DP under the client trust model (spec.py refuses it)."""
    from fpl_bench.schemes import SCHEMES

    return SCHEMES.get(scheme).pools_clients


def group_presets(group: str, *, client_dp: bool = False) -> list[str]:
    """The presets of a `--methods` group; with `client_dp` (DP under the client trust model)
    without those that pool every client's records, which cannot run there."""
    cards = preset_cards()
    return [n for n in GROUPS[group]() if not (client_dp and pools_clients(cards[n].scheme))]


def _check_options(card: ComponentCard, values: dict[str, Any], where: str) -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        if key not in card.options:
            known = ", ".join(card.options) or "none"
            raise UsageError(f"{where}: {card.name} has no option {key!r}; its options: {known}")
        out[key] = card.options[key].check(value, f"{where}.{key}")
    return out


def _search_target(card: PresetCard, key: str, where: Path) -> tuple[str, str]:
    """('run'|'learner'|'scheme', option) a search-space key tunes; UsageError if unknown."""
    if key in RUN_SEARCH_KEYS:
        return "run", key
    part, _, option = key.partition(".")
    components = {"learner": learner_cards()[card.learner], "scheme": scheme_cards()[card.scheme]}
    if part in components and option in components[part].options:
        return part, option
    raise UsageError(
        f"bad card {where}: search key {key!r} is neither a run setting "
        f"({', '.join(RUN_SEARCH_KEYS)}) nor learner.OPTION / scheme.OPTION of its components"
    )


class MethodChoice(BaseModel):
    """One method of a job, resolved: its label, its learner and scheme with checked options."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    label: str  # preset name (a card file's: its name), or "learner@scheme"
    learner: str
    scheme: str
    learner_options: dict[str, Any]
    scheme_options: dict[str, Any]
    preset: str | None = None
    card: str | None = None  # the file of a preset read from a path (not in the config hash)

    def options(self) -> dict[str, Any]:
        """Flat {learner.X: .., scheme.Y: ..} for records."""
        return {
            **{f"learner.{k}": v for k, v in self.learner_options.items()},
            **{f"scheme.{k}": v for k, v in self.scheme_options.items()},
        }


def method_names(text: str, *, client_dp: bool = False) -> list[str]:
    """'all' -> every preset, 'default' -> `default_presets()` (with `client_dp`, without the
    presets that cannot be private under the client trust model: `group_presets`); else the
    comma list, each a preset, a learner@scheme pair or a preset card file (PATH.toml: read
    here, and listed by its card's name)."""
    words = [w.strip() for w in text.split(",") if w.strip()]
    words = [w.lower() if card_path(w) is None else add_preset_card(w) for w in words]
    if not words:
        raise UsageError("the method list is empty; e.g. all, or coop,dpfpl, or kgcoop@fedavg")
    if len(words) == 1 and words[0] in GROUPS:
        return group_presets(words[0], client_dp=client_dp)
    group = next((w for w in words if w in GROUPS), None)
    if group is not None:
        raise UsageError(
            f"--methods {text}: '{group}' names a group of presets and cannot be combined with "
            f"other names; give {group} alone, or list the methods"
        )
    if len(set(words)) != len(words):
        twice = sorted({w for w in words if words.count(w) > 1})
        raise UsageError(f"method {twice[0]!r} is listed twice; list each method once")
    return words


def resolve_method(name: str, overrides: dict[str, Any] | None = None) -> MethodChoice:
    """A preset name or a `learner@scheme` pair, with `overrides` {option or learner.option or
    scheme.option: value} over the cards' values; every value is type- and range-checked."""
    if card_path(name) is not None:
        name = add_preset_card(name)
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
        card=str(_ADDED[name][0]) if preset in _ADDED else None,
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
    name = name.strip() if card_path(name.strip()) else name.strip().lower()
    choice = resolve_method(name)  # an unknown name: one line listing the known ones
    name = choice.label
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
        lines.append(f"  none: {choice.card or f'methods/{name}.toml'} has no [search] table")
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
