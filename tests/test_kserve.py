"""KServe's TorchServe runtime, on this machine: the layout scripts/kserve_layout.sh writes, served by a real
TorchServe started with the runtime's own command line and TS_SERVICE_ENVELOPE, answering the Open Inference
Protocol (v2: health, server metadata and inference, driven by tritonclient's HTTP client as well as by plain
requests) and KServe v1 bodies.

The runtime's command comes from KServe's ClusterServingRuntime (../shared/k8s/kserve-torchserve-runtime.yaml).
Only what cannot exist here is changed, in the test only: /mnt/models is the layout folder, and the ports are
free loopback ports. No Kubernetes cluster, KServe or container engine runs here.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import requests
import tritonclient.http as triton_http
import yaml
from conftest import ROOT, free_ports, run_cli
from PIL import Image
from synthetic import class_images
from tritonclient.utils import InferenceServerException

from cifar3.preprocessing import ImageDecodeError
from cifar3_client.server import Server, read_properties
from handler.cifar3_handler import envelope_image_bytes

K8S_REFERENCE = ROOT.parent / "shared" / "k8s"
RUNTIME = K8S_REFERENCE / "kserve-torchserve-runtime.yaml"
LAYOUT_SCRIPT = ROOT / "scripts" / "kserve_layout.sh"
KSERVE_CONFIG = ROOT / "deploy" / "kserve" / "config.properties"
MOUNT = "/mnt/models"  # where KServe mounts the storage URI
CLASSES = ["airplane", "automobile", "ship"]
PORT_KEYS = {"inference_address": 8085, "management_address": 8081, "metrics_address": 8082}

needs_runtime = pytest.mark.skipif(not RUNTIME.is_file(), reason=f"no KServe reference files at {K8S_REFERENCE}")


# --- the layout ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def layout(tmp_path_factory, model_store) -> Path:
    out = tmp_path_factory.mktemp("kserve") / "layout"
    result = run_cli("bash", str(LAYOUT_SCRIPT), str(out), str(model_store / "cifar3.mar"))
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def runtime_container() -> dict:
    runtime = yaml.safe_load(RUNTIME.read_text())
    assert runtime["kind"] == "ClusterServingRuntime"
    (container,) = runtime["spec"]["containers"]
    return container


@needs_runtime
def test_layout_is_what_the_runtime_starts(layout, model_store):
    """The runtime's --model-store and --ts-config name the layout's folders, and the config says what KServe
    needs: inference on 8085 behind the wrapper's 8080, metrics on 8082 for Prometheus, the envelope from the
    environment, the archive loaded at start-up with batchSize 1."""
    args = runtime_container()["args"]
    assert args[:2] == ["torchserve", "--start"]
    options = dict(arg.split("=", 1) for arg in args[2:])
    assert options == {"--model-store": f"{MOUNT}/model-store", "--ts-config": f"{MOUNT}/config/config.properties"}
    assert sorted(str(p.relative_to(layout)) for p in layout.rglob("*") if p.is_file()) == [
        "config/config.properties",
        "model-store/cifar3.mar",
    ]
    assert (layout / "model-store" / "cifar3.mar").read_bytes() == (model_store / "cifar3.mar").read_bytes()
    assert (layout / "config" / "config.properties").read_text() == KSERVE_CONFIG.read_text()

    props = read_properties(layout / "config" / "config.properties")
    assert props["model_store"] == options["--model-store"]
    for key, port in PORT_KEYS.items():
        assert props[key].rsplit(":", 1)[1] == str(port), key
    annotations = yaml.safe_load(RUNTIME.read_text())["spec"]["annotations"]
    assert annotations["prometheus.kserve.io/port"] == "8082" and props["metrics_mode"] == "prometheus"
    # TorchServe answers the Open Inference Protocol itself, on the port the InferenceService routes to and
    # probes; the management API stays inside the pod. No token: KServe's ingress and probes send none.
    assert props["ts_open_inference_protocol"] == "true"
    assert props["disable_token_authorization"] == "true"
    assert props["inference_address"] == "http://0.0.0.0:8085"
    assert props["management_address"].startswith("http://127.0.0.1:")
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert props["enable_model_api"] == "false" and props["enable_envvars_config"] == "true"
    assert "load_models" not in props
    snapshot = json.loads(props["model_snapshot"])
    assert snapshot["modelCount"] == 1
    (version,) = snapshot["models"]["cifar3"].values()
    assert version["marName"] == "cifar3.mar" and version["defaultVersion"] is True
    assert version["batchSize"] == 1, "TorchServe's KServe envelopes answer a batch of two or more with 503"
    # The envelope is the runtime's to choose: the container sets TS_SERVICE_ENVELOPE.
    assert [e["name"] for e in runtime_container()["env"]] == ["TS_SERVICE_ENVELOPE"]


def test_layout_script_refuses_what_it_cannot_serve(tmp_path):
    usage = run_cli("bash", str(LAYOUT_SCRIPT))
    assert usage.returncode == 2 and "usage: scripts/kserve_layout.sh OUT_DIR [MAR]" in usage.stderr
    missing = run_cli("bash", str(LAYOUT_SCRIPT), str(tmp_path / "out"), str(tmp_path / "none.mar"))
    assert missing.returncode == 2 and "model archive not found" in missing.stderr
    assert "scripts/archive.sh" in missing.stderr
    (tmp_path / "bad.mar").write_bytes(b"not a zip")
    bad = run_cli("bash", str(LAYOUT_SCRIPT), str(tmp_path / "out"), str(tmp_path / "bad.mar"))
    assert bad.returncode == 1 and "is not a model archive" in bad.stderr
    assert not (tmp_path / "out").exists(), "nothing is written for an archive that cannot be served"


# --- the handler's side of the envelopes, without TorchServe ------------------------------------------


@pytest.mark.parametrize(
    ("item", "envelope"),
    [
        ({"name": "a", "shape": [1], "datatype": "BYTES", "data": "aGVsbG8="}, "kservev2"),  # the envelope took data[0]
        ({"name": "a", "shape": [-1], "datatype": "BYTES", "data": "aGVsbG8="}, "kservev2"),
        ({"data": "aGVsbG8="}, "kserve"),
        ({"data": "aGVs\nbG8=\n"}, "kserve"),  # line-wrapped
        ({"data": "data:image/png;base64,aGVsbG8="}, "kserve"),  # a browser's data URL
    ],
)
def test_envelope_items_give_the_image_bytes(item, envelope):
    assert envelope_image_bytes(item, envelope) == b"hello"


@pytest.mark.parametrize(
    ("item", "envelope", "message"),
    [
        ({"name": "a", "shape": [1], "datatype": "FP32", "data": [1.0]}, "kservev2", '"datatype": "BYTES"'),
        ({"name": "a", "shape": [2], "datatype": "BYTES", "data": "aGVsbG8="}, "kservev2", "one image per v2 input"),
        ({"name": "a", "shape": [1], "datatype": "BYTES", "data": 7}, "kservev2", "base64 string"),
        ({"name": "a", "shape": [1], "datatype": "BYTES", "data": "a!b"}, "kservev2", "malformed base64"),
        ("aGVsbG8=", "kserve", '{"data": "<base64 image>"}'),
        ({"b64": "aGVsbG8="}, "kserve", '{"data": "<base64 image>"}'),
        ({"data": "a b"}, "kserve", "malformed base64"),
    ],
)
def test_envelope_items_that_hold_no_image_say_what_to_send(item, envelope, message):
    with pytest.raises(ImageDecodeError, match=re.escape(message)):
        envelope_image_bytes(item, envelope)


# --- TorchServe as the runtime starts it ---------------------------------------------------------


class RuntimeServer:
    """TorchServe started with the runtime's command from a copy of the layout (free loopback ports)."""

    def __init__(self, layout: Path, folder: Path, envelope: str, batch_size: int | None = None):
        self.folder, self.envelope = folder, envelope
        self.mount = folder / "models"
        shutil.copytree(layout, self.mount)
        config = self.mount / "config" / "config.properties"
        props = read_properties(config)
        ports = free_ports(5)
        for key, port in zip(PORT_KEYS, ports, strict=False):  # loopback here, whatever the pod listens on
            props[key] = re.sub(r"://[^/]+$", f"://127.0.0.1:{port}", props[key])
        props["grpc_inference_port"], props["grpc_management_port"] = str(ports[3]), str(ports[4])
        props["model_store"] = props["model_store"].replace(MOUNT, str(self.mount))
        if batch_size is not None:
            snapshot = json.loads(props["model_snapshot"])
            snapshot["models"]["cifar3"]["1.0"].update(batchSize=batch_size, maxBatchDelay=200, minWorkers=1)
            props["model_snapshot"] = json.dumps(snapshot)
        config.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        self.inference_url = props["inference_address"]
        self.management_url = props["management_address"]
        self.metrics_url = props["metrics_address"]
        # Java's and the launcher's temporary files (pid file, worker sockets) in a short private folder.
        self.tmp = Path(tempfile.mkdtemp(prefix="ts-kserve-"))
        self.run_dir = folder / "run"
        self.run_dir.mkdir()
        # cifar3_client.server's Server knows how to stop a TorchServe whose pid file is in run_dir/tmp.
        (self.run_dir / "tmp").symlink_to(self.tmp)
        self.stopper = Server(config, self.run_dir)

    def start(self, timeout: float = 240.0) -> None:
        container = runtime_container()
        argv = [arg.replace(MOUNT, str(self.mount)) for arg in container["args"]]
        env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "TMPDIR": str(self.tmp),
            "TEMP": str(self.tmp),
            "LOG_LOCATION": str(self.run_dir / "logs"),
            "METRICS_LOCATION": str(self.run_dir / "logs"),
            "TS_SERVICE_ENVELOPE": self.envelope,
        }
        with open(self.run_dir / "torchserve.out", "wb") as out:
            subprocess.run(
                argv, cwd=self.run_dir, env=env, stdout=out, stderr=subprocess.STDOUT, check=True, timeout=60
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                workers = requests.get(f"{self.management_url}/models/cifar3", timeout=5).json()[0]["workers"]
                if any(w["status"] == "READY" for w in workers):
                    return
            except (requests.RequestException, ValueError, KeyError, IndexError):
                pass
            time.sleep(1)
        log = (self.run_dir / "logs" / "ts_log.log").read_text(errors="replace")[-3000:]
        raise AssertionError(f"cifar3 not READY after {timeout:.0f}s\n{log}")

    def stop(self) -> None:
        self.stopper.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def v2_server(layout, tmp_path_factory):
    server = RuntimeServer(layout, tmp_path_factory.mktemp("kservev2"), "kservev2")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def v1_server(layout, tmp_path_factory):
    server = RuntimeServer(layout, tmp_path_factory.mktemp("kservev1"), "kserve")
    try:
        server.start()
        yield server
    finally:
        server.stop()


def png(seed: int) -> bytes:
    """A distinct 32x32 noise image per seed: the model answers each with its own probabilities."""
    return png_of(np.random.default_rng(seed).integers(0, 256, size=(32, 32, 3), dtype=np.uint8))


def png_of(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def v2_body(*images: bytes, request_id: str | None = None) -> dict:
    body = {"inputs": [{"name": f"image-{i}", "shape": [1], "datatype": "BYTES", "data": [b64(image)]}
                       for i, image in enumerate(images)]}  # fmt: skip
    return {**body, "id": request_id} if request_id else body


def v2_answers(response: requests.Response) -> list[dict]:
    """The cifar3 answers of a v2 response: each output is one BYTES element holding the JSON answer."""
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == "cifar3"
    answers = []
    for i, output in enumerate(body["outputs"]):
        assert output["name"] == f"image-{i}" and output["datatype"] == "BYTES" and output["shape"] == [1], output
        answers.append(json.loads(output["data"][0]))
    return answers


def assert_answer(answer: dict) -> None:
    # "unknown" and "unknown_score": the handler's verdict on images of none of the classes (ARCHITECTURE.md).
    assert set(answer) == {"pred_class", "probs", "unknown", "unknown_score"}
    assert isinstance(answer["unknown"], bool) and isinstance(answer["unknown_score"], float)
    assert list(answer["probs"]) == CLASSES
    assert answer["pred_class"] == max(answer["probs"], key=answer["probs"].get)
    assert sum(answer["probs"].values()) == pytest.approx(1, abs=1e-5)


def assert_bad_request(response: requests.Response, *fragments: str) -> None:
    assert response.status_code == 400, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    message = response.json()["message"]
    for fragment in fragments:
        assert fragment in message, message


@needs_runtime
@pytest.mark.server
def test_v2_inference_answers_class_and_probabilities(v2_server):
    """The Open Inference Protocol body KServe's wrapper forwards, on TorchServe's v2 route and its plain one,
    without a token (the layout turns token authorization off inside the pod)."""
    image = png(1)
    answers = []
    for path in ("v2/models/cifar3/infer", "predictions/cifar3"):
        response = requests.post(
            f"{v2_server.inference_url}/{path}", json=v2_body(image, request_id="req-7"), timeout=60
        )
        assert response.json()["id"] == "req-7"
        (answer,) = v2_answers(response)
        assert_answer(answer)
        answers.append(answer)
    assert answers[0] == answers[1]
    # Several images: one input each, one output each, named after its input, in order. Images in the
    # colours the tiny model was trained on, so that each gets a clearly different answer.
    images = [png_of(pixels) for name in CLASSES for pixels in class_images(name, 1, seed=7)]
    together = v2_answers(
        requests.post(f"{v2_server.inference_url}/v2/models/cifar3/infer", json=v2_body(*images), timeout=60)
    )
    url = f"{v2_server.inference_url}/v2/models/cifar3/infer"
    alone = [v2_answers(requests.post(url, json=v2_body(i), timeout=60))[0] for i in images]
    assert [a["pred_class"] for a in alone] == CLASSES, alone
    for a, b in zip(together, alone, strict=True):
        assert a["pred_class"] == b["pred_class"]
        assert a["probs"] == pytest.approx(b["probs"], abs=0.02)  # a batch of 3 vs 1 (bfloat16 on this CPU)


@needs_runtime
@pytest.mark.server
def test_v2_bad_input_gets_400_json_naming_the_input(v2_server):
    url = f"{v2_server.inference_url}/v2/models/cifar3/infer"
    good = v2_body(png(1))["inputs"][0]
    cases = [
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["not base64!"]}]}, "input 0", "base64"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [b64(b"hello")]}]}, "input 0"),
        ({"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1.0, 2.0, 3.0]}]}, "BYTES"),
        # The envelope keeps only the first element of an input: two images in one input would lose one.
        ({"inputs": [{**good, "shape": [2], "data": [b64(png(1)), b64(png(2))]}]}, "one image per v2 input"),
        ({"inputs": [good, {**good, "name": "y", "data": ["%%"]}]}, "input 1"),
    ]  # fmt: skip
    for body, *fragments in cases:
        assert_bad_request(requests.post(url, json=body, timeout=60), *fragments)
    # The server goes on answering good requests.
    assert_answer(v2_answers(requests.post(url, json=v2_body(png(5)), timeout=60))[0])


def triton_client(server: RuntimeServer) -> triton_http.InferenceServerClient:
    """tritonclient's HTTP client for the server's inference API (it takes host:port, no scheme)."""
    return triton_http.InferenceServerClient(url=urlsplit(server.inference_url).netloc, network_timeout=60)


def triton_image(name: str, image: bytes) -> triton_http.InferInput:
    """One image as one BYTES input of shape [1], base64 in the JSON body: TorchServe reads no binary extension."""
    tensor = triton_http.InferInput(name, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([b64(image)], dtype=np.object_), binary_data=False)
    return tensor


def triton_answers(result: triton_http.InferResult, names: list[str]) -> list[dict]:
    return [json.loads(result.as_numpy(name)[0]) for name in names]


@needs_runtime
@pytest.mark.server
def test_open_inference_protocol_client_sees_a_live_ready_server_that_classifies(v2_server):
    """tritonclient's HTTP client, as a platform team would call a KServe v2 deployment: server live, ready and
    metadata (TorchServe's OIP switch, on in the layout), then one BYTES input per image, each answered with
    the class the image belongs to, alone and three in one request."""
    client = triton_client(v2_server)
    try:
        assert client.is_server_live() is True
        assert client.is_server_ready() is True
        metadata = client.get_server_metadata()
        assert metadata["name"] == "Torchserve" and metadata["version"] == version("torchserve")
        images = {name: png_of(class_images(name, 1, seed=7)[0]) for name in CLASSES}
        for name, image in images.items():
            result = client.infer("cifar3", [triton_image("image", image)], request_id=f"req-{name}")
            (answer,) = triton_answers(result, ["image"])
            assert_answer(answer)
            assert answer["pred_class"] == name, answer
            assert result.get_response()["id"] == f"req-{name}"
        names = [f"image-{i}" for i in range(len(CLASSES))]
        together = client.infer("cifar3", [triton_image(n, images[c]) for n, c in zip(names, CLASSES, strict=True)])
        assert [a["pred_class"] for a in triton_answers(together, names)] == CLASSES
    finally:
        client.close()


@needs_runtime
@pytest.mark.server
def test_open_inference_protocol_client_gets_a_clear_error_for_bad_input(v2_server):
    """A bad input is refused with HTTP 400 and the handler's message, naming the input. TorchServe 0.12 words
    its error body {"code", "type", "message"} where the protocol says {"error": ...}, so tritonclient reports
    that it could not decode the error and carries the server's body in its message (docs/deployment.md)."""
    client = triton_client(v2_server)
    wrong_type = triton_http.InferInput("image", [1, 3], "FP32")
    wrong_type.set_data_from_numpy(np.zeros((1, 3), dtype=np.float32), binary_data=False)
    cases = [
        ([triton_image("image", b"not an image")], ["input 0"]),
        ([triton_image("good", png(1)), triton_image("bad", b"GIF89a not really")], ["input 1"]),
        ([wrong_type], ['"datatype": "BYTES"']),
    ]
    try:
        for inputs, fragments in cases:
            with pytest.raises(InferenceServerException) as caught:
                client.infer("cifar3", inputs)
            assert caught.value.status() == "400", caught.value
            body = json.loads(caught.value.debug_details())
            assert body["code"] == 400 and caught.value.debug_details() in caught.value.message()
            for fragment in fragments:
                assert fragment in body["message"], body
        # The server goes on answering good requests.
        assert_answer(triton_answers(client.infer("cifar3", [triton_image("image", png(5))]), ["image"])[0])
    finally:
        client.close()


@needs_runtime
@pytest.mark.server
def test_open_inference_protocol_has_no_per_model_routes_over_http(v2_server):
    """TorchServe 0.12 serves no /v2/models/<name>/ready nor /v2/models/<name> (model metadata) over HTTP: a
    client must use server readiness. If this fails with a ready answer, TorchServe added them: use them in
    the InferenceService's probes (docs/deployment.md)."""
    client = triton_client(v2_server)
    try:
        assert client.is_model_ready("cifar3") is False  # HTTP 404
        with pytest.raises(InferenceServerException) as caught:
            client.get_model_metadata("cifar3")
        assert caught.value.status() == "404"
    finally:
        client.close()


@needs_runtime
@pytest.mark.server
def test_v2_concurrent_requests_each_get_their_own_answer(v2_server):
    """batchSize 1 (the layout): 24 distinct images from 8 clients at once, each answer equal to the answer
    the same image gets alone."""
    model = requests.get(f"{v2_server.management_url}/models/cifar3", timeout=30).json()[0]
    assert model["batchSize"] == 1 and len(model["workers"]) == 2  # the snapshot's, over the archive's batchSize
    images = [png(100 + i) for i in range(24)]
    url = f"{v2_server.inference_url}/v2/models/cifar3/infer"

    def ask(i: int) -> dict:
        return v2_answers(requests.post(url, json=v2_body(images[i], request_id=f"r{i}"), timeout=120))[0]

    alone = [ask(i) for i in range(len(images))]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(ask, range(len(images))))
    assert concurrent == alone


