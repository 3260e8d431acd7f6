# SPDX-License-Identifier: Apache-2.0
"""The reference side: encode the reference video, extract its AMF, visualise it (ditflow.reference, .visualize)."""

from __future__ import annotations

from .model_nodes import MODEL_TOOLTIP


class DiTFlowEncodeReference:
    CATEGORY = "DiTFlow/motion"
    FUNCTION = "encode"
    RETURN_TYPES = ("LATENT", "IMAGE")
    RETURN_NAMES = ("latent", "frames")
    OUTPUT_TOOLTIPS = (
        "Reference video latent [1, C, (frames − 1)/4 + 1, height/8, width/8], raw VAE space.",
        "The frames that were encoded, after frame selection and resizing (for checking or preview).",
    )
    DESCRIPTION = "Picks 4k+1 frames of the reference video, fits them to the target size and VAE-encodes them."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("COGVIDEOX", {"tooltip": MODEL_TOOLTIP}),
            "images": ("IMAGE", {"tooltip": "Reference video frames (GetVideoComponents or VHS_LoadVideo)."}),
            "width": ("INT", {"default": 720, "min": 16, "max": 4096, "step": 16, "tooltip": "Target width in px, a "
                      "multiple of 16 (CogVideoX native: 720)."}),
            "height": ("INT", {"default": 480, "min": 16, "max": 4096, "step": 16, "tooltip": "Target height in px, "
                       "a multiple of 16 (CogVideoX native: 480)."}),
            "num_frames": ("INT", {"default": 49, "min": 5, "max": 1025, "step": 4, "tooltip": "Frames to use, of "
                           "the form 4k+1, at least 5 (CogVideoX native: 49 = 13 latent frames)."}),
            "start": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip": "Index of the first frame used "
                      "(0-based)."}),
            "stride": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Step between used frames: 1 keeps "
                       "consecutive frames, 2 every other one (faster motion)."}),
            "resize": (["crop", "stretch", "pad"], {"default": "crop", "tooltip": "crop: cover the size and "
                       "centre-crop; stretch: ignore the aspect ratio; pad: fit inside and pad with black."}),
            "vae_tiling": ("BOOLEAN", {"default": True, "tooltip": "VAE in spatial tiles: much less memory at "
                           "480×720, slightly slower (the usual fix for an out-of-memory encode). Changing it reruns "
                           "only this node."}),
            "vae_slicing": ("BOOLEAN", {"default": False, "tooltip": "VAE over one batch element at a time; saves "
                            "memory only for batches (a DiTFlow video is one element)."}),
        }}

    def encode(self, model, images, width, height, num_frames, start, stride, resize, vae_tiling=True,
               vae_slicing=False):
        import comfy.model_management as mm
        from ditflow.layout import frames_to_image, image_to_frames, to_comfy_latent
        from ditflow.memory import vae_workspace
        from ditflow.video import prepare_reference

        frames = prepare_reference(image_to_frames(images), height=height, width=width, num_frames=num_frames,
                                   start=start, stride=stride, resize=resize)
        grid = model.bundle.geometry(frames.shape[0], frames.shape[2], frames.shape[3]).token_grid
        bundle = model.use("vae", memory_required=vae_workspace(model.bundle, grid, tiling=vae_tiling))
        latents = bundle.encode_video(frames, tiling=vae_tiling, slicing=vae_slicing)
        latents = to_comfy_latent(latents, bundle.vae_scaling_factor)
        return ({"samples": latents.float().to(mm.intermediate_device())}, frames_to_image(frames))


