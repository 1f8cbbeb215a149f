"""Regenerate example_workflows/: the UI workflows, their API twins (api/) and their thumbnails (.jpg).

The workflows are made by the real ComfyUI frontend, not written by hand: the script starts ComfyUI 0.3.75 with
this pack on tiny models (tests/comfy_client.py), opens it in Debian's chromium through Playwright, lets LiteGraph
create and wire the nodes, and saves what app.graph.serialize() and app.graphToPrompt() return. The thumbnails are
title cards drawn with Pillow.

    .host/venv/bin/python scripts/build_example_workflows.py           # rewrite example_workflows/
    .host/venv/bin/python scripts/build_example_workflows.py --check   # build into a temp folder, report changes

Needs the test host (scripts/setup_host.sh, with Playwright) and /usr/bin/chromium. A workflow keeps the "id" of
the file it replaces (the frontend makes a random one each time), so only real changes show up in a diff.
--check compares the workflows with that id ignored, the API twins and thumbnails byte for byte; exit code 1 when
anything differs.
"""
import argparse
import difflib
import json
import sys
import tempfile
import urllib.parse
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

REPO_DIR = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_DIR), str(REPO_DIR / "tests")]

from comfy_client import ComfyServer, host_dir  # noqa: E402
from easyanimate_model.text import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT  # noqa: E402
from easyanimate_model.tiny import (LORA_FILE, MOTION_MODULE_FILE, PIPELINE_NAME, PORTRAIT_FILE,  # noqa: E402
                                    write_release_files)

EXAMPLES = REPO_DIR / "example_workflows"
CHROMIUM = Path("/usr/bin/chromium")
PORTRAIT_PROMPT = ("A young woman with delicate features and long dark hair smiles softly at the camera, "
                   "natural light, shallow depth of field, a calm portrait video.")
FILES_NOTE = (
    "EasyAnimate v1 release files (see README):\n"
    "- models/diffusers/PixArt-XL-2-512x512/ (unpacked PixArt-XL-2-512x512.tar, 11.4 GB)\n"
    "- models/easyanimate/easyanimate_v1_mm.safetensors (motion module, 4.1 GB)\n")
SAVE_VIDEO = {"filename_prefix": "EasyAnimate", "fps": 12.0, "format": "mp4", "quality": 85, "loop": True}


# ---- workflows: nodes by key, widgets by name, links as input -> (source key, output slot) --------------------
def loader_nodes():
    return [
        dict(key="pipe", type="EasyAnimateLoadPipeline", pos=[0, 0], size=[340, 130],
             widgets={"pipeline": PIPELINE_NAME, "weight_dtype": "default", "text_encoder_device": "default"}),
        dict(key="mm", type="EasyAnimateLoadMotionModule", pos=[0, 210], size=[340, 80], links={"model": ("pipe", 0)},
             widgets={"motion_module_name": MOTION_MODULE_FILE}),
    ]


def t2v(note, prompt, width, height, sampler, model_src=("mm", 0), clip_src=("pipe", 1), extra=()):
    """The pack's own text-to-video chain; `extra` nodes sit under the loaders and feed model_src/clip_src."""
    return [
        *loader_nodes(),
        *extra,
        dict(key="text", type="EasyAnimateTextEncode", pos=[400, 0], size=[420, 380], links={"clip": clip_src},
             widgets={"prompt": prompt, "negative_prompt": DEFAULT_NEGATIVE_PROMPT}),
        dict(key="latent", type="EasyAnimateEmptyLatent", pos=[400, 440],
             widgets={"width": width, "height": height, "frames": 80, "batch_size": 1}),
        dict(key="sampler", type="EasyAnimateSampler", pos=[860, 0], size=[300, 230],
             links={"model": model_src, "positive": ("text", 0), "negative": ("text", 1), "latent": ("latent", 0)},
             widgets={"seed": 43, "control_after_generate": "fixed", "steps": 30, "cfg": 6.0, "sampler": sampler}),
        dict(key="decode", type="EasyAnimateVAEDecode", pos=[860, 290], size=[300, 110],
             links={"vae": ("pipe", 2), "samples": ("sampler", 0)},
             widgets={"frames_per_chunk": 1, "tiled": False}),
        dict(key="save", type="EasyAnimateSaveVideo", pos=[1200, 0], size=[420, 560],
             links={"images": ("decode", 0)}, widgets=SAVE_VIDEO),
        dict(key="note", type="Note", pos=[0, -300], size=[760, 240], widgets={"": note}),
    ]


