# SPDX-License-Identifier: Apache-2.0
"""What only a GPU can show (``pytest -m gpu``; skipped where CUDA is absent).

- Guidance in bf16 on CUDA, with the weights moved there under ``torch.inference_mode()`` as ComfyUI moves them:
  every mode and loss lowers its loss.
- The streamed AMF equals the naive one for bf16 queries/keys on CUDA (values and gradients).
- The node chain through the real ``comfy.model_management`` (when ComfyUI is importable): load → encode →
  extract → guided sampler → decode → evict → run again.

``DITFLOW_TEST_DEVICE=cpu`` dry-runs these tests on the CPU (same code, no CUDA), to check the suite itself.
Sizes: 9 frames → 3 latent frames; 64×96 px → latent 8×12 → 4×6 patches; tiny models have 4 blocks (block 1).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from ditflow import GuidanceConfig
from ditflow.backbones.cogvideox.loading import load_cogvideox
from ditflow.reference import extract_reference
from ditflow.sampler import sample
from ditflow.text import encode_prompt

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[1]
FRAMES, HEIGHT, WIDTH = 9, 64, 96
# 4 steps, the first 2 guided × 3 Adam iterations; a large lr so that the tiny random model's loss moves in bf16.
FAST = dict(num_inference_steps=4, guidance_fraction=0.5, opt_steps=3, lr_start=0.05, lr_end=0.02)


@pytest.fixture(scope="module")
def bf16_models(tiny_2b_path, tiny_5b_path, gpu_device):
    """Both tiny families in bf16; the transformer moved to the device under inference mode (ComfyUI's move)."""
    models = {}
    for family, path in (("2b", tiny_2b_path), ("5b", tiny_5b_path)):
        model = load_cogvideox(path, dtype="bf16", components=("transformer", "text_encoder", "tokenizer"))
        with torch.inference_mode():
            model.transformer.to(gpu_device)
        models[family] = model
    return models


@pytest.mark.parametrize("family,mode,loss", [
    ("5b", "latent", "amf"), ("5b", "rope", "amf"), ("2b", "latent", "amf"), ("2b", "posemb", "amf"),
    ("5b", "latent", "moft"), ("5b", "rope", "smm"), ("2b", "latent", "smm"), ("2b", "posemb", "moft"),
])
def test_every_mode_and_loss_lowers_its_loss_in_bf16(bf16_models, gpu_device, family, mode, loss):
    model = bf16_models[family]
    latents = torch.randn(1, 3, 16, 8, 12, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():  # as the nodes run
        reference = extract_reference(model, latents, [1], loss=loss)
        result = sample(model, encode_prompt(model, "a dog"), GuidanceConfig(mode=mode, loss=loss, **FAST),
                        reference=reference, seed=3)
    assert model.transformer.device.type == gpu_device.type and model.transformer.dtype == torch.bfloat16
    assert len(result.losses) == 2
    assert all(step[-1] < step[0] for step in result.losses), result.losses
    assert torch.isfinite(result.latents).all()


def test_streamed_amf_equals_naive_in_bf16(gpu_device):
    from amf_reference import naive_amf_loss, naive_attention_motion_flow

    from ditflow.amf import amf_loss, attention_motion_flow

    grid = (4, 6, 9)  # F, h, w → n = 216 tokens
    gen = torch.Generator().manual_seed(0)
    q0, k0 = (torch.randn(8, 216, 64, generator=gen).to(gpu_device, torch.bfloat16) for _ in range(2))
    reference = torch.randint(-3, 4, (16, 54, 2), generator=gen).float().to(gpu_device)
    out = {}
    for name, amf, loss in (("streamed", attention_motion_flow, amf_loss),
                            ("naive", naive_attention_motion_flow, naive_amf_loss)):
        q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
        soft = amf(q, k, grid, hard=False)
        loss(reference, soft).backward()
        out[name] = (soft.detach(), q.grad.float(), k.grad.float(), amf(q0, k0, grid, hard=True))
    (s_soft, s_gq, s_gk, s_hard), (n_soft, n_gq, n_gk, n_hard) = out["streamed"], out["naive"]
    assert s_soft.dtype == torch.float32 and s_soft.device.type == gpu_device.type
    torch.testing.assert_close(s_soft, n_soft, atol=1e-4, rtol=1e-4)  # both fp32 from the same bf16 inputs
    torch.testing.assert_close(s_gq, n_gq, atol=1e-3, rtol=1e-2)  # the gradients are cast back to bf16
    torch.testing.assert_close(s_gk, n_gk, atol=1e-3, rtol=1e-2)
    assert (s_hard != n_hard).any(dim=-1).float().mean() < 0.01  # argmax ties may break differently


# ---------------------------------------------------------------------------------------------------------------
# The node chain through the real ComfyUI model management
# ---------------------------------------------------------------------------------------------------------------


def _comfyui_folder() -> Path | None:
    for candidate in (os.environ.get("COMFYUI_PATH"), os.environ.get("COMFY_HOME") and
                      os.path.join(os.environ["COMFY_HOME"], "ComfyUI"), ROOT / ".device" / "comfy"):
        if candidate and (Path(candidate) / "comfy" / "model_management.py").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="module")
def real_comfy(tmp_path_factory, gpu_device):
    """The real ``comfy.model_management`` / ``folder_paths`` imported in-process; a models folder with tiny-5b."""
    from ditflow.testing.tiny_model import build_tiny_model

    folder = _comfyui_folder()
    if folder is None:
        pytest.skip("ComfyUI not found (set COMFYUI_PATH or COMFY_HOME)")
    sys.path.append(str(folder))
    names = ("comfy", "folder_paths")
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = gpu_device.type == "cpu"
        import comfy.model_management as mm
        import folder_paths
    except Exception as exc:  # a ComfyUI without its requirements in this Python
        sys.path.remove(str(folder))
        pytest.skip(f"ComfyUI at {folder} is not importable here: {type(exc).__name__}: {exc}")
    models = tmp_path_factory.mktemp("comfy_models")
    build_tiny_model(models / "tiny-5b", "5b")
    folder_paths.add_model_folder_path("CogVideo", str(models))
    yield mm
    mm.unload_all_models()
    sys.path.remove(str(folder))
    for name in [m for m in sys.modules if m.split(".")[0] in names]:
        del sys.modules[name]


def _moving_square() -> torch.Tensor:
    """IMAGE [9, 64, 96, 3] in [0, 1]: a white square moving 4 px right per frame on grey."""
    frames = torch.full((FRAMES, HEIGHT, WIDTH, 3), 0.3)
    for t in range(FRAMES):
        frames[t, 20:40, 8 + 4 * t : 28 + 4 * t] = 1.0
    return frames


def test_node_chain_runs_through_real_comfyui_and_again_after_eviction(real_comfy, gpu_device):
    import nodes as pack_nodes

    mm = real_comfy
    N = pack_nodes.NODE_CLASS_MAPPINGS

    def run(name, **kwargs):  # as ComfyUI's executor calls a node
        with torch.inference_mode():
            return getattr(N[name](), N[name].FUNCTION)(**kwargs)

    model = run("DiTFlowLoadCogVideoX", model="tiny-5b", precision="bf16", vae_tiling=False, vae_slicing=False)[0]
    cond = run("DiTFlowTextEncode", model=model, prompt="a leopard running", negative_prompt="")[0]
    latent = run("DiTFlowEncodeReference", model=model, images=_moving_square(), width=WIDTH, height=HEIGHT,
                 num_frames=FRAMES, start=0, stride=1, resize="crop")[0]
    amf = run("DiTFlowExtractAMF", model=model, reference=latent, blocks="1", temperature=2.0)[0]
    sampler = dict(model=model, conditioning=cond, amf=amf, steps=4, cfg=6.0, seed=3, guidance_fraction=0.5,
                   opt_steps=2, lr_start=0.002, lr_end=0.001, kv_injection=True, kv_block=0, num_frames=FRAMES,
                   width=WIDTH, height=HEIGHT)
    outputs = []
    for attempt in range(2):
        for mode in ("latent", "rope"):
            out, _ = run("DiTFlowGuidedSampler", mode=mode, **sampler)
            assert model.bundle.transformer.device.type == gpu_device.type  # it ran where ComfyUI put it
            images = run("DiTFlowDecode", model=model, samples=out)[0]
            assert images.shape == (FRAMES, HEIGHT, WIDTH, 3) and torch.isfinite(images).all()
            outputs.append(out["samples"])
        with torch.inference_mode():
            mm.unload_all_models()  # as the executor's OOM handler or --disable-smart-memory does between prompts
        assert not mm.loaded_models()
    assert all(o.shape == (1, 16, 3, 8, 12) for o in outputs)


# ---------------------------------------------------------------------------------------------------------------
# Full size: a 5b guided pass at 49 frames 480×720 on a 24 GB budget
# ---------------------------------------------------------------------------------------------------------------


def _random_model(size: str, device: torch.device):
    """A random-init CogVideoX of ``size`` from the real configs in benchmarks/guidance_overhead.py (bf16, no VAE;
    T5 replaced by a random embedding table of its width)."""
    import importlib.util

    name = "ditflow_benchmark_guidance_overhead"
    bench = sys.modules.get(name)
    if bench is None:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "guidance_overhead.py")
        bench = sys.modules[name] = importlib.util.module_from_spec(spec)  # its dataclasses look themselves up
        spec.loader.exec_module(bench)
    return bench.build_model(size, str(device), torch.bfloat16, "none")


