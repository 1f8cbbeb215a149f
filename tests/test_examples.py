"""example_workflows/: UI workflows (+ thumbnails) match the server's node definitions and their API twins; the
twins run on the tiny models through examples/api_queue.py; ComfyUI's template browser serves them all."""
import argparse
import importlib.util
import json
import re
import urllib.parse
import urllib.request

import numpy as np
import pytest
from PIL import Image

from comfy_client import REPO_DIR

EXAMPLES = REPO_DIR / "example_workflows"
NAMES = ["easyanimate_core_ksampler", "easyanimate_long_video_context_windows", "easyanimate_portrait_euler_a",
         "easyanimate_portrait_lora", "easyanimate_prompt_travel_seasons", "easyanimate_t2v_landscape_dpmpp",
         "easyanimate_video_to_video"]
FRONTEND_ONLY = {"Note", "MarkdownNote"}  # frontend nodes: not in /object_info, not in API prompts
SCALAR_WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN"}
TINY = {"width": 64, "height": 64, "frames": 8, "steps": 2}
# per-example shrinking on top of TINY: (extra overrides, frames in the saved video)
SHRINK = {
    # windows of 8 (overlap 2) over 24 frames: the windows really run, as at 80 over 240
    "easyanimate_long_video_context_windows": (["EasyAnimateEmptyLatent.frames=24",
                                                "EasyAnimateContextOptions.context_length=8",
                                                "EasyAnimateContextOptions.context_overlap=2"], 24),
    # denoise 0.6 of 4 steps = the last 2 steps; the input clip (write_v2v_clip) is 64x64, 8 frames
    "easyanimate_video_to_video": (["EasyAnimateSampler.steps=4"], 8),
    # the schedule's keyframes are scaled to the frames by shrink_overrides; windows of 4 still run over 8 frames
    "easyanimate_prompt_travel_seasons": (["EasyAnimateContextOptions.context_length=4",
                                           "EasyAnimateContextOptions.context_overlap=1"], 8),
}


def ui_workflow(name):
    return json.loads((EXAMPLES / f"{name}.json").read_text())


def api_workflow(name):
    return json.loads((EXAMPLES / "api" / f"{name}.json").read_text())


