# SPDX-License-Identifier: Apache-2.0
"""Writes the example workflows (ComfyUI UI format, version 0.4) into ``workflows/``.

Run from the repository root: ``python docs/build_workflows.py``. Inputs, outputs and widget order of our nodes
come from their ``INPUT_TYPES``; the few core nodes used are described here. Defaults are for the real
CogVideoX-5b at 480×720, 49 frames, guidance block 20 (paper §5.1).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")

# Core nodes: (inputs [(name, type, optional)], outputs [(name, type)], widget names).
CORE = {
    "LoadVideo": ([], [("VIDEO", "VIDEO")], ["file", "upload"]),
    "GetVideoComponents": ([("video", "VIDEO", False)], [("images", "IMAGE"), ("audio", "AUDIO"), ("fps", "FLOAT")], []),
    "CreateVideo": ([("images", "IMAGE", False), ("audio", "AUDIO", True)], [("VIDEO", "VIDEO")], ["fps"]),
    "SaveVideo": ([("video", "VIDEO", False)], [], ["filename_prefix", "format", "codec"]),
    "PreviewImage": ([("images", "IMAGE", False)], [], []),
    "LoadImage": ([], [("IMAGE", "IMAGE"), ("MASK", "MASK")], ["image", "upload"]),
    "Note": ([], [], ["text"]),
}


def _ours(node_type: str):
    """(inputs, outputs, widget names, widget defaults) of one of our nodes, from its INPUT_TYPES."""
    from nodes import NODE_CLASS_MAPPINGS

    cls = NODE_CLASS_MAPPINGS[node_type]
    spec = cls.INPUT_TYPES()
    inputs, widgets, defaults = [], [], {}
    for section in ("required", "optional"):
        for name, (kind, *opts) in spec.get(section, {}).items():
            options = opts[0] if opts else {}
            if isinstance(kind, list) or kind in WIDGET_TYPES:
                widgets.append(name)
                defaults[name] = options.get("default", kind[0] if isinstance(kind, list) and kind else None)
                if options.get("control_after_generate"):
                    widgets.append("control_after_generate")
                    defaults["control_after_generate"] = "fixed"
            else:
                inputs.append((name, kind, section == "optional"))
    names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
    return inputs, list(zip(names, cls.RETURN_TYPES)), widgets, defaults


class Graph:
    def __init__(self):
        self.nodes, self.links = [], []

    def add(self, node_type, pos, widgets=(), size=(320, 160), title=None):
        """Adds a node; ``widgets`` is a list for core nodes and a {name: value} dict for ours."""
        if node_type in CORE:
            inputs, outputs, widget_names = CORE[node_type]
            assert len(widgets) == len(widget_names), (node_type, widgets, widget_names)
        else:  # our nodes: widgets by name, the rest at their INPUT_TYPES defaults
            inputs, outputs, widget_names, defaults = _ours(node_type)
            unknown = set(dict(widgets)) - set(widget_names)
            assert not unknown, (node_type, unknown)
            widgets = [dict(widgets).get(n, defaults[n]) for n in widget_names]
        node = {
            "id": len(self.nodes) + 1, "type": node_type, "pos": list(pos), "size": list(size), "flags": {},
            "order": len(self.nodes), "mode": 0,
            "inputs": [{"name": n, "type": t, "link": None, **({"shape": 7} if opt else {})} for n, t, opt in inputs],
            "outputs": [{"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(outputs)],
            "properties": {"Node name for S&R": node_type}, "widgets_values": list(widgets),
        }
        if title:
            node["title"] = title
        if node_type == "Note":
            node["color"], node["bgcolor"] = "#432", "#653"
        self.nodes.append(node)
        return node["id"]

    def link(self, src, src_slot, dst, dst_input):
        s, d = self.nodes[src - 1], self.nodes[dst - 1]
        slot = next(i for i, inp in enumerate(d["inputs"]) if inp["name"] == dst_input)
        kind = s["outputs"][src_slot]["type"]
        link_id = len(self.links) + 1
        self.links.append([link_id, src, src_slot, dst, slot, kind])
        s["outputs"][src_slot]["links"].append(link_id)
        d["inputs"][slot]["link"] = link_id

    def json(self):
        for n in self.nodes:
            for o in n["outputs"]:
                o["links"] = o["links"] or None
        return {
            "id": "00000000-0000-4000-8000-000000000000", "revision": 0,
            "last_node_id": len(self.nodes), "last_link_id": len(self.links),
            "nodes": self.nodes, "links": self.links, "groups": [], "config": {},
            "extra": {"ds": {"scale": 0.75, "offset": [40, 40]}}, "version": 0.4,
        }


PROMPT = ("A person rides a bicycle along a forest trail between tall trees, sunlight through the leaves, "
          "realistic, high detail.")
NEW_PROMPT = "A fox runs along a snowy forest trail between tall pine trees, soft winter light, realistic."
POKE_PROMPT = "A red toy car rolls across a wooden table, soft daylight, realistic, high detail."
MODEL = {"model": "CogVideoX-5b", "precision": "bf16", "text_encoder": "auto", "download_missing": True}
REFERENCE = {"width": 720, "height": 480, "num_frames": 49, "start": 0, "stride": 1, "resize": "crop"}


def sampler_widgets(mode, kv_injection=True):
    """Paper defaults (§5.1): 50 steps, first 20 % guided, 5 Adam steps, lr 0.002 → 0.001, KV injection at 0."""
    return {"mode": mode, "steps": 50, "cfg": 6.0, "seed": 42, "control_after_generate": "fixed",
            "guidance_fraction": 0.2, "opt_steps": 5, "lr_start": 0.002, "lr_end": 0.001,
            "kv_injection": kv_injection, "kv_block": 0, "num_frames": 0, "width": 0, "height": 0}  # 0: from the input


def reference_chain(g, note, model=MODEL):
    g.add("Note", (20, 20), [note], size=(340, 300))
    load = g.add("DiTFlowLoadCogVideoX", (20, 360), model, size=(320, 150))
    video = g.add("LoadVideo", (20, 560), ["big_buck_bunny.mp4", "image"], size=(320, 380))
    comps = g.add("GetVideoComponents", (400, 700), size=(220, 80))
    text = g.add("DiTFlowTextEncode", (400, 20), {"prompt": PROMPT, "negative_prompt": ""}, size=(400, 260))
    enc = g.add("DiTFlowEncodeReference", (400, 340), REFERENCE, size=(320, 320))
    amf = g.add("DiTFlowExtractAMF", (760, 340), {"blocks": "20", "temperature": 2.0}, size=(300, 110))
    g.link(video, 0, comps, "video")
    g.link(load, 0, text, "model")
    g.link(load, 0, enc, "model")
    g.link(comps, 0, enc, "images")
    g.link(load, 0, amf, "model")
    g.link(enc, 0, amf, "reference")
    return load, text, enc, amf


def guided_sampler(g, load, text, amf, mode):
    """The Guided Sampler in ``mode`` fed by the reference chain's model, conditioning and AMF."""
    sampler = g.add("DiTFlowGuidedSampler", (1100, 20), sampler_widgets(mode), size=(340, 520))
    g.link(load, 0, sampler, "model")
    g.link(text, 0, sampler, "conditioning")
    g.link(amf, 0, sampler, "amf")
    return sampler


