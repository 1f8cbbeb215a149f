#!/usr/bin/env bash
# demo.sh [demo.py args...]: sets up the test host (scripts/setup_host.sh; HOST_DIR env, default <repo>/.host),
# then makes a short text-to-video clip through the real ComfyUI server with this pack, on tiny random-weight
# models; the video and the server log land in <repo>/demo_output/. `bash scripts/demo.sh --help` lists options.
set -Eeuo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HOST=$(realpath -m -- "${HOST_DIR:-$REPO/.host}")

SETUP_HOST_NO_CHROMIUM=${SETUP_HOST_NO_CHROMIUM:-1} bash "$REPO/scripts/setup_host.sh" "$HOST"
COMFY_HOST_DIR="$HOST" exec "$HOST/venv/bin/python" "$REPO/scripts/demo.py" "$@"
