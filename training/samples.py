"""Write some of a checkpoint's validation images as PNG files, whatever data source it was trained on.

    python -m training.samples checkpoints/cifar3.pt OUT_DIR [--count 64]

scripts/archive.sh verifies the ONNX export on these real images (training/export.py reads image folders);
the checkpoint's own validation split works for a CIFAR-10 download, a cifar-10-batches-py folder and an
image folder alike.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from cifar3.checkpoint import CheckpointError, load_checkpoint

from .data import DEFAULT_DATA_ROOT, DataError
from .evaluate import validation_split


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.samples", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--count", type=int, default=64, help="images to write, spread over the split")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT, help="download cache for cifar10")
    args = parser.parse_args(argv)
    try:
        _, meta = load_checkpoint(args.checkpoint)
        split = validation_split(meta, args.data_root)
    except (CheckpointError, DataError, KeyError, OSError, ValueError) as exc:
        print(
            f"error: cannot read the validation images of {args.checkpoint} ({exc}); "
            "set VERIFY_IMAGES to a folder of real images",
            file=sys.stderr,
        )
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    step = max(1, len(split.images) // args.count)
    for n, image in enumerate(split.images[::step][: args.count]):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(args.out_dir / f"{n:03d}.png")
    print(f"wrote {min(args.count, len(split.images[::step]))} validation images of {split.source} to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
