"""The inference engine switch: which runtime computes the logits, decided in one place.

    engine, meta = load_engine("checkpoints/cifar3.pt", "auto", onnx_path="cifar3.onnx", threads=1)
    probs = predict_probs(engine, meta, uint8_images)

Engines (``handler.engine`` in model-config.yaml, ``training.evaluate --engine``, the benchmark):

- ``torch``: the checkpoint's model in PyTorch eager, BatchNorm folded, in ``dtype`` (cifar3/inference.py);
- ``onnxruntime``: the same state dict exported to ONNX (training/export.py, at archive time) and run by
  ONNX Runtime's CPU provider in float32; probabilities within 1e-4 of PyTorch float32;
- ``onnxruntime-int8``: that export quantized to int8 by ONNX Runtime (static, calibrated on real images at
  archive time), run the same way; opt-in, never chosen by ``auto`` (docs/performance.md has its accuracy);
- ``auto``: the fastest of them for the hardware, decided by ``choose_engine`` below and nowhere else.

A checkpoint with ``ModelMeta.test_flip`` is answered by every engine alike: the logits of each image and of
its mirror image, averaged (cifar3/inference.py, answer_logits).

Whoever serves, evaluates or measures calls ``load_engine``, so they run the same engine, dtype and
threads; ``Engine.describe()`` says which (the describe API reports it).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from cifar3.checkpoint import ModelMeta, load_checkpoint
from cifar3.inference import (
    DTYPES,
    answer_logits,
    as_model_input,
    dtype_name,
    inference_dtype,
    native_bfloat16,
    prepare_for_inference,
)
from cifar3.preprocessing import normalize

logger = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "onnxruntime", "onnxruntime-int8")
ONNX_INPUT, ONNX_OUTPUT = "images", "logits"  # the exported graph's tensor names (training/export.py)
ONNX_FILE = "model.onnx"  # the exported graph's name in the .mar (scripts/archive.sh writes it)
ONNX_INT8_FILE = "model.int8.onnx"  # its int8 quantization, beside it in the .mar
ONNX_FILES = {"onnxruntime": ONNX_FILE, "onnxruntime-int8": ONNX_INT8_FILE}  # engine -> its model in the .mar


@dataclass(frozen=True)
class EngineChoice:
    engine: str  # "torch" or "onnxruntime"
    dtype: torch.dtype


def choose_engine(requested: str, device: torch.device, dtype: str = "auto") -> EngineChoice:
    """The engine and dtype that ``requested`` means on ``device``; ``dtype`` applies to the torch engine.

    ``auto``: PyTorch on a GPU (bfloat16 where it computes it natively). On a CPU, PyTorch bfloat16 where the
    CPU computes bfloat16 natively (AVX512-BF16 or AMX): there, one single-threaded process per core (the
    served layout) ran more images/s in bfloat16 than in ONNX Runtime float32 (reports/benchmark.md), though
    ONNX Runtime answers a lone image faster. Everywhere else (AVX2, AVX-512 without BF16) ONNX Runtime
    float32, which ran batch 1 2-3x and batches of 8-64 1.5-2.5x faster than PyTorch float32 with AVX2
    kernels (reports/benchmark-avx2.md), while bfloat16 is emulated there. Hardware decides, not what is
    installed: where the chosen engine cannot run, ``load_engine`` says so and falls back.
    """
    if requested not in ENGINES:
        raise ValueError(f"unknown engine {requested!r}; choose one of {', '.join(ENGINES)}")
    if requested == "auto":
        requested = "torch" if device.type == "cuda" or native_bfloat16(device) else "onnxruntime"
    if requested in ONNX_FILES:
        runs = torch.int8 if requested == "onnxruntime-int8" else torch.float32
        if dtype not in ("auto", dtype_name(runs)):
            raise ValueError(
                f"the {requested} engine runs {dtype_name(runs)}, not {dtype}; use engine torch for {dtype}"
            )
        return EngineChoice(requested, runs)
    return EngineChoice("torch", inference_dtype(dtype, device))


class Engine:
    """Normalized float32 N x 3 x H x W batch -> float32 logits on CPU, N x outputs (ModelMeta.num_outputs).
    With ``test_flip`` (the checkpoint's ModelMeta.test_flip: load_engine passes it), every engine averages
    them with the mirror images' logits, one runtime call at twice the batch."""

    name: str
    dtype: torch.dtype
    device: torch.device
    test_flip: bool = False

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return answer_logits(self.logits, batch, self.test_flip)

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """The runtime's logits for the batch as it is."""
        raise NotImplementedError

    @property
    def threads(self) -> int:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"engine": self.name, "dtype": dtype_name(self.dtype), "threads": self.threads,
                "device": str(self.device), "test_flip": self.test_flip}  # fmt: skip