def output_chain(g, load, latent_src, x, prefix):
    dec = g.add("DiTFlowDecode", (x, 20), size=(260, 130))
    vid = g.add("CreateVideo", (x, 190), [8], size=(260, 80))
    save = g.add("SaveVideo", (x + 300, 20), [prefix, "auto", "auto"], size=(420, 480))
    g.link(load, 0, dec, "model")
    g.link(latent_src, 0, dec, "samples")
    g.link(dec, 0, vid, "images")
    g.link(vid, 0, save, "video")


def t2v_latent():
    g = Graph()
    load, text, enc, amf = reference_chain(g, (
        "DiTFlow motion transfer, mode latent (DiTFlow-z_t: best motion fidelity).\n\n"
        "1. The loader downloads CogVideoX-5b into models/CogVideo/CogVideoX-5b on the first run (≈ 21 GB; "
        "≈ 11.5 GB with a T5-XXL such as t5xxl_fp16.safetensors in models/text_encoders). kijai's downloads work too.\n"
        "2. Load a reference clip with at least 49 frames (or lower num_frames / raise stride), e.g. "
        "assets/big_buck_bunny.mp4 from this pack.\n"
        "3. Describe the new scene in the prompt; the motion comes from the reference.\n\n"
        "Paper defaults: 480×720, 49 frames, block 20 (15 on 2B), τ = 2, 50 steps, first 20 % guided, "
        "5 Adam steps, lr 0.002→0.001, KV injection at block 0. On CogVideoX-2b use block 15."))
    sampler = guided_sampler(g, load, text, amf, "latent")
    vis = g.add("DiTFlowVisualizeAMF", (760, 500), {"query_frame": 0, "key_frame": 6, "arrow_stride": 2}, size=(300, 150))
    prev = g.add("PreviewImage", (760, 700), size=(300, 260))
    g.link(amf, 0, vis, "amf")
    g.link(enc, 1, vis, "frames")
    g.link(vis, 1, prev, "images")
    output_chain(g, load, sampler, 1480, "ditflow/latent")
    return g.json()


