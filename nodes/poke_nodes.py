# SPDX-License-Identifier: Apache-2.0
"""Flow Poke Transformer nodes (library: ditflow.fpt): load, embed an image, pokes, flow field, motion density.

Pixel conventions (``ditflow/fpt/__init__``): (x, y) from the image's top-left corner, x right, y down; flow fields
are ``DITFLOW_FLOW``, a float32 tensor ``[B, H, W, 2]`` of (dx, dy) in pixels per pixel (OpenCV's layout).
"""

from __future__ import annotations

import os

import torch

from ditflow import DiTFlowError
from ditflow.fpt.fields import MODES, PRECISIONS
from ditflow.fpt.view import FITS

from . import paths
from .model import carrier

MODEL_TOOLTIP = "Flow Poke Transformer from Load FPT."
EMBEDDING_TOOLTIP = "Image features from FPT Embed Image (computed once per image)."
POKES_TOOLTIP = "Pokes from FPT Pokes."
CAMERA_INPUT = ("BOOLEAN", {"default": True, "tooltip": "Condition the prediction on a still camera (the authors' "
                             "demo default); off lets the model predict camera motion too."})


def _prediction_inputs() -> dict:
    """The inputs every prediction node starts with: model, image embedding, pokes."""
    return {"fpt": ("FPT_MODEL", {"tooltip": MODEL_TOOLTIP}),
            "embedding": ("FPT_EMBEDDING", {"tooltip": EMBEDDING_TOOLTIP}),
            "pokes": ("FPT_POKES", {"tooltip": POKES_TOOLTIP})}


class FPTModel:
    """A loaded FPT (``module``, fp32), its ``ModelPatcher`` and the precision predictions run at."""

    def __init__(self, module, precision: str):
        import comfy.model_management as mm
        import comfy.model_patcher

        self.module, self.precision = module, precision
        offload = mm.unet_offload_device()
        self.patcher = comfy.model_patcher.ModelPatcher(carrier(module, offload), load_device=mm.get_torch_device(),
                                                        offload_device=offload)

    def use(self):
        """Moves the model to the compute device through ComfyUI's memory manager and returns it."""
        import comfy.model_management as mm

        mm.load_models_gpu([self.patcher], force_full_load=True)
        return self.module

    def __repr__(self) -> str:
        return f"FPTModel({self.module.config.width}×{self.module.config.depth}, {self.precision})"


def _progress():
    """A ``callback(done, total)`` that ticks ComfyUI's progress bar and lets a cancel through."""
    import comfy.model_management as mm
    import comfy.utils

    bar = None

    def callback(done: int, total: int) -> None:
        nonlocal bar
        mm.throw_exception_if_processing_interrupted()
        bar = bar or comfy.utils.ProgressBar(total)
        bar.update_absolute(done, total)

    return callback


class DiTFlowLoadFPT:
    CATEGORY = "DiTFlow/poke"
    FUNCTION = "load"
    RETURN_TYPES = ("FPT_MODEL",)
    RETURN_NAMES = ("fpt",)
    OUTPUT_TOOLTIPS = ("The Flow Poke Transformer (fp32 weights, 0.9 GB for the base model), moved to the GPU by "
                       "ComfyUI's model management when a node needs it.",)
    DESCRIPTION = ("Loads Flow Poke Transformer weights (converted to safetensors, see the README; weights "
                   "CC BY-NC 4.0) from models/fpt.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "weights": (paths.fpt_files(), {"tooltip": "A .safetensors in models/fpt made by 'python -m ditflow "
                        "fpt-convert flow_poke_open_set_base.pt models/fpt/fpt_base.safetensors'."}),
            "precision": (list(PRECISIONS), {"default": "fp32", "tooltip": "fp32, or bfloat16 autocast on the GPU "
                          "as the authors' demo runs it (faster; the mixture head stays fp64)."}),
        }}

    @classmethod
    def IS_CHANGED(cls, weights, precision):
        """The file's mtime: converting again into the same name reloads it."""
        try:
            return os.path.getmtime(paths.fpt_path(weights))
        except (DiTFlowError, OSError):
            return ""

    def load(self, weights, precision):
        import comfy.model_management as mm
        from ditflow.fpt.checkpoint import load_fpt

        with torch.inference_mode(False):  # weights made in inference mode could not leave it later
            module = load_fpt(paths.fpt_path(weights), device=mm.unet_offload_device())
        return (FPTModel(module, precision),)


