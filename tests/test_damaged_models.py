# SPDX-License-Identifier: Apache-2.0
"""Damaged model folders are refused in one sentence that names the file, before any tensor is read.

Each case copies the session's tiny CogVideoX-5b folder (4 blocks; ``ditflow.testing.tiny_model``, ~1 MB) and damages
one file the way downloads, disks, hand edits or hostile uploads do.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ditflow.cli import main
from ditflow.errors import DiTFlowError
from ditflow.backbones.cogvideox.loading import load_cogvideox

TRANSFORMER = "transformer/diffusion_pytorch_model.safetensors"
T5 = "text_encoder/model.safetensors"


def _edit_json(root: Path, rel: str, **changes) -> None:
    path = root / rel
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _truncate(root: Path, rel: str, keep: float = 0.5) -> None:
    path = root / rel
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _rewrite_tensors(root: Path, rel: str, change) -> None:
    path = root / rel
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def _set_header_length(root: Path, rel: str, n: int) -> None:
    path = root / rel
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", n) + data[8:])


def _garble_header(root: Path, rel: str) -> None:
    path = root / rel
    data = bytearray(path.read_bytes())
    data[8:20] = b"#garbage!#{["
    path.write_bytes(bytes(data))


def _drop_one(tensors):
    tensors.pop("norm_out.linear.weight")


def _widen_one(tensors):
    w = tensors["norm_out.linear.weight"]
    tensors["norm_out.linear.weight"] = torch.zeros(w.shape[0] + 1, w.shape[1], dtype=w.dtype)


def _as_bool(tensors):
    tensors["norm_final.bias"] = tensors["norm_final.bias"] > 0


def _index_to(root: Path, shard: str) -> None:
    """A shard index beside the real weights that sends every tensor to ``shard``."""
    folder = root / "transformer"
    names = load_file(folder / "diffusion_pytorch_model.safetensors").keys()
    index = {"metadata": {}, "weight_map": {k: shard for k in names}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))


#: (case, damage, file named in the message, phrase in the message)
CASES = [
    ("truncated shard", lambda r: _truncate(r, TRANSFORMER), TRANSFORMER, "is truncated"),
    ("truncated by 100 bytes", lambda r: _truncate(r, T5, keep=0.998), T5, "is truncated"),
    ("empty weights file", lambda r: (r / "vae/diffusion_pytorch_model.safetensors").write_bytes(b""),
     "vae/diffusion_pytorch_model.safetensors", "too few for a safetensors file"),
    ("corrupt header", lambda r: _garble_header(r, TRANSFORMER), TRANSFORMER, "corrupt header"),
    ("2^62 header length", lambda r: _set_header_length(r, TRANSFORMER, 2**62), TRANSFORMER, "declares a header"),
    ("header longer than the file", lambda r: _set_header_length(r, TRANSFORMER, 10**7), TRANSFORMER, "truncated"),
    ("missing tensor", lambda r: _rewrite_tensors(r, TRANSFORMER, _drop_one), "transformer", "lacks 1 of"),
    ("tensor of another shape", lambda r: _rewrite_tensors(r, TRANSFORMER, _widen_one), TRANSFORMER, "shape [65, 32]"),
    ("bool weights", lambda r: _rewrite_tensors(r, TRANSFORMER, _as_bool), TRANSFORMER, "not a float type"),
    ("num_layers below the weights'", lambda r: _edit_json(r, "transformer/config.json", num_layers=2),
     "transformer/config.json", "num_layers = 2 but the weights hold 4 blocks"),
    ("num_layers above the weights'", lambda r: _edit_json(r, "transformer/config.json", num_layers=6),
     "transformer/config.json", "num_layers = 6 but the weights hold 4 blocks"),
    ("T5 num_layers below the weights'", lambda r: _edit_json(r, "text_encoder/config.json", num_layers=1),
     "text_encoder/config.json", "num_layers = 1 but the weights hold 2 blocks"),
    ("string config value", lambda r: _edit_json(r, "transformer/config.json", num_attention_heads="2"),
     "transformer/config.json", "num_attention_heads = '2'"),
    ("negative config value", lambda r: _edit_json(r, "transformer/config.json", attention_head_dim=-16),
     "transformer/config.json", "attention_head_dim = -16"),
    ("negative VAE channels", lambda r: _edit_json(r, "vae/config.json", latent_channels=-4),
     "vae/config.json", "latent_channels = -4"),
    ("zero VAE scaling factor", lambda r: _edit_json(r, "vae/config.json", scaling_factor=0),
     "vae/config.json", "scaling_factor = 0"),
    ("config is a list", lambda r: (r / "transformer/config.json").write_text("[1, 2]"),
     "transformer/config.json", "not a JSON object"),
    ("T5 config is a list", lambda r: (r / "text_encoder/config.json").write_text("[]"),
     "text_encoder/config.json", "not a JSON object"),
    ("config is not JSON", lambda r: (r / "vae/config.json").write_text("{not json"), "vae/config.json", "as JSON"),
    ("scheduler config is a list", lambda r: (r / "scheduler/scheduler_config.json").write_text("[1]"),
     "scheduler/scheduler_config.json", "not a JSON object"),
    ("unknown beta_schedule", lambda r: _edit_json(r, "scheduler/scheduler_config.json", beta_schedule="cubic"),
     "scheduler/scheduler_config.json", "cubic is not implemented"),
    ("string num_train_timesteps", lambda r: _edit_json(r, "scheduler/scheduler_config.json",
                                                        num_train_timesteps="1000"),
     "scheduler/scheduler_config.json", "num_train_timesteps = '1000'"),
    ("damaged spiece.model", lambda r: (r / "tokenizer/spiece.model").write_bytes(b"garbage" * 10), "tokenizer",
     "cannot be loaded"),
    ("shard index not an object", lambda r: (r / "transformer/diffusion_pytorch_model.safetensors.index.json")
     .write_text("[]"), "transformer/diffusion_pytorch_model.safetensors.index.json", "not a shard index"),
    ("shard index names a missing shard", lambda r: _index_to(r, "diffusion_pytorch_model-00001-of-00002.safetensors"),
     "transformer/diffusion_pytorch_model.safetensors.index.json", "which is missing"),
]


@pytest.fixture
def damaged(tiny_5b_path, tmp_path):
    def make(damage) -> Path:
        root = shutil.copytree(tiny_5b_path, tmp_path / "CogVideoX-5b")
        damage(root)
        return root

    return make


@pytest.mark.parametrize("case,damage,named,phrase", CASES, ids=[c[0] for c in CASES])
def test_a_damaged_folder_is_one_sentence_naming_the_file(damaged, case, damage, named, phrase):
    root = damaged(damage)
    with pytest.raises(DiTFlowError) as err:
        load_cogvideox(root, dtype="fp32")
    message = str(err.value)
    assert str(root / named) in message and phrase in message
    assert "\n" not in message and message.endswith(".")
    assert "re-download" in message or "set num_layers" in message


def test_damaged_folder_on_the_command_line_is_exit_2_without_traceback(damaged, real_clip_path, tmp_path, capsys):
    root = damaged(lambda r: _truncate(r, TRANSFORMER))
    out = tmp_path / "out"
    code = main(["transfer", "--model", str(root), "--video", str(real_clip_path), "--prompt", "x", "--out", str(out),
                 "--num-frames", "5", "--height", "64", "--width", "96", "--steps", "2", "--dtype", "fp32",
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"error: {root / TRANSFORMER} is truncated")
    assert not out.exists()


@pytest.mark.parametrize("shard", ["pytorch_model.bin", "../vae/diffusion_pytorch_model.safetensors",
                                   "/etc/passwd", "weights.pt"])
def test_a_shard_index_pointing_at_a_pickle_or_outside_the_folder_is_refused_before_any_load(damaged, monkeypatch,
                                                                                             shard):
    def make(root):
        tensors = load_file(root / TRANSFORMER)
        torch.save(tensors, root / "transformer" / "pytorch_model.bin")  # a pickle the loader must never open
        _index_to(root, shard)

    root = damaged(make)
    opened = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: opened.append(a[0]) or real_load(*a, **k))
    with pytest.raises(DiTFlowError, match="not a .safetensors file in that folder") as err:
        load_cogvideox(root, dtype="fp32")
    assert opened == [] and "index.json" in str(err.value)


def test_a_sound_sharded_folder_loads_the_same_weights(damaged, tiny_5b_path):
    def shard(root):
        folder = root / "transformer"
        tensors = load_file(folder / "diffusion_pytorch_model.safetensors")
        names = sorted(tensors)
        halves = {"part-1.safetensors": names[: len(names) // 2], "part-2.safetensors": names[len(names) // 2 :]}
        for file, keys in halves.items():
            save_file({k: tensors[k] for k in keys}, folder / file)
        index = {"metadata": {}, "weight_map": {k: file for file, keys in halves.items() for k in keys}}
        (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
        (folder / "diffusion_pytorch_model.safetensors").unlink()

    sharded = load_cogvideox(damaged(shard), dtype="fp32", components=("transformer",))
    whole = load_cogvideox(tiny_5b_path, dtype="fp32", components=("transformer",))
    for (name, a), (_, b) in zip(sharded.transformer.state_dict().items(), whole.transformer.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_non_persistent_buffer_saved_by_an_older_diffusers_is_accepted(tiny_2b_path, tmp_path):
    """The 2b sin-cos table is a non-persistent buffer; a file that holds it anyway loads, as diffusers allows."""
    root = shutil.copytree(tiny_2b_path, tmp_path / "CogVideoX-2b")
    _rewrite_tensors(root, TRANSFORMER, lambda t: t.update({"patch_embed.pos_embedding": torch.zeros(1, 88, 32)}))
    model = load_cogvideox(root, dtype="fp32", components=("transformer",))
    assert model.num_blocks == 4


@pytest.mark.parametrize("raised,expected", [
    (RuntimeError("Error(s) in loading state_dict\nsecond line"), DiTFlowError),
    (torch.cuda.OutOfMemoryError("CUDA out of memory"), torch.cuda.OutOfMemoryError),  # not damage: unchanged
])
def test_a_loader_error_the_checks_miss_is_one_sentence_but_out_of_memory_is_not_hidden(tiny_5b_path, monkeypatch,
                                                                                      raised, expected):
    from diffusers import AutoencoderKLCogVideoX

    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr(AutoencoderKLCogVideoX, "from_pretrained", fail)
    with pytest.raises(expected) as err:
        load_cogvideox(tiny_5b_path, dtype="fp32", components=("vae",))
    if expected is DiTFlowError:
        assert str(err.value) == (f"could not load {tiny_5b_path}/vae (RuntimeError: Error(s) in loading state_dict); "
                                  "re-download vae/ from the model's Hugging Face repository.")
