"""The real ComfyUI frontend (the host's: 1.32.9 with 0.3.75, 1.49.6 with 0.33.0) in Debian's headless Chromium, driven by Playwright, against the `comfy`
server: the example workflows load without missing nodes or console errors, a run queued from the page plays in
the save node, and the preview survives reloading. Never downloads a browser: without /usr/bin/chromium or the
playwright package the tests are skipped. Screenshots go to test_artifacts/ ($TEST_ARTIFACTS_DIR)."""
import json
import time
import urllib.parse
from pathlib import Path

import pytest

from comfy_client import REPO_DIR, artifacts_dir
from test_examples import write_input_clip

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = artifacts_dir()
EXAMPLES = REPO_DIR / "example_workflows"
NAMES = sorted(p.stem for p in EXAMPLES.glob("*.json"))
OUR_NODES = ("EasyAnimateSaveVideo", "EasyAnimatePreviewVideo")
EXTENSION = "EasyAnimate.VideoPreview"

JS_MISSING = """() => ({
    graph: window.app.graph._nodes.filter(n => !window.LiteGraph.registered_node_types[n.type]).map(n => n.type),
    screen: /missing node/i.test(document.body.innerText)})"""
# the frontend validates a loaded workflow against its schema and shows an alert when it does not fit
JS_INVALID_ALERT = "() => /invalid workflow/i.test(document.body.innerText)"
# the <video>/<img> of the save node's preview widget, with what the tests look at
JS_PREVIEW = """(type) => {
    const node = window.app.graph._nodes.find(n => n.type === type);
    const widget = node && (node.widgets || []).find(w => w.name === "easyanimate_preview");
    const media = widget && widget.element.querySelector(".easyanimate-video");
    if (!media) return null;
    const box = media.getBoundingClientRect();
    return {tag: media.tagName, src: media.src, readyState: media.readyState ?? null,
            autoplay: media.autoplay ?? null, loop: media.loop ?? null, muted: media.muted ?? null,
            playsInline: media.playsInline ?? null, paused: media.paused ?? null,
            naturalWidth: media.naturalWidth ?? null, videoWidth: media.videoWidth ?? null,
            width: box.width, height: box.height, nodeWidth: node.size[0],
            property: node.properties.easyanimate_video || null};
}"""


def local_only(route):
    """Abort every request that leaves the machine (the frontend calls api.comfy.org)."""
    url = route.request.url
    if url.startswith(("data:", "blob:")) or urllib.parse.urlsplit(url).hostname in ("127.0.0.1", "localhost"):
        route.continue_()
    else:
        route.abort()


class Console:
    """Console errors and uncaught page errors, minus the aborted external requests."""

    def __init__(self, page):
        self.errors = []
        page.on("console", self._on_console)
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"[:600]))

    def _on_console(self, message):
        if message.type != "error":
            return
        url = message.location.get("url") or ""
        if urllib.parse.urlsplit(url).hostname not in (None, "", "127.0.0.1", "localhost"):
            return  # a request we blocked on purpose
        self.errors.append(f"{message.text[:500]} ({url})")


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium: install Debian's package (apt-get install -y chromium); "
                    "the tests never download a browser")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_app(page, url):
    page.goto(url + "/", wait_until="domcontentloaded")
    page.wait_for_selector("canvas#graph-canvas", timeout=120_000)
    page.wait_for_function("() => window.app && window.app.graph && window.app.canvas && window.LiteGraph",
                           timeout=120_000)
    # extensions register while the app sets up; wait for ours (or a clear failure below)
    page.wait_for_function(f"() => window.app.extensions.some(e => e.name === {EXTENSION!r})", timeout=60_000)


@pytest.fixture(scope="module")
def page(browser, comfy):
    # server-side setting: skip the first-run templates dialog that covers the canvas
    comfy.post_json("/settings/Comfy.TutorialCompleted", True)
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.route("**/*", local_only)
    page.console = Console(page)
    open_app(page, comfy.url)
    page.wait_for_timeout(1000)
    page.load_errors = list(page.console.errors)
    yield page
    page.close()


