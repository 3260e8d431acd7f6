# SPDX-License-Identifier: Apache-2.0
"""The CogVideoX variants against diffusers' own pipelines: detection, tiny folders, latent layout and positions.

Tiny sizes (``ditflow.testing.tiny_model``): 9 frames at 64×96 px → 3 latent frames of 8×12 → 4×6 patches; on 1.5
the 3 latent frames are padded to 4 (one in front) → 2 token frames. 13 frames → 4 latent frames: no padding.
"""

from __future__ import annotations

import json

import pytest
import torch

from ditflow.backbones.cogvideox.layout import geometry, pad_latents, unpad_latents
from ditflow.backbones.cogvideox.positions import rope_tables
from ditflow.backbones.cogvideox.variants import VARIANTS, detect_variant
from ditflow.errors import DiTFlowError
from ditflow.testing.tiny_model import VARIANTS as TINY_VARIANTS

# transformer/config.json of the released models, the keys that tell them apart (cogvideox_variants table).
_COMMON = {"_class_name": "CogVideoXTransformer3DModel", "patch_size": 2, "temporal_compression_ratio": 4,
           "out_channels": 16, "num_layers": 42}
REAL = {
    "2b": {**_COMMON, "num_layers": 30, "in_channels": 16, "use_rotary_positional_embeddings": False},
    "5b": {**_COMMON, "in_channels": 16, "use_rotary_positional_embeddings": True},
    "5b-i2v": {**_COMMON, "in_channels": 32, "use_rotary_positional_embeddings": True,
               "use_learned_positional_embeddings": True},
    "1.5": {**_COMMON, "in_channels": 16, "patch_size_t": 2, "patch_bias": False,
            "use_rotary_positional_embeddings": True},
    "1.5-i2v": {**_COMMON, "in_channels": 32, "patch_size_t": 2, "patch_bias": False, "ofs_embed_dim": 512,
                "use_rotary_positional_embeddings": True},
}
ROPE_VARIANTS = ["5b", "5b-i2v", "1.5", "1.5-i2v"]


def test_every_variant_is_detected_from_its_real_config():
    assert {key: detect_variant(config).key for key, config in REAL.items()} == {k: k for k in REAL}
    assert set(VARIANTS) == set(REAL) == set(TINY_VARIANTS)


@pytest.mark.parametrize("changes,named", [
    ({"use_rotary_positional_embeddings": False, "in_channels": 32}, "in_channels=32"),  # sin-cos I2V: none exists
    ({"patch_size_t": 3}, "patch_size_t=3"),
    ({"ofs_embed_dim": 512}, "ofs_embed_dim=512"),  # ofs on a text-to-video model
    ({"in_channels": 20}, "in_channels=20"),
    ({"_class_name": "HunyuanVideoTransformer3DModel"}, "HunyuanVideoTransformer3DModel"),
])
def test_combinations_no_released_model_has_are_refused_in_one_sentence(changes, named):
    with pytest.raises(DiTFlowError, match="not supported") as err:
        detect_variant({**REAL["5b"], **changes})
    assert named in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("variant", ["5b-i2v", "1.5", "1.5-i2v"])
def test_tiny_folder_is_the_variants_diffusers_pipeline_and_runs(tiny_path, variant):
    """diffusers loads the tiny folder as the variant's pipeline and samples 9 frames at 64×96 px in 2 steps; the
    latents it denoises have the geometry's padded shape."""
    from diffusers import DiffusionPipeline

    root = tiny_path(variant)
    config = json.loads((root / "transformer" / "config.json").read_text())
    assert detect_variant(config).key == variant
    pipe = DiffusionPipeline.from_pretrained(root, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    i2v = VARIANTS[variant].image_to_video
    assert type(pipe).__name__ == ("CogVideoXImageToVideoPipeline" if i2v else "CogVideoXPipeline")
    extra = {"image": torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(0))} if i2v else {}
    latents = pipe(prompt="a dog runs", num_frames=9, height=64, width=96, num_inference_steps=2, guidance_scale=6.0,
                   max_sequence_length=config["max_text_seq_length"], generator=torch.Generator().manual_seed(0),
                   output_type="latent", **extra).frames
    g = geometry(config, 9, 64, 96, name=variant)
    assert latents.shape == (1, *g.latent_shape)
    assert torch.isfinite(latents).all() and latents.std() > 0


