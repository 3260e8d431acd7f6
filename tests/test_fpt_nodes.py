# SPDX-License-Identifier: Apache-2.0
"""The Flow Poke Transformer nodes, run as ComfyUI runs them (inside ``torch.inference_mode()``) against stub ComfyUI
modules, on the tiny random FPT (``ditflow.testing.tiny_fpt.TINY``) in models/fpt. Image: 90×60 px."""

from __future__ import annotations

import os
import re

import pytest
import torch

import comfy_stubs
from ditflow import DiTFlowError

W, H = 90, 60


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    """Stub ComfyUI whose models/fpt holds tiny.safetensors and models/CogVideo tiny-5b and tiny-5b-i2v;
    NODE_CLASS_MAPPINGS as ``N`` (tests/test_nodes.py)."""
    from ditflow.testing.tiny_fpt import build_tiny_fpt

    from ditflow.testing.tiny_model import build_tiny_model

    base = tmp_path_factory.mktemp("comfy")
    build_tiny_fpt(base / "models" / "fpt" / "tiny.safetensors")
    for variant in ("5b", "5b-i2v"):  # for the motion target → sampler chain
        build_tiny_model(base / "models" / "CogVideo" / f"tiny-{variant}", variant)
    yield comfy_stubs.install(str(base))
    comfy_stubs.uninstall()


@pytest.fixture(scope="module")
def N(comfy):
    from nodes import NODE_CLASS_MAPPINGS

    return NODE_CLASS_MAPPINGS


run = comfy_stubs.run_node


@pytest.fixture(scope="module")
def fpt(N):
    return run(N["DiTFlowLoadFPT"], weights="tiny.safetensors", precision="fp32")[0]


