"""Fuzz the handler's decoding path in-process (no server): every input ends in a prediction or our 400.

Inputs reach the handler the way TorchServe 0.12's worker hands them over: the raw body bytes,
decoded by ``ts.protocol.otf_message_handler`` according to the Content-Type (JSON parsed,
``text/*`` as UTF-8, anything else bytes), under the field name ``body`` (raw upload), ``data`` or
``file`` (multipart). ``ImageDecodeError`` is the only exception the decoding functions may raise,
and ``Cifar3Handler.handle`` answers every request of a batch with 200 or 400.

Bounded: at most 300 examples per property, a per-example deadline, no example database writes.
"""

from __future__ import annotations

import base64
import io
import json
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from cifar3.checkpoint import ModelMeta, save_checkpoint
from cifar3.model import VARIANTS, build_model
from cifar3.preprocessing import CIFAR10_MEAN, CIFAR10_STD, ImageDecodeError, decode_image, eval_transform
from handler.cifar3_handler import Cifar3Handler, request_image_bytes

TS_METRICS = Path(sys.modules["ts"].__file__).parent / "configs" / "metrics.yaml"
CLASSES = ["airplane", "automobile", "ship"]
MAX_PIXELS = 4_000_000  # smaller than production's 40 M: keeps each example fast, same code path
FUZZ = settings(max_examples=300, deadline=timedelta(seconds=5), database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
CONTENT_TYPES = ["", "application/octet-stream", "application/json", "APPLICATION/JSON", "image/png",
                 "text/plain", "text/plain; charset=utf-8", "multipart/form-data"]  # fmt: skip


# -- inputs ------------------------------------------------------------------------------------


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _valid_images() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (6, 9, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (7, 5, 4), dtype=np.uint8))
    grey16 = Image.fromarray(rng.integers(0, 65536, (5, 5), dtype=np.uint16))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    frames = [rgb, rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return {
        "png": _encode(rgb, "PNG"),
        "png-rgba": _encode(rgba, "PNG"),
        "png-16bit": _encode(grey16, "PNG"),
        "png-palette-transparent": _encode(palette, "PNG", transparency=0),
        "jpeg": _encode(rgb, "JPEG", quality=80),
        "jpeg-progressive": _encode(rgb, "JPEG", progressive=True),
        "gif-animated": _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=10),
        "bmp": _encode(rgb, "BMP"),
        "webp": _encode(rgb, "WEBP"),
        "tiff": _encode(rgb, "TIFF"),
        "ico": _encode(rgb, "ICO"),
    }


VALID = _valid_images()


@st.composite
def mutated_images(draw) -> bytes:
    """A valid image of some format, then up to 4 truncations, byte flips, insertions, deletions."""
    data = bytearray(VALID[draw(st.sampled_from(sorted(VALID)))])
    for _ in range(draw(st.integers(0, 4))):
        if not data:
            break
        op = draw(st.sampled_from(["truncate", "flip", "flip", "insert", "delete"]))
        pos = draw(st.integers(0, len(data) - 1))
        if op == "truncate":
            del data[pos:]
        elif op == "flip":
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[pos : pos + draw(st.integers(1, 16))]
    return bytes(data)


