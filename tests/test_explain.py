"""Explanations: right on a data set with a known answer, every method through the real TorchServe.

The correctness test trains a tiny model with the real CLI on images whose class is decided only by a
small coloured square at a random position on colour noise (bench.faithfulness.square_images); the heat
map's peak must then fall on the square. The API tests talk HTTP to the session's TorchServe (conftest's
``server``). How faithful each method is on real images is measured by bench/faithfulness.py, not here.
"""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import requests
import torch
import yaml
from conftest import MODEL_CONFIG, PYTHON, ROOT, run_cli, start_server
from PIL import Image
from synthetic import class_images, encode, sample_image
from test_handler import handle, make_context, model_dir  # noqa: F401  (the fixture, shared)

from bench.faithfulness import square_hits, square_images, train_squares
from cifar3.checkpoint import load_checkpoint
from cifar3.explain import DEFAULT_METHOD, METHODS, build_explainer, scaled, stage_grids
from cifar3.model import build_model
from cifar3.preprocessing import eval_transform
from cifar3_client.client import overlay_heatmap, parse_explanation
from handler.cifar3_handler import Cifar3Handler

CLASSES = ["airplane", "automobile", "ship"]


@pytest.fixture(scope="module")
def square_checkpoint(tmp_path_factory) -> Path:
    """The CPU preset's variant (resnet18_pool) trained by the real CLI on 450 square images (~30 s on 2 cores)."""
    return train_squares(tmp_path_factory.mktemp("squares"), PYTHON)


@pytest.mark.slow
def test_heat_map_peaks_on_the_object(square_checkpoint):
    model, meta = load_checkpoint(square_checkpoint)
    assert meta.variant == "resnet18_pool"
    samples = square_images(40, seed=1)  # images the model never saw
    batch = eval_transform([image for _, image, _ in samples], meta.image_size, meta.mean, meta.std)
    with torch.no_grad():
        predicted = model(batch)[:, : len(meta.classes)].argmax(1)
    labels = torch.tensor([meta.classes.index(name) for name, _, _ in samples])
    assert (predicted == labels).float().mean() >= 0.9  # the model learnt the squares
    hits = {m: square_hits(model, meta, m, samples) for m in (DEFAULT_METHOD, "grad-cam-layer2", "grad-cam-layer4")}
    # A peak falls on the square by chance for 64 of 1024 pixels (6%). Grad-CAM's 8 x 8 cells find the square
    # itself; a pixel map's peak may fall at its edge, where the colour meets the noise: 4x chance is asked.
    assert hits["grad-cam-layer2"] >= 0.8 * len(samples), hits
    assert hits[DEFAULT_METHOD] >= 0.25 * len(samples), hits
    # The last stage of this variant has 2 x 2 cells: too coarse to point at an 8 x 8 object.
    assert hits["grad-cam-layer4"] < hits["grad-cam-layer2"], hits


@pytest.mark.slow
def test_every_method_maps_each_image_on_its_own(square_checkpoint):
    """Each method answers one N x 32 x 32 map in [0, 1] per image, the same alone as in a batch."""
    model, meta = load_checkpoint(square_checkpoint)
    images = [image for _, image, _ in square_images(1, seed=2)][1:]
    batch = eval_transform(images, meta.image_size, meta.mean, meta.std)
    targets = [2, 0]
    for method in METHODS:
        explainer = build_explainer(model, meta, method)
        together = explainer.heatmaps(batch, targets)
        assert together.shape == (2, 32, 32) and together.min() >= 0 and together.max() <= 1, method
        alone = explainer.heatmaps(batch[1:], targets[1:])[0]
        assert torch.allclose(alone, together[1], atol=1e-4), method
    with pytest.raises(ValueError, match="1 targets for 2 images"):
        explainer.heatmaps(batch, [0])
    with pytest.raises(ValueError, match="class indices below 3"):
        explainer.heatmaps(batch, [0, 3])  # the other-class output is never explained


