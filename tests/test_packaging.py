"""A non-editable install works: the wheel holds every module of the tree, and its `rpfs` runs.

The wheel goes into a fresh virtualenv. Its dependencies (pyfuse3, trio, lmdb, zstandard) are taken
from the test environment through a path entry, so the test needs no network; rpfs itself can only
come from the wheel (the test runs outside the checkout, and the editable install's hooks are not
loaded through a path entry).
"""
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from cli_helpers import REPO

pytestmark = pytest.mark.timeout(300)


def run(*cmd, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed: {done.stdout}{done.stderr}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("source")
    shutil.copytree(REPO / "rpfs", source / "rpfs", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source)
    shutil.copytree(REPO / "man", source / "man")
    out = tmp_path_factory.mktemp("wheel")
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", out, source,
        cwd=source)
    [built] = out.glob("rpfs-*.whl")
    return built


def test_the_wheel_holds_every_module(wheel):
    in_tree = {str(p.relative_to(REPO)) for p in (REPO / "rpfs").rglob("*.py")}
    in_wheel = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".py")}
    assert in_tree - in_wheel == set()


def test_the_wheel_installs_the_man_page(wheel):
    """man/rpfs.1 (tools/docs-reference) goes to share/man/man1, where `man rpfs` finds it in the prefix."""
    names = zipfile.ZipFile(wheel).namelist()
    assert any(name.endswith(".data/data/share/man/man1/rpfs.1") for name in names), names


def test_rpfs_runs_from_a_fresh_virtualenv(wheel, tmp_path):
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", wheel, cwd=tmp_path)
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                    cwd=tmp_path).stdout.strip())
    (site / "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    where = run(python, "-c", "import rpfs.cli; print(rpfs.cli.__file__)", cwd=tmp_path).stdout.strip()
    assert Path(where).is_relative_to(venv), where
    assert "usage: rpfs" in run(venv / "bin" / "rpfs", "--help", cwd=tmp_path).stdout
    assert "rpfs init" in (venv / "share" / "man" / "man1" / "rpfs.1").read_text()   # `man rpfs`
    done = run(venv / "bin" / "rpfs", "--store", tmp_path / "store", "init", "--json", cwd=tmp_path)
    assert '"format_version": 7' in done.stdout and (tmp_path / "store" / "data.mdb").exists()
    assert "usage: rpfs" in run(python, "-m", "rpfs", "--help", cwd=tmp_path).stdout   # how daemons start
