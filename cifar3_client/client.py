"""HTTP client for the cifar3 TorchServe: configuration, tokens, server state and predictions.

Plain ``requests``, no streamlit and no torch: ui/app.py is a thin page over these functions, the server
lifecycle (cifar3_client/server.py), the bench tooling and the tests use them too. Every failure becomes a
:class:`ClientError` whose message says what happened and what to do, so the page can show it as it is.

Configuration comes from the environment of the process only:

- ``CIFAR3_INFERENCE_URL``  inference API, default http://127.0.0.1:8080
- ``CIFAR3_MANAGEMENT_URL`` management API, default http://127.0.0.1:8081
- ``CIFAR3_TOKEN_FILE``     TorchServe's key_file.json, default run/key_file.json in the current directory (the
  repository root, where the page is started and where ``scripts/serve.py start`` makes the server write it)
- ``CIFAR3_TOKEN``          an inference key to send instead of the key file's. The management API
  (the sidebar's server state) still uses the key file's management key when the file is readable.
- ``CIFAR3_TIMEOUT``        seconds one prediction or explanation may take, retries included, default 30
- ``CIFAR3_UI_ALLOW_OVERRIDES`` ``1`` lets the page's visitors type other server URLs and an inference
  token (off by default; meant for a page only its owner can open).
- ``CIFAR3_CA_BUNDLE``      PEM file of the certificates that an ``https://`` server's certificate must chain
  to (e.g. the one ``scripts/serve.py tls-cert`` writes); unset: requests' own CA bundle. Certificates are
  always verified.

Credentials are bound to the configured servers: the key file's keys and ``CIFAR3_TOKEN`` are sent only
to the origins (scheme, host, port) of the configured URLs, never to a URL typed later
(:attr:`Config.key_origins`). A token typed with the URL (``typed_token``) is the only one sent there.

Predictions and explanations are idempotent, and TorchServe loses a few of them whenever a worker stops under
them (killed, or scaled down: docs/reliability.md): :meth:`Cifar3Client.post` sends one again when TorchServe
says its worker is gone (:func:`worker_gone`) or no answer comes (connection refused or reset, nothing within
:attr:`RetryPolicy.attempt_timeout`), with a growing pause, until ``CIFAR3_TIMEOUT`` is spent. 4xx answers and
the handler's own errors are answers, never retried.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

MODEL = "cifar3"
DEFAULT_INFERENCE_URL = "http://127.0.0.1:8080"
DEFAULT_MANAGEMENT_URL = "http://127.0.0.1:8081"
# Relative, so the current directory's: this module may be installed anywhere, so it cannot know the repository.
DEFAULT_TOKEN_FILE = Path("run") / "key_file.json"
DEFAULT_TIMEOUT = 30.0
STATUS_TIMEOUT = 5.0  # the sidebar's checks must not hold the page up for long
MAX_PARALLEL = 8  # images in flight at once; TorchServe batches them on its side
IMAGE_TYPES = ("jpg", "jpeg", "png", "webp", "bmp", "gif")
START_HINT = "start it with `.venv/bin/python scripts/serve.py start`"
INVALID_KEY = "InvalidKeyException"
# TorchServe's 403 to a plain-HTTP request on a port configured for TLS.
HTTPS_ONLY = "only accepts HTTPS requests"
APIS = ("inference", "management")


class ClientError(Exception):
    """A failure to show the user. ``kind`` is one of: config, unreachable, timeout, token, tls,
    not_found, rejected, too_large, server, bad_answer."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.message, self.kind = message, kind


# ---------------------------------------------------------------- configuration


# TorchServe's own messages for a job whose worker stopped under it: the frontend's WorkerThread ends the batch in
# flight with "Worker died." (HTTP 500, or 507 when the process was killed), and the jobs of a scaled-down worker
# that it cannot hand to another one with "Worker scaled down." (docs/reliability.md cites the source lines).
WORKER_GONE_MESSAGES = ("Worker died.", "Worker scaled down.")


def origin(url: str) -> str:
    """``scheme://host:port`` of a URL, the unit to which credentials are bound."""
    parts = urlsplit(url)
    default_port = {"http": 80, "https": 443}.get(parts.scheme)
    try:
        port = parts.port or default_port
    except ValueError:
        port = None
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}"


