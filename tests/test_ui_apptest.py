"""ui/app.py run by Streamlit's AppTest against the real TorchServe of the session (no browser)."""

from __future__ import annotations

import base64
import json
import socket
from http.server import BaseHTTPRequestHandler

import pytest
import requests
from conftest import MODEL_CONFIG, ROOT
from loopback import LoopbackServer
from PIL import Image
from streamlit.dataframe_util import convert_arrow_bytes_to_pandas_df
from streamlit.testing.v1 import AppTest
from synthetic import class_images, encode, png_with_declared_size, sample_image

APP = ROOT / "ui" / "app.py"
TIMEOUT = 60  # seconds per script run: generous for a loaded 2-core machine

pytestmark = pytest.mark.server


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def point_at(monkeypatch):
    """Set the CIFAR3_* variables the page reads (and clear the others)."""

    def point(inference_url: str, management_url: str, token_file: str, token: str = "") -> None:
        for name in (
            "CIFAR3_INFERENCE_URL",
            "CIFAR3_MANAGEMENT_URL",
            "CIFAR3_TOKEN_FILE",
            "CIFAR3_TOKEN",
            "CIFAR3_TIMEOUT",
            "CIFAR3_UI_ALLOW_OVERRIDES",
        ):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("CIFAR3_INFERENCE_URL", inference_url)
        monkeypatch.setenv("CIFAR3_MANAGEMENT_URL", management_url)
        monkeypatch.setenv("CIFAR3_TOKEN_FILE", token_file)
        if token:
            monkeypatch.setenv("CIFAR3_TOKEN", token)

    return point


@pytest.fixture
def app(server, point_at) -> AppTest:
    """The page, configured for the session's server, after its first run."""
    point_at(server.inference_url, server.management_url, str(server.key_file))
    return AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()


def server_answer(server, data: bytes) -> dict:
    """What the server itself answers for these bytes (the page must show the same)."""
    response = requests.post(
        f"{server.inference_url}/predictions/cifar3",
        data=data,
        timeout=30,
        headers={**server.headers(), "Content-Type": "application/octet-stream"},
    )
    return response.json()


def upload(at: AppTest, *files: tuple[str, bytes]) -> AppTest:
    at.file_uploader(key="images").set_value([(name, data, "application/octet-stream") for name, data in files])
    return at.run()


def headline(name: str, answer: dict) -> str:
    """The card's heading for a server answer: its class, or that it looks like none of the classes."""
    if answer["unknown"]:
        return f"#### {name}: looks like none of: {', '.join(answer['probs'])}"
    return f"#### {name}: **{answer['pred_class']}**"


def charts(at: AppTest) -> list:
    return list(at.get("vega_lite_chart"))


def chart_frame(chart):
    """The chart's data set as a DataFrame."""
    return convert_arrow_bytes_to_pandas_df(chart.proto.datasets[0].data.data)


def test_sidebar_shows_a_ready_server_and_its_model(app, server):
    assert not app.exception and not app.error, [e.value for e in app.error]
    sidebar = " ".join(m.value for m in app.sidebar.markdown)
    assert "Inference API reachable" in sidebar and "Model `cifar3` READY" in sidebar
    workers = MODEL_CONFIG["minWorkers"]
    assert f"Workers: {workers} READY of {workers}" in sidebar and f"batch size: {MODEL_CONFIG['batchSize']}" in sidebar
    assert "Classes: airplane, automobile, ship" in sidebar and "Validation accuracy: " in sidebar
    assert app.file_uploader(key="images").allowed_type == [".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"]
    assert app.file_uploader(key="images").accept_multiple_files
    assert "Upload one or several images" in app.info[0].value


def test_upload_shows_the_prediction_and_a_sorted_percent_chart(app, server):
    data = encode(sample_image("ship"), "PNG")
    expected = server_answer(server, data)
    upload(app, ("ship.png", data))
    assert not app.exception and not app.error, [e.value for e in app.error]
    assert headline("ship.png", expected) in [m.value for m in app.main.markdown]
    assert any("round trip" in c.value and "ms" in c.value for c in app.main.caption)
    [chart] = charts(app)
    frame = chart_frame(chart)
    ranked = sorted(expected["probs"].items(), key=lambda kv: -kv[1])
    assert list(frame["class"]) == [c for c, _ in ranked]
    assert list(frame["probability (%)"]) == pytest.approx([p * 100 for _, p in ranked], abs=0.01)
    bars = json.loads(chart.proto.spec)["layer"][0]["encoding"]
    assert bars["y"]["field"] == "class" and bars["y"]["sort"] == [c for c, _ in ranked]  # horizontal, largest on top
    assert bars["x"]["field"] == "probability (%)" and bars["x"]["type"] == "quantitative"
    assert len(app.main.get("image")) == 1


