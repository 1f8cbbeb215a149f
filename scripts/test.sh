#!/usr/bin/env bash
# test.sh [pytest args...]: the test command. Sets up the test host, then runs `pytest tests` in the host venv
# with the given extra args. Exit code: pytest's; 77 when the chosen host cannot be built here (tier skipped).
#
#   TEST_HOST=0.3.75 (default)  scripts/setup_host.sh, HOST_DIR default <repo>/.host
#   TEST_HOST=current           scripts/setup_host_current.sh (current upstream ComfyUI from its tarball, newest
#                               PyPI packages, transformers 5, no protobuf), CURRENT_HOST_DIR default <repo>/.host-current
#   COMFY_UI_DIR, COMFY_PYTHON, COMFY_SERVER_ARGS, COMFY_FORCE_DYNAMIC_VRAM: see tests/comfy_client.py / README
# Server logs, screenshots and junit.xml land in $TEST_ARTIFACTS_DIR (default <repo>/test_artifacts/).
set -Eeuo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
case "${TEST_HOST:-0.3.75}" in
    0.3.75)  setup="$REPO/scripts/setup_host.sh"; HOST=${HOST_DIR:-$REPO/.host} ;;
    current) setup="$REPO/scripts/setup_host_current.sh"; HOST=${CURRENT_HOST_DIR:-$REPO/.host-current} ;;
    *) echo "test.sh: TEST_HOST must be 0.3.75 or current, not '$TEST_HOST'" >&2; exit 2 ;;
esac
HOST=$(realpath -m -- "$HOST")

rc=0
bash "$setup" "$HOST" || rc=$?
[[ $rc == 3 && "${TEST_HOST:-}" == current ]] && exit 77   # no tarball: setup_host_current.sh said why
[[ $rc == 0 ]] || exit "$rc"
export TEST_ARTIFACTS_DIR
TEST_ARTIFACTS_DIR=$(realpath -m -- "${TEST_ARTIFACTS_DIR:-$REPO/test_artifacts}")
mkdir -p "$TEST_ARTIFACTS_DIR"
cd "$REPO"
export COMFY_HOST_DIR="$HOST"
# `bash scripts/test.sh tests/test_x.py` runs that file only; without a test path, the whole of tests/
targets=(tests)
for arg in "$@"; do [[ "$arg" == tests/* ]] && targets=(); done
set +e
# the cache beside the git-ignored /.pytest_cache/, not in tests/ (the rootdir, see tests/pytest.ini)
"$HOST/venv/bin/python" -m pytest "${targets[@]}" -ra -o cache_dir="$REPO/.pytest_cache" \
    --junitxml="$TEST_ARTIFACTS_DIR/junit.xml" "$@"
rc=$?
echo "test.sh: pytest exit code $rc; artifacts in $TEST_ARTIFACTS_DIR/" >&2
exit $rc
