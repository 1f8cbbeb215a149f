#!/usr/bin/env bash
# setup_host_current.sh [HOST_DIR]   (default: <repo>/.host-current)
#
# The second test host: current upstream ComfyUI as a new user gets it today. Makes HOST_DIR/venv (Python 3.11,
# CPU torch 2.13.0) with the NEWEST PyPI releases of everything the ComfyUI tree's own requirements.txt asks for
# (no 0.3.75 lock), transformers 5.x, protobuf uninstalled (ComfyUI does not require it), this pack's
# requirements.txt, the test tools and playwright; and unpacks the ComfyUI tree into HOST_DIR/ComfyUI.
#
# The tree comes from a tarball of upstream ComfyUI (GPL-3; it is never copied into this repo):
#   COMFY_CURRENT_TARBALL   default <repo>/../shared/host/comfyui-0.33.0.tar.xz
# Without it the script prints one line and exits with code 3 (scripts/test.sh and .ci/run then skip the tier).
#
# Idempotent: HOST_DIR/.setup_stamp holds a hash of the inputs; a matching stamp skips everything
# (SETUP_HOST_FORCE=1 redoes it). torch, torchvision, torchaudio and spandrel are installed exactly like
# tests/host/install_host.sh does for 0.3.75 (CPU torch pin, torchvision import shim, pure-Python torchaudio).
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HOST=$(realpath -m -- "${1:-$REPO/.host-current}")
HOSTKIT="$REPO/tests/host"
TARBALL=$(realpath -m -- "${COMFY_CURRENT_TARBALL:-$REPO/../shared/host/comfyui-0.33.0.tar.xz}")
TORCH_PIN="torch==2.13.0"
PYTHON=${PYTHON:-python3}
T0=$(date +%s)
say() { echo "setup_host_current.sh [$(($(date +%s) - T0))s] $*" >&2; }
die() { echo "setup_host_current.sh: ERROR: $*" >&2; exit 1; }

if [[ ! -f "$TARBALL" ]]; then
    echo "setup_host_current.sh: no ComfyUI tarball at $TARBALL (set COMFY_CURRENT_TARBALL): current-ComfyUI tier skipped" >&2
    exit 3
fi

stamp_inputs=("${BASH_SOURCE[0]}" "$HOSTKIT/_comfy_host_tv_shim.py" "$HOSTKIT/requirements-browser.lock"
              "$REPO/requirements.txt" "$REPO/tests/requirements-test.txt")
stamp=$( (cat "${stamp_inputs[@]}"; sha256sum "$TARBALL") | sha256sum | cut -d' ' -f1)
STAMP_FILE="$HOST/.setup_stamp"
if [[ "${SETUP_HOST_FORCE:-0}" != 1 && -f "$STAMP_FILE" && "$(cat "$STAMP_FILE")" == "$stamp" &&
      -x "$HOST/venv/bin/python" && -f "$HOST/ComfyUI/main.py" ]]; then
    say "host at $HOST is up to date (SETUP_HOST_FORCE=1 redoes it)"
    exit 0
fi
rm -f "$STAMP_FILE"
mkdir -p "$HOST"

say "ComfyUI tree from $(basename "$TARBALL") -> $HOST/ComfyUI"
rm -rf "$HOST/ComfyUI" "$HOST/ComfyUI.partial"
mkdir -p "$HOST/ComfyUI.partial"
tar -xJf "$TARBALL" -C "$HOST/ComfyUI.partial" --strip-components=1 || die "could not unpack $TARBALL"
[[ -f "$HOST/ComfyUI.partial/main.py" && -f "$HOST/ComfyUI.partial/comfyui_version.py" ]] ||
    die "$TARBALL does not hold a ComfyUI tree (no main.py / comfyui_version.py under its top folder)"
mkdir -p "$HOST/ComfyUI.partial/user"
mv "$HOST/ComfyUI.partial" "$HOST/ComfyUI"
version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$HOST/ComfyUI/comfyui_version.py")