@pytest.mark.parametrize(("variant", "grids"), [("resnet18_pool", [16, 8, 4, 2]), ("resnet18_cifar", [32, 16, 8, 4])])
def test_grad_cam_grids_follow_the_stem(variant, grids):
    assert list(stage_grids(build_model(variant, 3).eval(), 32).values()) == grids


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
    assert {k: body[k] for k in prediction} == prediction  # the served prediction, unchanged
    explanation = body["explanation"]
    # model-config's handler.explanation serves a request that names no method
    assert explanation["method"] == MODEL_CONFIG["handler"]["explanation"] == DEFAULT_METHOD
    assert explanation["target"] == prediction["pred_class"] and explanation["grid"] == 32
    heatmap = torch.tensor(explanation["heatmap"])
    assert heatmap.shape == (32, 32) and heatmap.min() >= 0 and heatmap.max() == 1
    parse_explanation(body)  # what the UI's client reads
    # the same map as the core computes in-process from the same checkpoint and preprocessing
    model, meta = load_checkpoint(tiny_checkpoint)
    batch = eval_transform([sample_image("ship")], meta.image_size, meta.mean, meta.std)
    expected = build_explainer(model, meta, DEFAULT_METHOD).heatmaps(batch, [CLASSES.index(explanation["target"])])
    assert torch.allclose(heatmap, expected[0], atol=2e-3)
    described = server.client().describe(customized=True)["customizedMetadata"]["explanation"]
    assert described == {"default": DEFAULT_METHOD, "methods": list(METHODS)}


@pytest.mark.server
def test_every_method_answers_a_map_of_the_image_size(server):
    """Each method by name, as a JSON key and as a multipart field, for a class image and for an image of none of
    the classes (explained for the class it resembles most, the answer saying it is unknown)."""
    image = encode(sample_image("airplane"), "PNG")
    grey = encode(Image.fromarray(class_images("grey", 1, seed=5)[0]), "PNG")
    prediction = post(server, "predictions", data=image).json()
    for method in METHODS:
        by_json = post(server, **as_json(image, method=method, target="ship"))
        assert by_json.status_code == 200, (method, by_json.text)
        body = by_json.json()
        assert {k: body[k] for k in prediction} == prediction  # the served prediction, unchanged
        explanation = body["explanation"]
        assert (explanation["method"], explanation["target"], explanation["grid"]) == (method, "ship", 32)
        heatmap = torch.tensor(explanation["heatmap"])
        assert heatmap.shape == (32, 32) and heatmap.min() >= 0 and heatmap.max() <= 1, method
        unknown = post(server, files={"data": ("grey.png", grey, "image/png")}, data={"method": method}).json()
        assert unknown["unknown"] is True and unknown["explanation"]["method"] == method
        assert unknown["explanation"]["target"] == unknown["pred_class"]
        assert torch.tensor(unknown["explanation"]["heatmap"]).shape == (32, 32)


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
    for unknown in ("grad-cam", "", "Occlusion"):
        for response in (
            post(server, **as_json(image, method=unknown)),
            post(server, files={"data": ("s.png", image, "image/png")}, data={"method": unknown}),
        ):
            assert response.status_code == 400, response.text
            assert response.json() == {
                "error": f"unknown explanation method {unknown!r}: choose one of {', '.join(METHODS)}",
                "code": 400,
            }


def test_a_failing_method_costs_only_its_requests(model_dir):  # noqa: F811  (pytest fixture)
    """The handler in-process with TorchServe's own Context: one method's explainer breaks (a fault put into it
    here; nothing in the served methods fails on purpose); the requests for it get 500, the same batch's other
    explanations, predictions and bad requests get their own answers."""
    handler = Cifar3Handler()
    handler.initialize(make_context(model_dir))
    image = {"data": {"data": base64.b64encode(encode(sample_image("ship"), "PNG")).decode()}}
    occlusion = {"data": {**image["data"], "method": "occlusion"}}
    codes, _ = handle(handler, model_dir, [occlusion], [{"explain": "True"}])  # builds the occlusion explainer
    assert codes == [200]

    def fail(batch):
        raise RuntimeError("broken on purpose")

    handler.explainers["occlusion"].probs = fail
    requests_ = [
        {"data": {**image["data"], "method": "occlusion"}},
        image,
        {"data": {**image["data"], "method": "feature-ablation"}},
        {"data": {**image["data"], "method": "nope"}},
        image,
    ]
    explain = {"explain": "True"}
    codes, bodies = handle(handler, model_dir, requests_, [explain, explain, explain, explain, {}])
    assert codes == [500, 200, 200, 400, 200]
    assert bodies[0] == {"error": "the explanation failed on the server; see its model_log.log", "code": 500}
    assert bodies[1]["explanation"]["method"] == DEFAULT_METHOD
    assert bodies[2]["explanation"]["method"] == "feature-ablation"
    assert "unknown explanation method 'nope'" in bodies[3]["error"]
    assert "explanation" not in bodies[4] and bodies[4]["pred_class"] == bodies[1]["pred_class"]


def test_a_misspelt_method_in_model_config_stops_the_load(model_dir):  # noqa: F811  (pytest fixture)
    context = make_context(model_dir)
    context.model_yaml_config["handler"]["explanation"] = "gradcam"
    with pytest.raises(ValueError, match="unknown explanation method 'gradcam': choose one of grad-cam-layer1"):
        Cifar3Handler().initialize(context)


