// Plays the video of EasyAnimateSaveVideo / EasyAnimatePreviewVideo inside the node.
//
// Scoped to those two node types (beforeRegisterNodeDef): no global hooks, no widget reordering. The last output
// is kept in node.properties, which the workflow JSON stores, so the preview comes back when the workflow is
// reloaded. The preview widget is neither serialized (widgets_values keep the node's input order) nor sent to
// the server as an input. Served as /extensions/<pack>/js/easyanimate_video.js, hence ../../../scripts/.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const EXTENSION_NAME = "EasyAnimate.VideoPreview";
const NODE_TYPES = new Set(["EasyAnimateSaveVideo", "EasyAnimatePreviewVideo"]);
const UI_KEY = "easyanimate_videos"; // the node's "ui" output key (nodes/nodes_video.py)
const PROPERTY = "easyanimate_video"; // last shown output entry, saved with the workflow
const WIDGET_NAME = "easyanimate_preview";
const MIN_HEIGHT = 64;

function viewUrl(entry) {
    const query = new URLSearchParams({
        filename: entry.filename,
        subfolder: entry.subfolder ?? "",
        type: entry.type ?? "output",
    });
    return api.apiURL(`/view?${query}`);
}

function createMediaElement(entry) {
    // mp4 plays in a <video>; gif and animated webp animate in an <img>
    const isVideo = (entry.format ?? "").startsWith("video/");
    const media = document.createElement(isVideo ? "video" : "img");
    if (isVideo) {
        Object.assign(media, { autoplay: true, loop: true, muted: true, playsInline: true, controls: false });
        // the attributes too, so that autoplay policies and DOM queries see them
        for (const name of ["autoplay", "loop", "muted", "playsinline"]) media.setAttribute(name, "");
        // autoplay alone can stay paused when the element is attached after loading started; muted play() is allowed
        media.addEventListener("canplay", () => media.play().catch(() => {}), { once: true });
    }
    media.className = "easyanimate-video";
    media.style.cssText = "width:100%;height:100%;object-fit:contain;display:block;";
    media.title = entry.filename;
    media.src = viewUrl(entry);
    return media;
}

function previewWidget(node) {
    let widget = node.widgets?.find((w) => w.name === WIDGET_NAME);
    if (!widget) {
        const container = document.createElement("div");
        container.style.cssText = "width:100%;height:100%;overflow:hidden;";
        widget = node.addDOMWidget(WIDGET_NAME, "easyanimate_video", container, {
            serialize: false, // not an input of the node: keep it out of the prompt sent to the server
            hideOnZoom: false,
            getMinHeight: () => MIN_HEIGHT,
        });
        widget.serialize = false; // and out of widgets_values
    }
    return widget;
}

function fitNodeToVideo(node, width, height) {
    // grow (never shrink) the node so that the video shows at its aspect ratio at the node's current width
    const minSize = node.computeSize();
    const wanted = minSize[1] - MIN_HEIGHT + (node.size[0] - 20) * (height / width);
    if (node.size[1] < wanted) node.setSize([node.size[0], wanted]);
    node.setDirtyCanvas(true, true);
}

function showVideo(node, entry) {
    const widget = previewWidget(node);
    const media = createMediaElement(entry);
    const ready = () => fitNodeToVideo(node, media.videoWidth || media.naturalWidth || entry.width,
        media.videoHeight || media.naturalHeight || entry.height);
    media.addEventListener(media.tagName === "VIDEO" ? "loadedmetadata" : "load", ready, { once: true });
    // a temp-folder preview is gone after a server restart: show nothing rather than a broken element
    media.addEventListener("error", () => { media.style.display = "none"; }, { once: true });
    widget.element.replaceChildren(media);
}

function rememberOutput(node, entry) {
    // a new output is a change of the workflow: announced like any edit, so the frontend stores it (tab state,
    // page reload) and it is saved with the workflow
    app.canvas?.emitBeforeChange?.();
    node.properties[PROPERTY] = entry;
    app.canvas?.emitAfterChange?.();
}

function register() {
    app.registerExtension({
        name: EXTENSION_NAME,
        async beforeRegisterNodeDef(nodeType, nodeData) {
            if (!NODE_TYPES.has(nodeData?.name)) return;

            const onExecuted = nodeType.prototype.onExecuted;
            nodeType.prototype.onExecuted = function (output) {
                const result = onExecuted?.apply(this, arguments);
                const entry = output?.[UI_KEY]?.[0];
                if (entry) {
                    rememberOutput(this, entry);
                    showVideo(this, entry);
                }
                return result;
            };

            const onConfigure = nodeType.prototype.onConfigure;
            nodeType.prototype.onConfigure = function () {
                const result = onConfigure?.apply(this, arguments);
                const entry = this.properties?.[PROPERTY];
                if (entry?.filename) showVideo(this, entry);
                return result;
            };
        },
    });
}

// The pack's web folder can be served under two URLs (folder name and project name, see README), which would
// run this module twice; register once per page.
const REGISTERED = Symbol.for("easyanimate.video-preview.registered");
if (!globalThis[REGISTERED]) {
    globalThis[REGISTERED] = true;
    register();
}
