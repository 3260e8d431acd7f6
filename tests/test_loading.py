# SPDX-License-Identifier: Apache-2.0
"""Loading CogVideoX folders and the tiny random model that stands in for the real weights in tests.

Tiny sizes (``ditflow.testing.tiny_model``): 4 blocks × 2 heads × head_dim 16, 16 text tokens, 16 latent
channels; 9 frames at 64×96 px → latent [3, 16, 8, 12] → 3 frames × 4×6 patches = 72 video tokens.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ditflow.errors import DiTFlowError
from ditflow.backbones.cogvideox.loading import load_cogvideox, parse_dtype
from ditflow.backbones.cogvideox.model import CogVideoX
from ditflow.backbones.cogvideox.variants import detect_variant

PROMPT = "a leopard running up a snowy hill"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def paths(tiny_2b_path, tiny_5b_path) -> dict[str, Path]:
    return {"2b": tiny_2b_path, "5b": tiny_5b_path}


@pytest.fixture(scope="module")
def loaded(paths) -> dict[str, CogVideoX]:
    """Both tiny families in fp32 (bf16 matmuls are slow on CPU)."""
    return {family: load_cogvideox(path, dtype="fp32") for family, path in paths.items()}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_transformer_config(folder: Path, **changes) -> None:
    cfg_path = folder / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(changes)
    cfg_path.write_text(json.dumps(cfg))


def _inputs(model: CogVideoX, seed: int = 0):
    """Latents [1, 3, 16, 8, 12] (9 frames at 64×96 px), text [1, 16, 32], timestep, RoPE tables on 5b."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    g = torch.Generator().manual_seed(seed)
    cfg = model.transformer_config
    latents = torch.randn(1, 3, cfg["in_channels"], 8, 12, generator=g)
    text = torch.randn(1, model.text_tokens, cfg["text_embed_dim"], generator=g)
    rope = None
    if model.variant == "5b":  # 4×6 patch grid, 3 latent frames, the sample grid's full crop
        rope = get_3d_rotary_pos_embed(model.head_dim, ((0, 0), (4, 6)), (4, 6), 3)
    return latents, text, torch.tensor([500]), rope


def _forward(model: CogVideoX, latents, text, t, rope):
    return model.transformer(latents, text, t, image_rotary_emb=rope, return_dict=False)[0]


# ---------------------------------------------------------------------------------------------------------------
# The tiny model folder
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["2b", "5b"])
def test_tiny_folder_has_the_real_repository_layout(paths, family):
    root = paths[family]
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "CogVideoXPipeline"
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert index[sub][1] and (root / sub).is_dir()
    for sub in ("transformer", "vae", "text_encoder"):
        assert list((root / sub).glob("*.safetensors")) and not list((root / sub).glob("*.bin"))
    # As THUDM/CogVideoX-*: a SentencePiece model and no tokenizer.json.
    assert (root / "tokenizer" / "spiece.model").is_file()
    assert not (root / "tokenizer" / "tokenizer.json").exists()


def test_tiny_build_is_deterministic_by_seed(tmp_path):
    from ditflow.testing.tiny_model import build_tiny_model

    def weights(folder: Path) -> dict[str, bytes]:
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))}

    a = weights(build_tiny_model(tmp_path / "a", "5b", num_layers=1, seed=3))
    b = weights(build_tiny_model(tmp_path / "b", "5b", num_layers=1, seed=3))
    c = weights(build_tiny_model(tmp_path / "c", "5b", num_layers=1, seed=4))
    assert a == b
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a)


def test_tiny_builder_rejects_unknown_variant(tmp_path):
    from ditflow.testing.tiny_model import build_tiny_model

    with pytest.raises(DiTFlowError, match="variant"):
        build_tiny_model(tmp_path / "x", "5b-I2V")


@pytest.mark.parametrize("variant", ["2b", "1.5-i2v"])  # the others: the same builder (tiny_path fixture)
def test_cli_writes_a_folder_that_loads(tmp_path, variant):
    out = tmp_path / f"cli-{variant}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "ditflow.testing.tiny_model", str(out), "--variant", variant, "--num-layers", "2"],
        check=False, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "RuntimeWarning" not in result.stderr  # no double import of the -m module
    model = load_cogvideox(out, dtype="fp32")
    assert model.variant == variant and model.num_blocks == 2


