# SPDX-License-Identifier: Apache-2.0
"""Loading CogVideoX, encoding prompts and decoding latents (library: ditflow.loading, .text, .reference)."""

from __future__ import annotations

from . import paths
from .model import DiTFlowModel

MODEL_TOOLTIP = "CogVideoX from DiTFlow Load CogVideoX."


class DiTFlowLoadCogVideoX:
    CATEGORY = "DiTFlow/loaders"
    FUNCTION = "load"
    RETURN_TYPES = ("COGVIDEOX",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("Transformer, VAE and T5 text encoder, loaded on the offload device (CPU) and moved to the "
                       "GPU by ComfyUI's model management when a node needs them.",)
    DESCRIPTION = "Loads a diffusers CogVideoX-2b or -5b folder from models/CogVideo for DiTFlow motion transfer."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (paths.model_folders(), {"tooltip": "A folder in models/CogVideo laid out like THUDM/CogVideoX-5b "
                                              "(model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/)."}),
            "precision": (["bf16", "fp16", "fp32"], {"default": "bf16", "tooltip": "Weight dtype of all three networks. "
                          "bf16 for CogVideoX-5b (its native dtype), fp16 for -2b; fp32 doubles the memory."}),
            "vae_tiling": ("BOOLEAN", {"default": True, "tooltip": "Encode/decode in spatial tiles: much less memory "
                           "at 480×720, slightly slower."}),
            "vae_slicing": ("BOOLEAN", {"default": False, "tooltip": "Encode/decode one batch element at a time."}),
        }}

    def load(self, model, precision, vae_tiling, vae_slicing):
        import comfy.model_management as mm
        from ditflow.loading import load_cogvideox

        bundle = load_cogvideox(paths.model_path(model), dtype=precision, device=mm.unet_offload_device(),
                                vae_tiling=vae_tiling, vae_slicing=vae_slicing)
        return (DiTFlowModel(bundle),)


class DiTFlowTextEncode:
    CATEGORY = "DiTFlow/conditioning"
    FUNCTION = "encode"
    RETURN_TYPES = ("COGVIDEOX_CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("T5 embeddings of the prompt and the negative prompt, for the DiTFlow Guided Sampler.",)
    DESCRIPTION = "Encodes the target prompt and the negative prompt with CogVideoX's T5 text encoder."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("COGVIDEOX", {"tooltip": MODEL_TOOLTIP}),
            "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "What the generated video shows; the "
                       "motion comes from the reference. Longer than 226 T5 tokens is truncated."}),
            "negative_prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "What to steer away from "
                                "(classifier-free guidance); empty is the CogVideoX default."}),
        }}

    def encode(self, model, prompt, negative_prompt):
        import comfy.model_management as mm
        from ditflow.memory import text_workspace
        from ditflow.text import encode_prompt

        bundle = model.use("text_encoder", memory_required=text_workspace(model.bundle))
        embeds = encode_prompt(bundle, prompt, negative_prompt)
        return (embeds.to(mm.intermediate_device(), embeds.cond.dtype),)


class DiTFlowDecode:
    CATEGORY = "DiTFlow/latent"
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("Decoded video frames, 4·(latent frames − 1) + 1 of them (49 for 13 latent frames).",)
    DESCRIPTION = "Decodes a CogVideoX video LATENT into frames with the model's VAE (tiling as set in the loader)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("COGVIDEOX", {"tooltip": MODEL_TOOLTIP}),
            "samples": ("LATENT", {"tooltip": "Video latent [B, C, T, H, W] from the DiTFlow Guided Sampler."}),
        }}

    def decode(self, model, samples):
        from ditflow.layout import frames_to_image, from_comfy_latent
        from ditflow.memory import vae_workspace
        from ditflow.reference import decode_latents, latent_grid

        latents = from_comfy_latent(samples["samples"], model.bundle.vae_scaling_factor)
        bundle = model.use("vae", memory_required=vae_workspace(model.bundle, latent_grid(model.bundle, latents)))
        return (frames_to_image(decode_latents(bundle, latents)),)
