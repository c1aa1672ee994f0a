"""cifar3_client/client.py: configuration, answers, tokens and concurrency, on a local fake server and the real
TorchServe."""

from __future__ import annotations

import ast
import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import requests
from conftest import ROOT
from loopback import LoopbackServer
from synthetic import encode, sample_image

from cifar3_client.client import (
    DEFAULT_INFERENCE_URL,
    DEFAULT_MANAGEMENT_URL,
    DEFAULT_TIMEOUT,
    DEFAULT_TOKEN_FILE,
    Cifar3Client,
    ClientError,
    Config,
    Prediction,
    RetryPolicy,
    normalize_url,
    parse_model_status,
    parse_prediction,
    read_key_file,
)

ANSWER = {"pred_class": "ship", "probs": {"airplane": 0.1, "automobile": 0.05, "ship": 0.85}}
INVALID_KEY = {"code": 400, "type": "InvalidKeyException", "message": "Token Authorization failed."}


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_keys(path: Path, inference: str, management: str = "m-key") -> Path:
    path.write_text(
        json.dumps(
            {
                "management": {"key": management, "expiration time": "x"},
                "inference": {"key": inference, "expiration time": "x"},
                "API": {"key": "api"},
            }
        )
    )
    return path


# ---------------------------------------------------------------- pure functions


def test_config_defaults_and_env():
    assert (
        Config.from_env({})
        == Config(
            DEFAULT_INFERENCE_URL, DEFAULT_MANAGEMENT_URL, str(DEFAULT_TOKEN_FILE), "", DEFAULT_TIMEOUT
        ).normalized()
    )
    assert not Config.from_env({}).allow_overrides
    assert Config.from_env({"CIFAR3_UI_ALLOW_OVERRIDES": "1"}).allow_overrides
    assert DEFAULT_TOKEN_FILE.parts[-2:] == ("run", "key_file.json")
    config = Config.from_env(
        {
            "CIFAR3_INFERENCE_URL": "localhost:9080/",
            "CIFAR3_MANAGEMENT_URL": "http://h:9081",
            "CIFAR3_TOKEN_FILE": "/k.json",
            "CIFAR3_TOKEN": " t ",
            "CIFAR3_TIMEOUT": "2.5",
        }
    )
    assert config == Config("http://localhost:9080", "http://h:9081", "/k.json", "t", 2.5).normalized()
    assert config.key_origins == ("http://h:9081", "http://localhost:9080")
    typed = config.with_overrides(inference_url="http://x:1/", typed_token=" mine ")
    assert (typed.inference_url, typed.typed_token, typed.token, typed.token_file) == (
        "http://x:1",
        "mine",
        "t",
        "/k.json",
    )
    assert typed.key_origins == config.key_origins  # a typed URL never joins the origins the keys may go to
    with pytest.raises(ValueError, match="token_file"):
        config.with_overrides(token_file="/etc/passwd")


@pytest.mark.parametrize("value", ["soon", "0", "-1"])
def test_config_rejects_a_bad_timeout(value):
    with pytest.raises(ClientError, match="timeout|TIMEOUT") as error:
        Config.from_env({"CIFAR3_TIMEOUT": value})
    assert error.value.kind == "config"


def test_normalize_url():
    assert normalize_url(" 127.0.0.1:8080/ ") == "http://127.0.0.1:8080"
    assert normalize_url("https://host/") == "https://host"
    assert normalize_url("") == ""


def test_prediction_chart_is_sorted_in_percent():
    prediction = parse_prediction(ANSWER)
    assert prediction == Prediction("ship", ANSWER["probs"])
    assert prediction.chart_data() == {
        "class": ["ship", "airplane", "automobile"],
        "probability (%)": [85.0, 10.0, 5.0],
    }


@pytest.mark.parametrize(
    "payload",
    [
        [],
        {"probs": {}},
        {"pred_class": "ship"},
        {"pred_class": "ship", "probs": {}},
        {"pred_class": "ship", "probs": {"ship": "high"}},
    ],
)
def test_parse_prediction_rejects_other_shapes(payload):
    with pytest.raises(ValueError):
        parse_prediction(payload)


