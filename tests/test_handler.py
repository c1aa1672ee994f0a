"""The handler in-process, with TorchServe's own Context (no server), and the .mar's self-containment."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from PIL import Image
from synthetic import encode, png_with_declared_size, sample_image
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from cifar3.checkpoint import load_checkpoint
from cifar3.engine import ONNX_FILES, choose_engine, load_engine, predict_probs
from cifar3.inference import dtype_name, predict_logits
from cifar3.preprocessing import ImageDecodeError, decode_image, pil_to_uint8
from handler.cifar3_handler import Cifar3Handler
from training.export import export_checkpoint

CLASSES = ["airplane", "automobile", "ship"]
TS_METRICS = Path(sys.modules["ts"].__file__).parent / "configs" / "metrics.yaml"


def make_context(model_dir: Path, headers: list[dict] | None = None) -> Context:
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    config = {"handler": {"threads": 1}}
    context = Context("cifar3", str(model_dir), manifest, 16, None, "0.12.0",
                      metrics=MetricsCacheYamlImpl(str(TS_METRICS)), model_yaml_config=config)  # fmt: skip
    context.request_processor = [RequestProcessor(h) for h in headers or [{}]]
    return context


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model_store) -> Path:
    folder = tmp_path_factory.mktemp("mar")
    with zipfile.ZipFile(model_store / "cifar3.mar") as mar:
        mar.extractall(folder)
    return folder


@pytest.fixture(scope="module")
def handler(model_dir) -> Cifar3Handler:
    h = Cifar3Handler()
    h.initialize(make_context(model_dir))
    return h


def handle(handler, model_dir, requests: list[dict], headers: list[dict] | None = None):
    """(status codes, decoded JSON bodies) of one batch through handler.handle."""
    context = make_context(model_dir, headers or [{} for _ in requests])
    bodies = handler.handle(requests, context)
    assert len(bodies) == len(requests)
    codes = [context.request_processor[i].get_response_status_code() for i in range(len(requests))]
    return codes, [json.loads(b) for b in bodies]


def test_answer_has_every_class_and_probabilities_sum_to_one(handler, model_dir):
    codes, bodies = handle(handler, model_dir, [{"body": encode(sample_image("ship"))}])
    assert codes == [200]
    assert set(bodies[0]) == {"pred_class", "probs", "unknown", "unknown_score"} and list(bodies[0]["probs"]) == CLASSES
    assert isinstance(bodies[0]["unknown"], bool) and 0.0 <= bodies[0]["unknown_score"] <= 1.0  # other-class output
    assert sum(bodies[0]["probs"].values()) == pytest.approx(1.0, abs=1e-6)
    assert bodies[0]["pred_class"] == max(bodies[0]["probs"], key=bodies[0]["probs"].get)


def test_every_input_form_gives_the_same_answer(handler, model_dir):
    data = encode(sample_image("airplane"), "JPEG")
    forms = [
        {"body": data},
        {"data": data},
        {"file": data},
        {"body": {"data": base64.b64encode(data).decode()}},
        {"body": {"data": base64.encodebytes(data).decode()}},  # line-wrapped, as base64 and openssl write it
        {"body": {"data": "data:image/jpeg;base64," + base64.b64encode(data).decode()}},  # a browser's data URL
        {"body": bytearray(data)},
    ]
    codes, bodies = handle(handler, model_dir, forms)
    assert codes == [200] * len(forms)
    assert all(b == bodies[0] for b in bodies)


@pytest.mark.parametrize(
    ("request_", "headers", "message"),
    [
        ({"body": b""}, {}, "empty request body"),
        ({}, {}, "no image in the request"),
        ({"body": b"hello, not an image"}, {}, "not an image"),
        ({"body": encode(sample_image(size=300), "JPEG")[:900]}, {}, "truncated"),
        ({"body": encode(sample_image(size=300), "PNG")[:3000]}, {}, "truncated"),
        ({"body": png_with_declared_size(100_000, 100_000)}, {}, "image too large"),
        ({"body": {"data": "%%% not base64"}}, {}, "malformed base64"),
        ({"body": {"image": "abc"}}, {}, 'must be {"data"'),
        ({"body": [1, 2]}, {}, "not a list"),
        ({"body": b'{"data": "abc"'}, {"Content-Type": "application/json"}, "malformed JSON"),
    ],
    ids=[
        "empty",
        "no-field",
        "not-image",
        "truncated-jpeg",
        "truncated-png",
        "bomb",
        "bad-base64",
        "json-no-data",
        "json-list",
        "bad-json",
    ],  # fmt: skip
)
def test_bad_input_is_a_400_naming_the_problem(handler, model_dir, request_, headers, message):
    codes, bodies = handle(handler, model_dir, [request_], [headers])
    assert codes == [400]
    assert bodies[0]["code"] == 400 and message in bodies[0]["error"]


def test_only_the_bad_request_of_a_batch_fails(handler, model_dir):
    good = encode(sample_image("automobile"))
    codes, bodies = handle(handler, model_dir, [{"body": good}, {"body": b"junk"}, {"body": good}, {"body": b""}])
    assert codes == [200, 400, 200, 400]
    assert bodies[0] == bodies[2] and "pred_class" in bodies[0]


@pytest.mark.parametrize("batch_size", [1, 2, 3, 7, 16])
def test_batched_answers_equal_single_answers(handler, model_dir, batch_size):
    images = [encode(sample_image(name, seed=i)) for i, name in zip(range(batch_size), CLASSES * 6)]
    _, batched = handle(handler, model_dir, [{"body": im} for im in images])
    for image, answer in zip(images, batched):
        _, (single,) = handle(handler, model_dir, [{"body": image}])
        assert answer["pred_class"] == single["pred_class"]
        for name in CLASSES:
            assert answer["probs"][name] == pytest.approx(single["probs"][name], abs=1e-5)


def test_any_image_mode_and_size_is_classified(handler, model_dir):
    rgb = sample_image("ship", size=64)
    frames = [sample_image("ship", size=40), sample_image("airplane", size=40)]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    i16 = Image.fromarray((torch.rand(48, 48).numpy() * 60000).astype("uint16"))
    images = [encode(rgb.convert(mode)) for mode in ("L", "LA", "P", "RGBA", "1")]
    images += [encode(rgb.convert("CMYK"), "JPEG"), encode(i16), gif, encode(rgb, "WEBP"), encode(rgb, "BMP")]
    codes, bodies = handle(handler, model_dir, [{"body": im} for im in images])
    assert codes == [200] * len(images), bodies


def test_gif_uses_its_first_frame_and_exif_orientation_is_applied():
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert decode_image(gif).getpixel((4, 4))[0] > 200  # red: the first frame
    wide = Image.new("RGB", (40, 20))
    exif = wide.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    assert decode_image(encode(wide, "JPEG", exif=exif.tobytes())).size == (20, 40)


def test_sixteen_bit_greyscale_is_rescaled_not_clipped():
    dark = Image.fromarray((torch.linspace(0, 4000, 64).reshape(8, 8).numpy()).astype("uint16"))
    pixels = pil_to_uint8(decode_image(encode(dark)))
    assert pixels.max() == 255 and pixels.min() == 0


def test_decode_error_is_the_only_exception():
    with pytest.raises(ImageDecodeError):
        decode_image(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)


def test_describe_returns_the_checkpoint_metadata(handler, tiny_checkpoint):
    described = json.loads(handler.describe_handle())
    _, meta = load_checkpoint(tiny_checkpoint)
    assert described["classes"] == CLASSES and described["variant"] == meta.variant
    assert described["val_accuracy"] == meta.val_accuracy and described["trained"] == meta.created
    assert described["temperature"] == meta.temperature and described["confidence_map"] == meta.confidence_map
    # model-config's engine and dtype: auto, resolved for this machine exactly as training.evaluate resolves them
    choice = choose_engine("auto", torch.device("cpu"))
    assert described["engine"] == choice.engine and described["dtype"] == dtype_name(choice.dtype)
    assert described["threads"] == 1 and described["engine_requested"] == "auto"


def test_handler_probabilities_equal_in_process_evaluation(handler, model_dir, tiny_checkpoint):
    model, meta = load_checkpoint(tiny_checkpoint)
    images = [sample_image(name, seed=3) for name in CLASSES]
    uint8 = torch.stack([pil_to_uint8(im) for im in images])

    def probs(net):
        return meta.scores(predict_logits(net, uint8, meta.mean, meta.std))[0]

    _, bodies = handle(handler, model_dir, [{"body": encode(im)} for im in images])
    served = torch.tensor([[b["probs"][c] for c in CLASSES] for b in bodies])
    float32 = probs(model)
    same_engine, _ = load_engine(tiny_checkpoint, "auto", threads=1, exporter=export_checkpoint)
    assert torch.allclose(served, predict_probs(same_engine, meta, uint8), atol=1e-5)
    assert torch.allclose(served, float32, atol=0.02)  # bfloat16 where the CPU has it: within 0.02 of float32


@pytest.mark.cli
def test_archive_is_self_contained(model_dir, tmp_path):
    """The extracted .mar alone (no repository on sys.path) loads and classifies an image."""
    script = """
