// Shows EasyAnimateLoraLoader's "not applied" warning (strict off) in the node itself, not only in the server log.
//
// Scoped to that node type. The warning is the node's ui output `easyanimate_lora_warnings` (nodes/nodes_lora.py);
// it goes into a read-only text widget that is neither serialized nor sent as an input, and the node turns
// amber. A run without a warning clears both.
import { app } from "../../../scripts/app.js";

const NODE_TYPE = "EasyAnimateLoraLoader";
const UI_KEY = "easyanimate_lora_warnings";
const WIDGET_NAME = "easyanimate_lora_warning";
const WARNING_COLORS = { color: "#663", bgcolor: "#553" };

function warningWidget(node) {
    let widget = node.widgets?.find((w) => w.name === WIDGET_NAME);
    if (!widget) {
        const box = document.createElement("textarea");
        box.readOnly = true;
        box.style.cssText = "width:100%;height:100%;resize:none;font-size:11px;color:#fc6;background:transparent;";
        widget = node.addDOMWidget(WIDGET_NAME, "easyanimate_warning", box, {
            serialize: false,
            hideOnZoom: false,
            getMinHeight: () => 48,
        });
        widget.serialize = false;
    }
    return widget;
}

function showWarning(node, text) {
    const widget = warningWidget(node);
    widget.element.value = text;
    widget.element.title = text;
    if (text) {
        node._easyanimateColors ??= { color: node.color, bgcolor: node.bgcolor };
        Object.assign(node, WARNING_COLORS);
    } else if (node._easyanimateColors) {
        Object.assign(node, node._easyanimateColors);
        delete node._easyanimateColors;
    }
    node.setDirtyCanvas(true, true);
}

const REGISTERED = Symbol.for("easyanimate.lora-warning.registered");
if (!globalThis[REGISTERED]) {
    globalThis[REGISTERED] = true;
    app.registerExtension({
        name: "EasyAnimate.LoraWarning",
        async beforeRegisterNodeDef(nodeType, nodeData) {
            if (nodeData?.name !== NODE_TYPE) return;
            const onExecuted = nodeType.prototype.onExecuted;
            nodeType.prototype.onExecuted = function (output) {
                const result = onExecuted?.apply(this, arguments);
                showWarning(this, (output?.[UI_KEY] ?? []).join("\n"));
                return result;
            };
        },
    });
}
