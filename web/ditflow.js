// SPDX-License-Identifier: Apache-2.0
// DiTFlow node pack: small frontend touches, no logic (the Python nodes validate everything themselves).
// - Guided Sampler num_frames: snaps to 0 ("as the connected AMF or embeddings") or a 4k+1 count of at least 5:
//   0, 5, 9, … (the frontend's own INT step would give 0, 4, 8, … from min 0).
// - Save Embeds: shows the file it wrote (its `ui.text` output) in a read-only box on the node.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

function snapFrames(value) {
  const v = Math.round(Number(value) || 0);
  return v <= 0 ? 0 : Math.max(5, Math.round((v - 1) / 4) * 4 + 1);
}

function afterCreated(nodeType, extra) {
  const created = nodeType.prototype.onNodeCreated;
  nodeType.prototype.onNodeCreated = function () {
    const result = created?.apply(this, arguments);
    extra.call(this);
    return result;
  };
}

app.registerExtension({
  name: "DiTFlow.NodeUI",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === "DiTFlowGuidedSampler") {
      afterCreated(nodeType, function () {
        const frames = this.widgets?.find((w) => w.name === "num_frames");
        if (frames) {
          frames.callback = function (value) {
            this.value = snapFrames(value);
          };
        }
      });
    }
    if (nodeData.name === "DiTFlowSaveEmbeds") {
      afterCreated(nodeType, function () {
        const { widget } = ComfyWidgets.STRING(this, "saved_file", ["STRING", { multiline: true }], app);
        widget.element.readOnly = true;
        widget.element.placeholder = "the saved file appears here after a run";
        widget.serialize = false;
      });
      const executed = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        executed?.apply(this, arguments);
        const widget = this.widgets?.find((w) => w.name === "saved_file");
        if (widget && message?.text) widget.value = `output/${message.text.join("\noutput/")}`;
      };
    }
  },
});