@pytest.mark.parametrize("variant", ROPE_VARIANTS)
@pytest.mark.parametrize("frames", [9, 13])
def test_rope_tables_equal_the_pipelines(tiny_path, variant, frames):
    """1.0's "linspace" and 1.5's "slice" RoPE, for the padded latent frames (9 frames on 1.5: 3 → 4 → 2 tokens)."""
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline, CogVideoXTransformer3DModel

    transformer = CogVideoXTransformer3DModel.from_pretrained(tiny_path(variant) / "transformer")
    cls = CogVideoXImageToVideoPipeline if VARIANTS[variant].image_to_video else CogVideoXPipeline
    pipe = cls(tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=None)
    g = geometry(dict(transformer.config), frames, 64, 96, name=variant)
    cos, sin = pipe._prepare_rotary_positional_embeddings(64, 96, g.latent_shape[0], torch.device("cpu"))
    ours = rope_tables(transformer, g.token_grid)
    assert torch.equal(ours[0], cos) and torch.equal(ours[1], sin)
    assert cos.shape == (g.num_tokens, transformer.config.attention_head_dim)


@pytest.mark.parametrize("variant,frames,pad,tokens", [
    ("5b", 9, 0, (3, 4, 6)), ("1.5", 9, 1, (2, 4, 6)), ("1.5", 13, 0, (2, 4, 6)), ("1.5-i2v", 17, 1, (3, 4, 6)),
])
def test_geometry_pads_1_5_in_front_and_counts_token_frames(tiny_path, variant, frames, pad, tokens):
    config = json.loads((tiny_path(variant) / "transformer" / "config.json").read_text())
    g = geometry(config, frames, 64, 96, name=variant)
    assert (g.pad_frames, g.token_grid) == (pad, tokens)
    latents = torch.randn(1, g.latent_frames, 16, 8, 12)
    padded = pad_latents(latents, g)
    assert padded.shape == (1, *g.latent_shape)
    assert torch.equal(padded[:, :pad], latents[:, :1].expand(-1, pad, -1, -1, -1))
    assert torch.equal(unpad_latents(padded, g), latents)


def test_the_1_5_native_size_is_44880_tokens():
    """768×1360, 81 frames: 21 latent frames, padded to 22 → 11 token frames × 48×85 patches (issue item 5)."""
    real = {**REAL["1.5"], "sample_height": 300, "sample_width": 300, "attention_head_dim": 64}
    g = geometry(real, 81, 768, 1360, name="CogVideoX1.5-5B")
    assert (g.latent_frames, g.pad_frames, g.token_grid, g.num_tokens) == (21, 1, (11, 48, 85), 44_880)


def test_sizes_a_variant_cannot_take_are_refused_before_any_compute(tiny_path):
    i2v = json.loads((tiny_path("5b-i2v") / "transformer" / "config.json").read_text())
    with pytest.raises(DiTFlowError, match=r"64×96 px only .* not 128×96; use height 64 and width 96"):
        geometry(i2v, 9, 128, 96, name="5b-i2v")
    v15 = json.loads((tiny_path("1.5") / "transformer" / "config.json").read_text())
    geometry(v15, 9, 256, 256, name="1.5")  # 16×16 patches: the tiny slice grid's edge
    with pytest.raises(DiTFlowError, match=r"256×256 px at most \(16×16 patches\), not 272×256"):
        geometry(v15, 9, 272, 256, name="1.5")
