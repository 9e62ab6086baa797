"""``fpl-bench methods [NAME] [--all]`` and ``fpl-bench datasets``: what can be run.

    fpl-bench methods                  # the named methods (presets)
    fpl-bench methods --all            # also the learners, the schemes and the valid pairs
    fpl-bench methods dpfpl            # one method: learner, scheme, options, paper, notes
    fpl-bench datasets                 # the dataset sources, one line each

Both read the cards (fpl_bench/catalog.py, fpl_bench/cards.py), imported inside the functions.
"""

from __future__ import annotations

from typing import Annotated

import typer

from fpl_bench.errors import UsageError

ORDER = 1  # after `run` in `fpl-bench --help` (fpl_bench/commands/__init__.py)


def methods_cmd(
    name: Annotated[
        str | None,
        typer.Argument(
            metavar="NAME",
            help="A method (preset) or LEARNER@SCHEME pair: print its options, search space "
            "and paper.",
        ),
    ] = None,
    show_all: Annotated[
        bool,
        typer.Option("--all", help="Also list the learners, the schemes and the valid pairs."),
    ] = False,
) -> None:
    """List the named methods (presets); with --all, the learners, schemes and valid pairs;
    with NAME, that method's learner, scheme, options, search space, paper and notes."""
    from fpl_bench.catalog import learner_cards, list_presets, preset_cards, scheme_cards

    if name is not None:
        if show_all:
            raise UsageError("--all lists every method; drop it to describe one method")
        from fpl_bench.catalog import describe_method

        lines = describe_method(name)  # an unknown name: UsageError listing the known ones
        if "@" in name:
            from fpl_bench.learners import LEARNERS
            from fpl_bench.method import pair_problem
            from fpl_bench.schemes import SCHEMES

            learner, _, scheme = name.strip().lower().partition("@")
            problem = pair_problem(LEARNERS.get(learner), SCHEMES.get(scheme))
            lines.insert(
                1, "  pair       " + ("valid" if problem is None else f"refused: {problem}")
            )
        typer.echo("\n".join(lines))
        return
    presets = preset_cards()
    names = list_presets()
    pairs = {name: f"{presets[name].learner}@{presets[name].scheme}" for name in names}
    wide_name, wide_pair = max(map(len, names)), max(map(len, pairs.values()))
    for name in names:
        typer.echo(f"{name:{wide_name}s} {pairs[name]:{wide_pair}s} {presets[name].summary}")
    if not show_all:
        return
    from fpl_bench.method import all_pairs

    typer.echo("\nlearners:")
    for name, card in learner_cards().items():
        typer.echo(f"  {name:12s} {card.summary}")
    typer.echo("\nschemes:")
    for name, card in scheme_cards().items():
        typer.echo(f"  {name:12s} {card.summary}")
    typer.echo("\npairs (LEARNER@SCHEME runs with --methods):")
    for learner, scheme, problem in all_pairs():
        mark = "valid" if problem is None else f"refused: {problem}"
        typer.echo(f"  {learner + '@' + scheme:22s} {mark}")


def datasets_cmd() -> None:
    """List the dataset sources, one line each."""
    from fpl_bench.cards import dataset_cards

    cards = dataset_cards()
    width = max(map(len, cards))
    kinds = max(len(card.kind) for card in cards.values()) + 2
    for name, card in cards.items():
        typer.echo(f"{name:{width}s} {'[' + card.kind + ']':{kinds}s} {card.summary}")


def register(app: typer.Typer) -> None:
    """Add the ``methods`` and ``datasets`` commands to the CLI."""
    app.command("methods")(methods_cmd)
    app.command("datasets")(datasets_cmd)