@pytest.mark.parametrize(
    "metadata", [{"classes": ["a", "b"], "val_accuracy": 0.9}, json.dumps({"classes": ["a", "b"], "val_accuracy": 0.9})]
)
def test_parse_model_status_takes_metadata_as_object_or_string(metadata):
    status = parse_model_status(
        [{"batchSize": 16, "customizedMetadata": metadata, "workers": [{"status": "READY"}, {"status": "UNLOADING"}]}]
    )
    assert status.workers == ("READY", "UNLOADING") and status.ready_workers == 1 and status.ready
    assert status.batch_size == 16 and status.metadata == {"classes": ["a", "b"], "val_accuracy": 0.9}
    assert not parse_model_status([{"workers": []}]).ready
    with pytest.raises(ValueError):
        parse_model_status({"modelName": "cifar3"})


def test_read_key_file(tmp_path):
    assert read_key_file(write_keys(tmp_path / "k.json", "i-key")) == {"inference": "i-key", "management": "m-key"}
    with pytest.raises(ClientError, match="does not exist"):
        read_key_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ClientError, match="not TorchServe's key_file.json"):
        read_key_file(tmp_path / "bad.json")


# ---------------------------------------------------------------- a fake TorchServe


class FakeServer(LoopbackServer):
    """A loopback HTTP server answering like TorchServe; records requests and their overlap."""

    def __init__(self, key: str = "good", delay: float = 0.0, status: int = 200, body: dict | None = None):
        self.key, self.delay, self.status, self.body = key, delay, status, body or ANSWER
        self.requests: list[dict] = []
        self.active = self.peak = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with fake.lock:
                    fake.requests.append(
                        {
                            "auth": self.headers.get("Authorization"),
                            "path": self.path,
                            "data": data,
                            "type": self.headers.get("Content-Type"),
                        }
                    )
                    fake.active += 1
                    fake.peak = max(fake.peak, fake.active)
                try:
                    time.sleep(fake.delay)
                    if self.headers.get("Authorization") != f"Bearer {fake.key}":
                        self.answer(400, INVALID_KEY)
                    else:
                        self.answer(fake.status, fake.body)
                finally:
                    with fake.lock:
                        fake.active -= 1

            def do_GET(self):  # noqa: N802
                with fake.lock:
                    fake.requests.append({"auth": self.headers.get("Authorization"), "path": self.path, "data": b""})
                if self.headers.get("Authorization") != f"Bearer {fake.key}":
                    self.answer(400, INVALID_KEY)
                elif self.path == "/ping":
                    self.answer(200, {"status": "Healthy"})
                else:
                    self.answer(
                        200,
                        [
                            {
                                "batchSize": 4,
                                "workers": [{"status": "READY"}],
                                "customizedMetadata": {"classes": ["ship"]},
                            }
                        ],
                    )

            def answer(self, status: int, body: dict | list):
                content = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def log_message(self, *args):
                pass

        super().__init__(Handler)


def fake_client(fake: FakeServer, key_file: Path, **config) -> Cifar3Client:
    return Cifar3Client(Config(fake.url, fake.url, str(key_file), **config))


def test_images_are_sent_concurrently_as_octet_stream(tmp_path):
    with FakeServer(delay=0.4) as fake:
        client = fake_client(fake, write_keys(tmp_path / "k.json", "good"))
        images = [(f"img{i}.png", bytes([i]) * 10) for i in range(4)]
        started = time.perf_counter()
        outcomes = client.predict_many(images)
        elapsed = time.perf_counter() - started
    assert [o.name for o in outcomes] == [name for name, _ in images]
    assert all(o.prediction == Prediction("ship", ANSWER["probs"]) and o.latency_ms >= 400 for o in outcomes)
    assert fake.peak >= 2 and elapsed < 4 * 0.4, f"not concurrent: peak {fake.peak}, {elapsed:.2f}s"
    assert {r["type"] for r in fake.requests} == {"application/octet-stream"}
    assert sorted(r["data"] for r in fake.requests) == sorted(data for _, data in images)
    assert {r["auth"] for r in fake.requests} == {"Bearer good"}


def test_a_rejected_key_is_read_again_and_the_request_retried_once(tmp_path):
    key_file = write_keys(tmp_path / "k.json", "old")
    with FakeServer(key="new") as fake:
        client = fake_client(fake, key_file)
        with pytest.raises(ClientError, match="even after reading the file again") as error:
            client.predict(b"x", "a.png")  # old key, re-read: still old
        assert error.value.kind == "token" and len(fake.requests) == 2
        write_keys(key_file, "new")  # the server restarted or rotated its key
        assert client.predict(b"x", "a.png").pred_class == "ship"
        assert [r["auth"] for r in fake.requests[2:]] == ["Bearer old", "Bearer new"]
        assert client.predict(b"x", "a.png").pred_class == "ship"  # the new key is kept
        assert fake.requests[-1]["auth"] == "Bearer new" and len(fake.requests) == 5


