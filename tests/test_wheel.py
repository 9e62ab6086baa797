"""A wheel built from the repository carries the cards inside its package: installed outside the
checkout (a venv, or `pip install --target`), the CLI lists the methods and runs a tiny job from
another directory."""

import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to copy the tracked tree")
def test_wheel_installs_with_its_cards_and_runs_from_another_directory(tmp_path):
    pytest.importorskip("build")
    # build from a copy of the tracked files, so no local build/ or egg-info leaks in
    src = tmp_path / "src"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "-o", str(dist), str(src)],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("fpl_bench-*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    _see_running_interpreters_packages(python)  # after pip: it sees a venv with fpl_bench only
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    code = (
        "import fpl_bench, fpl_bench.cards as c; print(fpl_bench.__file__); print(c.cards_root())"
    )
    where = _run([str(python), "-c", code], elsewhere, env, check=True).stdout.splitlines()
    assert str(env_dir) in where[0] and str(ROOT) not in where[0]
    assert str(env_dir) in where[1]
    fpl = env_dir / "bin" / "fpl-bench"
    listed = _run([str(fpl), "methods"], elsewhere, env)
    assert listed.returncode == 0, listed.stderr
    assert "dpfpl" in listed.stdout and "fedkgcoop" in listed.stdout
    args = ["run", "--methods", "coop", "--rounds", "1", "--clients", "2", "--shots", "2"]
    args += ["--dataset-option", "n_train_per_class=4", "--dataset-option", "n_test_per_class=2"]
    args += ["--dataset-option", "n_val_per_class=2", "--cache-dir", str(tmp_path / "cache")]
    job = _run([str(fpl), *args, "--out", "out"], elsewhere, env)
    assert job.returncode == 0, job.stderr
    assert (elsewhere / "out" / "results.csv").is_file()

    # `pip install --target DIR`: the package in a plain folder on PYTHONPATH finds its cards
    # inside itself (fpl_bench/_cards), with no <prefix>/share to look in
    target = tmp_path / "target"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps"]
    subprocess.run(
        [*pip, "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    bare = tmp_path / "bare"  # a venv with the dependencies and no fpl_bench
    venv.EnvBuilder(with_pip=False).create(bare)
    _see_running_interpreters_packages(bare / "bin" / "python")
    on_path = {**env, "PYTHONPATH": str(target)}
    code = "import fpl_bench.cards as c; print(c.cards_root())"
    root = _run([str(bare / "bin" / "python"), "-c", code], elsewhere, on_path, check=True)
    root = root.stdout.strip()
    assert root == str(target / "fpl_bench" / "_cards")
    listed = _run(
        [str(bare / "bin" / "python"), "-m", "fpl_bench.cli", "methods"], elsewhere, on_path
    )
    assert listed.returncode == 0, listed.stderr
    assert "dpfpl" in listed.stdout and "fedkgcoop" in listed.stdout


def _run(
    args: list[str], cwd: Path, env: dict[str, str], *, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """A command's completed process, its output captured as text."""
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, check=check)


def _see_running_interpreters_packages(python: Path) -> None:
    """The dependencies (torch, typer, ...) for the venv at `python`: its site-packages gets a .pth
    listing the running interpreter's site-packages (a venv's, or a system Python's user and
    system ones), after its own. `system_site_packages=True`
    would give the base interpreter's instead, which from inside a venv (the README's set-up)
    lacks them. The paths are listed, not added as site dirs, so their .pth files (an editable
    install of this checkout) stay out: fpl_bench comes from the wheel."""
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    dirs = [site.getusersitepackages()] if site.ENABLE_USER_SITE else []
    dirs += site.getsitepackages()  # after the user's, as site.main() orders them
    lines = [d for d in dict.fromkeys(dirs) if Path(d).is_dir()]
    (Path(purelib) / "_running_interpreter.pth").write_text("".join(f"{d}\n" for d in lines))
