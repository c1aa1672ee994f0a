"""Security checks: loopback-only sockets, tokens, the key file, the model API, allowed URLs, request size,
and a poisoned request inside a batch."""

from __future__ import annotations

import contextlib
import ipaddress
from concurrent.futures import ThreadPoolExecutor

import psutil
import requests

from bench.reliability.common import MODEL, OCTET, Result, describe_model, process_tree, result
from cifar3_client.server import Server, read_properties


def is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def check_loopback(server: Server) -> list[Result]:
    """Every TCP socket that Java or a worker listens on is bound to a loopback address."""
    listening = []
    for proc in process_tree(server.pid()):
        with contextlib.suppress(psutil.Error):
            listening += [c for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    addresses = sorted({f"{c.laddr.ip}:{c.laddr.port}" for c in listening})
    exposed = [a for a in addresses if not is_loopback(a.rsplit(":", 1)[0])]
    ports = {c.laddr.port for c in listening}
    expected_ports = {
        int(url.rsplit(":", 1)[1]) for url in (server.inference_url, server.management_url, server.metrics_url)
    }
    return [
        result(
            "listening sockets on loopback only",
            "inference, management, metrics (and gRPC) on 127.0.0.1",
            f"{len(addresses)} listening: {', '.join(a.replace('::ffff:', '') for a in addresses)}",
            bool(addresses) and not exposed and expected_ports <= ports,
            exposed=exposed,
            addresses=addresses,
        ),
    ]


def check_tokens(server: Server, payload: bytes) -> list[Result]:
    """Inference and management calls without a token, with a wrong one, or with the other API's key
    are refused (TorchServe 0.12: HTTP 400 InvalidKeyException); the right key works."""
    infer = f"{server.inference_url}/predictions/{server.model}"
    manage = f"{server.management_url}/models/{server.model}"
    ping_url = f"{server.inference_url}/ping"
    good_i, good_m = server.headers("inference"), server.headers("management")
    wrong = {"Authorization": "Bearer wrong-token"}
    cases = [
        ("predict, no token", "POST", infer, {}),
        ("predict, wrong token", "POST", infer, wrong),
        ("predict, management key", "POST", infer, good_m),
        ("ping, no token", "GET", ping_url, {}),
        ("describe, no token", "GET", manage, {}),
        ("describe, wrong token", "GET", manage, wrong),
        ("describe, inference key", "GET", manage, good_i),
        ("scale, no token", "PUT", manage + "?min_worker=1", {}),
        ("scale, wrong token", "PUT", manage + "?min_worker=1", wrong),
    ]
    refused, accepted, answers = [], [], {}
    for name, method, url, headers in cases:
        response = requests.request(
            method, url, data=payload if method == "POST" else None, headers={**headers, **OCTET}, timeout=30
        )
        answers[name] = (response.status_code, response.text[:200])
        (refused if response.status_code == 400 and "InvalidKeyException" in response.text else accepted).append(
            f"{name}: HTTP {response.status_code}"
        )
    good = [
        requests.post(infer, data=payload, headers={**good_i, **OCTET}, timeout=30).status_code,
        requests.get(manage, headers=good_m, timeout=30).status_code,
    ]
    return [
        result(
            "token: missing/wrong/other API's key",
            "refused (400 InvalidKeyException); right keys: 200",
            f"{len(refused)} of {len(cases)} refused; right keys: HTTP {good}"
            + (f"; NOT refused: {'; '.join(accepted)}" if accepted else ""),
            not accepted and good == [200, 200],
            cases=refused + accepted,
            answers=answers,
            good=good,
        ),
    ]


def check_key_file(server: Server) -> list[Result]:
    mode = server.key_file.stat().st_mode & 0o777
    return [
        result(
            "key_file.json permissions",
            "mode 600 (owner only)",
            f"mode {mode:o} ({server.key_file.name})",
            mode == 0o600,
        ),
    ]


def management(server: Server, method: str, path: str, timeout: float = 30.0, **kwargs) -> requests.Response:
    """A raw management API call with the management key: probes of what the API must refuse, which the
    project's client (cifar3_client/client.py) deliberately cannot send."""
    return requests.request(
        method, f"{server.management_url}{path}", headers=server.headers("management"), timeout=timeout, **kwargs
    )


def check_model_api(server: Server) -> list[Result]:
    """Registering (local or remote URL) and unregistering models through the management API is refused.

    The remote URL goes only to our loopback server, which refuses it before fetching anything."""
    attempts = {
        "POST /models?url=cifar3.mar": ("POST", "/models", {"url": f"{MODEL}.mar", "model_name": "again"}),
        "POST /models?url=http://example.com/x.mar": ("POST", "/models", {"url": "http://example.com/x.mar"}),
        "DELETE /models/cifar3": ("DELETE", f"/models/{MODEL}", {}),
    }
    answers = {
        name: management(server, method, path, params=params, timeout=30).status_code
        for name, (method, path, params) in attempts.items()
    }
    still_there = describe_model(server)["modelName"] == MODEL
    return [
        result(
            "model API: register/unregister",
            "refused (405, enable_model_api=false)",
            "; ".join(f"{name}: HTTP {code}" for name, code in answers.items()),
            all(code == 405 for code in answers.values()) and still_there,
            answers=answers,
        ),
    ]


def check_allowed_urls(server: Server) -> list[Result]:
    """allowed_urls (regular expressions TorchServe matches model URLs against) admits no remote URL."""
    import re

    value = read_properties(server.config).get("allowed_urls", "")
    patterns = [p.strip() for p in value.split(",") if p.strip()]
    remote = [
        "http://example.com/x.mar",
        "https://example.com/x.mar",
        "s3://bucket/x.mar",
        "ftp://example.com/x.mar",
        "http://127.0.0.1:1/x.mar",
        "HTTP://example.com/file://x.mar",
    ]
    admitted = [url for url in remote if any(re.fullmatch(p, url) for p in patterns)]
    return [
        result(
            "allowed_urls",
            "set, and matches no remote URL",
            f"allowed_urls={value or '(unset: TorchServe default)'}"
            + (f"; admits {admitted}" if admitted else "; admits none of http(s)/s3/ftp"),
            bool(patterns) and not admitted,
        ),
    ]


def check_request_size(server: Server) -> list[Result]:
    limit = int(read_properties(server.config).get("max_request_size", 6553500))
    body = b"\0" * (limit + 1024)
    try:
        status = requests.post(
            f"{server.inference_url}/predictions/{server.model}",
            data=body,
            headers={**server.headers(), **OCTET},
            timeout=60,
        ).status_code
    except requests.ConnectionError:
        status = 0  # the server closed the connection before reading the whole body: refused too
    return [
        result(
            "oversized upload",
            f"refused (413) above max_request_size {limit:,} B",
            f"HTTP {status}" if status else "connection closed by the server",
            status in (413, 0),
            status=status,
            limit=limit,
        ),
    ]


# A 10-byte body that is valid JSON: a string holding a lone surrogate. json.loads() in TorchServe's
# worker makes it the str "\ud800", which cannot be encoded back to UTF-8 (see tests/test_fuzz.py).
POISON_BODY = b'"\\ud800"'


def check_bad_request_in_batch(server: Server, payload: bytes, rounds: int = 5, neighbours: int = 6) -> list[Result]:
    """A malformed request gets its own 400 and never fails the other requests of its dynamic batch:
    send it together with ``neighbours`` good ones, ``rounds`` times."""
    url = f"{server.inference_url}/predictions/{server.model}"
    good_headers = {**server.headers("inference"), **OCTET}
    bad_headers = {**server.headers("inference"), "Content-Type": "application/json"}
    bad_codes, good_codes = [], []
    with ThreadPoolExecutor(neighbours, thread_name_prefix="batch") as pool:
        for _ in range(rounds):
            futures = [
                pool.submit(requests.post, url, data=payload, headers=good_headers, timeout=60)
                for _ in range(neighbours)
            ]
            bad_codes.append(requests.post(url, data=POISON_BODY, headers=bad_headers, timeout=60).status_code)
            good_codes += [f.result().status_code for f in futures]
    failed = [c for c in good_codes if c != 200]
    return [
        result(
            "malformed request in a batch",
            "it gets 400; the good requests of its batch all get 200",
            f"malformed JSON body {POISON_BODY.decode()}: HTTP {sorted(set(bad_codes))}; "
            f"{len(failed)} of {len(good_codes)} good requests sent with it failed"
            + (f" (HTTP {sorted(set(failed))})" if failed else ""),
            all(c == 400 for c in bad_codes) and not failed,
            bad_codes=bad_codes,
            good_codes=good_codes,
        ),
    ]


def security_checks(server: Server, payload: bytes) -> list[Result]:
    return [
        *check_loopback(server),
        *check_tokens(server, payload),
        *check_key_file(server),
        *check_model_api(server),
        *check_allowed_urls(server),
        *check_request_size(server),
        *check_bad_request_in_batch(server, payload),
    ]
