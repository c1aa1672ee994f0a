"""The server lifecycle: start, stop and query a cifar3 TorchServe, and servers of their own for tests and tools.

``Server`` is one TorchServe instance: its config.properties and its run folder. TorchServe starts in the run
folder, so ``RUN/key_file.json`` holds the tokens (mode 600), ``RUN/logs/`` the logs, ``RUN/tmp/`` the pid file.
``start_server`` starts one of its own on free loopback ports (tests, bench); ``write_tls_certificate`` writes a
self-signed certificate for https:// addresses. The command line over them is cifar3_client/cli.py
(``scripts/serve.py``, ``cifar3-serve``).

Defaults are relative paths, so they name the current directory's ``config.properties`` and ``run/``: installed,
this module cannot know where a repository is. Tests and tools run from the repository root; scripts/serve.py
passes its repository root explicitly.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests

from cifar3_client.client import Cifar3Client, ClientError, Config, ca_bundle_from_env, read_key_file

DEFAULT_CONFIG = Path("config.properties")  # relative: the current directory's (see above)
DEFAULT_RUN_DIR = Path("run")
DEFAULT_MODEL = "cifar3"
JAVA_MAIN_CLASS = "org.pytorch.serve.ModelServer"  # on the command line of TorchServe's Java, and only there
# ts_log.log lines by which TorchServe 0.12 says a model will not load:
#   "ModelServer - Failed to load model: cifar3.mar"  (the archive cannot be read: truncated, not a zip;
#                                                       the model is then not registered at all)
#   "BatchAggregator - Load model failed: cifar3, error: Worker died."  (the archive opened but the
#                                                       handler failed in initialize(); retried forever)
#   "MODEL_LOG - Failed to load model cifar3, exception ..."  (the worker's own report of the same)
LOAD_FAILURE = re.compile(r"Failed to (load|register) model|Load model failed|InvalidModelException")
# The exception that explains it: a Java stack-trace head, or a Python error the worker logged.
JAVA_ERROR = re.compile(r"^((?:[a-z]\w*\.)+[A-Z]\w*(?:Exception|Error)\b.*)$")
PYTHON_ERROR = re.compile(r"MODEL_LOG - ((?:[A-Za-z_][\w.]*)?(?:Error|Exception)\b: .*)$")
START_MARKER = b"Torchserve version:"  # the banner TorchServe logs once per start
# torchserve.out lines that say why the Java process exited during start-up (e.g. a port in use).
STARTUP_FAILURE = re.compile(r"Failed to bind|Address already in use|Exception in thread \"main\"|Error: ", re.I)


class ServerError(RuntimeError):
    """The server cannot be started or used; the message says why and what to do."""


def read_properties(path: Path) -> dict[str, str]:
    """key -> value of a Java properties file such as TorchServe's config.properties."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ServerError(
            f"{Path(path).absolute()} not found: run from the repository root or give the config's path (--config)"
        ) from None
    props = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


