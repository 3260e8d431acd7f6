# SPDX-License-Identifier: Apache-2.0
"""Weights that are inference tensors, and the guard that makes a module differentiable-through again.

A tensor created under ``torch.inference_mode()`` is an *inference tensor*; autograd refuses to save one for the
backward ("Inference tensors cannot be saved for backward"). ComfyUI runs every node under inference mode, so any
move of a module made there — ``load_models_gpu`` bringing it to the GPU, ``free_memory`` / ``/free`` evicting it
to the CPU for another model, a partial (low-VRAM) load or unload, a dtype cast — replaces its weights by inference
tensors (``Module._apply`` assigns ``param.data``). On the CPU nothing moves, which is why only GPUs showed it.

Guidance is the one place that differentiates through the transformer (:func:`ditflow.sampler.sample`); it calls
:func:`replace_inference_tensors` first, whatever path the weights took. The ComfyUI adapter also avoids creating
them (its loads run under ``torch.inference_mode(False)``), but a model can be moved by code we do not control.
"""

from __future__ import annotations

import torch


def replace_inference_tensors(module: torch.nn.Module) -> int:
    """Replaces in place each parameter and buffer of ``module`` that is an inference tensor by a normal copy.

    One tensor at a time (``tensor.data = copy``; the old storage is freed once nothing else holds it), so peak
    memory grows by the largest single tensor at most, not by the model. Parameter objects, their
    ``requires_grad`` and the module structure are unchanged; tensors that are already normal are not touched, so
    a model that needs nothing costs one ``is_inference()`` check per tensor.

    Args:
        module: any ``torch.nn.Module`` (here the CogVideoX transformer), on any device and dtype.
    Returns:
        How many tensors were replaced (0 when none was an inference tensor).
    """
    replaced = 0
    with torch.inference_mode(False), torch.no_grad():
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.is_inference():
                tensor.data = tensor.data.clone()  # a clone made outside inference mode is a normal tensor
                replaced += 1
    return replaced
