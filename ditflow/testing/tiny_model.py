# SPDX-License-Identifier: Apache-2.0
"""A tiny random CogVideoX in the exact diffusers folder layout of the ``THUDM/CogVideoX*`` repositories.

Tests need a model that loads through the same code path as the real weights but builds in a second on a CPU
and never touches the network. :func:`build_tiny_model` writes one::

    OUT/model_index.json            _class_name CogVideoXPipeline (CogVideoXImageToVideoPipeline for I2V)
    OUT/transformer/                CogVideoXTransformer3DModel   (config.json + safetensors)
    OUT/vae/                        AutoencoderKLCogVideoX        (config.json + safetensors)
    OUT/text_encoder/               T5EncoderModel                (config.json + safetensors)
    OUT/tokenizer/                  T5Tokenizer: spiece.model + tokenizer_config.json + special_tokens_map.json
    OUT/scheduler/                  CogVideoXDDIMScheduler        (scheduler_config.json)

Variants (the real configurations: ``THUDM/CogVideoX-2b``, ``-5b``, ``-5b-I2V``, ``CogVideoX1.5-5B``,
``CogVideoX1.5-5B-I2V``; :data:`VARIANTS`):

- ``2b``: 3D sin-cos positions added in the patch embedding; VAE scale 1.15258426; DDIM snr_shift 3; fp16 files.
- ``5b``: 3D RoPE on video Q/K; VAE scale 0.7; snr_shift 1; bf16 files.
- ``5b-i2v``: as 5b, plus 32 input channels (noise ‖ image latent) and a learned positional table that only exists
  for the sample grid (the real one: 60×90 latent px, i.e. 480×720 px only).
- ``1.5``: as 5b with a temporal patch of 2 (a token covers 2 latent frames; a linear patch projection without
  bias), "slice" RoPE bounded by the sample grid, and ``invert_scale_latents`` in the VAE config.
- ``1.5-i2v``: as 1.5, plus 32 input channels and the ofs embedding (``ofs_embed_dim`` = ``time_embed_dim``).

What is kept from the real models (method.md §1, §7), because our code must not depend on the real sizes:

- The structure: patch 2×2, 8× spatial VAE compression (4 down blocks), 4× temporal compression, 16 latent
  channels, ``[text; video]`` sequence, each variant's position scheme and conditioning inputs (above), the VAE
  scaling factors, the scheduler configs, the storage dtypes and ``sample_frames`` in *pixel* frames (49 on
  2b/5b on a latent 8×12 sample grid, the real one being 60×90; 81 on 1.5).
- A real SentencePiece ``spiece.model`` (T5Tokenizer with 100 extra ids), trained here on a few built-in sentences.
  ``save_pretrained`` under transformers 5.x writes only a ``tokenizer.json`` and no ``spiece.model``; the real
  repositories ship ``spiece.model`` and no ``tokenizer.json``, so this folder does the same and loading takes
  the same SentencePiece → converter path (needs ``sentencepiece`` and ``protobuf``, method.md §7).

What is tiny: 2 heads × head_dim 16 (inner 32; RoPE splits 16 into t/h/w = 4/6/6, as 64 into 16/24/24),
``num_layers`` blocks (default 4), ``max_text_seq_length`` 16 instead of 226 (code must read it from the config),
T5 d_model 32 with 2 layers, VAE channels (16, 16, 16, 16) with one layer per block
(encode + decode of the test clip ≈ 1.5 s on 2 CPU cores). Two sample sizes differ from the real ratio on purpose:
5b-i2v's learned table is built for the usual test clip (9 frames, 8×12 latent px; real: 49 frames, 60×90), so the
tests run through it as a real 49-frame 480×720 run does; 1.5's "slice" RoPE grid is 16×16 patches (real 150×150),
so a grid beyond it is cheap to test.

Sizes for the usual test clip: 9 frames at 64×96 px → latent [3, 16, 8, 12] → 3 frames × 4×6 patches = 72 video
tokens, plus 16 text tokens. On 1.5 the 3 latent frames are padded to 4 (one frame in front) → 2 token frames ×
4×6 patches = 48 video tokens.

Command line: ``python -m ditflow.testing.tiny_model OUT --variant 2b|5b|5b-i2v|1.5|1.5-i2v [--num-layers N]
[--seed S]``.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import torch

from ..errors import DiTFlowError

#: Variants the builder knows (see the module docstring); the keys of ``ditflow.backbones``' CogVideoX variants.
VARIANTS = ("2b", "5b", "5b-i2v", "1.5", "1.5-i2v")

# Per-variant differences that the real configs show (method.md §1; the 1.5 transformer and VAE flags from
# diffusers' conversion script and the published configs). "sample" is the transformer's sample grid in latent
# px and pixel frames; "i2v" doubles the input channels (noise ‖ image latent).
_BASE_5B = {"rope": True, "learned": False, "i2v": False, "patch_size_t": None, "ofs": False, "patch_bias": True,
            "sample": (8, 12, 49), "vae_scaling_factor": 0.7, "invert_scale_latents": False, "snr_shift_scale": 1.0,
            "dtype": "bfloat16"}
_VARIANT = {
    "2b": {**_BASE_5B, "rope": False, "vae_scaling_factor": 1.15258426, "snr_shift_scale": 3.0, "dtype": "half"},
    "5b": _BASE_5B,
    "5b-i2v": {**_BASE_5B, "learned": True, "i2v": True, "sample": (8, 12, 9)},
    "1.5": {**_BASE_5B, "patch_size_t": 2, "patch_bias": False, "sample": (32, 32, 81), "invert_scale_latents": True},
    "1.5-i2v": {**_BASE_5B, "patch_size_t": 2, "patch_bias": False, "sample": (32, 32, 81),
                "invert_scale_latents": True, "i2v": True, "ofs": True},
}

#: Tiny sizes (see the module docstring for what they stand for).
TEXT_DIM = 32  # T5 d_model = transformer text_embed_dim (real: 4096)
MAX_TEXT_SEQ_LENGTH = 16  # real: 226
LATENT_CHANNELS = 16  # as real
NUM_HEADS, HEAD_DIM = 2, 16  # real: 30×64 (2b), 48×64 (the 5B variants)
TIME_EMBED_DIM = 32  # real: 512 (1.5-I2V: ofs_embed_dim too)
EXTRA_IDS = 100  # as real
SPM_VOCAB_SIZE = 160  # real: 32,000 pieces (+100 extra ids)

# Prompt-like English text for the tokenizer: enough for words such as "a leopard running up a snowy hill" to
# split into known pieces. Written for this file.
_CORPUS = """\
a leopard running up a snowy hill in the morning light
a brown dog runs along the beach at sunset while waves roll in
the camera pans slowly across a busy city street at night
a man is walking through a quiet forest with tall green trees
two cats are playing with a ball of red yarn on a wooden floor
waves crash on the dark rocks while white birds fly over the sea
a small red car drives along a winding mountain road in the rain
a horse gallops across an open field under a cloudy sky
a woman rides a bicycle down a hill past old stone houses
a boat sails on a calm lake surrounded by snowy mountains
children are running and jumping in a sunny park
a train moves through a valley covered in fresh snow
a bird flaps its wings and lands on a thin branch
the leopard turns its head and walks into the tall grass
smoke rises slowly from a chimney on a cold winter day
a skier slides down a steep snowy slope and turns left
a fish swims between bright coral in clear blue water
a dancer spins on a stage under a warm yellow light
an astronaut floats slowly inside a white space station
a rabbit hops over a log and runs up the hill
"""


# ---------------------------------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------------------------------


def _train_spiece() -> bytes:
    """A unigram SentencePiece model with T5's special ids (pad 0, eos 1, unk 2, no bos); deterministic."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS.splitlines()),
        model_writer=buf,
        model_type="unigram",
        vocab_size=SPM_VOCAB_SIZE,
        hard_vocab_limit=False,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        num_threads=1,
        minloglevel=2,
    )
    return buf.getvalue()