def i2v_latent():
    """Image-to-video motion transfer: the reference's first frame (or any image) starts the video."""
    g = Graph()
    load, text, enc, amf = reference_chain(g, (
        "DiTFlow on an image-to-video model: a start image + a reference video → a video that begins with the "
        "image and moves like the reference (mode latent).\n\n"
        "1. The loader downloads CogVideoX-5b-I2V into models/CogVideo on the first run (≈ 21 GB). It generates at "
        "480×720 only (its learned positional embedding); CogVideoX1.5-5B-I2V takes other sizes (native 768×1360, "
        "81 frames).\n"
        "2. The start image here is the reference's first frame (DiTFlow Encode Reference's frames: the sampler takes "
        "the first). To start from another picture, connect a Load Image to start_image instead (centre-cropped).\n"
        "3. The prompt describes the video; the motion comes from the reference.\n\n"
        "Guidance block 20 is carried over from CogVideoX-5b (same 42 blocks): not validated on real weights."),
        model={**MODEL, "model": "CogVideoX-5b-I2V"})
    sampler = guided_sampler(g, load, text, amf, "latent")
    g.link(enc, 1, sampler, "start_image")
    output_chain(g, load, sampler, 1480, "ditflow/i2v")
    return g.json()


def rope_optimize_and_save():
    g = Graph()
    load, text, enc, amf = reference_chain(g, (
        "DiTFlow mode rope (DiTFlow-ρ_t, CogVideoX-5b): optimises the RoPE tables during the guided steps and "
        "saves them with DiTFlow Save Embeds to output/ditflow/embeds_NNNNN_.safetensors.\n\n"
        "Reuse them zero-shot with a new prompt in ditflow_rope_inject.json (same model, frames, size and steps).\n"
        "On CogVideoX-2b use mode posemb and block 15."))
    sampler = guided_sampler(g, load, text, amf, "rope")
    save = g.add("DiTFlowSaveEmbeds", (1480, 320), {"filename_prefix": "ditflow/embeds"}, size=(280, 150))
    g.link(sampler, 1, save, "embeds")
    output_chain(g, load, sampler, 1480, "ditflow/rope")
    return g.json()


def rope_inject():
    g = Graph()
    g.add("Note", (20, 20), [
        "Zero-shot motion transfer with saved positional embeddings (paper Fig. 7): no reference video, no "
        "optimisation. Pick a file written by ditflow_rope_optimize_and_save.json (output/ditflow/, or put one in "
        "models/ditflow_embeds/), press R to refresh the list. Frames, size and steps come from the file; the "
        "model must be the one it was optimised on."], size=(340, 220))
    load = g.add("DiTFlowLoadCogVideoX", (20, 280), MODEL, size=(320, 150))
    embeds = g.add("DiTFlowLoadEmbeds", (20, 480), {"embeds_file": "embeds_00001_.safetensors"}, size=(320, 80))
    text = g.add("DiTFlowTextEncode", (400, 20), {"prompt": NEW_PROMPT, "negative_prompt": ""}, size=(400, 260))
    sampler = g.add("DiTFlowGuidedSampler", (840, 20), sampler_widgets("none", kv_injection=False), size=(340, 520))
    g.link(load, 0, text, "model")
    g.link(load, 0, sampler, "model")
    g.link(text, 0, sampler, "conditioning")
    g.link(embeds, 0, sampler, "embeds")
    output_chain(g, load, sampler, 1220, "ditflow/inject")
    return g.json()