@needs_runtime
@pytest.mark.server
def test_v1_inference_answers_predictions_and_rejects_bad_instances(v1_server):
    """KServe v1 ({"instances": [{"data": "<base64>"}]}) with TS_SERVICE_ENVELOPE=kserve."""
    images = [png(seed) for seed in (11, 12)]
    body = {"instances": [{"data": b64(image)} for image in images]}
    answers = {}
    for path in ("v1/models/cifar3:predict", "predictions/cifar3"):
        response = requests.post(f"{v1_server.inference_url}/{path}", json=body, timeout=60)
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        assert len(predictions) == 2
        for answer in predictions:
            assert_answer(answer)
        answers[path] = predictions
    assert answers["v1/models/cifar3:predict"] == answers["predictions/cifar3"]

    url = f"{v1_server.inference_url}/v1/models/cifar3:predict"
    for bad, *fragments in [
        ({"instances": [{"data": b64(images[0])}, {"data": "@@"}]}, "instance 1", "base64"),
        ({"instances": [b64(images[0])]}, "instance 0", '{"data": "<base64 image>"}'),
        ({"instances": [{"data": b64(b"GIF89a not really")}]}, "instance 0"),
        ({"instances": []}, "no instances"),
    ]:
        assert_bad_request(requests.post(url, json=bad, timeout=60), *fragments)


