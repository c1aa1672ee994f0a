"""HTTPS end to end: ``scripts/serve.py tls-cert`` writes a certificate and key, TorchServe serves every API over
TLS with them (https:// addresses, certificate_file, private_key_file), serve.py and the UI's client verify the
server against CIFAR3_CA_BUNDLE, and a stranger's certificate and plain HTTP are refused. One real TorchServe for
the module, started and stopped by serve.py's own command line (cifar3_client/cli.py). Also: the Docker TLS
variant's configuration.
"""

from __future__ import annotations

import io
import json
import os
import stat

import pytest
import requests
import yaml
from conftest import PYTHON, ROOT, Server, run_cli, write_server_config
from cryptography import x509
from PIL import Image
from synthetic import class_images

from cifar3_client.client import Cifar3Client, ClientError, Config
from cifar3_client.server import read_properties, write_tls_certificate

SERVE = ROOT / "scripts" / "serve.py"
CLASSES = ["airplane", "automobile", "ship"]
ADDRESSES = ("inference_address", "management_address", "metrics_address")


def png(name: str) -> bytes:
    """An image in the colours the tiny model learnt for ``name`` (tests/synthetic.py)."""
    buffer = io.BytesIO()
    Image.fromarray(class_images(name, 1, seed=7)[0]).save(buffer, format="PNG")
    return buffer.getvalue()


# --- the certificate ----------------------------------------------------------------------------


