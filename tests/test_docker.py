"""Docker side: the two Dockerfiles, compose.yaml, .dockerignore and docker/config.properties.

No Docker engine is needed (none is assumed): hadolint lints the Dockerfiles, the files are parsed and
checked against the repository, the HEALTHCHECK runs against no server, and the serving image's CMD and
HEALTHCHECK run for real on this machine, with the container's paths mapped to the repository's files.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import pytest
import yaml
from conftest import free_ports

from cifar3_client.server import read_properties

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HADOLINT = BIN / "hadolint"
COMPOSE = ROOT / "compose.yaml"
SERVING_DOCKERFILE = ROOT / "Dockerfile"
UI_DOCKERFILE = ROOT / "ui" / "Dockerfile"
DOCKER_CONFIG = ROOT / "docker" / "config.properties"
MAR = "model_store/cifar3.mar"  # built by scripts/archive.sh, not tracked: the one COPY source allowed to be absent
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# Folders never searched for Dockerfiles (environments, data, build outputs).
NOT_SOURCE = {".git", ".venv", "data", "checkpoints", "run", "logs", "test-artifacts", "model_store", "node_modules"}
# Keys of docker/config.properties allowed to differ from config.properties, and why:
DOCKER_ONLY = {
    "inference_address",  # 0.0.0.0 inside the container, published on 127.0.0.1 by compose
    "management_address",
    "metrics_address",
    "model_store",  # absolute path inside the image
}


# --- parsing ------------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str
    workdir: str  # the WORKDIR in force for this instruction

    def exec_form(self) -> list[str]:
        """The JSON array of an exec-form CMD/ENTRYPOINT/HEALTHCHECK CMD (options stripped)."""
        text = self.args
        if self.keyword == "HEALTHCHECK":
            text = re.sub(r"^(--\S+\s+)*CMD\s+", "", text)
        assert text.startswith("["), f"{self.keyword} should use the exec form (JSON array): {self.args}"
        return json.loads(text)


@dataclass
class Dockerfile:
    path: Path
    instructions: list[Instruction] = field(default_factory=list)
    copies: list[tuple[str, str]] = field(default_factory=list)  # (source in the build context, absolute destination)

    @classmethod
    def parse(cls, path: Path) -> Dockerfile:
        image, current, workdir = cls(path), "", "/"
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if line.startswith("#") or (not line and not current):
                continue  # Docker drops comment lines, also inside a continued instruction
            if line.endswith("\\"):
                current += line[:-1] + " "
                continue
            keyword, _, args = (current + line).partition(" ")
            current = ""
            keyword, args = keyword.upper(), args.strip()
            if keyword == "WORKDIR":
                workdir = str(PurePosixPath(workdir, args))
            image.instructions.append(Instruction(keyword, args, workdir))
            if keyword in {"COPY", "ADD"}:
                parts = (
                    json.loads(args) if args.startswith("[") else [p for p in args.split() if not p.startswith("--")]
                )
                dest = str(PurePosixPath(workdir, parts[-1])) + ("/" if parts[-1].endswith("/") else "")
                for src in parts[:-1]:
                    # A file copied into a folder lands there under its own name.
                    into_folder = dest.endswith("/") and not (ROOT / src).is_dir()
                    image.copies.append((src, dest + PurePosixPath(src).name if into_folder else dest))
        return image

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"{self.path.relative_to(ROOT)} has no {keyword}"
        return found[-1]

    def copied_to(self, source: str) -> str:
        """The container path where the build-context file `source` is copied."""
        dests = [dest for src, dest in self.copies if src == source]
        assert len(dests) == 1, f"{self.path.relative_to(ROOT)} should COPY {source} exactly once, copies {dests}"
        return dests[0]

    def to_repo(self, container_path: str) -> Path:
        """The repository file that the image holds at `container_path`."""
        for src, dest in self.copies:
            if container_path == dest.rstrip("/"):
                return ROOT / src
            if dest.endswith("/") and container_path.startswith(dest):
                return ROOT / src / container_path[len(dest) :]
        raise AssertionError(f"{container_path} is not copied into {self.path.relative_to(ROOT)}")


def options(argv: list[str]) -> dict[str, str]:
    """--name value pairs of a command line."""
    return {a: b for a, b in zip(argv, argv[1:], strict=False) if a.startswith("--") and not b.startswith("--")}


def pins(extra: str | None = None) -> dict[str, str]:
    """name -> version of pyproject.toml's ``name==version`` dependencies: the base ones, plus those of an
    extra and of the extras it names (``cifar3[serve]``)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found: dict[str, str] = {}
    pending, seen = [None, extra], set()
    while pending:
        group = pending.pop()
        if group in seen:
            continue
        seen.add(group)
        for spec in project["dependencies"] if group is None else project["optional-dependencies"][group]:
            if spec.startswith(project["name"] + "["):
                pending += spec[len(project["name"]) + 1 : -1].split(",")
                continue
            match = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)$", spec)
            assert match, f"pyproject.toml: {spec!r} is not pinned as name==version"
            found[match[1].lower()] = match[2]
    return found


