"""The README and its docs/ pages stay consistent with what they describe."""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def test_results_match_the_committed_leaderboards():
    """README's results section and docs/results.md are what benchmarks/readme_tables.py renders
    from leaderboards/embedded*: regenerating them changes nothing."""
    spec = importlib.util.spec_from_file_location(
        "readme_tables", ROOT / "benchmarks" / "readme_tables.py"
    )
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    readme, doc, _ = tables.render()
    assert README.read_text() == readme, "README is stale: run python benchmarks/readme_tables.py"
    assert tables.RESULTS_DOC.read_text() == doc, (
        "docs/results.md is stale: run python benchmarks/readme_tables.py"
    )


def test_audit_tables_match_the_committed_audit_rows():
    """README's audit table and docs/audit.md's table of every preset are what
    benchmarks/audit_tables.py renders from leaderboards/audit-embedded-rows.csv, and the
    README's figure is committed."""
    import pandas as pd

    spec = importlib.util.spec_from_file_location(
        "audit_tables", ROOT / "benchmarks" / "audit_tables.py"
    )
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    rows = pd.read_csv(tables.ROWS, dtype={"eps": str})
    for page, text in tables.render(rows).items():
        assert page.read_text() == text, f"{page.name} is stale: run benchmarks/audit_tables.py"
    # the README's table: every paper method at every (eps, trust), each with both attacks
    for method in tables.PAPER_METHODS:
        mine = rows[rows.method == method]
        assert set(mine.eps) == {"none", "1.0", "0.5"}, method
        assert set(mine[mine.eps != "none"].trust) == {"server", "client"}, method
        assert {"loss", "shadow"} <= set(mine.attack), method
    private = rows[(rows.attack == "canary")]
    assert (private.eps_lower < private.eps.astype(float)).all()  # no bound above its eps
    figures = re.findall(r"!\[[^]]*\]\((leaderboards/[^)]+\.png)\)", README.read_text())
    assert figures and all((ROOT / f).is_file() for f in figures)


def test_ci_runs_the_readme_commands():
    """.ci/run runs the README's set-up and test commands; both must still be in the README."""
    text = README.read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    for readme_form, ci_form in (
        ("python3 -m venv .venv && . .venv/bin/activate",) * 2,
        ('pip install -e ".[dev]"', 'pip install -q -e ".[dev]"'),
        ("python -m pytest -q",) * 2,
    ):
        assert readme_form in text, f"README lost its command {readme_form!r}"
        assert ci_form in ci, f".ci/run no longer runs {ci_form!r}"


def test_local_links_resolve():
    """Every relative Markdown link in the README and docs/ points at a file that exists."""
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, f"links to missing files: {broken}"


def test_docs_pages_are_linked_from_the_readme():
    """A docs/ page nobody links to is one a newcomer never finds."""
    text = README.read_text()
    unlinked = [p.name for p in PAGES[1:] if f"(docs/{p.name})" not in text]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_the_preset_counts_it_states_are_the_registrys():
    """The opening's "N presets" and the set-up's "embedded default: N methods" count what
    `--methods all` and the default job run."""
    from fpl_bench.catalog import method_names

    text = README.read_text()
    stated_all = re.search(r"Every method \((\d+) presets", text)
    stated_default = re.search(r"embedded default: (\d+) methods", text)
    assert stated_all and stated_default
    assert int(stated_all.group(1)) == len(method_names("all"))
    assert int(stated_default.group(1)) == len(method_names("default"))
