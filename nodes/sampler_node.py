# SPDX-License-Identifier: Apache-2.0
"""DiTFlow Guided Sampler: one call to ``ditflow.sampler.sample`` with a progress/preview/cancel callback."""

from __future__ import annotations

from .model_nodes import MODEL_TOOLTIP


def _previewer(model):
    """ComfyUI's latent → RGB previewer (``latent_preview``) with this model's own projection, or ``None`` when the
    server runs without previews (``--preview-method none``, ComfyUI's default)."""
    import types

    import comfy.model_management as mm
    import latent_preview
    from comfy.cli_args import LatentPreviewMethod, args

    if args.preview_method == LatentPreviewMethod.NoPreviews:
        return None
    fit = model.latent_rgb()
    latent_format = types.SimpleNamespace(  # the fields get_previewer reads; no TAESD decoder exists for CogVideoX
        latent_channels=fit.factors.shape[0], latent_rgb_factors=fit.factors.tolist(),
        latent_rgb_factors_bias=fit.bias.tolist(), taesd_decoder_name=None,
    )
    return latent_preview.get_previewer(mm.get_torch_device(), latent_format)


def _progress(num_steps: int, previewer=None, scaling_factor: float = 1.0):
    """A ``sample`` callback: ticks ComfyUI's progress bar per denoising step with a preview of the predicted clean
    video's first frame, logs the AMF loss and lets a cancel from the UI stop the optimisation loop (the library
    restores the model in ``finally``)."""
    import comfy.model_management as mm
    import comfy.utils
    from ditflow.layout import to_comfy_latent

    bar = comfy.utils.ProgressBar(num_steps)

    def callback(info: dict) -> None:
        mm.throw_exception_if_processing_interrupted()
        if info["iteration"] is None:
            preview = None
            if previewer is not None and info.get("denoised") is not None:
                x0 = to_comfy_latent(info["denoised"], scaling_factor)  # [1, C, T, H, W] raw: what the factors fit
                preview = previewer.decode_latent_to_preview_image("JPEG", x0)
            bar.update_absolute(info["step"] + 1, info["num_steps"], preview)
        elif info["loss"] is not None:
            print(f"[DiTFlow] step {info['step'] + 1}/{info['num_steps']} (t={info['timestep']}) "
                  f"iteration {info['iteration'] + 1}: AMF loss {info['loss']:.6f}", flush=True)

    return callback


