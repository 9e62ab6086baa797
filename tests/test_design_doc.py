"""Every citation of the design notes points at a file and a section that exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITED = re.compile(r"docs/design\.md,?\s+\"([^\"]+)\"")


def test_design_citations_resolve():
    design = ROOT / "docs" / "design.md"
    headings = {
        line.lstrip("#").strip() for line in design.read_text().splitlines() if line[:1] == "#"
    }
    files = [
        ROOT / "README.md",
        *ROOT.glob("docs/*.md"),
        *ROOT.glob("fpl_bench/**/*.py"),
        *ROOT.glob("benchmarks/*.py"),
    ]
    cited: dict[str, str] = {}
    for path in files:
        text = path.read_text()
        assert "DESIGN.md" not in text, f"{path} cites DESIGN.md; the notes are docs/design.md"
        cited.update((" ".join(m.split()), str(path)) for m in CITED.findall(text))
    assert cited, "no citation found: the pattern is stale"
    missing = {section: where for section, where in cited.items() if section not in headings}
    assert not missing, f"sections cited but not in docs/design.md: {missing}"