def core_ksampler():
    """The same model through ComfyUI's core text encode, sampler and decode nodes."""
    return [
        *loader_nodes(),
        dict(key="pos", type="CLIPTextEncode", pos=[400, 0], size=[420, 220], links={"clip": ("pipe", 1)},
             widgets={"text": DEFAULT_PROMPT}),
        dict(key="neg", type="CLIPTextEncode", pos=[400, 270], size=[420, 160], links={"clip": ("pipe", 1)},
             widgets={"text": DEFAULT_NEGATIVE_PROMPT}),
        dict(key="latent", type="EasyAnimateEmptyLatent", pos=[400, 480],
             widgets={"width": 512, "height": 512, "frames": 80, "batch_size": 1}),
        dict(key="sampler", type="KSampler", pos=[860, 0], size=[300, 280],
             links={"model": ("mm", 0), "positive": ("pos", 0), "negative": ("neg", 0), "latent_image": ("latent", 0)},
             widgets={"seed": 43, "control_after_generate": "fixed", "steps": 30, "cfg": 6.0,
                      "sampler_name": "dpmpp_2m", "scheduler": "normal", "denoise": 1.0}),
        dict(key="decode", type="VAEDecode", pos=[860, 330], size=[300, 60],
             links={"samples": ("sampler", 0), "vae": ("pipe", 2)}),
        dict(key="save", type="EasyAnimateSaveVideo", pos=[1200, 0], size=[420, 560], links={"images": ("decode", 0)},
             widgets=SAVE_VIDEO),
        dict(key="note", type="Note", pos=[0, -300], size=[760, 240], widgets={"": FILES_NOTE + (
            "\nThe same model with ComfyUI's own nodes: CLIP Text Encode, KSampler (dpmpp_2m, normal: the closest to "
            "the original DPM++), VAE Decode. Frames travel in the batch dimension, so core latent and image nodes "
            "work unchanged.")}),
    ]


V2V_CLIP = "easyanimate_v2v_input.mp4"  # the clip LoadVideo expects in ComfyUI's input/ (write_v2v_clip)


def long_video():
    """240 frames (3x the trained length) in context windows of 80 with FreeNoise."""
    nodes = t2v(FILES_NOTE + "\n240 frames, three times the trained 80: EasyAnimate Context Options lets the sampler "
                "denoise windows of 80 frames (each a whole video to the motion module) with 20 frames of overlap, "
                "blended, and FreeNoise so the windows agree. Memory stays that of one window; time grows with the "
                "number of windows. The VAE decode and the save node handle any length.", DEFAULT_PROMPT, 512, 512,
                "DPM++", model_src=("ctx", 0),
                extra=[dict(key="ctx", type="EasyAnimateContextOptions", pos=[0, 340], size=[340, 250],
                            links={"model": ("mm", 0)},
                            widgets={"context_length": 80, "context_overlap": 20, "context_schedule": "standard_static",
                                     "fuse_method": "pyramid", "freenoise": True, "context_stride": 1,
                                     "closed_loop": False})])
    for node in nodes:
        if node["key"] == "latent":
            node["widgets"] = {**node["widgets"], "frames": 240}
    return nodes


