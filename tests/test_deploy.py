"""deploy/: the Kubernetes manifests and KServe InferenceServices, validated offline, and the Deployment's
command and probes run for real on this machine.

Core kinds: kubernetes-validate --strict against the Kubernetes API schemas (an unknown field fails, and so
does a warning such as an apiVersion the schemas do not know). InferenceServices: jsonschema against KServe's
own CRD schema (../shared/k8s/), plus a check that every field is one the schema declares (the API server
would silently drop an undeclared one). No cluster, kubectl, kustomize or container engine runs here.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jsonschema
import pytest
import requests
import yaml
from conftest import ROOT, free_ports
from PIL import Image
from synthetic import class_images

from cifar3_client.server import read_properties

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
K8S_REFERENCE = ROOT.parent / "shared" / "k8s"
CRD_SCHEMA = K8S_REFERENCE / "inferenceservice-v1beta1.schema.json"
RUNTIME = K8S_REFERENCE / "kserve-torchserve-runtime.yaml"
VALIDATE = Path(sys.executable).parent / "kubernetes-validate"
# The newest Kubernetes the validator knows, and the oldest still commonly run (autoscaling/v2, policy/v1).
KUBERNETES_VERSIONS = ("1.37.0", "1.30.0")
NOT_MANIFESTS = {"kustomization.yaml"}  # kustomize's own file, checked by test_kustomization_*


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifest_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*.yaml") if p.name not in NOT_MANIFESTS)


def core_files() -> list[Path]:
    """Manifest files of Kubernetes' own kinds: everything but the InferenceServices."""
    return [p for p in manifest_files() if all(d["kind"] != "InferenceService" for d in documents(p))]


def all_docs() -> list[dict]:
    return [doc for path in manifest_files() for doc in documents(path)]


