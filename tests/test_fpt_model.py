# SPDX-License-Identifier: Apache-2.0
"""The FPT library on a tiny random model: conversion and loading, the predictors' structure, the mixture head.

Sizes (``ditflow.testing.tiny_fpt.TINY``): width 32, 2 blocks × 2 heads of 16; DINOv2 32 wide, 1 layer; images
resized to 56 px → 4×4 feature cells. Parity with the authors' code is in ``test_fpt_parity.py``.
"""

from __future__ import annotations

import pytest
import torch

from ditflow import DiTFlowError
from ditflow.fpt.checkpoint import convert_checkpoint, infer_config, load_fpt, read_fpt
from ditflow.fpt.mixture import FlowMixture
from ditflow.testing.tiny_fpt import TINY, build_tiny_fpt, random_reference_state_dict


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_fpt(build_tiny_fpt(tmp_path_factory.mktemp("fpt") / "tiny.safetensors"))


@pytest.fixture(scope="module")
def scene(model):
    """Two random 40×40 images, 3 pokes and 5 queries each (model units)."""
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 40, 40, generator=g) * 2 - 1
    return dict(features=model.embed_image(image), poke_pos=torch.rand(2, 3, 2, generator=g),
                poke_flow=torch.randn(2, 3, 2, generator=g) * 0.2, query_pos=torch.rand(2, 5, 2, generator=g))


# -- checkpoints ------------------------------------------------------------------------------------------------------


def test_config_is_read_back_from_the_authors_tensor_shapes():
    state = random_reference_state_dict(TINY, 0)
    assert infer_config(state, encoder_heads=TINY.encoder.heads, image_size=TINY.encoder.image_size) == TINY


def test_conversion_writes_safetensors_that_load(tmp_path):
    src = tmp_path / "fpt.pt"
    torch.save({"model": random_reference_state_dict(TINY, 0), "step": 7}, src)
    config = convert_checkpoint(src, tmp_path / "fpt.safetensors", encoder_heads=2, image_size=56)
    assert config == TINY
    tensors, read_config = read_fpt(tmp_path / "fpt.safetensors")
    assert read_config == TINY and not any("cross_out" in k for k in tensors)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left
    load_fpt(tmp_path / "fpt.safetensors")


class _NotATensor:
    pass


