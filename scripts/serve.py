"""Start, stop and query the repository's TorchServe, and send it an image.

    .venv/bin/python scripts/serve.py start      # waits until cifar3 is READY, prints URLs and token file
    .venv/bin/python scripts/serve.py status     # exit 0 only when the model has a READY worker
    .venv/bin/python scripts/serve.py predict plane.jpg
    .venv/bin/python scripts/serve.py explain plane.jpg --out overlay.png [--target ship] [--method occlusion]
    .venv/bin/python scripts/serve.py stop
    .venv/bin/python scripts/serve.py tls-cert tls   # tls/cert.pem + tls/key.pem for an https:// config

The command line is cifar3_client/cli.py; this script gives it this repository's config.properties and run/
as defaults, from whatever directory it runs.
"""

import sys
from pathlib import Path

from cifar3_client.cli import main

if __name__ == "__main__":
    sys.exit(main(root=Path(__file__).resolve().parent.parent, prog="scripts/serve.py"))
