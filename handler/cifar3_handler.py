"""TorchServe handler for cifar3: image bytes in, {"pred_class", "probs", "unknown", "unknown_score"} out, per request.

A thin adapter. The model, its preprocessing, the inference engine and the calibrated probabilities come
from the serving core (the ``cifar3`` package) that scripts/archive.sh packs into the .mar beside this file;
every constant (classes, image size, mean/std, temperature, the unknown-image threshold) is read from the
checkpoint's metadata. ``unknown`` says the image looks like none of the classes (cifar3/unknown.py): its
``unknown_score`` is above the checkpoint's threshold, or ``handler.unknown_threshold`` in model-config.yaml.

Accepted request forms: a raw body (``curl -T img.jpg`` / ``--data-binary @img.jpg``), a multipart
form field ``data`` or ``file``, or a JSON body ``{"data": "<base64 image>"}``. A request that is not
a usable image gets HTTP 400 with ``{"error": ..., "code": 400}``; the other requests of the same
batch are answered normally.

Explanations (``POST /explanations/cifar3``, which TorchServe routes here with the request header
``explain: True``) take the same three forms and answer the prediction plus ``"explanation"``: a heat map
(cifar3/explain.py) for the predicted class, or for the class named by ``target``, by model-config's
``handler.explanation`` method or the one named by ``method``: multipart fields (``-F data=@img.jpg -F
target=ship -F method=occlusion``) or JSON keys (``{"data": "<base64>", "target": "ship"}``). TorchServe 0.12
does not pass a URL's query string to the handler, so a raw body always explains the predicted class by the
configured method. An unknown class or method gets HTTP 400. Explanation and prediction requests may share a
batch; a method that fails costs only the requests that asked for it.

Under KServe (``TS_SERVICE_ENVELOPE=kserve`` or ``kservev2``, docs/deployment.md) TorchServe's envelope hands
over the instances of a v1 body ``{"instances": [{"data": "<base64>"}]}`` or the BYTES inputs of an Open
Inference Protocol (v2) body; see ``handle_kserve``. TorchServe routes ``/v1/models/cifar3:explain`` and
``/v2/models/cifar3/explain`` there with ``explain: True``: each answer then carries its explanation (a v1
instance may name ``target`` and ``method`` beside ``data``).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import time

import torch
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException

from cifar3.checkpoint import load_checkpoint
from cifar3.engine import ONNX_FILE, ONNX_FILES, load_engine
from cifar3.explain import DEFAULT_METHOD, METHODS, check_method
from cifar3.preprocessing import MAX_IMAGE_PIXELS, ImageDecodeError, decode_image, normalize, pil_to_uint8
from cifar3.timing import StageTimer
from cifar3.unknown import decision

logger = logging.getLogger(__name__)

INPUT_FIELDS = ("data", "file", "body")  # where an image may arrive, in this order of preference
TARGET_FIELD = "target"  # the class to explain: multipart field or JSON key
METHOD_FIELD = "method"  # how to explain it (cifar3.explain.METHODS): multipart field or JSON key
JSON_CONTENT_TYPE = "application/json"
DATA_URL_PREFIX = re.compile(r"^data:[^,]*;base64,", re.IGNORECASE)  # what a browser's FileReader prepends


def base64_image(encoded: str, message: str) -> bytes:
    """The bytes of base64 as people send it: strict, but a data: URL's prefix and line breaks (base64 without
    -w0, openssl, encodebytes) are not errors. ImageDecodeError(message) when it is not base64."""
    encoded = "".join(DATA_URL_PREFIX.sub("", encoded.lstrip(), count=1).split())
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ImageDecodeError(message) from None


def request_image_bytes(request: dict, content_type: str = "") -> bytes:
    """The image bytes of one TorchServe request, or ImageDecodeError saying what is wrong."""
    for field in INPUT_FIELDS:
        value = request.get(field)
        if value is None:
            continue
        if isinstance(value, dict):  # a JSON body TorchServe already parsed
            encoded = value.get("data")
            if not isinstance(encoded, str):
                raise ImageDecodeError('JSON body must be {"data": "<base64-encoded image>"}')
            return base64_image(encoded, 'malformed base64 in the JSON "data" field')
        if isinstance(value, list):
            raise ImageDecodeError('JSON body must be an object {"data": "<base64-encoded image>"}, not a list')
        if isinstance(value, (str, int, float)) and JSON_CONTENT_TYPE in content_type.lower():
            # valid JSON, but a bare string/number/true/false rather than an object
            raise ImageDecodeError('JSON body must be an object {"data": "<base64-encoded image>"}')
        if isinstance(value, str):  # text/* bodies arrive decoded as UTF-8 (lone surrogates kept as they came)
            value = value.encode("utf-8", "surrogatepass")
        if isinstance(value, (bytes, bytearray)):
            if JSON_CONTENT_TYPE in content_type.lower():
                raise ImageDecodeError("malformed JSON body: it is not valid JSON")
            return bytes(value)
        raise ImageDecodeError(f"unsupported {field!r} value of type {type(value).__name__}")
    raise ImageDecodeError(
        "no image in the request: send the image as the body, as multipart field 'data' or 'file', "
        'or as JSON {"data": "<base64>"}'
    )


def request_field(request: dict, field: str) -> str | None:
    """A text field of an explanation request: a JSON body's key or a multipart field (None: not given)."""
    body = next((request[f] for f in INPUT_FIELDS if isinstance(request.get(f), dict)), {})
    value = body.get(field, request.get(field))
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", "replace")
    return str(value).strip()


