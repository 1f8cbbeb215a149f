"""Packaging for ComfyUI-Manager and the Comfy Registry: requirements policy, pyproject.toml, LICENSE,
`comfy node validate` (comfy-cli, when installed) and a light pack import."""
import json
import os
import re
import shutil
import subprocess
import textwrap
import tomllib

import pytest

from comfy_client import REPO_DIR, host_dir

# never installed by a pack: ComfyUI-Manager skips them and a wrong build breaks the user's CUDA setup
TORCH_FAMILY = {"torch", "torchvision", "torchaudio", "torchsde", "xformers", "triton", "sageattention",
                "flash-attn", "nvidia-cudnn-cu12"}
REQUIREMENT = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(\[[A-Za-z0-9,._-]+\])?>=(?P<version>\d[\w.]*)$")
# libraries the pack may use, but only inside the code that needs them (ComfyUI start-up time)
HEAVY_MODULES = {"diffusers", "transformers", "sentencepiece", "imageio", "imageio_ffmpeg", "av", "cv2", "scipy"}
# comfy-cli's accepted classifier values (comfy_cli/registry/config_parser.py); others are silently dropped
REGISTRY_OS = ("Microsoft", "POSIX", "MacOS", "OS Independent")
REGISTRY_ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend",
                         "GPU :: Apple Metal"}