def poke_chain(g):
    """Load FPT and Load Image → FPT Embed Image, and FPT Pokes (two example pokes); returns (fpt, image, embed,
    pokes)."""
    fpt = g.add("DiTFlowLoadFPT", (20, 380), {"weights": "fpt_base.safetensors"}, size=(330, 90))
    image = g.add("LoadImage", (20, 510), ["example.png", "image"], size=(330, 380))
    embed = g.add("DiTFlowFPTEmbedImage", (400, 380), {"fit": "pad"}, size=(300, 80))
    pokes = g.add("DiTFlowPokes", (400, 20), {"pokes": "200,256,260,256\n330,200,330,170"}, size=(300, 160))
    g.link(fpt, 0, embed, "fpt")
    g.link(image, 0, embed, "image")
    return fpt, image, embed, pokes


def fpt_poke_flow():
    """Flow Poke Transformer: image + pokes → dense flow (colour wheel) and one point's motion density."""
    g = Graph()
    g.add("Note", (20, 20), [
        "Flow Poke Transformer (Baumann et al., ICCV 2025): how an image may move when you poke it.\n\n"
        "1. Download flow_poke_open_set_base.pt from huggingface.co/CompVis/flow-poke-transformer (CC BY-NC 4.0: "
        "non-commercial use) and convert it once:\n"
        "   python -m ditflow fpt-convert flow_poke_open_set_base.pt ComfyUI/models/fpt/fpt_base.safetensors\n"
        "2. Load an image and write pokes as x0,y0,x1,y1 in its pixels (drag (x0, y0) to (x1, y1)), one per line.\n"
        "3. FPT Predict Flow: the expected motion (mean) or one sampled motion (sample, seeded).\n"
        "   FPT Motion Density: where the query point may go."], size=(360, 330))
    load, _, embed, pokes = poke_chain(g)
    flow = g.add("DiTFlowFPTPredictFlow", (760, 20), {"mode": "mean", "grid": 128}, size=(320, 250))
    density = g.add("DiTFlowFPTMotionDensity", (760, 420), {"query_x": 230.0, "query_y": 300.0}, size=(320, 200))
    show_flow = g.add("PreviewImage", (1120, 20), size=(360, 360), title="flow (colour wheel) and pokes")
    show_density = g.add("PreviewImage", (1120, 420), size=(360, 360), title="motion density of the query")
    for node in (flow, density):
        g.link(load, 0, node, "fpt")
        g.link(embed, 0, node, "embedding")
        g.link(pokes, 0, node, "pokes")
    g.link(flow, 1, show_flow, "images")
    g.link(density, 0, show_density, "images")
    return g.json()


POKE_NOTE = (
    "Motion from pokes instead of a reference video (beyond the FPT authors).\n\n"
    "FPT Predict Flow says how the image moves when poked; DiTFlow Motion Target from Flow turns that flow into the "
    "sampler's motion target: each 16 px patch moves in a straight line by its mean flow from the first to the last "
    "frame (scale stretches it). Set the target's width, height and frames to the video you want; the sampler takes "
    "them (its 0s). No reference latents, so no KV injection. FPT weights: see fpt_poke_flow.json (CC BY-NC 4.0). "
    "Not yet validated on real weights: start with scale 1-2, block 20 (15 on CogVideoX-2b).\n\n")


