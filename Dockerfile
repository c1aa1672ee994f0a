# cifar3 serving image: TorchServe 0.12.0 on CPU serving model_store/cifar3.mar.
#
# Build the model archive FIRST; it is a build output, not tracked by git:
#   scripts/archive.sh                    # writes model_store/cifar3.mar from checkpoints/cifar3.pt
#   docker compose up --build             # or: docker build -t cifar3-torchserve .
#
# Ports: 8080 inference, 8081 management, 8082 metrics. TorchServe listens on 0.0.0.0 inside the
# container (docker/config.properties); compose.yaml publishes the ports on 127.0.0.1 only. With a
# plain `docker run`, publish them the same way: -p 127.0.0.1:8080:8080 (and 8081, 8082).

# bookworm: Debian 13 (trixie, the default python:3.11-slim now) has no openjdk-17 package.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LOG_LOCATION=/srv/cifar3/logs \
    METRICS_LOCATION=/srv/cifar3/logs

# Java 17 for TorchServe's frontend; tini as PID 1 forwards signals to the whole process group, so
# `docker stop` reaches Java and its Python workers, not only the torchserve launcher.
# (man1 must exist for the JRE's update-alternatives on slim images.)
RUN mkdir -p /usr/share/man/man1 \
    && apt-get update \
    && apt-get install -y --no-install-recommends \
        openjdk-17-jre-headless=17.0.* \
        tini=0.19.* \
    && rm -rf /var/lib/apt/lists/*

# A fixed non-root uid: TorchServe writes key_file.json with mode 600, so the ui image runs as the
# same uid (10001) to read it from the shared volume.
RUN groupadd --system --gid 10001 cifar3 \
    && useradd --system --uid 10001 --gid cifar3 --home-dir /home/cifar3 --create-home \
        --shell /usr/sbin/nologin cifar3 \
    && install -d -o cifar3 -g cifar3 -m 700 /srv/cifar3/run /srv/cifar3/logs

WORKDIR /opt/cifar3

# CPU-only torch first (pyproject.toml pins these versions; the default index has CUDA builds of them),
# then the project with its `serve` dependencies, pinned as the tests run them: torch is already satisfied.
# Only the serving core, the client package (HTTP client and server lifecycle: the HEALTHCHECK's serve.py) and the
# scripts are copied: no training, UI or bench code or dependencies.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \
        torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml setup.py README.md ./
COPY cifar3/ cifar3/
COPY cifar3_client/ cifar3_client/
COPY scripts/ scripts/
# The local project, not a registry package: its dependencies are pinned exactly in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[serve]"

COPY docker/config.properties config.properties
# Produced by scripts/archive.sh (see the top of this file); copied last, as it changes most often.
COPY model_store/cifar3.mar model_store/cifar3.mar

# TorchServe starts here and writes key_file.json here: compose mounts a named volume on this folder
# (read-only in the ui service). Logs stay outside it, in /srv/cifar3/logs and on stdout.
WORKDIR /srv/cifar3/run
USER 10001:10001

EXPOSE 8080 8081 8082

# Healthy only when the model has a READY worker: TorchServe's /ping stays healthy when a model
# never loaded. serve.py status asks the management API, with the key from key_file.json.
HEALTHCHECK --interval=15s --timeout=10s --start-period=180s --retries=3 \
    CMD ["python", "/opt/cifar3/scripts/serve.py", "--config", "/opt/cifar3/config.properties", "--run-dir", "/srv/cifar3/run", "status"]

ENTRYPOINT ["/usr/bin/tini", "-g", "--"]
CMD ["torchserve", "--start", "--foreground", "--ncs", "--ts-config", "/opt/cifar3/config.properties", "--model-store", "/opt/cifar3/model_store"]
