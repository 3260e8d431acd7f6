# SPDX-License-Identifier: Apache-2.0
"""Damaged or hand-made embeddings files are refused in one sentence, from the header alone, before any model loads.

A sound file: CogVideoX-5b RoPE tables for 9 frames at 64×96 px → latent grid 3×4×6 = 72 tokens, head_dim 16 →
two tables [2, 2, 72, 16] for a 4-step run guided at timesteps 999 and 749.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from ditflow.cli import main
from ditflow.config import Mode
from ditflow.embeds import PositionEmbeds, load_embeds, save_embeds
from ditflow.errors import DiTFlowError

GRID, HEAD_DIM = (3, 4, 6), 16
META = {
    "format": "ditflow-position-embeds", "format_version": "1", "mode": "rope", "model_family": "5b",
    "latent_grid": "[3, 4, 6]", "head_dim": "16", "num_inference_steps": "4", "guided_timesteps": "[999, 749]",
    "prompt": "a leopard", "reference": "bmx-trees.mp4",
}


def _tables(n: int = 2, shape=(2, 2, 72, HEAD_DIM), dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(0)
    return {f"step_{i:03d}": torch.randn(shape, generator=g).to(dtype) for i in range(n)}


def _write(tmp_path, tensors=None, **meta):
    path = tmp_path / "embeds.safetensors"
    save_file(_tables() if tensors is None else tensors, str(path), metadata={**META, **meta})
    return path


def test_a_sound_file_round_trips(tmp_path):
    embeds = PositionEmbeds(Mode.ROPE, "5b", GRID, HEAD_DIM, 4, (999, 749), list(_tables().values()), prompt="a dog")
    loaded = load_embeds(save_embeds(tmp_path / "e.safetensors", embeds))
    assert loaded.grid == GRID and loaded.timesteps == (999, 749) and loaded.prompt == "a dog"
    assert all(torch.equal(a, b) for a, b in zip(loaded.tables, embeds.tables))


CASES = [
    ("table of another token count", dict(tensors=_tables(shape=(2, 2, 71, HEAD_DIM))), "shape [2, 2, 71, 16]"),
    ("table of another head dim", dict(tensors=_tables(shape=(2, 2, 72, 8))), "needs [2, 2, 72, 16]"),
    ("posemb table of rope shape", dict(mode="posemb", model_family="2b"), "needs [72, 'inner_dim']"),
    ("bool tables", dict(tensors=_tables(dtype=torch.bool)), "holds step_000 as BOOL"),
    ("integer tables", dict(tensors=_tables(dtype=torch.int32)), "as I32"),
    ("zero latent grid", dict(latent_grid="[0, 4, 6]"), "latent grid [0, 4, 6]"),
    ("negative latent grid", dict(latent_grid="[-3, -4, 6]"), "latent grid [-3, -4, 6]"),
    ("huge latent grid", dict(latent_grid="[3, 4, 600000000]"), "latent grid [3, 4, 600000000]"),
    ("latent grid of two values", dict(latent_grid="[3, 4]"), "not a JSON list of 3 integers"),
    ("latent grid of floats", dict(latent_grid="[3.0, 4, 6]"), "not a JSON list of 3 integers"),
    ("latent grid not JSON", dict(latent_grid="3x4x6"), "not a JSON list"),
    ("1e9 steps", dict(num_inference_steps="1000000000"), "num_inference_steps = '1000000000'"),
    ("zero steps", dict(num_inference_steps="0"), "not an integer in 1..1000"),
    ("negative steps", dict(num_inference_steps="-4"), "not an integer in 1..1000"),
    ("head_dim not a number", dict(head_dim="sixteen"), "head_dim = 'sixteen'"),
    ("more timesteps than tables", dict(guided_timesteps="[999, 749, 499]"), "2 tables but 3 guided timesteps"),
    ("fewer timesteps than tables", dict(guided_timesteps="[999]"), "2 tables but 1 guided timesteps"),
    ("more tables than steps", dict(tensors=_tables(n=5), guided_timesteps="[999, 749, 499, 249, 0]"),
     "5 tables for a run of 4 steps"),
    ("timesteps out of range", dict(guided_timesteps="[5000, 749]"), "not decreasing values in 0..999"),
    ("timesteps increasing", dict(guided_timesteps="[749, 999]"), "not decreasing"),
    ("tables misnamed", dict(tensors={"step_000": _tables()["step_000"], "step_007": _tables()["step_001"]}),
     "not step_000, step_001"),
    ("unknown mode", dict(mode="none"), "mode 'none'"),
    ("z_t trajectory of rope shape", dict(mode="latent"), "needs [1, 'F', 'C', 'H', 'W'] [1, F, C, H, W] latents"),
    ("negative seed", dict(seed="-1"), "seed = '-1', not an integer"),
    ("seed not a number", dict(seed="x"), "seed = 'x', not an integer"),
    ("seed of 2^64", dict(seed=str(2**64)), "seed = '18446744073709551616', not an integer in 0..2^64−1"),
    ("seed of 5,000 digits", dict(seed="9" * 5000), "seed = '99999"),  # int() of it would raise ValueError
    ("reference options with an unknown field", dict(reference_options='{"frames": 9}'),
     "frames=9: the fields are num_frames"),
    ("reference options of the wrong type", dict(reference_options='{"num_frames": "9"}'), "num_frames='9'"),
    ("reference options not an object", dict(reference_options="[9]"), "not a JSON object"),
    ("unknown family", dict(model_family="7b"), "model family '7b'"),
    ("format version not a number", dict(format_version="one"), "format version 'one'"),
    ("100,000-character prompt", dict(prompt="x" * 100_000), "'prompt' of 100,000 characters"),
    ("5 MB metadata field (header cap)", dict(reference="y" * 5_000_000), "more than the 4,000,000 bytes allowed"),
]


@pytest.mark.parametrize("case,changes,phrase", CASES, ids=[c[0] for c in CASES])
def test_a_bad_embeddings_file_is_one_sentence(tmp_path, case, changes, phrase):
    path = _write(tmp_path, **changes)
    with pytest.raises(DiTFlowError) as err:
        load_embeds(path)
    message = str(err.value)
    assert str(path) in message and phrase in message and "\n" not in message


@pytest.mark.parametrize("seed", [-1, 2**64, True])
def test_a_seed_outside_64_bits_is_not_saved(tmp_path, seed):
    """Every file stores its seed; one that load_embeds would refuse (or torch would wrap) is refused when saving."""
    embeds = PositionEmbeds(Mode.ROPE, "5b", GRID, HEAD_DIM, 4, (999, 749), list(_tables().values()), seed=seed)
    with pytest.raises(DiTFlowError, match=r"^the embeddings' seed must be an integer in 0..2\^64−1, got "):
        save_embeds(tmp_path / "e.safetensors", embeds)
    assert not (tmp_path / "e.safetensors").exists()
    embeds.seed = 2**64 - 1  # the largest is kept exactly
    assert load_embeds(save_embeds(tmp_path / "e.safetensors", embeds)).seed == 2**64 - 1


def test_missing_metadata_is_named(tmp_path):
    path = tmp_path / "e.safetensors"
    save_file(_tables(), str(path), metadata={k: v for k, v in META.items() if k != "guided_timesteps"})
    with pytest.raises(DiTFlowError, match="no guided_timesteps"):
        load_embeds(path)


def test_a_truncated_embeddings_file_is_refused(tmp_path):
    path = _write(tmp_path)
    path.write_bytes(path.read_bytes()[:-64])
    with pytest.raises(DiTFlowError, match="is truncated"):
        load_embeds(path)


def test_posemb_tables_of_another_width_are_refused_against_the_model(tmp_path):
    path = _write(tmp_path, tensors=_tables(shape=(72, 48)), mode="posemb", model_family="2b")
    embeds = load_embeds(path)
    tiny_2b = SimpleNamespace(variant="2b", head_dim=HEAD_DIM, num_heads=2)  # inner dim 32
    with pytest.raises(DiTFlowError, match=r"table width \(heads × head dim\) 48, but this run has 32"):
        embeds.check_compatible(tiny_2b, GRID, 4)


def test_inject_refuses_bad_embeddings_before_loading_the_model(tmp_path, capsys):
    path = _write(tmp_path, latent_grid="[3, 4, 600000000]")
    code = main(["inject", "--model", str(tmp_path / "no-model-here"), "--embeds", str(path), "--prompt", "x",
                 "--out", str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"error: {path} has latent grid") and "no-model-here" not in err


def test_the_run_record_never_copies_more_than_the_field_limit(tmp_path):
    """The prompt saved with the tables is the one the run used, clipped to what load_embeds accepts."""
    from ditflow.embeds import MAX_TEXT_CHARS

    embeds = PositionEmbeds(Mode.ROPE, "5b", GRID, HEAD_DIM, 4, (999, 749), list(_tables().values()),
                            prompt="z" * (MAX_TEXT_CHARS + 10))
    loaded = load_embeds(save_embeds(tmp_path / "e.safetensors", embeds))
    assert len(loaded.prompt) == MAX_TEXT_CHARS
    assert json.loads(json.dumps(loaded.prompt)) == loaded.prompt
