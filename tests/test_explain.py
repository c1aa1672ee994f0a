"""Grad-CAM explanations: right on a data set with a known answer, and through the real TorchServe.

The correctness test trains a tiny model with the real CLI on images whose class is decided only by a
small coloured square at a random position on colour noise; the heat map's peak must then fall on the
square. The API tests talk HTTP to the session's TorchServe (conftest's ``server``).
"""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import yaml
from conftest import MODEL_CONFIG, PYTHON, ROOT, run_cli, start_server
from PIL import Image
from synthetic import encode, sample_image

from cifar3.checkpoint import load_checkpoint
from cifar3.explain import GradCam, default_layer, stage_grids
from cifar3.model import build_model
from cifar3.preprocessing import eval_transform
from ui.client import overlay_heatmap, parse_explanation

CLASSES = ["airplane", "automobile", "ship"]
SQUARE = 8  # pixels per side of the object that decides the class
SQUARE_COLOURS = {"airplane": (230, 40, 40), "automobile": (40, 220, 40), "ship": (40, 40, 230)}


def square_images(count: int, seed: int) -> list[tuple[str, Image.Image, tuple[int, int]]]:
    """(class, image, (top, left) of its square) for count images per class: colour noise plus one square."""
    rng = np.random.default_rng(seed)
    out = []
    for name, colour in SQUARE_COLOURS.items():
        for _ in range(count):
            pixels = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
            top, left = (int(v) for v in rng.integers(0, 32 - SQUARE + 1, 2))
            pixels[top : top + SQUARE, left : left + SQUARE] = colour
            out.append((name, Image.fromarray(pixels), (top, left)))
    return out


@pytest.fixture(scope="module")
def square_checkpoint(tmp_path_factory) -> Path:
    """The CPU preset's variant (resnet18_pool) trained by the real CLI on 450 square images (~30 s on 2 cores)."""
    folder = tmp_path_factory.mktemp("squares")
    for i, (name, image, _) in enumerate(square_images(150, seed=0)):
        (folder / name).mkdir(exist_ok=True)
        image.save(folder / name / f"{i:04d}.png")
    out = folder / "squares.pt"
    result = run_cli(PYTHON, "-m", "training.train", "--data", str(folder), "--out", str(out), "--preset", "cpu",
                     "--epochs", "4", "--batch-size", "32", "--lr", "0.05", "--device", "cpu")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_heat_map_peaks_on_the_object(square_checkpoint):
    model, meta = load_checkpoint(square_checkpoint)
    assert meta.variant == "resnet18_pool"
    samples = square_images(40, seed=1)  # images the model never saw
    batch = eval_transform([image for _, image, _ in samples], meta.image_size, meta.mean, meta.std)
    with torch.no_grad():
        predicted = model(batch).argmax(1)
    labels = torch.tensor([meta.classes.index(name) for name, _, _ in samples])
    assert (predicted == labels).float().mean() >= 0.9  # the model learnt the squares
    cam = GradCam(model, meta.image_size)
    assert (cam.layer, cam.grid) == ("layer2", 8)
    maps = cam.heatmaps(batch, predicted.tolist())
    assert maps.shape == (len(samples), 32, 32) and maps.min() >= 0 and maps.max() <= 1
    hits = 0
    for heatmap, (_, _, (top, left)) in zip(maps, samples, strict=True):
        row, col = divmod(int(heatmap.argmax()), 32)
        hits += top <= row < top + SQUARE and left <= col < left + SQUARE
    assert hits / len(samples) >= 0.8, f"peak on the square for {hits} of {len(samples)} images"
    # The last stage of this variant has 2 x 2 cells: too coarse to point at an 8 x 8 object.
    coarse = GradCam(model, meta.image_size, layer="layer4").heatmaps(batch, predicted.tolist())
    coarse_hits = sum(
        top <= divmod(int(h.argmax()), 32)[0] < top + SQUARE and left <= divmod(int(h.argmax()), 32)[1] < left + SQUARE
        for h, (_, _, (top, left)) in zip(coarse, samples, strict=True)
    )
    assert coarse_hits < hits


