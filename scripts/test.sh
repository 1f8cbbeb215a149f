#!/usr/bin/env bash
# test.sh [pytest args...]: the test command. Sets up the test host (scripts/setup_host.sh; HOST_DIR env,
# default <repo>/.host), then runs `pytest tests` in the host venv with the given extra args.
# Exit code: pytest's. Server logs, screenshots and junit.xml land in <repo>/test_artifacts/.
set -Eeuo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HOST=$(realpath -m -- "${HOST_DIR:-$REPO/.host}")

bash "$REPO/scripts/setup_host.sh" "$HOST"
mkdir -p "$REPO/test_artifacts"
cd "$REPO"
export COMFY_HOST_DIR="$HOST"
# `bash scripts/test.sh tests/test_x.py` runs that file only; without a test path, the whole of tests/
targets=(tests)
for arg in "$@"; do [[ "$arg" == tests/* ]] && targets=(); done
set +e
# the cache beside the git-ignored /.pytest_cache/, not in tests/ (the rootdir, see tests/pytest.ini)
"$HOST/venv/bin/python" -m pytest "${targets[@]}" -ra -o cache_dir="$REPO/.pytest_cache" --junitxml="$REPO/test_artifacts/junit.xml" "$@"
rc=$?
echo "test.sh: pytest exit code $rc; artifacts in $REPO/test_artifacts/" >&2
exit $rc