def video_to_video():
    """A loaded clip, encoded, re-sampled at denoise 0.6."""
    return [
        *loader_nodes(),
        dict(key="load", type="LoadVideo", pos=[0, 340], size=[340, 300], widgets={"file": V2V_CLIP}),
        dict(key="parts", type="GetVideoComponents", pos=[0, 700], size=[340, 90], links={"video": ("load", 0)}),
        dict(key="encode", type="EasyAnimateVAEEncodeVideo", pos=[400, 440], size=[420, 130],
             links={"vae": ("pipe", 2), "images": ("parts", 0)},
             widgets={"frames_per_chunk": 8, "size": "center crop"}),
        dict(key="text", type="EasyAnimateTextEncode", pos=[400, 0], size=[420, 380], links={"clip": ("pipe", 1)},
             widgets={"prompt": DEFAULT_PROMPT, "negative_prompt": DEFAULT_NEGATIVE_PROMPT}),
        dict(key="sampler", type="EasyAnimateSampler", pos=[860, 0], size=[300, 260],
             links={"model": ("mm", 0), "positive": ("text", 0), "negative": ("text", 1), "latent": ("encode", 0)},
             widgets={"seed": 43, "control_after_generate": "fixed", "steps": 30, "cfg": 6.0, "sampler": "DPM++",
                      "denoise": 0.6}),
        dict(key="decode", type="EasyAnimateVAEDecode", pos=[860, 320], size=[300, 110],
             links={"vae": ("pipe", 2), "samples": ("sampler", 0)}, widgets={"frames_per_chunk": 1, "tiled": False}),
        dict(key="save", type="EasyAnimateSaveVideo", pos=[1200, 0], size=[420, 560],
             links={"images": ("decode", 0)}, widgets=SAVE_VIDEO),
        dict(key="note", type="Note", pos=[0, -300], size=[760, 240], widgets={"": FILES_NOTE + (
            f"\nVideo-to-video: put a clip into ComfyUI's input/ folder and pick it in Load Video (the example expects "
            f"{V2V_CLIP}). Its frames are center-cropped to multiples of 32, encoded, noised to 60 % (denoise 0.6: "
            f"the last 18 of 30 steps run) and re-sampled with the prompt. Lower denoise keeps more of the clip; "
            f"for clips longer than 80 frames add EasyAnimate Context Options.")}),
    ]


def write_v2v_clip(path, frames=8, size=64):
    """A short moving-gradient mp4 (PyAV, as core's video nodes) for LoadVideo in builds and tests."""
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=12)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        ramp = np.linspace(0, 255, size, dtype=np.float32)
        for i in range(frames):
            rgb = np.stack([np.roll(ramp, 4 * i)[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1),
                            np.full((size, size), 128.0)], -1).astype(np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())


SEASONS_SCHEDULE = (
    "0: A country road through a forest in spring, trees with fresh green leaves and pink blossoms, soft morning "
    "light, a natural landscape shot.\n"
    "120: The same country road through a forest in summer, dense green trees, bright sunshine and a blue sky, a "
    "natural landscape shot.\n"
    "239: The same country road through a forest in autumn, red and yellow leaves falling on the road, golden "
    "evening light, a natural landscape shot.")


def prompt_travel():
    """240 frames (3x the trained length) through context windows, with a prompt schedule over three seasons."""
    return [
        *loader_nodes(),
        dict(key="context", type="EasyAnimateContextOptions", pos=[0, 340], size=[340, 250], links={"model": ("mm", 0)},
             widgets={"context_length": 80, "context_overlap": 20, "context_schedule": "standard_static",
                      "fuse_method": "pyramid", "freenoise": True}),
        dict(key="text", type="EasyAnimatePromptSchedule", pos=[400, 0], size=[420, 420], links={"clip": ("pipe", 1)},
             widgets={"schedule": SEASONS_SCHEDULE, "negative_prompt": DEFAULT_NEGATIVE_PROMPT,
                      "interpolation": "linear", "frames": 240}),
        dict(key="latent", type="EasyAnimateEmptyLatent", pos=[400, 480],
             widgets={"width": 512, "height": 512, "frames": 240, "batch_size": 1}),
        dict(key="sampler", type="EasyAnimateSampler", pos=[860, 0], size=[300, 230],
             links={"model": ("context", 0), "positive": ("text", 0), "negative": ("text", 1),
                    "latent": ("latent", 0)},
             widgets={"seed": 43, "control_after_generate": "fixed", "steps": 30, "cfg": 6.0, "sampler": "DPM++"}),
        dict(key="decode", type="EasyAnimateVAEDecode", pos=[860, 290], size=[300, 110],
             links={"vae": ("pipe", 2), "samples": ("sampler", 0)}, widgets={"frames_per_chunk": 1, "tiled": False}),
        dict(key="save", type="EasyAnimateSaveVideo", pos=[1200, 0], size=[420, 560],
             links={"images": ("decode", 0)}, widgets=SAVE_VIDEO),
        dict(key="note", type="Note", pos=[0, -300], size=[760, 240], widgets={"": FILES_NOTE + (
            "\nPrompt travel: 240 frames (20 s at 12 fps, three times the trained 80) from spring through summer to "
            "autumn. The prompt schedule keyframes frames 0, 120 and 239 and blends the prompts in between; the "
            "context options denoise 80-frame windows overlapping by 20, and each window sees the prompts of its "
            "own frames. Frames in the schedule and in the latent must agree.")}),
    ]