def load_workflow(page, workflow):
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow)
    page.wait_for_timeout(500)


def screenshot(page, name):
    """The whole graph in view, toasts closed, into test_artifacts/."""
    page.evaluate("""async () => {
        document.querySelectorAll('.p-toast-close-button').forEach((b) => b.click());
        await window.app.extensionManager.command.execute('Comfy.Canvas.FitView');
    }""")
    page.wait_for_timeout(500)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name))


def new_errors(page, since):
    return page.console.errors[since:]


def wait_for_run(comfy, before, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        history = comfy.get_json("/history")
        done = [h for k, h in history.items() if k not in before and h.get("status", {}).get("completed") is not None]
        if done:
            return done[0]
        time.sleep(0.25)
    raise TimeoutError(f"no run finished within {timeout} s\n{comfy.log_tail()}")


def test_extension_registers_once_though_served_twice(page, comfy):
    """pyproject [tool.comfy] web + WEB_DIRECTORY: 0.3.75 serves web/ under the folder name and the project
    name when they differ (the fixture's folder name differs on purpose); the module guards itself."""
    served = [u for u in comfy.get_json("/extensions") if u.endswith("/js/easyanimate_video.js")]
    assert served, "the pack's JS is not served (WEB_DIRECTORY / [tool.comfy] web)"
    count = page.evaluate(f"() => window.app.extensions.filter(e => e.name === {EXTENSION!r}).length")
    assert count == 1, f"{EXTENSION} registered {count} times (served as {served})"
    ours = [e for e in page.load_errors if "easyanimate" in e.lower() or "already registered" in e]
    assert not ours, ours


def test_no_hooks_on_other_nodes(page):
    """Only our two node types carry the preview code; every other type keeps its own callbacks."""
    hooked = page.evaluate("""(ours) => Object.entries(window.LiteGraph.registered_node_types)
        .filter(([, cls]) => ['onExecuted', 'onConfigure'].some(
            (k) => cls.prototype && typeof cls.prototype[k] === 'function' &&
                   cls.prototype[k].toString().includes('showVideo')))
        .map(([type]) => type).sort()""", list(OUR_NODES))
    assert hooked == sorted(OUR_NODES)


@pytest.mark.parametrize("name", NAMES)
def test_example_workflow_loads_without_missing_nodes_or_errors(page, comfy, name):
    workflow = json.loads((EXAMPLES / f"{name}.json").read_text())
    write_input_clip(comfy)  # as the README says: the video-to-video example's clip is in input/
    since = len(page.console.errors)
    load_workflow(page, workflow)
    missing = page.evaluate(JS_MISSING)
    assert missing == {"graph": [], "screen": False}, f"{name}: missing nodes {missing}"
    assert not page.evaluate(JS_INVALID_ALERT), f"{name}: the frontend says the workflow is invalid"
    assert not new_errors(page, since), f"{name}: console errors while loading: {new_errors(page, since)}"
    # the frontend keeps every widget value in place (nothing reordered, nothing appended)
    serialized = page.evaluate("() => window.app.graph.serialize()")
    values = {n["id"]: n.get("widgets_values") or [] for n in serialized["nodes"]}
    assert values == {n["id"]: n.get("widgets_values") or [] for n in workflow["nodes"]}


def test_queue_from_page_plays_in_node_and_survives_reload(page, comfy):
    name = "easyanimate_t2v_landscape_dpmpp"
    load_workflow(page, json.loads((EXAMPLES / f"{name}.json").read_text()))
    since = len(page.console.errors)
    # the example is 512x512x80 frames, 30 steps: make it tiny like a person would, through the widgets
    page.evaluate("""() => {
        const set = (type, values) => {
            const node = window.app.graph._nodes.find(n => n.type === type);
            for (const [name, value] of Object.entries(values)) node.widgets.find(w => w.name === name).value = value;
        };
        set("EasyAnimateEmptyLatent", {width: 64, height: 64, frames: 8});
        set("EasyAnimateSampler", {steps: 2});
        set("EasyAnimateSaveVideo", {filename_prefix: "browser/landscape"});
    }""")
    before = set(comfy.get_json("/history"))
    page.evaluate("async () => { await window.app.queuePrompt(0); }")
    run = wait_for_run(comfy, before)
    assert run["status"]["status_str"] == "success", run["status"]
    save_id = next(k for k, v in run["prompt"][2].items() if v["class_type"] == "EasyAnimateSaveVideo")
    # the preview widget is not sent as an input
    assert sorted(run["prompt"][2][save_id]["inputs"]) == ["filename_prefix", "format", "fps", "images", "loop",
                                                           "quality"]
    (entry,) = run["outputs"][save_id]["easyanimate_videos"]
    assert entry["subfolder"] == "browser" and (entry["frame_count"], entry["width"]) == (8, 64)

    page.wait_for_function(f"() => {{ const p = ({JS_PREVIEW})('EasyAnimateSaveVideo');"
                           f" return p && p.readyState >= 2; }}", timeout=60_000)
    preview = page.evaluate(JS_PREVIEW, "EasyAnimateSaveVideo")
    assert preview["tag"] == "VIDEO" and entry["filename"] in urllib.parse.unquote(preview["src"])
    assert (preview["autoplay"], preview["loop"], preview["muted"], preview["playsInline"]) == (True,) * 4
    assert preview["videoWidth"] == 64 and not preview["paused"]
    # sized to the node: as wide as the node minus the widget margins (canvas zoom taken into account)
    scale = page.evaluate("() => window.app.canvas.ds.scale")
    assert preview["width"] == pytest.approx((preview["nodeWidth"] - 20) * scale, rel=0.1)
    assert preview["height"] > 20
    fetched = page.evaluate("""async (src) => { const r = await fetch(src);
        return {ok: r.ok, type: r.headers.get('content-type'), size: (await r.arrayBuffer()).byteLength}; }""",
                            preview["src"])
    assert fetched["ok"] and fetched["type"].startswith("video/mp4") and fetched["size"] > 1000
    screenshot(page, "browser_canvas_after_run.png")
    assert not new_errors(page, since), new_errors(page, since)

    # the preview is part of the saved workflow, and widgets_values stay the node's 5 inputs
    saved = page.evaluate("() => window.app.graph.serialize()")
    save_node = next(n for n in saved["nodes"] if n["type"] == "EasyAnimateSaveVideo")
    assert save_node["widgets_values"] == ["browser/landscape", 12, "mp4", 85, True]
    assert save_node["properties"]["easyanimate_video"]["filename"] == entry["filename"]

    # reload the page: the frontend restores the open workflow, and the node its video
    page.reload(wait_until="domcontentloaded")
    open_app(page, comfy.url)
    page.wait_for_function(f"() => {{ const p = ({JS_PREVIEW})('EasyAnimateSaveVideo');"
                           f" return p && p.readyState >= 2; }}", timeout=60_000)
    assert page.evaluate(JS_PREVIEW, "EasyAnimateSaveVideo")["src"] == preview["src"]
    # and loading the saved workflow file elsewhere brings it back too
    load_workflow(page, json.loads((EXAMPLES / "easyanimate_core_ksampler.json").read_text()))
    assert page.evaluate(JS_PREVIEW, "EasyAnimateSaveVideo") is None
    load_workflow(page, saved)
    page.wait_for_function(f"() => {{ const p = ({JS_PREVIEW})('EasyAnimateSaveVideo');"
                           f" return p && p.readyState >= 2; }}", timeout=60_000)
    screenshot(page, "browser_canvas_after_reload.png")

    # webp plays in an <img> in the same widget
    since = len(page.console.errors)
    page.evaluate("""() => { const node = window.app.graph._nodes.find(n => n.type === 'EasyAnimateSaveVideo');
        node.widgets.find(w => w.name === 'format').value = 'webp'; }""")
    before = set(comfy.get_json("/history"))
    page.evaluate("async () => { await window.app.queuePrompt(0); }")
    assert wait_for_run(comfy, before)["status"]["status_str"] == "success"
    page.wait_for_function(f"() => {{ const p = ({JS_PREVIEW})('EasyAnimateSaveVideo');"
                           f" return p && p.tag === 'IMG' && p.naturalWidth === 64; }}", timeout=60_000)
    webp_src = page.evaluate(JS_PREVIEW, "EasyAnimateSaveVideo")["src"]
    assert not new_errors(page, since), new_errors(page, since)

    # dropping a saved file on ComfyUI loads the workflow embedded in it (mp4 keys, webp EXIF)
    for src, mime, format in ((preview["src"], "video/mp4", "mp4"), (webp_src, "image/webp", "webp")):
        load_workflow(page, json.loads((EXAMPLES / "easyanimate_core_ksampler.json").read_text()))
        page.evaluate("""async ([src, mime]) => { const blob = await (await fetch(src)).blob();
            await window.app.handleFile(new File([blob], 'dropped', {type: mime})); }""", [src, mime])
        page.wait_for_timeout(500)
        dropped = page.evaluate("() => window.app.graph._nodes.map(n => [n.type, n.widgets_values ?? "
                                "(n.widgets || []).map(w => w.value)])")
        values = dict((t, v) for t, v in dropped if t in ("EasyAnimateSaveVideo", "EasyAnimateEmptyLatent"))
        assert values["EasyAnimateSaveVideo"][:5] == ["browser/landscape", 12, format, 85, True], (format, dropped)
        assert values["EasyAnimateEmptyLatent"] == [64, 64, 8, 1], (format, dropped)


JS_LORA_WARNING = """() => {
    const node = window.app.graph._nodes.find(n => n.type === 'EasyAnimateLoraLoader');
    const widget = (node.widgets || []).find(w => w.name === 'easyanimate_lora_warning');
    return {text: widget ? widget.element.value : null, bgcolor: node.bgcolor ?? null};
}"""


def test_lora_warning_shows_in_the_node_when_strict_is_off(page, comfy):
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(comfy.models_dir / "loras" / "easyanimate_portrait_lora.safetensors"))
    tensors["lora_unet__transformer_blocks_0_attn1_to_nowhere.lora_down.weight"] = torch.ones(4, 64)
    tensors["lora_unet__transformer_blocks_0_attn1_to_nowhere.lora_up.weight"] = torch.ones(64, 4)
    save_file(tensors, str(comfy.models_dir / "loras" / "browser_junk_lora.safetensors"))
    load_workflow(page, json.loads((EXAMPLES / "easyanimate_portrait_lora.json").read_text()))

    def run(lora_name, strict):
        page.evaluate("""([lora, strict]) => {
            const set = (type, values) => {
                const node = window.app.graph._nodes.find(n => n.type === type);
                for (const [k, v] of Object.entries(values)) node.widgets.find(w => w.name === k).value = v;
            };
            set("EasyAnimateEmptyLatent", {width: 64, height: 64, frames: 4});
            set("EasyAnimateSampler", {steps: 1});
            set("EasyAnimateLoraLoader", {lora_name: lora, strict: strict});
        }""", [lora_name, strict])
        before = set(comfy.get_json("/history"))
        page.evaluate("async () => { await window.app.queuePrompt(0); }")
        return wait_for_run(comfy, before)

    assert run("browser_junk_lora.safetensors", False)["status"]["status_str"] == "success"
    page.wait_for_function(f"() => ({JS_LORA_WARNING})().text", timeout=30_000)
    shown = page.evaluate(JS_LORA_WARNING)
    assert "1 LoRA entries not applied" in shown["text"] and "to_nowhere" in shown["text"], shown
    assert shown["bgcolor"] == "#553"
    screenshot(page, "lora_warning.png")
    # a clean run clears it
    assert run("easyanimate_portrait_lora.safetensors", True)["status"]["status_str"] == "success"
    page.wait_for_function(f"() => ({JS_LORA_WARNING})().text === ''", timeout=30_000)
    assert page.evaluate(JS_LORA_WARNING)["bgcolor"] != "#553"
