# SPDX-License-Identifier: Apache-2.0
"""Baseline losses (ditflow.losses): MOFT and SMM by hand on small tensors, the reference features, and the
guided sampler lowering them on the tiny models (sizes: tests/conftest.py ``grid``)."""

from __future__ import annotations

import math

import pytest
import torch

from ditflow import DiTFlowError, GuidanceConfig
from ditflow.attention import AttentionController
from ditflow.backbones.cogvideox.attention import controlled_attention
from ditflow.backbones.cogvideox.forward import CogVideoXInputs, forward_until
from ditflow.losses import (
    moft_channels,
    moft_loss,
    smm_loss,
    spatial_marginal_mean,
    video_features,
)
from ditflow.backbones.cogvideox.positions import rope_tables
from ditflow.reference import extract_reference
from ditflow.sampler import sample
from ditflow.text import encode_prompt

# 2 steps, both guided, 3 Adam iterations each; a large lr so that a random tiny model moves visibly.
FAST = dict(num_inference_steps=2, guidance_fraction=1.0, opt_steps=3, lr_start=0.05, lr_end=0.02)


def _frames(*vectors_per_frame) -> torch.Tensor:
    """[F, C, 1, P] from per frame a list of P channel vectors (one row of P positions)."""
    return torch.tensor(vectors_per_frame, dtype=torch.float32).permute(0, 2, 1).unsqueeze(2)


# --- MOFT ---------------------------------------------------------------------------------------------------------


def test_moft_value_by_hand_and_blind_to_static_content():
    # Reference, already centred over time: frame 0 has (1,0) at p0 and (0,1) at p1; frame 1 the negatives.
    ref = _frames([[1, 0], [0, 1]], [[-1, 0], [0, -1]])
    gen = _frames([[1, 1], [0, -1]], [[-1, -1], [0, 1]])
    # cos per (frame, position): 1/√2, −1 in both frames → mean (1/√2 − 1)/2 → loss 1 − that.
    expected = 1 - (1 / math.sqrt(2) - 1) / 2
    everything = torch.tensor([0, 1])
    assert moft_loss(gen, ref, everything).item() == pytest.approx(expected, abs=1e-6)
    # Content that does not change over time is removed by the centring.
    assert moft_loss(gen + 3.0, ref - 7.0, everything).item() == pytest.approx(expected, abs=1e-6)
    assert moft_loss(ref * 5, ref, everything).item() == pytest.approx(0.0, abs=1e-6)


def test_moft_keeps_the_reference_channels_that_carry_the_motion():
    g = torch.Generator().manual_seed(0)
    ref = 0.01 * torch.randn(5, 50, 3, 4, generator=g)  # 50 channels: 4 % = 2 motion channels
    wave = torch.linspace(-1, 1, 5)[:, None, None]
    ref[:, 7] += 3 * wave
    ref[:, 30] -= 2 * wave
    ref[:, 12] += 100.0  # large but constant over time: content, not motion
    assert moft_channels(ref).tolist() == [7, 30]
    assert moft_channels(ref, fraction=0.02).tolist() == [7, 30]  # never fewer than 2 (one channel has no gradient)
    # Only those channels count: noise elsewhere in the generated features changes nothing.
    noisy = ref.clone()
    noisy[:, [0, 1, 2, 12]] = torch.randn(5, 4, 3, 4, generator=g)
    assert moft_loss(noisy, ref).item() == pytest.approx(0.0, abs=1e-5)
    assert moft_loss(-ref, ref).item() == pytest.approx(2.0, abs=1e-5)  # reversed motion


# --- SMM ----------------------------------------------------------------------------------------------------------


def _smm_clip(means) -> torch.Tensor:
    """[F, 2, 1, 2]: two positions m ± (1, −1) per frame, so the spatial mean of each frame is ``means[f]``."""
    m = torch.tensor(means, dtype=torch.float32)
    spread = torch.tensor([1.0, -1.0])
    return torch.stack([m + spread, m - spread], dim=-1).unsqueeze(2)


def test_smm_value_by_hand():
    ref = _smm_clip([[0, 0], [1, 0], [1, 1]])
    gen = _smm_clip([[0, 0], [0, 1], [1, 1]])
    torch.testing.assert_close(spatial_marginal_mean(ref), torch.tensor([[0.0, 0], [1, 0], [1, 1]]))
    # Pairs (a, f): (0,1) (1,0)·(0,1) → 0; (0,2) (1,1)·(1,1) → 1; (1,2) (0,1)·(1,0) → 0; (f, a) the same.
    assert smm_loss(gen, ref).item() == pytest.approx(1 - 1 / 3, abs=1e-6)
    assert smm_loss(ref, ref).item() == pytest.approx(0.0, abs=1e-6)


