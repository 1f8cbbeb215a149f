"""pytest setup: the repo on sys.path, the `server` marker, and the session fixture `comfy`.

`comfy` starts the real ComfyUI of the test host (scripts/setup_host.sh or setup_host_current.sh; $COMFY_HOST_DIR,
default <repo>/.host; see tests/comfy_client.py for COMFY_UI_DIR, COMFY_SERVER_ARGS, COMFY_FORCE_DYNAMIC_VRAM)
once per session, with tiny release models in its models folder and this repo linked in as a custom node.
Only tests that request it start a server; they are marked `server` automatically (`-m "not server"` skips them).
The extra tiers of .ci/run run `-m "server or every_host"`: `every_host` marks library tests whose result depends
on the host's packages (e.g. the tokenizer under transformers 5 without protobuf).
"""
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from comfy_client import (REPO_DIR, ComfyServer, ServerError, artifacts_dir, env_force_dynamic_vram, host_dir,
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


# Issue 8 item 1 (MODEL loading under DynamicVRAM) is not fixed on this branch: with DynamicVRAM forced (the
# current-dynamic-vram tier only) the pipeline loader fails ("'NoneType' object has no attribute 'is_meta'" in
# comfy_model.py), and so does every test that loads a MODEL. Expected failures there, not strict: delete this
# list once the loading fix is merged (a test that passes now shows as XPASS).
DYNAMIC_VRAM_ISSUE_8_ITEM_1 = {
    "test_browser::test_queue_from_page_plays_in_node_and_survives_reload",
    "test_examples::test_api_twin_runs_on_tiny_models_through_api_queue",
    "test_host_smoke::test_demo_workflow_makes_an_mp4",
    "test_nodes_more::test_batch_of_two_videos",
    "test_nodes_more::test_chained_loras_add_up",
    "test_nodes_more::test_core_clip_text_encode_equals_ours_and_cfg_one_ignores_negative",
    "test_nodes_more::test_core_ksampler_uses_the_motion_module",
    "test_nodes_more::test_full_3d_base_checkpoint_replaces_motion_module_too",
    "test_nodes_more::test_input_model_unchanged_after_patching_nodes",
    "test_nodes_more::test_latent_previews_and_progress",
    "test_nodes_more::test_lora_t5_part_and_strength_zero",
    "test_nodes_more::test_lora_with_junk_keys_logs_them_and_applies_the_rest",
    "test_nodes_more::test_single_dit_file_of_the_released_width",
    "test_nodes_more::test_t5_device_cpu_is_honoured",
    "test_nodes_more::test_t5_fp8_file_like_t5xxl_fp8_e4m3fn",
    "test_nodes_more::test_t5_from_text_encoders_file_matches_transformers",
    "test_nodes_more::test_tiled_and_chunked_decode",
    "test_nodes_more::test_weight_dtype_is_used_and_close_to_fp32",
    "test_nodes_pipeline::test_core_ksampler_and_vae_decode_on_our_model",
    "test_nodes_pipeline::test_core_sampler_custom_on_our_model",
    "test_nodes_pipeline::test_each_sampler_runs",
    "test_nodes_pipeline::test_interrupt_stops_within_a_step_and_server_stays_healthy",
    "test_nodes_pipeline::test_node_path_matches_library_path",
    "test_nodes_pipeline::test_portrait_checkpoint_and_lora_change_the_output",
    "test_nodes_pipeline::test_same_seed_same_video_and_motion_module_matters",
    "test_nodes_pipeline::test_text_to_video_end_to_end",
    "test_nodes_pipeline::test_too_few_pndm_steps_is_a_readable_error",
    "test_nodes_pipeline::test_wrong_files_give_readable_errors",
}


def pytest_collection_modifyitems(config, items):
    dynamic_vram = env_force_dynamic_vram()
    for item in items:
        if "comfy" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.server)
        name = f"{item.module.__name__}::{getattr(item, 'originalname', item.name)}"
        if dynamic_vram and name in DYNAMIC_VRAM_ISSUE_8_ITEM_1:
            item.add_marker(pytest.mark.xfail(strict=False, reason="issue 8 item 1: MODEL loading with DynamicVRAM"))


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


@pytest.fixture(scope="session")
def comfy(comfy_host_dir):
    """A running ComfyUI with the pack loaded and tiny release models (see tests/comfy_client.py)."""
    try:
        from easyanimate_model.tiny import write_release_files
    except ImportError as e:
        pytest.fail(f"the `comfy` fixture needs easyanimate_model.tiny.write_release_files to put tiny "
                    f"models in the server's models folder: {e}", pytrace=False)
    base = Path(tempfile.mkdtemp(prefix="ea-comfy-base-"))
    server = ComfyServer(comfy_host_dir, base, pack_dir=REPO_DIR, pack_folder_name=PACK_FOLDER_NAME)
    log_copy = ARTIFACTS_DIR / "comfy_server.log"
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
