"""html: one self-contained page (no external resources, no script), checked in headless
Chromium when it is installed (CI: `apt-get install -y chromium`)."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fpl_bench.report.build import write_leaderboard
from tests.report.conftest import make_records

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
BROWSER = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
needs_chromium = pytest.mark.skipif(
    BROWSER is None, reason="headless Chromium not installed (apt-get install -y chromium)"
)
METHODS = ("promptfl", "dpfpl")


@pytest.fixture
def page(tmp_path) -> Path:
    rows = make_records(protocol="base2novel", dataset="synthetic", base_acc=0.6, novel_acc=0.5)
    rows["hm"] = 0.55
    return write_leaderboard(rows, out=tmp_path, name="page", source="runs/x").html


def test_page_is_self_contained(page):
    text = page.read_text()
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", text, re.I)
    assert "<script" not in text.lower() and "@import" not in text and "url(" not in text
    images = re.findall(r'<img [^>]*src="([^"]+)"', text)
    assert len(images) == 2 and all(s.startswith("data:image/png;base64,") for s in images)
    for method in METHODS:
        assert text.count(f'<tr data-method="{method}">') == 5  # one row per metric table


def run_browser(url: str, profile: Path, *flags: str) -> subprocess.CompletedProcess:
    """Headless Chromium on `url` with console messages logged to stderr."""
    return subprocess.run(
        [
            BROWSER,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            *flags,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def console_messages(stderr: str) -> list[str]:
    """Lines where the page wrote to the console (errors, uncaught exceptions)."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


@needs_chromium
def test_console_check_catches_a_page_error(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>throw new Error('boom')</script></body></html>")
    result = run_browser(bad.as_uri(), tmp_path / "profile", "--dump-dom")
    assert any("boom" in line for line in console_messages(result.stderr)), result.stderr


@needs_chromium
def test_page_loads_in_headless_chromium(page, tmp_path):
    dom = run_browser(page.as_uri(), tmp_path / "profile", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert console_messages(dom.stderr) == []
    for method in METHODS:
        assert f'<tr data-method="{method}">' in dom.stdout
    assert "synthetic · base2novel · server trust" in dom.stdout
    shot = tmp_path / "page.png"
    result = run_browser(
        page.as_uri(), tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,2000"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert console_messages(result.stderr) == []
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
