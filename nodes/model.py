# SPDX-License-Identifier: Apache-2.0
"""ComfyUI's handle on a loaded CogVideoX: the library bundle plus one ``ModelPatcher`` per component.

The diffusers / transformers modules stay plain library objects (a ``ditflow.backbones`` model); this glue lets
ComfyUI's memory manager move them: :meth:`DiTFlowModel.use` asks ``load_models_gpu`` to bring the named
components to the compute device (evicting other models if needed) before a node calls the library, and ComfyUI
offloads them again when something else needs the memory.

Each module is wrapped in a tiny :class:`_Carrier` because ``ModelPatcher`` assigns ``model.device``, which is a
read-only property on diffusers and transformers models. The carrier class takes the name of the network it holds,
so ComfyUI's console says "Requested to load CogVideoXTransformer3DModel", not the wrapper's name.
"""

from __future__ import annotations

import torch

#: Component → (load device getter, offload device getter) names in ``comfy.model_management``.
_DEVICES = {
    "transformer": ("get_torch_device", "unet_offload_device"),
    "vae": ("vae_device", "vae_offload_device"),
    "text_encoder": ("get_torch_device", "text_encoder_offload_device"),
}


class _Carrier(torch.nn.Module):
    """Holds one library module as ``inner`` and a writable ``device`` for ``ModelPatcher``."""

    def __init__(self, inner: torch.nn.Module, device: torch.device):
        super().__init__()
        self.inner = inner
        self.device = device


def carrier(inner: torch.nn.Module, device: torch.device) -> _Carrier:
    """A :class:`_Carrier` whose class is named after ``inner``'s (ComfyUI logs ``type(model).__name__``)."""
    name = type(inner).__name__
    if name not in _CARRIERS:
        _CARRIERS[name] = type(name, (_Carrier,), {"__doc__": f"{_Carrier.__doc__} ({name})",
                                                   "__module__": __name__, "__qualname__": name})
    return _CARRIERS[name](inner, device)


_CARRIERS: dict[str, type] = {}


class DiTFlowModel:
    """A loaded CogVideoX (``bundle``) and the ``ModelPatcher`` of each of its three networks (``patchers``)."""

    def __init__(self, bundle):
        import comfy.model_management as mm
        import comfy.model_patcher

        self.bundle = bundle
        self._latent_rgb = None
        self.patchers = {}
        for name, (load, offload) in _DEVICES.items():
            module = getattr(bundle, name)
            if module is None:
                continue
            offload_device = getattr(mm, offload)()
            self.patchers[name] = comfy.model_patcher.ModelPatcher(
                carrier(module, offload_device), load_device=getattr(mm, load)(), offload_device=offload_device
            )

    def use(self, *names: str, memory_required: int = 0):
        """Loads the named components onto their compute device (fully: plain torch layers cannot be split) and
        returns the bundle for the library call.

        ``memory_required`` (bytes) is the working memory the library call needs beyond the weights
        (``ditflow.memory``); ComfyUI evicts other models (T5 before the sampler on a 24 GB card) to make room.

        The move runs outside ComfyUI's inference mode, so the moved weights are normal tensors (moved inside it they
        would be inference tensors, and guidance could not differentiate through them). Moves ComfyUI makes
        elsewhere (evicting for another model) are out of our hands: ``ditflow.sampler.sample`` repairs those.
        """
        import comfy.model_management as mm

        with torch.inference_mode(False):
            mm.load_models_gpu([self.patchers[n] for n in names], memory_required=int(memory_required),
                               force_full_load=True)
        return self.bundle

    def available_memory(self, name: str) -> tuple[int, bool]:
        """(bytes ComfyUI can give component ``name`` on its load device, whether that device is the CPU).

        On a GPU: free memory now plus what the models ComfyUI holds there occupy (it evicts them as needed, this
        component included); on the CPU: ComfyUI's free RAM.
        """
        import comfy.model_management as mm

        device = self.patchers[name].load_device
        free = int(mm.get_free_memory(device))
        if device.type == "cpu":
            return free, True
        held = sum(p.loaded_size() for p in mm.loaded_models() if p.load_device == device)
        return free + int(held), False

    def latent_rgb(self):
        """This model's latent → RGB projection for previews (:func:`ditflow.preview.fit_latent_rgb`), fitted on
        first use with the VAE (brought to its device by model management) and kept."""
        if self._latent_rgb is None:
            from ditflow.preview import fit_latent_rgb

            self._latent_rgb = fit_latent_rgb(self.use("vae"))
        return self._latent_rgb

    def __repr__(self) -> str:
        return f"DiTFlowModel({self.bundle.variant}, {self.bundle.path}, {self.bundle.dtype})"