def test_tokenizer_reloads_its_sentencepiece_model(tiny_5b_path):
    """transformers 5.x trap (method.md §7): a vocab that did not load makes every word <unk>."""
    from transformers import AutoTokenizer, T5Tokenizer

    for cls in (T5Tokenizer, AutoTokenizer):
        tokenizer = cls.from_pretrained(tiny_5b_path / "tokenizer")
        ids = tokenizer(PROMPT).input_ids
        assert ids[-1] == tokenizer.eos_token_id == 1
        words = ids[:-1]
        assert len(words) >= 7  # at least one piece per word
        assert words.count(tokenizer.unk_token_id) == 0
        assert tokenizer.convert_tokens_to_string(tokenizer.convert_ids_to_tokens(words)) == PROMPT
        padded = tokenizer(PROMPT, padding="max_length", max_length=32, truncation=True).input_ids
        assert len(padded) == 32 and padded[len(ids):] == [tokenizer.pad_token_id] * (32 - len(ids))
        assert "<extra_id_99>" in tokenizer.get_vocab()


def test_text_encoder_vocabulary_covers_the_tokenizer(loaded):
    model = loaded["5b"]
    assert model.text_encoder.config.vocab_size == len(model.tokenizer)
    assert model.text_encoder.config.d_model == model.transformer_config["text_embed_dim"]


@pytest.mark.parametrize("family", ["2b", "5b"])
def test_tiny_transformer_output_depends_on_its_inputs(loaded, family):
    model = loaded[family]
    latents, text, t, rope = _inputs(model)
    with torch.no_grad():
        out = _forward(model, latents, text, t, rope)
        assert out.shape == latents.shape and out.std() > 0.1
        for changed in (
            _forward(model, latents + 0.1 * torch.randn_like(latents), text, t, rope),
            _forward(model, latents, torch.zeros_like(text), t, rope),
            _forward(model, latents, text, torch.tensor([100]), rope),
        ):
            assert (changed - out).abs().mean() > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# load_cogvideox
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,rope,scale", [("2b", False, 1.15258426), ("5b", True, 0.7)])
def test_both_families_load_and_are_detected(loaded, family, rope, scale):
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
    from transformers import T5EncoderModel

    model = loaded[family]
    assert model.variant == family
    assert model.transformer.config.use_rotary_positional_embeddings is rope
    assert isinstance(model.transformer, CogVideoXTransformer3DModel)
    assert isinstance(model.vae, AutoencoderKLCogVideoX)
    assert isinstance(model.text_encoder, T5EncoderModel)
    assert (model.num_blocks, model.num_heads, model.head_dim, model.patch_size) == (4, 2, 16, 2)
    assert model.text_tokens == 16  # read from the config, not the real models' 226
    assert model.vae_scaling_factor == pytest.approx(scale)
    for module in (model.transformer, model.vae, model.text_encoder):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())


@pytest.mark.parametrize(
    "family,cls,shift", [("2b", "CogVideoXDDIMScheduler", 3.0), ("5b", "CogVideoXDPMScheduler", 1.0)]
)
def test_make_scheduler_gives_a_fresh_trailing_scheduler(loaded, family, cls, shift):
    model = loaded[family]
    a, b = model.make_scheduler(), model.make_scheduler()
    assert type(a).__name__ == cls and a is not b
    assert a.config.timestep_spacing == "trailing"
    assert a.config.prediction_type == "v_prediction" and a.config.rescale_betas_zero_snr
    assert a.config.snr_shift_scale == shift
    a.set_timesteps(2)
    assert a.timesteps.tolist() == [999, 499]


