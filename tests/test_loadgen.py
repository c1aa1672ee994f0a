"""bench/loadgen.py (the benchmark's and the soak's load) and a quick run of bench/benchmark.py.

The answer parser is checked on hand-made byte streams; the load itself against the session's real
TorchServe and against a port where nothing listens.
"""

from __future__ import annotations

import io
import json
import time

import pytest
import torch
from conftest import MODEL_CONFIG, PYTHON, free_ports, run_cli
from PIL import Image

from bench.benchmark import ENGINE_VARIANTS
from bench.loadgen import NO_ANSWER, _Connection, build_requests, percentile, run_load
from cifar3.engine import choose_engine
from cifar3.hardware import describe_cpu
from cifar3.inference import dtype_name

OCTET = {"Content-Type": "application/octet-stream"}


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((32, 32), 20 + seed).convert("RGB").save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bodies() -> list[bytes]:
    return [png(i) for i in range(8)]


def target(server) -> tuple[str, dict[str, str]]:
    return f"{server.inference_url}/predictions/cifar3", server.headers() | OCTET


# -- parsing (no server) --------------------------------------------------------------------------


def test_an_answer_is_complete_only_when_its_body_is_in():
    conn = _Connection(("127.0.0.1", 1), timeout=1)
    conn.buffer = b"HTTP/1.1 200 \r\nContent-Length: 5\r\n\r\nab"
    assert conn.answer() is None
    conn.buffer += b"cde" + b"HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\nConnection: close\r\n\r\n{}"
    assert conn.answer() == (200, False)  # the first answer, and only it, leaves the buffer
    assert conn.answer() == (400, True)
    assert conn.buffer == b"" and conn.answer() is None


def test_requests_are_built_once_with_length_and_headers():
    [request] = build_requests("http://127.0.0.1:8080/predictions/cifar3", [b"\x00\x01"], {"Authorization": "Bearer k"})
    head, body = request.split(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /predictions/cifar3 HTTP/1.1" and body == b"\x00\x01"
    assert {"Host: 127.0.0.1:8080", "Content-Length: 2", "Authorization: Bearer k"} <= set(lines[1:])


def test_get_requests_keep_the_query_string():
    [request] = build_requests("http://127.0.0.1:8081/models/cifar3?customized=true", [b""], {}, method="GET")
    assert request.startswith(b"GET /models/cifar3?customized=true HTTP/1.1\r\n") and request.endswith(b"\r\n\r\n")


def test_percentile_is_nearest_rank():
    assert percentile(list(range(1, 101)), 99) == 99 and percentile([3.0], 50) == 3.0
    assert percentile([], 50) != percentile([], 50)  # nan


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="concurrency"):
        run_load("http://127.0.0.1:1/x", [b"x"], {}, concurrency=0, seconds=1)
    with pytest.raises(ValueError, match="rate"):
        run_load("http://127.0.0.1:1/x", [b"x"], {}, concurrency=1, seconds=1, rate=0)


# -- against a real TorchServe ----------------------------------------------------------------------


@pytest.mark.server
def test_closed_loop_keeps_every_connection_busy_and_counts_every_answer(server, bodies):
    url, headers = target(server)
    result = run_load(url, bodies, headers, concurrency=4, seconds=2.0)
    summary = result.summary()
    assert summary["errors"] == 0 and summary["ok"] == summary["requests"] >= 8, summary
    assert summary["p50_ms"] <= summary["p90_ms"] <= summary["p99_ms"] and summary["rps"] > 0
    assert all(s.status == 200 and s.end >= s.due for s in result.samples)
    assert 1.5 < result.seconds < 2.0 + 30  # the last answers come in after the 2 s of sending


@pytest.mark.server
def test_open_loop_sends_at_the_rate_whatever_the_answers(server, bodies):
    url, headers = target(server)
    result = run_load(url, bodies, headers, concurrency=4, seconds=2.0, rate=15)
    dues = sorted(s.due for s in result.samples)
    assert len(dues) == 30 and result.summary()["errors"] == 0
    gaps = [b - a for a, b in zip(dues, dues[1:], strict=False)]
    assert all(abs(g - 1 / 15) < 1e-6 for g in gaps)  # due times are the schedule, not the send times


@pytest.mark.server
def test_error_answers_are_counted_and_good_requests_beside_them_succeed(server, bodies):
    url, headers = target(server)
    result = run_load(url, [b"not an image", *bodies[:3]], headers, concurrency=2, seconds=1.5)
    statuses = {s.status for s in result.samples}
    summary = result.summary()
    assert statuses == {200, 400}, summary  # a 400 closes its connection; the next request reconnects
    assert summary["error_statuses"].get("400", 0) >= 1 and summary["ok"] >= 3


def test_a_port_with_no_server_gives_no_answer_samples_and_ends_on_time():
    (port,) = free_ports(1)
    started = time.monotonic()
    result = run_load(f"http://127.0.0.1:{port}/x", [b"x"], {}, concurrency=2, seconds=0.6)
    assert time.monotonic() - started < 5
    assert result.samples and {s.status for s in result.samples} == {NO_ANSWER}
    assert result.summary()["ok"] == 0


# -- the benchmark script ---------------------------------------------------------------------------


