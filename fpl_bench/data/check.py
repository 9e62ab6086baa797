"""``fpl-bench data check``: which datasets a data root holds, and what is wrong with each.

For each card, the data root is read the way ``load_source`` reads it (same scanners, same path
rules), and every image is also opened (header + ``verify``, or a full decode with ``decode``).
A dataset is

    found      its split lists are complete and every listed image opens
    missing    something must be obtained first (folder, split or list file, batch file)
    malformed  it is there but has problems: missing or unreadable images, paths that escape
               the image folder (``..``, absolute, a symlink pointing out), bad labels,
               class-name mismatches, classes too small to split
    generated  nothing on disk to check (the synthetic source)

Each report lists its problems (paths relative to the data root) and what to do. Nothing is
written: a class-folder split is computed, not stored, and no image is modified.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fpl_bench.data.aircraft import scan_aircraft
from fpl_bench.data.catalog import (
    DatasetCard,
    DomainSource,
    ImageFolderSource,
    dataset_card,
    dataset_cards,
)
from fpl_bench.data.cifar import scan_cifar
from fpl_bench.data.coop_layout import scan_coop
from fpl_bench.data.domains import scan_domains
from fpl_bench.data.folders import ListScan, scan_problems
from fpl_bench.data.imagefolder import scan_imagefolder
from fpl_bench.data.imagenet import scan_imagenet
from fpl_bench.data.imageset import SPLITS
from fpl_bench.data.problems import ADVICE, Problem
from fpl_bench.errors import UsageError

__all__ = ["DatasetReport", "Status", "check_data_root", "check_dataset", "exit_code"]

Status = Literal["found", "missing", "malformed", "generated"]


@dataclass(frozen=True)
class DatasetReport:
    """The check of one dataset under one data root.

    Attributes:
        name: the dataset (card) name.
        status: found, missing, malformed or generated.
        counts: usable images per split (CIFAR: train before the val holdout, test).
        problems: everything wrong, in the order found.
        note: where the split came from (split file, or a seeded class-folder split).
        todo: what to do, one line per kind of problem (empty when found).
        layout: the expected layout under the data root, shown when missing.
    """

    name: str
    status: Status
    counts: dict[str, int]
    problems: tuple[Problem, ...]
    note: str
    todo: tuple[str, ...]
    layout: str = ""

    def lines(self, *, max_problems: int = 20) -> list[str]:
        """Human-readable report: a status line, the problems (capped), what to do."""
        counts = "  ".join(f"{split} {n}" for split, n in self.counts.items())
        head = f"{self.name:16s} {self.status:10s} {counts}".rstrip()
        out = [head]
        if self.note:
            out.append(f"{'':16s} split: {self.note}")
        shown = self.problems[:max_problems]
        out += [f"{'':16s} {p.line()}" for p in shown]
        if len(self.problems) > len(shown):
            kinds = Counter(p.kind for p in self.problems[len(shown) :])
            rest = ", ".join(f"{n} {kind}" for kind, n in kinds.items())
            out.append(f"{'':16s} ... and {len(self.problems) - len(shown)} more ({rest})")
        out += [f"{'':16s} to do: {line}" for line in self.todo]
        if self.layout:
            out.append(f"{'':16s} expected layout under the data root:")
            out += [f"{'':16s}   {line}" for line in self.layout.strip("\n").splitlines()]
        return out


def _status(problems: Sequence[Problem]) -> Status:
    if any(p.kind == "missing" for p in problems):
        return "missing"
    return "malformed" if problems else "found"


def _todo(card: DatasetCard, status: Status, problems: Sequence[Problem]) -> tuple[str, ...]:
    if status == "missing":
        return (f"get it from {card.url}: {card.obtain}",)
    kinds = dict.fromkeys(p.kind for p in problems)  # first-seen order, no repeats
    return tuple(f"{kind}: {ADVICE[kind]}" for kind in kinds)


def _files_report(scan: ListScan, *, decode: bool) -> tuple[list[Problem], dict[str, int]]:
    """Open every listed image when the lists themselves are usable."""
    if any(p.kind == "missing" for p in scan.problems):
        return scan.problems, {}
    found = scan_problems(scan, open_images=True, decode=decode)
    bad = {(p.split, p.where) for p in found}
    counts = {
        split: sum(
            (split, scan.where(split, e.path)) not in bad for e in scan.entries.get(split, ())
        )
        for split in SPLITS
    }
    return scan.problems + found, counts


# The file-backed kinds with split lists: how data check reads each (default options, no cache).
SCANNERS: dict[str, Callable[[DatasetCard, Path, Mapping[str, Any]], ListScan]] = {
    "coop": lambda card, root, options: scan_coop(card, root, options, cache_dir=None),
    "aircraft": scan_aircraft,
    "imagenet": scan_imagenet,
    "imagefolder": lambda card, root, options: scan_imagefolder(card, root, options, None),
}


def check_dataset(card: DatasetCard, root: Path, *, decode: bool = False) -> DatasetReport:
    """Check one dataset under ``root`` with the card's default options (see the module doc)."""
    root = Path(root)
    note, counts = "", {}
    src = card.source
    if src.kind in SCANNERS:
        scan = SCANNERS[src.kind](card, root, card.defaults)
        note = scan.origin
        problems, counts = _files_report(scan, decode=decode)
    elif isinstance(src, DomainSource):
        dscan = scan_domains(card, root, card.defaults, cache_dir=None)
        note = f"seeded per (domain, class) over {', '.join(dscan.domains)}"
        scan = ListScan(
            folder=dscan.base,
            prefix=src.dataset_dir,
            entries=dscan.entries,
            problems=dscan.problems,
        )
        problems, counts = _files_report(scan, decode=decode)
    elif src.kind == "cifar":
        cscan = scan_cifar(card, root)
        problems = cscan.problems
        counts = {part: len(labels) for part, labels in cscan.labels.items()}
    else:
        return DatasetReport(card.name, "generated", {}, (), "generated in memory", ())
    status = _status(problems)
    return DatasetReport(
        name=card.name,
        status=status,
        counts=counts if status != "missing" else {},
        problems=tuple(problems),
        note=note if status != "missing" else "",
        todo=_todo(card, status, problems),
        layout=card.layout if status == "missing" else "",
    )


def check_data_root(
    root: Path, names: Iterable[str] | None = None, *, decode: bool = False
) -> list[DatasetReport]:
    """Check ``names`` (default: every card but those that read the data root itself as their
    tree, such as the generic imagefolder card) under ``root``; a missing root is a
    UsageError. A name may be a card file (PATH.toml)."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(
            f"--data-root {root}: no such folder; give the folder holding the datasets"
        )
    cards = (
        [dataset_card(n) for n in names]
        if names
        else [card for card in dataset_cards().values() if not _whole_root(card)]
    )
    return [check_dataset(card, root, decode=decode) for card in cards]


def _whole_root(card: DatasetCard) -> bool:
    """True for a card whose tree is the data root itself: checking it against a folder of
    datasets would read each dataset as a class, so it is checked only when named."""
    return isinstance(card.source, ImageFolderSource) and card.source.image_dir == "."


def exit_code(reports: Sequence[DatasetReport], *, named: bool) -> int:
    """2 when something needs fixing, else 0.

    With datasets named on the command line, each must be found. Without, no dataset may be
    malformed and at least one must be found (else the root is probably the wrong folder).
    """
    if named:
        return 0 if all(r.status in ("found", "generated") for r in reports) else 2
    if any(r.status == "malformed" for r in reports):
        return 2
    return 0 if any(r.status == "found" for r in reports) else 2
