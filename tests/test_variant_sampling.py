# SPDX-License-Identifier: Apache-2.0
"""DiTFlow on CogVideoX-5b-I2V, 1.5 and 1.5-I2V through the backbone interface (issue 12, item 3's list per variant).

Each variant's tiny model (``ditflow.testing.tiny_model``) against diffusers' own pipelines and the method's promises:
mode ``none`` bit-for-bit equal to ``CogVideoXImageToVideoPipeline`` / ``CogVideoXPipeline``; the DiTFlow processor
with an empty controller equal to the stock one; the guidance loss falling in modes latent and rope; a zero learning
rate reproducing the unguided output; embeddings of one variant refused by another in one sentence; and the App. D
known shift recovered through a real block of the variant with its own RoPE.

Sizes: 9 frames at 64×96 px → 3 latent frames of 8×12 → 4×6 patches; on 1.5 the 3 latent frames are padded to 4 (one
in front) → 2 token frames. 4 steps, the first 2 guided, guidance block 1 of the tiny models' 4.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch

from ditflow import DiTFlowError, GuidanceConfig
from ditflow.amf import attention_motion_flow
from ditflow.attention import AttentionController, StopForward
from ditflow.backbones.base import PositionKind
from ditflow.backbones.cogvideox.attention import DiTFlowAttnProcessor, controlled_attention
from ditflow.backbones.cogvideox.loading import load_cogvideox
from ditflow.reference import extract_reference
from ditflow.sampler import sample
from ditflow.text import encode_prompt

VARIANTS = ["5b-i2v", "1.5", "1.5-i2v"]
SIZE = (9, 64, 96)
FAST = dict(num_inference_steps=4, guidance_fraction=0.5, opt_steps=3, lr_start=0.05, lr_end=0.02)


@pytest.fixture(scope="module")
def models(tiny_path):
    return {v: load_cogvideox(tiny_path(v), dtype="fp32") for v in VARIANTS}


@pytest.fixture(scope="module")
def start_image():
    """A start frame in [0, 1] (what the pipelines take) at the video's size."""
    return torch.rand(3, SIZE[1], SIZE[2], generator=torch.Generator().manual_seed(5))


def _image(model, start_image):
    return start_image * 2 - 1 if model.needs_image else None