# Text as JSON can carry it: any code point, lone surrogates included ("\ud800" is valid JSON).
any_text = st.text(st.one_of(st.characters(), st.integers(0xD800, 0xDFFF).map(chr)), max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | any_text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(any_text, children, max_size=3),
    max_leaves=8,
)
image_bytes = st.one_of(st.binary(max_size=2048), mutated_images(), st.sampled_from(sorted(VALID.values())))
json_documents = st.one_of(
    json_values,
    st.fixed_dictionaries({"data": json_values}),
    image_bytes.map(lambda b: {"data": base64.b64encode(b).decode()}),
    image_bytes.map(lambda b: {"data": base64.b64encode(b).decode() + "="}),  # malformed padding
)
# Whole bodies: image-ish bytes, or a JSON document serialized with or without ASCII escapes.
bodies = st.one_of(
    image_bytes,
    st.builds(
        lambda doc, ascii_only: json.dumps(doc, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass"),
        json_documents,
        st.booleans(),
    ),  # fmt: skip
)


def as_torchserve_delivers(body: bytes, content_type: str):
    """The value the worker hands the handler (ts/protocol/otf_message_handler._retrieve_input_data)."""
    if content_type == "application/json":
        try:
            return json.loads(body.decode("utf-8"))
        except Exception:
            return body
    if content_type.startswith("text"):
        try:
            return body.decode("utf-8")
        except Exception:
            return body
    return body


@st.composite
def torchserve_requests(draw) -> tuple[dict, str]:
    """(the request dict a handler gets, the request's Content-Type header)."""
    content_type = draw(st.sampled_from(CONTENT_TYPES))
    field = draw(st.sampled_from(["body", "body", "data", "file", "other"]))
    request = {field: as_torchserve_delivers(draw(bodies), content_type)}
    if draw(st.booleans()):  # extra fields, e.g. more multipart parts
        request.update(draw(st.dictionaries(st.sampled_from(["data", "file", "body", "x"]), json_values, max_size=2)))
    return request, content_type


# -- the handler, initialised for real on a random-weight checkpoint ----------------------------


def make_context(model_dir: Path, headers: list[dict]) -> Context:
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    config = {"handler": {"threads": 1, "max_image_pixels": MAX_PIXELS}}
    context = Context("cifar3", str(model_dir), manifest, 16, None, "0.12.0",
                      metrics=MetricsCacheYamlImpl(str(TS_METRICS)), model_yaml_config=config)  # fmt: skip
    context.request_processor = [RequestProcessor(h) for h in headers]
    return context


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz-model")
    variant = next(iter(VARIANTS))
    torch.manual_seed(0)
    meta = ModelMeta(variant=variant, classes=CLASSES, image_size=32, mean=list(CIFAR10_MEAN), std=list(CIFAR10_STD))
    save_checkpoint(folder / "cifar3.pt", build_model(variant, len(CLASSES)), meta)
    (folder / "MAR-INF").mkdir()
    (folder / "MAR-INF" / "MANIFEST.json").write_text(json.dumps({"model": {"serializedFile": "cifar3.pt"}}))
    return folder


@pytest.fixture(scope="module")
def handler(model_dir) -> Cifar3Handler:
    h = Cifar3Handler()
    h.initialize(make_context(model_dir, [{}]))
    return h


# -- properties --------------------------------------------------------------------------------


@FUZZ
@given(data=image_bytes)
@example(data=b"")
@example(data=b"\x89PNG\r\n\x1a\n")
def test_decode_image_gives_an_rgb_image_or_image_decode_error(data):
    try:
        image = decode_image(data, MAX_PIXELS)
    except ImageDecodeError as exc:
        assert str(exc)
        return
    assert image.mode == "RGB" and image.width * image.height <= MAX_PIXELS
    batch = eval_transform([image], 32, CIFAR10_MEAN, CIFAR10_STD)
    assert batch.shape == (1, 3, 32, 32) and torch.isfinite(batch).all()


@FUZZ
@given(case=torchserve_requests())
@example(case=({"body": "\ud800"}, "application/json"))  # JSON body "\ud800": a lone surrogate
@example(case=({"body": '{"data": 1}'}, "application/json"))
@example(case=({"data": {"data": "\ud800"}}, "application/json"))
def test_request_image_bytes_gives_bytes_or_image_decode_error(case):
    request, content_type = case
    try:
        data = request_image_bytes(request, content_type)
    except ImageDecodeError as exc:
        assert str(exc)
        return
    assert isinstance(data, bytes)


@FUZZ
@given(batch=st.lists(torchserve_requests(), min_size=1, max_size=4))
@example(batch=[({"body": VALID["png"]}, "image/png"), ({"body": "\ud800"}, "application/json")])
def test_handle_answers_every_request_with_a_prediction_or_our_400(handler, model_dir, batch):
    requests = [request for request, _ in batch]
    context = make_context(model_dir, [{"Content-Type": ct} if ct else {} for _, ct in batch])
    answers = handler.handle(requests, context)
    assert len(answers) == len(requests)
    for i, answer in enumerate(answers):
        body = json.loads(answer)
        code = context.request_processor[i].get_response_status_code()
        if code == 400:
            assert set(body) == {"error", "code"} and body["code"] == 400 and body["error"]
        else:
            assert code == 200 and body["pred_class"] in CLASSES
            assert sum(body["probs"].values()) == pytest.approx(1.0, abs=1e-5)


def test_fuzz_inputs_include_every_valid_format_decoding():
    """The seeds the mutations start from are themselves valid images (else the fuzz proves little)."""
    for name, data in VALID.items():
        assert decode_image(data).mode == "RGB", name