def test_an_explicit_token_wins_and_is_not_retried(tmp_path):
    with FakeServer(key="good") as fake:
        client = fake_client(fake, write_keys(tmp_path / "k.json", "good"), token="mine")
        with pytest.raises(ClientError, match="CIFAR3_TOKEN") as error:
            client.predict(b"x")
        assert error.value.kind == "token" and [r["auth"] for r in fake.requests] == ["Bearer mine"]


def test_configured_keys_never_go_to_a_typed_url(tmp_path):
    """The key file's keys and CIFAR3_TOKEN go only to the configured origins; a typed URL gets the typed
    token or nothing."""
    key_file = write_keys(tmp_path / "k.json", "good", management="m-secret")
    with FakeServer(key="good") as configured, FakeServer(key="typed") as elsewhere:
        config = Config(configured.url, configured.url, str(key_file), token="env-secret")
        moved = Cifar3Client(config.with_overrides(inference_url=elsewhere.url, management_url=elsewhere.url))
        with pytest.raises(ClientError, match="configured keys are sent only to the configured servers") as error:
            moved.predict(b"x")
        assert error.value.kind == "token"
        assert moved.server_state().problems
        assert elsewhere.requests and {r["auth"] for r in elsewhere.requests} == {None}
        typed = Cifar3Client(config.with_overrides(inference_url=elsewhere.url, typed_token="typed"))
        assert typed.predict(b"x").pred_class == "ship"
        assert elsewhere.requests[-1]["auth"] == "Bearer typed"
    assert not configured.requests
    assert {r["path"] for r in elsewhere.requests} >= {"/ping", "/models/cifar3", "/predictions/cifar3"}


def test_no_key_file_says_where_it_looked(tmp_path):
    with FakeServer() as fake:
        client = fake_client(fake, tmp_path / "missing.json")
        with pytest.raises(ClientError, match="missing.json does not exist.*CIFAR3_TOKEN_FILE"):
            client.predict(b"x")
        assert fake.requests[0]["auth"] is None


def test_a_slow_server_is_a_timeout(tmp_path):
    with FakeServer(delay=1.5) as fake:
        outcome = fake_client(fake, write_keys(tmp_path / "k.json", "good"), timeout=0.3).timed_predict("a.png", b"x")
    assert outcome.kind == "timeout" and "did not answer within 0.3s" in outcome.error and outcome.latency_ms < 1400


@pytest.mark.parametrize(
    ("status", "body", "kind", "text"),
    [
        (413, {}, "too_large", "too large for the server (HTTP 413)"),
        (
            404,
            {"code": 404, "type": "ModelNotFoundException", "message": "Model not found: cifar3"},
            "not_found",
            "Model not found: cifar3",
        ),
        (503, {"code": 503, "message": "No worker is available"}, "server", "No worker is available"),
        (500, {"code": 500, "message": "Worker died."}, "server", "Worker died."),
        (200, {"unexpected": True}, "bad_answer", "unexpected answer"),
    ],
)
def test_server_failures_become_messages(tmp_path, status, body, kind, text):
    with FakeServer(status=status, body=body) as fake:
        outcome = fake_client(fake, write_keys(tmp_path / "k.json", "good")).timed_predict("a.png", b"x")
    assert outcome.prediction is None and outcome.kind == kind and text in outcome.error


def test_nothing_listening_is_unreachable(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}"
    client = Cifar3Client(Config(url, url, str(tmp_path / "k.json")))
    outcome = client.timed_predict("a.png", b"x")
    assert outcome.kind == "unreachable" and f"not reachable at {url}" in outcome.error
    state = client.server_state()
    assert not state.reachable and not state.ready and "serve.py start" in state.problems[0]
    assert state.blocking == state.problems[0]


