"""Start, stop and query the cifar3 TorchServe, and send it an image.

    .venv/bin/python scripts/serve.py start      # waits until cifar3 is READY, prints URLs and token file
    .venv/bin/python scripts/serve.py status     # exit 0 only when the model has a READY worker
    .venv/bin/python scripts/serve.py predict plane.jpg
    .venv/bin/python scripts/serve.py explain plane.jpg --out overlay.png [--target ship] [--method occlusion]
    .venv/bin/python scripts/serve.py stop
    .venv/bin/python scripts/serve.py tls-cert tls   # tls/cert.pem + tls/key.pem for an https:// config

scripts/serve.py runs this command line with the repository's config.properties and run/ as defaults;
``cifar3-serve`` (the installed entry point) and ``python -m cifar3_client.cli`` with those of the current
directory. Run state lives in ``run/`` (git-ignored): TorchServe starts there, so ``run/key_file.json`` holds
the tokens (mode 600), ``run/logs/`` the logs, ``run/tmp/`` the pid file. ``--config`` and ``--run-dir`` let
tests run servers of their own on other ports. With ``https://`` addresses in the config, the certificate is
verified against ``CIFAR3_CA_BUNDLE`` (docs/serving.md, "HTTPS").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cifar3_client.client import ClientError, overlay_heatmap
from cifar3_client.server import DEFAULT_CONFIG, DEFAULT_RUN_DIR, Server, ServerError, write_tls_certificate


def write_explanation(
    server: Server, image: Path, out: Path, target: str | None, size: int, method: str | None = None
) -> int:
    """Ask the server to explain ``image`` and write the heat map over it to ``out``; print the answer."""
    if not image.is_file():
        raise ServerError(f"image not found: {image}")
    data = image.read_bytes()
    prediction, explanation = server.client().explain(data, image.name, target, method)
    out.parent.mkdir(parents=True, exist_ok=True)
    overlay_heatmap(data, explanation.heatmap, size=size).save(out, format="PNG")
    print(
        f"{image.name}: {prediction.pred_class} ({prediction.probs[prediction.pred_class]:.1%}); "
        + ("looks like none of the classes; " if prediction.unknown else "")
        + f"{explanation.method} for {explanation.target!r}"
        + (f" at {explanation.layer}" if explanation.layer else "")
        + f" -> {out}"
    )
    return 0


def main(argv: list[str] | None = None, root: Path = Path(), prog: str = "cifar3-serve") -> int:
    """The command line; ``root`` is where the default config.properties and run/ are (scripts/serve.py passes
    its repository root; the ``cifar3-serve`` entry point, the current directory)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=root / DEFAULT_CONFIG, help="TorchServe config.properties")
    parser.add_argument(
        "--run-dir", type=Path, default=root / DEFAULT_RUN_DIR, help="folder for keys, logs and pid file"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start TorchServe and wait until the model is READY")
    start.add_argument("--timeout", type=float, default=180.0)
    sub.add_parser("stop", help="stop TorchServe")
    sub.add_parser("status", help="exit 0 when the model has a READY worker")
    predict = sub.add_parser("predict", help="classify an image file")
    predict.add_argument("image", type=Path)
    explain = sub.add_parser("explain", help="write a heat-map overlay: where the model found its evidence")
    explain.add_argument("image", type=Path)
    explain.add_argument("--out", type=Path, required=True, help="overlay picture to write (PNG)")
    explain.add_argument("--target", help="class to explain (default: the predicted one)")
    explain.add_argument("--method", help="explanation method (default: the server's handler.explanation)")
    explain.add_argument("--size", type=int, default=256, help="overlay side in pixels (default: 256)")
    tls = sub.add_parser("tls-cert", help="write a self-signed certificate and key for https:// addresses")
    tls.add_argument("dir", type=Path, help="folder for cert.pem and key.pem")
    tls.add_argument("--host", action="append", default=[], help="another name or address it is for (repeatable)")
    tls.add_argument("--days", type=int, default=365, help="days it stays valid (default: 365)")
    tls.add_argument("--force", action="store_true", help="replace an existing cert.pem / key.pem")
    args = parser.parse_args(argv)
    try:
        if args.command == "tls-cert":
            cert, key = write_tls_certificate(args.dir, args.host, args.days, args.force)
            print(
                f"wrote {cert.resolve()} (self-signed, for {', '.join(['localhost', '127.0.0.1', *args.host])}; "
                f"{args.days} days)\n"
                f"  and {key.resolve()} (its private key, mode 600)\n"
                f"  config.properties: https:// addresses, certificate_file={cert.resolve()}, "
                f"private_key_file={key.resolve()}\n"
                f"  clients:           export CIFAR3_CA_BUNDLE={cert.resolve()}   (curl --cacert {cert.resolve()})"
            )
            return 0
        server = Server(args.config, args.run_dir)
        if args.command == "start":
            started = time.monotonic()
            server.start(args.timeout)
            print(
                f"cifar3 is READY after {time.monotonic() - started:.1f}s\n"
                f"  inference:  {server.inference_url}/predictions/{server.model}\n"
                f"  management: {server.management_url}/models/{server.model}\n"
                f"  metrics:    {server.metrics_url}/metrics\n"
                f"  tokens:     {server.key_file}  (send 'Authorization: Bearer <key>')\n"
                f"  logs:       {server.log_dir}\n"
                f'  try:        curl -H "Authorization: Bearer {server.token()}" '
                f"{server.inference_url}/predictions/{server.model} -T IMAGE"
            )
        elif args.command == "stop":
            print("stopped" if server.stop() else f"no server running from {server.run_dir}")
        elif args.command == "status":
            state = server.state()
            workers = ", ".join(f"{w.get('id')}:{w.get('status')}" for w in state["workers"]) or "none"
            print(
                f"ping: {'healthy' if state['ping'] else 'down'}; model {server.model}: "
                f"{'READY' if state['ready'] else 'NOT READY'}; workers: {workers}"
                + (f"; {state['reason']}" if state["reason"] else "")
            )
            return 0 if state["ready"] else 1
        elif args.command == "explain":
            return write_explanation(server, args.image, args.out, args.target, args.size, args.method)
        elif args.command == "predict":
            if not args.image.is_file():
                raise ServerError(f"image not found: {args.image}")
            response = server.predict(args.image)
            print(json.dumps(response.json(), indent=2) if response.content else f"HTTP {response.status_code}")
            return 0 if response.ok else 1
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ClientError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