def assert_explained(answer: dict, method: str, target: str) -> None:
    explanation = answer.pop("explanation")
    assert_answer(answer)
    assert (explanation["method"], explanation["target"], explanation["grid"]) == (method, target, 32)
    heatmap = np.array(explanation["heatmap"])
    assert heatmap.shape == (32, 32) and heatmap.min() >= 0 and heatmap.max() <= 1


@needs_runtime
@pytest.mark.server
def test_kserve_explain_routes_answer_heat_maps(v1_server, v2_server):
    """TorchServe routes KServe's v1 ":explain" and v2 "/explain" to the handler: each image's answer carries its
    heat map (v1 instances may name target and method, v2 inputs in their parameters); a bad name is a 400."""
    image = png(11)
    v1 = f"{v1_server.inference_url}/v1/models/cifar3:explain"
    body = {"instances": [{"data": b64(image)}, {"data": b64(image), "target": "ship", "method": "occlusion"}]}
    response = requests.post(v1, json=body, timeout=60)
    assert response.status_code == 200, response.text
    default, named = response.json()["explanations"]
    assert_explained(named, "occlusion", "ship")
    assert_explained(default, yaml.safe_load((ROOT / "handler" / "model-config.yaml").read_text())["handler"]
                     ["explanation"], default["pred_class"])  # fmt: skip
    bad = {"instances": [{"data": b64(image), "method": "nope"}]}
    assert_bad_request(requests.post(v1, json=bad, timeout=60), "instance 0", "unknown explanation method 'nope'")

    v2 = f"{v2_server.inference_url}/v2/models/cifar3/explain"
    inputs = v2_body(image)["inputs"]
    inputs[0]["parameters"] = {"method": "feature-ablation", "target": "airplane"}
    (answer,) = v2_answers(requests.post(v2, json={"inputs": inputs}, timeout=60))
    assert_explained(answer, "feature-ablation", "airplane")