def test_smm_anchors_each_video_on_itself():
    ref = _smm_clip([[0, 0], [1, 0], [1, 1], [3, -1]])
    # An offset and a scale of the generated means change no difference's direction: loss 0. (With the reference's
    # anchor, as in the authors' DiT port, the offset would leak into every difference.)
    shifted = 2.0 * ref + torch.tensor([5.0, -4.0])[None, :, None, None]
    assert smm_loss(shifted, ref).item() == pytest.approx(0.0, abs=1e-6)
    assert smm_loss(-ref, ref).item() == pytest.approx(2.0, abs=1e-6)  # every change reversed


def test_feature_losses_refuse_mismatched_or_single_frame_features():
    a = torch.randn(3, 4, 2, 2)
    with pytest.raises(DiTFlowError, match="one shape"):
        smm_loss(a, a[:2])
    with pytest.raises(DiTFlowError, match="at least 2"):
        moft_loss(a[:1], a[:1])


def test_video_features_follow_the_token_order():
    tokens = torch.arange(2 * 3 * 4).float()[:, None].repeat(1, 5)  # value = token index f·S + y·w + x
    feats = video_features(tokens[None], (2, 3, 4))
    assert feats.shape == (2, 5, 3, 4)
    assert feats[1, 0, 2, 3].item() == 1 * 12 + 2 * 4 + 3
    with pytest.raises(DiTFlowError, match="tokens"):
        video_features(tokens, (2, 3, 5))


# --- Reference features and the guided sampler ----------------------------------------------------------------------


def test_reference_features_are_the_stock_block_output_and_later_blocks_never_run(tiny_models, grid):
    model = tiny_models["5b"]
    transformer = model.transformer
    frames, h, w = grid
    latents = torch.randn(1, frames, 16, 2 * h, 2 * w, generator=torch.Generator().manual_seed(4))
    empty = encode_prompt(model, "").cond
    rope = rope_tables(transformer, grid)
    stock = {}
    hook = transformer.transformer_blocks[1].register_forward_hook(lambda m, a, out: stock.update({1: out[0]}))
    try:
        with torch.no_grad():
            transformer(hidden_states=latents, encoder_hidden_states=empty, timestep=torch.zeros(1, dtype=torch.long),
                        image_rotary_emb=rope, return_dict=False)
    finally:
        hook.remove()
    ref = extract_reference(model, latents, [1], loss="smm")
    assert ref.amf == {} and list(ref.features) == [1] and ref.blocks == (1,)
    torch.testing.assert_close(ref.features[1], video_features(stock[1], grid), rtol=0, atol=1e-6)

    ran = []
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: ran.append(i)) for i, b in enumerate(transformer.transformer_blocks)]
    try:
        controller = AttentionController(capture_outputs=frozenset({0, 1}))
        with controlled_attention(transformer, controller), torch.no_grad():
            forward_until(transformer, controller, latents, empty, torch.zeros(1, dtype=torch.long),
                          CogVideoXInputs(geometry=None, rope=rope))
    finally:
        for hk in hooks:
            hk.remove()
    assert ran == [0, 1] and sorted(controller.outputs) == [0, 1]


@pytest.fixture(scope="module")
def feature_references(tiny_models, grid):
    frames, h, w = grid
    latents = torch.randn(1, frames, 16, 2 * h, 2 * w, generator=torch.Generator().manual_seed(1))
    return {(f, loss): extract_reference(m, latents, [1, 2], loss=loss)
            for f, m in tiny_models.items() for loss in ("moft", "smm")}


@pytest.mark.parametrize("family,loss,mode", [("5b", "moft", "latent"), ("2b", "smm", "latent"), ("5b", "smm", "rope")])
def test_guidance_lowers_the_feature_loss_at_every_guided_step(tiny_models, feature_references, family, loss, mode):
    model = tiny_models[family]
    cfg = GuidanceConfig(mode=mode, loss=loss, **FAST)  # blocks {1, 2} from the reference: losses averaged
    result = sample(model, encode_prompt(model, "a dog"), cfg, reference=feature_references[(family, loss)], seed=3)
    assert len(result.losses) == 2
    for step_losses in result.losses:
        assert step_losses[-1] < step_losses[0]


def test_a_reference_for_another_loss_is_refused(tiny_models, feature_references):
    model = tiny_models["5b"]
    with pytest.raises(DiTFlowError, match="extract the reference with loss 'amf'"):
        sample(model, encode_prompt(model, "x"), GuidanceConfig(loss="amf", **FAST),
               reference=feature_references[("5b", "smm")])
    with pytest.raises(DiTFlowError, match="Unknown guidance loss"):
        GuidanceConfig(loss="mse")
