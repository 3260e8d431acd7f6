# SPDX-License-Identifier: Apache-2.0
"""The Flow Poke Transformer on a GPU (``pytest -m gpu``; skipped where CUDA is absent, ``DITFLOW_TEST_DEVICE=cpu``
dry-runs it): the tiny FPT loaded as the Load FPT node loads it, moved to the device inside
``torch.inference_mode()`` as ComfyUI's model management moves it, then every pixel-level prediction in fp32 and
bf16 autocast. Image: 90×60 px; 8 query points along the longer side."""

from __future__ import annotations

import pytest
import torch

from ditflow.fpt import fields
from ditflow.fpt.checkpoint import load_fpt
from ditflow.fpt.pokes import parse_pokes
from ditflow.testing.tiny_fpt import build_tiny_fpt

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def models(tmp_path_factory, gpu_device):
    path = build_tiny_fpt(tmp_path_factory.mktemp("fpt") / "tiny.safetensors")
    with torch.inference_mode(False):
        on_device = load_fpt(path)
    with torch.inference_mode():
        on_device.to(gpu_device)
    return load_fpt(path), on_device


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_predictions_on_the_device_match_the_cpu(models, precision):
    cpu, gpu = models
    image = torch.rand(1, 60, 90, 3, generator=torch.Generator().manual_seed(0))
    pokes = parse_pokes("30,30,42,25")
    with torch.inference_mode():
        results = []
        for model, p in ((cpu, "fp32"), (gpu, precision)):
            embedding = fields.embed_image(model, image, "pad", p)
            results.append((
                fields.predict_flow(model, embedding, pokes, grid=8, precision=p),
                fields.predict_flow(model, embedding, pokes, mode="sample", grid=8, ar_grid=2, seed=3, precision=p),
                fields.motion_density(model, embedding, pokes, (40.0, 30.0), precision=p),
            ))
    for name, expected, actual in zip(("mean", "sample", "density"), *results):
        assert actual.device.type == "cpu" and torch.isfinite(actual).all(), name
        if precision == "fp32":
            torch.testing.assert_close(actual, expected, atol=1e-3, rtol=1e-3, msg=name)
        elif name != "sample":  # bf16 (8-bit mantissa): within 5 % of the largest value; a sample may pick
            # another mixture component where bf16 moves the weights, so it is only checked to be finite
            assert (actual - expected).abs().max() <= 0.05 * expected.abs().max(), name