def test_tls_cert_writes_a_certificate_for_localhost_and_a_private_key_only_its_owner_reads(tmp_path):
    result = run_cli(PYTHON, str(SERVE), "tls-cert", str(tmp_path / "tls"), "--host", "torchserve")
    assert result.returncode == 0, result.stderr
    cert, key = tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"
    assert f"CIFAR3_CA_BUNDLE={cert}" in result.stdout
    assert "key" in key.name and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----")  # PKCS#8, the form TorchServe reads
    certificate = x509.load_pem_x509_certificate(cert.read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost", "torchserve"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert certificate.issuer == certificate.subject
    # A second run would replace the key a running server uses: only with --force.
    again = run_cli(PYTHON, str(SERVE), "tls-cert", str(tmp_path / "tls"))
    assert again.returncode == 1 and "--force" in again.stderr
    assert x509.load_pem_x509_certificate(cert.read_bytes()) == certificate


# --- TorchServe over HTTPS -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    return write_tls_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, model_store, tls_files):
    """TorchServe with https:// addresses, started and stopped by ``serve.py start`` / ``serve.py stop``, which
    verify it against CIFAR3_CA_BUNDLE."""
    cert, key = tls_files
    folder = tmp_path_factory.mktemp("torchserve-tls")
    config = write_server_config(folder, model_store, "https", certificate_file=str(cert), private_key_file=str(key))
    server = Server(config, folder / "run")
    env = {"CIFAR3_CA_BUNDLE": str(cert)}
    try:
        started = run_cli(*server.command(), "start", env=env, timeout=300)
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"inference:  {server.inference_url}/predictions/cifar3" in started.stdout
        yield server
        stopped = run_cli(*server.command(), "stop", env=env, timeout=120)
        assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stdout + stopped.stderr
    finally:
        server.stop()  # leaves no Java behind when start or an assertion failed


@pytest.mark.server
def test_serve_py_status_predict_and_explain_over_https(tls_server, tls_files, tmp_path):
    cert, _ = tls_files
    assert tls_server.inference_url.startswith("https://127.0.0.1:")
    env = {"CIFAR3_CA_BUNDLE": str(cert)}
    status = run_cli(*tls_server.command(), "status", env=env)
    assert status.returncode == 0 and "cifar3: READY" in status.stdout, status.stdout + status.stderr
    for name in CLASSES:
        (tmp_path / f"{name}.png").write_bytes(png(name))
        result = run_cli(*tls_server.command(), "predict", str(tmp_path / f"{name}.png"), env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert json.loads(result.stdout)["pred_class"] == name
    overlay = tmp_path / "overlay.png"
    explained = run_cli(*tls_server.command(), "explain", str(tmp_path / "ship.png"), "--out", str(overlay), env=env)
    assert explained.returncode == 0 and "ship" in explained.stdout, explained.stdout + explained.stderr
    assert Image.open(overlay).size == (256, 256)


@pytest.mark.server
def test_ui_client_classifies_over_https_with_the_bundle(tls_server, tls_files):
    """The UI's configuration from its environment, as ui/app.py builds it, against the TLS server."""
    cert, _ = tls_files
    config = Config.from_env({
        "CIFAR3_INFERENCE_URL": tls_server.inference_url,
        "CIFAR3_MANAGEMENT_URL": tls_server.management_url,
        "CIFAR3_TOKEN_FILE": str(tls_server.key_file),
        "CIFAR3_CA_BUNDLE": str(cert),
    })  # fmt: skip
    assert config.ca_bundle == str(cert)
    client = Cifar3Client(config)
    state = client.server_state()
    assert state.ready and not state.problems, state
    outcomes = client.predict_many([(name, png(name)) for name in CLASSES], explain=True)
    assert [o.prediction.pred_class for o in outcomes] == CLASSES, outcomes
    assert all(o.explanation and o.explanation.heatmap for o in outcomes)
    with pytest.raises(ClientError, match="CIFAR3_CA_BUNDLE='/nonexistent.pem' is not a readable PEM file"):
        Config.from_env({"CIFAR3_CA_BUNDLE": "/nonexistent.pem"})


@pytest.mark.server
def test_a_client_holding_a_strangers_ca_is_refused(tls_server, tmp_path):
    """A certificate the client's bundle does not vouch for is refused before any request (and token) is sent:
    a stranger's certificate as the bundle, and requests' own bundle when none is set."""
    stranger, _ = write_tls_certificate(tmp_path / "stranger")
    image = tmp_path / "ship.png"
    image.write_bytes(png("ship"))
    for env in ({"CIFAR3_CA_BUNDLE": str(stranger)}, {"CIFAR3_CA_BUNDLE": ""}):  # "": requests' own bundle
        result = run_cli(*tls_server.command(), "predict", str(image), env=env)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "TLS with https://127.0.0.1:" in result.stderr and "certificate verify failed" in result.stderr
    client = Cifar3Client(Config(tls_server.inference_url, tls_server.management_url, str(tls_server.key_file),
                                 ca_bundle=str(stranger)))  # fmt: skip
    with pytest.raises(ClientError) as caught:
        client.predict(png("ship"))
    assert caught.value.kind == "tls" and "CIFAR3_CA_BUNDLE" in caught.value.message
    with pytest.raises(requests.exceptions.SSLError, match="certificate verify failed"):
        requests.get(f"{tls_server.inference_url}/ping", verify=str(stranger), timeout=10)


@pytest.mark.server
def test_plain_http_to_the_tls_port_is_refused(tls_server):
    """TorchServe answers a plain-HTTP request on a TLS port with 403 and nothing else: no prediction, no ping;
    the project's client says to use https://."""
    plain = tls_server.inference_url.replace("https://", "http://")
    for method, path in (("GET", "ping"), ("POST", "predictions/cifar3")):
        response = requests.request(method, f"{plain}/{path}", data=png("ship"), timeout=10)
        assert response.status_code == 403, response.text
        assert response.json() == {"status": "This TorchServe instance only accepts HTTPS requests"}
    client = Cifar3Client(Config(plain, tls_server.management_url.replace("https://", "http://"),
                                 str(tls_server.key_file)))  # fmt: skip
    with pytest.raises(ClientError) as caught:
        client.predict(png("ship"))
    assert caught.value.kind == "config" and "answers HTTPS only: use https://" in caught.value.message


# --- the Docker TLS variant ----------------------------------------------------------------------


def test_docker_tls_config_differs_from_the_plain_one_only_in_tls():
    plain = read_properties(ROOT / "docker" / "config.properties")
    tls = read_properties(ROOT / "docker" / "config.tls.properties")
    differing = {k for k in plain.keys() | tls.keys() if plain.get(k) != tls.get(k)}
    assert differing == {*ADDRESSES, "certificate_file", "private_key_file"}
    for key in ADDRESSES:
        assert tls[key] == plain[key].replace("http://", "https://", 1)
    compose = yaml.safe_load((ROOT / "compose.tls.yaml").read_text())
    serving, ui = compose["services"]["torchserve"], compose["services"]["ui"]
    mounts = {v["target"]: v for v in serving["volumes"]}
    assert mounts["/opt/cifar3/config.properties"]["source"] == "./docker/config.tls.properties"
    tls_dir = mounts[os.path.dirname(tls["certificate_file"])]
    assert tls_dir["source"] == "./tls" and tls_dir["read_only"] is True
    assert os.path.dirname(tls["private_key_file"]) == tls_dir["target"]
    assert serving["environment"]["CIFAR3_CA_BUNDLE"] == tls["certificate_file"]  # the HEALTHCHECK verifies
    # The UI gets the certificate, never the key, and speaks https to the service name the certificate carries.
    assert [v["target"] for v in ui["volumes"]] == [ui["environment"]["CIFAR3_CA_BUNDLE"]]
    assert ui["environment"]["CIFAR3_INFERENCE_URL"] == "https://torchserve:8080"
    # Certificates and keys stay out of git and of the images' build context.
    assert "tls/" in (ROOT / ".gitignore").read_text().split()
    assert "tls" in (ROOT / ".dockerignore").read_text().split()