WORKFLOWS = {
    "easyanimate_t2v_landscape_dpmpp": t2v(
        FILES_NOTE + "\nThe original EasyAnimate v1 defaults: 512x512, 80 frames at 12 fps, 30 steps, cfg 6, DPM++, "
        "seed 43, the original prompt and negative prompt. On a small GPU lower frames or set the VAE decode "
        "to tiled.", DEFAULT_PROMPT, 512, 512, "DPM++"),
    "easyanimate_portrait_euler_a": t2v(
        FILES_NOTE + "- models/easyanimate/easyanimate_portrait.safetensors (portrait checkpoint, 2.3 GB)\n"
        "\nThe portrait checkpoint replaces the image weights; the motion module stays. Euler A, as the original "
        "portrait examples.", PORTRAIT_PROMPT, 448, 640, "Euler A", model_src=("base", 0),
        extra=[dict(key="base", type="EasyAnimateLoadBaseCheckpoint", pos=[0, 340], size=[340, 80],
                    links={"model": ("mm", 0)}, widgets={"ckpt_name": PORTRAIT_FILE})]),
    "easyanimate_portrait_lora": t2v(
        FILES_NOTE + "- models/loras/easyanimate_portrait_lora.safetensors (portrait LoRA, 654 MB)\n"
        "\nLoRA strength 0.55 (the original default) on the transformer and the T5 text encoder.",
        PORTRAIT_PROMPT, 512, 512, "Euler A", model_src=("lora", 0), clip_src=("lora", 1),
        extra=[dict(key="lora", type="EasyAnimateLoraLoader", pos=[0, 340], size=[340, 130],
                    links={"model": ("mm", 0), "clip": ("pipe", 1)},
                    widgets={"lora_name": LORA_FILE, "strength_model": 0.55, "strength_clip": 0.55})]),
    "easyanimate_core_ksampler": core_ksampler(),
    "easyanimate_long_video_context_windows": long_video(),
    "easyanimate_video_to_video": video_to_video(),
    "easyanimate_prompt_travel_seasons": prompt_travel(),
}

# thumbnail text and colours (top, bottom of the gradient) per workflow
CARDS = {
    "easyanimate_t2v_landscape_dpmpp": ("Text to video", "Landscape", "DPM++ · 30 steps · cfg 6",
                                        "512x512 · 80 frames · 12 fps", ((40, 90, 140), (220, 235, 245))),
    "easyanimate_portrait_euler_a": ("Portrait checkpoint", "Portrait", "Euler A · 30 steps · cfg 6",
                                     "448x640 · 80 frames · 12 fps", ((120, 60, 90), (245, 220, 210))),
    "easyanimate_portrait_lora": ("Portrait LoRA 0.55", "LoRA", "Euler A · 30 steps · cfg 6",
                                  "512x512 · 80 frames · 12 fps", ((90, 60, 130), (230, 215, 245))),
    "easyanimate_core_ksampler": ("Core KSampler", "Core nodes", "KSampler dpmpp_2m · VAE Decode",
                                  "512x512 · 80 frames · 12 fps", ((40, 110, 80), (215, 240, 225))),
    "easyanimate_long_video_context_windows": ("Long video: 240 frames", "Context windows",
                                               "windows of 80 · overlap 20 · FreeNoise",
                                               "512x512 · 240 frames · 12 fps", ((30, 70, 110), (200, 225, 240))),
    "easyanimate_video_to_video": ("Video to video", "Load Video", "DPM++ · denoise 0.6 · 30 steps",
                                   "center crop to 32 px · 12 fps", ((110, 80, 30), (245, 230, 200))),
    "easyanimate_prompt_travel_seasons": ("Prompt travel", "Spring > summer > autumn",
                                          "Prompt schedule · context windows 80/20",
                                          "512x512 · 240 frames · 12 fps", ((150, 100, 40), (240, 225, 200))),
}

