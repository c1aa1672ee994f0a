"""LitServe serving the same checkpoint, as a benchmark peer: dynamic batching, worker processes, the
engine our handler runs (cifar3/engine.py), so the comparison is of the serving stacks.

    .venv/bin/python -m bench.peers.litserve_server --checkpoint checkpoints/cifar3.pt --port 8091 \\
        --engine onnxruntime --onnx model.onnx --workers 2 --threads 1 --batch-size 8 --batch-timeout-ms 1

``POST /predict`` takes ``{"data": "<base64 image>"}`` (LitServe reads JSON or form bodies) and answers
``{"pred_class", "probs"}``; ``GET /health`` answers 200 once every worker has loaded the model. Loopback
only, no authentication: a measuring instrument, never a way to serve.
"""

from __future__ import annotations

import argparse
import base64
from pathlib import Path

import litserve as ls
import torch
from fastapi import HTTPException

from cifar3.engine import load_engine
from cifar3.preprocessing import ImageDecodeError, decode_image, normalize, pil_to_uint8
from training.export import export_checkpoint


class Cifar3API(ls.LitAPI):
    def __init__(self, checkpoint: Path, engine: str, onnx: Path | None, threads: int, **batching):
        super().__init__(**batching)
        self.checkpoint, self.engine_name, self.onnx, self.threads = checkpoint, engine, onnx, threads

    def setup(self, device):
        self.engine, self.meta = load_engine(self.checkpoint, self.engine_name, threads=self.threads,
                                             onnx_path=self.onnx, exporter=export_checkpoint)  # fmt: skip

    def decode_request(self, request):
        try:
            return pil_to_uint8(decode_image(base64.b64decode(request["data"])), self.meta.image_size)
        except (ImageDecodeError, KeyError, TypeError, ValueError) as exc:
            raise HTTPException(400, f"send {{'data': '<base64 image>'}}: {exc}") from None

    def batch(self, inputs):
        return torch.stack(inputs)

    def predict(self, images):
        logits = self.engine(normalize(images, self.meta.mean, self.meta.std))
        return self.meta.scores(logits)[0]

    def unbatch(self, output):
        return list(output)

    def encode_response(self, probs):
        row = probs.tolist()
        return {
            "pred_class": self.meta.classes[int(probs.argmax())],
            "probs": dict(zip(self.meta.classes, row, strict=True)),
        }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peers.litserve_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--onnx", type=Path, help="the exported model for the onnxruntime engine")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per worker")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batch-timeout-ms", type=float, default=1.0)
    args = parser.parse_args(argv)
    api = Cifar3API(args.checkpoint, args.engine, args.onnx, args.threads, max_batch_size=args.batch_size,
                    batch_timeout=args.batch_timeout_ms / 1000)  # fmt: skip
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=args.workers)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