def test_server_state_of_a_fake_server(tmp_path):
    with FakeServer(key="m-key") as fake:
        state = fake_client(fake, write_keys(tmp_path / "k.json", "i-key"), token="m-key").server_state()
        assert state.reachable and state.ready and not state.problems and not state.blocking
        assert state.model.batch_size == 4 and state.model.metadata == {"classes": ["ship"]}
        url = f"http://127.0.0.1:{closed_port()}"
        half = Cifar3Client(Config(fake.url, url, str(tmp_path / "k.json"), token="m-key")).server_state()
    assert half.reachable and half.model is None and not half.blocking  # predictions may still work
    assert half.problems[0].startswith(f"model state unknown: TorchServe is not reachable at {url}")


# ---------------------------------------------------------------- retries, on a scripted server

# TorchServe's own answers for a request whose worker stopped under it, or that found no worker (bodies as its
# frontend writes them), and the handler's own error: the same statuses, another body.
DIED = (500, {"code": 500, "type": "InternalServerException", "message": "Worker died."})
KILLED = (507, {"code": 507, "type": "InternalServerException", "message": "Worker died."})
SCALED_DOWN = (500, {"code": 500, "type": "InternalServerException", "message": "Worker scaled down."})
NO_WORKER = (503, {"code": 503, "type": "ServiceUnavailableException", "message": 'Model "cifar3" has no worker'})
OK = (200, ANSWER)
FAST = RetryPolicy(attempts=4, attempt_timeout=0.5, backoff=0.02, backoff_max=0.1)


class ScriptedServer(LoopbackServer):
    """Answers the n-th POST as ``script[n]`` says (the last entry for every later one): (status, JSON body),
    "close" (the connection is closed without an answer) or ("hang", seconds) (the answer never comes in time)."""

    def __init__(self, *script):
        self.script, self.times = list(script), []
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                scripted.times.append(time.monotonic())
                step = scripted.script[min(len(scripted.times), len(scripted.script)) - 1]
                if step == "close":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if step[0] == "hang":
                    time.sleep(step[1])
                    step = OK
                content = json.dumps(step[1]).encode()
                self.send_response(step[0])
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                with contextlib.suppress(ConnectionError):  # a client that gave up on this attempt
                    self.wfile.write(content)

            def log_message(self, *args):
                pass

        super().__init__(Handler)


def scripted_client(server: ScriptedServer, tmp_path: Path, retry: RetryPolicy = FAST, timeout: float = 5.0):
    config = Config(server.url, server.url, str(write_keys(tmp_path / "k.json", "good")), timeout=timeout)
    return Cifar3Client(config, retry=retry)


@pytest.mark.parametrize("gone", [DIED, KILLED, SCALED_DOWN, NO_WORKER, "close", ("hang", 2.0)])
def test_a_request_whose_worker_is_gone_or_that_gets_no_answer_is_sent_again(tmp_path, gone):
    with ScriptedServer(gone, gone, OK) as server:
        client = scripted_client(server, tmp_path)
        started = time.monotonic()
        answer = client.post("predictions", b"x")
        assert answer.status_code == 200 and len(server.times) == 3
        assert len(answer.failed_attempts) == 2 and client.predict(b"x").pred_class == "ship"
    pauses = [b - a for a, b in zip(server.times, server.times[1:], strict=False)][:2]
    assert FAST.pause(0) <= pauses[0] and FAST.pause(1) <= pauses[1], pauses  # backoff between attempts
    hang = gone[0] == "hang"
    assert time.monotonic() - started < (2 * FAST.attempt_timeout + 1 if hang else 1.5)


@pytest.mark.parametrize(
    ("answer", "kind"),
    [
        ((400, {"error": "cannot decode the image", "code": 400}), "rejected"),  # the handler's own 4xx
        ((500, {"error": "the model failed on this batch", "code": 500}), "server"),  # the handler's own 500
        ((413, {"code": 413, "type": "TooLongFrameException", "message": "too large"}), "too_large"),
        ((404, {"code": 404, "type": "ModelNotFoundException", "message": "Model not found"}), "not_found"),
        ((500, {"code": 500, "type": "InternalServerException", "message": "Failed to get metadata"}), "server"),
    ],
)
def test_answers_that_are_the_requests_own_are_not_retried(tmp_path, answer, kind):
    with ScriptedServer(answer, OK) as server:
        outcome = scripted_client(server, tmp_path).timed_predict("a.png", b"x")
    assert len(server.times) == 1 and outcome.prediction is None and outcome.kind == kind, outcome