def normalize_url(url: str) -> str:
    """``host:port`` or ``http://host:port/`` -> ``http://host:port``."""
    url = url.strip().rstrip("/")
    if url and "://" not in url:
        url = f"http://{url}"
    return url


def _tls_reason(exc: Exception) -> str:
    """OpenSSL's reason from a requests SSLError, e.g. 'certificate verify failed: self-signed certificate'."""
    found = re.search(r"\[SSL[^\]]*\] ([^(]+?)\s*\(_ssl", str(exc))
    return found.group(1) if found else exc.__class__.__name__


def ca_bundle_from_env(env: Mapping[str, str]) -> str:
    """CIFAR3_CA_BUNDLE as an absolute path ("" when unset), or ClientError when it names no readable file:
    requests would otherwise fail every HTTPS request with a message about its own bundle."""
    value = env.get("CIFAR3_CA_BUNDLE", "").strip()
    if not value:
        return ""
    path = Path(value).expanduser().resolve()
    if not path.is_file() or not os.access(path, os.R_OK):
        raise ClientError(
            f"CIFAR3_CA_BUNDLE={value!r} is not a readable PEM file: point it at the server's certificate "
            "(scripts/serve.py tls-cert DIR writes DIR/cert.pem) or its CA, or unset it",
            "config",
        )
    return str(path)


@dataclass(frozen=True)
class Config:
    """Where the server is and how to authenticate; hashable, so the page can cache per config."""

    inference_url: str = DEFAULT_INFERENCE_URL
    management_url: str = DEFAULT_MANAGEMENT_URL
    token_file: str = str(DEFAULT_TOKEN_FILE)
    token: str = ""  # explicit inference key (CIFAR3_TOKEN); empty: read the key file
    timeout: float = DEFAULT_TIMEOUT
    model: str = MODEL
    # Origins that may receive the key file's keys and ``token``: those of the URLs this configuration was
    # created with (from_env or the constructor); a URL replaced later keeps them out of its requests.
    key_origins: tuple[str, ...] = ()
    typed_token: str = ""  # an inference key typed with an overriding URL: sent to whatever URL is set
    allow_overrides: bool = False  # whether the page offers URL/token fields (CIFAR3_UI_ALLOW_OVERRIDES)
    ca_bundle: str = ""  # PEM file https:// servers are verified against (CIFAR3_CA_BUNDLE); "": requests' own

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Config:
        """The configuration the CIFAR3_* variables describe (defaults for the unset ones)."""
        timeout = env.get("CIFAR3_TIMEOUT", "").strip()
        try:
            seconds = float(timeout) if timeout else DEFAULT_TIMEOUT
        except ValueError:
            raise ClientError(
                f"CIFAR3_TIMEOUT={timeout!r} is not a number of seconds: set it to e.g. 30", "config"
            ) from None
        return cls(
            inference_url=env.get("CIFAR3_INFERENCE_URL") or DEFAULT_INFERENCE_URL,
            management_url=env.get("CIFAR3_MANAGEMENT_URL") or DEFAULT_MANAGEMENT_URL,
            token_file=env.get("CIFAR3_TOKEN_FILE") or str(DEFAULT_TOKEN_FILE),
            token=env.get("CIFAR3_TOKEN", ""),
            timeout=seconds,
            allow_overrides=env.get("CIFAR3_UI_ALLOW_OVERRIDES", "").strip().lower() in ("1", "true", "yes"),
            ca_bundle=ca_bundle_from_env(env),
        ).normalized()

    def normalized(self) -> Config:
        """URLs with a scheme and no trailing slash, token and path stripped, timeout positive."""
        if self.timeout <= 0:
            raise ClientError(f"the prediction timeout must be positive, not {self.timeout}", "config")
        inference_url = normalize_url(self.inference_url) or DEFAULT_INFERENCE_URL
        management_url = normalize_url(self.management_url) or DEFAULT_MANAGEMENT_URL
        return replace(
            self,
            inference_url=inference_url,
            management_url=management_url,
            token_file=str(Path(self.token_file.strip() or DEFAULT_TOKEN_FILE).expanduser().absolute()),
            token=self.token.strip(),
            typed_token=self.typed_token.strip(),
            key_origins=self.key_origins or tuple(sorted({origin(inference_url), origin(management_url)})),
        )

    def with_overrides(self, **values: Any) -> Config:
        """This configuration with the URLs, ``typed_token`` or timeout replaced (the page's sidebar), normalized.
        The credentials' origins stay those of the original URLs; the key file cannot be changed this way."""
        allowed = {"inference_url", "management_url", "typed_token", "timeout"}
        if set(values) - allowed:
            raise ValueError(f"only {sorted(allowed)} can be overridden, not {sorted(set(values) - allowed)}")
        return replace(self.normalized(), **values).normalized()