def test_several_images_each_get_their_own_answer(app, server):
    files = [(f"{name}.png", encode(sample_image(name, seed=3), "PNG")) for name in ("airplane", "automobile", "ship")]
    expected = [server_answer(server, data) for _, data in files]
    upload(app, *files)
    assert not app.exception and not app.error, [e.value for e in app.error]
    shown = [m.value for m in app.main.markdown if m.value.startswith("#### ")]
    assert shown == [headline(name, answer) for (name, _), answer in zip(files, expected, strict=True)]
    assert len(charts(app)) == 3 and "3 of 3 image(s) classified" in " ".join(c.value for c in app.main.caption)


def test_an_image_of_none_of_the_classes_says_so_and_still_shows_the_probabilities(app, server):
    data = encode(Image.fromarray(class_images("grey", 1, seed=5)[0]), "PNG")
    expected = server_answer(server, data)
    assert expected["unknown"] is True
    upload(app, ("grey.png", data))
    assert not app.exception and not app.error, [e.value for e in app.error]
    assert "#### grey.png: looks like none of: airplane, automobile, ship" in [m.value for m in app.main.markdown]
    caption = " ".join(c.value for c in app.main.caption)
    assert f"closest class {expected['pred_class']}" in caption and "above the server's threshold" in caption
    [chart] = charts(app)
    assert sorted(chart_frame(chart)["class"]) == ["airplane", "automobile", "ship"]


def test_a_bad_image_shows_the_servers_message(app, server):
    good = encode(sample_image("airplane"), "JPEG")
    expected = server_answer(server, b"not an image")["error"]
    upload(app, ("x.png", b"not an image"), ("plane.jpg", good))
    assert not app.exception
    assert [e.value for e in app.error] == [f"the server rejected x.png: {expected}"]
    assert len(charts(app)) == 1 and "1 of 2 image(s) classified" in " ".join(c.value for c in app.main.caption)


def test_an_image_too_large_to_preview_still_shows_the_servers_message(app, server):
    good = encode(sample_image("airplane"), "JPEG")
    bomb = png_with_declared_size(15_000, 15_000)  # 65 bytes; Pillow refuses to open it here
    expected = server_answer(server, bomb)["error"]
    upload(app, ("big.png", bomb), ("plane.jpg", good))
    assert not app.exception
    assert [e.value for e in app.error] == [f"the server rejected big.png: {expected}"]
    assert "no preview" in " ".join(c.value for c in app.main.caption) and len(charts(app)) == 1


def test_server_down_is_a_clear_message(point_at, tmp_path):
    url = f"http://127.0.0.1:{closed_port()}"
    point_at(url, url, str(tmp_path / "key_file.json"))
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert any(f"TorchServe is not reachable at {url}" in e and "serve.py start" in e for e in errors), errors
    assert "Inference API not reachable" in " ".join(m.value for m in at.sidebar.markdown)
    upload(at, ("ship.png", encode(sample_image("ship"), "PNG")))
    assert not at.exception and not charts(at)
    assert any(f"not reachable at {url}" in e.value for e in at.main.error)


def test_a_rejected_token_is_a_clear_message(server, point_at, tmp_path):
    point_at(server.inference_url, server.management_url, str(tmp_path / "missing.json"), token="wrong")
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    assert not at.exception
    upload(at, ("ship.png", encode(sample_image("ship"), "PNG")))
    errors = [e.value for e in at.main.error]
    assert errors and all("TorchServe rejected the token from CIFAR3_TOKEN" in e for e in errors), errors
    assert not charts(at)


class CapturingServer(LoopbackServer):
    """A loopback HTTP server that records every request's path and Authorization header and answers 400
    InvalidKeyException, as TorchServe does to a request without a valid token."""

    def __init__(self):
        self.seen: list[tuple[str, str | None]] = []
        seen = self.seen

        class Handler(BaseHTTPRequestHandler):
            def answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                seen.append((self.path, self.headers.get("Authorization")))
                body = json.dumps({"code": 400, "type": "InvalidKeyException", "message": "no"}).encode()
                self.send_response(400)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = answer  # noqa: N815 (http.server's naming)

            def log_message(self, *args):
                pass

        super().__init__(Handler)


def test_connection_settings_do_not_exist_by_default(app):
    assert not app.exception
    assert not app.sidebar.expander and not app.sidebar.text_input
    assert not [w for w in app.text_input]


def test_typed_urls_never_receive_the_configured_keys(server, point_at, monkeypatch):
    """With overrides allowed, URLs typed in the sidebar get no key from the key file or CIFAR3_TOKEN."""
    keys = json.loads(server.key_file.read_text())
    secrets = {keys["inference"]["key"], keys["management"]["key"], "env-token"}
    point_at(server.inference_url, server.management_url, str(server.key_file), token="env-token")
    monkeypatch.setenv("CIFAR3_UI_ALLOW_OVERRIDES", "1")
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    assert not at.exception and [t.key for t in at.sidebar.text_input] == ["inference_url", "management_url", "token"]
    with CapturingServer() as capture:
        at.sidebar.text_input(key="inference_url").set_value(capture.url)
        at.sidebar.text_input(key="management_url").set_value(capture.url).run()
        upload(at, ("ship.png", encode(sample_image("ship"), "PNG")))
    assert not at.exception
    paths = {path for path, _ in capture.seen}
    assert {"/ping", "/models/cifar3", "/predictions/cifar3"} <= paths, capture.seen
    assert {auth for _, auth in capture.seen} == {None}, capture.seen
    assert not any(secret in str(capture.seen) for secret in secrets)
    assert any("configured keys are sent only to the configured servers" in e.value for e in at.main.error)