def requirement_lines():
    lines = (REPO_DIR / "requirements.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


@pytest.fixture(scope="module")
def pyproject():
    with open(REPO_DIR / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def test_requirements_are_lower_bounds_only_without_torch_family():
    lines = requirement_lines()
    assert lines, "requirements.txt is empty"
    for line in lines:
        match = REQUIREMENT.match(line)
        assert match, f"requirements.txt: {line!r} must be `name>=version` (no ==, ~=, <=, <, markers or URLs)"
        name = match["name"].lower().replace("_", "-")
        assert name not in TORCH_FAMILY, f"requirements.txt: {line!r}: the torch family is ComfyUI's, never ours"
    names = [REQUIREMENT.match(ln)["name"].lower() for ln in lines]
    assert len(names) == len(set(names)), f"requirements.txt lists a package twice: {names}"


def test_pyproject_dependencies_are_exactly_requirements_txt(pyproject):
    assert pyproject["project"]["dependencies"] == requirement_lines(), \
        "pyproject.toml [project].dependencies must repeat requirements.txt line by line (Registry installs " \
        "read the former, ComfyUI-Manager git installs the latter)"


def test_pyproject_project_table_follows_registry_rules(pyproject):
    project = pyproject["project"]
    # Registry ids: lowercase, no "comfyui" (comfy-cli strips it and warns), URL-safe
    assert re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,99}", project["name"]), project["name"]
    assert "comfyui" not in project["name"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"]), project["version"]
    assert project["description"].strip()
    assert project["license"] == {"file": "LICENSE"}
    license_text = (REPO_DIR / "LICENSE").read_text()
    assert license_text.startswith("MIT License") and "EasyAnimate node pack developers" in license_text
    assert project["requires-python"] == ">=3.10"
    assert project["urls"]["Repository"].startswith("https://")
    for classifier in project["classifiers"]:
        if classifier.startswith("Operating System :: "):
            assert classifier.split(" :: ", 1)[1].startswith(REGISTRY_OS), classifier
        if classifier.startswith("Environment :: "):
            assert classifier.split(" :: ", 1)[1] in REGISTRY_ACCELERATORS, classifier


def test_pyproject_tool_comfy_table(pyproject):
    comfy = pyproject["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["Icon"].startswith("https://")
    assert comfy["requires-comfyui"] == ">=0.3.75"
    # the same folder as WEB_DIRECTORY; the JS guards against being served twice (tests/test_browser.py)
    assert comfy["web"] == "web" and (REPO_DIR / "web" / "js" / "easyanimate_video.js").is_file()


def comfy_cli():
    """comfy-cli lives in its own venv (it must not share the host's packages): $COMFY_CLI, else
    <host>/comfycli-venv/bin/comfy, else `comfy` on PATH."""
    for candidate in (os.environ.get("COMFY_CLI"), host_dir() / "comfycli-venv" / "bin" / "comfy",
                      shutil.which("comfy")):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def test_comfy_node_validate_passes(tmp_path):
    cli = comfy_cli()
    if not cli:
        pytest.skip("comfy-cli not found ($COMFY_CLI, <host>/comfycli-venv/bin/comfy or PATH); install it in a "
                    "separate venv: python3 -m venv .host/comfycli-venv && "
                    ".host/comfycli-venv/bin/pip install comfy-cli ruff")
    # ruff (run by validate) would leave .ruff_cache in the repo; comfy-cli keeps its config in HOME
    env = dict(os.environ, RUFF_CACHE_DIR=str(tmp_path / "ruff"), HOME=str(tmp_path))
    result = subprocess.run([cli, "--skip-prompt", "--no-enable-telemetry", "node", "validate"], cwd=REPO_DIR,
                            env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "All validation checks passed" in output, output
    assert "Warning" not in output and "Error" not in output, output


def test_pack_import_is_light_and_exports_the_video_nodes(comfy_python):
    """Import the pack as ComfyUI does (a package under an arbitrary folder name, --cpu) in a fresh interpreter,
    after the core modules every pack shares (comfy.sd, comfy.model_base: they already load transformers):
    the pack itself adds no heavy library, registers the video nodes and sets WEB_DIRECTORY."""
    comfy_dir = host_dir() / "ComfyUI"
    if not comfy_python.exists() or not (comfy_dir / "folder_paths.py").exists():
        pytest.skip(f"no test host at {host_dir()} (run scripts/setup_host.sh)")
    script = textwrap.dedent(f"""
        import importlib.util, json, sys
        sys.argv = ["main.py", "--cpu"]
        import comfy.options
        comfy.options.enable_args_parsing()
        import comfy.sd, comfy.model_base
        before = set(sys.modules)
        spec = importlib.util.spec_from_file_location(
            "some_pack_folder", {str(REPO_DIR / "__init__.py")!r},
            submodule_search_locations=[{str(REPO_DIR)!r}])
        pack = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = pack
        spec.loader.exec_module(pack)
        print(json.dumps({{
            "new": sorted({{m.split(".")[0] for m in set(sys.modules) - before}}),
            "nodes": sorted(pack.NODE_CLASS_MAPPINGS),
            "names": {{k: pack.NODE_DISPLAY_NAME_MAPPINGS.get(k) for k in
                      ("EasyAnimateSaveVideo", "EasyAnimatePreviewVideo")}},
            "web": getattr(pack, "WEB_DIRECTORY", None)}}))
    """)
    result = subprocess.run([str(comfy_python), "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=comfy_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    heavy = sorted(set(info["new"]) & HEAVY_MODULES)
    assert not heavy, f"importing the pack imported {heavy}: import them inside the functions that need them"
    assert {"EasyAnimateSaveVideo", "EasyAnimatePreviewVideo"} <= set(info["nodes"])
    assert info["names"] == {"EasyAnimateSaveVideo": "EasyAnimate Save Video",
                             "EasyAnimatePreviewVideo": "EasyAnimate Preview Video"}
    assert info["web"] in ("./web", "web")


def test_pip_install_installs_the_library_only(tmp_path):
    """`pip install .` builds from pyproject.toml and installs `easyanimate_model` (with its train subpackage) and
    nothing else; the installed library imports and works outside the repository."""
    import sys

    source = tmp_path / "src"  # a copy: building in place would leave build/ in the checkout
    shutil.copytree(REPO_DIR, source, ignore=shutil.ignore_patterns(".git", ".host", "test_artifacts", "__pycache__",
                                                                     ".pytest_cache", "demo_output", "build"))
    target = tmp_path / "site"
    # no build isolation and no dependencies: offline, with the setuptools and packages of this environment
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps",
                             "--disable-pip-version-check", "--target", str(target), str(source)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    installed = sorted(p.name for p in target.iterdir() if not p.name.endswith((".dist-info", ".egg-info")))
    assert installed == ["easyanimate_model"], installed
    assert (target / "easyanimate_model" / "train" / "cli.py").is_file()
    script = textwrap.dedent("""
        import torch, easyanimate_model as ea
        from easyanimate_model.train.cli import parse_args
        assert ea.__file__.startswith(%r), ea.__file__
        model = ea.Transformer3DModel(ea.TransformerConfig(num_layers=1, num_attention_heads=2, attention_head_dim=8,
                                                           caption_channels=8, cross_attention_dim=16,
                                                           motion_module=ea.MotionModuleConfig(norm_num_groups=4)))
        out = model(torch.zeros(1, 4, 2, 8, 8), torch.tensor([10]), torch.zeros(1, 3, 8))
        assert out.shape == (1, 8, 2, 8, 8), out.shape
        assert issubclass(ea.EasyAnimateLoadError, ValueError)
        print("ok")
    """ % str(target))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-c", script], cwd=outside, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr
