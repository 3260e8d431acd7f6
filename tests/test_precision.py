# SPDX-License-Identifier: Apache-2.0
"""Guided sampling in the models' own half precisions: bf16 (5B's weights) and fp16 (2B's), on the tiny models.

fp16 cannot hold the small gradients of the AMF loss on the real models (a mean over up to 2.3·10⁵ entries): they
flush to zero in the fp16 backward and Adam steps along the sign of what is left. The tiny models' loss is a mean
over 216 entries (3² frame pairs × 24 patches), so their gradients fit; multiplying the loss by 10⁻⁵ puts them
where the real ones are (mean |∂L/∂z_t| ≈ 3·10⁻⁸) without changing Adam's update direction in fp32.
"""

from __future__ import annotations

import pytest
import torch

import ditflow.objectives
from ditflow import GuidanceConfig
from ditflow.reference import extract_reference
from ditflow.sampler import sample
from ditflow.text import encode_prompt

#: 4 steps, the first 2 guided, 3 Adam iterations each at the paper's lr.
PAPER_LR = dict(num_inference_steps=4, guidance_fraction=0.5, opt_steps=3)


@pytest.fixture(scope="module")
def half_models(tiny_2b_path, tiny_5b_path):
    from ditflow.backbones.cogvideox.loading import load_cogvideox

    paths = {"2b": tiny_2b_path, "5b": tiny_5b_path}
    return {(f, d): load_cogvideox(p, dtype=d) for f, p in paths.items() for d in ("fp16", "bf16")}


def _reference(model, grid):
    frames, h, w = grid
    latents = torch.randn(1, frames, 16, 2 * h, 2 * w, generator=torch.Generator().manual_seed(1))
    return extract_reference(model, latents, [1])


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("family,mode", [("2b", "latent"), ("2b", "posemb"), ("5b", "latent"), ("5b", "rope")])
def test_half_precision_guided_runs_lower_the_loss_and_stay_finite(half_models, grid, family, mode, dtype):
    model = half_models[(family, dtype)]
    result = sample(model, encode_prompt(model, "a dog"), GuidanceConfig(mode=mode, **PAPER_LR),
                    reference=_reference(model, grid), seed=3)
    assert torch.isfinite(result.latents).all()
    for step_losses in result.losses:
        assert step_losses[-1] < step_losses[0]
    if mode != "latent":
        assert all(torch.isfinite(t).all() and t.dtype == torch.float32 for t in result.embeds.tables)


@pytest.mark.parametrize("family", ["2b", "5b"])
def test_fp16_guidance_keeps_small_gradients(tiny_models, half_models, grid, monkeypatch, family):
    """Loss scaling: the fp16 model's gradient points where the fp32 model's does, element by element (Adam's first
    step is lr·sign(g)). Unscaled, half of it flushes to zero and a third to two-thirds of the signs are wrong."""
    grads = []

    class Spy(torch.optim.Adam):
        def step(self, closure=None):
            grads.append(self.param_groups[0]["params"][0].grad.detach().clone())
            return super().step(closure)

    real_loss = ditflow.objectives.amf_loss  # the AMF objective's loss (what the sampler optimises)
    monkeypatch.setattr(ditflow.objectives, "amf_loss", lambda ref, gen, **kw: real_loss(ref, gen, **kw) * 1e-5)
    monkeypatch.setattr(torch.optim, "Adam", Spy)
    cfg = GuidanceConfig(mode="latent", num_inference_steps=2, guidance_fraction=0.5, opt_steps=1)
    for model in (tiny_models[family], half_models[(family, "fp16")]):  # ∂L/∂z_t of the first Adam iteration
        sample(model, encode_prompt(model, "a dog"), cfg, reference=_reference(model, grid), seed=3)
    fp32, fp16 = grads
    assert fp32.abs().mean() < 1e-7  # the regime of the real models
    assert (fp16 == 0).float().mean() < 0.01
    assert (fp16.sign() == fp32.sign()).float().mean() > 0.97  # bf16, with its 8-bit mantissa, reaches 0.97–0.99
    assert torch.nn.functional.cosine_similarity(fp16.flatten(), fp32.flatten(), dim=0) > 0.99


def test_loss_scaler_halves_and_retries_on_overflow_and_unscales_exactly():
    from ditflow.optim import INIT_SCALE, LossScaler

    param = torch.tensor([1.0, -2.0], requires_grad=True)
    scaler = LossScaler(enabled=True)
    # ∂/∂p = 1000 per element, carried by an fp16 tensor: finite only while 1000 · scale ≤ 65504 (fp16's max),
    # i.e. from scale 64 = 2¹⁶ / 2¹⁰ down: ten overflows, each halving the scale, then one good backward.
    attempts = 1
    while not scaler.backward((param.half() * 1000.0).float().sum(), param):
        assert param.grad is None  # nothing half-scaled is left for the optimiser
        attempts += 1
    assert (attempts, scaler.scale) == (11, INIT_SCALE / 2**10)
    assert torch.equal(param.grad, torch.tensor([1000.0, 1000.0]))  # unscaled exactly (powers of two)


def test_loss_scaler_off_is_a_plain_backward_and_refuses_a_gradient_that_is_never_finite():
    from ditflow.errors import DiTFlowError
    from ditflow.optim import LossScaler

    param = torch.tensor([3.0], requires_grad=True)
    plain = LossScaler(enabled=False)
    assert plain.backward((param * 2).sum(), param) and plain.scale == 1.0 and param.grad.item() == 2.0
    param.grad = None
    scaler = LossScaler(enabled=True)
    with pytest.raises(DiTFlowError, match="bf16"):  # a finite loss whose fp16 gradient (10⁵) overflows at scale 1
        while not scaler.backward((param.half().float() * 1e5).sum(), param):
            pass