@dataclass
class Server:
    """Where one TorchServe instance listens and keeps its state."""

    config: Path = DEFAULT_CONFIG
    run_dir: Path = DEFAULT_RUN_DIR
    model: str = DEFAULT_MODEL

    def __post_init__(self):
        self.config, self.run_dir = Path(self.config).resolve(), Path(self.run_dir).resolve()
        self._log_offset: int | None = None  # where this object's start() began in ts_log.log
        self.killed_on_stop: list[int] = []  # worker pids the last stop() had to kill (Java left them)
        self.orphaned_on_stop: list[int] = []  # workers started as Java stopped, which it never connected to
        props = read_properties(self.config)

        def reachable(address: str) -> str:
            # A server on every interface (0.0.0.0, in a container) is asked on loopback: the name an https://
            # certificate can carry (tls-cert's 127.0.0.1), where 0.0.0.0 is no host name at all.
            return address.replace("://0.0.0.0:", "://127.0.0.1:")

        self.inference_url = reachable(props.get("inference_address", "http://127.0.0.1:8080"))
        self.management_url = reachable(props.get("management_address", "http://127.0.0.1:8081"))
        self.metrics_url = reachable(props.get("metrics_address", "http://127.0.0.1:8082"))
        store = Path(props.get("model_store", "model_store"))
        self.model_store = store if store.is_absolute() else (self.config.parent / store).resolve()

    @property
    def key_file(self) -> Path:
        return self.run_dir / "key_file.json"

    @property
    def tmp_dir(self) -> Path:
        return self.run_dir / "tmp"

    @property
    def pid_file(self) -> Path:
        return self.tmp_dir / ".model_server.pid"

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    def token(self, api: str = "inference") -> str:
        """The current key for 'inference' or 'management' from key_file.json."""
        try:
            return read_key_file(self.key_file)[api]
        except (ClientError, KeyError):
            raise ServerError(f"no {api} token in {self.key_file}: is the server running (serve.py start)?") from None

    def command(self) -> list[str]:
        """The command line (cifar3_client/cli.py, as scripts/serve.py runs it) for this server: append a
        subcommand (status, predict, ...)."""
        return [
            sys.executable,
            "-m",
            "cifar3_client.cli",
            "--config",
            str(self.config),
            "--run-dir",
            str(self.run_dir),
        ]

    def client(self, timeout: float = 60.0) -> Cifar3Client:
        """The project's HTTP client for this server, with its key file and CIFAR3_CA_BUNDLE for https://."""
        return Cifar3Client(
            Config(
                self.inference_url,
                self.management_url,
                str(self.key_file),
                timeout=timeout,
                model=self.model,
                ca_bundle=ca_bundle_from_env(os.environ),
            )
        )

    def headers(self, api: str = "inference") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(api)}"}

    def pid(self) -> int | None:
        """TorchServe's Java process, or None. A pid file that Java left behind (killed, out of memory, a
        reboot) may name a process that has since taken the pid: it is removed, never signalled."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        with contextlib.suppress(psutil.Error):  # gone, or another user's: not the server this user started
            if JAVA_MAIN_CLASS in psutil.Process(pid).cmdline():
                return pid
        self.pid_file.unlink(missing_ok=True)
        return None

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        venv_bin = str(Path(sys.executable).parent)
        env.update(
            TMPDIR=str(self.tmp_dir),
            LOG_LOCATION=str(self.log_dir),
            METRICS_LOCATION=str(self.log_dir),
            PATH=f"{venv_bin}{os.pathsep}{env.get('PATH', '')}",
        )
        # TEMP becomes Java's java.io.tmpdir, where the frontend puts its workers' Unix sockets
        # (.ts.sock.9000, ...). The default /tmp is shared by every TorchServe on the machine, and
        # two servers' worker 9000 would take over each other's socket; run/tmp keeps them apart
        # (if its path is short enough for a socket name, 107 bytes on Linux).
        if len(str(self.tmp_dir / ".ts.sock.65535").encode()) < 100:
            env["TEMP"] = str(self.tmp_dir)
        return env

    def start(self, timeout: float = 180.0) -> None:
        """Start TorchServe (no snapshot restored) and wait until the model has a READY worker."""
        if self.pid():
            raise ServerError(f"a server from {self.run_dir} is already running (pid {self.pid()}); stop it first")
        torchserve = shutil.which("torchserve", path=self._env()["PATH"])
        if not torchserve:
            raise ServerError("torchserve not found: run scripts/setup.sh to install the environment")
        if not shutil.which("java"):
            raise ServerError("java not found: TorchServe needs Java 17 (apt-get install -y openjdk-17-jre-headless)")
        mar = self.model_store / f"{self.model}.mar"
        if not mar.is_file():
            raise ServerError(f"{mar} not found: build it with scripts/archive.sh")
        for folder in (self.run_dir, self.tmp_dir, self.log_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.key_file.unlink(missing_ok=True)
        log = self.log_dir / "ts_log.log"
        self._log_offset = log.stat().st_size if log.exists() else 0  # only this start's lines count
        out = self.run_dir / "torchserve.out"
        old_umask = os.umask(0o077)  # key_file.json and logs readable by this user only
        try:
            with open(out, "wb") as log:  # a file, not a pipe: Java keeps this descriptor open
                subprocess.run(
                    [
                        torchserve,
                        "--start",
                        "--ncs",
                        "--ts-config",
                        str(self.config),
                        "--model-store",
                        str(self.model_store),
                    ],
                    cwd=self.run_dir,
                    env=self._env(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    check=True,
                    timeout=60,
                )
        finally:
            os.umask(old_umask)
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        """Return when the model has a READY worker; ServerError as soon as it is clear that it never will."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.state()
            if state["ready"]:
                if self.key_file.exists():
                    self.key_file.chmod(0o600)
                return
            failure = self.load_failure()
            if failure:
                raise ServerError(f"model {self.model} failed to load: {failure} (see {self.log_dir}/ts_log.log)")
            if not self.pid():
                raise ServerError(
                    f"TorchServe exited during start-up: {self.startup_failure()} "
                    f"(see {self.run_dir}/torchserve.out and {self.log_dir}/ts_log.log)"
                )
            if time.monotonic() > deadline:
                raise ServerError(
                    f"model {self.model} not ready after {timeout:.0f}s: {state['reason']} "
                    f"(see {self.log_dir}/model_log.log)"
                )
            time.sleep(0.5)

    def _log_lines(self) -> list[str]:
        """ts_log.log lines of the latest start: from this object's start() if it made one, else from
        the last start banner (the log keeps earlier runs' lines)."""
        try:
            data = (self.log_dir / "ts_log.log").read_bytes()
        except OSError:
            return []
        if self._log_offset is not None and self._log_offset <= len(data):
            data = data[self._log_offset :]
        else:
            marker = data.rfind(START_MARKER)
            data = data[data.rfind(b"\n", 0, marker) + 1 :] if marker >= 0 else data
        return data.decode(errors="replace").splitlines()

    def load_failure(self) -> str | None:
        """Why the model failed to load in the latest start, from ts_log.log, or None."""
        lines = self._log_lines()
        for i, line in enumerate(lines):
            if not LOAD_FAILURE.search(line):
                continue
            message = line.split(" - ", 1)[-1].strip()
            cause = next(
                (m.group(1) for later in lines[i + 1 : i + 20] if (m := JAVA_ERROR.match(later.strip()))), None
            )
            if cause is None:  # a worker died while loading: the Python error it logged just before
                cause = next(
                    (
                        m.group(1)
                        for earlier in reversed(lines[max(0, i - 400) : i])
                        if (m := PYTHON_ERROR.search(earlier))
                    ),
                    None,
                )
            return (message + (f" ({cause.strip()[:300]})" if cause else ""))[:500]
        return None

    def startup_failure(self) -> str:
        """Why the Java process exited during start-up, from torchserve.out (e.g. a port already in use)."""
        try:
            lines = (self.run_dir / "torchserve.out").read_text(errors="replace").splitlines()
        except OSError:
            return "no output"
        found = [line.strip() for line in lines if STARTUP_FAILURE.search(line)]
        reason = found[0] if found else next((line.strip() for line in reversed(lines) if line.strip()), "no output")
        if "bind" in reason.lower() or "address already in use" in reason.lower():
            reason += (
                " (another server holds that port: give this one other ports in its config, e.g. "
                "grpc_inference_port / grpc_management_port for the gRPC APIs on 7070/7071)"
            )
        return reason[:500]

    def state(self) -> dict:
        """{'ping': bool, 'ready': bool, 'workers': [...], 'reason': str} from /ping and the management API.

        /ping wants the inference token in TorchServe 0.12, and says Healthy even when the model never
        loaded: 'ready' (a READY worker of the model) is what counts."""
        state = {"ping": False, "ready": False, "workers": [], "reason": ""}
        client = self.client()
        state["ping"] = client.ping_status() == 200
        try:
            description = client.describe()
        except ClientError as exc:
            if exc.kind == "not_found":
                failure = self.load_failure()
                state["reason"] = f"model {self.model} is not loaded" + (f": {failure}" if failure else "")
            elif exc.kind == "unreachable":
                state["reason"] = f"server not reachable at {self.inference_url}"
            else:
                state["reason"] = exc.message
            return state
        workers = description.get("workers") or []
        state["workers"] = workers
        state["batch_size"] = description.get("batchSize")
        state["ready"] = any(w.get("status") == "READY" for w in workers)
        if not state["ready"]:
            failure = self.load_failure()
            state["reason"] = f"model {self.model} has no READY worker ({len(workers)} workers)" + (
                f": {failure}" if failure else ""
            )
        return state

    def stop(self, timeout: float = 60.0) -> bool:
        """Stop the server and wait for Java and its workers to exit. False if none was running."""
        pid = self.pid()
        if pid is None:
            return False
        workers = _descendants(pid)
        subprocess.run(
            ["torchserve", "--stop"],
            env=self._env(),
            cwd=self.run_dir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
            timeout=60,
        )
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
        # Java stops its workers on the way out; wait for them, and kill any it left behind.
        deadline = time.monotonic() + 15
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        self.killed_on_stop = [w for w in workers if _alive(w)]
        # A worker Java (re)started in its last moments, e.g. after a failed load, was not below it when
        # the stop began and was never connected to: it would wait on its socket for ever.
        self.orphaned_on_stop = [p.pid for p in self._socket_workers() if p.pid not in workers]
        for worker in self.killed_on_stop + self.orphaned_on_stop:
            with contextlib.suppress(OSError):
                os.kill(worker, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        return True

    def processes(self) -> list[psutil.Process]:
        """The running Java and worker processes of this server: Java and what hangs below it, and the workers
        with a socket in this server's folder wherever they hang (a worker Java never connected to)."""
        found = {}
        with contextlib.suppress(psutil.Error):
            if pid := self.pid():
                java = psutil.Process(pid)
                found = {p.pid: p for p in [java, *java.children(recursive=True)]}
        found.update({p.pid: p for p in self._socket_workers()})
        return [p for p in found.values() if _alive(p.pid)]

    def _socket_workers(self) -> list[psutil.Process]:
        """TorchServe worker processes whose socket is in this server's own folder (run/tmp), by their exact
        arguments; none where the sockets are in the shared /tmp (a run folder's path too long for them)."""
        if self._env().get("TEMP") != str(self.tmp_dir):
            return []
        prefix = str(self.tmp_dir / ".ts.sock.")
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            args = proc.info["cmdline"] or []
            if any(a.endswith("model_service_worker.py") for a in args) and any(
                a == "--sock-name" and n.startswith(prefix) for a, n in zip(args, args[1:], strict=False)
            ):
                found.append(proc)
        return [p for p in found if _alive(p.pid)]

    def predict(self, image: Path) -> requests.Response:
        """The server's raw answer for an image file (status and JSON body as they are)."""
        return self.client().post("predictions", image.read_bytes())


def _descendants(pid: int) -> list[int]:
    """The pids of the processes below pid (TorchServe's Python workers below Java)."""
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def free_ports(count: int) -> list[int]:
    """Ports nobody listens on right now, on loopback (for test and benchmark servers)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def write_server_config(folder: Path, model_store: Path, scheme: str = "http", **overrides: str) -> Path:
    """The current directory's config.properties (the repository's: tests and tools run from its root) with free
    loopback ports (all five APIs) and the given model store;
    ``scheme="https"`` with ``certificate_file`` and ``private_key_file`` in ``overrides`` for TLS."""
    inference, management, metrics, grpc_inference, grpc_management = free_ports(5)
    props = read_properties(DEFAULT_CONFIG)
    props.update(
        inference_address=f"{scheme}://127.0.0.1:{inference}",
        management_address=f"{scheme}://127.0.0.1:{management}",
        metrics_address=f"{scheme}://127.0.0.1:{metrics}",
        grpc_inference_port=str(grpc_inference),
        grpc_management_port=str(grpc_management),
        model_store=str(model_store),
    )
    props.update(overrides)  # may replace any of the above (e.g. a port, to test a clash)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.properties"
    path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
    return path


def start_server(
    folder: Path, model_store: Path, timeout: float = 240.0, scheme: str = "http", **overrides: str
) -> Server:
    """A started Server of our own in ``folder`` (write_server_config's free ports); stopped again if it
    does not become READY, so a failed start leaves no Java behind."""
    server = Server(write_server_config(folder, model_store, scheme, **overrides), folder / "run")
    try:
        server.start(timeout=timeout)
    except BaseException:
        server.stop()
        raise
    return server


def write_tls_certificate(
    folder: Path, hosts: Sequence[str] = (), days: int = 365, force: bool = False
) -> tuple[Path, Path]:
    """A self-signed certificate for localhost, 127.0.0.1 and ``hosts`` and its RSA key, PEM, in ``folder``:
    cert.pem (TorchServe's certificate_file, and the CA bundle clients verify it with) and key.pem
    (private_key_file: unencrypted PKCS#8, the form TorchServe 0.12 reads, mode 600). Returns both paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    existing = [str(p) for p in (cert_path, key_path) if p.exists()]
    if existing and not force:
        raise ServerError(f"{' and '.join(existing)} exist: a running server may use them (--force replaces them)")
    names = list(dict.fromkeys(["localhost", "127.0.0.1", *hosts]))
    alt_names: list[x509.GeneralName] = []
    for name in names:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt_names.append(x509.DNSName(name))
    # RSA: TorchServe 0.12 offers only ECDHE-RSA cipher suites and reads the key with Java's RSA KeyFactory.
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cifar3 TorchServe")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate a client clock slightly behind
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        # Its own issuer: clients trust it by naming this file as their CA bundle, so it is marked a CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # Created 600 (never readable by others, not even for a moment), and made 600 if it existed.
    descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as out:
        out.write(key_pem)
    key_path.chmod(0o600)
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie child counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True
