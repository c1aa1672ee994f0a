"""The original prototype's design, as a benchmark peer: FastAPI + uvicorn, the model in the server's own
process, PyTorch eager float32, one image per request (no batching). It computes what the checkpoint
answers (with its test-time flip, if it has one), so that it does the same work as the served model.

    .venv/bin/python -m bench.peers.prototype_fastapi --checkpoint checkpoints/cifar3.pt --port 8090

``POST /predict`` takes the image bytes as the body and answers ``{"pred_class", "probs"}`` like the
served model; ``GET /health`` answers 200 once the model is loaded. Loopback only, no authentication:
a measuring instrument, never a way to serve.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request

from cifar3.checkpoint import load_checkpoint
from cifar3.inference import answer_logits
from cifar3.preprocessing import ImageDecodeError, decode_image, eval_transform


async def raw_body(request: Request) -> bytes:
    return await request.body()


def build_app(checkpoint: Path) -> FastAPI:
    model, meta = load_checkpoint(checkpoint)  # eager float32, BatchNorm as trained: the prototype's model
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    # A plain (sync) endpoint: FastAPI runs each in its thread pool, so concurrent requests run their
    # forward passes side by side in threads, as the prototype did.
    @app.post("/predict")
    def predict(body: bytes = Depends(raw_body)) -> dict:
        try:
            image = decode_image(body)
        except ImageDecodeError as exc:
            raise HTTPException(400, str(exc)) from None
        with torch.inference_mode():
            batch = eval_transform([image], meta.image_size, meta.mean, meta.std)
            logits = answer_logits(model, batch, meta.test_flip)
        probs = meta.scores(logits)[0][0].tolist()
        return {"pred_class": meta.classes[max(range(len(probs)), key=probs.__getitem__)],
                "probs": dict(zip(meta.classes, probs, strict=True))}  # fmt: skip

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.peers.prototype_fastapi", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    uvicorn.run(build_app(args.checkpoint), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