def _write_tokenizer(folder: Path) -> int:
    """Writes the real repositories' tokenizer layout into ``folder``; returns the vocabulary size incl. extra ids."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(_train_spiece())
    extra = [f"<extra_id_{i}>" for i in range(EXTRA_IDS)]
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "additional_special_tokens": extra}
    config = {
        "tokenizer_class": "T5Tokenizer",
        "extra_ids": EXTRA_IDS,
        "legacy": True,
        "model_max_length": 226,  # as the real tokenizer_config.json; the pipeline passes max_length itself
        "clean_up_tokenization_spaces": True,
        "sp_model_kwargs": {},
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")

    # Load it back the way the real folder loads, to get the size and to fail here rather than in a test.
    from transformers import T5Tokenizer

    tokenizer = T5Tokenizer.from_pretrained(folder)
    if tokenizer.unk_token_id in tokenizer("a leopard running").input_ids:
        raise DiTFlowError("the tiny tokenizer did not load its spiece.model (every word is unknown).")
    return len(tokenizer)


def _reinit_(module: torch.nn.Module, std: float = 0.02) -> None:
    """Small random values for every parameter that is constant (all zeros or all equal), so no layer is inert."""
    for p in module.parameters():
        if p.numel() > 1 and torch.all(p == p.flatten()[0]):
            with torch.no_grad():
                p.add_(torch.randn_like(p) * std)


def _transformer(variant: str, num_layers: int):
    from diffusers import CogVideoXTransformer3DModel

    v = _VARIANT[variant]
    height, width, frames = v["sample"]
    model = CogVideoXTransformer3DModel(
        num_attention_heads=NUM_HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=2 * LATENT_CHANNELS if v["i2v"] else LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        time_embed_dim=TIME_EMBED_DIM,
        ofs_embed_dim=TIME_EMBED_DIM if v["ofs"] else None,
        text_embed_dim=TEXT_DIM,
        num_layers=num_layers,
        sample_width=width,
        sample_height=height,
        sample_frames=frames,
        patch_size=2,
        patch_size_t=v["patch_size_t"],
        patch_bias=v["patch_bias"],
        temporal_compression_ratio=4,
        max_text_seq_length=MAX_TEXT_SEQ_LENGTH,
        use_rotary_positional_embeddings=v["rope"],
        use_learned_positional_embeddings=v["learned"],
    )
    _reinit_(model)
    if v["learned"]:  # a learned table for the video tokens, not the sin-cos values diffusers starts it from
        with torch.no_grad():
            model.patch_embed.pos_embedding[:, MAX_TEXT_SEQ_LENGTH:].normal_(0.0, 0.5)
    return model


def _vae(variant: str):
    from diffusers import AutoencoderKLCogVideoX

    model = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 16, 16, 16),  # 4 blocks → 8× spatial, as real (128, 256, 256, 512)
        latent_channels=LATENT_CHANNELS,
        layers_per_block=1,
        norm_num_groups=4,
        temporal_compression_ratio=4,
        # The real 480×720: the VAE's sample size only sets its tiling threshold and tile offsets (240×360 tiles,
        # offsets 200/288 px). Tiles of a small sample size start off the 8-px grid and diffusers' tiled encode then
        # returns a wrong latent size (64×96 px → 9×12).
        sample_height=480,
        sample_width=720,
        scaling_factor=_VARIANT[variant]["vae_scaling_factor"],
        invert_scale_latents=_VARIANT[variant]["invert_scale_latents"],
    )
    _reinit_(model)
    return model


def _text_encoder(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=128,  # as T5 v1.1 (not stored in the weights)
        feed_forward_proj="gated-gelu",  # T5 v1.1, as T5-XXL
        tie_word_embeddings=False,
        dropout_rate=0.1,
        layer_norm_epsilon=1e-6,
        is_encoder_decoder=False,
        use_cache=False,
    )
    return T5EncoderModel(config)


def _scheduler_config(variant: str) -> dict:
    """``scheduler_config.json`` of the real repositories (CogVideoXDDIMScheduler in every variant)."""
    return {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "num_train_timesteps": 1000,
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True,
        "sample_max_value": 1.0,
        "set_alpha_to_one": True,
        "snr_shift_scale": _VARIANT[variant]["snr_shift_scale"],
        "steps_offset": 0,
        "timestep_spacing": "trailing",
        "trained_betas": None,
    }


# ---------------------------------------------------------------------------------------------------------------
# Public
# ---------------------------------------------------------------------------------------------------------------


def build_tiny_model(out_dir: str | Path, variant: str = "5b", *, num_layers: int = 4, seed: int = 0) -> Path:
    """Writes a tiny random CogVideoX-``variant`` in diffusers format to ``out_dir`` and returns its path.

    The same ``(variant, num_layers, seed)`` writes the same weights (the caller's global RNG is left as it was).
    Takes about a second on a CPU; nothing is downloaded.

    Args:
        out_dir: folder to create (may exist; files in it are overwritten).
        variant: one of :data:`VARIANTS` (the module docstring lists what each one is).
        num_layers: transformer blocks (real: 30 on 2b, 42 on the 5B variants).
        seed: seeds every random initialisation.
    Returns:
        ``Path(out_dir)``, a folder that ``ditflow.backbones.load_model`` and ``CogVideoXPipeline.from_pretrained``
        both load.
    Raises:
        DiTFlowError: unknown variant or ``num_layers`` < 1.
    """
    if variant not in VARIANTS:
        raise DiTFlowError(f"unknown tiny-model variant {variant!r}; choose one of {', '.join(VARIANTS)}.")
    if num_layers < 1:
        raise DiTFlowError(f"num_layers must be at least 1, got {num_layers}.")
    import diffusers
    from diffusers import CogVideoXDDIMScheduler
    from transformers.utils import logging as hf_logging

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    to_storage_dtype = _VARIANT[variant]["dtype"]  # nn.Module.half / .bfloat16: casts floating tensors only

    vocab_size = _write_tokenizer(out / "tokenizer")
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False):
        parts = {}
        for i, (name, make) in enumerate(
            (
                ("transformer", lambda: _transformer(variant, num_layers)),
                ("vae", lambda: _vae(variant)),
                ("text_encoder", lambda: _text_encoder(vocab_size)),
            )
        ):
            torch.manual_seed(seed * 1000 + i)  # one stream per component: changing one leaves the others
            parts[name] = make()
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # transformers' "Writing model shards" bar, restored below
        try:
            for name, model in parts.items():
                getattr(model, to_storage_dtype)().save_pretrained(out / name, safe_serialization=True)
        finally:
            if bars:
                hf_logging.enable_progress_bar()

    CogVideoXDDIMScheduler(**_scheduler_config(variant)).save_pretrained(out / "scheduler")

    index = {
        "_class_name": "CogVideoXImageToVideoPipeline" if _VARIANT[variant]["i2v"] else "CogVideoXPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "CogVideoXDDIMScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLCogVideoX"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


#: Single-file T5 weight formats of ComfyUI's ``models/text_encoders`` that :func:`write_t5_file` writes.
T5_FILE_WEIGHTS = ("fp16", "bf16", "fp8_e4m3fn", "fp8_e4m3fn_scaled")


def write_t5_file(text_encoder_dir: str | Path, out_file: str | Path, weights: str = "fp16", prefix: str = "") -> Path:
    """Writes a diffusers folder's ``text_encoder/`` as one safetensors file in ComfyUI's T5 layout.

    The keys are transformers' (``shared.weight``, ``encoder.block.{i}…``, ``encoder.final_layer_norm.weight``, no
    tied ``encoder.embed_tokens.weight``), optionally under ``prefix``. ``fp8_e4m3fn`` stores the linear layers'
    weights as float8 and the rest as fp16; ``fp8_e4m3fn_scaled`` also divides each by a per-layer float32
    ``scale_weight`` (max |w| / 448) and adds the ``scaled_fp8`` marker, as ComfyUI's scaled fp8 files do.
    """
    from safetensors.torch import load_file, save_file

    if weights not in T5_FILE_WEIGHTS:
        raise DiTFlowError(f"unknown T5 file weights {weights!r}; choose one of {', '.join(T5_FILE_WEIGHTS)}.")
    folder = Path(text_encoder_dir)
    state = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    state.pop("encoder.embed_tokens.weight", None)
    out = {}
    fp8, scaled = weights.startswith("fp8"), weights.endswith("_scaled")
    for name, tensor in state.items():
        tensor = tensor.float()
        is_linear = tensor.ndim == 2 and name != "shared.weight" and "relative_attention_bias" not in name
        if fp8 and is_linear:
            if scaled:
                scale = tensor.abs().max() / 448.0
                out[prefix + name.removesuffix(".weight") + ".scale_weight"] = scale.reshape(())
                tensor = tensor / scale
            out[prefix + name] = tensor.to(torch.float8_e4m3fn)
        else:
            out[prefix + name] = tensor.to(torch.bfloat16 if weights == "bf16" else torch.float16)
    if scaled:
        out[prefix + "scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(out_file))
    return out_file


def build_tiny_kijai_model(
    out_dir: str | Path, t5_file: str | Path, tokenizer_dir: str | Path, variant: str = "5b", *,
    t5_weights: str = "fp16", num_layers: int = 4, seed: int = 0,
) -> Path:
    """The tiny model in kijai's CogVideoXWrapper layout: ``out_dir/{transformer, vae, scheduler}/`` only, T5 as a
    single file ``t5_file`` (:func:`write_t5_file`) and its tokenizer folder at ``tokenizer_dir``. Same weights as
    :func:`build_tiny_model` with the same arguments. Returns ``Path(out_dir)``."""
    import shutil

    out = build_tiny_model(out_dir, variant, num_layers=num_layers, seed=seed)
    write_t5_file(out / "text_encoder", t5_file, t5_weights)
    if Path(tokenizer_dir).exists():
        shutil.rmtree(tokenizer_dir)
    shutil.move(str(out / "tokenizer"), str(tokenizer_dir))
    shutil.rmtree(out / "text_encoder")
    (out / "model_index.json").unlink()
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: ``python -m ditflow.testing.tiny_model OUT --variant 2b|5b|5b-i2v|1.5|1.5-i2v``."""
    parser = argparse.ArgumentParser(
        prog="python -m ditflow.testing.tiny_model",
        description="Write a tiny random CogVideoX (diffusers folder layout) for tests and demos.",
    )
    parser.add_argument("out", type=Path, help="folder to write")
    parser.add_argument("--variant", choices=VARIANTS, default="5b", help="2b: sin-cos positions; 5b: RoPE; 5b-i2v: RoPE + learned "
                        "positions, image latent on channels; 1.5: temporal patch 2, slice RoPE; 1.5-i2v: 1.5 with the "
                        "image latent and the ofs embedding (default 5b)")
    parser.add_argument("--num-layers", type=int, default=4, help="transformer blocks (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    args = parser.parse_args(argv)
    try:
        path = build_tiny_model(args.out, args.variant, num_layers=args.num_layers, seed=args.seed)
    except DiTFlowError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