def one(kind: str, name: str) -> dict:
    (found,) = [d for d in all_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def strict_validation_problems(paths: list[Path], version: str) -> list[str]:
    """kubernetes-validate --strict's complaints: failures, and warnings (it exits 0 on a warning, for example
    when it has no schema for a kind or apiVersion)."""
    result = subprocess.run(
        [str(VALIDATE), "--strict", "-k", version, *map(str, paths)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    lines = (result.stdout + result.stderr).splitlines()
    problems = [line for line in lines if not line.startswith("INFO ") and line.strip()]
    if result.returncode != 0 and not problems:
        problems.append(f"exit status {result.returncode}")
    passed = sum(" passed for resource " in line for line in lines)
    expected = sum(len(documents(p)) for p in paths)
    if not problems and passed != expected:
        problems.append(f"{passed} resources passed of {expected}")
    return problems


# --- offline validation ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_manifests_pass_strict_validation(version):
    files = core_files()
    assert {p.relative_to(DEPLOY).as_posix() for p in files} >= {
        "kubernetes/namespace.yaml",
        "kubernetes/torchserve.yaml",
        "kubernetes/ui.yaml",
        "kserve/networkpolicy.yaml",
    }
    assert strict_validation_problems(files, version) == []


def test_strict_validation_rejects_unknown_fields_and_apiversions(tmp_path):
    """The check above can fail: a misspelt field, and an apiVersion Kubernetes removed, are both caught."""
    deployment = one("Deployment", "cifar3-torchserve")
    deployment["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # 'resources' misspelt
    misspelt = tmp_path / "misspelt.yaml"
    misspelt.write_text(yaml.safe_dump(deployment))
    assert any("resource" in p for p in strict_validation_problems([misspelt], KUBERNETES_VERSIONS[0]))
    hpa = one("HorizontalPodAutoscaler", "cifar3-torchserve")
    removed = tmp_path / "removed.yaml"
    removed.write_text(yaml.safe_dump({**hpa, "apiVersion": "autoscaling/v2beta2"}))
    assert any(p.startswith("WARN") for p in strict_validation_problems([removed], KUBERNETES_VERSIONS[0]))


def undeclared_fields(value, schema: dict, path: str = "") -> list[str]:
    """Paths of fields the structural schema does not declare (Kubernetes prunes them without an error)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(value, dict) and schema.get("type") == "object":
        declared = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if key in declared:
                found += undeclared_fields(item, declared[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += undeclared_fields(item, extra, f"{path}.{key}")
            elif extra is not True:
                found.append(f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            found += undeclared_fields(item, schema["items"], f"{path}[{i}]")
    return found


@pytest.fixture(scope="module")
def crd_schema() -> dict:
    if not CRD_SCHEMA.is_file():
        pytest.skip(f"no KServe CRD schema at {CRD_SCHEMA}")
    return json.loads(CRD_SCHEMA.read_text())


def inference_services() -> list[tuple[Path, dict]]:
    return [(p, d) for p in manifest_files() for d in documents(p) if d["kind"] == "InferenceService"]


def inference_service_problems(isvc: dict, schema: dict) -> list[str]:
    problems = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.Draft7Validator(schema).iter_errors(isvc)
    ]
    problems += [
        f"{p}: not in KServe's schema" for p in undeclared_fields(isvc["spec"], schema["properties"]["spec"], "spec")
    ]
    # What the CRD schema leaves to the API server and to KServe's runtime selection:
    if isvc.get("apiVersion") != "serving.kserve.io/v1beta1":
        problems.append(f"apiVersion {isvc.get('apiVersion')}")
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", isvc["metadata"].get("name", "")):
        problems.append("metadata.name is not a DNS-1035 label")
    runtime = yaml.safe_load(RUNTIME.read_text())["spec"]
    model = isvc["spec"]["predictor"].get("model", {})
    if model.get("modelFormat", {}).get("name") not in [f["name"] for f in runtime["supportedModelFormats"]]:
        problems.append(f"model format {model.get('modelFormat')} is not served by kserve-torchserve")
    if model.get("protocolVersion") not in runtime["protocolVersions"]:
        problems.append(f"protocolVersion {model.get('protocolVersion')} not in {runtime['protocolVersions']}")
    return problems


def test_inference_services_match_kserve_crd_schema(crd_schema):
    found = inference_services()
    assert {p.name for p, _ in found} == {"inferenceservice.yaml", "inferenceservice-canary.yaml"}
    for path, isvc in found:
        assert inference_service_problems(isvc, crd_schema) == [], path.name


def test_inference_service_check_catches_mistakes(crd_schema):
    (_, isvc), *_ = inference_services()
    bad = json.loads(json.dumps(isvc))
    predictor = bad["spec"]["predictor"]
    predictor["scaleMetric"] = "gpu"  # not in the CRD's enum
    predictor["model"]["storageURI"] = predictor["model"].pop("storageUri")  # misspelt: pruned by the API server
    predictor["model"]["protocolVersion"] = "v3"
    problems = " | ".join(inference_service_problems(bad, crd_schema))
    for expected in (
        "'gpu' is not one of",
        "spec.predictor.model.storageURI: not in KServe's schema",
        "protocolVersion v3",
    ):
        assert expected in problems, problems


def test_inference_services_serve_the_layout(crd_schema):
    """Both name the model format and protocol the layout is tested with; the canary differs from the main
    service only in its storage (a new version's layout) and its share of the traffic."""
    (main,) = [d for p, d in inference_services() if p.name == "inferenceservice.yaml"]
    (canary,) = [d for p, d in inference_services() if p.name == "inferenceservice-canary.yaml"]
    assert main["metadata"]["name"] == canary["metadata"]["name"], "a canary is a new revision of the same service"
    model = main["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "pytorch" and model["protocolVersion"] == "v2"
    assert model["storageUri"] != canary["spec"]["predictor"]["model"]["storageUri"]
    assert 0 < canary["spec"]["predictor"]["canaryTrafficPercent"] < 100
    stripped = json.loads(json.dumps(canary))
    stripped["spec"]["predictor"].pop("canaryTrafficPercent")
    stripped["spec"]["predictor"]["model"]["storageUri"] = model["storageUri"]
    assert stripped == main
    # The predictor's pods request what the layout's TorchServe runs: its workers x torch threads.
    props = read_properties(DEPLOY / "kserve" / "config.properties")
    (version,) = json.loads(props["model_snapshot"])["models"]["cifar3"].values()
    assert int(model["resources"]["requests"]["cpu"]) == version["maxWorkers"] * worker_threads()
    # KServe routes to TorchServe's inference port, which answers the Open Inference Protocol and its probes.
    port = int(props["inference_address"].rsplit(":", 1)[1])
    assert props["ts_open_inference_protocol"] == "true"
    assert model["ports"] == [{"containerPort": port, "protocol": "TCP"}]
    assert model["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": port}
    assert model["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": port}


def worker_threads() -> int:
    """Intra-op threads per TorchServe worker, from handler/model-config.yaml."""
    handler = yaml.safe_load((ROOT / "handler" / "model-config.yaml").read_text())["handler"]
    return int(handler["threads"])


# --- the plain Kubernetes deployment ----------------------------------------------------------------


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def test_kustomization_lists_every_manifest_and_the_config():
    kust = kustomization()
    assert kust["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and kust["kind"] == "Kustomization"
    listed = set(kust["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml") if p.name not in NOT_MANIFESTS}
    (generator,) = kust["configMapGenerator"]
    assert generator["files"] == ["config.properties"] and (K8S / "config.properties").is_file()
    mounted = one("Deployment", "cifar3-torchserve")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "config", "configMap": {"name": generator["name"]}} in mounted
    containers = [
        c for d in all_docs() if d["kind"] == "Deployment" for c in d["spec"]["template"]["spec"]["containers"]
    ]
    assert {c["image"] for c in containers} == {i["name"] for i in kust["images"]}
    namespace = one("Namespace", kust["namespace"])
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def dockerfile_value(path: Path, keyword: str) -> str:
    values = re.findall(rf"^{keyword}\s+(\S+)", path.read_text(), re.M)
    assert values, f"{path.name} has no {keyword}"
    return values[-1]


def test_pods_run_as_the_images_non_root_user_under_the_restricted_policy():
    images = {"cifar3-torchserve": ROOT / "Dockerfile", "cifar3-ui": ROOT / "ui" / "Dockerfile"}
    for name, dockerfile in images.items():
        pod = one("Deployment", name)["spec"]["template"]["spec"]
        uid = dockerfile_value(dockerfile, "USER").split(":")[0]
        assert pod["securityContext"]["runAsUser"] == int(uid) and pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["capabilities"] == {"drop": ["ALL"]}
            assert context["readOnlyRootFilesystem"] is True
            assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]


def test_torchserve_deployment_is_sized_probed_and_reachable_as_configured():
    deployment = one("Deployment", "cifar3-torchserve")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    props = read_properties(K8S / "config.properties")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert props["inference_address"] == f"http://0.0.0.0:{ports['inference']}"
    assert props["metrics_address"] == f"http://0.0.0.0:{ports['metrics']}"
    assert props["management_address"].startswith("http://127.0.0.1:"), "management stays inside the pod"
    assert props["enable_model_api"] == "false"
    # Only these keys differ from the Docker image's configuration (the addresses of the image's files aside).
    docker = read_properties(ROOT / "docker" / "config.properties")
    assert {k for k in docker.keys() | props.keys() if docker.get(k) != props.get(k)} == {
        "management_address",
        "disable_token_authorization",
        "ts_open_inference_protocol",  # without a token only: TorchServe checks the inference key on /v2 too
    }
    # The image's command, with the mounted configuration.
    args = container["args"]
    assert args[:4] == ["torchserve", "--start", "--foreground", "--ncs"]
    config_mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "config")
    assert args[args.index("--ts-config") + 1] == f"{config_mount}/config.properties"
    assert args[args.index("--model-store") + 1] == props["model_store"]
    # Readiness (and start-up) = the model has a READY worker, asked by serve.py inside the pod.
    ready = container["readinessProbe"]["exec"]["command"]
    assert container["startupProbe"]["exec"]["command"] == ready
    assert ready[:2] == ["python", "/opt/cifar3/scripts/serve.py"] and ready[-1] == "status"
    assert ready[ready.index("--config") + 1] == f"{config_mount}/config.properties"
    workdir = dockerfile_value(ROOT / "Dockerfile", "WORKDIR")
    assert ready[ready.index("--run-dir") + 1] == workdir
    assert container["livenessProbe"]["httpGet"] == {"path": "/ping", "port": "inference"}
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert {workdir, "/tmp", "/srv/cifar3/logs"} <= writable
    # CPU: the model's workers x torch threads.
    model_config = yaml.safe_load((ROOT / "handler" / "model-config.yaml").read_text())
    assert int(container["resources"]["requests"]["cpu"]) == model_config["minWorkers"] * worker_threads()
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_torchserve_pods_drain_before_they_stop():
    """A leaving pod keeps serving (preStop sleep) while its endpoint's removal spreads, and its grace period
    covers that sleep, the drain measured under load and TorchServe's measured stop time
    (reports/reliability-scaling.json, written by ``python -m bench.reliability --only scaling drain``)."""
    pod = one("Deployment", "cifar3-torchserve")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command  # the image has coreutils; no shell needed
    pre_stop = float(command[1])
    report = json.loads((ROOT / "reports" / "reliability-scaling.json").read_text())
    drain = next(r for r in report["results"] if r["check"].startswith("pod drain"))
    assert pre_stop >= 5 + drain["drain_s"], "a few seconds for endpoint removal to spread, then the drain"
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + 3 * drain["stop_s"]
    # Knative (KServe's serverless mode) refuses both fields and drains through its queue-proxy itself.
    for _, service in inference_services():
        predictor = service["spec"]["predictor"]
        assert "terminationGracePeriodSeconds" not in predictor and "lifecycle" not in predictor["model"]


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_service_autoscaler_budget_and_network_policy_fit_the_deployment():
    deployment = one("Deployment", "cifar3-torchserve")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    service = one("Service", "cifar3-torchserve")
    assert service["spec"]["type"] == "ClusterIP" and selects(service["spec"]["selector"], labels)
    port_names = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} == port_names

    hpa = one("HorizontalPodAutoscaler", "cifar3-torchserve")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "cifar3-torchserve"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and 0 < metric["resource"]["target"]["averageUtilization"] < 100

    pdb = one("PodDisruptionBudget", "cifar3-torchserve")
    assert selects(pdb["spec"]["selector"]["matchLabels"], labels)
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "a drain must be able to move a pod"

    policy = one("NetworkPolicy", "cifar3-torchserve")
    assert selects(policy["spec"]["podSelector"]["matchLabels"], labels)
    assert policy["spec"]["egress"] == [] and "Egress" in policy["spec"]["policyTypes"]
    ui_labels = one("Deployment", "cifar3-ui")["spec"]["template"]["metadata"]["labels"]
    admitted = {rule["ports"][0]["port"]: rule["from"] for rule in policy["spec"]["ingress"] if len(rule["ports"]) == 1}
    assert set(admitted) == {8080, 8082}
    assert any(
        selects(peer.get("podSelector", {}).get("matchLabels", {"-": "-"}), ui_labels) for peer in admitted[8080]
    )
    assert all("namespaceSelector" in peer for peer in admitted[8082])


def test_ui_deployment_points_at_the_service():
    ui = one("Deployment", "cifar3-ui")
    (container,) = ui["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    service = one("Service", "cifar3-torchserve")
    inference_port = next(p["port"] for p in service["spec"]["ports"] if p["targetPort"] == "inference")
    assert env["CIFAR3_INFERENCE_URL"] == f"http://{service['metadata']['name']}:{inference_port}"
    assert "CIFAR3_TOKEN" not in env and "CIFAR3_TOKEN_FILE" not in env  # no token in the cluster
    ui_service = one("Service", "cifar3-ui")
    assert selects(ui_service["spec"]["selector"], ui["spec"]["template"]["metadata"]["labels"])
    # The UI image's own health endpoint.
    assert container["readinessProbe"]["httpGet"]["path"] == "/_stcore/health"
    assert container["ports"][0]["containerPort"] == int(dockerfile_value(ROOT / "ui" / "Dockerfile", "EXPOSE"))
    ui_policy = one("NetworkPolicy", "cifar3-ui")
    egress_to_torchserve = [r for r in ui_policy["spec"]["egress"] if any("podSelector" in t for t in r["to"])]
    assert egress_to_torchserve and egress_to_torchserve[0]["ports"] == [{"port": inference_port, "protocol": "TCP"}]


# --- the Deployment's command and probes, run here -----------------------------------------------


@pytest.mark.server
def test_deployment_command_serves_without_token_and_its_probes_pass(model_store, tmp_path):
    """The container's args with deploy/kubernetes/config.properties (free loopback ports here), in the
    image's working folder; the readiness probe (serve.py status) passes once the model is READY, the liveness
    probe's /ping answers, and a prediction needs no token. SIGTERM to the group stops it all."""
    deployment = one("Deployment", "cifar3-torchserve")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    props = read_properties(K8S / "config.properties")
    ports = free_ports(5)
    for key, port in zip(("inference_address", "management_address", "metrics_address"), ports, strict=False):
        props[key] = re.sub(r"^http://[^:]+:\d+$", f"http://127.0.0.1:{port}", props[key])
    props["grpc_inference_port"], props["grpc_management_port"] = str(ports[3]), str(ports[4])
    props["model_store"] = str(model_store)
    config = tmp_path / "config.properties"
    config.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
    mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "config")
    image_paths = {f"{mount}/config.properties": str(config), "/opt/cifar3/model_store": str(model_store)}
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    run_dir.mkdir(), logs.mkdir()
    image_paths[dockerfile_value(ROOT / "Dockerfile", "WORKDIR")] = str(run_dir)
    image_paths["/opt/cifar3/scripts/serve.py"] = str(ROOT / "scripts" / "serve.py")

    argv = [str(Path(sys.executable).parent / container["args"][0])]
    argv += [image_paths.get(a, a) for a in container["args"][1:]]
    probe = [sys.executable] + [image_paths.get(a, a) for a in container["readinessProbe"]["exec"]["command"][1:]]
    tmp = Path(tempfile.mkdtemp(prefix="ts-k8s-"))  # Java's tmpdir (the pod's /tmp): worker sockets, short path
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "TMPDIR": str(tmp), "TEMP": str(tmp), "LOG_LOCATION": str(logs), "METRICS_LOCATION": str(logs)}  # fmt: skip
    with open(tmp_path / "torchserve.out", "wb") as out:
        server = subprocess.Popen(argv, cwd=run_dir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        before = subprocess.run(probe, capture_output=True, text=True, timeout=60, check=False)
        deadline, result = time.monotonic() + 240, before
        while time.monotonic() < deadline and server.poll() is None and result.returncode != 0:
            time.sleep(1)
            result = subprocess.run(probe, capture_output=True, text=True, timeout=60, check=False)
        log = (tmp_path / "torchserve.out").read_text(errors="replace")[-3000:]
        assert result.returncode == 0 and "cifar3: READY" in result.stdout, f"{result.stdout}{result.stderr}\n{log}"
        assert not (run_dir / "key_file.json").exists(), "token authorization is off in the cluster"
        inference = props["inference_address"]
        port = container["livenessProbe"]["httpGet"]["port"]
        assert port == "inference" and requests.get(f"{inference}/ping", timeout=10).status_code == 200
        # The Open Inference Protocol's health route, switched on in the cluster's configuration.
        assert requests.get(f"{inference}/v2/health/live", timeout=10).json() == {"live": True}
        image = io.BytesIO()
        Image.fromarray(class_images("ship", 1)[0]).save(image, format="PNG")
        answer = requests.post(f"{inference}/predictions/cifar3", data=image.getvalue(), timeout=60)
        assert answer.status_code == 200 and answer.json()["pred_class"] in ("airplane", "automobile", "ship")
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=90)
        after = subprocess.run(probe, capture_output=True, text=True, timeout=60, check=False)
        assert after.returncode == 1 and "NOT READY" in after.stdout
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)  # a worker Java left behind
        shutil.rmtree(tmp, ignore_errors=True)