def _guided_peak(model, grid, budget: int, block: int = 20) -> tuple[float, object, list]:
    """Peak allocated bytes of extract → guided sample (rope, 1 guided step × 2 iterations) with the checkpointing
    :func:`plan_sampling` picks for ``budget``; allocations beyond ``budget`` fail (per-process memory cap)."""
    from ditflow.memory import module_bytes, plan_sampling

    device = model.transformer.device
    frames, h, w = grid
    latents = torch.randn(1, frames, 16, 2 * h, 2 * w, generator=torch.Generator().manual_seed(0))
    config = GuidanceConfig(mode="rope", num_inference_steps=2, guidance_fraction=0.5, opt_steps=2)
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)
    try:
        torch.cuda.reset_peak_memory_stats(device)
        with torch.inference_mode():
            prompt = encode_prompt(model, "a leopard running up a snowy hill")
            reference = extract_reference(model, latents, [block], empty_prompt=encode_prompt(model, "").cond)
            # what a memory manager could give the transformer: the budget less everything else allocated
            free = budget - torch.cuda.memory_allocated(device) + module_bytes(model.transformer)
            plan = plan_sampling(model, config, free, reference=reference)
            result = sample(model, prompt, dataclasses.replace(config, gradient_checkpointing=plan.gradient_checkpointing),
                            reference=reference, seed=0)
        return torch.cuda.max_memory_allocated(device), plan, result.losses
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def test_full_size_5b_guided_pass_fits_24_gb(gpu_device):
    if gpu_device.type != "cuda":
        pytest.skip("full size needs CUDA (no dry run on the CPU)")
    budget = int(24e9)
    if torch.cuda.mem_get_info(gpu_device)[0] < budget:
        pytest.skip("needs 24 GB of free GPU memory")
    model = _random_model("5b", gpu_device)
    peak, plan, losses = _guided_peak(model, (13, 30, 45), budget)  # 49 frames, 480×720
    print(f"5b guided pass, 49 frames 480×720: peak allocated {peak / 1e9:.2f} GB; {plan.checkpointing_reason}")
    assert plan.gradient_checkpointing  # 58 GB without it
    assert peak <= budget
    assert len(losses) == 1 and all(math.isfinite(x) for x in losses[0])