class DiTFlowFPTEmbedImage:
    CATEGORY = "DiTFlow/poke"
    FUNCTION = "embed"
    RETURN_TYPES = ("FPT_EMBEDDING",)
    RETURN_NAMES = ("embedding",)
    OUTPUT_TOOLTIPS = ("DINOv2 features of the image (32×32 per image for the base model) and how the image sits "
                       "in the model's square view; ComfyUI caches it, so changing pokes does not re-encode.",)
    DESCRIPTION = "Encodes an image for the Flow Poke Transformer (once; reused by every prediction on it)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "fpt": ("FPT_MODEL", {"tooltip": MODEL_TOOLTIP}),
            "image": ("IMAGE", {"tooltip": "The image to poke (a batch is encoded image by image, same pokes)."}),
            "fit": (list(FITS), {"default": "pad", "tooltip": "How a non-square image meets the model's square: "
                    "pad = letterbox with black bars, the whole image is seen; crop = the centre square only, as "
                    "the authors' demo (pokes outside it are refused, the flow there is 0)."}),
        }}

    def embed(self, fpt, image, fit):
        import comfy.model_management as mm
        from ditflow.fpt.fields import embed_image

        embedding = embed_image(fpt.use(), image, fit=fit, precision=fpt.precision)
        embedding.features = embedding.features.to(mm.intermediate_device())
        return (embedding,)


class DiTFlowPokes:
    CATEGORY = "DiTFlow/poke"
    FUNCTION = "parse"
    RETURN_TYPES = ("FPT_POKES",)
    RETURN_NAMES = ("pokes",)
    OUTPUT_TOOLTIPS = ("The pokes: start and end points in pixels of the image.",)
    DESCRIPTION = "Pokes typed as x0,y0,x1,y1 in image pixels: drag the point (x0, y0) to (x1, y1)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pokes": ("STRING", {"multiline": True, "default": "", "tooltip": "One poke per line or separated by "
                      "';': x0,y0,x1,y1 in pixels (x right, y down, from the top-left corner). Empty: no pokes, the "
                      "model predicts motion from the image alone. Up to 128 pokes were seen in training."}),
        }}

    def parse(self, pokes):
        from ditflow.fpt.pokes import out_of_distribution_note, parse_pokes

        parsed = parse_pokes(pokes)
        if note := out_of_distribution_note(parsed):
            print(f"[DiTFlow] {note}")
        return (parsed,)


class DiTFlowFPTPredictFlow:
    CATEGORY = "DiTFlow/poke"
    FUNCTION = "predict"
    RETURN_TYPES = ("DITFLOW_FLOW", "IMAGE")
    RETURN_NAMES = ("flow", "flow_image")
    OUTPUT_TOOLTIPS = (
        "Dense flow [B, H, W, 2] float32: per pixel, (dx, dy) in pixels (x right, y down) of where it moves.",
        "Colour wheel of the flow (hue = direction, saturation = length relative to the longest; white = still) "
        "with the pokes drawn as arrows.",
    )
    DESCRIPTION = "Predicts how every point of the image moves given the pokes, as a dense flow field and a picture."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            **_prediction_inputs(),
            "mode": (list(MODES), {"default": "mean", "tooltip": "mean: each point's expected motion given "
                     "the pokes (one parallel pass). sample: one plausible motion: points on an ar_grid grid are "
                     "sampled in sequence, each seeing the ones before, then filled in (the authors' demo)."}),
            "grid": ("INT", {"default": 128, "min": 4, "max": 512, "tooltip": "Query points along the image's longer "
                     "side (the authors' demo: 256); the field is bilinear between them."}),
            "ar_grid": ("INT", {"default": 16, "min": 1, "max": 64, "tooltip": "Points along the longer side sampled "
                        "in sequence in mode sample (cost grows with its square; the authors' demo: 32)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                     "tooltip": "Seed of mode sample; "
                     "the same seed gives the same motion on any device."}),
            "camera_static": CAMERA_INPUT,
        }}

    def predict(self, fpt, embedding, pokes, mode, grid, ar_grid, seed, camera_static):
        from ditflow.fpt.fields import predict_flow
        from ditflow.fpt.render import flow_image

        flow = predict_flow(fpt.use(), embedding, pokes, mode=mode, grid=grid, ar_grid=ar_grid, seed=seed,
                            camera_static=camera_static, precision=fpt.precision, callback=_progress())
        return flow, torch.stack([flow_image(f, pokes) for f in flow])