def test_each_map_is_independent_of_its_batch(square_checkpoint):
    model, meta = load_checkpoint(square_checkpoint)
    images = [image for _, image, _ in square_images(3, seed=2)]
    batch = eval_transform(images, meta.image_size, meta.mean, meta.std)
    cam = GradCam(model, meta.image_size)
    targets = [i % 3 for i in range(len(images))]
    together = cam.heatmaps(batch, targets)
    for i in range(len(images)):
        assert torch.allclose(cam.heatmaps(batch[i : i + 1], targets[i : i + 1])[0], together[i], atol=1e-5)
    with pytest.raises(ValueError, match="2 targets for 9 images"):
        cam.heatmaps(batch, [0, 1])


@pytest.mark.parametrize(("variant", "layer"), [("resnet18_pool", "layer2"), ("resnet18_fast", "layer2"),
                                                ("resnet18_cifar", "layer3"),
                                                ("resnet18_imagenet", "layer1")])  # fmt: skip
def test_default_layer_keeps_an_8x8_grid(variant, layer):
    model = build_model(variant, 3).eval()
    assert default_layer(model, 32) == layer and stage_grids(model, 32)[layer] == 8


def test_overlay_is_the_image_tinted_by_the_heat_map():
    image = Image.new("RGB", (32, 32), (128, 128, 128))
    heatmap = [[1.0 if c >= 16 else 0.0 for c in range(32)] for _ in range(32)]
    overlay = overlay_heatmap(encode(image), heatmap, alpha=0.5, size=128)
    assert overlay.size == (128, 128)
    hot, cold = overlay.getpixel((120, 64)), overlay.getpixel((8, 64))
    assert hot[0] > hot[2] and cold[2] > cold[0]  # red where the heat is 1, blue where it is 0


# ---------------------------------------------------------------- through the real TorchServe


def explain_url(server) -> str:
    return f"{server.inference_url}/explanations/{server.model}"


def post(server, path: str = "explanations", **kwargs) -> requests.Response:
    headers = server.headers() | kwargs.pop("headers", {})
    return requests.post(f"{server.inference_url}/{path}/{server.model}", headers=headers, timeout=120, **kwargs)


def as_json(image: bytes, **extra) -> dict:
    return {"json": {"data": base64.b64encode(image).decode(), **extra}}


@pytest.mark.server
def test_explanations_api_answers_every_input_form(server, tiny_checkpoint):
    image = encode(sample_image("ship"), "PNG")
    prediction = post(server, "predictions", data=image).json()
    answers = [
        post(server, data=image, headers={"Content-Type": "application/octet-stream"}),
        post(server, files={"data": ("ship.png", image, "image/png")}),
        post(server, **as_json(image)),
    ]
    bodies = []
    for response in answers:
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"].startswith("application/json")
        bodies.append(response.json())
    assert all(body == bodies[0] for body in bodies)
    body = bodies[0]
    assert {k: body[k] for k in ("pred_class", "probs")} == prediction  # the served prediction, unchanged
    explanation = body["explanation"]
    assert explanation["method"] == "grad-cam" and explanation["target"] == prediction["pred_class"]
    assert (explanation["layer"], explanation["layer_grid"], explanation["grid"]) == ("layer2", 8, 32)
    heatmap = torch.tensor(explanation["heatmap"])
    assert heatmap.shape == (32, 32) and heatmap.min() >= 0 and heatmap.max() == 1
    parse_explanation(body)  # what the UI's client reads
    # the same map as the core computes in-process from the same checkpoint and preprocessing
    model, meta = load_checkpoint(tiny_checkpoint)
    batch = eval_transform([sample_image("ship")], meta.image_size, meta.mean, meta.std)
    expected = GradCam(model, meta.image_size).heatmaps(batch, [CLASSES.index(explanation["target"])])[0]
    assert torch.allclose(heatmap, expected, atol=2e-3)


@pytest.mark.server
def test_the_class_to_explain_can_be_named(server):
    image = encode(sample_image("airplane"), "PNG")
    maps = {}
    for target in CLASSES:
        by_form = post(server, files={"data": ("a.png", image, "image/png")}, data={"target": target})
        by_json = post(server, **as_json(image, target=target))
        assert by_form.status_code == by_json.status_code == 200, by_form.text + by_json.text
        assert by_form.json() == by_json.json() and by_json.json()["explanation"]["target"] == target
        maps[target] = by_json.json()["explanation"]["heatmap"]
    assert maps["airplane"] != maps["ship"]


