# SPDX-License-Identifier: Apache-2.0
"""KV injection (DiTFlow §3, the "Injection" baseline; on in the authors' code), pinned pass by pass.

Every claim is read from the stock diffusers modules while the sampler runs (``pass_recorder``) and checked against
the stock model with stock hooks (``stock_oracle``), never against the sampler's own helpers:

- the reference pass noises z_ref to the current t with **the run's own initial noise**, at **that step's**
  timestep, with the **target prompt**, at **stock positions** (also after ρ has been optimised);
- it runs in **guided steps only**;
- the injected K/V reach **both CFG branches** of the denoising pass, and nothing else changes.

Sizes: the tiny models (``conftest``), 9 frames at 64×96 px → 3 latent frames × 4×6 patches; 4 steps, the first 2
guided, 2 Adam iterations each at the paper's lr.
"""

from __future__ import annotations

import pytest
import stock_oracle as oracle
import torch
from pass_recorder import record_passes, stock_video_tokens

from ditflow import GuidanceConfig
from ditflow.reference import extract_reference
from ditflow.sampler import sample
from ditflow.text import encode_prompt

STEPS = dict(num_inference_steps=4, guidance_fraction=0.5, opt_steps=2)  # lr: the paper's (GuidanceConfig)
GUIDED = 2
#: Ours and the hooked stock model run the same ops on the same shapes (equal bit for bit here); the margin allows
#: another BLAS. The smallest injection effect on the tiny models' prediction is 1e-4.
ATOL = 1e-6


@pytest.fixture(scope="module")
def references(tiny_models, grid):
    frames, h, w = grid
    latents = torch.randn(1, frames, 16, 2 * h, 2 * w, generator=torch.Generator().manual_seed(1))
    return {f: extract_reference(m, latents, [1]) for f, m in tiny_models.items()}


def _run(model, reference, mode, **overrides):
    text = encode_prompt(model, "a dog runs")
    with record_passes(model.transformer) as passes:
        sample(model, text, GuidanceConfig(mode=mode, **{**STEPS, **overrides}), reference=reference, seed=3)
    return text, passes


def _timesteps(model):
    scheduler = model.make_scheduler()
    scheduler.set_timesteps(STEPS["num_inference_steps"])
    return scheduler


@pytest.mark.parametrize("family,mode", [("2b", "latent"), ("2b", "posemb"), ("5b", "latent"), ("5b", "rope")])
def test_reference_pass_uses_the_runs_noise_the_step_timestep_the_target_prompt_and_stock_positions(
    tiny_models, references, grid, family, mode
):
    model, reference = tiny_models[family], references[family]
    text, passes = _run(model, reference, mode)
    kv = [p for p in passes if p.kind == "kv"]
    denoise = [p for p in passes if p.kind == "denoise"]
    scheduler = _timesteps(model)
    assert len(kv) == GUIDED and len(denoise) == STEPS["num_inference_steps"]  # guided steps only
    first = next(p for p in passes if p.kind in ("optimise", "denoise"))  # step 0, before any update: x_T
    noise = first.latents[:1] / scheduler.init_noise_sigma  # the run's own initial noise
    rope = oracle.stock_rope(model, grid)
    for i, p in enumerate(kv):
        t = scheduler.timesteps[i]
        assert p.timestep.tolist() == [int(t)] == denoise[i].timestep.tolist()[:1]
        assert torch.equal(p.latents, scheduler.add_noise(reference.latents, noise, t.reshape(1)))
        assert torch.equal(p.text, text.cond)  # target prompt, batch 1 (no CFG)
        assert p.record_kv_blocks == {0}
        if family == "2b":  # the sin-cos table actually added: the stock one, also after ρ was optimised
            assert torch.equal(p.video_tokens, stock_video_tokens(model.transformer, p.text, p.latents))
        else:
            assert p.controller_rope is None
            assert all(torch.equal(a, b) for a, b in zip(p.rope, rope))


@pytest.mark.parametrize("family", ["2b", "5b"])
def test_injected_kv_reach_both_cfg_branches_in_guided_steps_only(tiny_models, references, grid, family):
    model, reference = tiny_models[family], references[family]
    text, passes = _run(model, reference, "latent")
    denoise = [p for p in passes if p.kind == "denoise"]
    scheduler = _timesteps(model)
    first = next(p for p in passes if p.kind in ("optimise", "denoise"))
    noise = first.latents[:1] / scheduler.init_noise_sigma
    rope = oracle.stock_rope(model, grid)
    text_len = text.cond.shape[1]
    for i, p in enumerate(denoise):
        t = scheduler.timesteps[i]
        assert p.latents.shape[0] == 2 and torch.equal(p.text[1:], text.cond)  # batched CFG: [uncond; cond]
        with torch.no_grad():
            if i < GUIDED:
                z_ref = scheduler.add_noise(reference.latents, noise, t.reshape(1))
                k, v = oracle.record_kv(model, z_ref, text.cond, t, rope, block=0)
                with oracle.inject_kv(model, 0, k, v, text_len):
                    expected = oracle.forward(model, p.latents, p.text, t, rope)
                plain = oracle.forward(model, p.latents, p.text, t, rope)
                effect = (expected - plain).abs().amax(dim=(1, 2, 3, 4))
                assert (effect > 50 * ATOL).all()  # injection changes both branches (uncond, cond) measurably
            else:
                assert p.inject_kv == {}
                expected = oracle.forward(model, p.latents, p.text, t, rope)
        torch.testing.assert_close(p.output, expected, rtol=0, atol=ATOL)


def test_no_reference_pass_without_injection(tiny_models, references):
    _, passes = _run(tiny_models["5b"], references["5b"], "latent", kv_injection_blocks=())
    assert not [p for p in passes if p.kind == "kv"]
    assert all(p.inject_kv == {} for p in passes)