def explain_method(request: dict, default: str) -> str:
    """The explanation method a request asks for (``default`` when it names none), or ValueError."""
    name = request_field(request, METHOD_FIELD)
    return default if name is None else check_method(name)


def explain_target(request: dict, classes: list[str]) -> int | None:
    """The index of the class a request asks to explain (None: the predicted one), or ValueError."""
    name = request_field(request, TARGET_FIELD)
    if name is None:
        return None
    if name not in classes:
        raise ValueError(f"unknown target class {name[:100]!r}: choose one of {', '.join(classes)}")
    return classes.index(name)


# TorchServe's KServe envelopes (TS_SERVICE_ENVELOPE, which KServe's TorchServe runtime sets): the handler
# gets the v1 "instances" or the v2 "inputs" of one request instead of TorchServe's requests.
KSERVE_ENVELOPES = ("kserve", "kservev2")
V1_INSTANCE = '{"data": "<base64 image>"}'
V2_INPUT = '{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["<base64 image>"]}'


def envelope_image_bytes(item, envelope: str) -> bytes:
    """The image bytes of one v1 instance or v2 input as TorchServe's envelope hands it over, or ImageDecodeError."""
    if envelope == "kservev2":
        if not isinstance(item, dict) or item.get("datatype") != "BYTES":
            raise ImageDecodeError(f"each v2 input must be {V2_INPUT}")
        # The kservev2 envelope keeps only data[0] of an input: more images in one input would be lost.
        if item.get("shape") not in ([1], [-1]):
            raise ImageDecodeError(f"one image per v2 input, shape [1] (send more images as more inputs): {V2_INPUT}")
        encoded = item.get("data")
    else:
        encoded = item.get("data") if isinstance(item, dict) else None
        if not isinstance(encoded, str):
            raise ImageDecodeError(f"each v1 instance must be {V1_INSTANCE}")
    if not isinstance(encoded, str):
        raise ImageDecodeError(f"the image must be a base64 string: {V2_INPUT}")
    return base64_image(encoded, "malformed base64 image data")


def error_body(message: str, code: int = 400) -> str:
    return json.dumps({"error": message, "code": code})


