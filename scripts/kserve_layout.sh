#!/usr/bin/env bash
# Write the storage layout that KServe's TorchServe runtime serves (docs/deployment.md, deploy/kserve/).
#
#   scripts/kserve_layout.sh OUT_DIR [MAR]      (MAR default: model_store/cifar3.mar, from scripts/archive.sh)
#
# OUT_DIR/config/config.properties   a copy of deploy/kserve/config.properties
# OUT_DIR/model-store/cifar3.mar     a copy of MAR
#
# Copy OUT_DIR to the InferenceService's storageUri (a PVC or a bucket): the runtime mounts it at
# /mnt/models and starts
#   torchserve --start --model-store=/mnt/models/model-store --ts-config=/mnt/models/config/config.properties
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ $# -lt 1 ] || [ $# -gt 2 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  echo "usage: scripts/kserve_layout.sh OUT_DIR [MAR]   (MAR default: model_store/cifar3.mar)" >&2
  exit 2
fi
out="$1"
mar="${2:-$root/model_store/cifar3.mar}"
config="$root/deploy/kserve/config.properties"
python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"

if [ ! -f "$mar" ]; then
  echo "error: model archive not found: $mar" >&2
  echo "Build it first:  scripts/archive.sh [CHECKPOINT]" >&2
  exit 2
fi
# The config's model_snapshot loads cifar3.mar as model cifar3: refuse an archive of another name,
# or a file that is not an archive, before anything is written.
"$python" - "$mar" <<'PY'
import json
import sys
import zipfile

path = sys.argv[1]
try:
    with zipfile.ZipFile(path) as archive:
        name = json.loads(archive.read("MAR-INF/MANIFEST.json"))["model"]["modelName"]
except (OSError, zipfile.BadZipFile, KeyError, ValueError) as exc:
    sys.exit(f"error: {path} is not a model archive from scripts/archive.sh ({exc})")
if name != "cifar3":
    sys.exit(f"error: {path} holds model {name!r}; deploy/kserve/config.properties serves model 'cifar3'")
PY

mkdir -p "$out/config" "$out/model-store"
cp "$config" "$out/config/config.properties"
cp "$mar" "$out/model-store/cifar3.mar"
echo "wrote $out/config/config.properties and $out/model-store/cifar3.mar ($(du -h "$mar" | cut -f1))"