def test_sidebar_settings_override_the_environment(server, point_at, monkeypatch):
    point_at(server.inference_url, server.management_url, str(server.key_file))
    monkeypatch.setenv("CIFAR3_UI_ALLOW_OVERRIDES", "1")
    app = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    url = f"http://127.0.0.1:{closed_port()}"
    app.sidebar.text_input(key="inference_url").set_value(url)
    app.run()
    assert not app.exception
    assert any(f"not reachable at {url}" in e.value for e in app.sidebar.error)
    app.sidebar.text_input(key="inference_url").set_value(server.inference_url).run()
    assert not app.error and "Model `cifar3` READY" in " ".join(m.value for m in app.sidebar.markdown)


def test_a_bad_setting_is_a_clear_message(server, point_at, monkeypatch):
    point_at(server.inference_url, server.management_url, str(server.key_file))
    monkeypatch.setenv("CIFAR3_TIMEOUT", "soon")
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    assert not at.exception
    assert [e.value for e in at.error] == [
        "Configuration error: CIFAR3_TIMEOUT='soon' is not a number of seconds: set it to e.g. 30"
    ]


def server_explanation(server, data: bytes, target: str | None = None) -> dict:
    """What the explanations API itself answers for these bytes."""
    body = {"data": base64.b64encode(data).decode()} | ({"target": target} if target else {})
    response = requests.post(
        f"{server.inference_url}/explanations/cifar3", json=body, timeout=60, headers=server.headers()
    )
    assert response.status_code == 200, response.text
    return response.json()


def image_captions(at: AppTest) -> list[str]:
    return [img.caption for element in at.main.get("image") for img in element.proto.imgs]


def test_show_what_the_model_looked_at_overlays_each_image(app, server):
    data = encode(sample_image("ship"), "PNG")
    expected = server_explanation(server, data)
    assert not app.get("selectbox")  # the class selector appears with the toggle
    app.toggle(key="explain").set_value(True).run()
    assert list(app.selectbox(key="explain_target").options) == [
        "the predicted class",
        "airplane",
        "automobile",
        "ship",
    ]
    upload(app, ("ship.png", data))
    assert not app.exception and not app.error, [e.value for e in app.error]
    assert headline("ship.png", expected) in [m.value for m in app.main.markdown]
    method = expected["explanation"]["method"]  # the server's default, preselected
    assert app.selectbox(key="explain_method").value == method
    captions = image_captions(app)
    assert captions[0] == "ship.png" and captions[1].startswith(f"{method} for {expected['explanation']['target']}")
    assert len(charts(app)) == 1

    app.selectbox(key="explain_target").set_value("airplane").run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    captions = image_captions(app)
    assert captions[0] == "ship.png" and captions[1].startswith(f"{method} for airplane")
    assert server_explanation(server, data, "airplane")["explanation"]["target"] == "airplane"

    app.selectbox(key="explain_method").set_value("occlusion").run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    assert image_captions(app) == ["ship.png", "occlusion for airplane"]

    app.toggle(key="explain").set_value(False).run()
    assert image_captions(app) == ["ship.png"] and not app.get("selectbox")


def test_an_image_of_none_of_the_classes_is_explained_for_its_closest_class(app, server):
    data = encode(Image.fromarray(class_images("grey", 1, seed=5)[0]), "PNG")
    expected = server_explanation(server, data)
    assert expected["unknown"] is True and expected["explanation"]["target"] == expected["pred_class"]
    app.toggle(key="explain").set_value(True).run()
    upload(app, ("grey.png", data))
    assert not app.exception and not app.error, [e.value for e in app.error]
    assert "#### grey.png: looks like none of: airplane, automobile, ship" in [m.value for m in app.main.markdown]
    method = expected["explanation"]["method"]
    assert image_captions(app) == ["grey.png", f"{method} for {expected['pred_class']} (looks like none)"]


def test_explaining_a_bad_image_shows_the_servers_message(app, server):
    good = encode(sample_image("airplane"), "JPEG")
    expected = server_answer(server, b"not an image")["error"]
    app.toggle(key="explain").set_value(True).run()
    upload(app, ("x.png", b"not an image"), ("plane.jpg", good))
    assert not app.exception
    assert [e.value for e in app.error] == [f"the server rejected x.png: {expected}"]
    assert len(image_captions(app)) == 2 and "1 of 2 image(s) classified" in " ".join(c.value for c in app.main.caption)