def read_key_file(path: str | Path) -> dict[str, str]:
    """{'inference': key, 'management': key} from TorchServe's key_file.json, or ClientError."""
    path = Path(path)
    try:
        content = json.loads(path.read_text())
        return {api: str(content[api]["key"]) for api in APIS if isinstance(content.get(api), dict)}
    except FileNotFoundError:
        raise ClientError(f"key file {path} does not exist", "token") from None
    except PermissionError:
        raise ClientError(f"key file {path} is not readable by this user", "token") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ClientError(f"key file {path} is not TorchServe's key_file.json ({exc})", "token") from None


def same_host(url_a: str, url_b: str) -> bool:
    """Whether two URLs name the same host (any port)."""
    return urlsplit(url_a).hostname == urlsplit(url_b).hostname


@dataclass(frozen=True)
class RetryPolicy:
    """How :meth:`Cifar3Client.post` sends a prediction or explanation again; the client's ``timeout`` bounds
    the whole (``CIFAR3_TIMEOUT``).

    ``attempt_timeout`` is there because TorchServe 0.12 can lose a job without ever answering it (a worker
    scaled down between taking it and sending it: docs/reliability.md): an attempt that has no answer by then
    is abandoned and the request sent again. It is far above any answer of a working server (tens of ms).
    urllib3's ``Retry`` cannot do this: it decides on the status alone (TorchServe's 500 "Worker died." and the
    handler's own 500 error look alike) and restarts each attempt's timeout, so it cannot keep a deadline."""

    attempts: int = 4  # at most, the first included
    attempt_timeout: float = 3.0  # seconds one attempt waits for its answer
    backoff: float = 0.1  # seconds before the first retry, doubled for each next one
    backoff_max: float = 1.0

    def pause(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (0 = the first)."""
        return min(self.backoff_max, self.backoff * 2**retry)


NO_RETRY = RetryPolicy(attempts=1, attempt_timeout=math.inf)  # one attempt, waiting as long as ``timeout``


def worker_gone(response: requests.Response) -> bool:
    """Whether TorchServe itself, not the handler, says that this request's worker stopped under it or that no
    worker could take it, so that another attempt will be served: HTTP 500 or 507 with "Worker died." or
    "Worker scaled down.", or 503 (no worker, job queue full). The handler's errors (``{"error": ..., "code":
    ...}``, any status) and every 4xx are the request's own answer."""
    if response.status_code not in (500, 503, 507):
        return False
    try:
        payload = response.json()
    except ValueError:
        return False
    if not isinstance(payload, dict) or "error" in payload:
        return False
    return response.status_code == 503 or payload.get("message") in WORKER_GONE_MESSAGES


def new_session(pool_size: int = MAX_PARALLEL) -> requests.Session:
    """A keep-alive session with enough pooled connections for the concurrent predictions. It retries nothing
    itself: :meth:`Cifar3Client.post` decides (RetryPolicy)."""
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=2, pool_maxsize=pool_size, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


# ---------------------------------------------------------------- answers


def is_invalid_key(response: requests.Response) -> bool:
    """TorchServe's answer to a missing, wrong or expired token: HTTP 400, type InvalidKeyException."""
    return response.status_code in (400, 401, 403) and INVALID_KEY in response.text[:1000]


def error_text(response: requests.Response) -> str:
    """The server's own explanation: the handler's "error", TorchServe's "message", or the raw text."""
    try:
        payload = response.json()
    except ValueError:
        payload = None
    if isinstance(payload, dict):
        for key in ("error", "message"):
            if isinstance(payload.get(key), str) and payload[key].strip():
                return payload[key].strip()
    text = response.text.strip()
    return text[:300] if text else f"HTTP {response.status_code} {response.reason or ''}".strip()