@pytest.mark.server
@pytest.mark.slow
def test_benchmark_quick_run_writes_its_report(tiny_checkpoint, tmp_path):
    out = tmp_path / "reports"
    done = run_cli(PYTHON, "-m", "bench.benchmark", "--checkpoint", str(tiny_checkpoint), "--quick",
                   "--images", str(tmp_path / "no-images"), "--out-dir", str(out), timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((out / "benchmark.json").read_text())
    # in-process: every engine, each rate real; the limits are the best (fastest) of them and say where from
    runs = report["in_process"]["runs"]
    assert {(r["engine"], r["dtype"]) for r in runs} == set(ENGINE_VARIANTS) == {
        ("torch", "float32"), ("torch", "bfloat16"), ("onnxruntime", "float32"), ("onnxruntime-int8", "int8")
    }  # fmt: skip
    assert all(rate > 0 for r in runs for rate in r["images_per_s_by_batch"].values())
    limits = report["in_process"]["limits"]
    assert limits["machine"]["images_per_s"] == max(v for r in runs for v in r["images_per_s_by_batch"].values())
    assert limits["batch1"]["ms"] == min(r["batch1_forward_p50_ms"] for r in runs)
    # served: the engine auto chose here, with model-config's threads, every level answered
    choice = choose_engine("auto", torch.device("cpu"))
    settings = report["served"]["settings"]
    assert (settings["engine"], settings["dtype"]) == (choice.engine, dtype_name(choice.dtype))
    assert settings["threads"] == MODEL_CONFIG["handler"]["threads"]
    assert settings["batchSize"] == MODEL_CONFIG["batchSize"]
    assert [r["concurrency"] for r in report["served"]["levels"]] == [1, 4]
    for level in report["served"]["levels"] + [lv for p in report["peers"].values() for lv in p["levels"]]:
        assert level["errors"] == 0 and level["images_per_s"] > 0 and level["cpu_cores"]["server"] > 0, level
    assert set(report["peers"]) == {"litserve", "prototype"}
    # parity on the validation split: ONNX Runtime says what PyTorch float32 says
    ort, float32 = report["parity"]["onnxruntime float32"], report["parity"]["torch float32"]
    assert ort["agreement"] == 1.0 and ort["max_probability_difference"] <= 1e-4 and ort["n"] == float32["n"] > 0
    assert report["parity"]["onnxruntime-int8 int8"]["n"] == float32["n"]  # scored on the same images
    assert any(c["check"].startswith("served c=1 p50") for c in report["checks"])
    assert set(report["load_average_at_start"]) == {"in-process", "parity", "served", "test-time flip", "peers"}
    # test-time flip (the tiny checkpoint's, the cpu preset's) against the same weights calibrated for one view
    cost = report["flip_cost"]
    assert cost["checkpoint_test_flip"] is True
    for name in ("test_flip", "one_view"):
        run = cost[name]["in_process"]
        assert run["engine"] == settings["engine"] and run["threads"] == 1 and run["test_flip"] == (name == "test_flip")
        assert all(rate > 0 for rate in run["images_per_s_by_batch"].values())
        assert [r["concurrency"] for r in cost[name]["served"]] == [1, 4]
        assert all(r["errors"] == 0 and r["images_per_s"] > 0 for r in cost[name]["served"])
        assert 0 <= cost[name]["val_accuracy"] <= 1
    markdown = (out / "benchmark.md").read_text()
    assert "## Test-time flip: what it costs" in markdown and "| TorchServe c=4: images/s |" in markdown
    assert "| onnxruntime | float32 | 1 |" in markdown and "LitServe" in markdown and "not measured" in markdown
    assert f"\nMachine: {describe_cpu()}; torch " in markdown  # the machine line every report writes


@pytest.mark.cli
def test_benchmark_avx2_mode_restricts_torch_in_its_processes(tiny_checkpoint, tmp_path, monkeypatch):
    from bench.benchmark import in_process, load_image_bytes
    from cifar3.hardware import AVX2_ENV
    from training.export import export_checkpoint

    onnx = export_checkpoint(tiny_checkpoint, tmp_path / "model.onnx")
    for name, value in AVX2_ENV.items():  # what --avx2 does before any measuring process starts
        monkeypatch.setenv(name, value)
    images = load_image_bytes(tmp_path / "no-images", 8)
    result = in_process(tiny_checkpoint, onnx, images, threads=1, seconds=0.01, quick=True)
    assert {r["capability"] for r in result["runs"]} == {"AVX2"}


@pytest.mark.server
@pytest.mark.slow
def test_layouts_serve_each_layout_with_its_settings(tiny_checkpoint, tmp_path):
    """bench.layouts archives the checkpoint with each layout's model-config and the server runs exactly it."""
    report = tmp_path / "layouts"
    done = run_cli(PYTHON, "-m", "bench.layouts", "workers=1,threads=1,batch=4,delay=3", "--checkpoint",
                   str(tiny_checkpoint), "--images", str(tmp_path / "no-images"), "--concurrency", "1,4",
                   "--seconds", "1", "--report", str(report), timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (layout,) = json.loads(report.with_suffix(".json").read_text())["layouts"]
    settings = layout["settings"]
    applied = (settings["minWorkers"], settings["threads"], settings["batchSize"], settings["maxBatchDelay"])
    assert applied == (1, 1, 4, 3)
    assert [lv["concurrency"] for lv in layout["levels"]] == [1, 4]
    assert all(lv["errors"] == 0 and lv["images_per_s"] > 0 for lv in layout["levels"])
    assert "| `workers=1,threads=1,batch=4,delay=3` |" in report.with_suffix(".md").read_text()


def test_layouts_refuse_an_unknown_setting_with_a_clear_message(tmp_path):
    done = run_cli(PYTHON, "-m", "bench.layouts", "workers=2,cores=4", "--report", str(tmp_path / "r"))
    assert done.returncode == 2 and "bad layout item 'cores=4'" in done.stderr and "Traceback" not in done.stderr
