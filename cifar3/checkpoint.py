"""Checkpoint = the plain state dict + everything needed to rebuild and use the model.

One file written by ``torch.save`` and read back with ``torch.load(..., weights_only=True)``: the
metadata holds only str/int/float/bool/list/dict values, so no pickled code is ever executed.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from cifar3.model import build_model
from cifar3.unknown import extra_outputs, split_scores

FORMAT_VERSION = 1


@dataclass
class ModelMeta:
    """What a checkpoint says about its model; the handler reads everything from here."""

    variant: str
    classes: list[str]
    image_size: int
    mean: list[float]
    std: list[float]
    temperature: float = 1.0  # divides the logits; fitted on the validation split
    # [a, b] of the top-label map after the temperature (cifar3/unknown.py, calibrate_confidence); [] = none.
    confidence_map: list[float] = field(default_factory=list)
    val_accuracy: float | None = None
    epoch: int | None = None
    created: str = ""  # ISO 8601, UTC
    train_config: dict = field(default_factory=dict)
    # How answers decide "unknown" (cifar3/unknown.py): score, threshold and the validation figures behind it.
    # Empty in checkpoints written before unknown images were handled: they load and answer the post-hoc score.
    unknown: dict = field(default_factory=dict)
    # Test-time flip: answers average the logits of the image and of its mirror image (two forward passes'
    # compute, in one batch); the temperature, confidence map and threshold above are fitted on those averages.
    # False in checkpoints written before it existed: one view, as they were calibrated.
    test_flip: bool = False

    @property
    def num_outputs(self) -> int:
        """The network's outputs: one per class, plus the other-class output of a model trained with unknowns."""
        return len(self.classes) + extra_outputs(self.unknown)

    def scores(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's logits -> (calibrated N x C class probabilities, N unknown scores): what answers report."""
        return split_scores(logits, len(self.classes), self.temperature, self.unknown, self.confidence_map)


class CheckpointError(RuntimeError):
    """A checkpoint file is missing or not one of ours; the message says what to do."""


def save_checkpoint(path: str | Path, model: nn.Module | Mapping[str, torch.Tensor], meta: ModelMeta) -> None:
    """Write a model (or a snapshot of its state dict) atomically: a temp file in the same folder, then
    rename, so an interrupted save never leaves a broken checkpoint where a good one was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = model.state_dict() if isinstance(model, nn.Module) else model
    state = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    payload = {"format_version": FORMAT_VERSION, "meta": asdict(meta), "state_dict": state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelMeta]:
    """Rebuild the model described by the checkpoint, weights loaded, in eval mode on device."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}. Train one first: python -m training.train --out {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable checkpoint: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a cifar3 checkpoint (format {FORMAT_VERSION} expected)")
    meta = ModelMeta(**payload["meta"])
    model = build_model(meta.variant, meta.num_outputs)
    model.load_state_dict(payload["state_dict"])
    return model.to(device).eval(), meta