@pytest.mark.parametrize(
    "dtype,expected", [("fp32", torch.float32), ("bf16", torch.bfloat16), (torch.float16, torch.float16)]
)
def test_dtype_is_applied_to_every_model(tiny_5b_path, dtype, expected):
    model = load_cogvideox(tiny_5b_path, dtype=dtype)
    assert model.dtype is expected
    for module in (model.transformer, model.vae, model.text_encoder):
        # transformers keeps T5's feed-forward output ("wo") in fp32 when loading fp16 (T5 overflows in fp16).
        kept = tuple(module._keep_in_fp32_modules or ()) if expected is torch.float16 else ()
        dtypes = {p.dtype for n, p in module.named_parameters() if not any(k in n.split(".") for k in kept)}
        assert dtypes == {expected}


def test_unknown_dtype_is_refused(tiny_5b_path):
    with pytest.raises(DiTFlowError, match="unknown dtype 'fp8'"):
        load_cogvideox(tiny_5b_path, dtype="fp8")
    with pytest.raises(DiTFlowError, match="unknown dtype"):
        parse_dtype(torch.int8)


def test_components_subset_and_vae_options(tiny_2b_path):
    model = load_cogvideox(tiny_2b_path, dtype="fp32", components=("vae",), vae_tiling=True, vae_slicing=True)
    assert model.transformer is None and model.text_encoder is None and model.tokenizer is None
    assert model.vae.use_tiling and model.vae.use_slicing
    assert model.num_blocks == 4 and model.variant == "2b"  # from the config alone
    with pytest.raises(DiTFlowError, match="unknown component"):
        load_cogvideox(tiny_2b_path, components=("unet",))


def test_loading_under_inference_mode_still_allows_backward(tiny_5b_path):
    """ComfyUI runs nodes under inference_mode; weights made there would make backward fail."""
    with torch.inference_mode():
        model = load_cogvideox(tiny_5b_path, dtype="fp32")
    for module in (model.transformer, model.vae, model.text_encoder):
        assert not any(p.is_inference() for p in module.parameters())
    latents, text, t, rope = _inputs(model)
    with torch.inference_mode(False), torch.enable_grad():
        latents = latents.clone().requires_grad_(True)
        _forward(model, latents, text, t, rope).square().mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["2b", "5b"])
def test_stock_diffusers_pipeline_runs_on_the_loaded_components(loaded, paths, family):
    """Proves the folder is a real diffusers CogVideoX: the stock pipeline samples 9 frames at 64×96 in 2 steps."""
    from diffusers import CogVideoXPipeline

    model = loaded[family]
    pipe = CogVideoXPipeline(
        tokenizer=model.tokenizer, text_encoder=model.text_encoder, vae=model.vae,
        transformer=model.transformer, scheduler=model.make_scheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(
        prompt=PROMPT, num_frames=9, height=64, width=96, num_inference_steps=2, guidance_scale=6.0,
        use_dynamic_cfg=family == "5b", max_sequence_length=model.text_tokens,
        generator=torch.Generator().manual_seed(0), output_type="pt",
    ).frames
    assert frames.shape == (1, 9, 3, 64, 96)
    assert torch.isfinite(frames).all() and frames.std() > 0

    stock = CogVideoXPipeline.from_pretrained(paths[family])
    assert stock.transformer.config.use_rotary_positional_embeddings is (family == "5b")


# ---------------------------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes,detected",
    [
        ({"in_channels": 20}, "in_channels=20"),  # neither text- nor image-to-video
        ({"patch_size_t": 3}, "patch_size_t=3"),
        ({"ofs_embed_dim": 512}, "ofs_embed_dim=512"),  # 1.5-I2V's offset embedding on a text-to-video 1.0 model
        ({"_class_name": "HunyuanVideoTransformer3DModel"}, "HunyuanVideoTransformer3DModel"),
    ],
)
def test_unsupported_variants_are_refused_before_weights_are_read(tiny_5b_path, tmp_path, changes, detected):
    folder = _copy(tiny_5b_path, tmp_path / "variant")
    _rewrite_transformer_config(folder, **changes)
    # Corrupt weights: a loader that read them first would fail with another error.
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    with pytest.raises(DiTFlowError, match="not supported") as err:
        load_cogvideox(folder)
    assert detected in str(err.value)


