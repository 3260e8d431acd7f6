# SPDX-License-Identifier: Apache-2.0
"""kijai's CogVideoXWrapper layout: ``models/CogVideo/<name>/{transformer, vae, scheduler}`` only, T5-XXL as one
safetensors file in ``models/text_encoders`` (ComfyUI's key layout; fp16, bf16, fp8, scaled fp8), the tokenizer from
elsewhere (ditflow.t5_file, ditflow.loading).

The tiny model's T5 (2 blocks, d_model 32, the vocabulary of its trained SentencePiece model) is written as such a file
by ``ditflow.testing.tiny_model.write_t5_file``; loading it must give the same encoder as the diffusers folder's.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from ditflow import DiTFlowError
from ditflow.backbones.cogvideox.loading import load_cogvideox
from ditflow.t5_file import load_t5_file
from ditflow.testing.tiny_model import build_tiny_kijai_model, write_t5_file
from ditflow.text import encode_prompt

PROMPT = "a leopard running up a snowy hill"
COMFY_HOME = Path(os.environ.get("COMFY_HOME", "/root/comfy"))
COMFY_T5_TOKENIZER = COMFY_HOME / "ComfyUI" / "comfy" / "text_encoders" / "t5_tokenizer"


@pytest.fixture(scope="module")
def reference_t5(tiny_5b_path):
    from transformers import T5EncoderModel

    return T5EncoderModel.from_pretrained(tiny_5b_path / "text_encoder", dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def comfy_models(tmp_path_factory):
    """A ComfyUI models folder: CogVideo/CogVideoX-5b in kijai's layout, text_encoders/t5xxl_bf16.safetensors, and
    the tokenizer beside it (ComfyUI keeps its own in comfy/text_encoders/t5_tokenizer)."""
    base = tmp_path_factory.mktemp("comfy") / "models"
    model = build_tiny_kijai_model(base / "CogVideo" / "CogVideoX-5b", base / "text_encoders" / "t5xxl_bf16.safetensors",
                                   base / "t5_tokenizer", "5b", t5_weights="bf16")
    return {"model": model, "t5": base / "text_encoders" / "t5xxl_bf16.safetensors", "tokenizer": base / "t5_tokenizer"}


def _ids(length: int = 16) -> torch.Tensor:
    return torch.arange(3, 3 + length).view(1, -1)


@pytest.mark.parametrize("prefix", ["", "text_encoders.t5xxl.transformer."])
@pytest.mark.parametrize("weights", ["bf16", "fp16"])
def test_a_single_file_t5_is_the_same_encoder(tiny_5b_path, reference_t5, tmp_path, weights, prefix):
    # The tiny T5 is stored in bf16, so both bf16 and fp16 hold its weights exactly (all |w| ≥ 2⁻¹⁴ or 0 here).
    file = write_t5_file(tiny_5b_path / "text_encoder", tmp_path / "t5.safetensors", weights, prefix)
    t5 = load_t5_file(file, torch.float32)
    assert (t5.config.num_layers, t5.config.d_model, t5.config.num_heads, t5.config.d_ff) == (2, 32, 4, 64)
    assert t5.config.vocab_size == reference_t5.config.vocab_size
    for name, tensor in reference_t5.state_dict().items():
        assert torch.equal(t5.state_dict()[name], tensor), name
    with torch.no_grad():
        assert torch.equal(t5(_ids())[0], reference_t5(_ids())[0])


@pytest.mark.parametrize("weights", ["fp8_e4m3fn", "fp8_e4m3fn_scaled"])
def test_an_fp8_t5_file_is_dequantised(tiny_5b_path, reference_t5, tmp_path, weights):
    file = write_t5_file(tiny_5b_path / "text_encoder", tmp_path / "t5.safetensors", weights)
    t5 = load_t5_file(file, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in t5.parameters())
    q = t5.state_dict()["encoder.block.1.layer.1.DenseReluDense.wo.weight"].float()
    ref = reference_t5.state_dict()["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    # e4m3 keeps 3 mantissa bits: relative error ≤ 2⁻⁴ for normal values; the scaled variant stays normal.
    assert (q - ref).abs().max() <= ref.abs().max() * 2**-4 + 2**-9
    with torch.no_grad():
        a, b = t5.float()(_ids())[0], reference_t5(_ids())[0]
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99


def test_fp16_keeps_the_feed_forward_output_in_fp32_as_transformers_does(tiny_5b_path, tmp_path):
    t5 = load_t5_file(write_t5_file(tiny_5b_path / "text_encoder", tmp_path / "t5.safetensors"), torch.float16)
    dtypes = {name: p.dtype for name, p in t5.named_parameters()}
    assert dtypes["encoder.block.0.layer.1.DenseReluDense.wo.weight"] == torch.float32
    assert dtypes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"] == torch.float16


def test_a_t5_file_loaded_under_inference_mode_has_normal_tensors(tiny_5b_path, tmp_path):
    file = write_t5_file(tiny_5b_path / "text_encoder", tmp_path / "t5.safetensors")
    with torch.inference_mode():
        t5 = load_t5_file(file, torch.float32)
    assert not any(p.is_inference() for p in t5.parameters())
    assert t5.encoder.embed_tokens.weight is t5.shared.weight or torch.equal(t5.encoder.embed_tokens.weight,
                                                                              t5.shared.weight)


def test_bad_t5_files_are_refused_in_one_sentence(tiny_5b_path, tmp_path):
    from safetensors.torch import load_file, save_file

    file = write_t5_file(tiny_5b_path / "text_encoder", tmp_path / "t5.safetensors")
    state = load_file(str(file))
    v10 = {k.replace("wi_0", "wi"): v for k, v in state.items() if "wi_1" not in k}
    save_file(v10, str(tmp_path / "t5_v1_0.safetensors"))
    with pytest.raises(DiTFlowError, match=r"T5 v1\.0 encoder .*CogVideoX needs T5-v1\.1-XXL"):
        load_t5_file(tmp_path / "t5_v1_0.safetensors")
    (tmp_path / "t5.bin").write_bytes(b"pickle")
    with pytest.raises(DiTFlowError, match="only safetensors are loaded"):
        load_t5_file(tmp_path / "t5.bin")
    with pytest.raises(DiTFlowError, match="does not exist"):
        load_t5_file(tmp_path / "nope.safetensors")
    save_file({"encoder.final_layer_norm.weight": torch.ones(4)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(DiTFlowError, match="lacks the T5 tensors .*not a T5-XXL text encoder"):
        load_t5_file(tmp_path / "other.safetensors")


def test_the_kijai_layout_loads_with_a_t5_file_and_encodes_as_the_diffusers_folder(comfy_models, tiny_models):
    assert sorted(p.name for p in comfy_models["model"].iterdir()) == ["scheduler", "transformer", "vae"]
    cog = load_cogvideox(comfy_models["model"], dtype="fp32", text_encoder_file=comfy_models["t5"],
                         tokenizer_path=comfy_models["tokenizer"])
    ref = tiny_models["5b"]
    assert cog.variant == "5b"
    assert torch.equal(encode_prompt(cog, PROMPT).cond, encode_prompt(ref, PROMPT).cond)
    for (name, a), (_, b) in zip(cog.transformer.state_dict().items(), ref.transformer.state_dict().items()):
        assert torch.equal(a, b), name


def test_the_kijai_layout_without_a_t5_names_the_file_to_use(comfy_models):
    with pytest.raises(DiTFlowError) as info:
        load_cogvideox(comfy_models["model"], dtype="fp32")
    message = str(info.value)
    assert "has no text_encoder/ (kijai's layout" in message and "--text-encoder" in message
    assert str(comfy_models["t5"]) in message  # found beside it, in models/text_encoders
    # what does not need T5 loads as it is
    assert load_cogvideox(comfy_models["model"], dtype="fp32", components=("transformer", "vae")).vae is not None


def test_the_kijai_layout_takes_the_tokenizer_from_the_hub_cache_or_says_how(comfy_models, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(DiTFlowError) as info:  # offline, nothing cached
        load_cogvideox(comfy_models["model"], dtype="fp32", text_encoder_file=comfy_models["t5"])
    message = str(info.value)
    assert "has no tokenizer/ and no T5 tokenizer was given" in message and "--tokenizer" in message
    assert "THUDM/CogVideoX-5b is not in the Hugging Face cache" in message

    commit = "0" * 40
    repo = tmp_path / "hub" / "models--THUDM--CogVideoX-5b"
    shutil.copytree(comfy_models["tokenizer"], repo / "snapshots" / commit / "tokenizer")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    cog = load_cogvideox(comfy_models["model"], dtype="fp32", text_encoder_file=comfy_models["t5"])
    assert len(cog.tokenizer) == cog.text_encoder.config.vocab_size


def test_a_t5_of_the_wrong_width_or_vocabulary_is_refused(comfy_models, tiny_2b_path, tmp_path):
    from transformers import T5Config, T5EncoderModel

    wide = T5EncoderModel(T5Config(vocab_size=300, d_model=48, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                                   feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    wide.save_pretrained(tmp_path / "wide")
    with pytest.raises(DiTFlowError, match=r"gives 48-dim embeddings but this CogVideoX takes 32 \(T5-XXL\)"):
        load_cogvideox(comfy_models["model"], dtype="fp32", tokenizer_path=comfy_models["tokenizer"],
                       text_encoder_file=write_t5_file(tmp_path / "wide", tmp_path / "wide.safetensors"))


@pytest.mark.skipif(not (COMFY_T5_TOKENIZER / "tokenizer.json").is_file(),
                    reason=f"needs ComfyUI's T5 tokenizer in {COMFY_T5_TOKENIZER}")
def test_comfyuis_own_t5_tokenizer_drives_a_single_file_t5(comfy_models, tmp_path):
    """ComfyUI's ``comfy/text_encoders/t5_tokenizer`` (T5-v1.1's 32,100-piece vocabulary, used at run time, never
    copied here) with a T5 file of the real vocabulary size (32,128) and the tiny width."""
    from transformers import T5Config, T5EncoderModel

    t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    t5.save_pretrained(tmp_path / "t5")
    file = write_t5_file(tmp_path / "t5", tmp_path / "t5xxl_fp16.safetensors")
    cog = load_cogvideox(comfy_models["model"], dtype="fp32", text_encoder_file=file,
                         tokenizer_path=COMFY_T5_TOKENIZER)
    assert len(cog.tokenizer) == 32100
    ids = cog.tokenizer(PROMPT).input_ids
    assert cog.tokenizer.unk_token_id not in ids and ids[-1] == 1  # known words, </s> at the end
    assert encode_prompt(cog, PROMPT).cond.shape == (1, 16, 32)


def test_the_command_line_runs_a_kijai_folder_with_a_t5_file(comfy_models, example_clip_path, tmp_path):
    import json

    from ditflow.cli import main

    out = tmp_path / "out"
    assert main(["transfer", "--model", str(comfy_models["model"]), "--text-encoder", str(comfy_models["t5"]),
                 "--tokenizer", str(comfy_models["tokenizer"]), "--video", str(example_clip_path), "--prompt", PROMPT,
                 "--out", str(out), "--mode", "none", "--kv-injection", "none", "--num-frames", "5", "--height", "64",
                 "--width", "96", "--steps", "2", "--dtype", "fp32", "--device", "cpu"]) == 0
    model = json.loads((out / "run.json").read_text())["settings"]["model"]
    assert model["text_encoder_file"] == str(comfy_models["t5"]) and (out / "result.mp4").is_file()
