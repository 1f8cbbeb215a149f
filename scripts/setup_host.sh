#!/usr/bin/env bash
# setup_host.sh [HOST_DIR]   (default: <repo>/.host)
#
# Makes HOST_DIR/venv (Python 3.11, CPU torch 2.13.0) and HOST_DIR/ComfyUI (the real ComfyUI 0.3.75 tree) with
# tests/host/install_host.sh, then installs this pack's requirements.txt, tests/requirements-test.txt and
# playwright into that venv WITH the host's pins as constraints: a requirement that conflicts with stock ComfyUI
# 0.3.75 fails here, not on a user's machine. Installs Debian's chromium (for browser tests) when running as
# root with apt-get and /usr/bin/chromium is missing.
#
# Idempotent and quick when nothing changed: HOST_DIR/.setup_stamp holds a hash of every input file; a matching
# stamp skips the pip steps.
#
# Environment:
#   SETUP_HOST_FORCE=1        redo the pip steps even when the stamp matches
#   SETUP_HOST_NO_BROWSER=1   neither playwright nor chromium
#   SETUP_HOST_NO_CHROMIUM=1  no apt-get install chromium (playwright still installed)
#   PYTHON=python3.11         interpreter for a new venv (passed to install_host.sh)
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HOST=$(realpath -m -- "${1:-$REPO/.host}")
HOSTKIT="$REPO/tests/host"
LOCK="$HOSTKIT/requirements-0.3.75.lock"
TORCH_PIN="torch==2.13.0"
T0=$(date +%s)
say() { echo "setup_host.sh [$(($(date +%s) - T0))s] $*" >&2; }
die() { echo "setup_host.sh: ERROR: $*" >&2; exit 1; }
# pip, minus the "Location '...' is ignored" noise that a local index folder in pip's config causes
pip_() {
    "$HOST/venv/bin/python" -m pip --disable-pip-version-check "$@" 2>&1 |
        { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

no_browser=${SETUP_HOST_NO_BROWSER:-0}
reqs=(-r "$REPO/requirements.txt" -r "$REPO/tests/requirements-test.txt")
[[ "$no_browser" == 1 ]] || reqs+=(-r "$HOSTKIT/requirements-browser.lock")

stamp_inputs=("${BASH_SOURCE[0]}" "$HOSTKIT/install_host.sh" "$HOSTKIT/_comfy_host_tv_shim.py" "$LOCK"
              "$HOSTKIT/requirements-browser.lock" "$HOSTKIT/requirements-comfycli.txt" "$REPO/requirements.txt"
              "$REPO/tests/requirements-test.txt")
stamp=$( (cat "${stamp_inputs[@]}"; echo "no_browser=$no_browser") | sha256sum | cut -d' ' -f1)
STAMP_FILE="$HOST/.setup_stamp"

if [[ "${SETUP_HOST_FORCE:-0}" != 1 && -f "$STAMP_FILE" && "$(cat "$STAMP_FILE")" == "$stamp" &&
      -x "$HOST/venv/bin/python" && -f "$HOST/ComfyUI/main.py" ]]; then
    say "host at $HOST is up to date (SETUP_HOST_FORCE=1 redoes it)"
else
    rm -f "$STAMP_FILE"
    say "host venv + ComfyUI 0.3.75 at $HOST (tests/host/install_host.sh)"
    mkdir -p "$HOST"
    INSTALL_HOST_NO_BROWSER=1 bash "$HOSTKIT/install_host.sh" "$HOST/venv" "$HOST/ComfyUI" ||
        die "tests/host/install_host.sh failed (see above)"

    say "pack requirements with the ComfyUI 0.3.75 pins as constraints"
    # a conflict here means the pack cannot be installed beside stock ComfyUI 0.3.75 as pinned in the lock
    pip_ install -q -c "$LOCK" -c <(echo "$TORCH_PIN") "${reqs[@]}" ||
        die "pip could not install the pack's requirements with the host pins (above)"
    pip_ check >/dev/null || say "note: pip check: $(pip_ check | head -5 | tr '\n' ' ')"

    say "comfy-cli (for \`comfy node validate\`) in its own venv $HOST/comfycli-venv"
    [[ -x "$HOST/comfycli-venv/bin/python" ]] || "$HOST/venv/bin/python" -m venv "$HOST/comfycli-venv"
    "$HOST/comfycli-venv/bin/python" -m pip --disable-pip-version-check install -q \
        -r "$HOSTKIT/requirements-comfycli.txt" 2>&1 | { grep -v "is ignored: it is neither" || true; } ||
        die "pip could not install comfy-cli (tests/host/requirements-comfycli.txt)"
    echo "$stamp" > "$STAMP_FILE"
fi

# chromium for browser tests (Playwright drives Debian's build; never `playwright install`)
if [[ "$no_browser" != 1 && "${SETUP_HOST_NO_CHROMIUM:-0}" != 1 && ! -x /usr/bin/chromium ]]; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        say "apt-get install chromium (for the browser tests; SETUP_HOST_NO_CHROMIUM=1 skips this)"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
            >"$HOST/apt-chromium.log" 2>&1 ||
            say "could not install chromium (log: $HOST/apt-chromium.log); browser tests will be skipped"
    else
        say "no /usr/bin/chromium, and not root with apt-get: browser tests will be skipped" \
            "(install Debian's chromium package to run them)"
    fi
fi
say "done: $HOST/venv/bin/python, ComfyUI at $HOST/ComfyUI"