@pytest.mark.server
def test_bad_input_gets_the_same_400_as_predictions(server):
    image = encode(sample_image("ship"), "PNG")
    for body in (b"definitely not an image", b""):
        explained = post(server, data=body, headers={"Content-Type": "application/octet-stream"})
        predicted = post(server, "predictions", data=body, headers={"Content-Type": "application/octet-stream"})
        assert explained.status_code == predicted.status_code == 400
        assert explained.json() == predicted.json() and explained.json()["code"] == 400
    for unknown in ("cat", "", "Ship"):
        response = post(server, **as_json(image, target=unknown))
        assert response.status_code == 400, response.text
        assert response.json() == {
            "error": f"unknown target class {unknown!r}: choose one of airplane, automobile, ship",
            "code": 400,
        }


@pytest.mark.server
def test_mixed_concurrent_batches_answer_each_request_its_own_way(server):
    """Predictions, explanations and bad requests sent together share TorchServe's batches; each gets its answer."""
    images = [encode(sample_image(CLASSES[i % 3], seed=40 + i)) for i in range(24)]
    alone = {i: post(server, data=images[i]).json() for i in (1, 2, 5)}

    def send(i: int) -> tuple[int, requests.Response]:
        kind = i % 4
        if kind == 0:
            return i, post(server, "predictions", data=images[i])
        if kind == 3:
            return i, post(server, **as_json(b"not an image", target="ship"))
        return i, post(server, data=images[i])

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(send, range(24)))
    for i, response in results:
        kind = i % 4
        if kind == 3:
            assert response.status_code == 400 and "not an image" in response.json()["error"]
            continue
        assert response.status_code == 200, response.text
        body = response.json()
        assert ("explanation" in body) == (kind != 0)
        if i in alone:
            together, by_itself = (torch.tensor(b["explanation"]["heatmap"]) for b in (body, alone[i]))
            assert torch.allclose(together, by_itself, atol=2e-3)


@pytest.mark.server
def test_serve_py_explain_writes_the_overlay(server, tmp_path):
    image = tmp_path / "ship.png"
    sample_image("ship", size=64).save(image)
    out = tmp_path / "overlay.png"
    result = run_cli(*server.command(), "explain", str(image), "--out", str(out), "--target", "automobile")
    assert result.returncode == 0, result.stderr
    assert "grad-cam for 'automobile'" in result.stdout and str(out) in result.stdout
    with Image.open(out) as overlay:
        assert overlay.format == "PNG" and overlay.size == (256, 256)
    result = run_cli(*server.command(), "explain", str(image), "--out", str(tmp_path / "x.png"), "--target", "cat")
    assert result.returncode == 1 and "unknown target class 'cat'" in result.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.server
def test_explanations_work_when_onnx_runtime_serves_predictions(tiny_checkpoint, tmp_path):
    """The explainer is a PyTorch model of its own: predictions from ONNX Runtime, heat maps as with torch."""
    config = MODEL_CONFIG | {
        "minWorkers": 1,
        "maxWorkers": 1,
        "handler": MODEL_CONFIG["handler"] | {"engine": "onnxruntime"},
    }
    (tmp_path / "model-config.yaml").write_text(yaml.safe_dump(config))
    store = tmp_path / "store"
    result = run_cli("bash", str(ROOT / "scripts" / "archive.sh"), str(tiny_checkpoint),
                     env={"MODEL_STORE": str(store), "MODEL_CONFIG": str(tmp_path / "model-config.yaml")})  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    server = start_server(tmp_path / "server", store)
    try:
        assert server.client().describe(customized=True)["customizedMetadata"]["engine"] == "onnxruntime"
        image = encode(sample_image("ship"), "PNG")
        prediction = post(server, "predictions", data=image).json()
        response = post(server, data=image)
        assert response.status_code == 200, response.text
        body = response.json()
        assert {k: body[k] for k in ("pred_class", "probs")} == prediction
        model, meta = load_checkpoint(tiny_checkpoint)
        batch = eval_transform([sample_image("ship")], meta.image_size, meta.mean, meta.std)
        target = CLASSES.index(body["explanation"]["target"])
        expected = GradCam(model, meta.image_size).heatmaps(batch, [target])[0]
        assert torch.allclose(torch.tensor(body["explanation"]["heatmap"]), expected, atol=2e-3)
    finally:
        server.stop()
