"""Installed, the project adds only its own import namespace: outside the repository ``cifar3``, ``cifar3_client``
and ``cifar3_training`` import and the entry points run, while the repository's own folders (scripts, ui, bench,
training, handler) are not importable; the client never loads torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

BIN = Path(sys.executable).parent


def outside(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """A command run in ``cwd`` (outside the repository) with the environment's python, nothing on PYTHONPATH."""
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(cwd)}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.parametrize("module", ["scripts", "ui", "bench", "training", "handler"])
def test_the_repositorys_own_folders_are_not_installed(module, tmp_path):
    done = outside(sys.executable, "-c", f"import {module}", cwd=tmp_path)
    assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr, done.stdout + done.stderr


def test_the_projects_packages_import_anywhere_and_the_client_loads_no_torch(tmp_path):
    assert not tmp_path.is_relative_to(ROOT)
    code = (
        "import sys, cifar3, cifar3_client.client, cifar3_client.server, cifar3_client.cli; "
        "assert 'torch' not in sys.modules, 'cifar3_client imported torch'; "
        "import cifar3_training"
    )
    done = outside(sys.executable, "-c", code, cwd=tmp_path)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("command", ["cifar3-train", "cifar3-evaluate", "cifar3-serve"])
@pytest.mark.cli
def test_entry_points_run_from_any_directory(command, tmp_path):
    done = outside(str(BIN / command), "--help", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("usage:"), done.stderr
