# SPDX-License-Identifier: Apache-2.0
"""No silent garbage: a NaN, an Inf or a blow-up stops the run with where it happened and what to change, and
nothing is written; NaN and absurd numbers are refused before the model loads.

Sizes: 9 frames → 3 latent frames; 64×96 px → 8×12 latent px → 4×6 patches; 4 steps, the first 2 guided, at
guidance block 1 of the tiny models' 4.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from ditflow import DiTFlowError, GuidanceConfig
from ditflow.backbones.cogvideox.attention import DiTFlowAttnProcessor
from ditflow.cli import main
from ditflow.embeds import FORMAT, PositionEmbeds, save_embeds
from ditflow.files import write_json
from ditflow.reference import extract_reference
from ditflow.sampler import sample
from ditflow.text import encode_prompt

TINY = ["--num-frames", "9", "--height", "64", "--width", "96", "--steps", "4", "--guidance-fraction", "0.5",
        "--opt-steps", "2", "--guidance-blocks", "1", "--dtype", "fp32", "--device", "cpu", "--no-vae-tiling"]


def _error(capsys, argv, out) -> str:
    """Runs the CLI, expects exit 2 with one ``error:`` line and no traceback, and nothing in ``out``."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    line = err.splitlines()[-1]
    assert line.startswith("error: ")
    assert not out.exists() or not any(out.iterdir())
    return line


def _damaged(src, tmp_path, component: str, edit):
    """A copy of the tiny model folder ``src`` whose ``component`` weights (a state dict) ``edit`` changes."""
    from safetensors.torch import load_file, save_file

    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    (file,) = (dst / component).glob("*.safetensors")
    weights = load_file(str(file))
    edit(weights)
    save_file(weights, str(file), metadata={"format": "pt"})
    return dst


# --- refused at the argument check -----------------------------------------------------------------------------


