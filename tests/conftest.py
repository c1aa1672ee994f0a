"""Shared fixtures: synthetic data, a tiny model trained by the real CLI, its .mar, a real TorchServe."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from synthetic import write_cifar_batches, write_image_folder, write_unknown_folder

from cifar3_client.server import Server, free_ports, start_server, write_server_config  # noqa: F401  (re-exported for tests)

ROOT = Path(__file__).resolve().parent.parent

PYTHON = sys.executable
ARTIFACTS = ROOT / "test-artifacts"
# The per-model settings every archive in the tests carries (scripts/archive.sh packs this file).
MODEL_CONFIG = yaml.safe_load((ROOT / "handler" / "model-config.yaml").read_text())


def run_cli(*args: str, cwd: Path = ROOT, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a project command the way a user does; output captured as text."""
    return subprocess.run(
        [*args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images") / "train", per_class=60)


@pytest.fixture(scope="session")
def unknown_folder(tmp_path_factory) -> Path:
    return write_unknown_folder(tmp_path_factory.mktemp("unknown"), per_source=60)


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> Path:
    return write_cifar_batches(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, image_folder, unknown_folder) -> Path:
    """A real checkpoint from the real training CLI, in seconds: 4 epochs on 180 synthetic images of the classes
    and 120 unknown ones (grey and yellow: colours no class has), so it has the other-class output. No photo
    defects: the synthetic classes differ by colour, which a faded-colour defect takes away. No loss-ranked
    sampling: with it, these 20 steps left ships called airplanes."""
    out = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    result = run_cli(
        PYTHON,
        "-m",
        "training.train",
        "--data",
        str(image_folder),
        "--out",
        str(out),
        "--epochs",
        "4",
        "--batch-size",
        "32",
        "--lr",
        "0.05",
        "--device",
        "cpu",
        "--unknown-data",
        str(unknown_folder),
        "--synthetic-unknowns",
        "0",
        "--unknown-ratio",
        "0.5",
        "--photo",
        "0",
        "--easy-keep",  # every image in every epoch (see above)
        "1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def model_store(tmp_path_factory, tiny_checkpoint) -> Path:
    store = tmp_path_factory.mktemp("model_store")
    result = run_cli(
        "bash", str(ROOT / "scripts" / "archive.sh"), str(tiny_checkpoint), env={"MODEL_STORE": str(store)}
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (store / "cifar3.mar").is_file()
    return store


@pytest.fixture(scope="session")
def server(tmp_path_factory, model_store):
    """A real TorchServe on free loopback ports serving the tiny model, for the whole session."""
    folder = tmp_path_factory.mktemp("torchserve")
    srv = start_server(folder, model_store)
    yield srv
    srv.stop()