say "venv at $HOST/venv"
if [[ ! -x "$HOST/venv/bin/python" ]]; then
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' ||
        die "'$PYTHON' is $("$PYTHON" -V 2>&1); Python 3.11 is needed (the CPU torch 2.13.0 wheel is cp311)"
    "$PYTHON" -m venv "$HOST/venv" || die "python -m venv failed"
fi
PY="$HOST/venv/bin/python"
pip_() {
    "$PY" -m pip --disable-pip-version-check "$@" 2>&1 |
        { grep -v "is ignored: it is neither a file nor a directory" || true; }
    return "${PIPESTATUS[0]}"
}
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "$TORCH_PIN" > "$CONSTRAINTS"   # nothing may move torch off the CPU build
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

say "$TORCH_PIN (CPU), then torchvision/torchaudio/spandrel without deps (as tests/host/install_host.sh)"
pip_ install -q -c "$CONSTRAINTS" "$TORCH_PIN" || die "pip could not install $TORCH_PIN"
pip_ install -q --only-binary :all: --no-deps torchvision==0.28.0 torchaudio==2.11.0 spandrel || die "torchvision/torchaudio/spandrel"
"$PY" -c 'import torchaudio' >/dev/null 2>&1 || rm -f "$SITE"/torchaudio/lib/*.so
install -m 0644 "$HOSTKIT/_comfy_host_tv_shim.py" "$SITE/_comfy_host_tv_shim.py"
echo "import _comfy_host_tv_shim" > "$SITE/comfy_host_tv_shim.pth"

say "ComfyUI $version requirements.txt, newest releases (torch/torchvision/torchaudio/spandrel left as above)"
grep -viE '^(torch|torchvision|torchaudio|spandrel)([^a-z0-9_-]|$)' "$HOST/ComfyUI/requirements.txt" > "$HOST/comfy-requirements.txt"
pip_ install -q -U -c "$CONSTRAINTS" -r "$HOST/comfy-requirements.txt" ||
    die "pip could not install ComfyUI's requirements.txt"

say "the pack's requirements.txt, test tools and playwright, no lock (what pip picks today)"
pip_ install -q -U -c "$CONSTRAINTS" -r "$REPO/requirements.txt" -r "$REPO/tests/requirements-test.txt" \
    -r "$HOSTKIT/requirements-browser.lock" || die "pip could not install the pack's requirements"
pip_ install -q -U -c "$CONSTRAINTS" "transformers>=5" tokenizers huggingface_hub safetensors ||
    die "pip could not install transformers 5"
# ComfyUI does not require protobuf and many users lack it: the pack must work without it
pip_ uninstall -q -y protobuf || true
# ...but the tokenizer test's reference (transformers 4's slow T5Tokenizer, in the 0.3.75 venv) needs it for
# legacy=False folders: a folder of its own, put on that reference's PYTHONPATH only (tests/test_tokenizer.py)
rm -rf "$HOST/reference-protobuf"
pip_ install -q --no-deps --target "$HOST/reference-protobuf" protobuf || die "pip could not install protobuf for the reference"
pip_ check >/dev/null || say "note: pip check: $(pip_ check | head -5 | tr '\n' ' ')"

"$PY" - "$version" <<'EOF' || die "import/version check failed"
import importlib.metadata as md, sys
import torch, torchvision, torchaudio, transformers  # noqa: F401
assert torch.__version__ == "2.13.0+cpu", torch.__version__
assert int(transformers.__version__.split(".")[0]) >= 5, transformers.__version__
try:
    import google.protobuf  # noqa: F401
    raise SystemExit("protobuf is still installed")
except ImportError:
    pass
names = ("transformers", "tokenizers", "sentencepiece", "comfyui-frontend-package", "comfy-aimdo", "comfy-kitchen")
print(f"    ComfyUI {sys.argv[1]}:", {n: md.version(n) for n in names})
EOF
echo "$stamp" > "$STAMP_FILE"
say "done: $PY, ComfyUI $version at $HOST/ComfyUI"
