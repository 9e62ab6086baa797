"""Build hook: a wheel carries the top-level cards inside the package, as `fpl_bench/_cards/`.

The cards (methods/, datasets/, leaderboards/: configs as data) stay top-level folders of the
repository, where contributors edit them. `build_py` copies them into the built package, so an
install finds them through the package itself (`importlib.resources`, fpl_bench/cards.py) with
any layout: a venv, `pip install --target DIR`, `--prefix DIR`. An editable install reads the
checkout's folders directly, so it copies nothing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# folder -> the files of it that ship (what fpl_bench reads; not the rendered pages and plots)
CARDS: dict[str, tuple[str, ...]] = {
    "methods": ("*.toml", "learners/*.toml", "schemes/*.toml"),
    "datasets": ("*.toml",),
    "leaderboards": ("*.csv", "*.toml", "*.md"),
}


class BuildWithCards(build_py):
    """build_py, then the cards copied to <build_lib>/fpl_bench/_cards/<folder>/..."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "fpl_bench" / "_cards"
        for folder, patterns in CARDS.items():
            for pattern in patterns:
                for path in sorted((ROOT / folder).glob(pattern)):
                    dest = target / folder / path.relative_to(ROOT / folder)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, dest)


setup(cmdclass={"build_py": BuildWithCards})
