# SPDX-License-Identifier: Apache-2.0
"""Guidance with weights that are inference tensors: the GPU-only failure of ComfyUI, reproduced on the CPU.

On a GPU, ComfyUI moves the transformer under ``torch.inference_mode()`` and the moved weights become inference
tensors; the first backward then failed with "Inference tensors cannot be saved for backward". On the CPU nothing
moves, so :func:`moved_under_inference_mode` makes the same move by hand (``Module._apply`` with a copy, which is
what ``.to(other device)`` does), and the library is called under ``torch.inference_mode()`` as a node calls it.

Sizes: 9 frames → 3 latent frames; 64×96 px → latent 8×12 → 4×6 patches; guidance block 1 of 4.
"""

from __future__ import annotations

import pytest
import torch

from ditflow import GuidanceConfig
from ditflow.inference_tensors import replace_inference_tensors
from ditflow.backbones.cogvideox.loading import load_cogvideox
from ditflow.reference import extract_reference
from ditflow.sampler import sample
from ditflow.text import encode_prompt

# 2 steps, the first guided with 3 Adam iterations; a large lr so the tiny random model's loss moves visibly.
FAST = dict(num_inference_steps=2, guidance_fraction=0.5, opt_steps=3, lr_start=0.05, lr_end=0.02)


def moved_under_inference_mode(module: torch.nn.Module) -> torch.nn.Module:
    """Copies every tensor of ``module`` under inference mode, as ComfyUI's move to (or from) the GPU does."""
    with torch.inference_mode():
        module._apply(lambda t: t.clone())
    return module


def inference_tensor_count(module: torch.nn.Module) -> int:
    return sum(t.is_inference() for t in (*module.parameters(), *module.buffers()))


@pytest.fixture
def fresh_models(tiny_2b_path, tiny_5b_path):
    """A private copy of each tiny model (the shared ``tiny_models`` must never hold inference tensors)."""
    return {"2b": load_cogvideox(tiny_2b_path, dtype="fp32"), "5b": load_cogvideox(tiny_5b_path, dtype="fp32")}


def test_the_move_reproduces_the_gpu_failure(fresh_models):
    transformer = moved_under_inference_mode(fresh_models["5b"].transformer)
    assert inference_tensor_count(transformer) == len([*transformer.parameters(), *transformer.buffers()])
    x = torch.randn(2, transformer.config.num_attention_heads * transformer.config.attention_head_dim,
                    requires_grad=True)
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        transformer.transformer_blocks[0].ff(x).sum().backward()


def test_replace_inference_tensors_keeps_values_parameters_and_flags(fresh_models):
    transformer = fresh_models["2b"].transformer
    params = dict(transformer.named_parameters())
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    untouched = replace_inference_tensors(transformer)
    moved_under_inference_mode(transformer)
    with torch.inference_mode():  # as a node calls it
        replaced = replace_inference_tensors(transformer)
    assert untouched == 0
    assert replaced == len([*transformer.parameters(), *transformer.buffers()]) > 0
    assert inference_tensor_count(transformer) == 0
    assert all(params[k] is p and not p.requires_grad for k, p in transformer.named_parameters())
    assert all(torch.equal(before[k], v) for k, v in transformer.state_dict().items())
    ptrs = [t.data_ptr() for t in transformer.parameters()]
    assert replace_inference_tensors(transformer) == 0
    assert [t.data_ptr() for t in transformer.parameters()] == ptrs  # normal tensors are not copied again


@pytest.mark.parametrize("family,mode,loss", [
    ("5b", "latent", "amf"), ("5b", "rope", "amf"), ("2b", "latent", "amf"), ("2b", "posemb", "amf"),
    ("5b", "latent", "moft"), ("2b", "latent", "smm"),
])
def test_guidance_with_moved_weights_under_inference_mode_equals_the_normal_run(
    tiny_models, fresh_models, grid, family, mode, loss
):
    frames, h, w = grid
    latents = torch.randn(1, frames, 16, 2 * h, 2 * w, generator=torch.Generator().manual_seed(1))
    config = GuidanceConfig(mode=mode, loss=loss, **FAST)

    def extract_then_sample(model):  # the Extract AMF → Guided Sampler order, as nodes run it
        with torch.inference_mode():
            reference = extract_reference(model, latents, [1], loss=loss)
            return sample(model, encode_prompt(model, "a dog"), config, reference=reference, seed=3)

    expected = extract_then_sample(tiny_models[family])
    model = fresh_models[family]
    moved_under_inference_mode(model.transformer)
    result = extract_then_sample(model)
    assert inference_tensor_count(model.transformer) == 0
    assert all(step[-1] < step[0] for step in result.losses)
    assert result.losses == expected.losses
    assert torch.equal(result.latents, expected.latents)


@pytest.mark.parametrize("variant,mode", [("5b-i2v", "latent"), ("1.5-i2v", "rope")])
def test_image_to_video_guidance_with_moved_transformer_and_vae_equals_the_normal_run(tiny_path, variant, mode):
    """I2V as a node runs it on a GPU: transformer and VAE moved under inference mode, the start image an inference
    tensor (ComfyUI's IMAGE), the start latents encoded inside the run; the result is the normal run's."""
    latents = torch.randn(1, 3, 16, 8, 12, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        image = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(2)) * 2 - 1
    config = GuidanceConfig(mode=mode, **FAST)

    def extract_then_sample(model):
        with torch.inference_mode():
            reference = extract_reference(model, latents, [1])
            return sample(model, encode_prompt(model, "a dog"), config, reference=reference, seed=3, image=image)

    expected = extract_then_sample(load_cogvideox(tiny_path(variant), dtype="fp32"))
    model = load_cogvideox(tiny_path(variant), dtype="fp32")
    moved_under_inference_mode(model.transformer)
    moved_under_inference_mode(model.vae)
    result = extract_then_sample(model)
    assert inference_tensor_count(model.transformer) == 0  # repaired by the sampler; the VAE needs no gradient
    assert all(step[-1] < step[0] for step in result.losses)
    assert result.losses == expected.losses and torch.equal(result.latents, expected.latents)