def dockerignore_excludes(patterns_text: str, path: str) -> bool:
    """Whether Docker leaves `path` out of the build context: the last matching pattern wins, and a pattern
    matching a parent folder matches everything below it (as in moby's patternmatcher)."""

    def regex(pattern: str) -> re.Pattern:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(f"^{out}$")

    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for raw in patterns_text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        if any(regex(pattern).match(c) for c in candidates):
            excluded = not negated
    return excluded


def hadolint_ignore_problems(text: str) -> list[str]:
    """Each `# hadolint ignore=` must be inline (no global ignores) with a written reason on the line above."""
    problems, lines = [], text.splitlines()
    for n, line in enumerate(lines):
        if not re.match(r"\s*#\s*hadolint\b", line, re.I):
            continue
        if not re.fullmatch(r"\s*#\s*hadolint ignore=DL\d{4}(,DL\d{4})*\s*", line):
            problems.append(f"line {n + 1}: only inline `# hadolint ignore=DLxxxx` is allowed: {line.strip()}")
            continue
        above = lines[n - 1].strip() if n else ""
        reason = above.lstrip("#").strip()
        if not above.startswith("#") or re.match(r"hadolint\b", reason, re.I) or len(reason.split()) < 3:
            problems.append(f"line {n + 1}: {line.strip()} needs a reason in a comment right above it")
    return problems


def service_ports(service: dict) -> list[tuple[str | None, int]]:
    """(host IP, container port) of each published port, short or long compose syntax."""
    published = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            published.append((port.get("host_ip"), int(port["target"])))
        else:
            parts = str(port).split("/")[0].rsplit(":", 2)
            published.append((parts[0] if len(parts) == 3 else None, int(parts[-1])))
    return published


def service_mounts(service: dict) -> list[dict]:
    """Volume mounts as {'source', 'target', 'read_only'}, short or long compose syntax."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            mounts.append(
                {
                    "source": volume.get("source"),
                    "target": volume["target"],
                    "read_only": bool(volume.get("read_only", False)),
                }
            )
        else:
            source, target, *mode = volume.split(":")
            mounts.append({"source": source, "target": target, "read_only": "ro" in ",".join(mode).split(",")})
    return mounts


def service_env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def port_of(url: str) -> int:
    return urlparse(url).port


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def serving() -> Dockerfile:
    return Dockerfile.parse(SERVING_DOCKERFILE)


@pytest.fixture(scope="module")
def ui() -> Dockerfile:
    return Dockerfile.parse(UI_DOCKERFILE)


def run_hadolint(*paths: Path, cwd: Path) -> subprocess.CompletedProcess:
    """hadolint with its defaults only: run outside the repository with an empty HOME and no HADOLINT_* variables,
    so no .hadolint.yaml or environment setting can silence a rule (ignores must be inline)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    env.update(HOME=str(cwd), XDG_CONFIG_HOME=str(cwd))
    return subprocess.run(
        [str(HADOLINT), "--no-color", *map(str, paths)],
        cwd=cwd,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


# --- hadolint -----------------------------------------------------------------------------------


def all_dockerfiles() -> list[Path]:
    found = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT).parts
        if rel[0] in NOT_SOURCE or any(part.startswith(".") or part == "__pycache__" for part in rel):
            continue
        if path.is_file() and (
            path.name == "Dockerfile" or path.name.startswith("Dockerfile.") or path.name.endswith(".Dockerfile")
        ):
            found.append(path)
    return sorted(found)


