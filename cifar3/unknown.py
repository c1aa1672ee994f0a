"""Whether an image looks like none of the classes: the unknown score, computed from the logits, and the decision.

Every engine (PyTorch, ONNX Runtime float32 and int8) returns the same logits, so the score is computed here
from them, once, for all of them. A checkpoint says how (``ModelMeta.unknown``):

- ``other-class``: the model was trained with images that are none of the classes (``training.train
  --unknown-data``) as one more output after the classes. The score is that output's probability under the
  temperature-scaled softmax over all outputs, 0..1. The answer's ``probs`` are the softmax over the classes'
  outputs only, so ``pred_class`` and ``probs`` mean what they always meant.
- ``energy``: for a model trained on its classes alone, minus the log-sum-exp of the temperature-scaled
  logits (Liu et al. 2020): low for the images the model has strong evidence for, higher the less it has.

Higher always means less like the classes. ``unknown`` is ``score > threshold``; the threshold is chosen on
the validation split so that a set share of the known images (``KNOWN_ACCEPTED``) is accepted, stored in the
checkpoint and can be overridden per deployment (``handler.unknown_threshold`` in model-config.yaml). A
checkpoint written before this existed has no stored threshold: it answers the ``energy`` score and never
calls an image unknown until a threshold is given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

OTHER_CLASS = "other-class"
ENERGY = "energy"
SCORES = (OTHER_CLASS, ENERGY)
POSTHOC_SCORE = ENERGY  # the score of a model trained without unknown images (docs/training.md, "Unknown images")
KNOWN_ACCEPTED = 0.95  # share of the known validation images the stored threshold accepts


def extra_outputs(unknown: dict) -> int:
    """Outputs the network has beyond its classes: 1 for the other-class output, else 0."""
    return 1 if unknown.get("score") == OTHER_CLASS else 0


def score_name(unknown: dict) -> str:
    return unknown.get("score") or POSTHOC_SCORE


def class_logits(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The classes' logits, without the other-class output (accuracy, calibration, argmax)."""
    return logits[:, :num_classes]


def split_scores(
    logits: torch.Tensor, num_classes: int, temperature: float, unknown: dict, confidence_map: Sequence[float] = ()
):
    """float N x outputs logits -> (calibrated N x C class probabilities, N unknown scores)."""
    scaled = logits.float() / temperature
    known = scaled[:, :num_classes]
    probs = calibrate_confidence(torch.softmax(known, dim=-1), confidence_map)
    if score_name(unknown) == OTHER_CLASS:
        # P(other) under the softmax over every output = sigmoid(other - logsumexp(classes)).
        score = torch.sigmoid(scaled[:, num_classes] - torch.logsumexp(known, dim=-1))
    else:
        score = -torch.logsumexp(known, dim=-1)
    return probs, score


def calibrate_confidence(probs: torch.Tensor, confidence_map: Sequence[float]) -> torch.Tensor:
    """Top-label Platt scaling after the temperature: the top probability c becomes sigmoid(a * logit(c) + b)
    for ``confidence_map`` = [a, b] (a > 0: a higher confidence stays higher), and the other classes share
    the rest in their old proportions. One temperature moves every confidence the same way; the two
    parameters can lower middling confidences and raise near-certain ones together, which a model trained
    with label smoothing needs. The runner-up never overtakes the top class, so the prediction is unchanged.
    Empty map (checkpoints written before it existed): the probabilities as they are. Differentiable, for
    the explanations."""
    if not confidence_map:
        return probs
    a, b = confidence_map
    probs = probs.float()  # the margin below needs float32's resolution
    top, predicted = probs.max(dim=-1)
    is_top = nn.functional.one_hot(predicted, probs.shape[-1]).bool()
    others = probs.masked_fill(is_top, 0.0)
    total = others.sum(dim=-1, keepdim=True)
    # Shares of the rest: the old proportions, or equal ones where the top class had it all.
    share = torch.where(total > 0, others / total.clamp_min(1e-30), (~is_top).float() / (probs.shape[-1] - 1))
    # The runner-up gets s (1 - new_top) for its share s: below new_top while new_top > s / (1 + s); the
    # small margin keeps a tie from flipping the argmax.
    largest_share = share.max(dim=-1).values
    floor = largest_share / (1.0 + largest_share) + 1e-6
    new_top = torch.maximum(torch.sigmoid(a * torch.logit(top, eps=1e-7) + b), floor).clamp_max(1.0)
    rest = share * (1.0 - new_top).unsqueeze(-1)
    return torch.where(is_top, new_top.unsqueeze(-1), rest)


@dataclass(frozen=True)
class Decision:
    """How answers decide ``unknown``: the score's name, the threshold in use and where it came from."""

    score: str
    threshold: float | None  # None: no threshold known, nothing is called unknown
    source: str  # "checkpoint", "model-config" or "none"

    def is_unknown(self, score: float) -> bool:
        return self.threshold is not None and score > self.threshold

    def describe(self, unknown: dict) -> dict:
        """What the describe API reports: the decision and the validation figures behind the stored threshold."""
        stored = {k: unknown[k] for k in ("method", "known_accepted", "unknown_rejected", "auroc", "unknown_data")
                  if k in unknown}  # fmt: skip
        return {"score": self.score, "threshold": self.threshold, "threshold_source": self.source,
                "checkpoint_threshold": unknown.get("threshold"), **stored}  # fmt: skip


def decision(unknown: dict, override: float | str | None = None) -> Decision:
    """The decision for a checkpoint's ``unknown`` metadata, with an operator's threshold ``override`` if given."""
    if override is not None and str(override).strip() != "":
        value = float(override)
        if not math.isfinite(value):
            raise ValueError(f"unknown_threshold must be a finite number, not {override!r}")
        return Decision(score_name(unknown), value, "model-config")
    stored = unknown.get("threshold")
    return Decision(score_name(unknown), None if stored is None else float(stored), "checkpoint" if stored is not None
                    else "none")  # fmt: skip


def fit_threshold(known_scores: torch.Tensor, accepted: float = KNOWN_ACCEPTED) -> float:
    """The smallest threshold that accepts (score <= threshold) at least ``accepted`` of the known images."""
    ordered = known_scores.float().sort().values
    index = min(len(ordered) - 1, max(0, math.ceil(accepted * len(ordered)) - 1))
    return float(ordered[index])
