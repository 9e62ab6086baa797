"""What can be wrong with a dataset on disk, as data: loaders raise on it, ``data check`` lists it.

A source reads its folder once and collects ``Problem`` records instead of raising at the first
one; ``load_source`` turns them into one UsageError line (the first problem, the count, and the
command that lists them all), ``fpl-bench data check`` prints every one with what to do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fpl_bench.errors import UsageError

__all__ = ["ADVICE", "Problem", "ProblemKind", "raise_problems"]

ProblemKind = Literal[
    "missing",  # the dataset folder, a split file, list file or batch file is absent
    "missing_image",  # a listed image does not exist
    "unreadable",  # a file exists but cannot be decoded / parsed
    "path_escape",  # a listed path is absolute, has '..', or resolves outside the image folder
    "bad_entry",  # a split entry is not [rel_path, label, classname], a list line not "a b"
    "bad_label",  # a label outside [0, classes), or a list naming a class the card lacks
    "classname_mismatch",  # one label with two class names, or a class count off the card
    "too_few_images",  # a class folder too small for the train/val/test fractions
]

ADVICE: dict[str, str] = {
    "missing": "download and arrange it as the card's layout says (`fpl-bench data info NAME`)",
    "missing_image": "restore the listed images (re-extract the archive) or use the split file "
    "that matches your copy",
    "unreadable": "re-download or re-extract the listed files",
    "path_escape": "split entries must be relative paths inside the image folder; fix or "
    "replace the split file",
    "bad_entry": "each split entry must be [relative_path, integer_label, classname] (each line "
    "of a list file: '<id> <name>'); replace the split or list file",
    "bad_label": "labels must lie in [0, classes) and a list's class names must be in its "
    "class-name file; replace the split or list file",
    "classname_mismatch": "each label must have one class name and the card's class count; "
    "replace the split file or check the class folders",
    "too_few_images": "add images to the class, or change the split fractions "
    "(--dataset-option p_train=0.6 --dataset-option p_val=0.1)",
}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset on disk.

    Attributes:
        kind: what is wrong (see ``ProblemKind``).
        where: the file or folder concerned, as given (relative paths stay relative).
        detail: one line saying what was found.
        split: "train", "val" or "test" when the problem is in one split's list.
    """

    kind: ProblemKind
    where: str
    detail: str
    split: str | None = None

    def line(self) -> str:
        """``kind: where (split): detail`` on one line."""
        split = f" [{self.split}]" if self.split else ""
        return f"{self.kind}: {self.where}{split}: {self.detail}"


def raise_problems(name: str, root: Path, problems: Sequence[Problem]) -> None:
    """Raise one UsageError line for ``problems`` (no-op when empty)."""
    if not problems:
        return
    first = problems[0]
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    raise UsageError(
        f"dataset {name}: {first.line()}{more}; {ADVICE[first.kind]}; list all with "
        f"`fpl-bench data check --data-root {root} --dataset {name}`"
    )
