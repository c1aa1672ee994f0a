"""Batched forward pass and calibrated probabilities, shared by training, evaluation and the handler."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

from cifar3.preprocessing import normalize

# Numeric types a model can be served in; "auto" in inference_dtype picks one for the hardware.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def native_bfloat16(device: torch.device) -> bool:
    """Whether the device computes bfloat16 in hardware: a CPU with AVX512-BF16 or AMX, a CUDA GPU that
    supports it. Elsewhere bfloat16 is emulated and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # ATen restricted below AVX-512 (ATEN_CPU_CAPABILITY=avx2, or a CPU without it): bfloat16 is emulated.
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    # torch's own CPU feature probes (used by its compiler); absent in some builds, then: no.
    probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(probe() for probe in probes if probe is not None)


def inference_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype called ``name`` (a key of DTYPES), or for "auto" bfloat16 where the hardware computes it
    natively, else float32. Every predictor on one machine resolves "auto" the same way, so the handler and
    ``training.evaluate`` run the same weights through the same kernels (on the 2-core AMX machine the
    bfloat16 outputs were bit-identical at batch 1 and 256)."""
    if name == "auto":
        return torch.bfloat16 if native_bfloat16(device) else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The name reports and the describe API use: "bfloat16", "float32" (the keys of DTYPES)."""
    return str(dtype).removeprefix("torch.")


def memory_format(device: torch.device, dtype: torch.dtype = torch.float32) -> torch.memory_format:
    """channels_last on a GPU and for bfloat16 (the layout oneDNN's AMX kernels want); plain NCHW for
    float32 on CPU, where oneDNN ran these 32x32 convolutions 15-25% faster than channels_last at batch 8
    and above (bench/benchmark.py on the 2-core AMD EPYC VM, 2026-11-27; docs/performance.md has the engines'
    speed as they run now)."""
    return torch.channels_last if device.type == "cuda" or dtype != torch.float32 else torch.contiguous_format


def prepare_for_inference(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model as every predictor runs it (evaluation, benchmark, handler): eval mode, on CPU with each
    BatchNorm folded into the convolution before it (same function, one pass over memory fewer per layer),
    in ``dtype`` and its memory format. The checkpoint itself always stays float32."""
    model = model.eval()
    device = model_device(model)
    if device.type == "cpu":
        model = fuse(model)  # torch.fx: conv + eval BatchNorm -> one conv with folded weights; a copy
    return model.to(dtype).to(memory_format=memory_format(device, dtype))


def as_model_input(batch: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """A normalized float batch moved to the model's device, dtype and memory format."""
    weight = next(model.parameters())
    fmt = memory_format(weight.device, weight.dtype)
    return batch.to(weight.device, weight.dtype, non_blocking=True).contiguous(memory_format=fmt)


def answer_logits(
    forward: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, test_flip: bool
) -> torch.Tensor:
    """The logits a checkpoint answers with for a normalized batch: ``forward``'s, or with test-time flip
    (``ModelMeta.test_flip``) its float32 logits averaged with those of the left-right mirror images, both
    views in one call at twice the batch."""
    if not test_flip:
        return forward(batch)
    logits = forward(torch.cat([batch, batch.flip(-1)])).float()
    return (logits[: len(batch)] + logits[len(batch) :]) / 2


@torch.inference_mode()
def predict_logits(
    model: nn.Module, images: torch.Tensor, mean, std, batch_size: int = 256, test_flip: bool = False
) -> torch.Tensor:
    """uint8 N x 3 x H x W images -> float32 N x C logits (on CPU); with ``test_flip``, averaged with the
    mirror images' (answer_logits), as a checkpoint with ModelMeta.test_flip answers."""
    weight = next(model.parameters())
    # A float32 model on a GPU (training) runs under bf16 autocast; a prepared bf16 model needs none.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=weight.is_cuda and weight.dtype == torch.float32)
    mean, std = (torch.as_tensor(v, dtype=torch.float32, device=weight.device) for v in (mean, std))

    def forward(batch: torch.Tensor) -> torch.Tensor:
        with autocast:
            return model(as_model_input(batch, model)).float()

    outputs = []
    for start in range(0, len(images), batch_size):
        batch = normalize(images[start : start + batch_size].to(weight.device, non_blocking=True), mean, std)
        outputs.append(answer_logits(forward, batch, test_flip).cpu())
    return torch.cat(outputs) if outputs else torch.empty(0, 0)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T minimising the NLL of softmax(logits / T) on held-out data (Guo et al. 2017)."""
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200)
    logits, labels = logits.detach().float().clone(), labels.long()  # clone: may be an inference tensor

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


# A confidence map needs this many right and this many wrong validation predictions (a 1,500-image split at
# 93% has about 100 wrong), and a slope no steeper than this (the fits on the cpu preset's checkpoints: 1.1-1.6).
MIN_OUTCOMES = 20
MAX_SLOPE = 5.0


def fit_confidence_map(probs: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """[a, b] of the top-label map (cifar3/unknown.py, calibrate_confidence) fitted on held-out data:
    a logistic regression of "the prediction was right" on logit(top probability) (Platt 1999, applied to
    the top label as in Gupta & Ramdas 2022). [] (no map) when the data cannot support one: fewer than
    ``MIN_OUTCOMES`` right or wrong predictions, or a fit that would reverse the order of confidences or turn
    it into a step (``a`` above ``MAX_SLOPE``: certain right above some confidence, certain wrong below)."""
    from sklearn.linear_model import LogisticRegression  # only training fits; serving does not need sklearn

    top, predicted = probs.detach().float().max(dim=-1)
    right = (predicted == labels).numpy()
    if min(right.sum(), (~right).sum()) < MIN_OUTCOMES:
        return []
    x = torch.logit(top, eps=1e-7).double().numpy()[:, None]
    fit = LogisticRegression(C=1e4).fit(x, right)  # C: next to no regularisation, two parameters
    a, b = float(fit.coef_[0, 0]), float(fit.intercept_[0])
    return [round(a, 5), round(b, 5)] if 0 < a <= MAX_SLOPE else []