def test_retries_stop_at_the_attempt_limit_with_the_last_answer(tmp_path):
    with ScriptedServer(DIED) as server:
        client = scripted_client(server, tmp_path)
        answer = client.post("predictions", b"x")
        assert answer.status_code == 500 and len(server.times) == FAST.attempts == len(answer.failed_attempts) + 1
        with pytest.raises(ClientError, match="Worker died") as error:
            client.predict(b"x")
    assert error.value.kind == "server"


@pytest.mark.parametrize("script", [[NO_WORKER], [("hang", 3.0)]])
def test_retries_keep_the_total_deadline(tmp_path, script):
    """However many attempts are left, the call ends when the client's timeout is spent."""
    many = RetryPolicy(attempts=100, attempt_timeout=0.4, backoff=0.05, backoff_max=0.2)
    with ScriptedServer(*script) as server:
        client = scripted_client(server, tmp_path, retry=many, timeout=1.2)
        started = time.monotonic()
        outcome = client.timed_predict("a.png", b"x")
        elapsed = time.monotonic() - started
    assert outcome.prediction is None and 1.0 <= elapsed <= 1.6 and len(server.times) >= 2, (elapsed, server.times)
    if script[0][0] == "hang":
        assert outcome.kind == "timeout" and "attempts" in outcome.error


# ---------------------------------------------------------------- the real TorchServe


@pytest.mark.server
def test_real_server_state_and_metadata(server):
    state = Cifar3Client(Config(server.inference_url, server.management_url, str(server.key_file))).server_state()
    assert state.reachable and state.ready and not state.problems, state.problems
    assert state.model.batch_size >= 1 and "READY" in state.model.workers
    assert state.model.metadata["classes"] == ["airplane", "automobile", "ship"]
    assert 0 <= state.model.metadata["val_accuracy"] <= 1


@pytest.mark.server
def test_real_server_predictions_and_rejections(server):
    client = Cifar3Client(Config(server.inference_url, server.management_url, str(server.key_file)))
    ship, bad = encode(sample_image("ship"), "PNG"), b"not an image"
    outcomes = client.predict_many([("ship.png", ship), ("x.png", bad), ("big.png", b"\0" * (9 << 20))])
    assert outcomes[0].prediction is not None, outcomes[0].error
    assert set(outcomes[0].prediction.probs) == {"airplane", "automobile", "ship"}
    assert abs(sum(outcomes[0].prediction.probs.values()) - 1) < 1e-4
    expected = requests.post(
        f"{server.inference_url}/predictions/cifar3",
        data=bad,
        timeout=30,
        headers={**server.headers(), "Content-Type": "application/octet-stream"},
    ).json()["error"]
    assert outcomes[1].kind == "rejected" and outcomes[1].error == f"the server rejected x.png: {expected}"
    assert outcomes[2].kind == "too_large"
    missing = Cifar3Client(Config(server.inference_url, server.management_url, str(server.key_file), model="nope"))
    with pytest.raises(ClientError, match="model nope is not loaded") as error:
        missing.predict(ship)
    assert error.value.kind == "not_found"
    assert "model nope is not loaded" in missing.server_state().blocking


@pytest.mark.server
def test_real_server_key_rotation_is_followed(server):
    """The server's inference key changes (POST /token); the client re-reads the key file and carries on."""
    client = Cifar3Client(Config(server.inference_url, server.management_url, str(server.key_file)))
    ship = encode(sample_image("ship"), "PNG")
    assert client.predict(ship).pred_class
    old = client._credentials("inference", server.inference_url)[0]
    api_key = json.loads(server.key_file.read_text())["API"]["key"]
    rotated = requests.post(
        f"{server.management_url}/token?type=inference", timeout=10, headers={"Authorization": f"Bearer {api_key}"}
    )
    assert rotated.ok, rotated.text
    assert server.token("inference") != old
    assert client.predict(ship).pred_class  # rejected once, key file re-read, retried
    assert client._credentials("inference", server.inference_url)[0] == server.token("inference")


def test_the_ui_never_imports_torch():
    """The page only speaks HTTP: no module under ui/ or cifar3_client/ imports torch (or TorchServe's ts), even
    indirectly."""
    for path in [*(ROOT / "ui").glob("*.py"), *(ROOT / "cifar3_client").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.split(".")[0] in ("torch", "torchvision", "ts")], (path, names)
    code = "import sys, cifar3_client.client, streamlit, altair, pandas, PIL; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, timeout=120).returncode == 0