@pytest.fixture(scope="module")
def image():
    """The poked image (the embedding's), IMAGE [1, H, W, 3] in [0, 1]."""
    return torch.rand(1, H, W, 3, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def embedding(N, fpt, image):
    return run(N["DiTFlowFPTEmbedImage"], fpt=fpt, image=image, fit="pad")[0]


def test_the_loader_lists_models_fpt_and_builds_weights_outside_inference_mode(N, fpt, comfy):
    assert N["DiTFlowLoadFPT"].INPUT_TYPES()["required"]["weights"][0] == ["tiny.safetensors"]
    assert not any(p.is_inference() for p in fpt.module.parameters())
    assert fpt.patcher.model.inner is fpt.module
    assert type(fpt.patcher.model).__name__ == type(fpt.module).__name__  # ComfyUI logs this name
    loader = N["DiTFlowLoadFPT"]
    path = comfy["folder_paths"].get_full_path("fpt", "tiny.safetensors")
    assert loader.IS_CHANGED("tiny.safetensors", "fp32") == os.path.getmtime(path)
    assert loader.IS_CHANGED("missing.safetensors", "fp32") == ""
    with pytest.raises(DiTFlowError, match="'../tiny.safetensors' were not found"):
        run(N["DiTFlowLoadFPT"], weights="../tiny.safetensors", precision="fp32")


def test_every_fpt_node_is_documented(N):
    for key in ("DiTFlowLoadFPT", "DiTFlowFPTEmbedImage", "DiTFlowPokes", "DiTFlowFPTPredictFlow",
                "DiTFlowFPTMotionDensity", "DiTFlowPokeMotionTarget"):
        cls = N[key]
        assert cls.CATEGORY == "DiTFlow/poke" and cls.DESCRIPTION and len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
        assert all("tooltip" in spec[1] for spec in cls.INPUT_TYPES()["required"].values())


def test_poke_to_flow_field_and_picture(N, fpt, embedding, comfy):
    pokes = run(N["DiTFlowPokes"], pokes="30,30,42,25\n60,40,60,50")[0]
    comfy["comfy.model_management"].loaded.clear()
    comfy["comfy.utils"].updates.clear()
    flow, picture = run(N["DiTFlowFPTPredictFlow"], fpt=fpt, embedding=embedding, pokes=pokes, mode="mean", grid=8,
                        ar_grid=2, seed=0, camera_static=True)
    assert flow.shape == (1, H, W, 2) and flow.dtype == torch.float32 and torch.isfinite(flow).all()
    assert picture.shape == (1, H, W, 3) and 0 <= picture.min() and picture.max() <= 1
    assert comfy["comfy.model_management"].loaded == [([fpt.patcher], True)]
    assert comfy["comfy.utils"].updates[-1] == (40, 40)  # 8 columns × round(8 · 60/90) = 5 rows of queries


def test_sampled_flow_is_reproducible_by_seed(N, fpt, embedding):
    pokes = run(N["DiTFlowPokes"], pokes="30,30,42,25")[0]
    kw = dict(fpt=fpt, embedding=embedding, pokes=pokes, mode="sample", grid=8, ar_grid=2, camera_static=True)
    a, b, c = (run(N["DiTFlowFPTPredictFlow"], seed=s, **kw)[0] for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_motion_density_heatmap(N, fpt, embedding):
    pokes = run(N["DiTFlowPokes"], pokes="30,30,42,25")[0]
    (heatmap,) = run(N["DiTFlowFPTMotionDensity"], fpt=fpt, embedding=embedding, pokes=pokes, query_x=40.0,
                     query_y=30.0, camera_static=False)
    assert heatmap.shape == (1, H, W, 3)
    with pytest.raises(DiTFlowError, match=r"query point \(200, 30\) is outside"):
        run(N["DiTFlowFPTMotionDensity"], fpt=fpt, embedding=embedding, pokes=pokes, query_x=200.0, query_y=30.0,
            camera_static=True)


def test_bad_pokes_stop_the_run_with_one_sentence_each(N, fpt, embedding):
    with pytest.raises(DiTFlowError, match=r"^Poke 1 \('1,2,3'\) has 3 numbers, not 4"):
        run(N["DiTFlowPokes"], pokes="1,2,3")
    pokes = run(N["DiTFlowPokes"], pokes="100,10,120,10")[0]
    with pytest.raises(DiTFlowError, match=r"^Poke 1 starts at \(100, 10\), outside the 90×60 px image\.$"):
        run(N["DiTFlowFPTPredictFlow"], fpt=fpt, embedding=embedding, pokes=pokes, mode="mean", grid=8, ar_grid=2,
            seed=0, camera_static=True)


def test_cancel_stops_the_prediction(N, fpt, embedding, comfy):
    mm = comfy["comfy.model_management"]
    pokes = run(N["DiTFlowPokes"], pokes="")[0]
    mm.INTERRUPT = True
    with pytest.raises(mm.InterruptProcessingException):
        run(N["DiTFlowFPTPredictFlow"], fpt=fpt, embedding=embedding, pokes=pokes, mode="sample", grid=8, ar_grid=4,
            seed=0, camera_static=True)
    assert mm.INTERRUPT is False


@pytest.mark.parametrize("variant", ["5b", "5b-i2v"])
def test_pokes_steer_the_guided_sampler_through_a_motion_target(N, fpt, embedding, image, comfy, capsys, variant):
    """Pokes → Predict Flow (90×60 px) → Motion Target (9 frames at 96×64 px, block 1, the model connected) →
    Guided Sampler, run as ComfyUI runs nodes (inference mode); on the I2V model the poked image is the start
    image. The target is the sampler's amf type, fixes its size (widgets 0) and carries no latents, so KV injection
    (on) is skipped; the AMF loss falls in each guided step."""
    pokes = run(N["DiTFlowPokes"], pokes="30,30,60,25\n60,40,60,50")[0]
    flow = run(N["DiTFlowFPTPredictFlow"], fpt=fpt, embedding=embedding, pokes=pokes, mode="mean", grid=8,
               ar_grid=2, seed=0, camera_static=True)[0]
    target_node = N["DiTFlowPokeMotionTarget"]
    assert target_node.RETURN_TYPES == N["DiTFlowExtractAMF"].RETURN_TYPES
    assert N["DiTFlowGuidedSampler"].INPUT_TYPES()["optional"]["amf"][0] == "DITFLOW_AMF"
    model = run(N["DiTFlowLoadCogVideoX"], model=f"tiny-{variant}", precision="fp32")[0]
    args = dict(flow=flow, width=96, height=64, num_frames=9, fit="crop", block=1, scale=2.0, min_motion=0.0,
                temperature=2.0)
    (target,) = run(target_node, **args, model=model)
    assert target.grid == (3, 4, 6) and target.latents is None and list(target.amf) == [1]
    assert not target.amf[1].is_inference() and target.amf[1].shape == (9, 24, 2)
    assert torch.equal(run(target_node, **args)[0].amf[1], target.amf[1])  # the same grid without the model (1.0)
    with pytest.raises(DiTFlowError, match="guidance block 20 is out of range"):
        run(target_node, **{**args, "block": 20}, model=model)

    cond = run(N["DiTFlowTextEncode"], model=model, prompt="a red ball", negative_prompt="")[0]
    capsys.readouterr()
    latent, embeds = run(N["DiTFlowGuidedSampler"], model=model, conditioning=cond, mode="latent", steps=4, cfg=6.0,
                         seed=0, guidance_fraction=0.5, opt_steps=3, lr_start=0.2, lr_end=0.1, kv_injection=True,
                         kv_block=0, num_frames=0, width=0, height=0, amf=target,
                         start_image=image if variant == "5b-i2v" else None)
    assert latent["samples"].shape == (1, 16, 3, 8, 12) and embeds.mode.value == "latent"  # the z_t trajectory
    losses = [float(x) for x in re.findall(r"AMF loss ([\d.]+)", capsys.readouterr().out)]
    assert len(losses) == 6 and losses[2] < losses[0] and losses[5] < losses[3]
