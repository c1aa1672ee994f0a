"""Real-data smoke run, when the shared CIFAR-3 images are on this machine (CI's case).

Train on a few hundred real images for one epoch with the real CLI, archive, serve with a real
TorchServe, classify real images over HTTP, stop: the whole pipeline on real data, in minutes.
"""

from __future__ import annotations

import pytest
import requests
from conftest import PYTHON, ROOT, run_cli, start_server

REAL_DATA = ROOT.parent / "shared" / "data" / "cifar3" / "train"
CLASSES = ["airplane", "automobile", "ship"]

pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"no real data at {REAL_DATA}"),
]


@pytest.mark.slow
def test_pipeline_on_real_images(tmp_path):
    checkpoint = tmp_path / "real.pt"
    trained = run_cli(PYTHON, "-m", "training.train", "--data", str(REAL_DATA), "--out", str(checkpoint),
                      "--limit", "100", "--epochs", "1", "--batch-size", "32")  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "new best checkpoint saved" in trained.stdout
    store = tmp_path / "store"
    archived = run_cli("bash", str(ROOT / "scripts" / "archive.sh"), str(checkpoint), env={"MODEL_STORE": str(store)})
    assert archived.returncode == 0, archived.stderr
    server = start_server(tmp_path / "ts", store)
    try:
        for name in CLASSES:
            for image in sorted((REAL_DATA / name).glob("*.jpg"))[-3:]:  # images it did not train on are likely
                response = server.predict(image)
                assert response.status_code == 200, response.text
                body = response.json()
                assert body["pred_class"] in CLASSES and sum(body["probs"].values()) == pytest.approx(1, abs=1e-5)
        ping = requests.get(f"{server.inference_url}/ping", headers=server.headers(), timeout=10)
        assert ping.json()["status"] == "Healthy"
    finally:
        server.stop()
    assert server.pid() is None