import cifar3, cifar3_handler
from cifar3.checkpoint import load_checkpoint
_, meta = load_checkpoint("cifar3.pt")
print(cifar3.__file__, cifar3_handler.__file__, meta.classes)
"""
    # TorchServe puts the extracted archive first on the worker's path; PYTHONPATH does the same here.
    env = {**os.environ, "PYTHONPATH": str(model_dir)}
    result = subprocess.run([sys.executable, "-c", script], cwd=model_dir, capture_output=True, text=True,
                            timeout=120, check=False, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    package, handler_file, classes = result.stdout.split(" ", 2)
    assert package.startswith(str(model_dir)) and handler_file.startswith(str(model_dir))
    assert classes.strip() == "['airplane', 'automobile', 'ship']"


def test_archive_contents(model_store):
    names = set(zipfile.ZipFile(model_store / "cifar3.mar").namelist())
    expected = {"cifar3.pt", "cifar3_handler.py", "model-config.yaml", "MAR-INF/MANIFEST.json", *ONNX_FILES.values()}
    expected |= {f"cifar3/{path.name}" for path in (ROOT / "cifar3").glob("*.py")}
    assert names == expected


def test_archive_script_without_checkpoint_says_what_to_do(tmp_path):
    env = {"MODEL_STORE": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "archive.sh"), str(tmp_path / "none.pt")],
                            capture_output=True, text=True, check=False, env=env)  # fmt: skip
    assert result.returncode == 2
    assert "checkpoint not found" in result.stderr and "training.train" in result.stderr
