# SPDX-License-Identifier: Apache-2.0
"""Memory policy (ditflow.memory): given free memory and sizes, which offload and checkpointing are chosen."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from ditflow import DiTFlowError, GuidanceConfig
from ditflow.memory import GB, MemoryEstimate, estimate_memory, module_bytes, plan_memory

from stubs import variant_model

#: CogVideoX-5b as measured on an H200 (bf16, 49 frames 480×720, guidance block 20): weights 11.1 / 9.5 / 0.4 GB.
WEIGHTS_5B = {"transformer": int(11.1 * GB), "text_encoder": int(9.5 * GB), "vae": int(0.4 * GB)}
CONFIG_5B = dict(num_attention_heads=48, attention_head_dim=64, num_layers=42)


def model_5b(**overrides):
    """What estimate_memory reads of a loaded CogVideoX-5b, without weights (they are counted from WEIGHTS_5B)."""
    return SimpleNamespace(transformer_config=CONFIG_5B, dtype=torch.bfloat16, text_tokens=226, patch_size=2,
                           transformer=None, text_encoder=None, vae=None, vae_config=None, **overrides)


def estimate_5b(mode="latent", block=20) -> MemoryEstimate:
    config = GuidanceConfig(mode=mode, guidance_blocks=(block,) if mode != "none" else ())
    estimate = estimate_memory(model_5b(), (13, 30, 45), config.resolved(variant_model("5b")))  # 49 frames, 480×720
    return dataclasses.replace(estimate, weights=WEIGHTS_5B)


def test_the_5b_estimate_reproduces_the_h200_measurements():
    # Peaks measured with the transformer (11.1 GB) and VAE (0.4 GB) resident: unguided 15.7, guided 17.5 with
    # checkpointing, 58.1 without (benchmarks/guidance_overhead.py --size 5b --device cuda --dtype bf16).
    e = estimate_5b()
    resident = (11.1 + 0.4) * GB
    assert resident + e.sampling == pytest.approx(15.7 * GB, rel=0.1)
    assert resident + e.guided_checkpointing == pytest.approx(17.5 * GB, rel=0.1)
    assert resident + e.guided_full == pytest.approx(58.1 * GB, rel=0.1)


@pytest.mark.parametrize("free_gb,offload,checkpointing", [
    (139, "none", False),  # H200: everything resident, the faster guided pass
    (48, "none", True),  # the networks fit together, the guided pass without checkpointing does not
    (24, "sequential", True),  # a 24 GB card: one network at a time, checkpointing on
    (12, "sequential", True),  # too small for anything: the smallest footprint, said so in the reasons
])
def test_auto_fits_the_card(free_gb, offload, checkpointing):
    plan = plan_memory(estimate_5b(), int(free_gb * GB))
    assert (plan.offload, plan.gradient_checkpointing) == (offload, checkpointing)
    assert plan.offload_reason and plan.checkpointing_reason
    if free_gb >= 24:
        assert plan.estimated_peak_bytes <= free_gb * GB


def test_a_24_gb_card_runs_the_5b_guided_pass_below_24_gb():
    plan = plan_memory(estimate_5b(), int(23.5 * GB))  # what a 24 GB card reports free
    assert plan.offload == "sequential" and plan.gradient_checkpointing
    assert plan.estimated_peak_bytes < 20 * GB  # ≈ 17.5 GB measured


def test_explicit_settings_are_followed_and_auto_adapts_to_them():
    e = estimate_5b()
    plan = plan_memory(e, int(24 * GB), offload="none")
    assert plan.offload == "none" and plan.offload_reason.startswith("as asked")
    assert plan.gradient_checkpointing  # auto, given everything resident
    plan = plan_memory(e, int(139 * GB), gradient_checkpointing="on")
    assert plan.gradient_checkpointing and plan.checkpointing_reason == "as asked" and plan.offload == "none"
    plan = plan_memory(e, int(30 * GB), gradient_checkpointing="off")
    assert not plan.gradient_checkpointing and plan.offload == "sequential"  # offload sized for the big pass
    plan = plan_memory(e, int(80 * GB), offload="sequential")
    assert plan.offload == "sequential" and not plan.gradient_checkpointing  # 11.1 + 47 GB fit in 80


def test_no_optimisation_needs_no_checkpointing_and_less_memory():
    plan = plan_memory(estimate_5b("none"), int(24 * GB))
    assert not plan.gradient_checkpointing and plan.checkpointing_reason == "no optimisation pass in this run"


def test_cpu_and_unknown_free_memory():
    plan = plan_memory(estimate_5b(), int(64 * GB), offload="sequential", on_cpu=True)
    assert plan.offload == "none" and "CPU" in plan.offload_reason
    assert plan.gradient_checkpointing  # 47 GB of activations do not fit in 64 GB beside 21 GB of weights
    plan = plan_memory(estimate_5b(), None)
    assert (plan.offload, plan.gradient_checkpointing) == ("sequential", True)
    assert "unknown" in plan.offload_reason and "unknown" in plan.checkpointing_reason


def test_unknown_settings_are_refused():
    with pytest.raises(DiTFlowError, match="offload must be one of auto, sequential, none, got 'always'"):
        plan_memory(estimate_5b(), None, offload="always")
    with pytest.raises(DiTFlowError, match="gradient checkpointing must be one of auto, on, off"):
        plan_memory(estimate_5b(), None, gradient_checkpointing=True)


def test_estimate_counts_the_loaded_weights_and_grows_with_the_block_and_the_grid(tiny_models):
    model = tiny_models["5b"]
    config = GuidanceConfig(mode="latent", guidance_blocks=(1,)).resolved(model)
    e = estimate_memory(model, (3, 4, 6), config)
    assert e.weights == {n: module_bytes(getattr(model, n)) for n in ("transformer", "text_encoder", "vae")}
    assert e.weights["transformer"] == sum(p.numel() * 4 for p in model.transformer.parameters()) + sum(
        b.numel() * b.element_size() for b in model.transformer.buffers())
    assert 0 < e.guided_checkpointing < e.guided_full
    deeper = estimate_memory(model, (3, 4, 6), dataclasses.replace(config, guidance_blocks=(3,)))
    longer, wider = estimate_memory(model, (13, 4, 6), config), estimate_memory(model, (3, 8, 12), config)
    assert deeper.guided_full > e.guided_full and longer.guided_full > e.guided_full
    assert longer.vae == e.vae < wider.vae  # the VAE works on a few frames at a time, whole frames untiled
    none = estimate_memory(model, (3, 4, 6), GuidanceConfig(mode="none").resolved(model))
    assert none.guided_full == none.guided_checkpointing == 0 and not none.optimises


def test_plan_sampling_sizes_the_transformer_phase_from_the_reference(tiny_models):
    from ditflow.memory import plan_sampling, transformer_workspaces
    from ditflow.reference import extract_reference

    model = tiny_models["5b"]
    latents = torch.randn(1, 3, 16, 8, 12, generator=torch.Generator().manual_seed(0))
    reference = extract_reference(model, latents, [2])  # 9 frames → 3 latent frames; 64×96 px → 4×6 patches
    sampling, checkpointed, full = transformer_workspaces(
        model, (3, 4, 6), GuidanceConfig(guidance_blocks=(2,)).resolved(model))
    roomy = plan_sampling(model, GuidanceConfig(), int(64 * GB), reference=reference)
    assert not roomy.gradient_checkpointing and roomy.workspace_bytes == full  # blocks 0..2 taken from the reference
    tight = plan_sampling(model, GuidanceConfig(), int(0.5 * GB), reference=reference)
    assert tight.gradient_checkpointing and tight.workspace_bytes == max(sampling, checkpointed)
    backbone = plan_sampling(model, GuidanceConfig(mode="none"), int(0.5 * GB), size=(9, 64, 96))
    assert not backbone.gradient_checkpointing and backbone.checkpointing_reason == "no optimisation pass in this run"
    with pytest.raises(DiTFlowError, match="token grid"):
        plan_sampling(model, GuidanceConfig(), int(64 * GB), reference=reference, size=(13, 64, 96))