class TorchEngine(Engine):
    name = "torch"

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, test_flip: bool = False):
        self.model = prepare_for_inference(model, dtype)
        self.test_flip = test_flip
        self.dtype = dtype
        self.device = next(self.model.parameters()).device

    @torch.inference_mode()
    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(as_model_input(batch, self.model)).float().cpu()

    @property
    def threads(self) -> int:
        return torch.get_num_threads()


class OnnxRuntimeEngine(Engine):
    device = torch.device("cpu")

    def __init__(self, onnx_path: str | Path, threads: int | None = None, int8: bool = False, test_flip: bool = False):
        import onnxruntime as ort

        self.test_flip = test_flip
        self.name, self.dtype = ("onnxruntime-int8", torch.int8) if int8 else ("onnxruntime", torch.float32)
        if not Path(onnx_path).is_file():
            raise FileNotFoundError(f"no exported model at {onnx_path}")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # One process per core is how the server scales; a session's intra-op pool stays within its share.
        self._threads = int(threads or torch.get_num_threads())
        options.intra_op_num_threads = self._threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        inputs = {ONNX_INPUT: batch.detach().to("cpu", torch.float32).contiguous().numpy()}
        return torch.from_numpy(self.session.run([ONNX_OUTPUT], inputs)[0])

    @property
    def threads(self) -> int:
        return self._threads


def load_engine(
    checkpoint: str | Path,
    engine: str = "auto",
    *,
    device: str | torch.device = "cpu",
    dtype: str = "auto",
    threads: int | None = None,
    onnx_path: str | Path | None = None,
    exporter: Callable[[str | Path, Path], Path] | None = None,
) -> tuple[Engine, ModelMeta]:
    """(engine, meta) for a checkpoint: ``choose_engine`` decides, then the engine is built.

    ``threads`` sets torch's intra-op threads (preprocessing runs in torch whatever the engine) and ONNX
    Runtime's. An ONNX Runtime engine runs ``onnx_path`` (the archive's exported model: ONNX_FILES names
    it); with None, onnxruntime runs what ``exporter(checkpoint, out)`` writes now (training.export's
    export_checkpoint, exactly as scripts/archive.sh exports: the core exports nothing itself), while
    onnxruntime-int8 needs the archive's quantized model (its calibration images are the archive's). Where
    ONNX Runtime cannot run (not installed, the exported model missing or unreadable, no exporter given or
    its export failing) the torch engine runs instead, with one log line.
    """
    device = torch.device(device)
    if threads:
        torch.set_num_threads(int(threads))
    model, meta = load_checkpoint(checkpoint, device)
    # the checkpoint was calibrated on what it answers: its test_flip goes to whichever engine runs
    return _build_engine(checkpoint, model, engine, device, dtype, threads, onnx_path, exporter, meta.test_flip), meta


def _build_engine(checkpoint, model, engine, device, dtype, threads, onnx_path, exporter, test_flip) -> Engine:
    choice = choose_engine(engine, device, dtype)
    if choice.engine == "onnxruntime-int8" and onnx_path is None:
        raise ValueError(f"engine onnxruntime-int8 runs an archive's quantized model ({ONNX_INT8_FILE}, written by "
                         "scripts/archive.sh or python -m training.export --int8): give its path (--onnx)")  # fmt: skip
    if choice.engine in ONNX_FILES:
        try:
            if onnx_path is not None:
                return OnnxRuntimeEngine(onnx_path, threads, choice.engine == "onnxruntime-int8", test_flip)
            if exporter is None:
                raise FileNotFoundError("no exported model (onnx_path) and no exporter to write one")
            with tempfile.TemporaryDirectory(prefix="cifar3-onnx-") as folder:
                exported = exporter(checkpoint, Path(folder) / "cifar3.onnx")
                return OnnxRuntimeEngine(exported, threads, test_flip=test_flip)  # the session holds the graph
        except Exception as exc:  # whatever stops ONNX Runtime must not leave a dead worker
            choice = choose_engine("torch", device, dtype if dtype in ("auto", *DTYPES) else "auto")
            logger.warning("engine %s: onnxruntime cannot run here (%s); running torch %s instead",
                           engine, exc, dtype_name(choice.dtype))  # fmt: skip
    return TorchEngine(model, choice.dtype, test_flip)


def predict_scores(
    engine: Engine, meta: ModelMeta, images: torch.Tensor, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 N x 3 x H x W images -> (calibrated float32 N x C probabilities, N unknown scores), ``batch_size``
    at a time."""
    outputs = [
        engine(normalize(images[start : start + batch_size], meta.mean, meta.std))
        for start in range(0, len(images), batch_size)
    ]
    logits = torch.cat(outputs) if outputs else torch.empty(0, meta.num_outputs)
    return meta.scores(logits)


def predict_probs(engine: Engine, meta: ModelMeta, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """uint8 N x 3 x H x W images -> calibrated float32 N x C probabilities, ``batch_size`` at a time."""
    return predict_scores(engine, meta, images, batch_size)[0]
