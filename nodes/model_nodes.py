# SPDX-License-Identifier: Apache-2.0
"""Loading CogVideoX, encoding prompts and decoding latents (library: ditflow.backbones, .text)."""

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
    DESCRIPTION = ("Loads a CogVideoX (2b, 5b, 5b-I2V, 1.5-5B, 1.5-5B-I2V) from models/CogVideo (downloading it "
                   "when missing) for DiTFlow.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (paths.model_choices(), {"tooltip": "A folder in models/CogVideo: the diffusers layout of "
                      "THUDM/CogVideoX-5b, or kijai's (transformer/, vae/, scheduler/ with T5 from models/"
                      "text_encoders). CogVideoX-5b and -2b are listed even when absent: see download_missing."}),
            "precision": (["bf16", "fp16", "fp32"], {"default": "bf16", "tooltip": "Weight dtype of all three networks. "
                          "bf16 for CogVideoX-5b (its native dtype), fp16 for -2b; fp32 doubles the memory."}),
            "text_encoder": ([paths.AUTO_T5, *paths.t5_files()], {"default": paths.AUTO_T5, "tooltip": "T5-XXL: auto "
                             "takes the model folder's text_encoder/, else a T5-XXL file from models/text_encoders "
                             "(t5xxl_fp16 preferred; fp8 and scaled fp8 work, as for Flux and SD3). Or pick a file."}),
            "download_missing": ("BOOLEAN", {"default": True, "tooltip": "When the CogVideoX-5b/-2b folder is missing, "
                                 "download THUDM/<name> from the Hugging Face hub into models/CogVideo/<name> "
                                 "(safetensors and configs; without T5 when a T5 file is used: ≈ 11.5 GB for 5b, "
                                 "else ≈ 21 GB). Progress in the console; rerunning resumes."}),
        }}

    def load(self, model, precision, text_encoder=paths.AUTO_T5, download_missing=True):
        import comfy.model_management as mm
        from ditflow.backbones import load_model

        t5_file = paths.text_encoder_file(text_encoder, paths.model_folder(model))
        folder = paths.model_path(model, download=download_missing, with_text_encoder=t5_file is None)
        bundle = load_model(folder, dtype=precision, device=mm.unet_offload_device(), text_encoder_file=t5_file,
                                tokenizer_path=paths.tokenizer_folder(folder, t5_file))
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
    DESCRIPTION = "Decodes a CogVideoX video LATENT into frames with the model's VAE."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("COGVIDEOX", {"tooltip": MODEL_TOOLTIP}),
            "samples": ("LATENT", {"tooltip": "Video latent [B, C, T, H, W] from the DiTFlow Guided Sampler."}),
            "vae_tiling": ("BOOLEAN", {"default": True, "tooltip": "VAE in spatial tiles: much less memory at "
                           "480×720, slightly slower (the usual fix for an out-of-memory decode). Changing it reruns "
                           "only this node."}),
            "vae_slicing": ("BOOLEAN", {"default": False, "tooltip": "VAE over one batch element at a time; saves "
                            "memory only for batches (a DiTFlow video is one element)."}),
        }}

    def decode(self, model, samples, vae_tiling=True, vae_slicing=False):
        from ditflow.layout import frames_to_image, from_comfy_latent
        from ditflow.memory import vae_workspace
        from ditflow.reference import latent_grid

        latents = from_comfy_latent(samples["samples"], model.bundle.vae_scaling_factor)
        workspace = vae_workspace(model.bundle, latent_grid(model.bundle, latents), tiling=vae_tiling)
        bundle = model.use("vae", memory_required=workspace)
        return (frames_to_image(bundle.decode_latents(latents, tiling=vae_tiling, slicing=vae_slicing)),)
