#!/usr/bin/env bash
# Pack a checkpoint and the handler into model_store/cifar3.mar.
#
#   scripts/archive.sh [CHECKPOINT]        (default: checkpoints/cifar3.pt)
#
# The archive is self-contained: the handler, the serving core package it imports (cifar3/),
# handler/model-config.yaml and the model exported to ONNX (verified); the classes and every other constant come
# from the checkpoint. A plain TorchServe with torch, torchvision, pillow, pyyaml (and onnxruntime, else the
# handler runs torch) serves it. Env: MODEL_STORE (default model_store), MODEL_NAME,
# MODEL_CONFIG (default handler/model-config.yaml; the benchmark compares settings with it).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
checkpoint="${1:-$root/checkpoints/cifar3.pt}"
model_store="${MODEL_STORE:-$root/model_store}"
model_name="${MODEL_NAME:-cifar3}"
model_config="${MODEL_CONFIG:-$root/handler/model-config.yaml}"
python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"

if [ ! -f "$checkpoint" ]; then
  echo "error: checkpoint not found: $checkpoint" >&2
  echo "Train one first:  .venv/bin/python -m training.train --data PATH/TO/IMAGES --out $checkpoint" >&2
  exit 2
fi
command -v torch-model-archiver >/dev/null || PATH="$root/.venv/bin:$PATH"

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
# The handler imports `cifar3.<module>`: keep the package folder inside the staged extra files
# (torch-model-archiver copies a folder's contents to the archive root, which is on sys.path).
mkdir -p "$stage/extra/cifar3"
cp "$root"/cifar3/*.py "$stage/extra/cifar3/"
# Refuse a checkpoint that does not load, before anything is written.
"$python" - "$checkpoint" <<'PY'
import sys
from cifar3.checkpoint import CheckpointError, load_checkpoint
try:
    _, meta = load_checkpoint(sys.argv[1])
except CheckpointError as exc:
    sys.exit(f"error: {exc}")
print(f"checkpoint: {meta.variant}, classes {meta.classes}, validation accuracy {meta.val_accuracy}")
PY
cp "$checkpoint" "$stage/$model_name.pt"
# The ONNX Runtime engine's model, exported from the same state dict and verified against PyTorch float32
# on real images (VERIFY_IMAGES, default: the checkpoint's own validation images, from whatever data source
# it was trained on); no archive if it differs. Beside it, its int8 quantization (engine onnxruntime-int8),
# calibrated on the same images. The names are cifar3/engine.py's ONNX_FILES.
if [ -n "${VERIFY_IMAGES:-}" ]; then
  verify_images="$(realpath -m "$VERIFY_IMAGES")"
else  # its data path is relative to the repository root, where training ran
  verify_images="$stage/verify"
  (cd "$root" && "$python" -m training.samples "$stage/$model_name.pt" "$verify_images")
fi
(cd "$root" && "$python" -m training.export "$stage/$model_name.pt" "$stage/extra/model.onnx" --images "$verify_images" \
  --int8 "$stage/extra/model.int8.onnx")

mkdir -p "$model_store"
# The archiver stages files in $TMPDIR/<model name>: a private TMPDIR lets archives be built side by side.
TMPDIR="$stage" torch-model-archiver --force \
  --model-name "$model_name" --version 1.0 \
  --serialized-file "$stage/$model_name.pt" \
  --handler "$root/handler/cifar3_handler.py" \
  --extra-files "$stage/extra" \
  --config-file "$model_config" \
  --export-path "$model_store"
echo "wrote $model_store/$model_name.mar ($(du -h "$model_store/$model_name.mar" | cut -f1))"
