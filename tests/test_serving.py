"""Against a real TorchServe (free loopback ports) serving the tiny model: the HTTP contract."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch
from conftest import MODEL_CONFIG, PYTHON, run_cli
from synthetic import encode, png_with_declared_size, sample_image

from cifar3.checkpoint import load_checkpoint
from cifar3.inference import inference_dtype, predict_logits, prepare_for_inference
from cifar3.preprocessing import pil_to_uint8

pytestmark = pytest.mark.server
CLASSES = ["airplane", "automobile", "ship"]
OCTET = {"Content-Type": "application/octet-stream"}


def predict_url(server) -> str:
    return f"{server.inference_url}/predictions/{server.model}"


def post(server, data=None, headers=None, **kwargs) -> requests.Response:
    return requests.post(
        predict_url(server), data=data, headers=server.headers() | (headers or {}), timeout=60, **kwargs
    )


def metric(server, name: str) -> float:
    text = requests.get(f"{server.metrics_url}/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M))


def test_all_input_forms_give_the_same_answer(server):
    image = encode(sample_image("ship"), "JPEG")
    answers = [
        requests.put(predict_url(server), data=image, headers=server.headers(), timeout=60),  # curl -T
        post(server, image, OCTET),  # curl --data-binary with a content type
        post(server, image, {"Content-Type": "image/jpeg"}),
        post(server, files={"data": ("ship.jpg", image, "image/jpeg")}),  # curl -F data=@ship.jpg
        post(server, files={"file": ("ship.jpg", image, "image/jpeg")}),
        post(server, json.dumps({"data": base64.b64encode(image).decode()}), {"Content-Type": "application/json"}),
    ]
    for response in answers:
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"].startswith("application/json")
    bodies = [r.json() for r in answers]
    assert all(body == bodies[0] for body in bodies)
    assert list(bodies[0]["probs"]) == CLASSES and sum(bodies[0]["probs"].values()) == pytest.approx(1, abs=1e-6)


def test_curl_as_the_readme_shows(server, tmp_path):
    path = tmp_path / "plane.png"
    sample_image("airplane").save(path)
    token = json.loads(server.key_file.read_text())["inference"]["key"]
    command = ["curl", "-sS", "-H", f"Authorization: Bearer {token}", predict_url(server), "-T", str(path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(result.stdout)["pred_class"] in CLASSES


def test_served_probabilities_equal_in_process_evaluation(server, tiny_checkpoint, tmp_path):
    """Parity: the server and training.evaluate's code path agree within 1e-4 on the same files."""
    folder = tmp_path / "parity"
    files = []
    for i, name in enumerate(CLASSES * 3):
        (folder / name).mkdir(parents=True, exist_ok=True)
        path = folder / name / f"{i}.png"
        sample_image(name, seed=100 + i).save(path)
        files.append(path)
    result = run_cli(PYTHON, "-m", "training.evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(folder),
                     "--report-dir", str(tmp_path / "report"), "--predictions")  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [line.split(",") for line in (tmp_path / "report" / "predictions.csv").read_text().splitlines()[1:]]
    expected = {row[0]: [float(p) for p in row[3 : 3 + len(CLASSES)]] for row in rows}
    for path in files:
        served = post(server, path.read_bytes(), OCTET).json()["probs"]
        assert [served[c] for c in CLASSES] == pytest.approx(expected[str(path)], abs=1e-4)
    # and both equal the model applied directly, prepared as served; the float32 model is within bfloat16's reach
    model, meta = load_checkpoint(tiny_checkpoint)
    image = pil_to_uint8(sample_image(CLASSES[0], seed=100)).unsqueeze(0)

    def probs(net):
        return meta.scores(predict_logits(net, image, meta.mean, meta.std))[0][0].tolist()

    float32 = probs(model)
    assert probs(prepare_for_inference(model, inference_dtype("auto", torch.device("cpu")))) == pytest.approx(
        expected[str(files[0])], abs=1e-4
    )
    assert float32 == pytest.approx(expected[str(files[0])], abs=0.02)


def test_concurrent_requests_are_batched_and_bad_ones_fail_alone(server):
    batches_before, images_before = metric(server, "InferenceBatches"), metric(server, "ImagesClassified")
    good = [encode(sample_image(CLASSES[i % 3], seed=i)) for i in range(48)]
    singles = {i: post(server, good[i], OCTET).json() for i in range(3)}

    def send(i):
        body = b"definitely not an image" if i % 4 == 3 else good[i]
        return i, post(server, body, OCTET)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(send, range(48)))
    for i, response in results:
        if i % 4 == 3:
            assert response.status_code == 400 and "not an image" in response.json()["error"]
        else:
            assert response.status_code == 200, response.text
            if i in singles:
                assert response.json()["probs"] == pytest.approx(singles[i]["probs"], abs=1e-5)
    batches = metric(server, "InferenceBatches") - batches_before
    images = metric(server, "ImagesClassified") - images_before
    assert images == 36 + 3
    assert batches < 36, f"no dynamic batching: {batches} batches for {images} images"


def test_metrics_time_each_stage_of_a_batch(server):
    assert post(server, encode(sample_image("ship")), OCTET).status_code == 200
    stages = ("DecodeTime", "ForwardTime", "PostprocessTime")
    for _ in range(20):  # the metrics API parses the worker's log: give it a moment to see the whole batch
        times = {name: metric(server, name) for name in (*stages, "HandlerTime")}
        # The stages are parts of the same batch's HandlerTime (which also covers writing the responses).
        if sum(times[s] for s in stages) <= times["HandlerTime"] + 0.01:
            break
        time.sleep(0.1)
    assert all(ms > 0 for ms in times.values()), times
    assert sum(times[s] for s in stages) <= times["HandlerTime"] + 0.01, times


