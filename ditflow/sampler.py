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
its own dtype while optimised tensors stay fp32 (an fp16 model's backward is loss-scaled, :mod:`ditflow.optim`);
the reference K/V pass is skipped when injection is off; cond and uncond run as one batch; the loss, the optimised
tensor and the latents are checked after every iteration and step, and a NaN, Inf or blow-up stops the run with the
step, the cause and the fix (the authors' script writes a black video). Defaults: :class:`~ditflow.config.GuidanceConfig`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .amf import amf_loss, attention_motion_flow
from .attention import AttentionController, controlled_attention
from .config import GuidanceConfig, Loss, Mode
from .embeds import PositionEmbeds
from .errors import DiTFlowError, check_finite
from .forward import forward_until
from .inference_tensors import replace_inference_tensors
from .layout import PIXELS_PER_PATCH, token_grid, video_frames
from .losses import moft_channels, moft_loss, smm_loss, video_features
from .optim import LossScaler
from .positions import owned_sincos, rope_tables, sincos_table, stack_rope, unstack_rope
from .reference import ReferenceMotion
from .text import PromptEmbeds

#: ``callback(info)`` gets a dict with the fixed keys ``step`` (0-based denoising step), ``num_steps``,
#: ``timestep``, ``iteration`` (Adam iteration, or ``None`` after the denoising update), ``loss`` (float or
#: ``None``), ``latents`` (``[1, F, C, H, W]``) and ``denoised`` (after the denoising update: the scheduler's
#: prediction of the clean latents, scaled, ``[1, F, C, H, W]``, for previews; ``None`` during Adam iterations).
#: It may raise to cancel; the model is restored either way.
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
        prompt_used, negative_prompt_used: the texts the conditioning encodes (cut to the text encoder's length;
            see :func:`~ditflow.text.encode_prompt`).
    """

    latents: Tensor
    embeds: PositionEmbeds | None
    losses: list[list[float]]
    timings: dict[str, float] = field(default_factory=dict)
    prompt_used: str = ""
    negative_prompt_used: str = ""


def sampling_grid(reference=None, embeds=None, size=None) -> tuple[int, int, int]:
    """The latent token grid (F, h, w) a :func:`sample` call runs at: from ``size`` (frames, height, width in px),
    the reference or the embeddings, which must agree; raises :class:`DiTFlowError` if none is given or they differ.
    """
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
    """(next latents, predicted clean latents); the DPM scheduler also needs the previous prediction."""
    from diffusers import CogVideoXDPMScheduler

    if isinstance(scheduler, CogVideoXDPMScheduler):
        return scheduler.step(noise_pred, old_pred, t, t_prev, latents, **kwargs, return_dict=False)
    return scheduler.step(noise_pred, t, latents, **kwargs, return_dict=False)[:2]


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


def _check_inputs(model, config: GuidanceConfig, reference, embeds, size):
    """Fails before any compute, quoting the bad values; returns (grid, resolved config, optimise?)."""
    grid = sampling_grid(reference, embeds, size)
    optimise = embeds is None and config.mode is not Mode.NONE and config.opt_steps > 0 and config.num_guided_steps > 0
    if optimise and reference is None:
        raise DiTFlowError(f"mode '{config.mode.value}' optimises toward a reference motion: give a reference video.")
    if optimise and not reference.has(config.loss):
        held = "features (MOFT/SMM)" if reference.features else ("an AMF" if reference.amf else "no motion")
        raise DiTFlowError(
            f"loss '{config.loss.value}' needs a reference extracted for it, but this reference holds {held}; "
            f"extract the reference with loss '{config.loss.value}'."
        )
    config = _blocks_from_reference(config, reference).resolved(model.family, model.num_blocks)
    if embeds is not None:
        embeds.check_compatible(model, grid, config.num_inference_steps)
        embeds.check_values()
        # A replay's guided window (where KV injection runs) is the saved steps', whatever T_opt says.
        config = dataclasses.replace(config, guidance_fraction=len(embeds.tables) / config.num_inference_steps)
    return grid, config, optimise


#: What to change when the model itself turns healthy inputs into NaN/Inf.
_MODEL_FIX = ("the model turns finite inputs into NaN/Inf: its weights are damaged (re-download or re-convert them) "
              "or its dtype overflows (with fp16 try bf16 or fp32)")


class _GuidedRun:
    """State of one sampling run; one method per phase of a denoising step (see the module docstring).

    Built and used inside ``torch.inference_mode(False)``: inputs are cloned there so that tensors made under
    ComfyUI's inference mode can enter autograd.
    """

    def __init__(self, model, prompt, config, grid, optimise, seed, reference, embeds, callback):
        from diffusers.utils.torch_utils import randn_tensor

        self.model, self.config, self.grid, self.optimise, self.seed = model, config, grid, optimise, seed
        self.embeds, self.callback = embeds, callback
        transformer = self.transformer = model.transformer
        device, dtype = self.device, self.dtype = transformer.device, transformer.dtype
        # KV injection needs reference latents; a target made from a flow field has none (ditflow.motion_target)
        self.inject = bool(config.kv_injection_blocks) and reference is not None and reference.latents is not None

        # 1. Text (cond and uncond batched for CFG) and the reference's targets.
        self.cond = prompt.cond.to(device, dtype).clone()
        self.do_cfg = config.guidance_scale > 1.0
        self.text_cfg = torch.cat([prompt.uncond.to(device, dtype), self.cond]) if self.do_cfg else self.cond
        self.ref_latents = reference.latents.to(device, dtype).clone() if self.inject else None
        self.ref_amf, self.feature_targets = {}, {}
        if optimise and config.loss is Loss.AMF:
            self.ref_amf = {b: reference.amf[b].to(device).float().clone() for b in config.guidance_blocks}
        elif optimise:  # reference features and MOFT's motion channels, once per run
            for b in config.guidance_blocks:
                ref = reference.features[b].to(device).float().clone()
                self.feature_targets[b] = (ref, moft_channels(ref) if config.loss is Loss.MOFT else None)

        # 2. Timesteps and initial noise, drawn as the diffusers pipeline draws them.
        self.scheduler = model.make_scheduler()
        self.scheduler.set_timesteps(config.num_inference_steps, device=device)
        self.timesteps = self.scheduler.timesteps
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        frames, h, w = grid
        p = model.patch_size
        shape = (1, frames, transformer.config.in_channels, h * p, w * p)
        self.noise = randn_tensor(shape, generator=self.generator, device=device, dtype=dtype)
        self.latents = self.noise * self.scheduler.init_noise_sigma
        self.step_kwargs = _step_kwargs(self.scheduler, self.generator)
        self.old_pred_original = None

        # 3. Positions: RoPE tables (5B) or the owned sin-cos table (2B); a trainable copy for ρ_t, warm-started
        #    across guided steps.
        self.stock_rope = rope_tables(transformer, grid, device) if model.family == "5b" else None
        self.stock_table = sincos_table(transformer, grid).to(device) if model.family == "2b" else None
        self.table = self.stock_table  # what the patch embedding adds on 2B (owned_sincos reads it every pass)
        self.trainable = None
        if optimise and config.mode is Mode.ROPE:
            self.trainable = stack_rope(*self.stock_rope)
        elif optimise and config.mode is Mode.POSEMB:
            self.trainable = self.stock_table.clone()

        self.controller = AttentionController()
        self.scaler = LossScaler(enabled=dtype == torch.float16)  # fp16 gradients underflow without it
        self.saved_tables: list[Tensor] = []
        self.losses: list[list[float]] = []
        self.timings = {"kv_reference": 0.0, "optimisation": 0.0, "denoising": 0.0}

    def hooks(self):
        """The model patches of the whole run, restored in ``finally`` (also on error or cancel)."""
        stack = contextlib.ExitStack()
        stack.enter_context(controlled_attention(self.transformer, self.controller))
        stack.enter_context(owned_sincos(self.transformer, lambda: self.table))
        return stack

    def _timed(self, phase: str, tic: float) -> None:
        self.timings[phase] += time.perf_counter() - tic

    def reference_kv(self, t: Tensor) -> dict:
        """§3 KV injection: the reference noised to ``t`` with the run's own noise, target prompt, stock positions
        (never the optimised ρ, as in the authors' code); video K/V at the injection blocks."""
        tic = time.perf_counter()
        blocks = self.config.kv_injection_blocks
        z_ref = self.scheduler.add_noise(self.ref_latents, self.noise, t.reshape(1))
        self.controller.reset(record_kv_blocks=frozenset(blocks), stop_block=max(blocks))  # clears any ρ (5B)
        self.table = self.stock_table  # stock positions on 2B too, whatever ρ the last pass used
        with torch.no_grad():
            forward_until(self.transformer, self.controller, z_ref, self.cond, t.expand(1),
                          image_rotary_emb=self.stock_rope)
        self._timed("kv_reference", tic)
        return dict(self.controller.recorded_kv)

    def _loss(self, param: Tensor, t: Tensor, kv: dict) -> Tensor:
        """One optimisation pass: target prompt only (no CFG), truncated at the guidance blocks."""
        config, controller, mode = self.config, self.controller, self.config.mode
        blocks = frozenset(config.guidance_blocks)
        if config.loss.uses_features:  # the guidance blocks run in full: their outputs are read
            controller.reset(capture_outputs=blocks, inject_kv=kv)
        else:  # early exit right after the deepest guidance block's Q/K
            controller.reset(capture_blocks=blocks, stop_block=max(blocks), inject_kv=kv)
        if mode is Mode.ROPE:
            controller.rope = unstack_rope(param)
        if mode is Mode.POSEMB:
            self.table = param
        z_in = param.to(self.dtype) if mode is Mode.LATENT else self.latents
        forward_until(self.transformer, controller, z_in, self.cond, t.expand(1), image_rotary_emb=self.stock_rope,
                      gradient_checkpointing=config.gradient_checkpointing)
        if config.loss.uses_features:
            return _feature_objective(controller.outputs, self.feature_targets, self.grid, config.loss)
        return _amf_objective(controller.captured, self.ref_amf, self.grid, config.temperature)

    def optimise_step(self, i: int, t: Tensor, kv: dict, info: dict) -> None:
        """Alg. 1 inner loop: K_opt Adam iterations, a fresh Adam, on z_t or the positional embeddings."""
        tic = time.perf_counter()
        latent_mode = self.config.mode is Mode.LATENT
        param = self.latents.detach().float().clone() if latent_mode else self.trainable
        param.requires_grad_(True)
        optimiser = torch.optim.Adam([param], lr=self.config.learning_rate(i))
        step_losses = []
        where = f"denoising step {i + 1} of {len(self.timesteps)}"
        lr_fix = (f"the learning rate {self.config.learning_rate(i):g} is too large for this model: lower "
                  f"lr_start/lr_end (paper: 0.002 → 0.001)")
        what = {Mode.LATENT: "latents", Mode.ROPE: "RoPE tables", Mode.POSEMB: "sin-cos table"}[self.config.mode]
        for k in range(self.config.opt_steps):
            done = False
            while not done:  # recomputed only when an fp16 backward overflowed (the scale was halved)
                with torch.enable_grad():
                    loss = self._loss(param, t, kv)
                    # The first iteration sees inputs already checked: a non-finite loss there is the model's doing.
                    check_finite(loss, f"the guidance loss at {where}, Adam iteration {k + 1}", _MODEL_FIX if k == 0
                                 else lr_fix, limit=None)
                    optimiser.zero_grad(set_to_none=True)
                    done = self.scaler.backward(loss, param)
            optimiser.step()
            check_finite(param, f"the optimised {what} at {where}, Adam iteration {k + 1}", lr_fix)
            step_losses.append(loss.item())
            if self.callback is not None:
                self.callback({**info, "iteration": k, "loss": step_losses[-1], "latents": self.latents,
                               "denoised": None})
        param.requires_grad_(False)
        self.losses.append(step_losses)
        if latent_mode:
            self.latents = param.detach().to(self.dtype)
        else:
            self.trainable = param.detach()
            self.saved_tables.append(self.trainable.clone().cpu())
        self._timed("optimisation", tic)

    def _step_table(self, i: int, guided: bool) -> Tensor | None:
        """Positional table of step ``i``: just optimised, loaded for injection, or ``None`` (stock)."""
        if guided and self.optimise and self.config.mode is not Mode.LATENT:
            return self.trainable
        if self.embeds is not None and i < len(self.embeds.tables):
            return self.embeds.tables[i].to(self.device)
        return None

    def _denoise_fix(self, i: int) -> str:
        """The likeliest cause of non-finite latents after step ``i``: CFG scale, injected embeddings, or the model."""
        scale = self.config.guidance_scale
        if self.do_cfg and scale > 15:
            return f"the CFG scale {scale:g} is far above CogVideoX's 6: lower it"
        if self.embeds is not None and i < len(self.embeds.tables):
            return "the injected positional embeddings drive the model out of range: use embeddings from a normal run"
        return _MODEL_FIX

    def denoise_step(self, i: int, t: Tensor, kv: dict, guided: bool, info: dict) -> None:
        """The CFG step (cond and uncond batched) with the optimised z_t or embeddings and the injected K/V."""
        tic = time.perf_counter()
        self.controller.reset(inject_kv=kv)
        table = self._step_table(i, guided)
        if table is not None and self.model.family == "5b":
            self.controller.rope = unstack_rope(table)
        self.table = table if (table is not None and self.model.family == "2b") else self.stock_table
        with torch.no_grad():
            model_in = torch.cat([self.latents] * 2) if self.do_cfg else self.latents
            model_in = self.scheduler.scale_model_input(model_in, t)
            noise_pred = self.transformer(hidden_states=model_in, encoder_hidden_states=self.text_cfg,
                                          timestep=t.expand(model_in.shape[0]), image_rotary_emb=self.stock_rope,
                                          return_dict=False)[0].float()
        config = self.config
        if self.do_cfg:
            scale = _dynamic_scale(config.guidance_scale, t, len(self.timesteps)) if config.dynamic_cfg else config.guidance_scale
            noise_uncond, noise_text = noise_pred.chunk(2)
            noise_pred = noise_uncond + scale * (noise_text - noise_uncond)
        t_prev = self.timesteps[i - 1] if i > 0 else None
        latents, self.old_pred_original = _scheduler_step(
            self.scheduler, noise_pred, self.old_pred_original, t, t_prev, self.latents, self.step_kwargs)
        self.latents = latents.to(self.dtype)
        check_finite(self.latents, f"the latents after denoising step {i + 1} of {len(self.timesteps)}",
                     self._denoise_fix(i))
        self._timed("denoising", tic)
        if self.callback is not None:
            loss = self.losses[-1][-1] if guided and self.optimise else None
            self.callback({**info, "iteration": None, "loss": loss, "latents": self.latents,
                           "denoised": self.old_pred_original})

    def result(self, prompt: PromptEmbeds) -> SampleResult:
        embeds = None
        if self.saved_tables:
            embeds = PositionEmbeds(
                mode=self.config.mode, family=self.model.family, grid=self.grid, head_dim=self.model.head_dim,
                num_inference_steps=self.config.num_inference_steps,
                timesteps=tuple(int(t) for t in self.timesteps[: len(self.saved_tables)]), tables=self.saved_tables,
                prompt=prompt.prompt, seed=self.seed,
            )
        return SampleResult(latents=self.latents.float().cpu(), embeds=embeds, losses=self.losses, timings=self.timings,
                            prompt_used=prompt.prompt_used, negative_prompt_used=prompt.negative_prompt_used)


def size_from_inputs(
    num_frames: int, height: int, width: int, *, reference: ReferenceMotion | None = None,
    embeds: PositionEmbeds | None = None,
) -> tuple[int, int, int]:
    """The (frames, height, width) in px to sample, where 0 means "as the connected reference or embeddings".

    Args:
        num_frames, height, width: requested values, 0 = taken from ``reference`` (its latent grid) or ``embeds``.
    Returns:
        the full size; the reference and embeddings are checked against each other by :func:`sample`.
    Raises:
        DiTFlowError: a 0 with neither input connected, or a non-zero value that differs from the input's (one
            sentence naming the value, the input's value and how to fix it).
    """
    source = ("reference", reference.grid) if reference is not None else (
        ("embeddings", embeds.grid) if embeds is not None else None)
    asked = {"num_frames": num_frames, "height": height, "width": width}
    if source is None:
        unset = [name for name, value in asked.items() if value == 0]
        if unset:
            raise DiTFlowError(
                f"{', '.join(unset)} 0 means 'from the reference or embeddings', but neither is connected; set "
                f"{' and '.join(unset)} (CogVideoX native: 49 frames, height 480, width 720) or connect an AMF."
            )
        return num_frames, height, width
    name, (frames, h, w) = source
    given = {"num_frames": video_frames(frames), "height": h * PIXELS_PER_PATCH, "width": w * PIXELS_PER_PATCH}
    for key, value in asked.items():
        if value not in (0, given[key]):
            raise DiTFlowError(
                f"{key} is {value} but the connected {name} has {given[key]}; set {key} to 0 (take it from the "
                f"{name}) or to {given[key]}."
            )
    return given["num_frames"], given["height"], given["width"]


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
        DiTFlowError: incompatible grids, blocks, modes or embeddings; optimisation without a reference; a loss,
            optimised tensor or latent that turns NaN/Inf or blows up (the message names the step and the fix).
    """
    grid, config, optimise = _check_inputs(model, config, reference, embeds, size)
    with torch.inference_mode(False):
        if optimise:  # weights moved under inference mode (ComfyUI) would fail the backward
            replace_inference_tensors(model.transformer)
        run = _GuidedRun(model, prompt, config, grid, optimise, seed, reference, embeds, callback)
        with run.hooks():
            for i, t in enumerate(run.timesteps):
                guided = i < config.num_guided_steps
                info = {"step": i, "num_steps": len(run.timesteps), "timestep": int(t)}
                kv = run.reference_kv(t) if guided and run.inject else {}
                if guided and optimise:
                    run.optimise_step(i, t, kv, info)
                run.denoise_step(i, t, kv, guided, info)
    return run.result(prompt)
