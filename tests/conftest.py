"""pytest setup: the repo on sys.path, the `server` marker, and the session fixture `comfy`.

`comfy` starts the real ComfyUI of the test host (scripts/setup_host.sh or setup_host_current.sh; $COMFY_HOST_DIR,
default <repo>/.host; see tests/comfy_client.py for COMFY_UI_DIR, COMFY_SERVER_ARGS, COMFY_FORCE_DYNAMIC_VRAM)
once per session, with tiny release models in its models folder and this repo linked in as a custom node.
Only tests that request it start a server; they are marked `server` automatically (`-m "not server"` skips them).
The extra tiers of .ci/run run `-m "server or every_host"`: `every_host` marks library tests whose result depends
on the host's packages (e.g. the tokenizer under transformers 5 without protobuf).
"""
import contextlib
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from comfy_client import (REPO_DIR, ComfyServer, ServerError, artifacts_dir, host_dir,
                          host_python)

ARTIFACTS_DIR = artifacts_dir()
if str(REPO_DIR) not in sys.path:  # `import easyanimate_model` from tests, without installing the pack
    sys.path.insert(0, str(REPO_DIR))

# a folder name that is not the canonical one: proves nothing in the pack hard-codes where it is installed
PACK_FOLDER_NAME = "easyanimate-pack-under-test"


def pytest_configure(config):
    config.addinivalue_line("markers", "server: starts the real ComfyUI server (session fixture `comfy`)")
    config.addinivalue_line("markers", "browser: drives the real frontend in Debian's chromium (Playwright)")
    config.addinivalue_line("markers", "every_host: a library test that the extra tiers of .ci/run run too")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "comfy" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.server)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    server = getattr(item, "funcargs", {}).get("comfy")
    if report.failed and isinstance(server, ComfyServer):
        report.sections.append(("comfy server log", server.log_tail(60)))


@pytest.fixture(scope="session")
def comfy_host_dir():
    """The test host folder (venv/ + ComfyUI/)."""
    return host_dir()


@pytest.fixture(scope="session")
def comfy_python(comfy_host_dir):
    """The host venv's python: library tests that need a subprocess run it in the same environment."""
    return host_python(comfy_host_dir)


@contextlib.contextmanager
def tiny_server(host, prefix: str, log_name: str, **server_kwargs):
    """A started ComfyServer with the pack and tiny release models in a throw-away base folder; its log is saved as
    test_artifacts/<log_name> and the folder removed afterwards. `server_kwargs` go to ComfyServer."""
    try:
        from easyanimate_model.tiny import write_release_files
    except ImportError as e:
        pytest.fail(f"a test server needs easyanimate_model.tiny.write_release_files to put tiny models in its "
                    f"models folder: {e}", pytrace=False)
    base = Path(tempfile.mkdtemp(prefix=prefix))
    server = ComfyServer(host, base, pack_dir=REPO_DIR, **{"pack_folder_name": PACK_FOLDER_NAME, **server_kwargs})
    log_copy = ARTIFACTS_DIR / log_name
    try:
        # the pipeline node loads the VAE as ComfyUI's SD VAE, which needs the real (random-weight) SD layout
        write_release_files(server.models_dir, vae="tiny")
        try:
            server.start()
        except ServerError as e:
            pytest.fail(f"{e}\n(full log: {log_copy})", pytrace=False)
        yield server
    finally:
        server.stop()
        server.save_log(log_copy)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def comfy(comfy_host_dir):
    """A running ComfyUI with the pack loaded and tiny release models (see tests/comfy_client.py)."""
    with tiny_server(comfy_host_dir, "ea-comfy-base-", "comfy_server.log") as server:
        yield server