@pytest.mark.parametrize(
    ("body", "headers", "message"),
    [
        (b"", OCTET, "empty request body"),
        (b"\x00\x01garbage", OCTET, "not an image"),
        (None, OCTET, "truncated"),
        (png_with_declared_size(50_000, 50_000), OCTET, "image too large"),
        (b'{"data": "@@@"}', {"Content-Type": "application/json"}, "malformed base64"),
        (b'{"data": ', {"Content-Type": "application/json"}, "malformed JSON"),
    ],
    ids=["empty", "garbage", "truncated-jpeg", "bomb", "bad-base64", "bad-json"],
)
def test_bad_input_is_a_json_400(server, body, headers, message):
    if body is None:
        body = encode(sample_image(size=200), "JPEG")[:1500]
    response = post(server, body, headers)
    assert response.status_code == 400
    assert message in response.json()["error"] and response.json()["code"] == 400


def test_oversize_body_is_413(server):
    response = post(server, b"\0" * (9 * 1024 * 1024), OCTET)
    assert response.status_code == 413
    assert post(server, encode(sample_image()), OCTET).status_code == 200  # and the server carries on


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16"])
def test_any_image_mode_is_accepted(server, mode):
    image = sample_image(size=48)
    image = image.convert("L").convert("I;16") if mode == "I;16" else image.convert(mode)
    response = post(server, encode(image, "JPEG" if mode == "CMYK" else "PNG"), OCTET)
    assert response.status_code == 200, response.text


def test_token_is_required_on_every_api(server):
    image = encode(sample_image())
    for headers in ({}, {"Authorization": "Bearer wrong-token"}):
        assert requests.post(predict_url(server), data=image, headers=headers | OCTET, timeout=30).status_code == 400
        assert requests.get(f"{server.management_url}/models", headers=headers, timeout=30).status_code == 400
    # the inference key does not open the management API
    assert requests.get(f"{server.management_url}/models", headers=server.headers(), timeout=30).status_code == 400
    assert requests.get(f"{server.management_url}/models", headers=server.headers("management"), timeout=30).ok


def test_model_registration_is_off(server):
    response = requests.post(f"{server.management_url}/models", params={"url": "cifar3.mar"},
                             headers=server.headers("management"), timeout=30)  # fmt: skip
    assert response.status_code == 405


def test_describe_shows_the_model_metadata(server, tiny_checkpoint):
    response = requests.get(f"{server.management_url}/models/cifar3", params={"customized": "true"},
                            headers=server.headers("management"), timeout=30)  # fmt: skip
    assert response.ok, response.text
    described = response.json()[0]
    custom = described["customizedMetadata"]
    custom = json.loads(custom) if isinstance(custom, str) else custom
    _, meta = load_checkpoint(tiny_checkpoint)
    assert custom["classes"] == CLASSES and custom["val_accuracy"] == meta.val_accuracy
    assert custom["variant"] == meta.variant and custom["trained"] == meta.created
    for setting in ("batchSize", "maxBatchDelay", "minWorkers", "maxWorkers"):  # model-config.yaml took effect
        assert described[setting] == MODEL_CONFIG[setting], setting


def workers(server) -> list[dict]:
    response = requests.get(f"{server.management_url}/models/cifar3", headers=server.headers("management"), timeout=30)
    return response.json()[0]["workers"]


def scale(server, count: int) -> None:
    response = requests.put(f"{server.management_url}/models/cifar3",
                            params={"min_worker": count, "max_worker": count, "synchronous": "true"},
                            headers=server.headers("management"), timeout=180)  # fmt: skip
    assert response.ok, response.text


def test_scale_workers_up_and_down(server):
    configured = MODEL_CONFIG["minWorkers"]
    assert len(workers(server)) == configured
    try:
        scale(server, configured + 1)
        assert len(workers(server)) == configured + 1
        deadline = time.monotonic() + 60
        while not all(w["status"] == "READY" for w in workers(server)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert [w["status"] for w in workers(server)] == ["READY"] * (configured + 1)
        assert post(server, encode(sample_image()), OCTET).status_code == 200
        scale(server, 1)
        assert len(workers(server)) == 1
        assert post(server, encode(sample_image()), OCTET).status_code == 200
    finally:
        scale(server, configured)
    assert len(workers(server)) == configured


def test_metrics_endpoint_is_prometheus(server):
    post(server, encode(sample_image()), OCTET)
    response = requests.get(f"{server.metrics_url}/metrics", timeout=30)
    assert response.ok and response.headers["Content-Type"].startswith("text/plain")
    assert "# TYPE ts_inference_requests_total counter" in response.text
    assert re.search(r'^ts_inference_requests_total\{model_name="cifar3".*\} \d', response.text, re.M)
    assert metric(server, "ImagesClassified") >= 1


def test_status_script_and_predict_script(server, tmp_path):
    args = server.command()
    status = run_cli(*args, "status")
    assert status.returncode == 0 and "READY" in status.stdout
    path = tmp_path / "car.png"
    sample_image("automobile").save(path)
    predicted = run_cli(*args, "predict", str(path))
    assert predicted.returncode == 0, predicted.stderr
    answer = json.loads(predicted.stdout)
    assert answer["pred_class"] in CLASSES and isinstance(answer["unknown"], bool) and "unknown_score" in answer
    missing = run_cli(*args, "predict", str(tmp_path / "nope.png"))
    assert missing.returncode == 1 and "image not found" in missing.stderr


def test_key_file_is_private(server):
    assert server.key_file.stat().st_mode & 0o077 == 0


def test_checkpoint_torch_load_weights_only(tiny_checkpoint):
    """The served file is the same kind the archive carries: plain tensors and metadata."""
    assert "state_dict" in torch.load(tiny_checkpoint, weights_only=True)