class DiTFlowGuidedSampler:
    CATEGORY = "DiTFlow/sampling"
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT", "DITFLOW_EMBEDS")
    RETURN_NAMES = ("latent", "embeds")
    OUTPUT_TOOLTIPS = (
        "Generated video latent [1, C, T, H, W] (raw VAE space) for CogVideoX Decode.",
        "The optimised tensor per guided step (ρ in modes rope/posemb, the z_t trajectory in mode latent) for "
        "DiTFlow Save Embeds; empty when nothing was optimised.",
    )
    DESCRIPTION = "Generates a CogVideoX video whose motion follows the reference AMF (DiTFlow Alg. 1)."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("COGVIDEOX", {"tooltip": MODEL_TOOLTIP}),
                "conditioning": ("COGVIDEOX_CONDITIONING", {"tooltip": "From CogVideoX Text Encode (DiTFlow)."}),
                "mode": (["latent", "rope", "posemb", "none"], {"default": "latent", "tooltip": "What guidance "
                         "optimises: latent = the noisy latent z_t (best motion fidelity); rope = RoPE tables "
                         "(RoPE models: 5b, I2V, 1.5; saves embeddings); posemb = sin-cos positions (CogVideoX-2b); none = no "
                         "optimisation: with an AMF and kv_injection on it is the 'Injection' baseline, without "
                         "them the plain backbone."}),
                "steps": ("INT", {"default": 50, "min": 1, "max": 1000, "tooltip": "Denoising steps (paper: 50). "
                          "With embeddings connected their own step count is used."}),
                "cfg": ("FLOAT", {"default": 6.0, "min": 0.0, "max": 30.0, "step": 0.1, "tooltip": "Classifier-free "
                        "guidance scale (CogVideoX: 6; ramped by dynamic CFG on -5b). ≤ 1 turns CFG off."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                         "tooltip": "Seed of the initial noise (and the scheduler's noise)."}),
                "guidance_fraction": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip":
                                      "T_opt: leading fraction of the steps that are guided (paper: 0.2 = 10 of 50)."}),
                "opt_steps": ("INT", {"default": 5, "min": 0, "max": 100, "tooltip": "K_opt: Adam iterations per "
                              "guided step (paper: 5). Each costs a forward and backward pass up to the block."}),
                "lr_start": ("FLOAT", {"default": 0.002, "min": 0.0, "max": 1.0, "step": 0.0001, "tooltip":
                             "Adam learning rate at the first guided step (paper: 0.002), linear to lr_end."}),
                "lr_end": ("FLOAT", {"default": 0.001, "min": 0.0, "max": 1.0, "step": 0.0001, "tooltip":
                           "Adam learning rate at the last guided step (paper: 0.001)."}),
                "kv_injection": ("BOOLEAN", {"default": True, "tooltip": "During guided steps, replace the video "
                                 "keys/values at kv_block by the noised reference's (needs an AMF input; paper: on)."}),
                "kv_block": ("INT", {"default": 0, "min": 0, "max": 99, "tooltip": "Block for KV injection "
                             "(0-based; authors' default 0)."}),
                "num_frames": ("INT", {"default": 0, "min": 0, "max": 1025, "step": 4, "tooltip": "Video frames (4k+1, at "
                               "least 5); 0 = as the connected AMF or embeddings (a different value is an error)."}),
                "width": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 16, "tooltip": "Width in px (multiple "
                          "of 16); 0 = as the connected AMF or embeddings (a different value is an error)."}),
                "height": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 16, "tooltip": "Height in px (multiple "
                           "of 16); 0 = as the connected AMF or embeddings (a different value is an error)."}),
                "loss": (["amf", "moft", "smm"], {"default": "amf", "tooltip": "What guidance matches at the "
                         "guidance block: amf = Attention Motion Flow (DiTFlow); moft / smm = the paper's MOFT and "
                         "SMM baselines on the block's output features. Extract the reference with the same loss."}),
                "gradient_checkpointing": (["auto", "on", "off"], {"default": "auto", "tooltip": "Recompute block "
                                           "activations in the backward of the guided passes: on saves memory (5b, "
                                           "49 frames: ≈ 17.5 instead of 58 GB), off is ≈ 12 % faster; auto: off "
                                           "when ComfyUI can free enough GPU memory for it."}),
            },
            "optional": {
                "amf": ("DITFLOW_AMF", {"tooltip": "Reference motion from DiTFlow Extract AMF: needed by modes "
                        "latent/rope/posemb and by KV injection. With embeddings connected too, it serves KV "
                        "injection in the saved steps (the authors' zero-shot default; same frames and size)."}),
                "embeds": ("DITFLOW_EMBEDS", {"tooltip": "Saved embeddings, ρ or a z_t trajectory (DiTFlow Load "
                           "Embeds), to inject zero-shot with a new prompt: no AMF needed, no optimisation."}),
                "start_image": ("IMAGE", {"tooltip": "Image-to-video models (CogVideoX-5b-I2V, CogVideoX1.5-5B-I2V) "
                                "only, and needed there: the first frame of the video (the first image of a batch; "
                                "centre-cropped to the video's size). The reference video's first frame keeps its "
                                "scene; another image moves a new scene the reference's way."}),
                "optimizer": (["adam", "adamw", "sgd"], {"default": "adam", "tooltip": "Optimiser of each guided "
                              "step, fresh each step with PyTorch's defaults (paper: Adam; AdamW and SGD are its "
                              "Table 3c ablation)."}),
                "masked_loss": ("BOOLEAN", {"default": True, "tooltip": "Average the AMF loss over the patches "
                                "where the reference moves (paper); off averages over all of them (ablation)."}),
            },
        }

    def sample(self, model, conditioning, mode, steps, cfg, seed, guidance_fraction, opt_steps, lr_start, lr_end,
               kv_injection, kv_block, num_frames, width, height, amf=None, embeds=None, loss="amf",
               gradient_checkpointing="auto", start_image=None, optimizer="adam", masked_loss=True):
        import dataclasses

        import comfy.model_management as mm
        from ditflow import GuidanceConfig
        from ditflow.layout import image_to_frames, to_comfy_latent
        from ditflow.memory import plan_sampling
        from ditflow.sampler import sample, size_from_inputs

        if embeds is not None:
            steps = embeds.num_inference_steps  # injection replays the saved steps
        config = GuidanceConfig(
            mode=mode, loss=loss, num_inference_steps=steps, guidance_scale=cfg, guidance_fraction=guidance_fraction,
            opt_steps=opt_steps, lr_start=lr_start, lr_end=lr_end, kv_injection_blocks=(kv_block,) if kv_injection else (),
            temperature=amf.temperature if amf is not None and amf.amf else 2.0,
            soft_reference=amf is not None and amf.soft, optimizer=optimizer, masked_loss=masked_loss,
        )
        size = size_from_inputs(model.bundle, num_frames, height, width, reference=amf, embeds=embeds)
        image = None
        if start_image is not None:  # the sampler says in one sentence if the model takes none
            from ditflow.video import fit_pictures

            image = fit_pictures(image_to_frames(start_image[:1]), size[1], size[2], "crop", fill=-1.0)[0].clamp(-1, 1)
        previewer = _previewer(model)  # may fit the preview projection with the VAE: before the transformer loads
        free, on_cpu = model.available_memory("transformer")
        plan = plan_sampling(model.bundle, config, free, gradient_checkpointing=gradient_checkpointing, on_cpu=on_cpu,
                             reference=amf, embeds=embeds, size=size)
        print(f"[DiTFlow] gradient checkpointing {'on' if plan.gradient_checkpointing else 'off'} "
              f"({plan.checkpointing_reason})", flush=True)
        # An image-to-video run encodes its start image with the run's generator: the VAE is needed too.
        networks = ("transformer", "vae") if model.bundle.needs_image and image is not None else ("transformer",)
        bundle = model.use(*networks, memory_required=plan.workspace_bytes)
        config = dataclasses.replace(config, gradient_checkpointing=plan.gradient_checkpointing)
        result = sample(bundle, conditioning, config, size=size, seed=seed, reference=amf, embeds=embeds, image=image,
                        callback=_progress(steps, previewer, bundle.vae_scaling_factor))
        latent = {"samples": to_comfy_latent(result.latents, bundle.vae_scaling_factor).to(mm.intermediate_device())}
        return (latent, result.embeds)