@dataclass(frozen=True)
class Prediction:
    """One answer of the model: the predicted class, every class's probability, and whether the image looks like
    none of the classes (``unknown``, decided on ``unknown_score``; None from a server that does not say)."""

    pred_class: str
    probs: dict[str, float]
    unknown: bool | None = None
    unknown_score: float | None = None

    def ranked(self) -> list[tuple[str, float]]:
        """(class, probability) pairs, most probable first."""
        return sorted(self.probs.items(), key=lambda item: (-item[1], item[0]))

    def chart_data(self) -> dict[str, list]:
        """Columns for a bar chart: class names and probabilities in percent, most probable first."""
        ranked = self.ranked()
        return {"class": [c for c, _ in ranked], "probability (%)": [round(p * 100, 2) for _, p in ranked]}


def parse_prediction(payload: Any) -> Prediction:
    """A Prediction from {"pred_class": str, "probs": {class: probability}}, or ValueError."""
    if not isinstance(payload, dict) or not isinstance(payload.get("pred_class"), str):
        raise ValueError('expected {"pred_class": ..., "probs": {...}}')
    probs = payload.get("probs")
    if not isinstance(probs, dict) or not probs:
        raise ValueError('"probs" must be a non-empty object of class: probability')
    try:
        probs = {str(c): float(p) for c, p in probs.items()}
    except (TypeError, ValueError):
        raise ValueError('"probs" values must be numbers') from None
    unknown, score = payload.get("unknown"), payload.get("unknown_score")
    if unknown is not None and not isinstance(unknown, bool):
        raise ValueError('"unknown" must be true or false')
    if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
        raise ValueError('"unknown_score" must be a number')
    return Prediction(payload["pred_class"], probs, unknown, None if score is None else float(score))


@dataclass(frozen=True)
class Explanation:
    """Where the model found the evidence for ``target``: a heat map in [0, 1], rows of the model's input grid."""

    target: str
    heatmap: list[list[float]]
    method: str = "grad-cam"
    layer: str = ""


def parse_explanation(payload: Any) -> tuple[Prediction, Explanation]:
    """The prediction and its explanation from an answer of the explanations API, or ValueError."""
    prediction = parse_prediction(payload)
    explanation = payload.get("explanation")
    if not isinstance(explanation, dict) or not isinstance(explanation.get("target"), str):
        raise ValueError('expected "explanation": {"target": ..., "heatmap": [[...]], ...}')
    heatmap = explanation.get("heatmap")
    try:
        rows = [[float(v) for v in row] for row in heatmap]
    except (TypeError, ValueError):
        raise ValueError('"heatmap" must be a list of rows of numbers') from None
    if not rows or any(len(row) != len(rows[0]) for row in rows) or not all(0 <= v <= 1 for r in rows for v in r):
        raise ValueError('"heatmap" must be a non-empty rectangular grid of values in [0, 1]')
    return prediction, Explanation(
        explanation["target"], rows, str(explanation.get("method", "")), str(explanation.get("layer", ""))
    )


def overlay_heatmap(image, heatmap: Sequence[Sequence[float]], alpha: float = 0.5, size: int | None = None):
    """A PIL image: ``image`` (PIL image or encoded bytes) with ``heatmap`` laid over it in a blue (0) -
    yellow - red (1) colour ramp at opacity ``alpha``. With ``size``: the image as the model saw it (resized to
    the heat map's grid, aspect ratio not kept, as the server does) shown ``size`` pixels per side; without:
    the image at its own size. Pillow is imported here so that the client itself needs requests only."""
    import io

    from PIL import Image, ImageOps

    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    image = ImageOps.exif_transpose(image).convert("RGB")
    rows, cols = len(heatmap), len(heatmap[0])
    if size:  # the model's pixels, enlarged without smoothing
        image = image.resize((cols, rows), Image.Resampling.BICUBIC).resize((size, size), Image.Resampling.NEAREST)
    levels = bytes(round(min(max(float(v), 0.0), 1.0) * 255) for row in heatmap for v in row)
    heat = Image.frombytes("L", (cols, rows), levels).resize(image.size, Image.Resampling.BILINEAR)
    colours = ImageOps.colorize(heat, black="#2c3ec8", mid="#ffe34d", white="#e3171b")
    return Image.blend(image, colours, alpha)


@dataclass(frozen=True)
class ModelStatus:
    """What the management API says about the model."""

    workers: tuple[str, ...] = ()  # each worker's status, e.g. ("READY",)
    batch_size: int | None = None
    metadata: dict = field(default_factory=dict)  # the handler's describe_handle(), {} when unknown

    @property
    def ready_workers(self) -> int:
        return sum(status == "READY" for status in self.workers)

    @property
    def ready(self) -> bool:
        return self.ready_workers > 0


