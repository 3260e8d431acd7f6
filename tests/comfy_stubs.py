# SPDX-License-Identifier: Apache-2.0
"""Minimal stand-ins for the ComfyUI modules the nodes touch, so node tests run without ComfyUI.

:func:`install` puts ``folder_paths``, ``comfy``, ``comfy.model_management``, ``comfy.model_patcher``,
``comfy.utils``, ``comfy.cli_args`` and ``latent_preview`` into ``sys.modules`` (a fixture removes them again). The
stubs record what the nodes ask of them: ``load_models_gpu`` calls (``loaded``) with the working memory each declared
(``memory_required``), the devices each ``ModelPatcher`` was given, progress updates and the preview images they
carry (``--preview-method auto`` unless a test changes ``comfy.cli_args.args``); ``get_free_memory`` reports
``model_management.FREE``. Setting
``model_management.INTERRUPT = True`` makes the next ``throw_exception_if_processing_interrupted()`` raise, as a
cancel from the UI does.

Model moves are reproduced as a GPU makes them, although every device here is the CPU: loading a model that is not
loaded yet, and evicting one (``unload_all_models``, ``free_memory``), copies each of its tensors with
``Module._apply`` in the caller's inference mode — exactly what ``module.to(other_device)`` does. A move made under
``torch.inference_mode()`` therefore leaves inference-tensor weights, as ComfyUI's moves on a GPU do.
"""

from __future__ import annotations

import enum
import os
import sys
import types

import torch

NAMES = ("folder_paths", "comfy", "comfy.model_management", "comfy.model_patcher", "comfy.utils", "comfy.cli_args",
         "latent_preview")


class InterruptProcessingException(Exception):
    """What ComfyUI raises on cancel."""


def _folder_paths(base: str) -> types.ModuleType:
    fp = types.ModuleType("folder_paths")
    fp.base_path = base
    fp.models_dir = os.path.join(base, "models")
    fp.output_directory = os.path.join(base, "output")
    fp.folder_names_and_paths = {  # registered by ComfyUI itself
        "text_encoders": ([os.path.join(base, "models", "text_encoders")], {".safetensors"}),
    }

    def add_model_folder_path(name, path, is_default=False):
        if name in fp.folder_names_and_paths:
            paths = fp.folder_names_and_paths[name][0]
            if path not in paths:
                paths.insert(0, path) if is_default else paths.append(path)
        else:
            fp.folder_names_and_paths[name] = ([path], set())

    def get_folder_paths(name):
        return list(fp.folder_names_and_paths[name][0])

    def get_filename_list(name):
        paths, exts = fp.folder_names_and_paths[name]
        out = set()
        for root in paths:
            for dirpath, _, files in os.walk(root):
                for f in files:
                    if not exts or os.path.splitext(f)[1].lower() in exts:
                        out.add(os.path.relpath(os.path.join(dirpath, f), root))
        return sorted(out)

    def get_full_path(name, filename):
        for root in fp.folder_names_and_paths.get(name, ([], None))[0]:
            path = os.path.join(root, filename)
            if os.path.isfile(path):
                return path
        return None

    def get_save_image_path(prefix, output_dir, width=0, height=0):
        subfolder = os.path.dirname(os.path.normpath(prefix))
        name = os.path.basename(os.path.normpath(prefix))
        folder = os.path.join(output_dir, subfolder)
        if os.path.commonpath((output_dir, os.path.abspath(folder))) != output_dir:
            raise Exception("**** ERROR: Saving image outside the output folder is not allowed.")
        os.makedirs(folder, exist_ok=True)
        counter = 1 + sum(1 for f in os.listdir(folder) if f.startswith(name + "_"))
        return folder, name, counter, subfolder, prefix

    fp.add_model_folder_path = add_model_folder_path
    fp.get_folder_paths = get_folder_paths
    fp.get_filename_list = get_filename_list
    fp.get_full_path = get_full_path
    fp.get_save_image_path = get_save_image_path
    fp.get_output_directory = lambda: fp.output_directory
    return fp


