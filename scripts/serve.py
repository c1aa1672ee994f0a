"""Start, stop and query the repository's TorchServe, and send it an image: `scripts/serve.py --help`.

The command line is cifar3_client/cli.py (its docstring shows each command); this script gives it this
repository's config.properties and run/ as defaults, from whatever directory it runs.
"""

import sys
from pathlib import Path

from cifar3_client.cli import main

if __name__ == "__main__":
    sys.exit(main(root=Path(__file__).resolve().parent.parent, prog="scripts/serve.py"))