def test_hadolint_finds_nothing_in_any_dockerfile(tmp_path):
    dockerfiles = all_dockerfiles()
    assert {SERVING_DOCKERFILE, UI_DOCKERFILE} <= set(dockerfiles)
    result = run_hadolint(*dockerfiles, cwd=tmp_path)
    # Empty output: not even style findings, which hadolint's default threshold would let pass.
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_reports_a_bad_dockerfile(tmp_path):
    """The lint above is real: the same invocation flags an unpinned, uncleaned apt install and an untagged base."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get update && apt-get install -y curl\n")
    result = run_hadolint(bad, cwd=tmp_path)
    assert result.returncode != 0
    for rule in ("DL3006", "DL3008", "DL3009", "DL3015"):
        assert rule in result.stdout, result.stdout


def test_hadolint_ignores_are_inline_and_explained():
    for dockerfile in all_dockerfiles():
        assert hadolint_ignore_problems(dockerfile.read_text()) == [], dockerfile
    # The checker itself: a bare ignore, a global ignore and a hadolint line as "reason" are refused.
    assert hadolint_ignore_problems("FROM x\n# hadolint ignore=DL3008\nRUN y\n")
    assert hadolint_ignore_problems("# hadolint global ignore=DL3008\nFROM x\n")
    assert hadolint_ignore_problems("# hadolint ignore=DL3013\n# hadolint ignore=DL3008\nRUN y\n")
    assert not hadolint_ignore_problems(
        "# Debian pins this JRE's patch level itself\n# hadolint ignore=DL3008\nRUN y\n"
    )


# --- compose.yaml -------------------------------------------------------------------------------


def test_compose_builds_each_service_from_the_repository(compose):
    assert set(compose["services"]) == {"torchserve", "ui"}
    built = {}
    for name, service in compose["services"].items():
        build = service["build"]
        context = (ROOT / build["context"]).resolve()
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert context == ROOT, f"{name}: the Dockerfiles COPY repository paths, and .dockerignore is at the root"
        assert dockerfile.is_file(), f"{name}: {dockerfile} not found"
        built[name] = dockerfile
    assert built == {"torchserve": SERVING_DOCKERFILE, "ui": UI_DOCKERFILE}


def test_compose_publishes_ports_on_loopback_only(compose, serving, ui):
    for name, service in compose["services"].items():
        published = service_ports(service)
        assert published, f"{name} publishes no port"
        for host_ip, port in published:
            assert host_ip == "127.0.0.1", f"{name}: port {port} is published on {host_ip or 'every interface'}"
        assert service.get("network_mode") != "host" and not service.get("privileged")
    props = read_properties(DOCKER_CONFIG)
    api_ports = {port_of(props[f"{api}_address"]) for api in ("inference", "management", "metrics")}
    serving_exposed = {int(p) for i in serving.all("EXPOSE") for p in i.args.split()}
    assert {port for _, port in service_ports(compose["services"]["torchserve"])} == api_ports == serving_exposed
    ui_cmd = options(ui.last("CMD").exec_form())
    ui_exposed = {int(p) for i in ui.all("EXPOSE") for p in i.args.split()}
    assert (
        {port for _, port in service_ports(compose["services"]["ui"])} == ui_exposed == {int(ui_cmd["--server.port"])}
    )


def test_ui_reaches_torchserve_by_service_name(compose):
    env = service_env(compose["services"]["ui"])
    props = read_properties(DOCKER_CONFIG)
    for variable, api in (("CIFAR3_INFERENCE_URL", "inference"), ("CIFAR3_MANAGEMENT_URL", "management")):
        url = urlparse(env[variable])
        assert (url.scheme, url.hostname, url.port) == ("http", "torchserve", port_of(props[f"{api}_address"]))
    # A token never travels in the environment: the UI reads it from the shared key file.
    assert not any("token" in k.lower() and "file" not in k.lower() for k in env)


def test_key_volume_is_shared_read_only_with_the_ui(compose, serving, ui):
    services = compose["services"]
    run_dir = serving.last("WORKDIR").workdir  # TorchServe's start folder: key_file.json lands here
    server_mounts = [m for m in service_mounts(services["torchserve"]) if m["target"] == run_dir]
    assert len(server_mounts) == 1, f"torchserve must mount a named volume on its start folder {run_dir}"
    volume = server_mounts[0]["source"]
    assert volume in (compose.get("volumes") or {}), f"{volume} is not a named volume"
    assert not server_mounts[0]["read_only"]
    ui_mounts = [m for m in service_mounts(services["ui"]) if m["source"] == volume]
    assert len(ui_mounts) == 1 and ui_mounts[0]["read_only"], "the ui must mount the key volume read-only"
    token_file = service_env(services["ui"])["CIFAR3_TOKEN_FILE"]
    assert PurePosixPath(token_file) == PurePosixPath(ui_mounts[0]["target"], "key_file.json")
    # TorchServe writes key_file.json with mode 600: only the same uid can read it in the ui container.
    assert ui.last("USER").args == serving.last("USER").args
    assert services["ui"]["depends_on"]["torchserve"]["condition"] == "service_healthy"


# --- the Dockerfiles ----------------------------------------------------------------------------


def test_every_copied_file_exists_or_is_built_by_archive_sh(serving, ui):
    for image in (serving, ui):
        assert image.copies, image.path
        for source, _ in image.copies:
            if source == MAR:
                continue
            assert (ROOT / source).exists(), f"{image.path.relative_to(ROOT)} copies {source}, which does not exist"
    assert MAR in [src for src, _ in serving.copies]
    # model_store/cifar3.mar is archive.sh's output with its defaults: $root/model_store and model name cifar3.
    script = (ROOT / "scripts" / "archive.sh").read_text()
    store = re.search(r'^model_store="\$\{MODEL_STORE:-\$root/([^}"]+)\}"', script, re.M)
    name = re.search(r'^model_name="\$\{MODEL_NAME:-([^}"]+)\}"', script, re.M)
    assert store and name, "scripts/archive.sh no longer states its default output"
    assert re.search(r'--model-name "\$model_name"', script) and re.search(r'--export-path "\$model_store"', script)
    assert f"{store[1]}/{name[1]}.mar" == MAR


def test_dockerignore_keeps_copied_files_and_drops_the_rest(serving, ui):
    patterns = (ROOT / ".dockerignore").read_text()
    for image in (serving, ui):
        for source, _ in image.copies:
            assert not dockerignore_excludes(patterns, source), f"{source} is COPY'd but .dockerignore drops it"
    assert not dockerignore_excludes(patterns, "ui/app.py")
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "data/cifar3/train/x.png",
        "checkpoints/cifar3.pt",
        "run/key_file.json",
        "key_file.json",
        "test-artifacts/report.html",
        ".pytest_cache/v/x",
        ".ruff_cache/x",
        ".hypothesis/x",
        "ui/__pycache__/app.cpython-311.pyc",
        "model_store/old.mar",
        "reports/benchmark.md",
        "logs/ts_log.log",
    ):
        assert dockerignore_excludes(patterns, path), f"{path} would be sent to the Docker build"
    # The matcher itself: a negation re-includes, and a folder pattern covers what is below it.
    assert dockerignore_excludes("data\n", "data/a/b") and not dockerignore_excludes("x/*\n!x/y\n", "x/y")


def project_installs(image: Dockerfile) -> list[tuple[int, str]]:
    """(index among the RUNs, extras) of each `pip install ".[extras]"` of the copied project."""
    return [
        (n, extras)
        for n, i in enumerate(image.all("RUN"))
        for extras in re.findall(r'pip install [^&]*"\.\[([\w,]+)\]"', i.args)
    ]


def test_serving_image_installs_the_serve_dependencies_with_cpu_torch(serving):
    assert serving.copied_to("pyproject.toml") == str(PurePosixPath(serving.last("RUN").workdir, "pyproject.toml"))
    installs = project_installs(serving)
    assert [extras for _, extras in installs] == ["serve"], "the serving image should pip install '.[serve]'"
    runs = serving.all("RUN")
    torch = [n for n, i in enumerate(runs) if "torch==" in i.args]
    assert len(torch) == 1 and torch[0] < installs[0][0], "CPU torch must be installed before the project"
    torch_run = runs[torch[0]].args
    assert re.search(rf"--index-url\s+{re.escape(CPU_INDEX)}(\s|$)", torch_run)
    wanted = pins("serve")
    for package in ("torch", "torchvision"):
        assert re.search(rf"(^|\s){package}=={re.escape(wanted[package])}(\s|$)", torch_run), package
    # Serving needs no training, UI or benchmark code or dependencies.
    assert not {"streamlit", "scikit-learn", "matplotlib", "litserve"} & wanted.keys()
    assert not [src for src, _ in serving.copies if PurePosixPath(src).parts[0] in ("training", "ui", "bench")]
    for package in ("torchserve", "torch-model-archiver", "pyyaml", "onnxruntime", "captum"):
        assert package in wanted, package


def test_images_run_as_the_same_non_root_user(serving, ui):
    for image in (serving, ui):
        user = image.last("USER").args
        uid = user.split(":")[0]
        assert uid.isdigit() and int(uid) != 0, f"{image.path.relative_to(ROOT)}: USER {user} (numeric, non-root)"
        assert any(re.search(rf"useradd\b.*--uid {uid}\b", i.args) for i in image.all("RUN")), "the user must exist"
        assert image.instructions.index(image.last("USER")) > max(image.instructions.index(i) for i in image.all("RUN"))


def test_images_have_healthchecks_and_exposed_ports(serving, ui):
    for image in (serving, ui):
        assert image.all("EXPOSE"), image.path
        assert not re.match(r"NONE\b", image.last("HEALTHCHECK").args)
    probe = ui.last("HEALTHCHECK").exec_form()
    assert "http://127.0.0.1:8501/_stcore/health" in " ".join(probe)
    cmd = ui.last("CMD").exec_form()
    assert cmd[:2] == ["streamlit", "run"] and ui.to_repo(str(PurePosixPath(ui.last("CMD").workdir, cmd[2]))) == (
        ROOT / "ui" / "app.py"
    )
    assert options(cmd) == {"--server.address": "0.0.0.0", "--server.port": "8501", "--server.headless": "true"}


def test_serving_healthcheck_asks_for_a_ready_model(serving):
    check = serving.last("HEALTHCHECK").exec_form()
    opts = options(check)
    assert serving.to_repo(check[1]) == ROOT / "scripts" / "serve.py" and check[-1] == "status"
    assert serving.to_repo(opts["--config"]) == DOCKER_CONFIG
    assert opts["--run-dir"] == serving.last("WORKDIR").workdir  # where TorchServe writes key_file.json


def test_serving_healthcheck_fails_when_no_model_is_ready(serving, tmp_path):
    """The HEALTHCHECK command, run here, says NOT READY and exits 1 when no server (or no key) is there."""
    check = serving.last("HEALTHCHECK").exec_form()
    argv = [sys.executable, str(serving.to_repo(check[1]))]
    for arg in check[2:]:
        argv.append(
            str(tmp_path)
            if arg == options(check)["--run-dir"]
            else str(serving.to_repo(arg))
            if arg.startswith("/")
            else arg
        )
    result = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "NOT READY" in result.stdout, result.stdout + result.stderr


def test_docker_config_matches_the_repository_config(serving):
    root, docker = read_properties(ROOT / "config.properties"), read_properties(DOCKER_CONFIG)
    differing = {k for k in root.keys() | docker.keys() if root.get(k) != docker.get(k)}
    assert differing <= DOCKER_ONLY, (
        f"docker/config.properties differs from config.properties in {differing - DOCKER_ONLY}"
    )
    assert docker["disable_token_authorization"] == "false" and docker["enable_model_api"] == "false"
    for api in ("inference", "management", "metrics"):
        url = urlparse(docker[f"{api}_address"])
        assert url.hostname == "0.0.0.0" and url.port == port_of(root[f"{api}_address"]), api
    assert float(docker.get("token_expiration_min", 60)) >= 30 * 24 * 60
    # The image's config names the copied archive and is the one the CMD starts TorchServe with.
    assert serving.copied_to(MAR) == str(PurePosixPath(docker["model_store"], docker["load_models"]))
    cmd = serving.last("CMD").exec_form()
    assert cmd[:3] == ["torchserve", "--start", "--foreground"] and "--ncs" in cmd
    assert serving.to_repo(options(cmd)["--ts-config"]) == DOCKER_CONFIG
    assert options(cmd)["--model-store"] == docker["model_store"]
    # tini -g: `docker stop` reaches Java and its workers, not only the torchserve launcher.
    assert serving.last("ENTRYPOINT").exec_form()[:2] == ["/usr/bin/tini", "-g"]


def test_ui_image_installs_the_ui_dependencies_only(ui):
    """The UI image installs the project's `ui` extra, pinned to the versions the tests run with, and no torch."""
    assert [extras for _, extras in project_installs(ui)] == ["ui"]
    ui_pins = pins("ui")
    assert {"streamlit", "requests"} <= ui_pins.keys() and not {"torch", "torchvision"} & ui_pins.keys()
    for name, version in ui_pins.items():
        assert version == importlib.metadata.version(name), name
    # The client package, and none of the serving core, training or handler (or their dependencies).
    assert not [src for src, _ in ui.copies if PurePosixPath(src).parts[0] in ("cifar3", "training", "handler")]
    assert "cifar3_client/client.py" in [src for src, _ in ui.copies]