def test_detect_variant_on_the_real_configs():
    real_2b = {"_class_name": "CogVideoXTransformer3DModel", "in_channels": 16, "out_channels": 16,
               "num_layers": 30, "use_rotary_positional_embeddings": False}
    real_5b = {**real_2b, "num_layers": 42, "use_rotary_positional_embeddings": True,
               "use_learned_positional_embeddings": False}
    assert detect_variant(real_2b).key == "2b"
    assert detect_variant(real_5b).key == "5b"
    assert detect_variant({**real_5b, "in_channels": 32, "use_learned_positional_embeddings": True}).key == "5b-i2v"
    with pytest.raises(DiTFlowError, match="not supported"):  # a learned table on a text-to-video model
        detect_variant({**real_5b, "use_learned_positional_embeddings": True})


def test_missing_folder_is_explained(tmp_path):
    with pytest.raises(DiTFlowError, match="does not exist.*model_index.json"):
        load_cogvideox(tmp_path / "CogVideoX-5b")


def test_unreachable_hub_id_is_explained():
    # HF_HUB_OFFLINE=1 (conftest): the hub is never contacted (more in test_hub.py).
    with pytest.raises(DiTFlowError, match="no-such-model is not in the Hugging Face cache and HF_HUB_OFFLINE is set"):
        load_cogvideox("ditflow-tests/no-such-model")


@pytest.mark.parametrize("removed", ["vae", "tokenizer", "scheduler"])
def test_missing_subfolder_is_named(tiny_2b_path, tmp_path, removed):
    folder = _copy(tiny_2b_path, tmp_path / "partial")
    shutil.rmtree(folder / removed)
    with pytest.raises(DiTFlowError, match=f"{removed}/.*model_index.json.*transformer/ vae/ text_encoder/"):
        load_cogvideox(folder)


def test_component_subfolder_given_instead_of_the_model(tiny_2b_path):
    with pytest.raises(DiTFlowError, match="parent folder"):
        load_cogvideox(tiny_2b_path / "transformer")


def test_importing_ditflow_stays_cheap():
    code = (
        "import sys, ditflow, ditflow.backbones, ditflow.backbones.cogvideox.loading, ditflow.sampler, ditflow.testing;"
        "heavy = [m for m in ('diffusers', 'transformers') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_offloaded_components_visit_the_compute_device_only_inside_on_device(tiny_5b_path, monkeypatch):
    model = load_cogvideox(tiny_5b_path, dtype="fp32", device="cpu", offload=True)
    assert model.compute_device is None  # offload to the CPU from the CPU: nothing to do
    model.compute_device = "cuda:7"  # pretend a GPU; record the moves instead of making them
    moves = []
    for name in ("text_encoder", "transformer"):
        monkeypatch.setattr(getattr(model, name), "to", lambda device, name=name: moves.append((name, str(device))))
    with model.on_device("text_encoder"):
        assert moves == [("text_encoder", "cuda:7")]
    assert moves[-1] == ("text_encoder", "cpu")
    with pytest.raises(RuntimeError, match="boom"), model.on_device("transformer"):
        raise RuntimeError("boom")
    assert moves[-2:] == [("transformer", "cuda:7"), ("transformer", "cpu")]  # back on the CPU after an error


def test_vae_tiling_and_slicing_hold_for_one_call_and_are_restored(tiny_models, monkeypatch):
    """Encode Reference / Decode set them per call (no model reload), and leave the VAE as it was, also on error."""
    cog = tiny_models["5b"]
    vae = cog.vae
    seen = []
    for method in ("encode", "decode"):
        original = getattr(vae, method)
        monkeypatch.setattr(vae, method, lambda *a, _f=original, **k: seen.append((vae.use_tiling, vae.use_slicing))
                            or _f(*a, **k))
    before = (vae.use_tiling, vae.use_slicing)
    latents = cog.encode_video(torch.zeros(5, 3, 64, 96), tiling=True, slicing=True)
    cog.decode_latents(latents, tiling=False, slicing=True)
    cog.decode_latents(latents)  # None: as the VAE is set
    assert seen == [(True, True), (False, True), before] and (vae.use_tiling, vae.use_slicing) == before

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(vae, "encode", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        cog.encode_video(torch.zeros(5, 3, 64, 96), tiling=not before[0], slicing=not before[1])
    assert (vae.use_tiling, vae.use_slicing) == before