@pytest.mark.parametrize("command,args,message", [
    ("transfer", ["--lr-start", "nan"], "lr_start"),
    ("transfer", ["--lr-start", "1e30", "--mode", "rope"], "lr_start"),
    ("transfer", ["--lr-end=-0.1"], "lr_end"),
    ("transfer", ["--cfg", "nan"], "CFG scale"),
    ("transfer", ["--cfg", "1e30"], "CFG scale"),
    ("transfer", ["--cfg=-inf"], "CFG scale"),
    ("transfer", ["--temperature", "inf"], "temperature"),
    ("transfer", ["--guidance-fraction", "nan"], "guidance fraction"),
    ("inject", ["--cfg", "nan"], "CFG scale"),
    ("bench-eval", ["--lr-end", "nan"], "lr_end"),
])
def test_nan_and_absurd_numbers_are_refused_before_the_model_loads(
    tiny_5b_path, pan_clip, tmp_path, capsys, monkeypatch, command, args, message
):
    import ditflow.jobs

    monkeypatch.setattr(ditflow.jobs, "load_for_run", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    base = {"transfer": ["--video", str(pan_clip), "--prompt", "x", *TINY],
            "inject": ["--embeds", str(tmp_path / "e.safetensors"), "--prompt", "x", "--dtype", "fp32"],
            "bench-eval": ["--manifest", str(tmp_path / "m.json")]}[command]
    err = _error(capsys, [command, "--model", str(tiny_5b_path), "--out", str(out), *base, *args], out)
    assert message in err and "finite number" in err


# --- stopped where it goes non-finite, nothing written ----------------------------------------------------------


@pytest.fixture(scope="module")
def reference_5b(tiny_models, grid):
    frames, h, w = grid
    latents = torch.randn(1, frames, 16, 2 * h, 2 * w, generator=torch.Generator().manual_seed(1))
    return extract_reference(tiny_models["5b"], latents, [1])


def _bypassing_checks(monkeypatch, **values) -> None:
    """Makes every resolved :class:`GuidanceConfig` carry ``values`` that its own check refuses, as a caller that
    skipped the check would (the run-time guard must hold without it)."""
    resolved = GuidanceConfig.resolved

    def patched(self, *args, **kwargs):
        config = resolved(self, *args, **kwargs)
        for name, value in values.items():
            object.__setattr__(config, name, value)
        return config

    monkeypatch.setattr(GuidanceConfig, "resolved", patched)


def _assert_model_restored(model):
    processors = model.transformer.attn_processors.values()
    assert not any(isinstance(p, DiTFlowAttnProcessor) for p in processors)


def test_a_learning_rate_that_blows_up_the_rope_tables_stops_at_that_iteration(tiny_models, reference_5b, monkeypatch):
    model = tiny_models["5b"]
    _bypassing_checks(monkeypatch, lr_start=1e30, lr_end=1e30)
    config = GuidanceConfig(mode="rope", num_inference_steps=4, guidance_fraction=0.5, opt_steps=3)
    with pytest.raises(DiTFlowError) as err:
        sample(model, encode_prompt(model, "a dog"), config, reference=reference_5b, seed=3)
    message = str(err.value)
    assert "RoPE tables at denoising step 1 of 4, Adam iteration 1" in message
    assert "learning rate 1e+30 is too large" in message and "lr_start" in message
    _assert_model_restored(model)


def test_a_cfg_scale_that_blows_up_the_latents_stops_after_that_step(tiny_models, monkeypatch):
    model = tiny_models["5b"]
    _bypassing_checks(monkeypatch, guidance_scale=1e30)
    config = GuidanceConfig(mode="none", kv_injection_blocks=(), num_inference_steps=4)
    with pytest.raises(DiTFlowError, match=r"latents after denoising step 1 of 4 .*CFG scale 1e\+30 is far above"):
        sample(model, encode_prompt(model, "a dog"), config, size=(9, 64, 96), seed=3)
    _assert_model_restored(model)


@pytest.mark.parametrize("tensor,where", [
    ("transformer_blocks.0.attn1.to_q.weight", "reference pass's attention queries at block 1"),  # before any step
    ("transformer_blocks.3.ff.net.2.weight", "latents after denoising step 1 of 4"),  # past the guidance block
])
def test_nan_in_the_transformer_weights_stops_the_transfer_and_writes_nothing(
    tiny_5b_path, pan_clip, tmp_path, capsys, tensor, where
):
    model = _damaged(tiny_5b_path, tmp_path, "transformer", lambda w: w[tensor].view(-1)[0].fill_(math.nan))
    out = tmp_path / "out"
    err = _error(capsys, ["transfer", "--model", str(model), "--video", str(pan_clip), "--prompt", "x",
                          "--out", str(out), *TINY], out)
    assert where in err and "went non-finite" in err and "weights are damaged" in err


def test_a_vae_scaling_factor_of_zero_is_refused_and_nothing_is_written(tiny_5b_path, pan_clip, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_5b_path, model)
    config = json.loads((model / "vae" / "config.json").read_text())
    (model / "vae" / "config.json").write_text(json.dumps({**config, "scaling_factor": 0}))
    out = tmp_path / "out"
    err = _error(capsys, ["transfer", "--model", str(model), "--video", str(pan_clip), "--prompt", "x",
                          "--out", str(out), *TINY], out)
    assert "scaling_factor" in err and "positive" in err


def _embeds_file(path, value: float):
    """A DiTFlow RoPE embeddings file for the tiny 5b model (grid 3×4×6, 4 steps, 2 guided) holding ``value``."""
    from safetensors.torch import save_file

    table = torch.rand(2, 2, 72, 16)
    table[0, 0, 5, 3] = value
    meta = {"format": FORMAT, "format_version": "1", "mode": "rope", "model_family": "5b",
            "latent_grid": "[3, 4, 6]", "head_dim": "16", "num_inference_steps": "4", "guided_timesteps": "[999, 749]",
            "prompt": "a dog", "reference": "pan.mp4"}
    save_file({"step_000": table, "step_001": table.clone()}, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("value", [math.nan, math.inf, 1e30])
def test_embeddings_holding_nan_inf_or_1e30_are_refused_before_the_model_loads(
    tiny_5b_path, tmp_path, capsys, monkeypatch, value
):
    import ditflow.jobs

    monkeypatch.setattr(ditflow.jobs, "load_for_run", lambda *a, **k: pytest.fail("the model was loaded"))
    embeds = _embeds_file(tmp_path / "bad.safetensors", value)
    out = tmp_path / "out"
    err = _error(capsys, ["inject", "--model", str(tiny_5b_path), "--embeds", str(embeds), "--prompt", "x",
                          "--out", str(out), "--dtype", "fp32", "--device", "cpu"], out)
    assert "positional embeddings of guided step 1" in err and ("went non-finite" in err or "blew up" in err)


def test_non_finite_embeddings_are_never_saved(tmp_path):
    table = torch.zeros(2, 2, 72, 16)
    table[1, 1, 0, 0] = math.inf
    embeds = PositionEmbeds(mode="rope", variant="5b", grid=(3, 4, 6), head_dim=16, num_inference_steps=4,
                            timesteps=(999,), tables=[table])
    with pytest.raises(DiTFlowError, match="embeddings of guided step 1 went non-finite"):
        save_embeds(tmp_path / "e.safetensors", embeds)
    assert list(tmp_path.iterdir()) == []


def _nan_in(module, name: str):
    """Context: parameter ``name`` of ``module`` holds one NaN, restored afterwards (shared session models)."""
    import contextlib

    @contextlib.contextmanager
    def patched():
        param = dict(module.named_parameters())[name]
        saved = param.detach().clone()
        with torch.no_grad():
            param.view(-1)[0] = math.nan
        try:
            yield
        finally:
            with torch.no_grad():
                param.copy_(saved)

    return patched()


def test_nan_in_the_vae_stops_encode_and_decode(tiny_models):
    model = tiny_models["2b"]
    frames = torch.zeros(9, 3, 64, 96)
    with _nan_in(model.vae, "encoder.conv_in.conv.weight"), pytest.raises(DiTFlowError, match="encoding of the ref"):
        model.encode_video(frames)
    with _nan_in(model.vae, "decoder.conv_in.conv.weight"), pytest.raises(DiTFlowError, match="decoded video went non"):
        model.decode_latents(torch.zeros(1, 3, 16, 8, 12))
    with pytest.raises(DiTFlowError, match="latents to decode went non-finite"):
        model.decode_latents(torch.full((1, 3, 16, 8, 12), math.nan))


def test_nan_in_the_text_encoder_is_named(tiny_models):
    model = tiny_models["2b"]
    name = next(n for n, _ in model.text_encoder.named_parameters() if "embed" in n or "shared" in n)
    with _nan_in(model.text_encoder, name), pytest.raises(DiTFlowError, match="text encoder's embedding of the prompt"):
        encode_prompt(model, "a dog")


def test_run_records_are_strict_json(tmp_path):
    with pytest.raises(ValueError):
        write_json(tmp_path / "run.json", {"loss_per_step": [[math.nan]]})
    assert not (tmp_path / "run.json").exists()