def parse_model_status(payload: Any) -> ModelStatus:
    """A ModelStatus from GET /models/<name>[?customized=true] (a JSON list of one description).

    TorchServe 0.12 returns ``customizedMetadata`` as an object; older versions return the
    handler's JSON string as it is. Both are accepted.
    """
    if not isinstance(payload, list) or not payload or not isinstance(payload[0], dict):
        raise ValueError("expected a JSON list with the model's description")
    description = payload[0]
    workers = tuple(str(w.get("status", "UNKNOWN")) for w in description.get("workers") or [] if isinstance(w, dict))
    metadata = description.get("customizedMetadata") or {}
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata)
        except ValueError:
            metadata = {}
    batch = description.get("batchSize")
    return ModelStatus(
        workers, batch if isinstance(batch, int) else None, metadata if isinstance(metadata, dict) else {}
    )


@dataclass(frozen=True)
class Outcome:
    """One uploaded image's round trip: a prediction or an error message, and how long it took."""

    name: str
    latency_ms: float
    prediction: Prediction | None = None
    error: str = ""
    kind: str = ""
    explanation: Explanation | None = None


@dataclass(frozen=True)
class ServerState:
    """The sidebar's view of the server. ``problems`` says what is wrong, in order; ``blocking`` is
    the one that stops predictions (empty when images can be classified, as far as is known)."""

    reachable: bool = False
    model: ModelStatus | None = None
    problems: tuple[str, ...] = ()
    blocking: str = ""

    @property
    def ready(self) -> bool:
        return self.model is not None and self.model.ready


# ---------------------------------------------------------------- the client