def _model_management() -> types.ModuleType:
    mm = types.ModuleType("comfy.model_management")
    cpu = torch.device("cpu")
    mm.INTERRUPT = False
    mm.loaded = []  # one list of patchers per load_models_gpu call
    mm.memory_required = []  # the working memory each load_models_gpu call declared
    mm.InterruptProcessingException = InterruptProcessingException
    for name in ("get_torch_device", "unet_offload_device", "text_encoder_device", "text_encoder_offload_device",
                 "vae_device", "vae_offload_device", "intermediate_device"):
        setattr(mm, name, lambda: cpu)

    mm.current_loaded_models = []  # patchers on the "GPU", most recent first
    mm.FREE = 64 * 10**9  # what get_free_memory reports, bytes

    def get_free_memory(dev=None, torch_free_too=False):
        return mm.FREE

    def loaded_models(only_currently_used=False):
        return list(mm.current_loaded_models)

    def move(patcher):
        patcher.model._apply(lambda t: t.clone())  # what .to(other device) does: new tensors, caller's mode

    def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                        force_full_load=False):
        mm.loaded.append((list(models), force_full_load))
        mm.memory_required.append(memory_required)
        for patcher in models:
            if patcher not in mm.current_loaded_models:
                move(patcher)
                mm.current_loaded_models.insert(0, patcher)

    def free_memory(memory_required, device, keep_loaded=()):
        """Evicts every loaded model not in ``keep_loaded`` (the real one stops once enough memory is free)."""
        evicted = [p for p in mm.current_loaded_models if p not in keep_loaded]
        for patcher in evicted:
            move(patcher)
            mm.current_loaded_models.remove(patcher)
        return evicted

    def unload_all_models():
        free_memory(1e30, cpu)

    def throw_exception_if_processing_interrupted():
        if mm.INTERRUPT:
            mm.INTERRUPT = False
            raise InterruptProcessingException()

    mm.move = move  # for tests: a move made behind ComfyUI's back (another pack calling .to by hand)
    mm.load_models_gpu = load_models_gpu
    mm.get_free_memory = get_free_memory
    mm.loaded_models = loaded_models
    mm.free_memory = free_memory
    mm.unload_all_models = unload_all_models
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    return mm


def _model_patcher() -> types.ModuleType:
    mp = types.ModuleType("comfy.model_patcher")

    class ModelPatcher:
        def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
            self.model, self.load_device, self.offload_device = model, load_device, offload_device

        def loaded_size(self):  # the stub's "GPU" holds a loaded model whole
            mm = sys.modules["comfy.model_management"]
            if self not in mm.current_loaded_models:
                return 0
            return sum(t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers()))

    mp.ModelPatcher = ModelPatcher
    return mp


def _utils() -> types.ModuleType:
    ut = types.ModuleType("comfy.utils")
    ut.updates = []  # (value, total) of every update_absolute
    ut.previews = []  # (value, preview) of every update_absolute that carried a preview image

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total, self.current = total, 0

        def update_absolute(self, value, total=None, preview=None):
            self.total = total if total is not None else self.total
            self.current = min(value, self.total)
            ut.updates.append((self.current, self.total))
            if preview is not None:
                ut.previews.append((self.current, preview))

        def update(self, value):
            self.update_absolute(self.current + value)

    ut.ProgressBar = ProgressBar
    return ut


def _cli_args() -> types.ModuleType:
    ca = types.ModuleType("comfy.cli_args")

    class LatentPreviewMethod(enum.Enum):
        NoPreviews = "none"
        Auto = "auto"
        Latent2RGB = "latent2rgb"
        TAESD = "taesd"

    ca.LatentPreviewMethod = LatentPreviewMethod
    ca.args = types.SimpleNamespace(preview_method=LatentPreviewMethod.Auto)  # as --preview-method auto
    return ca


def _latent_preview() -> types.ModuleType:
    """``get_previewer(device, latent_format)``: a previewer that projects ``x0[0, :, 0]`` (the first latent frame)
    with the format's factors, as ComfyUI's ``Latent2RGBPreviewer`` does, and records every call in ``previews``."""
    lp = types.ModuleType("latent_preview")
    lp.formats, lp.previews = [], []  # latent formats asked for; (x0 shape, [3, H, W] preview) per call

    class Previewer:
        def __init__(self, latent_format):
            self.factors = torch.tensor(latent_format.latent_rgb_factors)
            self.bias = torch.tensor(latent_format.latent_rgb_factors_bias)

        def decode_latent_to_preview_image(self, preview_format, x0):
            rgb = torch.einsum("chw,cr->rhw", x0[0, :, 0].float().cpu(), self.factors) + self.bias.view(3, 1, 1)
            lp.previews.append((tuple(x0.shape), rgb))
            return (preview_format, rgb, 512)

    def get_previewer(device, latent_format):
        lp.formats.append(latent_format)
        return Previewer(latent_format)

    lp.get_previewer = get_previewer
    return lp


def install(base: str) -> dict[str, types.ModuleType]:
    """Installs the stubs with ``base`` as ComfyUI's base folder (models/, output/ below it); returns them."""
    comfy = types.ModuleType("comfy")
    comfy.__path__ = [os.path.join(base, "comfy")]  # where the package's data files would be (t5_tokenizer, ...)
    mods = {
        "folder_paths": _folder_paths(base),
        "comfy": comfy,
        "comfy.model_management": _model_management(),
        "comfy.model_patcher": _model_patcher(),
        "comfy.utils": _utils(),
        "comfy.cli_args": _cli_args(),
        "latent_preview": _latent_preview(),
    }
    comfy.model_management = mods["comfy.model_management"]
    comfy.model_patcher = mods["comfy.model_patcher"]
    comfy.utils = mods["comfy.utils"]
    comfy.cli_args = mods["comfy.cli_args"]
    sys.modules.update(mods)
    return mods


def run_node(node_cls, **kwargs):
    """Calls a node's function the way ComfyUI's executor does: a fresh instance, inside inference mode."""
    with torch.inference_mode():
        return getattr(node_cls(), node_cls.FUNCTION)(**kwargs)


def uninstall() -> None:
    for name in NAMES:
        sys.modules.pop(name, None)