@pytest.mark.parametrize("payload, message", [
    ({"model": {"cond_emb.weight": torch.zeros(2, 4), "note": "hello"}}, "non-tensor entry 'note'"),
    ({"model": {"cond_emb.weight": torch.zeros(2, 4), "obj": _NotATensor()}}, "weights-only"),
    ({"model": {"other.weight": torch.zeros(2)}}, "not a Flow Poke Transformer state dict"),
    ([1, 2, 3], "holds no state dict"),
])
def test_conversion_refuses_anything_but_fpt_tensors(tmp_path, payload, message):
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(DiTFlowError, match=message):
        convert_checkpoint(tmp_path / "bad.pt", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_conversion_refuses_torch_older_than_2_6(tmp_path, monkeypatch):
    torch.save({"model": random_reference_state_dict(TINY, 0)}, tmp_path / "fpt.pt")
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    with pytest.raises(DiTFlowError, match="CVE-2025-32434"):
        convert_checkpoint(tmp_path / "fpt.pt", tmp_path / "out.safetensors")


def test_unknown_tensor_names_are_refused():
    from ditflow.fpt.checkpoint import convert_state_dict

    state = random_reference_state_dict(TINY, 0) | {"transformer.layers.0.extra.weight": torch.zeros(2)}
    with pytest.raises(DiTFlowError, match="unknown tensor 'transformer.layers.0.extra.weight'"):
        convert_state_dict(state, TINY)


def test_only_converted_safetensors_are_read(tmp_path):
    from safetensors.torch import save_file

    torch.save({"x": torch.zeros(1)}, tmp_path / "weights.pt")
    with pytest.raises(DiTFlowError, match="not a .safetensors file; convert"):
        read_fpt(tmp_path / "weights.pt")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(DiTFlowError, match="not a converted Flow Poke Transformer"):
        read_fpt(tmp_path / "other.safetensors")
    with pytest.raises(DiTFlowError, match="do not exist"):
        read_fpt(tmp_path / "missing.safetensors")


# -- predictors -------------------------------------------------------------------------------------------------------


def test_queries_are_independent_and_chunking_changes_nothing(model, scene):
    s = scene
    whole = model.predict_parallel(s["poke_pos"], s["poke_flow"], s["query_pos"], s["features"])
    one_by_one = model.predict_parallel(s["poke_pos"], s["poke_flow"], s["query_pos"], s["features"], chunk_size=1)
    alone = model.predict_parallel(s["poke_pos"], s["poke_flow"], s["query_pos"][:, 2:3], s["features"])
    torch.testing.assert_close(one_by_one.mean, whole.mean, atol=1e-6, rtol=1e-5)  # fp32 round-off
    torch.testing.assert_close(alone.mean, whole.mean[:, 2:3], atol=1e-6, rtol=1e-5)


def test_pokes_attend_causally_and_queries_see_every_poke(model, scene):
    """Changing the last poke leaves the earlier pokes' keys and values in every block unchanged (causal), and
    changes the queries' predictions."""
    from ditflow.fpt.layers import KVCache

    s = scene
    moved = s["poke_flow"].clone()
    moved[:, 2] += 0.5
    camera = torch.ones(2, dtype=torch.bool)
    caches = []
    for flows in (s["poke_flow"], moved):
        caches.append(KVCache(len(model.blocks), 3))
        model(s["poke_pos"], flows, 0, camera, s["features"], caches[-1])
    for block in range(len(model.blocks)):
        (k0, v0), (k1, v1) = caches[0].pokes(block), caches[1].pokes(block)
        torch.testing.assert_close(k0[:, :, :2], k1[:, :, :2], atol=0, rtol=0)
        torch.testing.assert_close(v0[:, :, :2], v1[:, :, :2], atol=0, rtol=0)
        assert not torch.allclose(k0[:, :, 2], k1[:, :, 2])
    base = model.predict_parallel(s["poke_pos"], s["poke_flow"], s["query_pos"], s["features"]).mean
    assert not torch.allclose(model.predict_parallel(s["poke_pos"], moved, s["query_pos"], s["features"]).mean, base)


def test_autoregressive_sampling_equals_a_naive_loop_over_parallel_predictions(model, scene):
    """Each AR sample is a draw from the parallel mixture given the pokes and all earlier samples (no KV cache)."""
    s = scene
    flows = model.predict_autoregressive(s["poke_pos"], s["poke_flow"], s["query_pos"], s["features"],
                                         generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    pos, flow = s["poke_pos"], s["poke_flow"]
    for i in range(s["query_pos"].shape[1]):
        query = s["query_pos"][:, i : i + 1]
        sample = model.predict_parallel(pos, flow, query, s["features"]).sample(g).float()
        torch.testing.assert_close(flows[:, i : i + 1], sample, atol=1e-5, rtol=1e-4)
        pos, flow = torch.cat([pos, query], 1), torch.cat([flow, sample], 1)


def test_camera_condition_reaches_the_prediction(model, scene):
    s = scene
    args = (s["poke_pos"], s["poke_flow"], s["query_pos"], s["features"])
    assert not torch.allclose(model.predict_parallel(*args, camera_static=True).mean,
                              model.predict_parallel(*args, camera_static=False).mean)


def test_bad_shapes_are_refused(model, scene):
    s = scene
    with pytest.raises(DiTFlowError, match=r"query positions must be \[2, n, 2\]"):
        model.predict_parallel(s["poke_pos"], s["poke_flow"], s["query_pos"][0], s["features"])
    with pytest.raises(DiTFlowError, match="3 poke positions but 2 poke flows"):
        model.predict_parallel(s["poke_pos"], s["poke_flow"][:, :2], s["query_pos"], s["features"])
    with pytest.raises(DiTFlowError, match="do not come from this model's encoder"):
        model.predict_parallel(s["poke_pos"], s["poke_flow"], s["query_pos"], s["features"][:, :8])
    with pytest.raises(DiTFlowError, match="square RGB images"):
        model.embed_image(torch.zeros(1, 3, 40, 30))


def test_bf16_autocast_stays_close_to_fp32(model, scene):
    s = scene
    args = (s["poke_pos"], s["poke_flow"], s["query_pos"], s["features"])
    reference = model.predict_parallel(*args).mean
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model.predict_parallel(*args)
    assert low.means.dtype == torch.float64  # the head stays fp64
    torch.testing.assert_close(low.mean, reference, atol=0.05, rtol=0.05)  # bf16 has 8 mantissa bits


# -- mixture head ----------------------------------------------------------------------------------------------------


def _mixture(seed=0, b=2, q=3, k=4) -> FlowMixture:
    g = torch.Generator().manual_seed(seed)
    return FlowMixture.from_head(torch.randn(b, q, 6 * k, generator=g), k)


def test_seeded_samples_equal_torch_distributions_samples():
    mixture = _mixture()
    torch.manual_seed(11)
    expected = mixture.distribution.sample()
    torch.testing.assert_close(mixture.sample(torch.Generator().manual_seed(11)), expected, atol=0, rtol=0)


def test_mean_is_the_weighted_component_mean_and_covariances_are_positive():
    mixture = _mixture()
    torch.testing.assert_close(mixture.mean, mixture.distribution.mean)
    eig = torch.linalg.eigvalsh(mixture.scale_tril @ mixture.scale_tril.transpose(-1, -2))
    assert (eig > 0).all() and mixture.scale_tril[..., 0, 1].eq(0).all()


def test_pixel_mass_sums_to_one_and_catches_sharp_modes():
    """Components 1e-4 wide (the head's floor) on a grid of 0.01 cells: the mass stays in the right cell (a point
    evaluation of the density would miss it or, smoothed, overshoot it), and the map sums to 1; also for a wide,
    strongly correlated mixture."""
    mixture = _mixture(b=1, q=1)
    mixture.means[:] = torch.tensor([0.105, -0.195], dtype=torch.float64)  # a cell centre
    mixture.scale_tril[:] = torch.eye(2, dtype=torch.float64) * 1e-4
    cell = 0.01
    centres = (torch.arange(-100, 100, dtype=torch.float64) + 0.5) * cell
    flows = torch.stack(torch.meshgrid(centres, centres, indexing="xy"), dim=-1)  # [rows (y), cols (x), 2]
    mass = mixture.pixel_mass(flows, cell)
    assert mass.sum().item() == pytest.approx(1.0, abs=1e-3)
    row, col = divmod(int(mass.argmax()), mass.shape[1])
    assert flows[row, col].tolist() == pytest.approx([0.105, -0.195])
    assert mass[row, col] == pytest.approx(1.0, abs=1e-3)
    wide = _mixture(seed=3, b=1, q=1)
    wide.means.mul_(0.1)
    wide.scale_tril.mul_(0.1)  # scales 0.01-0.2: inside the grid, several cells wide
    assert wide.pixel_mass(flows, cell).sum().item() == pytest.approx(1.0, abs=2e-3)
