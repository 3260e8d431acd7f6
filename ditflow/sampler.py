# SPDX-License-Identifier: Apache-2.0
"""Guided sampling, DiTFlow Alg. 1 (§4.3), as a loop that reads like diffusers' ``CogVideoXPipeline.__call__``.

Per denoising step t:
  1. (guided steps, injection on) noise the reference latents to t with the run's own initial noise, one
     truncated pass with the target prompt, keep video K/V at the injection blocks (§3 "KV injection").
  2. (guided steps, optimisation on) K_opt Adam steps, a fresh Adam each step, on z_t or the positional
     embeddings: truncated pass, target prompt only (no CFG), soft AMF at the guidance blocks, Eq. 8 loss — or,
     for the baselines (``GuidanceConfig.loss`` ``moft``/``smm``), the block-output features and their loss
     (:mod:`ditflow.losses`).
  3. the normal CFG step, cond and uncond batched, with the optimised z_t / embeddings and the injected K/V.

Differs from the authors' script (method.md §6): the last guided step uses exactly ``lr_end``; the model runs in
its own dtype while optimised tensors stay fp32; the reference K/V pass is skipped when injection is off; cond and
uncond run as one batch. Defaults: :class:`~ditflow.config.GuidanceConfig`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .amf import amf_loss, attention_motion_flow
from .attention import AttentionController, controlled_attention
from .config import GuidanceConfig, Loss, Mode
from .embeds import PositionEmbeds
from .errors import DiTFlowError
from .forward import forward_until
from .layout import token_grid
from .losses import moft_channels, moft_loss, smm_loss, video_features
from .positions import owned_sincos, rope_tables, sincos_table, stack_rope, unstack_rope
from .reference import ReferenceMotion
from .text import PromptEmbeds

#: ``callback(info)`` gets a dict with the fixed keys ``step`` (0-based denoising step), ``num_steps``,
#: ``timestep``, ``iteration`` (Adam iteration, or ``None`` after the denoising update), ``loss`` (float or
#: ``None``) and ``latents`` (``[1, F, C, H, W]``). It may raise to cancel; the model is restored either way.
Callback = Callable[[dict], None]


@dataclass
class SampleResult:
    """Output of :func:`sample`.

    Attributes:
        latents: scaled latents ``[1, F, C, H, W]``, float32, CPU.
        embeds: optimised positional embeddings per guided step (modes ``rope``/``posemb``), else ``None``.
        losses: per guided step, the guidance loss (AMF, MOFT or SMM) at each Adam iteration (before that
            iteration's update).
        timings: seconds per phase: ``kv_reference``, ``optimisation``, ``denoising``.
    """

    latents: Tensor
    embeds: PositionEmbeds | None
    losses: list[list[float]]
    timings: dict[str, float] = field(default_factory=dict)


def _resolve_grid(model, reference, embeds, size) -> tuple[int, int, int]:
    grids = {}
    if size is not None:
        grids["requested size"] = token_grid(*size)
    if reference is not None:
        grids["reference"] = tuple(reference.grid)
    if embeds is not None:
        grids["embeddings"] = tuple(embeds.grid)
    if not grids:
        raise DiTFlowError("give a size (frames, height, width), a reference or embeddings to sample.")
    (first, g0), *rest = grids.items()
    for name, g in rest:
        if g != g0:
            raise DiTFlowError(
                f"the {name} has latent grid F×h×w = {'×'.join(map(str, g))} but the {first} has "
                f"{'×'.join(map(str, g0))}; use the same frame count and size for both."
            )
    return g0


def _dynamic_scale(scale: float, t: Tensor, steps: int) -> float:
    # diffusers' CogVideoXPipeline formula, kept as is for parity (it mixes t in 0..999 with the step count).
    return 1 + scale * ((1 - math.cos(math.pi * ((steps - t.item()) / steps) ** 5.0)) / 2)


def _step_kwargs(scheduler, generator) -> dict:
    # As diffusers' prepare_extra_step_kwargs with eta = 0: the DPM scheduler draws its noise from `generator`.
    import inspect

    params = inspect.signature(scheduler.step).parameters
    return {k: v for k, v in (("eta", 0.0), ("generator", generator)) if k in params}


def _scheduler_step(scheduler, noise_pred, old_pred, t, t_prev, latents, kwargs):
    from diffusers import CogVideoXDPMScheduler

    if isinstance(scheduler, CogVideoXDPMScheduler):
        return scheduler.step(noise_pred, old_pred, t, t_prev, latents, **kwargs, return_dict=False)
    return scheduler.step(noise_pred, t, latents, **kwargs, return_dict=False)[0], None


def _amf_objective(captured, ref_amf, grid, temperature) -> Tensor:
    """Eq. 8 averaged over guidance blocks: AMF loss between the reference and the soft AMF of this pass."""
    losses = [
        amf_loss(ref_amf[b], attention_motion_flow(q[0], k[0], grid, temperature=temperature, hard=False))
        for b, (q, k) in sorted(captured.items())
    ]
    return torch.stack(losses).mean()


def _feature_objective(outputs, targets, grid, loss: Loss) -> Tensor:
    """MOFT or SMM loss (:mod:`ditflow.losses`) averaged over guidance blocks, on the block outputs of this pass.

    ``targets``: block → (reference features ``[F, C, h, w]``, MOFT channels or ``None``).
    """
    losses = []
    for b, hidden in sorted(outputs.items()):
        generated = video_features(hidden, grid)
        reference, channels = targets[b]
        losses.append(moft_loss(generated, reference, channels) if loss is Loss.MOFT else smm_loss(generated, reference))
    return torch.stack(losses).mean()


def _blocks_from_reference(config: GuidanceConfig, reference: ReferenceMotion | None) -> GuidanceConfig:
    if reference is None or not reference.has(config.loss):
        return config
    if not config.guidance_blocks:
        return dataclasses.replace(config, guidance_blocks=reference.blocks)
    if tuple(sorted(set(config.guidance_blocks))) != reference.blocks:
        raise DiTFlowError(
            f"guidance blocks {list(config.guidance_blocks)} differ from the blocks {list(reference.blocks)} the "
            "reference motion was extracted at; extract it at the blocks you guide with."
        )
    return config


def sample(
    model,
    prompt: PromptEmbeds,
    config: GuidanceConfig = GuidanceConfig(),
    *,
    size: tuple[int, int, int] | None = None,
    seed: int = 0,
    reference: ReferenceMotion | None = None,
    embeds: PositionEmbeds | None = None,
    callback: Callback | None = None,
) -> SampleResult:
    """Generates latents for ``prompt``, guided toward the reference motion (Alg. 1).

    Args:
        model: a loaded :class:`~ditflow.loading.CogVideoX`.
        prompt: target and negative prompt embeddings (:func:`~ditflow.text.encode_prompt`).
        config: guidance settings; its guidance blocks must match the reference's (``()`` takes them from it).
        size: (frames, height, width) in video pixels; optional when a reference or embeddings fix the grid.
        seed: seed of the initial noise (and of the DPM scheduler's noise); bit-reproducible on CPU.
        reference: reference motion (:func:`~ditflow.reference.extract_reference`); needed for optimisation and
            for KV injection.
        embeds: saved positional embeddings to inject zero-shot (no optimisation; the reference is optional).
        callback: see :data:`Callback`.
    Raises:
        DiTFlowError: incompatible grids, blocks, modes or embeddings; optimisation without a reference.
    """
    transformer = model.transformer
    grid = _resolve_grid(model, reference, embeds, size)
    mode = config.mode
    optimise = embeds is None and mode is not Mode.NONE and config.opt_steps > 0 and config.num_guided_steps > 0
    if optimise and reference is None:
        raise DiTFlowError(f"mode '{mode.value}' optimises toward a reference motion: give a reference video.")
    if optimise and not reference.has(config.loss):
        held = "features (MOFT/SMM)" if reference.features else ("an AMF" if reference.amf else "no motion")
        raise DiTFlowError(
            f"loss '{config.loss.value}' needs a reference extracted for it, but this reference holds {held}; "
            f"extract the reference with loss '{config.loss.value}'."
        )
    config = _blocks_from_reference(config, reference).resolved(model.family, model.num_blocks)
    if embeds is not None:
        embeds.check_compatible(model, grid, config.num_inference_steps)
    inject = bool(config.kv_injection_blocks) and reference is not None

    device, dtype = transformer.device, transformer.dtype
    frames, h, w = grid
    p = model.patch_size
    with torch.inference_mode(False):
        # 1. Inputs: clone so that tensors made under ComfyUI's inference_mode can enter autograd.
        cond = prompt.cond.to(device, dtype).clone()
        uncond = prompt.uncond.to(device, dtype).clone()
        do_cfg = config.guidance_scale > 1.0
        text_cfg = torch.cat([uncond, cond]) if do_cfg else cond
        ref_amf = {b: a.to(device).float().clone() for b, a in reference.amf.items()} if reference is not None else {}
        feature_targets = {}
        if optimise and config.loss.uses_features:  # reference features and MOFT's motion channels, once per run
            for b in config.guidance_blocks:
                ref = reference.features[b].to(device).float().clone()
                feature_targets[b] = (ref, moft_channels(ref) if config.loss is Loss.MOFT else None)
        ref_latents = reference.latents.to(device, dtype).clone() if inject else None

        # 2. Timesteps and initial noise, as the diffusers pipeline draws them.
        from diffusers.utils.torch_utils import randn_tensor

        scheduler = model.make_scheduler()
        scheduler.set_timesteps(config.num_inference_steps, device=device)
        timesteps = scheduler.timesteps
        generator = torch.Generator(device="cpu").manual_seed(seed)
        shape = (1, frames, transformer.config.in_channels, h * p, w * p)
        noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        latents = noise * scheduler.init_noise_sigma
        step_kwargs = _step_kwargs(scheduler, generator)

        # 3. Positions: RoPE tables (5B) or the owned sin-cos table (2B); trainable copies for ρ_t.
        stock_rope = rope_tables(transformer, grid, device) if model.family == "5b" else None
        stock_table = sincos_table(transformer, grid).to(device) if model.family == "2b" else None
        position = {"table": stock_table}
        trainable = None
        if optimise and mode is Mode.ROPE:
            trainable = stack_rope(*stock_rope)
        elif optimise and mode is Mode.POSEMB:
            trainable = stock_table.clone()
        saved_tables: list[Tensor] = []

        controller = AttentionController()
        losses: list[list[float]] = []
        timings = {"kv_reference": 0.0, "optimisation": 0.0, "denoising": 0.0}
        old_pred_original = None
        with controlled_attention(transformer, controller), owned_sincos(transformer, lambda: position["table"]):
            for i, t in enumerate(timesteps):
                guided = i < config.num_guided_steps
                info = {"step": i, "num_steps": len(timesteps), "timestep": int(t)}

                # 4. Reference K/V for injection (guided steps only).
                kv = {}
                if guided and inject:
                    tic = time.perf_counter()
                    z_ref = scheduler.add_noise(ref_latents, noise, t.reshape(1))
                    controller.reset(record_kv_blocks=frozenset(config.kv_injection_blocks),
                                     stop_block=max(config.kv_injection_blocks))
                    with torch.no_grad():
                        forward_until(transformer, controller, z_ref, cond, t.expand(1), image_rotary_emb=stock_rope)
                    kv = dict(controller.recorded_kv)
                    timings["kv_reference"] += time.perf_counter() - tic

                # 5. Optimisation of z_t or of the positional embeddings (Alg. 1 inner loop).
                if guided and optimise:
                    tic = time.perf_counter()
                    param = latents.detach().float().clone() if mode is Mode.LATENT else trainable
                    param.requires_grad_(True)
                    optimiser = torch.optim.Adam([param], lr=config.learning_rate(i))
                    step_losses = []
                    for k in range(config.opt_steps):
                        if config.loss.uses_features:  # the guidance blocks run in full: their outputs are read
                            controller.reset(capture_outputs=frozenset(config.guidance_blocks), inject_kv=kv)
                        else:  # early exit after the deepest guidance block's Q/K
                            controller.reset(capture_blocks=frozenset(config.guidance_blocks),
                                             stop_block=max(config.guidance_blocks), inject_kv=kv)
                        z_in = param.to(dtype) if mode is Mode.LATENT else latents
                        if mode is Mode.ROPE:
                            controller.rope = unstack_rope(param)
                        if mode is Mode.POSEMB:
                            position["table"] = param
                        with torch.enable_grad():
                            forward_until(transformer, controller, z_in, cond, t.expand(1), image_rotary_emb=stock_rope,
                                          gradient_checkpointing=config.gradient_checkpointing)
                            if config.loss.uses_features:
                                loss = _feature_objective(controller.outputs, feature_targets, grid, config.loss)
                            else:
                                loss = _amf_objective(controller.captured, ref_amf, grid, config.temperature)
                            optimiser.zero_grad(set_to_none=True)
                            loss.backward()
                        optimiser.step()
                        step_losses.append(loss.item())
                        if callback is not None:
                            callback({**info, "iteration": k, "loss": step_losses[-1], "latents": latents})
                    param.requires_grad_(False)
                    losses.append(step_losses)
                    if mode is Mode.LATENT:
                        latents = param.detach().to(dtype)
                    else:
                        trainable = param.detach()
                        saved_tables.append(trainable.clone().cpu())
                    timings["optimisation"] += time.perf_counter() - tic

                # 6. The CFG denoising step with what guidance produced.
                tic = time.perf_counter()
                controller.reset(inject_kv=kv)
                table = None
                if guided and optimise and mode is not Mode.LATENT:
                    table = trainable
                elif embeds is not None and i < len(embeds.tables):
                    table = embeds.tables[i].to(device)
                if table is not None and model.family == "5b":
                    controller.rope = unstack_rope(table)
                position["table"] = table if (table is not None and model.family == "2b") else stock_table
                with torch.no_grad():
                    model_in = torch.cat([latents] * 2) if do_cfg else latents
                    model_in = scheduler.scale_model_input(model_in, t)
                    noise_pred = transformer(hidden_states=model_in, encoder_hidden_states=text_cfg,
                                             timestep=t.expand(model_in.shape[0]), image_rotary_emb=stock_rope,
                                             return_dict=False)[0].float()
                scale = _dynamic_scale(config.guidance_scale, t, len(timesteps)) if config.dynamic_cfg else config.guidance_scale
                if do_cfg:
                    noise_uncond, noise_text = noise_pred.chunk(2)
                    noise_pred = noise_uncond + scale * (noise_text - noise_uncond)
                latents, old_pred_original = _scheduler_step(
                    scheduler, noise_pred, old_pred_original, t, timesteps[i - 1] if i > 0 else None, latents, step_kwargs)
                latents = latents.to(dtype)
                timings["denoising"] += time.perf_counter() - tic
                if callback is not None:
                    callback({**info, "iteration": None, "loss": losses[-1][-1] if guided and optimise else None,
                              "latents": latents})

    result_embeds = None
    if saved_tables:
        result_embeds = PositionEmbeds(
            mode=mode, family=model.family, grid=grid, head_dim=transformer.config.attention_head_dim,
            num_inference_steps=config.num_inference_steps,
            timesteps=tuple(int(t) for t in timesteps[: len(saved_tables)]), tables=saved_tables,
            prompt=prompt.prompt,
        )
    return SampleResult(latents=latents.float().cpu(), embeds=result_embeds, losses=losses, timings=timings)