# runs in the page: an empty graph, then nodes made, set and wired by LiteGraph itself, as a user would
BUILD_JS = """async (spec) => {
    const app = window.app, LG = window.LiteGraph;
    await app.loadGraphData({last_node_id: 0, last_link_id: 0, nodes: [], links: [], groups: [], config: {},
                             extra: {}, version: 0.4});
    const made = {};
    for (const n of spec) {
        const node = LG.createNode(n.type);
        if (!node) throw new Error("unknown node type " + n.type);
        app.graph.add(node);
        node.pos = n.pos;
        for (const [name, value] of Object.entries(n.widgets || {})) {
            const w = name === "" ? node.widgets[0] : node.widgets.find((w) => w.name === name);
            if (!w) throw new Error(n.type + " has no widget " + name + ": " + node.widgets.map((w) => w.name));
            w.value = value;
        }
        made[n.key] = node;
    }
    for (const n of spec) {
        for (const [input, [src, slot]] of Object.entries(n.links || {})) {
            const target = made[n.key];
            const index = target.findInputSlot(input);
            if (index < 0) throw new Error(n.type + " has no input " + input);
            if (!made[src].connect(slot, target, index)) throw new Error("cannot connect " + src + " -> " + input);
        }
    }
    for (const n of spec) {
        const node = made[n.key], min = node.computeSize();
        node.setSize(n.size ? [Math.max(n.size[0], min[0]), Math.max(n.size[1], min[1])] : min);
    }
    app.graph.setDirtyCanvas(true, true);
    const workflow = app.graph.serialize();
    const prompt = await app.graphToPrompt();
    // stringified here: Playwright would turn undefined into null, which the frontend's schema rejects
    return JSON.stringify({workflow, api: prompt.output});
}"""


def local_only(route):
    """The frontend may only talk to our server: no fonts, telemetry or updates from outside."""
    url = route.request.url
    if url.startswith("data:") or urllib.parse.urlsplit(url).hostname in ("127.0.0.1", "localhost"):
        route.continue_()
    else:
        route.abort()


def json_text(value):
    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


def build_workflows(out_dir, keep_ids_from):
    """Write <name>.json and api/<name>.json into out_dir for every workflow, through the real frontend."""
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        raise SystemExit(f"no {CHROMIUM}: install Debian's package (apt-get install -y chromium)")
    (out_dir / "api").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ea-examples-") as base:
        server = ComfyServer(host_dir(), base)
        write_release_files(server.models_dir, vae="tiny")  # the loaders' combos list these names
        (Path(base) / "input").mkdir(parents=True, exist_ok=True)
        write_v2v_clip(Path(base) / "input" / V2V_CLIP)  # Load Video's combo lists it
        with server:
            server.post_json("/settings/Comfy.TutorialCompleted", True)  # no tutorial over the canvas
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                            args=["--no-sandbox", "--disable-gpu"])
                # the viewport decides extra.ds (the canvas offset and zoom saved with each workflow)
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                page.route("**/*", local_only)
                page.goto(server.url + "/", wait_until="domcontentloaded")
                page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=120_000)
                page.wait_for_timeout(2000)  # extensions finish registering after app.graph exists
                for name, spec in WORKFLOWS.items():
                    result = json.loads(page.evaluate(BUILD_JS, spec))
                    workflow = result["workflow"]
                    old = keep_ids_from / f"{name}.json"
                    if old.exists():
                        workflow["id"] = json.loads(old.read_text())["id"]
                    (out_dir / f"{name}.json").write_text(json_text(workflow))
                    (out_dir / "api" / f"{name}.json").write_text(json_text(result["api"]))
                    print(f"{name}: {len(workflow['nodes'])} nodes, {len(workflow['links'])} links", flush=True)
                browser.close()