class Cifar3Handler(BaseHandler):
    """ResNet18 classifier over the classes its checkpoint names."""

    def initialize(self, context):
        properties = context.system_properties
        self.manifest = context.manifest
        self.model_yaml_config = context.model_yaml_config or {}
        options = self.model_yaml_config.get("handler", {}) or {}
        gpu_id = properties.get("gpu_id")
        use_cuda = torch.cuda.is_available() and gpu_id is not None
        self.device = torch.device(f"cuda:{gpu_id}" if use_cuda else "cpu")
        model_dir = properties["model_dir"]
        self.requested_engine = str(options.get("engine", "auto"))
        # cifar3/engine.py decides what "auto" means here, exactly as training.evaluate --engine does.
        self.engine, self.meta = load_engine(
            os.path.join(model_dir, self.manifest["model"]["serializedFile"]),
            self.requested_engine,
            device=self.device,
            dtype=str(options.get("dtype", "auto")),
            threads=options.get("threads"),
            onnx_path=os.path.join(model_dir, ONNX_FILES.get(self.requested_engine, ONNX_FILE)),
        )
        self.max_pixels = int(options.get("max_image_pixels", MAX_IMAGE_PIXELS))
        self.unknown_rule = decision(self.meta.unknown, options.get("unknown_threshold"))
        # A misspelt method in model-config fails the load here, with the list of methods, not every request.
        self.explanation_method = check_method(str(options.get("explanation", DEFAULT_METHOD)))
        self.explainers = {}  # method -> Explainer, each built by explainer() on its first request
        # KServe's TorchServe runtime sets the envelope for the whole process; read once, not per batch.
        self.envelope = os.environ.get("TS_SERVICE_ENVELOPE", "")
        # One forward pass now, so the first real request does not pay for lazy initialisation.
        self.inference(torch.zeros(1, 3, self.meta.image_size, self.meta.image_size))
        self.initialized = True
        logger.info("cifar3 model ready: %s, classes %s, %s", self.meta.variant, self.meta.classes,
                    self.engine.describe())  # fmt: skip

    def _content_type(self, idx: int) -> str:
        for name in ("Content-Type", "content-type"):
            value = self.context.get_request_header(idx, name) if self.context else None
            if value:
                return str(value)
        return ""

    def model_sized(self, data: bytes) -> torch.Tensor:
        """Image bytes -> the uint8 3 x size x size tensor the model's batch stacks, or ImageDecodeError. Shrunk
        as soon as decoded: a batch holds model-sized tensors, never several full-size photos at a time."""
        return pil_to_uint8(decode_image(data, self.max_pixels), self.meta.image_size)

    def preprocess(self, data):
        """(normalized batch of the good requests or None, {request index: error message})."""
        images, errors = [], {}
        for idx, request in enumerate(data):
            try:
                images.append(self.model_sized(request_image_bytes(request, self._content_type(idx))))
            except ImageDecodeError as exc:
                errors[idx] = str(exc)
            except Exception:  # a bug must cost one request, never its whole batch
                logger.exception("unexpected error decoding request %d", idx)
                errors[idx] = "the image could not be decoded"
        batch = normalize(torch.stack(images), self.meta.mean, self.meta.std) if images else None
        return batch, errors

    def inference(self, data, *args, **kwargs):
        """(calibrated N x C class probabilities, N unknown scores) of a normalized batch."""
        return self.meta.scores(self.engine(data))

    def postprocess(self, data):
        classes, rule = self.meta.classes, self.unknown_rule
        probs, scores = data
        return [
            {
                "pred_class": classes[int(row.argmax())],
                "probs": {c: float(p) for c, p in zip(classes, row.tolist(), strict=True)},
                "unknown": rule.is_unknown(score),
                "unknown_score": score,  # unrounded: the decision compares exactly this number
            }
            for row, score in zip(probs, scores.tolist(), strict=True)
        ]

    def handle(self, data, context):
        """One answer per request of the batch. Overrides BaseHandler.handle, which fails the whole batch on any
        exception, so that a bad image or a failed explanation costs only its own request."""
        started = time.perf_counter()
        self.context = context
        if self._is_describe():
            return [self.describe_handle()]
        if self.envelope in KSERVE_ENVELOPES:
            return self.handle_kserve(data, context, self.envelope)
        stages = StageTimer()
        with stages("DecodeTime"):
            batch, errors = self.preprocess(data)
        decoded = [idx for idx in range(len(data)) if idx not in errors]
        answers = {}
        if batch is not None:
            with stages("ForwardTime"):
                outputs = self.inference(batch)
            with stages("PostprocessTime"):
                answers = dict(zip(decoded, self.postprocess(outputs), strict=True))
        failed = {}  # request index -> message, for explanations that failed on the server's side
        explain = [idx for idx in decoded if context.get_request_header(idx, "explain") == "True"]
        if explain:
            self.add_explanations(data, batch, decoded, explain, answers, errors, failed)
        responses = []
        for idx in range(len(data)):
            context.set_response_content_type(idx, JSON_CONTENT_TYPE)
            if idx in errors:
                context.set_response_status(400, "Bad Request", idx)
                responses.append(error_body(errors[idx]))
            elif idx in failed:
                context.set_response_status(500, "Internal Server Error", idx)
                responses.append(error_body(failed[idx], 500))
            else:
                responses.append(json.dumps(answers[idx]))
        # Counters for Prometheus (config.properties: model_metrics_auto_detect=true); their ratio is
        # the mean dynamic batch size.
        metrics = context.metrics
        metrics.add_counter("InferenceBatches", 1)
        metrics.add_counter("ImagesClassified", len(data) - len(errors))
        metrics.add_counter("ImagesRejected", len(errors))
        metrics.add_time("HandlerTime", round((time.perf_counter() - started) * 1000, 2), None, "ms")
        stages.report(metrics)
        return responses

    def handle_kserve(self, data, context, envelope):
        """The answers to one KServe request: a list, one answer per v1 instance (TorchServe's kserve envelope
        wraps it in {"predictions": [...]}), or one JSON string per v2 input (the kservev2 envelope makes each a
        BYTES output named after its input). A bad instance or input fails the whole request with HTTP 400
        and a JSON message naming it; the envelopes answer once per request, so no other request shares it."""
        items, kind = data or [], "input" if envelope == "kservev2" else "instance"
        images, errors = [], []
        for idx, item in enumerate(items):
            try:
                images.append(self.model_sized(envelope_image_bytes(item, envelope)))
            except ImageDecodeError as exc:
                errors.append(f"{kind} {idx}: {exc}")
        if not items:
            errors.append(f"no {kind}s in the request: send {V2_INPUT if kind == 'input' else V1_INSTANCE}")
        metrics = context.metrics
        metrics.add_counter("InferenceBatches", 1)
        metrics.add_counter("ImagesRejected", len(errors))
        if errors:
            raise PredictionException("; ".join(errors), 400)
        metrics.add_counter("ImagesClassified", len(images))
        stages = StageTimer()
        with stages("DecodeTime"):  # the images were decoded and resized above; this stage is their normalisation
            batch = normalize(torch.stack(images), self.meta.mean, self.meta.std)
        with stages("ForwardTime"):
            outputs = self.inference(batch)
        with stages("PostprocessTime"):
            answers = self.postprocess(outputs)
        stages.report(metrics)
        if context.get_request_header(0, "explain") == "True":  # /v1/models/cifar3:explain, /v2/.../explain
            self.add_kserve_explanations(items, batch, answers, kind)
        context.set_response_content_type(0, JSON_CONTENT_TYPE)
        return [json.dumps(answer) for answer in answers] if envelope == "kservev2" else answers

    def add_kserve_explanations(self, items, batch, answers, kind):
        """Explanations for every v1 instance or v2 input: a v1 instance may name ``target`` and ``method``
        beside ``data`` (a v2 input in its ``parameters``). A bad name fails the request with 400, a failed
        method with 500: the envelope answers the request as a whole."""
        jobs = {}
        for idx, item in enumerate(items):
            fields = (item.get("parameters") if kind == "input" else item) or {}
            try:
                request = {"body": fields if isinstance(fields, dict) else {}}
                target = explain_target(request, self.meta.classes)
                method = explain_method(request, self.explanation_method)
            except ValueError as exc:
                raise PredictionException(f"{kind} {idx}: {exc}", 400) from None
            target = self.meta.classes.index(answers[idx]["pred_class"]) if target is None else target
            jobs[idx] = (idx, target, method)
        results = self.explain_rows(batch, jobs)
        if any(explanation is None for explanation in results.values()):
            raise PredictionException("the explanation failed on the server; see its model_log.log", 500)
        for idx, explanation in results.items():
            answers[idx]["explanation"] = explanation

    def explainer(self, method: str):
        """The Explainer for ``method`` (cifar3/explain.py) on a float32 PyTorch model of the same checkpoint,
        whichever engine serves predictions; the perturbation methods' masked copies run on the serving engine.

        Built on the method's first request, not in initialize(): a worker that only predicts never loads
        captum or a second copy of the weights, so its start-up and memory stay as they were; the first
        explanation a worker answers pays for the load instead.
        """
        if method not in self.explainers:
            from cifar3.explain import build_explainer  # captum: needed only here

            model = next((e.model for e in self.explainers.values()), None)  # one float32 copy for every method
            if model is None:
                properties = self.context.system_properties
                checkpoint = os.path.join(properties["model_dir"], self.manifest["model"]["serializedFile"])
                model, _ = load_checkpoint(checkpoint, self.device)
            self.explainers[method] = build_explainer(model, self.meta, method, self.engine)
        return self.explainers[method]

    def explain_rows(self, batch, jobs: dict) -> dict:
        """{key: explanation, or None where its method failed} for jobs {key: (batch row, class index, method)}.
        Each method runs once over its rows; a failing method costs only the requests that asked for it."""
        results = {}
        for method in dict.fromkeys(job[2] for job in jobs.values()):
            keys = [key for key, job in jobs.items() if job[2] == method]
            try:
                explainer = self.explainer(method)
                maps = explainer.heatmaps(batch[[jobs[k][0] for k in keys]], [jobs[k][1] for k in keys])
            except Exception:  # a bug must cost these explanations, never the batch's predictions
                logger.exception("explanation by %s failed for requests %s", method, keys)
                results.update((key, None) for key in keys)
                continue
            for key, heatmap in zip(keys, maps, strict=True):
                results[key] = {
                    **explainer.describe(),
                    "target": self.meta.classes[jobs[key][1]],
                    "heatmap": [[round(v, 4) for v in row] for row in heatmap.tolist()],
                }
        self.context.metrics.add_counter("ImagesExplained", sum(v is not None for v in results.values()))
        return results

    def add_explanations(self, data, batch, decoded, explain, answers, errors, failed):
        """Attach a heat map to the answers of the ``explain`` requests; a request naming an unknown class or
        method moves to ``errors`` (400), a failure of its method to ``failed`` (500), the others keep theirs."""
        jobs = {}
        for idx in explain:
            try:
                target = explain_target(data[idx], self.meta.classes)
                method = explain_method(data[idx], self.explanation_method)
            except ValueError as exc:
                errors[idx] = str(exc)
                continue
            # An image called unknown is still explained for the class it resembles most (its pred_class).
            target = self.meta.classes.index(answers[idx]["pred_class"]) if target is None else target
            jobs[idx] = (decoded.index(idx), target, method)
        for idx, explanation in self.explain_rows(batch, jobs).items():
            if explanation is None:
                failed[idx] = "the explanation failed on the server; see its model_log.log"
            else:
                answers[idx]["explanation"] = explanation

    def describe_handle(self):
        meta = self.meta
        return json.dumps(
            {
                "classes": meta.classes,
                "variant": meta.variant,
                "image_size": meta.image_size,
                "val_accuracy": meta.val_accuracy,
                "temperature": meta.temperature,
                "confidence_map": meta.confidence_map,
                "trained": meta.created,
                "epoch": meta.epoch,
                # what runs the forward pass: engine, dtype, threads, device, test_flip (requested: model-config)
                **self.engine.describe(),
                "engine_requested": self.requested_engine,
                "max_image_pixels": self.max_pixels,
                # how "unknown" is decided: score, threshold in use and its source, the validation figures
                "unknown": self.unknown_rule.describe(meta.unknown),
                # what POST /explanations/cifar3 may be asked for (its "method") and what it uses otherwise
                "explanation": {"default": self.explanation_method, "methods": list(METHODS)},
            }
        )