@pytest.mark.server
def test_mixed_concurrent_batches_answer_each_request_its_own_way(server):
    """Predictions, explanations and bad requests sent together share TorchServe's batches; each gets its answer."""
    images = [encode(sample_image(CLASSES[i % 3], seed=40 + i)) for i in range(24)]
    alone = {i: post(server, data=images[i]).json() for i in (1, 5, 9)}

    def send(i: int) -> tuple[int, requests.Response]:
        kind = i % 4
        if kind == 0:
            return i, post(server, "predictions", data=images[i])
        if kind == 3:
            return i, post(server, **as_json(b"not an image", target="ship"))
        if kind == 2:
            return i, post(server, **as_json(images[i], method="feature-ablation"))
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
        if kind == 2:
            assert body["explanation"]["method"] == "feature-ablation"
        if i in alone:
            together, by_itself = (torch.tensor(b["explanation"]["heatmap"]) for b in (body, alone[i]))
            assert torch.allclose(together, by_itself, atol=2e-3)


@pytest.mark.server
def test_serve_py_explain_writes_the_overlay(server, tmp_path):
    image = tmp_path / "ship.png"
    sample_image("ship", size=64).save(image)
    out = tmp_path / "overlay.png"
    result = run_cli(*server.command(), "explain", str(image), "--out", str(out), "--target", "automobile",
                     "--method", "occlusion")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "occlusion for 'automobile'" in result.stdout and str(out) in result.stdout
    with Image.open(out) as overlay:
        assert overlay.format == "PNG" and overlay.size == (256, 256)
    result = run_cli(*server.command(), "explain", str(image), "--out", str(tmp_path / "x.png"), "--target", "cat")
    assert result.returncode == 1 and "unknown target class 'cat'" in result.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.server
@pytest.mark.slow
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
        assert {k: body[k] for k in prediction} == prediction
        model, meta = load_checkpoint(tiny_checkpoint)
        batch = eval_transform([sample_image("ship")], meta.image_size, meta.mean, meta.std)
        target = CLASSES.index(body["explanation"]["target"])
        expected = build_explainer(model, meta, DEFAULT_METHOD).heatmaps(batch, [target])[0]
        assert torch.allclose(torch.tensor(body["explanation"]["heatmap"]), expected, atol=2e-3)
        # occlusion's masked copies run on the serving engine, here ONNX Runtime's float32 model
        occluded = post(server, **as_json(image, method="occlusion")).json()["explanation"]["heatmap"]
        expected = build_explainer(model, meta, "occlusion").heatmaps(batch, [target])[0]
        assert torch.allclose(torch.tensor(occluded), expected, atol=1e-2)
    finally:
        server.stop()


@pytest.mark.cli
@pytest.mark.parametrize("method", ["input-x-gradient", "grad-cam-layer2", "occlusion"])
def test_a_test_flip_checkpoint_is_explained_as_it_answers(tiny_checkpoint, method):
    """Answers average each image with its mirror image, so they are the same for both: the explanation of the
    mirror image must be the explanation mirrored. The network alone is not symmetric: one view's map is not."""
    model, meta = load_checkpoint(tiny_checkpoint)
    assert meta.test_flip
    batch = eval_transform([sample_image("ship"), sample_image("airplane", seed=1)], meta.image_size, meta.mean,
                           meta.std)  # fmt: skip
    targets = [CLASSES.index("ship"), CLASSES.index("airplane")]
    explainer = build_explainer(model, meta, method)
    assert explainer.describe()["test_flip"] is True
    maps = explainer.heatmaps(batch, targets)
    assert torch.allclose(explainer.heatmaps(batch.flip(-1), targets), maps.flip(-1), atol=1e-3)
    if method == "input-x-gradient":  # the gradient of the averaged logit: the mean of each view's, mirrored back
        from captum.attr import InputXGradient

        def one_view_attributions(views: torch.Tensor) -> torch.Tensor:
            return InputXGradient(model).attribute(views.clone().requires_grad_(), target=targets).sum(1).detach()

        both = (one_view_attributions(batch) + one_view_attributions(batch.flip(-1)).flip(-1)) / 2
        assert torch.allclose(maps, scaled(both), atol=1e-4)
    one_view = build_explainer(model, replace(meta, test_flip=False), method)
    assert not torch.allclose(one_view.heatmaps(batch.flip(-1), targets), one_view.heatmaps(batch, targets).flip(-1),
                              atol=1e-2)  # fmt: skip