def draw_card(path, title, badge, line1, line2, colors, size=384):
    """A title card: gradient, a film strip of little landscape frames, the workflow's name and settings."""
    top, bottom = colors
    img = Image.new("RGB", (size, size))
    px = img.load()
    for y in range(size):
        t = y / (size - 1)
        row = tuple(round(top[i] * (1 - t) + bottom[i] * t) for i in range(3))
        for x in range(size):
            px[x, y] = row
    d = ImageDraw.Draw(img)
    strip_y = 150
    d.rectangle([0, strip_y - 14, size, strip_y + 86], fill=(20, 20, 24))
    for i in range(0, size, 24):  # sprocket holes
        d.rectangle([i + 6, strip_y - 10, i + 16, strip_y - 4], fill=(230, 230, 230))
        d.rectangle([i + 6, strip_y + 76, i + 16, strip_y + 82], fill=(230, 230, 230))
    for k in range(5):  # frames: a sun moving over a hill
        x0 = 8 + k * 75
        d.rectangle([x0, strip_y, x0 + 66, strip_y + 68], fill=tuple(min(255, c + 18 * k) for c in top))
        cx = x0 + 10 + k * 10
        d.ellipse([cx, strip_y + 12, cx + 22, strip_y + 34], fill=(250, 240, 200))
        d.polygon([(x0, strip_y + 68), (x0 + 30, strip_y + 38), (x0 + 66, strip_y + 68)],
                  fill=tuple(c // 2 for c in top))
    big, mid, small = (ImageFont.load_default(size=s) for s in (34, 22, 18))
    d.text((20, 22), "EasyAnimate v1", font=big, fill=(255, 255, 255))
    d.text((20, 70), title, font=mid, fill=(235, 235, 235))
    d.rounded_rectangle([20, 102, 20 + d.textlength(badge, font=small) + 20, 130], radius=8, fill=(255, 255, 255))
    d.text((30, 106), badge, font=small, fill=top)
    d.text((20, 270), line1, font=small, fill=(30, 30, 30))
    d.text((20, 300), line2, font=small, fill=(30, 30, 30))
    d.text((20, 340), "ComfyUI example workflow", font=small, fill=(70, 70, 70))
    img.save(path, "JPEG", quality=85, optimize=True)


def build(out_dir):
    out_dir.mkdir(parents=True, exist_ok=True)
    build_workflows(out_dir, keep_ids_from=EXAMPLES)
    for name, card in CARDS.items():
        draw_card(out_dir / f"{name}.jpg", *card)


def without_id(text):
    workflow = json.loads(text)
    workflow.pop("id", None)
    return json_text(workflow)


def differences(built):
    """Human-readable differences between a fresh build and example_workflows/ (empty when they match)."""
    found = []
    names = sorted({p.relative_to(built).as_posix() for p in built.rglob("*") if p.is_file()}
                   | {p.relative_to(EXAMPLES).as_posix() for p in EXAMPLES.rglob("*") if p.is_file()})
    for rel in names:
        new, old = built / rel, EXAMPLES / rel
        if not old.exists() or not new.exists():
            found.append(f"{rel}: only in the {'fresh build' if new.exists() else 'committed examples'}")
        elif rel.endswith(".jpg"):
            if new.read_bytes() != old.read_bytes():
                found.append(f"{rel}: the thumbnail's bytes differ")
        else:
            normalise = without_id if "/" not in rel else (lambda text: text)
            a, b = normalise(old.read_text()), normalise(new.read_text())
            if a != b:
                diff = difflib.unified_diff(a.splitlines(), b.splitlines(), f"committed/{rel}", f"built/{rel}",
                                            lineterm="", n=2)
                found.append("\n".join(list(diff)[:60]))
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="build into a temporary folder and report differences; example_workflows/ is untouched")
    args = parser.parse_args(argv)
    if not args.check:
        build(EXAMPLES)
        print(f"wrote {EXAMPLES}")
        return 0
    with tempfile.TemporaryDirectory(prefix="ea-examples-check-") as tmp:
        build(Path(tmp))
        found = differences(Path(tmp))
    for item in found:
        print(item)
    print(f"{len(found)} difference(s) from {EXAMPLES}" if found else f"{EXAMPLES} is up to date")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