PROMETHEUS_LINE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_]\w*="[^"]*",?)*\})? -?[0-9.eE+-]+|NaN$')


@needs_runtime
@pytest.mark.server
def test_metrics_endpoint_answers_in_prometheus_format(v2_server):
    """Port 8082 (the runtime's prometheus.kserve.io/port) in Prometheus text format, with the handler's counters."""
    url = f"{v2_server.inference_url}/v2/models/cifar3/infer"
    assert v2_answers(requests.post(url, json=v2_body(png(21)), timeout=60))
    assert requests.post(url, json=v2_body(b"not an image"), timeout=60).status_code == 400
    response = requests.get(f"{v2_server.metrics_url}/metrics", timeout=30)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for line in response.text.splitlines():
        if not line or line.startswith("#"):
            continue
        assert PROMETHEUS_LINE.match(line), line
        name = line.split("{")[0].split(" ")[0]
        if 'ModelName="cifar3"' in line or 'model_name="cifar3"' in line:
            samples[name] = float(line.rsplit(" ", 1)[1])
    assert "# TYPE ImagesClassified counter" in response.text
    assert samples["ImagesClassified"] >= 1 and samples["ImagesRejected"] >= 1
    assert samples["ts_inference_requests_total"] >= 2


@needs_runtime
@pytest.mark.server
@pytest.mark.slow
def test_kservev2_envelope_breaks_batches_of_two_or_more(layout, tmp_path):
    """Why the layout sets batchSize 1: with batching on, TorchServe's kservev2 envelope reads the first request
    of a batch and answers once, so TorchServe fails the whole batch (HTTP 503). If this ever passes with every
    request answered, batching became safe with the envelope and the layout's batchSize can be raised."""
    server = RuntimeServer(layout, tmp_path, "kservev2", batch_size=8)
    try:
        server.start()
        assert requests.get(f"{server.management_url}/models/cifar3", timeout=30).json()[0]["batchSize"] == 8
        url = f"{server.inference_url}/v2/models/cifar3/infer"
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda i: requests.post(url, json=v2_body(png(i)), timeout=120), range(8)))
        codes = [r.status_code for r in statuses]
        assert 503 in codes, f"every request was answered alone or correctly: {codes}"
        failed = next(r for r in statuses if r.status_code == 503)
        assert "number of batch response mismatched" in failed.json()["message"]
    finally:
        server.stop()