class DiTFlowExtractAMF:
    CATEGORY = "DiTFlow/motion"
    FUNCTION = "extract"
    RETURN_TYPES = ("DITFLOW_AMF",)
    RETURN_NAMES = ("amf",)
    OUTPUT_TOOLTIPS = ("The reference's Attention Motion Flow (per frame pair, a displacement per patch) and its "
                       "latents, for the DiTFlow Guided Sampler.",)
    DESCRIPTION = "Reads the reference video's motion as Attention Motion Flow at one or more transformer blocks (§4.2)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("COGVIDEOX", {"tooltip": MODEL_TOOLTIP}),
            "reference": ("LATENT", {"tooltip": "Encoded reference video from DiTFlow Encode Reference."}),
            "blocks": ("STRING", {"default": "20", "tooltip": "Transformer block(s) whose attention gives the AMF "
                       "(0-based), e.g. 20 or 10,15,20: several blocks average their losses (paper §5.3: {10, 15, 20} "
                       "on 5B). Paper: 20 on CogVideoX-5b (42 blocks), 15 on -2b (30 blocks)."}),
            "temperature": ("FLOAT", {"default": 2.0, "min": 0.01, "max": 100.0, "step": 0.1, "tooltip": "τ scaling "
                            "the attention logits before the softmax (Eq. 3); paper: 2. The sampler uses the same."}),
            "loss": (["amf", "moft", "smm"], {"default": "amf", "tooltip": "The guidance loss this reference is for: "
                     "amf reads attention (DiTFlow); moft / smm read the block's output features (baselines). "
                     "Only that pass is run; set the sampler's loss to match."}),
        }, "optional": {
            "reference_amf": (["hard", "soft"], {"default": "hard", "tooltip": "hard: each patch's argmax match "
                              "(paper); soft: the attention-weighted mean displacement (the authors' ablation switch)."}),
        }}

    def extract(self, model, reference, blocks, temperature, loss="amf", reference_amf="hard"):
        from ditflow.config import parse_blocks
        from ditflow.layout import from_comfy_latent
        from ditflow.memory import reference_workspace, text_workspace
        from ditflow.reference import extract_reference, latent_grid
        from ditflow.text import encode_prompt

        # T5 for the empty prompt, then the transformer alone: ComfyUI may evict T5 to make room for it
        empty = encode_prompt(model.use("text_encoder", memory_required=text_workspace(model.bundle)), "").cond
        latents = from_comfy_latent(reference["samples"], model.bundle.vae_scaling_factor)
        workspace = reference_workspace(model.bundle, latent_grid(model.bundle, latents))
        bundle = model.use("transformer", memory_required=workspace)
        return (extract_reference(bundle, latents, parse_blocks(blocks), temperature=temperature, loss=loss,
                                  empty_prompt=empty, soft=reference_amf == "soft"),)


class DiTFlowVisualizeAMF:
    CATEGORY = "DiTFlow/motion"
    FUNCTION = "render"
    RETURN_TYPES = ("IMAGE", "IMAGE")
    RETURN_NAMES = ("colors", "arrows")
    OUTPUT_TOOLTIPS = (
        "Displacement field as a colour wheel: hue = direction, saturation = length (white = still).",
        "One arrow per patch from its centre to where it moves, over the query frame (grey without frames).",
    )
    DESCRIPTION = "Draws the AMF between query frame i and key frame j as a colour-wheel flow image and as arrows."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "amf": ("DITFLOW_AMF", {"tooltip": "From DiTFlow Extract AMF."}),
                "query_frame": ("INT", {"default": 0, "min": 0, "max": 1000, "tooltip": "Latent frame i whose patches "
                                "move (0-based; latent frame f shows video frame 4f; 13 latent frames at 49 frames)."}),
                "key_frame": ("INT", {"default": 1, "min": 0, "max": 1000, "tooltip": "Latent frame j they move to."}),
                "arrow_stride": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Draw every n-th patch's "
                                 "arrow (1 patch = 16 px)."}),
            },
            "optional": {
                "frames": ("IMAGE", {"tooltip": "Reference frames (e.g. Encode Reference's frames) drawn under the "
                           "arrows."}),
            },
        }

    def render(self, amf, query_frame, key_frame, arrow_stride, frames=None):
        from ditflow.visualize import render_amf

        colors, arrows = render_amf(amf, query_frame, key_frame, frames=frames, arrow_stride=arrow_stride)
        return (colors[None], arrows[None])
