"""Render the privacy audit's tables (README.md, docs/audit.md) from the committed audit rows.

    python benchmarks/audit_tables.py --collect runs/audit   # gather OUT/*/audit.csv, render
    python benchmarks/audit_tables.py                        # render from the committed rows
    python benchmarks/audit_tables.py --check                # exit 1 if a page is stale

The rows are leaderboards/audit-embedded-rows.csv: every row of `fpl-bench audit`'s audit.csv
in the folders benchmarks/audit_results.sh writes (server, client, all), without the MLflow
ids. Each page holds one generated block between `<!-- audit-table:... -->` markers; the rest
of the page is hand-written. The output depends only on the rows file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
ROWS = ROOT / "leaderboards" / "audit-embedded-rows.csv"
README = ROOT / "README.md"
AUDIT_DOC = ROOT / "docs" / "audit.md"
PAPER_METHODS = ("coop", "promptfl", "fedotp", "fedpgp", "dpfpl")  # the DP-FPL paper's set
DROPPED = ("run_id", "mlflow_run_id")
SETTINGS = (("none", "server"), ("1.0", "server"), ("1.0", "client"))
SETTINGS += (("0.5", "server"), ("0.5", "client"))


def collect(folder: Path) -> pd.DataFrame:
    """Every audit.csv row under `folder`'s sub-folders (sorted), each key once."""
    frames = [pd.read_csv(p, dtype={"eps": str}) for p in sorted(folder.glob("*/audit.csv"))]
    if not frames:
        raise SystemExit(f"no */audit.csv under {folder}")
    rows = pd.concat(frames, ignore_index=True).drop(columns=list(DROPPED))
    key = ["method", "trust", "eps", "seed", "attack", "config_hash"]
    return rows.drop_duplicates(key, keep="first").reset_index(drop=True)


def _pct(value: float) -> str:
    return "" if pd.isna(value) else f"{100 * value:.1f}"


def _cell(rows: pd.DataFrame) -> str:
    """'loss / shadow' balanced accuracy in %, and the canary bound where there is one."""
    by = rows.set_index("attack")
    text = " / ".join(
        _pct(by["balanced_acc"].get(attack, float("nan"))) or "-" for attack in ("loss", "shadow")
    )
    if "canary" in by.index and not pd.isna(by.loc["canary", "eps_lower"]):
        text += f" · ε̂ ≥ {by.loc['canary', 'eps_lower']:.2f}"
    return text


def paper_table(rows: pd.DataFrame) -> str:
    """The DP-FPL paper's methods x (eps, trust): MIA balanced accuracy and canary bound."""
    head = [
        "method",
        *(
            ("no DP" if e == "none" else f"ε = {e[:-2] if e.endswith('.0') else e}, {t}")
            for e, t in SETTINGS
        ),
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for method in PAPER_METHODS:
        cells = [method]
        for eps, trust in SETTINGS:
            mine = rows[(rows.method == method) & (rows.eps == eps)]
            mine = mine if eps == "none" else mine[mine.trust == trust]
            cells.append(_cell(mine) if len(mine) else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def preset_table(rows: pd.DataFrame) -> str:
    """Every preset audited at eps 0.5 under server trust, in the order audited."""
    mine = rows[(rows.eps == "0.5") & (rows.trust == "server")]
    head = ["preset", "loss: bal. acc / AUC / TPR@1%FPR", "shadow: bal. acc / AUC", "ε̂ ≥ (canary)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for method, group in mine.groupby("method", sort=False):
        by = group.set_index("attack")

        def get(attack: str, column: str, by: pd.DataFrame = by) -> float:
            return by[column].get(attack, float("nan"))

        loss = " / ".join(_pct(get("loss", c)) for c in ("balanced_acc", "auc", "tpr_at_1fpr"))
        shadow = " / ".join(_pct(get("shadow", c)) for c in ("balanced_acc", "auc"))
        bound = get("canary", "eps_lower")
        lines.append(
            f"| {method} | {loss} | {shadow} | {'' if pd.isna(bound) else f'{bound:.2f}'} |"
        )
    return "\n".join(lines)


def _replace(text: str, name: str, block: str) -> str:
    start, end = f"<!-- audit-table:{name} -->", f"<!-- audit-table:{name}:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"the page lacks the markers {start} ... {end}")
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    return f"{before}{start}\n{block}\n{end}{after}"


def render(rows: pd.DataFrame) -> dict[Path, str]:
    """{page: its text with the generated blocks in place}."""
    return {
        README: _replace(README.read_text(), "paper", paper_table(rows)),
        AUDIT_DOC: _replace(AUDIT_DOC.read_text(), "presets", preset_table(rows)),
    }


def main(argv: list[str]) -> int:
    if argv[:1] == ["--collect"] and len(argv) == 2:
        collect(Path(argv[1])).to_csv(ROWS, index=False)
        argv = []
    if argv not in ([], ["--check"]):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    pages = render(pd.read_csv(ROWS, dtype={"eps": str}))
    if argv == ["--check"]:
        stale = [p for p, text in pages.items() if p.read_text() != text]
        for path in stale:
            print(f"{path.relative_to(ROOT)} is stale: run python benchmarks/audit_tables.py")
        return 1 if stale else 0
    for path, text in pages.items():
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
