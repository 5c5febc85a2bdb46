"""The layer contracts (pyproject.toml, [tool.importlinter]) hold, and would catch each rule broken; so does the
contract that only the store imports lmdb (its facade is closed)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import REPO

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")   # the test environment's, installed by tools/setup


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, env={"PYTHONPATH": str(root)},
                          capture_output=True, text=True, timeout=120)


def test_the_layers_hold():
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 kept, 0 broken" in done.stdout


@pytest.mark.parametrize("module, forbidden", [
    ("store/blob.py", "rpfs.serve.image"),          # the store imports nothing above it
    ("store/leases.py", "rpfs.policy.prune"),
    ("backup/pipeline.py", "rpfs.serve.image"),     # backup never imports serve, restore or attach
    ("backup/source.py", "rpfs.restore.full"),
    ("backup/snapshot.py", "rpfs.attach.filesystems"),
    ("serve/image.py", "rpfs.backup.source"),       # serve never imports backup
    ("policy/run.py", "rpfs.commands"),             # only the CLI imports the commands
    ("upkeep/usage.py", "rpfs.commands.progress"),
    ("restore/full.py", "rpfs.attach.vm"),          # restore and attach stand side by side, below upkeep
    ("attach/vm.py", "rpfs.upkeep.jobs"),
    ("catalog/restore_files.py", "rpfs.upkeep.jobs"),   # catalog and upkeep stand side by side, below policy
    ("catalog/restore_files.py", "rpfs.commands.progress"),
    ("host/disk_use.py", "rpfs.store.store"),       # the host knows nothing of rpfs above errors
    ("vault/gc.py", "rpfs.serve.image"),            # the vault is a store behind the read path, below it
    ("vault/layout.py", "rpfs.backup.pipeline"),
    ("store/store.py", "rpfs.vault.vault"),         # the store knows nothing of the vault
    ("host/processes.py", "rpfs.vault.locks"),
])
def test_a_broken_rule_fails(tmp_path, module, forbidden):
    done = lint_with_import(tmp_path, module, forbidden)
    assert done.returncode != 0 and "1 kept, 1 broken" in done.stdout, done.stdout + done.stderr
    assert "Data flows one way: each layer imports only the layers below it BROKEN" in done.stdout, done.stdout
    assert f"rpfs.{module[:-3].replace('/', '.')} -> {forbidden}" in done.stdout, done.stdout


@pytest.mark.parametrize("module", ["upkeep/check.py", "upkeep/jobs.py", "cli.py", "policy/prune.py", "serve/image.py",
                                    "vault/vault.py", "host/files.py"])
def test_lmdb_outside_the_store_fails(tmp_path, module):
    """Only rpfs.store speaks LMDB: the layers above use Store's methods and catch store.DatabaseError."""
    done = lint_with_import(tmp_path, module, "lmdb")
    assert done.returncode != 0 and "1 kept, 1 broken" in done.stdout, done.stdout + done.stderr
    assert "Only the store imports lmdb BROKEN" in done.stdout, done.stdout
    assert f"rpfs.{module[:-3].replace('/', '.')} -> lmdb" in done.stdout, done.stdout


def lint_with_import(tmp_path: Path, module: str, imported: str) -> subprocess.CompletedProcess:
    """lint-imports on a copy of rpfs in which module imports `imported`."""
    shutil.copytree(REPO / "rpfs", tmp_path / "rpfs", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    with open(tmp_path / "rpfs" / module, "a") as f:
        f.write(f"\nimport {imported}  # noqa\n")
    return lint_imports(tmp_path)