def imported_modules(source: str) -> set[str]:
    """Top-level names of the absolute imports in Python source."""
    modules = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module.split(".")[0])
    return modules


def test_ui_image_installs_what_the_ui_code_imports(ui):
    """Every module ui/ imports is the standard library, repository code the UI image copies, or a distribution
    pinned in the `ui` extra (a direct import must not rely on some other package's dependency)."""
    cmd = ui.last("CMD").exec_form()
    app = ui.to_repo(str(PurePosixPath(ui.last("CMD").workdir, cmd[2])))
    assert app.is_file(), f"{app} (the UI image's CMD) is missing"
    copied_files = [
        path
        for source, _ in ui.copies
        for path in ([ROOT / source] if (ROOT / source).is_file() else (ROOT / source).rglob("*.py"))
    ]
    # setup.py runs only while pip builds the project, with pyproject.toml's build requirements (setuptools).
    sources = [p for p in copied_files if p.suffix == ".py" and "__pycache__" not in p.parts and p != ROOT / "setup.py"]
    assert app in sources
    pinned = set(pins("ui"))
    providers = importlib.metadata.packages_distributions()
    missing = []
    for source in sources:
        for module in sorted(imported_modules(source.read_text()) - set(sys.stdlib_module_names)):
            local = [ROOT / module, ROOT / f"{module}.py", app.parent / module, app.parent / f"{module}.py"]
            hit = next((p for p in local if p.exists()), None)
            if hit:  # repository code: installed with the project (pip install ".[ui]")
                if not any(hit == f or hit in f.parents for f in copied_files):
                    missing.append(f"{module} ({hit.relative_to(ROOT)} is not copied into the UI image)")
                continue
            dists = {d.lower().replace("_", "-") for d in providers.get(module, [])}
            if not dists & pinned:
                missing.append(f"{module} (distribution {sorted(dists) or '?'} not in the ui extra)")
    assert not missing, (
        f"{sorted({str(s.relative_to(ROOT)) for s in sources})} import what the UI image lacks: {missing}"
    )