def load_api_queue():
    spec = importlib.util.spec_from_file_location("api_queue", REPO_DIR / "examples" / "api_queue.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_build_script():
    spec = importlib.util.spec_from_file_location("build_example_workflows",
                                                  REPO_DIR / "scripts" / "build_example_workflows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_input_clip(comfy, frames=TINY["frames"]):
    """The clip the video-to-video example loads, in the server's input/ (LoadVideo's combo lists it)."""
    build = load_build_script()
    (comfy.base_dir / "input").mkdir(exist_ok=True)
    build.write_v2v_clip(comfy.base_dir / "input" / build.V2V_CLIP, frames=frames, size=TINY["width"])


def widget_names(info):
    """Names of a node's widgets in the frontend's order (= widgets_values order), from /object_info: scalar and
    combo inputs in input order, with the seed's control_after_generate widget right after it."""
    names = []
    for section in ("required", "optional"):
        inputs = info["input"].get(section) or {}
        for name in info.get("input_order", {}).get(section, list(inputs)):
            kind, opts = inputs[name][0], (inputs[name][1] if len(inputs[name]) > 1 else None) or {}
            if opts.get("forceInput") or not (isinstance(kind, list) or kind == "COMBO" or kind in SCALAR_WIDGETS):
                continue
            names.append(name)
            if any(opts.get(f"{what}_upload") for what in ("image", "audio", "video", "file")):
                names.append("upload")  # the frontend's upload button is a widget with a stored value
            if kind == "INT" and opts.get("control_after_generate", name in ("seed", "noise_seed")):
                names.append("control_after_generate")
    return names


def expected_api(ui, object_info):
    """The API prompt of a UI workflow, as the frontend's graphToPrompt makes it (widgets by name, links)."""
    by_id = {n["id"]: n for n in ui["nodes"]}
    links = {link[0]: link for link in ui["links"]}
    prompt = {}
    for node in ui["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) != 0:
            continue
        names = widget_names(object_info[node["type"]])
        inputs = {n: v for n, v in zip(names, node.get("widgets_values", [])) if n not in ("control_after_generate", "upload")}
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, origin, origin_slot, *_ = links[slot["link"]]
                assert by_id[origin]["type"] not in FRONTEND_ONLY
                inputs[slot["name"]] = [str(origin), origin_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


# ---- files only -------------------------------------------------------------------------------------------
def test_every_example_has_a_thumbnail_and_an_api_twin():
    assert sorted(p.stem for p in EXAMPLES.glob("*.json")) == NAMES
    assert sorted(p.stem for p in (EXAMPLES / "api").glob("*.json")) == NAMES
    for name in NAMES:
        thumb = EXAMPLES / f"{name}.jpg"
        with Image.open(thumb) as im:
            assert im.format == "JPEG" and 128 <= min(im.size) and max(im.size) <= 1024, (name, im.size)
            assert np.asarray(im.convert("L")).std() > 10, f"{thumb} is blank"
        assert thumb.stat().st_size < 200_000, thumb


def null_paths(value, path=""):
    """Paths of the nulls in a JSON value."""
    if value is None:
        return [path]
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return [p for key, item in items for p in null_paths(item, f"{path}/{key}")]


@pytest.mark.parametrize("name", NAMES)
def test_ui_links_are_consistent_and_schema_nulls_only_on_links(name):
    ui = ui_workflow(name)
    # the frontend's workflow schema rejects null anywhere else (an alert on load), e.g. a serialized `undefined`
    bad = [p for p in null_paths(ui) if not re.fullmatch(r"/nodes/\d+/(inputs/\d+/link|outputs/\d+/links)", p)]
    assert not bad, f"{name}: nulls the frontend rejects at {bad}"
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert ui["last_node_id"] == max(nodes) and ui["last_link_id"] == max(link[0] for link in ui["links"])
    for link_id, origin, origin_slot, target, target_slot, kind in ui["links"]:
        out = nodes[origin]["outputs"][origin_slot]
        assert link_id in out["links"] and out["type"] == kind, (name, link_id)
        slot = nodes[target]["inputs"][target_slot]
        assert slot["link"] == link_id and slot["type"] == kind, (name, link_id)
    used = {slot["link"] for n in ui["nodes"] for slot in n.get("inputs", []) if slot.get("link") is not None}
    assert used == {link[0] for link in ui["links"]}


def test_landscape_example_has_the_original_defaults():
    from easyanimate_model.text import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT

    api = {n["class_type"]: n["inputs"] for n in api_workflow("easyanimate_t2v_landscape_dpmpp").values()}
    assert api["EasyAnimateTextEncode"]["prompt"] == DEFAULT_PROMPT
    assert api["EasyAnimateTextEncode"]["negative_prompt"] == DEFAULT_NEGATIVE_PROMPT
    assert {k: api["EasyAnimateEmptyLatent"][k] for k in ("width", "height", "frames")} == \
        {"width": 512, "height": 512, "frames": 80}
    assert {k: api["EasyAnimateSampler"][k] for k in ("seed", "steps", "cfg", "sampler")} == \
        {"seed": 43, "steps": 30, "cfg": 6, "sampler": "DPM++"}
    assert api["EasyAnimateSaveVideo"]["fps"] == 12
    lora = {n["class_type"]: n["inputs"] for n in api_workflow("easyanimate_portrait_lora").values()}
    assert lora["EasyAnimateLoraLoader"]["strength_model"] == 0.55
    portrait = {n["class_type"]: n["inputs"] for n in api_workflow("easyanimate_portrait_euler_a").values()}
    assert portrait["EasyAnimateSampler"]["sampler"] == "Euler A"
    assert portrait["EasyAnimateLoadBaseCheckpoint"]["ckpt_name"] == "easyanimate_portrait.safetensors"
    core = {n["class_type"] for n in api_workflow("easyanimate_core_ksampler").values()}
    assert {"KSampler", "VAEDecode", "CLIPTextEncode", "EasyAnimateSaveVideo"} <= core


def test_prompt_travel_example_settings():
    from easyanimate_model.prompt_schedule import parse_schedule

    api = {n["class_type"]: n["inputs"] for n in api_workflow("easyanimate_prompt_travel_seasons").values()}
    schedule = api["EasyAnimatePromptSchedule"]
    keyframes = parse_schedule(schedule["schedule"], schedule["frames"])
    assert [k.frame for k in keyframes] == [0, 120, 239]
    assert [k.prompt.split(",")[0].split()[-1] for k in keyframes] == ["spring", "summer", "autumn"]
    assert schedule["frames"] == api["EasyAnimateEmptyLatent"]["frames"] == 240
    assert api["EasyAnimateContextOptions"]["context_length"] == 80
    ids = {n["class_type"]: i for i, n in api_workflow("easyanimate_prompt_travel_seasons").items()}
    assert api["EasyAnimateSampler"]["model"] == [ids["EasyAnimateContextOptions"], 0]
    assert api["EasyAnimateSampler"]["positive"] == [ids["EasyAnimatePromptSchedule"], 0]


def shrink_overrides(workflow):
    """--set overrides that fit a prompt schedule to TINY frames (keyframes scaled)."""
    out = []
    for node in workflow.values():
        if node["class_type"] == "EasyAnimatePromptSchedule":
            from easyanimate_model.prompt_schedule import parse_schedule

            inputs = node["inputs"]
            keyframes = parse_schedule(inputs["schedule"], inputs["frames"])
            text = "\n".join(f"{k.frame * TINY['frames'] // inputs['frames']}: {k.prompt}" for k in keyframes)
            out += [f"EasyAnimatePromptSchedule.frames={TINY['frames']}", f"EasyAnimatePromptSchedule.schedule={text}"]
    return out


def test_api_queue_overrides_and_rejects_ui_files(tmp_path):
    api_queue = load_api_queue()
    workflow = api_workflow("easyanimate_t2v_landscape_dpmpp")
    ids = {node["class_type"]: node_id for node_id, node in workflow.items()}
    api_queue.apply_override(workflow, "EasyAnimateSampler.steps=3")
    api_queue.apply_override(workflow, f"{ids['EasyAnimateTextEncode']}.prompt=a cat; on a mat")
    api_queue.apply_override(workflow, "EasyAnimateSaveVideo.loop=false")
    inputs = {class_type: workflow[node_id]["inputs"] for class_type, node_id in ids.items()}
    assert inputs["EasyAnimateSampler"]["steps"] == 3 and inputs["EasyAnimateSaveVideo"]["loop"] is False
    assert inputs["EasyAnimateTextEncode"]["prompt"] == "a cat; on a mat"  # not JSON: kept as text
    with pytest.raises(api_queue.UsageError, match="has no input 'stepz'"):
        api_queue.apply_override(workflow, "EasyAnimateSampler.stepz=3")
    with pytest.raises(api_queue.UsageError, match="node id or a class_type that occurs once"):
        api_queue.apply_override(workflow, "NoSuchNode.steps=3")
    with pytest.raises(api_queue.UsageError, match="is a UI-format workflow"):
        api_queue.load_api_workflow(EXAMPLES / "easyanimate_t2v_landscape_dpmpp.json")
    assert api_queue.main([str(EXAMPLES / "easyanimate_t2v_landscape_dpmpp.json")]) == 2
    assert api_queue.main([str(EXAMPLES / "api" / "easyanimate_t2v_landscape_dpmpp.json"), "--set", "steps=3"]) == 2


# ---- against the server ------------------------------------------------------------------------------------
def test_template_browser_serves_every_example(comfy):
    templates = comfy.get_json("/api/workflow_templates")
    assert sorted(templates.get(comfy.pack_folder_name, [])) == NAMES, templates
    folder = urllib.parse.quote(comfy.pack_folder_name)
    for name in NAMES:
        served = comfy.get_json(f"/api/workflow_templates/{folder}/{name}.json")
        assert served == ui_workflow(name)
        with urllib.request.urlopen(f"{comfy.url}/api/workflow_templates/{folder}/{name}.jpg", timeout=30) as r:
            assert r.read() == (EXAMPLES / f"{name}.jpg").read_bytes()


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_matches_node_definitions_and_api_twin(comfy, name):
    write_input_clip(comfy)
    object_info = comfy.object_info()
    ui = ui_workflow(name)
    for node in ui["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        assert node["type"] in object_info, f"{name}: node {node['id']} {node['type']} is not registered"
        info = object_info[node["type"]]
        names = widget_names(info)
        values = node.get("widgets_values", [])
        assert len(values) == len(names), f"{name}: node {node['id']} {node['type']}: {values} vs {names}"
        specs = {**info["input"]["required"], **(info["input"].get("optional") or {})}
        for widget, value in zip(names, values):
            if widget == "upload":
                continue
            if widget == "control_after_generate":
                assert value == "fixed", f"{name}: the example seed must stay fixed"
                continue
            kind, opts = specs[widget][0], (specs[widget][1] if len(specs[widget]) > 1 else None) or {}
            if isinstance(kind, list) or kind == "COMBO":
                options = kind if isinstance(kind, list) else opts["options"]
                assert value in options, f"{name}: {node['type']}.{widget} = {value!r} not in {options}"
            elif kind in ("INT", "FLOAT"):
                assert opts.get("min", value) <= value <= opts.get("max", value), (name, widget, value)
    twin = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api_workflow(name).items()}
    assert twin == expected_api(ui, object_info)


@pytest.mark.parametrize("name", NAMES)
def test_api_twin_runs_on_tiny_models_through_api_queue(comfy, name, tmp_path):
    api_queue = load_api_queue()
    workflow = api_workflow(name)
    sampler = next(n["class_type"] for n in workflow.values() if n["class_type"] in ("EasyAnimateSampler", "KSampler"))
    classes = {n["class_type"] for n in workflow.values()}
    overrides = [f"EasyAnimateEmptyLatent.{key}={TINY[key]}" for key in ("width", "height", "frames")
                 if "EasyAnimateEmptyLatent" in classes]
    overrides += [f"{sampler}.steps={TINY['steps']}", f"EasyAnimateSaveVideo.filename_prefix=examples/{name}"]
    extra, frames = SHRINK.get(name, ([], TINY["frames"]))
    overrides += extra
    if "LoadVideo" in classes:
        write_input_clip(comfy, frames)
    overrides += shrink_overrides(workflow)
    (tmp_path / "api.json").write_text(json.dumps(workflow))
    args = argparse.Namespace(workflow=str(tmp_path / "api.json"), set=overrides, server=comfy.url,
                              out=str(tmp_path / "out"), timeout=600)
    log = []
    code, saved = api_queue.run(args, log=log.append)
    assert code == 0, "\n".join(log) + "\n" + comfy.log_tail()
    assert any(f"step {TINY['steps']}/{TINY['steps']}" in line for line in log), log  # websocket progress
    (video,) = [p for p in saved if p.suffix == ".mp4"]
    assert video.name.startswith(name) and video.read_bytes()[4:8] == b"ftyp"
    assert (comfy.output_dir / "examples" / video.name).read_bytes() == video.read_bytes()
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(video))
    meta = next(reader)
    assert meta["size"] == (TINY["width"], TINY["height"]) and sum(1 for _ in reader) == frames


def test_api_queue_reports_invalid_inputs_before_running(comfy, tmp_path):
    api_queue = load_api_queue()
    args = argparse.Namespace(workflow=str(EXAMPLES / "api" / "easyanimate_t2v_landscape_dpmpp.json"),
                              set=["EasyAnimateEmptyLatent.width=33", "EasyAnimateSampler.steps=0"],
                              server=comfy.url, out=str(tmp_path), timeout=60)
    with pytest.raises(api_queue.UsageError) as e:
        api_queue.run(args, log=lambda line: None)
    message = str(e.value)
    assert "refused the prompt: HTTP 400" in message and "EasyAnimateSampler" in message and "steps" in message
    assert not list(tmp_path.iterdir())