def poke_motion(note: str, model: dict, prompt: str, prefix: str, start_image: bool):
    """Pokes → Predict Flow → Motion Target from Flow → Guided Sampler (latent) → Decode → SaveVideo; with
    ``start_image`` the poked image is also the image-to-video model's first frame."""
    g = Graph()
    g.add("Note", (20, 20), [POKE_NOTE + note], size=(360, 330))
    fpt, image, embed, pokes = poke_chain(g)
    flow = g.add("DiTFlowFPTPredictFlow", (400, 500), {"mode": "mean", "grid": 128}, size=(320, 250))
    show_flow = g.add("PreviewImage", (400, 800), size=(320, 300), title="flow (colour wheel) and pokes")
    target = g.add("DiTFlowPokeMotionTarget", (760, 500), {"width": 720, "height": 480, "num_frames": 49,
                                                           "fit": "crop", "block": 20}, size=(320, 280))
    vis = g.add("DiTFlowVisualizeAMF", (760, 820), {"query_frame": 0, "key_frame": 12, "arrow_stride": 2},
                size=(300, 150))
    show_target = g.add("PreviewImage", (760, 1010), size=(300, 220), title="target: frame 0 → 12")
    load = g.add("DiTFlowLoadCogVideoX", (760, 20), model, size=(320, 150))
    text = g.add("DiTFlowTextEncode", (760, 210), {"prompt": prompt, "negative_prompt": ""}, size=(400, 260))
    sampler = g.add("DiTFlowGuidedSampler", (1200, 20), sampler_widgets("latent", kv_injection=False), size=(340, 520))
    g.link(fpt, 0, flow, "fpt")
    g.link(embed, 0, flow, "embedding")
    g.link(pokes, 0, flow, "pokes")
    g.link(flow, 1, show_flow, "images")
    g.link(flow, 0, target, "flow")
    g.link(load, 0, target, "model")
    g.link(target, 0, vis, "amf")
    g.link(vis, 1, show_target, "images")
    g.link(load, 0, text, "model")
    g.link(load, 0, sampler, "model")
    g.link(text, 0, sampler, "conditioning")
    g.link(target, 0, sampler, "amf")
    if start_image:
        g.link(image, 0, sampler, "start_image")
    output_chain(g, load, sampler, 1580, prefix)
    return g.json()


def fpt_poke_motion():
    """Text-to-video (CogVideoX-5b): the poked image shapes the motion only."""
    return poke_motion(
        "Text-to-video: the image only shapes the motion; the prompt describes the scene, so describe what is in the "
        "image. To start the video from the poked image, see fpt_poke_motion_i2v.json.",
        MODEL, POKE_PROMPT, "ditflow/poke", start_image=False)


def fpt_poke_motion_i2v():
    """Image-to-video (CogVideoX-5b-I2V): the poked image is the first frame and the pokes move it."""
    return poke_motion(
        "Image-to-video: the poked image is also the first frame (the sampler's start_image, centre-cropped as the "
        "target's fit crop), so the pokes move what you poked. CogVideoX-5b-I2V generates at 480×720 only; "
        "CogVideoX1.5-5B-I2V takes other sizes (the target follows the model's token grid: keep its model input "
        "connected).",
        {**MODEL, "model": "CogVideoX-5b-I2V"}, POKE_PROMPT, "ditflow/poke_i2v", start_image=True)


WORKFLOWS = {
    "ditflow_t2v_latent": t2v_latent,
    "ditflow_i2v_latent": i2v_latent,
    "ditflow_rope_optimize_and_save": rope_optimize_and_save,
    "ditflow_rope_inject": rope_inject,
    "fpt_poke_flow": fpt_poke_flow,
    "fpt_poke_motion": fpt_poke_motion,
    "fpt_poke_motion_i2v": fpt_poke_motion_i2v,
}

if __name__ == "__main__":
    try:
        import folder_paths  # noqa: F401  (inside ComfyUI's python)
    except ImportError:  # the model combos need folder_paths: use the test stand-ins
        import tempfile

        sys.path.insert(0, str(ROOT / "tests"))
        import comfy_stubs

        comfy_stubs.install(tempfile.mkdtemp())
    out = ROOT / "workflows"
    out.mkdir(exist_ok=True)
    for name, make in WORKFLOWS.items():
        (out / f"{name}.json").write_text(json.dumps(make(), indent=1, ensure_ascii=False) + "\n")
        print(out / f"{name}.json")