@pytest.fixture(scope="module")
def references(models):
    """Reference motion of random video latents (3 latent frames) at block 1, per variant."""
    latents = torch.randn(1, 3, 16, 8, 12, generator=torch.Generator().manual_seed(1))
    return {v: extract_reference(m, latents, [1]) for v, m in models.items()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_none_mode_matches_the_variants_diffusers_pipeline_bit_for_bit(models, start_image, variant):
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline

    model = models[variant]
    cfg = GuidanceConfig(mode="none", kv_injection_blocks=(), num_inference_steps=4)
    ours = sample(model, encode_prompt(model, "a bmx rider"), cfg, size=SIZE, seed=7,
                  image=_image(model, start_image))
    cls = CogVideoXImageToVideoPipeline if model.needs_image else CogVideoXPipeline
    pipe = cls(model.tokenizer, model.text_encoder, model.vae, model.transformer, model.make_scheduler())
    pipe.set_progress_bar_config(disable=True)
    resolved = cfg.resolved(model)
    extra = {"image": start_image} if model.needs_image else {}
    theirs = pipe(prompt="a bmx rider", negative_prompt="", num_frames=SIZE[0], height=SIZE[1], width=SIZE[2],
                  num_inference_steps=4, guidance_scale=resolved.guidance_scale, use_dynamic_cfg=resolved.dynamic_cfg,
                  generator=torch.Generator().manual_seed(7), output_type="latent",
                  max_sequence_length=model.text_tokens, **extra).frames
    geometry = model.geometry(*SIZE)
    assert theirs.shape[1] == geometry.latent_shape[0]  # the pipeline returns the padded latents (1.5: one in front)
    assert ours.latents.shape == (1, geometry.latent_frames, 16, 8, 12)
    assert torch.equal(ours.latents, model.unpad_latents(theirs, geometry).float())


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_processor_with_an_empty_controller_is_the_stock_one(models, start_image, variant):
    """The full transformer with the backbone's conditioning, stock vs DiTFlow's processors (and hooks) installed."""
    model = models[variant]
    geometry = model.geometry(*SIZE)
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(2, *geometry.latent_shape, generator=g)
    text = torch.randn(2, model.text_tokens, model.transformer.config.text_embed_dim, generator=g)
    start = model.encode_start(start_image * 2 - 1, g) if model.needs_image else None
    inputs = model.run_inputs(geometry, "cpu", start=start)
    t = torch.tensor(500)
    stock = model.predict(latents, text, t, inputs)
    with model.attention(AttentionController()):
        assert all(isinstance(b.attn1.processor, DiTFlowAttnProcessor) for b in model.transformer.transformer_blocks)
        ours = model.predict(latents, text, t, inputs)
    assert torch.equal(stock, ours)
    assert not any(isinstance(b.attn1.processor, DiTFlowAttnProcessor) for b in model.transformer.transformer_blocks)


@pytest.mark.parametrize("variant,mode", [(v, m) for v in VARIANTS for m in ("latent", "rope")])
def test_guidance_lowers_the_amf_loss_at_every_guided_step(models, references, start_image, variant, mode):
    model = models[variant]
    result = sample(model, encode_prompt(model, "a dog"), GuidanceConfig(mode=mode, **FAST),
                    reference=references[variant], seed=3, image=_image(model, start_image))
    assert len(result.losses) == 2
    for step_losses in result.losses:
        assert len(step_losses) == 3 and step_losses[-1] < step_losses[0]
    assert result.embeds.mode.value == mode  # ρ, or the z_t trajectory (issue 10 item 7), for zero-shot replay
    assert result.latents.shape == (1, 3, 16, 8, 12)  # the video's latent frames, padding removed


@pytest.mark.parametrize("variant,mode", [(v, m) for v in VARIANTS for m in ("latent", "rope")])
def test_a_zero_learning_rate_reproduces_the_unguided_output(models, references, start_image, variant, mode):
    model = models[variant]
    text = encode_prompt(model, "a dog")
    common = dict(FAST, lr_start=0.0, lr_end=0.0, kv_injection_blocks=())
    image = _image(model, start_image)
    guided = sample(model, text, GuidanceConfig(mode=mode, **common), reference=references[variant], seed=3,
                    image=image)
    plain = sample(model, text, GuidanceConfig(mode="none", **common), reference=references[variant], seed=3,
                   image=image)
    assert torch.equal(guided.latents, plain.latents)


def test_sincos_mode_is_refused_on_every_rope_variant_in_one_sentence(models, references):
    for variant, model in models.items():
        assert PositionKind.ROPE in model.position_kinds and PositionKind.SINCOS not in model.position_kinds
        with pytest.raises(DiTFlowError, match=f"mode 'posemb' optimises sin-cos table, but {model.name} has") as err:
            sample(model, encode_prompt(model, "a dog"), GuidanceConfig(mode="posemb", **FAST),
                   reference=references[variant], image=torch.zeros(3, 64, 96) if model.needs_image else None)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("source,target", [("5b-i2v", "1.5"), ("1.5", "1.5-i2v"), ("1.5-i2v", "5b-i2v")])
def test_embeddings_are_refused_across_variants_in_one_sentence(models, references, start_image, source, target):
    made = sample(models[source], encode_prompt(models[source], "a dog"), GuidanceConfig(mode="rope", **FAST),
                  reference=references[source], seed=3, image=_image(models[source], start_image))
    model = models[target]
    with pytest.raises(DiTFlowError, match=f"optimised with model {source}, but this run has {target}; use") as err:
        sample(model, encode_prompt(model, "a cat"), GuidanceConfig(mode="none", kv_injection_blocks=(), **{
            k: v for k, v in FAST.items() if k != "guidance_fraction"}), embeds=made.embeds,
            image=_image(model, start_image))
    assert "\n" not in str(err.value)


def test_a_start_image_is_required_by_i2v_refused_by_t2v_and_sized_to_the_video(models, start_image):
    cfg = GuidanceConfig(mode="none", kv_injection_blocks=(), num_inference_steps=2)
    i2v, t2v = models["1.5-i2v"], models["1.5"]
    with pytest.raises(DiTFlowError, match="generates from a start image; give one"):
        sample(i2v, encode_prompt(i2v, "a dog"), cfg, size=SIZE)
    with pytest.raises(DiTFlowError, match="is text-to-video and takes no start image"):
        sample(t2v, encode_prompt(t2v, "a dog"), cfg, size=SIZE, image=start_image)
    with pytest.raises(DiTFlowError, match="the start image is 32×96 px but the video is 64×96"):
        sample(i2v, encode_prompt(i2v, "a dog"), cfg, size=SIZE, image=start_image[:, :32])
    with pytest.raises(DiTFlowError, match="generates at 64×96 px only .* not 128×96"):  # 5b-I2V's learned table
        sample(models["5b-i2v"], encode_prompt(i2v, "a dog"), cfg, size=(9, 128, 96), image=torch.zeros(3, 128, 96))


# --- App. D: a known shift through a real block of each variant -------------------------------------------------


def _structured(block):
    """``block`` (a copy of the variant's own block 0) with identity modulation and one projection for Q and K, so
    that attention matches each patch to where its content went (the paper's App. D sanity check)."""
    block = copy.deepcopy(block)
    dim = block.attn1.to_q.weight.shape[0]
    torch.manual_seed(0)
    with torch.no_grad():
        block.norm1.linear.weight.zero_()
        block.norm1.linear.bias.zero_()
        proj = torch.linalg.qr(torch.randn(dim, dim))[0] * dim**0.5
        for lin in (block.attn1.to_q, block.attn1.to_k):
            lin.weight.copy_(proj)
            if lin.bias is not None:
                lin.bias.zero_()
    return block


def _shifted_tokens(grid, dim, dx, dy, seed=0):
    """Tokens ``[1, F·h·w, dim]``: token frame f shows frame 0 moved by (f·dx, f·dy) patches; fresh content enters."""
    frames, h, w = grid
    g = torch.Generator().manual_seed(seed)
    pad = frames * max(abs(dx), abs(dy))
    canvas = torch.randn(h + 2 * pad, w + 2 * pad, dim, generator=g)
    out = [canvas[pad - f * dy : pad - f * dy + h, pad - f * dx : pad - f * dx + w] for f in range(frames)]
    return torch.stack(out).reshape(1, frames * h * w, dim)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dx,dy", [(1, 0), (0, 1), (-1, 1)])
def test_hard_amf_through_a_real_block_of_the_variant_points_along_a_known_shift(models, variant, dx, dy):
    model = models[variant]
    grid = (4, 4, 6)  # 4 token frames of 4×6 patches (5b-I2V's fixed 64×96 px)
    geometry = model.geometry(*model.size_of_grid(grid))
    assert geometry.token_grid == grid
    reference = torch.zeros(1, geometry.latent_frames, 16, 8, 12)
    rope = model.stock_positions(model.run_inputs(geometry, "cpu", reference=reference), PositionKind.ROPE)
    block = _structured(model.transformer.transformer_blocks[0])
    dim = model.inner_dim
    controller = AttentionController(capture_blocks=frozenset({0}), stop_block=0)
    holder = types.SimpleNamespace(transformer_blocks=[block])
    temb = torch.zeros(1, model.transformer.config.time_embed_dim)
    with controlled_attention(holder, controller), torch.no_grad(), pytest.raises(StopForward):
        block(_shifted_tokens(grid, dim, dx, dy), torch.zeros(1, 4, dim), temb, (rope[0], rope[1]))
    q, k = controller.captured[0]
    frames, h, w = grid
    amf = attention_motion_flow(q[0], k[0], grid, hard=True).reshape(frames, frames, h, w, 2)
    cosines = []
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    for i in range(frames):
        for j in range(frames):
            if i != j:
                true = torch.tensor([(j - i) * dx, (j - i) * dy], dtype=torch.float32)
                inside = (xs + true[0] >= 0) & (xs + true[0] < w) & (ys + true[1] >= 0) & (ys + true[1] < h)
                vec = amf[i, j][inside]
                cosines.append((vec @ true) / (vec.norm(dim=-1) * true.norm()).clamp_min(1e-12))
    mean_cos = torch.cat(cosines).mean().item()
    print(f"{variant} shift ({dx}, {dy}): mean cosine {mean_cos:.3f}")
    assert mean_cos >= 0.9, f"{variant}: mean cosine {mean_cos:.3f} with the true direction ({dx}, {dy})"
