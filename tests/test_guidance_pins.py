# SPDX-License-Identifier: Apache-2.0
"""The optimisation side of Alg. 1, pinned against the stock diffusers model (``stock_oracle``) and the naive
full-matrix AMF (``amf_reference``), never against the sampler's own helpers:

- each optimisation pass runs the **target prompt only** (batch 1, no CFG) at **the current step's t**;
- the gradient of one guided iteration (latent, rope, posemb; checkpointing on and off; a non-default block and τ)
  equals the one through the stock model and the naive AMF and Eq. 8, and so does the loss;
- ρ is warm-started across guided steps, reaches every block in both CFG branches, and is stock after the window;
- the loss falls at the paper's learning rate.

Sizes: tiny models (4 blocks × 2 heads × 16), 9 frames at 64×96 px → 3 latent frames × 4×6 patches = 72 tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import stock_oracle as oracle
import torch
from amf_reference import naive_amf_loss, naive_attention_motion_flow
from pass_recorder import record_passes

from ditflow import GuidanceConfig
from ditflow.reference import extract_reference
from ditflow.sampler import sample
from ditflow.text import encode_prompt

PROMPT = "a dog runs"
BLOCK, TAU = 2, 3.0  # not the tiny tests' usual block 1 nor the paper's τ = 2: a wrong one cannot pass


@pytest.fixture(scope="module")
def ref_latents(grid):
    frames, h, w = grid
    return torch.randn(1, frames, 16, 2 * h, 2 * w, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def references(tiny_models, ref_latents):
    return {f: extract_reference(m, ref_latents, [BLOCK], temperature=TAU) for f, m in tiny_models.items()}


class OptimiserSpy:
    """Replaces ``torch.optim.Adam``: records each optimiser's lr, its parameter's first value and every gradient."""

    def __init__(self, monkeypatch):
        self.made = []
        spy = self

        class Spy(torch.optim.Adam):
            def __init__(self, params, lr):
                params = list(params)
                spy.made.append({"lr": lr, "initial": params[0].detach().clone(), "grads": []})
                super().__init__(params, lr=lr)

            def step(self, closure=None):
                spy.made[-1]["grads"].append(self.param_groups[0]["params"][0].grad.detach().clone())
                return super().step(closure)

        monkeypatch.setattr(torch.optim, "Adam", Spy)


def _scheduler(model, steps):
    scheduler = model.make_scheduler()
    scheduler.set_timesteps(steps)
    return scheduler


# ---------------------------------------------------------------------------------------------------------------
# The optimisation pass
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,mode", [("2b", "posemb"), ("5b", "latent"), ("5b", "rope")])
def test_optimisation_passes_run_the_target_prompt_alone_at_the_current_timestep(tiny_models, references, family,
                                                                                  mode):
    model = tiny_models[family]
    text = encode_prompt(model, PROMPT, "blurry")
    cfg = GuidanceConfig(mode=mode, num_inference_steps=4, guidance_fraction=0.5, opt_steps=2)
    with record_passes(model.transformer) as passes:
        sample(model, text, cfg, reference=references[family], seed=3)
    optimise = [p for p in passes if p.kind == "optimise"]
    assert len(optimise) == 2 * 2
    timesteps = _scheduler(model, 4).timesteps
    for n, p in enumerate(optimise):
        assert p.latents.shape[0] == 1 and p.text.shape[0] == 1  # no CFG batch
        assert torch.equal(p.text, text.cond)  # the target prompt, not the negative one nor the empty one
        assert p.timestep.tolist() == [int(timesteps[n // 2])]  # the step's own t, every iteration


# ---------------------------------------------------------------------------------------------------------------
# Gradient oracle
# ---------------------------------------------------------------------------------------------------------------


def _stock_reference_amf(model, ref_latents, grid, blocks, soft=False):
    """Reference AMF per block through the stock model: timestep 0, the empty prompt, no CFG (§4.2)."""
    empty = encode_prompt(model, "").cond
    rope = oracle.stock_rope(model, grid)
    with contextlib.ExitStack() as stack, torch.no_grad():
        qk = {b: stack.enter_context(oracle.capture_qk(model, b, empty.shape[1], rope)) for b in blocks}
        oracle.forward(model, ref_latents, empty, 0, rope)
    return {b: naive_attention_motion_flow(qk[b]["q"][0], qk[b]["k"][0], grid, temperature=TAU, hard=not soft)
            for b in blocks}


def _oracle_loss(model, grid, cfg, param, x_t, t, text, ref_amf, kv):
    """Eq. 8 (mean over blocks) through the stock model at ``t`` with ``param`` optimised: the latent, RoPE
    [2, 2, n, d] or the 2B table."""
    rope = oracle.stock_rope(model, grid)
    text_len = text.shape[1]
    k_ref, v_ref = kv
    blocks = cfg.guidance_blocks
    if cfg.mode.value == "rope":
        cos_sin = (param[0, 0], param[0, 1]), (param[1, 0], param[1, 1])
        k_post = oracle._apply_rope(k_ref, rope)  # the reference K carries stock RoPE
        v_heads = v_ref.unflatten(-1, (model.num_heads, -1)).transpose(1, 2)
        make = lambda i: oracle.SeparateRopeProcessor(*cos_sin, record=i in blocks,  # noqa: E731
                                                      kv=(k_post, v_heads) if i == 0 else None)
        with oracle.processors(model, make) as procs:
            oracle.forward(model, x_t, text, t, rope)
        qk = {b: {"q": procs[b].q, "k": procs[b].k} for b in blocks}
    else:
        with contextlib.ExitStack() as stack:  # capture first: a guidance block 0 reads its own K, not the injected one
            qk = {b: stack.enter_context(oracle.capture_qk(model, b, text_len, rope)) for b in blocks}
            stack.enter_context(oracle.inject_kv(model, 0, k_ref, v_ref, text_len))
            if cfg.mode.value == "posemb":
                stack.enter_context(oracle.sincos_offset(model, param - oracle.stock_sincos(model, grid)))
            latents = param if cfg.mode.value == "latent" else x_t
            oracle.forward(model, latents.to(model.transformer.dtype), text, t, rope)
    losses = [naive_amf_loss(ref_amf[b], naive_attention_motion_flow(qk[b]["q"][0], qk[b]["k"][0], grid,
                                                                     temperature=TAU, hard=False),
                             masked=cfg.masked_loss) for b in blocks]
    return torch.stack(losses).mean()


CASES = [  # (family, mode, checkpointing, blocks, extra settings)
    *[(f, m, c, (BLOCK,), {}) for f, m in [("2b", "latent"), ("2b", "posemb"), ("5b", "latent"), ("5b", "rope")]
      for c in (True, False)],
    ("5b", "latent", True, (1, 3), {"masked_loss": False}),  # several blocks averaged; the unmasked ablation
    ("5b", "rope", True, (BLOCK,), {"soft_reference": True}),  # the soft reference ablation
    ("2b", "posemb", False, (0, BLOCK), {"soft_reference": True, "masked_loss": False}),
]


@pytest.mark.parametrize("family,mode,checkpointing,blocks,extra", CASES,
                         ids=[f"{f}-{m}-{'ckpt' if c else 'no-ckpt'}-{'+'.join(map(str, b))}-{'-'.join(e) or 'paper'}"
                              for f, m, c, b, e in CASES])
def test_guided_gradient_equals_the_stock_model_with_the_naive_amf(tiny_models, ref_latents, grid, monkeypatch,
                                                                   family, mode, checkpointing, blocks, extra):
    model = tiny_models[family]
    soft = extra.get("soft_reference", False)
    reference = extract_reference(model, ref_latents, blocks, temperature=TAU, soft=soft)
    ref_amf = _stock_reference_amf(model, ref_latents, grid, blocks, soft)
    for b in blocks:  # the reference pass too: t = 0, empty prompt, block, τ, hard or soft
        torch.testing.assert_close(reference.amf[b], ref_amf[b], rtol=0, atol=0 if not soft else 2e-6)

    spy = OptimiserSpy(monkeypatch)
    text = encode_prompt(model, PROMPT)
    cfg = GuidanceConfig(mode=mode, num_inference_steps=2, guidance_fraction=0.5, opt_steps=1, guidance_blocks=blocks,
                         temperature=TAU, gradient_checkpointing=checkpointing, **extra)
    with record_passes(model.transformer) as passes:
        result = sample(model, text, cfg, reference=reference, seed=3)
    x_t = next(p for p in passes if p.kind == "optimise").latents  # the run's z_T, before any update
    scheduler = _scheduler(model, 2)
    t = scheduler.timesteps[0]
    with torch.no_grad():  # KV injection (on by default): the stock model's K/V of the noised reference
        z_ref = scheduler.add_noise(ref_latents, x_t / scheduler.init_noise_sigma, t.reshape(1))
        kv = oracle.record_kv(model, z_ref, text.cond, t, oracle.stock_rope(model, grid), block=0)

    param = spy.made[0]["initial"].clone().requires_grad_(True)
    loss = _oracle_loss(model, grid, cfg, param, x_t, t, text.cond, ref_amf, kv)
    loss.backward()
    ours = spy.made[0]["grads"][0]
    assert ours.shape == param.shape and param.grad.abs().max() > 0
    assert result.losses[0][0] == pytest.approx(loss.item(), rel=1e-5)
    # fp32 round-off: streamed vs full-matrix AMF, truncated vs full forward, checkpointed recomputation.
    torch.testing.assert_close(ours, param.grad, rtol=1e-3, atol=1e-4 * float(param.grad.abs().max()))


@pytest.mark.parametrize("kind,name", [("adam", "Adam"), ("adamw", "AdamW"), ("sgd", "SGD")])
def test_each_optimiser_is_torchs_own_with_its_defaults(tiny_models, references, monkeypatch, kind, name):
    """Table 3c's optimisers, fresh per guided step at the scheduled lr with PyTorch's defaults; plain SGD moves z_t
    by exactly −lr·∇ (no momentum), which at the paper's lr is next to nothing."""
    made = []
    real = getattr(torch.optim, name)

    class Spy(real):
        def __init__(self, params, lr):
            made.append(lr)
            super().__init__(params, lr=lr)

        def step(self, closure=None):
            self.last = (self.param_groups[0]["params"][0].detach().clone(),
                         self.param_groups[0]["params"][0].grad.detach().clone())
            made.append(self.last)
            return super().step(closure)

    monkeypatch.setattr(torch.optim, name, Spy)
    model = tiny_models["5b"]
    cfg = GuidanceConfig(mode="latent", optimizer=kind, num_inference_steps=2, guidance_fraction=0.5, opt_steps=2)
    with record_passes(model.transformer) as passes:
        sample(model, encode_prompt(model, PROMPT), dataclasses.replace(cfg, temperature=TAU),
               reference=references["5b"], seed=3)
    assert made[0] == cfg.lr_start and len(made) == 3
    before, grad = made[1]
    after = [p for p in passes if p.kind == "optimise"][1].latents  # what the second iteration runs on
    if kind == "sgd":
        torch.testing.assert_close(after, before - cfg.lr_start * grad, rtol=0, atol=1e-7)
    else:  # Adam's first step is lr·∇/(|∇| + 10⁻⁸); AdamW first decays the weights by lr·0.01
        decayed = before * (1 - 0.01 * cfg.lr_start) if kind == "adamw" else before
        torch.testing.assert_close(after, decayed - cfg.lr_start * grad / (grad.abs() + 1e-8), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# ρ: warm start, every block and both CFG branches, stock after the window
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,mode", [("5b", "rope"), ("2b", "posemb")])
def test_rho_is_warm_started_reaches_every_block_in_both_branches_and_is_stock_after_the_window(
    tiny_models, references, grid, monkeypatch, family, mode
):
    model = tiny_models[family]
    spy = OptimiserSpy(monkeypatch)
    text = encode_prompt(model, PROMPT, "blurry")
    cfg = GuidanceConfig(mode=mode, num_inference_steps=5, guidance_fraction=0.4, opt_steps=2, kv_injection_blocks=())
    with record_passes(model.transformer) as passes:
        result = sample(model, text, cfg, reference=references[family], seed=3)
    tables = result.embeds.tables
    assert len(tables) == len(spy.made) == 2

    # Warm start: guided step 0 from the stock positions, step k from step k − 1's result.
    rope = oracle.stock_rope(model, grid)
    stock = torch.stack([torch.stack(rope)] * 2) if family == "5b" else oracle.stock_sincos(model, grid)
    torch.testing.assert_close(spy.made[0]["initial"], stock, rtol=0, atol=1e-6)  # 2B: read back as a difference
    assert torch.equal(spy.made[1]["initial"], tables[0])
    assert not torch.equal(tables[1], tables[0])

    denoise = [p for p in passes if p.kind == "denoise"]
    for i, p in enumerate(denoise):
        assert p.latents.shape[0] == 2  # [uncond; cond]
        with torch.no_grad():
            if i < len(tables) and family == "5b":  # the step's ρ in all 4 blocks (before and after block 1)
                q, k = (tables[i][0, 0], tables[i][0, 1]), (tables[i][1, 0], tables[i][1, 1])
                with oracle.processors(model, lambda _: oracle.SeparateRopeProcessor(q, k)):
                    expected = oracle.forward(model, p.latents, p.text, p.timestep, rope)
            elif i < len(tables):  # the step's table, added once to both rows
                with oracle.sincos_offset(model, tables[i] - stock):
                    expected = oracle.forward(model, p.latents, p.text, p.timestep, rope)
            else:  # after the window: the stock model
                expected = oracle.forward(model, p.latents, p.text, p.timestep, rope)
            if i < len(tables):
                plain = oracle.forward(model, p.latents, p.text, p.timestep, rope)
                assert ((expected - plain).abs().amax(dim=(1, 2, 3, 4)) > 1e-5).all()  # ρ shows in both rows
        torch.testing.assert_close(p.output, expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# The loss falls at the paper's learning rate
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,mode", [("2b", "latent"), ("2b", "posemb"), ("5b", "latent"), ("5b", "rope")])
def test_the_loss_falls_at_the_papers_learning_rate(tiny_models, references, family, mode):
    model = tiny_models[family]
    cfg = GuidanceConfig(mode=mode, num_inference_steps=4, guidance_fraction=0.5, opt_steps=5)
    assert (cfg.lr_start, cfg.lr_end) == (2e-3, 1e-3)
    result = sample(model, encode_prompt(model, PROMPT), dataclasses.replace(cfg, temperature=TAU),
                    reference=references[family], seed=3)
    for step_losses in result.losses:
        assert all(b < a for a, b in zip(step_losses, step_losses[1:]))  # every Adam iteration lowers it