class DiTFlowFPTMotionDensity:
    CATEGORY = "DiTFlow/poke"
    FUNCTION = "density"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("heatmap",)
    OUTPUT_TOOLTIPS = ("Where the query point may go: the predicted probability per pixel (viridis, square-root "
                       "scaled) over the dimmed image, with the query (orange cross) and the pokes.",)
    DESCRIPTION = "Shows the predicted distribution of one point's motion given the pokes, as a heatmap."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            **_prediction_inputs(),
            "query_x": ("FLOAT", {"default": 256.0, "min": 0.0, "max": 16384.0, "step": 1.0, "tooltip": "The point "
                        "to ask about: x in pixels from the left edge."}),
            "query_y": ("FLOAT", {"default": 256.0, "min": 0.0, "max": 16384.0, "step": 1.0, "tooltip": "y in "
                        "pixels from the top edge."}),
            "camera_static": CAMERA_INPUT,
        }}

    def density(self, fpt, embedding, pokes, query_x, query_y, camera_static):
        from ditflow.fpt.fields import motion_density
        from ditflow.fpt.render import density_image

        query = (float(query_x), float(query_y))
        maps = motion_density(fpt.use(), embedding, pokes, query, camera_static=camera_static,
                              precision=fpt.precision)
        return (torch.stack([density_image(img, m, query, pokes) for img, m in zip(embedding.image, maps)]),)


class DiTFlowPokeMotionTarget:
    CATEGORY = "DiTFlow/poke"
    FUNCTION = "target"
    RETURN_TYPES = ("DITFLOW_AMF",)
    RETURN_NAMES = ("amf",)
    OUTPUT_TOOLTIPS = ("A motion target for the DiTFlow Guided Sampler's amf input: per frame pair, where each patch "
                       "should move (patch-grid units), made from the flow instead of a reference video. It carries "
                       "no reference latents, so the sampler runs no KV injection with it.",)
    DESCRIPTION = ("Turns a flow field (FPT Predict Flow) into a DiTFlow motion target: each 16 px patch moves in a "
                   "straight line at constant speed by its mean flow from the first to the last frame.")

    @classmethod
    def INPUT_TYPES(cls):
        from ditflow.video import RESIZE_MODES

        return {"required": {
            "flow": ("DITFLOW_FLOW", {"tooltip": "Flow field from FPT Predict Flow: (dx, dy) in pixels of the poked "
                     "image, taken as the motion from the first to the last frame of the video."}),
            "width": ("INT", {"default": 720, "min": 16, "max": 4096, "step": 16, "tooltip": "Width of the video "
                      "to generate in px, a multiple of 16 (CogVideoX native: 720); the sampler's 0 takes it."}),
            "height": ("INT", {"default": 480, "min": 16, "max": 4096, "step": 16, "tooltip": "Height in px, a "
                       "multiple of 16 (CogVideoX native: 480)."}),
            "num_frames": ("INT", {"default": 49, "min": 5, "max": 1025, "step": 4, "tooltip": "Video frames, 4k+1 "
                           "(CogVideoX native: 49 = 13 latent frames)."}),
            "fit": (list(RESIZE_MODES), {"default": "crop", "tooltip": "How the poked image meets the video's frame: "
                    "crop = cover and centre-crop (as the sampler fits a start image, so the target lines up with "
                    "it); stretch = ignore the aspect ratio; pad = fit inside (the padding gets no target)."}),
            "block": ("INT", {"default": 20, "min": 0, "max": 99, "tooltip": "Transformer block the sampler guides "
                      "at (0-based). Paper: 20 on CogVideoX-5b (42 blocks), 15 on -2b (30 blocks)."}),
            "scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip": "Multiplies the "
                      "flow: 2 = twice as far over the clip."}),
            "min_motion": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 4096.0, "step": 1.0, "tooltip": "Patches "
                           "moving less than this (px over the clip) get no target and are left free instead of "
                           "held still; 0 holds every patch the flow reaches."}),
            "temperature": ("FLOAT", {"default": 2.0, "min": 0.01, "max": 100.0, "step": 0.1, "tooltip": "τ of the "
                            "generated AMF (Eq. 3) the sampler uses; paper: 2."}),
        }, "optional": {
            "model": ("COGVIDEOX", {"tooltip": "The CogVideoX the sampler runs (nothing is loaded): the target is "
                      "built on its token grid (needed for CogVideoX 1.5, whose token frames span two latent frames) "
                      "and the size and block are checked now."}),
        }}

    def target(self, flow, width, height, num_frames, fit, block, scale, min_motion, temperature, model=None):
        from ditflow.motion_target import poke_reference

        return (poke_reference(flow, num_frames=num_frames, height=height, width=width, blocks=[block], fit=fit,
                               scale=scale, min_motion=min_motion, temperature=temperature,
                               model=None if model is None else model.bundle),)
