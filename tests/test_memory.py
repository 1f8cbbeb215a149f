"""Each weight held once (docs/ARCHITECTURE.md "Loading and memory"): bench/bench_memory.py on a small config in the
test host's ComfyUI (in-process, real). Ratios only, nothing timed. The real-size figures are in the README."""
import json
import subprocess

import pytest

from comfy_client import REPO_DIR


@pytest.fixture(scope="module")
def bench(comfy_python, comfy_host_dir, tmp_path_factory):
    comfy_dir = comfy_host_dir / "ComfyUI"
    if not comfy_python.exists() or not (comfy_dir / "folder_paths.py").exists():
        pytest.fail(f"no test host at {comfy_host_dir}: run scripts/setup_host.sh", pytrace=False)
    cache = tmp_path_factory.mktemp("bench_memory")
    result = subprocess.run([str(comfy_python), str(REPO_DIR / "bench" / "bench_memory.py"), "--comfy", str(comfy_dir),
                             "--cache", str(cache), "--blocks", "4", "--json"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_2d_model_has_no_motion_module_tensors(bench):
    node2d, size2d = bench["results"]["nodes2d"], bench["files"]["PixArt-XL-2-512x512.safetensors"]
    # the model's tensors: the 2D weights plus the position tables computed at load (far below 10 %)
    assert node2d["model_bytes"] <= 1.1 * size2d, (node2d["model_bytes"], size2d)


def test_motion_model_holds_each_weight_once(bench):
    files = sum(bench["files"].values())
    nodes = bench["results"]["nodes"]
    assert nodes["model_bytes"] <= 1.05 * files, (nodes["model_bytes"], files)


def test_node_path_resident_like_the_library(bench):
    lib, nodes = bench["results"]["library"], bench["results"]["nodes"]
    assert nodes["after_step"] <= 1.15 * lib["after_step"], (nodes, lib)


def test_loading_streams_from_the_file(bench):
    for path in ("nodes", "nodes2d"):
        r = bench["results"][path]
        assert r["peak_load"] <= 1.2 * r["after_step"], (path, r)