class Cifar3Client:
    """Talks to one TorchServe. Thread-safe: the page shares one per configuration.

    Keys come from the key file (read once, again whenever the server rejects one, then the request
    is retried once: the page survives a server restart or a key rotation) or from ``config.token``.
    Predictions and explanations are sent again as ``retry`` says (:meth:`post`).
    """

    def __init__(self, config: Config, session: requests.Session | None = None, retry: RetryPolicy = RetryPolicy()):
        self.config = config.normalized()  # also binds the credentials to these URLs when nothing else did
        self.session = session or new_session()
        self.retry = retry
        self._lock = threading.Lock()
        self._keys: dict[str, str] | None = None
        self._key_problem = ""

    # -- tokens

    def _load_keys(self) -> dict[str, str]:
        with self._lock:
            try:
                self._keys, self._key_problem = read_key_file(self.config.token_file), ""
            except ClientError as exc:
                self._keys, self._key_problem = {}, exc.message
            return self._keys

    def _credentials(self, api: str, url: str) -> tuple[str, str]:
        """(key, where it came from: 'typed', 'explicit', 'file', 'withheld' or 'none') for a request to ``url``
        on the 'inference' or 'management' API. Configured credentials go only to the configured origins."""
        if api == "inference" and self.config.typed_token:
            return self.config.typed_token, "typed"
        if origin(url) not in self.config.key_origins:
            return "", "withheld"
        if self.config.token and api == "inference":
            return self.config.token, "explicit"
        keys = self._keys if self._keys is not None else self._load_keys()
        if keys.get(api):
            return keys[api], "file"
        if self.config.token:
            return self.config.token, "explicit"
        return "", "none"

    def _token_error(self, api: str, source: str, url: str) -> ClientError:
        file = self.config.token_file
        if source == "typed":
            what, todo = "the token typed in the sidebar", f"type that server's current '{api}' key"
        elif source == "withheld":
            what = f"a request without token to {origin(url)}"
            todo = (
                "the configured keys are sent only to the configured servers; type that server's inference "
                "token in the sidebar, or configure it with CIFAR3_INFERENCE_URL / CIFAR3_MANAGEMENT_URL"
            )
        elif source == "explicit":
            what = "the token from CIFAR3_TOKEN (or the sidebar)"
            todo = f"copy the current '{api}' key from the server's key_file.json, or clear the token to use {file}"
        elif source == "file":
            what = f"the {api} key from {file}, even after reading the file again"
            todo = "point CIFAR3_TOKEN_FILE at the running server's key_file.json (its run/ folder)"
        else:
            what = f"a request without token ({self._key_problem or 'no ' + api + ' key in ' + file})"
            todo = "set CIFAR3_TOKEN_FILE to the running server's key_file.json, or CIFAR3_TOKEN to its inference key"
        return ClientError(f"TorchServe rejected {what}: {todo}.", "token")

    # -- transport

    def _request(self, method: str, url: str, api: str, timeout: float, **kwargs: Any) -> requests.Response:
        """Send with the API's token; on InvalidKeyException re-read the key file and retry once."""
        key, source = self._credentials(api, url)
        response = self._send(method, url, key, timeout, **kwargs)
        if is_invalid_key(response) and source in ("file", "none"):  # the file may have changed or appeared
            self._load_keys()
            key, source = self._credentials(api, url)
            response = self._send(method, url, key, timeout, **kwargs)
        if is_invalid_key(response):
            raise self._token_error(api, source, url)
        return response

    def _send(self, method: str, url: str, key: str, timeout: float, **kwargs: Any) -> requests.Response:
        headers = dict(kwargs.pop("headers", {}))
        if key:
            headers["Authorization"] = f"Bearer {key}"
        where = "{0.scheme}://{0.netloc}".format(urlsplit(url))
        try:
            # verify: the configured CA bundle, else requests' own; never off.
            verify = self.config.ca_bundle or True
            response = self.session.request(method, url, headers=headers, timeout=timeout, verify=verify, **kwargs)
            if response.status_code == 403 and HTTPS_ONLY in response.text[:500]:
                raise ClientError(
                    f"TorchServe at {where} answers HTTPS only: use https:// in CIFAR3_INFERENCE_URL / "
                    "CIFAR3_MANAGEMENT_URL, and CIFAR3_CA_BUNDLE for its certificate",
                    "config",
                )
            return response
        except requests.exceptions.SSLError as exc:  # before ConnectionError, its base: retrying cannot help
            bundle = f"CIFAR3_CA_BUNDLE ({self.config.ca_bundle})" if self.config.ca_bundle else "the default CAs"
            raise ClientError(
                f"TLS with {where} failed: its certificate is not one {bundle} vouches for, or it does not name "
                f"that host ({_tls_reason(exc)}); set CIFAR3_CA_BUNDLE to the server's certificate or CA",
                "tls",
            ) from None
        except requests.ConnectTimeout:
            raise ClientError(
                f"TorchServe at {where} did not accept a connection within {timeout:g}s: "
                f"is the address right and the server running? {START_HINT}",
                "unreachable",
            ) from None
        except requests.Timeout:
            raise ClientError(
                f"TorchServe at {where} did not answer within {timeout:g}s: the server is busy or "
                "stuck; try again, or raise CIFAR3_TIMEOUT",
                "timeout",
            ) from None
        except requests.ConnectionError as exc:
            reason = "connection refused" if "refused" in str(exc).lower() else exc.__class__.__name__
            raise ClientError(
                f"TorchServe is not reachable at {where} ({reason}): is it running? {START_HINT}, "
                "or set the server's address (CIFAR3_INFERENCE_URL / CIFAR3_MANAGEMENT_URL)",
                "unreachable",
            ) from None
        except requests.RequestException as exc:
            raise ClientError(f"cannot send a request to {url!r}: {exc}; check the server address", "config") from None

    # -- server state

    def ping(self) -> None:
        """Return when the inference API answers GET /ping healthy, else ClientError."""
        response = self._request("GET", f"{self.config.inference_url}/ping", "inference", STATUS_TIMEOUT)
        if not response.ok:
            raise ClientError(
                f"the inference API answered /ping with HTTP {response.status_code}: {error_text(response)}", "server"
            )

    def ping_status(self) -> int:
        """The HTTP status of /ping (TorchServe 0.12 wants the inference token there too); 0: no answer."""
        try:
            return self._request("GET", f"{self.config.inference_url}/ping", "inference", STATUS_TIMEOUT).status_code
        except ClientError:
            return 0

    def describe(self, customized: bool = False, timeout: float = STATUS_TIMEOUT) -> dict:
        """The management API's description of the model: workers (id, pid, status, ...), batchSize,
        minWorkers, ..., and with ``customized`` the handler's metadata."""
        url = f"{self.config.management_url}/models/{self.config.model}" + ("?customized=true" if customized else "")
        response = self._request("GET", url, "management", timeout)
        if response.status_code == 404:
            raise ClientError(
                f"model {self.config.model} is not loaded on the server: build model_store/"
                f"{self.config.model}.mar (scripts/archive.sh) and restart the server",
                "not_found",
            )
        if not response.ok:
            raise ClientError(
                f"the management API answered HTTP {response.status_code}: {error_text(response)}", "server"
            )
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if not isinstance(payload, list) or not payload or not isinstance(payload[0], dict):
            raise ClientError("unexpected answer from the management API: not a list with the model", "bad_answer")
        return payload[0]

    def model_status(self, customized: bool = False) -> ModelStatus:
        """The model's workers and batch size (and, with ``customized``, the handler's metadata)."""
        return parse_model_status([self.describe(customized)])

    def workers(self) -> list[dict]:
        """The model's workers as the management API lists them (id, pid, status, ...)."""
        return list(self.describe().get("workers") or [])

    def scale(
        self, min_workers: int, max_workers: int | None = None, synchronous: bool = True, timeout: float = 300.0
    ) -> requests.Response:
        """PUT /models/<model>?min_worker=&max_worker=&synchronous=: TorchServe starts workers up to min_worker
        but stops them only down to max_worker, so scaling down sets both (default max_worker:
        max(min_workers, 4), the model-config's maxWorkers). synchronous=true answers when the workers are
        READY and holds one of the server's netty threads meanwhile."""
        params = {
            "min_worker": min_workers,
            "max_worker": max_workers or max(min_workers, 4),
            "synchronous": str(synchronous).lower(),
        }
        url = f"{self.config.management_url}/models/{self.config.model}"
        return self._request("PUT", url, "management", timeout, params=params)

    def post(self, path: str, data: bytes, headers: dict[str, str] | None = None, timeout: float | None = None):
        """POST ``data`` to the inference API's ``/<path>/<model>`` with the inference token; the raw response
        (for tooling that wants the status and body as they are), or ClientError when none came.

        Only for idempotent calls (predictions, explanations): an attempt that gets no answer (connection refused
        or reset, nothing within ``retry.attempt_timeout``) or an answer for which :func:`worker_gone` holds is
        sent again after ``retry.pause()``, at most ``retry.attempts`` times in all and only while ``timeout``
        (default: the configured one) lasts; then the last answer is returned, or the last ClientError raised.
        Both carry ``failed_attempts``: what each earlier attempt got."""
        url = f"{self.config.inference_url}/{path}/{self.config.model}"
        headers = {"Content-Type": "application/octet-stream", **(headers or {})}
        deadline = time.monotonic() + (timeout or self.config.timeout)
        failed: list[str] = []
        while True:
            wait = round(max(min(self.retry.attempt_timeout, deadline - time.monotonic()), 0.001), 3)
            try:
                answer = self._request("POST", url, "inference", wait, data=data, headers=headers)
            except ClientError as exc:
                if exc.kind not in ("unreachable", "timeout"):
                    raise
                answer, failure = exc, f"{exc.kind} ({exc.message[:80]})"
            else:
                if not worker_gone(answer):
                    answer.failed_attempts = tuple(failed)
                    return answer
                failure = f"HTTP {answer.status_code} {error_text(answer)}"
            pause = self.retry.pause(len(failed))
            if len(failed) + 1 >= self.retry.attempts or time.monotonic() + pause >= deadline:
                answer.failed_attempts = tuple(failed)
                if isinstance(answer, ClientError):
                    if failed:
                        answer.message += f" ({len(failed) + 1} attempts; before: {'; '.join(failed)})"
                        answer.args = (answer.message,)
                    raise answer
                return answer
            failed.append(failure)
            time.sleep(pause)

    def server_state(self) -> ServerState:
        """Ping, the model's status and its metadata; never raises: failures land in ``problems``."""
        try:
            self.ping()
        except ClientError as exc:
            if exc.kind == "unreachable" and same_host(self.config.inference_url, self.config.management_url):
                return ServerState(False, None, (exc.message,), exc.message)  # nothing listens there: stop here
            state = self._model_state(False)
            return replace(state, problems=(exc.message, *state.problems), blocking=exc.message)
        return self._model_state(True)

    def _model_state(self, reachable: bool) -> ServerState:
        """The management API's part of server_state()."""
        try:
            model = self.model_status()
        except ClientError as exc:
            if exc.kind == "not_found":
                return ServerState(reachable, None, (exc.message,), exc.message)
            return ServerState(reachable, None, (f"model state unknown: {exc.message}",))
        if not model.ready:
            states = ", ".join(model.workers) or "no workers"
            message = (
                f"model {self.config.model} has no READY worker ({states}): it is still loading or its "
                "workers crashed; wait, or see the server's logs (run/logs/model_log.log)"
            )
            return ServerState(reachable, model, (message,), message)
        try:
            model = replace(self.model_status(customized=True), workers=model.workers)
        except ClientError as exc:
            return ServerState(reachable, model, (f"model metadata unavailable: {exc.message}",))
        return ServerState(reachable, model)

    # -- predictions

    def predict(self, data: bytes, name: str = "image") -> Prediction:
        """The model's answer for one image's bytes, or ClientError saying why there is none."""
        response = self.post("predictions", data)  # sent again while TorchServe says its worker is gone
        return self._answer(response, parse_prediction, f"unexpected answer for {name}", name, data)

    def explain(
        self, data: bytes, name: str = "image", target: str | None = None, method: str | None = None
    ) -> tuple[Prediction, Explanation]:
        """The prediction and a heat map for ``target`` (default: the predicted class) by ``method`` (default: the
        server's, handler.explanation in model-config.yaml), or ClientError."""
        body = {"data": base64.b64encode(data).decode("ascii")} | ({"target": target} if target else {})
        body |= {"method": method} if method else {}
        response = self.post("explanations", json.dumps(body).encode(), {"Content-Type": "application/json"})
        return self._answer(response, parse_explanation, f"unexpected explanation for {name}", name, data)

    def _answer(self, response: requests.Response, parse, unexpected: str, name: str, data: bytes):
        """``parse`` of an HTTP 200 answer's JSON, or the ClientError for an unexpected body or another status."""
        if response.status_code == 200:
            try:
                return parse(response.json())
            except ValueError as exc:
                raise ClientError(f"{unexpected}: {exc}", "bad_answer") from None
        raise self._failure(response, name, data)

    def _failure(self, response: requests.Response, name: str, data: bytes) -> ClientError:
        """The ClientError for a prediction or explanation the server did not answer with HTTP 200."""
        status = response.status_code
        if status == 413:
            return ClientError(
                f"{name} ({len(data) / 1e6:.1f} MB) is too large for the server (HTTP 413): "
                "upload a smaller image, or raise max_request_size in config.properties",
                "too_large",
            )
        if status == 404:
            return ClientError(
                f"model {self.config.model} is not loaded on the server (HTTP 404: "
                f"{error_text(response)}): restart it with a model_store holding "
                f"{self.config.model}.mar",
                "not_found",
            )
        if status == 400:
            return ClientError(f"the server rejected {name}: {error_text(response)}", "rejected")
        if status == 503:
            return ClientError(
                f"the model has no free worker (HTTP 503: {error_text(response)}): wait a moment and try again",
                "server",
            )
        return ClientError(
            f"the server failed on {name} (HTTP {status}: {error_text(response)}); see run/logs/model_log.log", "server"
        )

    def timed_predict(
        self, name: str, data: bytes, explain: bool = False, target: str | None = None, method: str | None = None
    ) -> Outcome:
        """predict() (or with ``explain``, explain() for ``target`` by ``method``) as an Outcome, with the round-trip
        latency in milliseconds."""
        started = time.perf_counter()
        try:
            prediction, explanation = (
                self.explain(data, name, target, method) if explain else (self.predict(data, name), None)
            )
        except ClientError as exc:
            return Outcome(name, (time.perf_counter() - started) * 1000, error=exc.message, kind=exc.kind)
        return Outcome(name, (time.perf_counter() - started) * 1000, prediction=prediction, explanation=explanation)

    def predict_many(
        self,
        images: Sequence[tuple[str, bytes]],
        parallel: int = MAX_PARALLEL,
        explain: bool = False,
        target: str | None = None,
        method: str | None = None,
    ) -> list[Outcome]:
        """Outcomes for (name, bytes) pairs, in their order; the requests go out concurrently. ``explain``: each
        outcome also carries a heat map for ``target`` (default: each image's predicted class) by ``method``
        (default: the server's)."""
        if not images:
            return []
        with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(images))), thread_name_prefix="cifar3") as pool:
            return list(
                pool.map(lambda item: self.timed_predict(*item, explain=explain, target=target, method=method), images)
            )
