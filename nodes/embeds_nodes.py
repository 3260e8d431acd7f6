# SPDX-License-Identifier: Apache-2.0
"""Saving and loading optimised embeddings (ρ or the z_t trajectory; ditflow.embeds) in ComfyUI's folders."""

from __future__ import annotations

import logging
import os

from ditflow import DiTFlowError

from . import paths


#: Where Save Embeds writes by default: output/ditflow/, which Load Embeds lists.
DEFAULT_PREFIX = "ditflow/embeds"


class DiTFlowSaveEmbeds:
    CATEGORY = "DiTFlow/embeddings"
    FUNCTION = "save"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    DESCRIPTION = "Saves the optimised embeddings (ρ or the z_t trajectory) as .safetensors in the output folder for reuse."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "embeds": ("DITFLOW_EMBEDS", {"tooltip": "From the DiTFlow Guided Sampler in mode rope, posemb "
                         "(ρ) or latent (z_t trajectory)."}),
            "filename_prefix": ("STRING", {"default": DEFAULT_PREFIX, "tooltip": "Path under the output folder; "
                                "a counter and .safetensors are appended. Files in output/ditflow/ are listed by "
                                "DiTFlow Load Embeds."}),
        }}

    def save(self, embeds, filename_prefix):
        import folder_paths
        from ditflow.embeds import save_embeds

        if embeds is None:
            raise DiTFlowError("there are no embeddings to save: the sampler returns them only when it optimises "
                               "(mode latent, rope on RoPE models: 5b, I2V, 1.5, or posemb on CogVideoX-2b, with an AMF connected).")
        filename_prefix = filename_prefix.strip() or DEFAULT_PREFIX  # empty: the default, not a hidden "._00001_"
        if os.path.basename(os.path.normpath(filename_prefix)).startswith("."):
            raise DiTFlowError(f"filename prefix {filename_prefix!r} would write a hidden file that DiTFlow Load "
                               f"Embeds does not list; end it with a name, such as {DEFAULT_PREFIX}.")
        output_dir = folder_paths.get_output_directory()
        target = os.path.abspath(os.path.join(output_dir, os.path.normpath(filename_prefix)))
        if os.path.commonpath((os.path.abspath(output_dir), target)) != os.path.abspath(output_dir):
            raise DiTFlowError(f"filename prefix {filename_prefix!r} points outside the output folder; use a "
                               "relative path such as ditflow/embeds.")
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, output_dir)
        file = f"{name}_{counter:05}_.safetensors"
        save_embeds(os.path.join(folder, file), embeds)
        if not paths.lists_embeds(os.path.join(folder, file)):
            logging.getLogger("ditflow").warning(
                f"saved {os.path.join(folder, file)}, which DiTFlow Load Embeds does not list; move it to "
                "output/ditflow/ or models/ditflow_embeds/ (or save with a prefix starting ditflow/) to load it.")
        return {"ui": {"text": [os.path.join(subfolder, file)]}}


class DiTFlowLoadEmbeds:
    CATEGORY = "DiTFlow/embeddings"
    FUNCTION = "load"
    RETURN_TYPES = ("DITFLOW_EMBEDS",)
    RETURN_NAMES = ("embeds",)
    OUTPUT_TOOLTIPS = ("Positional embeddings per guided step, with the model variant, token grid and steps they "
                       "were optimised for (the sampler refuses a mismatch).",)
    DESCRIPTION = "Loads embeddings saved by DiTFlow Save Embeds (models/ditflow_embeds or output/ditflow)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "embeds_file": (paths.embeds_files(), {"tooltip": "A .safetensors file in models/ditflow_embeds/ or "
                            "output/ditflow/ (refresh after saving)."}),
        }}

    @classmethod
    def IS_CHANGED(cls, embeds_file):
        try:
            return os.path.getmtime(paths.embeds_path(embeds_file))
        except (DiTFlowError, OSError):
            return ""

    def load(self, embeds_file):
        from ditflow.embeds import load_embeds

        return (load_embeds(paths.embeds_path(embeds_file)),)
