#!/usr/bin/env bash
# The main job in one command: set up, train (if needed), evaluate, archive, serve, open the UI.
#
#   scripts/demo.sh                 # data: $CIFAR3_DATA, default torchvision's CIFAR-10 download
#   scripts/demo.sh --data PATH/TO/IMAGES    # an image folder: one sub-folder per class
#   scripts/demo.sh stop            # stop everything the demo started
#
# Idempotent and resumable: a second run reuses .venv, checkpoints/cifar3.pt, run/eval and
# model_store/cifar3.mar when they are newer than what they are made from, and a server or UI that
# is already running (TorchServe is restarted when the archive was rebuilt). It writes only git-ignored
# paths (checkpoints/, run/, model_store/). Env: CIFAR3_DATA, CIFAR3_EVAL_DATA (default: CIFAR-10's official
# test split for cifar10 data, otherwise the checkpoint's own validation split), CIFAR3_UI_PORT (8501).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py=.venv/bin/python
checkpoint=checkpoints/cifar3.pt
mar=model_store/cifar3.mar
eval_dir=run/eval
ui_port="${CIFAR3_UI_PORT:-8501}"
ui_pid=run/streamlit.pid

step_started=0
step() { step_started=$SECONDS; printf '\n==> %s\n' "$*"; }
done_step() { printf '    done in %ss\n' "$((SECONDS - step_started))"; }

# A pid file left by a killed UI may name another process by now: only a streamlit one counts.
ui_running() { [ -f "$ui_pid" ] && ps -o args= -p "$(cat "$ui_pid")" 2>/dev/null | grep -q streamlit; }

if [ "${1:-}" = "stop" ]; then
  if ui_running; then kill "$(cat "$ui_pid")" && echo "stopped the Streamlit UI"; fi
  rm -f "$ui_pid"
  [ -x "$py" ] && "$py" scripts/serve.py stop
  exit 0
fi

data="${CIFAR3_DATA:-cifar10}"
while [ $# -gt 0 ]; do
  case "$1" in
    --data) data="$2"; shift 2 ;;
    --data=*) data="${1#--data=}"; shift ;;
    *) echo "usage: scripts/demo.sh [--data SOURCE] | stop" >&2; exit 2 ;;
  esac
done
if [ -n "${CIFAR3_EVAL_DATA:-}" ]; then
  eval_args=(--data "$CIFAR3_EVAL_DATA"); eval_what="$CIFAR3_EVAL_DATA"
elif [ "$data" = cifar10 ]; then
  eval_args=(--data cifar10); eval_what="CIFAR-10's test split"
else  # never report accuracy on the images the model trained on
  eval_args=(--validation); eval_what="the checkpoint's validation split"
fi
total_started=$SECONDS

step "1/6 set-up (Java 17, .venv with the project and its pinned dependencies)"
scripts/setup.sh
done_step

step "2/6 train ($checkpoint)"
if [ -f "$checkpoint" ]; then
  echo "    reusing $checkpoint (delete it to train again)"
else
  "$py" -m training.train --data "$data" --out "$checkpoint"
fi
done_step

step "3/6 evaluate on $eval_what ($eval_dir)"
if [ "$eval_dir/metrics.json" -nt "$checkpoint" ]; then
  echo "    reusing $eval_dir (it is newer than the checkpoint)"
else
  "$py" -m training.evaluate --checkpoint "$checkpoint" "${eval_args[@]}" --report-dir "$eval_dir" | tail -n 12
fi
done_step

step "4/6 archive ($mar)"
# Rebuilt when the checkpoint, the handler, its config or the serving core changed since.
archived=0
if [ -f "$mar" ] && [ -z "$(find "$checkpoint" handler cifar3 -newer "$mar" -type f \( -name '*.pt' -o -name '*.py' -o -name '*.yaml' \) | head -1)" ]; then
  echo "    reusing $mar"
else
  scripts/archive.sh "$checkpoint"
  archived=1
fi
done_step

step "5/6 TorchServe (config.properties)"
# TorchServe reads the .mar when it starts: a server already running keeps serving the old archive.
if [ "$archived" = 0 ] && "$py" scripts/serve.py status >/dev/null 2>&1; then
  echo "    already running and READY"
else
  if [ "$archived" = 1 ]; then echo "    (re)starting: $mar was rebuilt"; fi
  "$py" scripts/serve.py stop >/dev/null 2>&1 || true
  "$py" scripts/serve.py start
fi
done_step

step "6/6 Streamlit UI (ui/app.py)"
if ui_running; then
  echo "    already running (pid $(cat "$ui_pid"))"
else
  mkdir -p run
  nohup .venv/bin/streamlit run ui/app.py --server.address 127.0.0.1 --server.port "$ui_port" \
    --server.headless true --browser.gatherUsageStats false >run/streamlit.log 2>&1 &
  echo $! >"$ui_pid"
  for _ in $(seq 60); do
    curl -fs "http://127.0.0.1:$ui_port/_stcore/health" >/dev/null 2>&1 && break
    sleep 1
  done
  curl -fs "http://127.0.0.1:$ui_port/_stcore/health" >/dev/null || { echo "UI did not start: see run/streamlit.log" >&2; exit 1; }
fi
done_step

token=$("$py" -c 'import json; print(json.load(open("run/key_file.json"))["inference"]["key"])')
cat <<EOF

cifar3 is up (this run took $((SECONDS - total_started))s).
  UI:          http://127.0.0.1:$ui_port
  inference:   http://127.0.0.1:8080/predictions/cifar3
  management:  http://127.0.0.1:8081/models/cifar3   (token: run/key_file.json "management")
  metrics:     http://127.0.0.1:8082/metrics
  evaluation:  $eval_dir/metrics.json, $eval_dir/confusion_matrix.png
Try it:
  curl -H "Authorization: Bearer $token" http://127.0.0.1:8080/predictions/cifar3 -T IMAGE.jpg
Stop everything:
  scripts/demo.sh stop
EOF
