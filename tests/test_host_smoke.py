"""Smoke tests of the pack inside the real ComfyUI 0.3.75 server (the `comfy` fixture, tests/conftest.py)."""
import random

import pytest

from comfy_client import PromptRejected, output_files, t2v_prompt

# docs/ARCHITECTURE.md "node ids": ids are stable and inputs append-only (workflows store widgets by position)
NODE_CONTRACT = {
    "EasyAnimateLoadPipeline": (["pipeline", "weight_dtype", "text_encoder_device"], ["MODEL", "CLIP", "VAE"]),
    "EasyAnimateLoadDiT": (["dit_name", "weight_dtype"], ["MODEL"]),
    "EasyAnimateLoadMotionModule": (["model", "motion_module_name"], ["MODEL"]),
    "EasyAnimateLoadBaseCheckpoint": (["model", "ckpt_name"], ["MODEL"]),
    "EasyAnimateLoraLoader": (["model", "lora_name", "strength_model", "strength_clip", "clip", "strict"],
                              ["MODEL", "CLIP"]),
    "EasyAnimateLoadT5": (["source", "device"], ["CLIP"]),
    "EasyAnimateTextEncode": (["clip", "prompt", "negative_prompt"], ["CONDITIONING", "CONDITIONING"]),
    "EasyAnimateEmptyLatent": (["width", "height", "frames", "batch_size"], ["LATENT"]),
    "EasyAnimateSampler": (["model", "positive", "negative", "latent", "seed", "steps", "cfg", "sampler", "denoise"],
                           ["LATENT"]),
    "EasyAnimateVAEDecode": (["vae", "samples", "frames_per_chunk", "tiled"], ["IMAGE"]),
    "EasyAnimateSaveVideo": (["images", "filename_prefix", "fps", "format", "quality", "loop"], ["IMAGE"]),
    "EasyAnimatePreviewVideo": (["images", "fps", "format"], ["IMAGE"]),
    "EasyAnimateVAEEncodeVideo": (["vae", "images", "frames_per_chunk", "size"], ["LATENT"]),
    "EasyAnimateContextOptions": (["model", "context_length", "context_overlap", "context_schedule", "fuse_method",
                                   "freenoise", "context_stride", "closed_loop"], ["MODEL"]),
}
OUTPUT_NODES = {"EasyAnimateSaveVideo", "EasyAnimatePreviewVideo"}
SCALAR_WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN"}


def input_specs(info):
    """[(name, type, options)] of a node's required then optional inputs, in widget order."""
    specs = []
    for section in ("required", "optional"):
        inputs = info["input"].get(section) or {}
        for name in info.get("input_order", {}).get(section, list(inputs)):
            spec = inputs[name]
            specs.append((name, spec[0], (spec[1] if len(spec) > 1 else None) or {}))
    return specs


def test_pack_imports_under_any_folder_name(comfy):
    log = comfy.log_text()
    import_lines = [ln for ln in log.splitlines() if f"custom_nodes/{comfy.pack_folder_name}" in ln]
    assert import_lines, f"the pack folder {comfy.pack_folder_name} does not appear in the import times"
    assert not any("IMPORT FAILED" in ln for ln in import_lines), import_lines


def test_object_info_lists_every_node_of_the_contract(comfy):
    info = comfy.object_info()
    missing = sorted(set(NODE_CONTRACT) - set(info))
    assert not missing, f"nodes missing from /object_info: {missing}"
    for node_id, (inputs, outputs) in NODE_CONTRACT.items():
        node = info[node_id]
        assert node["category"].startswith("EasyAnimate/"), (node_id, node["category"])
        assert [name for name, _, _ in input_specs(node)] == inputs, node_id
        assert list(node["output"]) == outputs, node_id
        assert node["output_node"] == (node_id in OUTPUT_NODES), node_id


@pytest.mark.parametrize("node_id", sorted(NODE_CONTRACT))
def test_every_input_has_a_tooltip_and_widgets_a_default(comfy, node_id):
    node = comfy.object_info(node_id)
    for name, kind, opts in input_specs(node):
        assert str(opts.get("tooltip", "")).strip(), f"{node_id}.{name} has no tooltip"
        if isinstance(kind, str) and kind in SCALAR_WIDGETS:
            assert "default" in opts, f"{node_id}.{name} ({kind}) has no default"
        options = kind if isinstance(kind, list) else opts.get("options") if kind == "COMBO" else None
        if options is not None and "default" in opts:
            assert opts["default"] in options, f"{node_id}.{name}: default {opts['default']!r} not in {options}"


def test_server_still_answers_after_bad_prompts(comfy):
    status, body = comfy.post_json("/prompt", {"prompt": {"1": {"class_type": "NoSuchNode", "inputs": {}}}})
    # core gave an unknown class its own error type in early 2026 (ComfyUI PR 12194): `invalid_prompt` before
    # (0.3.75), `missing_node_type` after (0.33.0); the server's own execution.py says which one it is
    expected = "missing_node_type" if "missing_node_type" in (comfy.comfy_dir / "execution.py").read_text() \
        else "invalid_prompt"
    assert status == 400 and body["error"]["type"] == expected, (status, body, comfy.version)

    # a LATENT wired into the MODEL input: refused by validation, nothing runs
    wrong_link = {
        "1": {"class_type": "EasyAnimateEmptyLatent",
              "inputs": {"width": 64, "height": 64, "frames": 8, "batch_size": 1}},
        "2": {"class_type": "EasyAnimateSampler",
              "inputs": {"model": ["1", 0], "positive": ["1", 0], "negative": ["1", 0], "latent": ["1", 0],
                         "seed": 0, "steps": 2, "cfg": 6.0, "sampler": "Euler"}},
        "3": {"class_type": "SaveLatent", "inputs": {"samples": ["2", 0], "filename_prefix": "bad"}},
    }
    with pytest.raises(PromptRejected) as rejected:
        comfy.queue(wrong_link, timeout=60)
    assert rejected.value.status == 400
    assert "2" in rejected.value.body["node_errors"], rejected.value.body

    assert "system" in comfy.get_json("/system_stats")
    # and still runs a good prompt (a random size so the execution cache cannot answer it)
    width = random.choice([64, 96, 128])
    good = {
        "1": {"class_type": "EasyAnimateEmptyLatent",
              "inputs": {"width": width, "height": 64, "frames": 8, "batch_size": 1}},
        "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "smoke/latent"}},
    }
    result = comfy.queue(good, timeout=120)
    assert result.error is None, result.error_text
    assert result.status_str == "success", result.history.get("status")
    saved = output_files(result)
    assert saved and all((comfy.output_dir / sub / name).is_file() for name, sub, _ in saved), saved


def test_demo_workflow_makes_an_mp4(comfy):
    """The README demo's text-to-video prompt (scripts/demo.py builds the same one) on the tiny models."""
    prompt = t2v_prompt(comfy.object_info(), seed=random.randint(0, 2**31), filename_prefix="smoke/t2v")
    result = comfy.queue(prompt, timeout=600)
    assert result.error is None, result.error_text
    assert result.status_str == "success", result.history.get("status")
    assert "progress" in result.message_types, "the sampler reported no progress over the websocket"
    videos = [f for f in output_files(result) if f[0].endswith(".mp4")]
    assert videos, f"no .mp4 in the outputs: {result.outputs}"
    data = comfy.view(*videos[0])
    assert data[4:8] == b"ftyp", f"{videos[0][0]} is not an MP4 (starts {data[:12]!r})"
