# SPDX-License-Identifier: Apache-2.0
"""Motion targets from flow fields (ditflow.motion_target): exact displacements for uniform flows, a naive reference
for a non-uniform one, and the guided sampler steering the tiny model's AMF toward a poked motion."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from ditflow import DiTFlowError, GuidanceConfig
from ditflow.motion_target import flow_to_patches, poke_reference, straight_line_amf
from ditflow.sampler import sample
from ditflow.text import encode_prompt


def naive_target(patch_flow: np.ndarray, frames: int) -> np.ndarray:
    """Δ_ij per patch by loops: (j − i)/(F − 1) · v, the endpoint clamped to the grid; ``[F², S, 2]``."""
    h, w, _ = patch_flow.shape
    out = np.zeros((frames * frames, h * w, 2))
    for i in range(frames):
        for j in range(frames):
            for y in range(h):
                for x in range(w):
                    dx, dy = (j - i) / (frames - 1) * patch_flow[y, x]
                    out[i * frames + j, y * w + x] = (min(max(x + dx, 0), w - 1) - x, min(max(y + dy, 0), h - 1) - y)
    return out


def naive_patches(flow_px: np.ndarray) -> np.ndarray:
    """Mean of each 16 × 16 px block of a flow at the generation's size, in patches (1 = 16 px)."""
    height, width, _ = flow_px.shape
    out = np.zeros((height // 16, width // 16, 2))
    for y in range(height // 16):
        for x in range(width // 16):
            out[y, x] = flow_px[16 * y : 16 * y + 16, 16 * x : 16 * x + 16].reshape(-1, 2).mean(axis=0) / 16
    return out


def uniform(height: int, width: int, dx: float, dy: float) -> torch.Tensor:
    flow = torch.empty(height, width, 2)
    flow[..., 0], flow[..., 1] = dx, dy
    return flow


def test_a_uniform_flow_gives_exactly_the_straight_line_displacements():
    # 17 frames → F = 5 token frames (quarters of the clip); 64×96 px → 4×6 patches; (24, −8) px = (1.5, −0.5) patches.
    target = poke_reference(uniform(64, 96, 24.0, -8.0), num_frames=17, height=64, width=96, blocks=[2])
    assert target.grid == (5, 4, 6) and target.latents is None and target.temperature == 2.0
    amf = target.amf[2]
    assert amf.shape == (25, 24, 2) and amf.dtype == torch.float32
    assert torch.equal(amf, torch.from_numpy(naive_target(np.full((4, 6, 2), (1.5, -0.5)), 5)).float())
    # where the endpoint stays on the grid it is the flow times (j − i)/4, both directions, nothing clamped
    grid = amf.view(5, 5, 4, 6, 2)
    assert torch.equal(grid[0, 4, 1:, :4], torch.tensor([1.5, -0.5]).expand(3, 4, 2))
    assert torch.equal(grid[3, 1, 1:3, 2:5], torch.tensor([-0.75, 0.25]).expand(2, 3, 2))
    assert torch.equal(grid[[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]], torch.zeros(5, 4, 6, 2))  # i = j: still
    # clamped at the grid's edges: the right column cannot move right, the top row cannot move up
    assert torch.equal(grid[0, 4, 2, 5], torch.tensor([0.0, -0.5])) and torch.equal(grid[0, 4, 0, 0], torch.tensor([1.5, 0.0]))


@pytest.mark.parametrize("source, fit, rows", [
    ((32, 48), "stretch", slice(0, 4)),  # resized ×2: (12, −4) px → (24, −8) px
    ((16, 96), "pad", slice(1, 3)),  # 48×96 px, centred: the padded rows are left free
    ((64, 192), "crop", slice(0, 4)),  # the centre 96 px
])
def test_each_fit_scales_the_vectors_as_the_frame(source, fit, rows):
    height, width = 64, 96
    factor = min(height / source[0], width / source[1]) if fit == "pad" else height / source[0]
    patches = flow_to_patches(uniform(*source, 24.0 / factor, -8.0 / factor), height, width, fit=fit)
    expected = torch.zeros(4, 6, 2)
    expected[rows] = torch.tensor([1.5, -0.5])
    torch.testing.assert_close(patches, expected, atol=1e-5, rtol=0)
    if fit == "pad":  # padding is excluded from the average, not counted as still pixels
        assert torch.equal(patches[0], torch.zeros(6, 2)) and torch.equal(patches[3], torch.zeros(6, 2))


def test_a_known_flow_round_trips_through_a_naive_reference():
    """A smooth non-uniform flow (rotation + shear) on a 30×40 px image, fitted by crop to 64×96 px, 9 frames:
    matches OpenCV's bilinear resize (an upscale, where antialiasing does nothing), block means and loops."""
    ys, xs = np.mgrid[0:30, 0:40].astype(np.float32) + 0.5
    flow = np.stack([-(ys - 15) * 0.4 + 0.1 * xs, (xs - 20) * 0.3], axis=-1).astype(np.float32)
    target = poke_reference(torch.from_numpy(flow), num_frames=9, height=64, width=96, blocks=[0], fit="crop")
    scale = 96 / 40  # cover: max(64/30, 96/40); resized to 72×96 and centre-cropped to rows 4..67
    resized = cv2.resize(flow, (96, 72), interpolation=cv2.INTER_LINEAR) * scale
    expected = naive_target(naive_patches(resized[4:68]), 3)
    torch.testing.assert_close(target.amf[0], torch.from_numpy(expected).float(), atol=2e-5, rtol=0)


def test_a_patchwise_flow_comes_back_from_the_first_to_last_frame_pair():
    v = torch.rand(4, 6, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1  # patches, in [−1, 1]
    flow = v.repeat_interleave(16, dim=0).repeat_interleave(16, dim=1) * 16  # constant on each 16×16 px block
    amf = poke_reference(flow, num_frames=13, height=64, width=96, blocks=[1]).amf[1].view(4, 4, 4, 6, 2)
    ys, xs = torch.meshgrid(torch.arange(4.0), torch.arange(6.0), indexing="ij")
    end = torch.stack((xs, ys), -1) + v
    inside = (end >= 0).all(-1) & (end[..., 0] <= 5) & (end[..., 1] <= 3)
    assert inside.sum() >= 12
    torch.testing.assert_close(amf[0, 3][inside], v[inside], atol=1e-5, rtol=0)  # the whole clip: the flow
    torch.testing.assert_close(amf[1, 2][inside], v[inside] / 3, atol=1e-5, rtol=0)  # a third of it


def test_scale_and_min_motion():
    flow = uniform(64, 96, 0.0, 0.0)
    flow[:32, :48] = torch.tensor([8.0, 0.0])  # the top-left quarter moves 8 px, the rest is still
    flow[32:, 48:] = torch.tensor([2.0, 0.0])  # the bottom-right quarter barely moves
    full = poke_reference(flow, num_frames=9, height=64, width=96, blocks=[1], scale=3.0).amf[1].view(3, 3, 4, 6, 2)
    assert torch.equal(full[0, 2, 0, 0], torch.tensor([1.5, 0.0])) and torch.equal(full[0, 2, 3, 3], torch.tensor([0.375, 0.0]))
    free = poke_reference(flow, num_frames=9, height=64, width=96, blocks=[1], scale=3.0, min_motion=10.0)
    assert torch.equal(free.amf[1].view(3, 3, 4, 6, 2)[:, :, 2:, 3:], torch.zeros(3, 3, 2, 3, 2))  # 6 px < 10: free
    assert torch.equal(free.amf[1].view(3, 3, 4, 6, 2)[0, 2, 0, 0], torch.tensor([1.5, 0.0]))


@pytest.mark.parametrize("flow, kwargs, message", [
    (torch.zeros(2, 64, 96, 2), {}, "batch of 2"),
    (torch.zeros(64, 96, 3), {}, r"must be \[H, W, 2\]"),
    (uniform(64, 96, float("nan"), 0.0), {}, "NaN or Inf"),
    (uniform(64, 96, 0.0, 0.0), {}, "still everywhere"),
    (uniform(64, 96, 4.0, 0.0), {"min_motion": 5.0}, "shorter than min_motion 5 px"),
    (uniform(64, 96, 4.0, 0.0), {"fit": "zoom"}, "unknown resize mode 'zoom'"),
    (uniform(64, 96, 4.0, 0.0), {"height": 60}, "height 60 px is not a positive multiple of 16"),
    (uniform(64, 96, 4.0, 0.0), {"num_frames": 10}, r"not of the form 4k\+1"),
    (uniform(64, 96, 4.0, 0.0), {"scale": -1.0}, "scale must be a finite number"),
    (uniform(64, 96, 4.0, 0.0), {"blocks": []}, "one or more guidance blocks"),
])
def test_bad_input_is_one_sentence(flow, kwargs, message):
    args = dict(num_frames=9, height=64, width=96, blocks=[1]) | kwargs
    with pytest.raises(DiTFlowError, match=message):
        poke_reference(flow, **args)


def test_straight_line_needs_two_frames():
    with pytest.raises(DiTFlowError, match="at least 2 token frames"):
        straight_line_amf(torch.zeros(4, 6, 2), 1)


# ---------------------------------------------------------------------------------------------------------------------
# The guided sampler driven by a target
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dx, dy", [(32.0, 0.0), (-32.0, 16.0)])
def test_the_sampler_steers_the_amf_toward_a_poked_motion(tiny_models, monkeypatch, dx, dy):
    """Tiny random CogVideoX-5b, 9 frames at 64×96 px, guided at block 1 toward a uniform motion of (dx, dy) px over
    the clip: within the guided step the loss falls, and the AMF of the optimised latent turns from an unrelated
    direction (cosine ≈ 0.2 with the target) to the target's (measured ≈ 0.77; mean displacement first → last frame
    with the target's signs)."""
    import ditflow.objectives as objectives
    import ditflow.sampler as sampler

    target = poke_reference(uniform(64, 96, dx, dy), num_frames=9, height=64, width=96, blocks=[1])
    seen = []
    real = objectives.attention_motion_flow  # the AMF objective's (ditflow.objectives), read by the sampler

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(objectives, "attention_motion_flow", spy)
    model = tiny_models["5b"]
    cfg = GuidanceConfig(mode="latent", num_inference_steps=2, guidance_fraction=0.5, opt_steps=6, lr_start=0.2,
                         lr_end=0.2)  # kv injection on (the default): skipped, the target has no latents
    result = sampler.sample(model, encode_prompt(model, "a dog"), cfg, reference=target, seed=3)
    (losses,) = result.losses
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.3 * losses[0]

    reference = target.amf[1]
    moving = reference.ne(0).any(-1)

    def agreement(amf):
        return torch.nn.functional.cosine_similarity(amf[moving], reference[moving], dim=-1).mean().item()

    first, last = seen[0].detach(), seen[-1].detach()
    assert agreement(first) < 0.4 and agreement(last) > 0.6
    forward = last.view(3, 3, 24, 2)[0, 2].mean(dim=0)  # token frame 0 → 2, mean over patches
    assert forward[0].sign() == np.sign(dx) and (dy == 0 or forward[1].sign() == np.sign(dy))


def test_no_reference_latents_means_no_kv_injection(tiny_models, caplog):
    model = tiny_models["5b"]
    target = poke_reference(uniform(64, 96, 32.0, 0.0), num_frames=9, height=64, width=96, blocks=[1])
    text = encode_prompt(model, "a dog")
    common = dict(mode="latent", num_inference_steps=2, guidance_fraction=0.5, opt_steps=1, lr_start=0.05, lr_end=0.05)
    on = sample(model, text, GuidanceConfig(kv_injection_blocks=(0,), **common), reference=target, seed=3)
    assert [r.message for r in caplog.records if r.name == "ditflow"] == [
        "KV injection is skipped: this motion target was made without a reference video, so there are no reference "
        "keys and values to inject; turn KV injection off to silence this."]
    caplog.clear()
    off = sample(model, text, GuidanceConfig(kv_injection_blocks=(), **common), reference=target, seed=3)
    assert torch.equal(on.latents, off.latents) and on.losses == off.losses
    assert not [r for r in caplog.records if r.name == "ditflow"]


@pytest.mark.parametrize("variant, token_frames", [("5b-i2v", 3), ("1.5-i2v", 2)])
def test_image_to_video_follows_a_target_on_the_models_token_grid(tiny_path, variant, token_frames):
    """I2V (the poked image as the start frame): 9 frames at 64×96 px; on 1.5 a token frame spans 2 latent frames,
    so the target built for the model has 2 token frames; without the model the 1.0 grid is refused in one sentence."""
    from ditflow.backbones.cogvideox.loading import load_cogvideox

    model = load_cogvideox(tiny_path(variant), dtype="fp32")
    target = poke_reference(uniform(64, 96, 32.0, -16.0), num_frames=9, height=64, width=96, blocks=[1], model=model)
    assert target.grid == (token_frames, 4, 6) and target.amf[1].shape == (token_frames**2, 24, 2)
    with pytest.raises(DiTFlowError, match="guidance block 4 is out of range"):
        poke_reference(uniform(64, 96, 32.0, 0.0), num_frames=9, height=64, width=96, blocks=[4], model=model)
    image = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(5)) * 2 - 1
    cfg = GuidanceConfig(mode="latent", num_inference_steps=4, guidance_fraction=0.5, opt_steps=3, lr_start=0.2,
                         lr_end=0.1)
    text = encode_prompt(model, "a dog")
    result = sample(model, text, cfg, reference=target, size=(9, 64, 96), seed=3, image=image)
    assert len(result.losses) == 2 and all(step[-1] < step[0] for step in result.losses)
    if token_frames == 2:
        plain = poke_reference(uniform(64, 96, 32.0, 0.0), num_frames=9, height=64, width=96, blocks=[1])
        with pytest.raises(DiTFlowError, match="token grid F×h×w = 3×4×6"):
            sample(model, text, cfg, reference=plain, size=(9, 64, 96), seed=3, image=image)