# --- the serving image's command, run here ------------------------------------------------------


@pytest.mark.server
def test_container_command_serves_the_model_and_keeps_keys_in_its_workdir(serving, model_store, tmp_path):
    """The CMD and HEALTHCHECK of the serving image, on this machine: the docker config (on free loopback ports),
    the archive archive.sh builds, TorchServe in the foreground started in the run folder. The HEALTHCHECK passes
    once the model is READY; key_file.json (mode 600) is the only thing in the run folder (the shared volume);
    SIGTERM to the process group, as tini -g sends it, stops everything."""
    assert (model_store / PurePosixPath(MAR).name).is_file()
    cmd, check = serving.last("CMD").exec_form(), serving.last("HEALTHCHECK").exec_form()
    config = tmp_path / "config.properties"
    props = read_properties(serving.to_repo(options(cmd)["--ts-config"]))
    for api, port in zip(("inference", "management", "metrics"), free_ports(3), strict=True):
        props[f"{api}_address"] = f"http://127.0.0.1:{port}"
    # TorchServe's gRPC APIs (unpublished, loopback of the container) default to 7070/7071: free ports here.
    props["grpc_inference_port"], props["grpc_management_port"] = map(str, free_ports(2))
    props["model_store"] = str(model_store)
    config.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
    # TEMP becomes Java's tmpdir, where the workers' Unix sockets go: private to each container, and here to
    # this test (a short path: a socket name has at most 107 bytes).
    tmp = Path(tempfile.mkdtemp(prefix="ts-docker-"))
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    for folder in (run_dir, logs):
        folder.mkdir()
    env_in_image = " ".join(i.args for i in serving.all("ENV"))
    assert re.search(r"\bLOG_LOCATION=/", env_in_image) and serving.last("WORKDIR").workdir not in env_in_image
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "TMPDIR": str(tmp),
        "TEMP": str(tmp),
        "LOG_LOCATION": str(logs),
        "METRICS_LOCATION": str(logs),
    }
    argv = [str(BIN / cmd[0]), *cmd[1:]]
    argv[argv.index("--ts-config") + 1], argv[argv.index("--model-store") + 1] = str(config), str(model_store)
    probe = [sys.executable, str(serving.to_repo(check[1])), *check[2:]]
    probe[probe.index("--config") + 1], probe[probe.index("--run-dir") + 1] = str(config), str(run_dir)

    with open(tmp_path / "torchserve.out", "wb") as out:
        server = subprocess.Popen(
            argv,
            cwd=run_dir,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        deadline, result = time.monotonic() + 240, None
        while time.monotonic() < deadline and server.poll() is None:
            result = subprocess.run(probe, check=False, capture_output=True, text=True, timeout=60)
            if result.returncode == 0:
                break
            time.sleep(1)
        log = (tmp_path / "torchserve.out").read_text(errors="replace")[-3000:]
        assert result is not None and result.returncode == 0, f"{result and result.stdout}\n{log}"
        assert "cifar3: READY" in result.stdout
        key_file = run_dir / "key_file.json"
        assert sorted(p.name for p in run_dir.iterdir()) == ["key_file.json"]
        assert key_file.stat().st_mode & 0o777 == 0o600
        assert {"inference", "management"} <= json.loads(key_file.read_text()).keys()

        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=90)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and group_alive(server.pid):
            time.sleep(0.5)
        assert not group_alive(server.pid), "Java or a worker outlived SIGTERM to the process group"
        assert subprocess.run(probe, check=False, capture_output=True, text=True, timeout=60).returncode == 1
    finally:
        if group_alive(server.pid):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


def group_alive(pgid: int) -> bool:
    """Whether a process of the group is still running (zombies do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False
