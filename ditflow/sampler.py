# SPDX-License-Identifier: Apache-2.0
"""Guided sampling, DiTFlow Alg. 1 (§4.3), as a loop that reads like diffusers' CogVideoX pipelines' ``__call__``.

Per denoising step t:
  1. (guided steps, injection on) noise the reference latents to t with the run's own initial noise, one
     truncated pass with the target prompt, keep video K/V at the injection blocks (§3 "KV injection").
  2. (guided steps, optimisation on) K_opt Adam steps, a fresh Adam each step, on the mode's parameter
     (:mod:`ditflow.params`: z_t, RoPE tables or the sin-cos table): truncated pass, target prompt only (no CFG),
     the loss's objective at the guidance blocks (:mod:`ditflow.objectives`: Eq. 8 on the AMF, or MOFT/SMM).
  3. the normal CFG step, cond and uncond batched, with the optimised z_t / embeddings and the injected K/V.

The model is a :class:`~ditflow.backbones.base.Backbone`: this loop never names one. Image-to-video backbones
(``needs_image``) take a start image, encoded with the run's generator before the noise is drawn, as their pipeline
does; backbones that pad latent frames (CogVideoX 1.5) denoise the padded latents and return the video's.

Differs from the authors' script (method.md §6): the last guided step uses exactly ``lr_end``; the model runs in
its own dtype while optimised tensors stay fp32 (an fp16 model's backward is loss-scaled, :mod:`ditflow.optim`);
the reference K/V pass is skipped when injection is off; cond and uncond run as one batch; the loss, the optimised
tensor and the latents are checked after every iteration and step, and a NaN, Inf or blow-up stops the run with the
step, the cause and the fix (the authors' script writes a black video). Defaults: :class:`~ditflow.config.GuidanceConfig`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .attention import AttentionController
from .backbones.base import Geometry
from .config import GuidanceConfig, Mode, check_seed
from .embeds import PositionEmbeds
from .errors import DiTFlowError, check_finite
from .inference_tensors import replace_inference_tensors
from .objectives import objective_for
from .optim import LossScaler, make_optimizer
from .params import param_for
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
        embeds: the optimised tensor of every guided step (ρ in modes ``rope``/``posemb``, z_t in mode
            ``latent``), for zero-shot replay; ``None`` when nothing was optimised.
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


def sampling_geometry(model, reference=None, embeds=None, size=None) -> Geometry:
    """The :class:`~ditflow.backbones.base.Geometry` a :func:`sample` call runs at: from ``size`` (frames, height,
    width in px), else the reference's latents, else the embeddings' token grid; their token grids must agree.

    Raises:
        DiTFlowError: none of the three is given, they differ (both grids named), or the model cannot take the size.
    """
    geometries = {}
    if size is not None:
        geometries["requested size"] = model.geometry(*size)
    if reference is not None:  # a target made from a flow field has no latents (ditflow.motion_target)
        geometries["reference"] = (model.geometry_of_latents(reference.latents) if reference.latents is not None
                                   else model.geometry(*model.size_of_grid(tuple(reference.grid))))
    if embeds is not None:
        geometries["embeddings"] = model.geometry(*model.size_of_grid(tuple(embeds.grid)))
    if not geometries:
        raise DiTFlowError("give a size (frames, height, width), a reference or embeddings to sample.")
    (first, g0), *rest = geometries.items()
    grids = {name: tuple(g.token_grid) for name, g in geometries.items()}
    if reference is not None:
        grids["reference"] = tuple(reference.grid)
    for name, grid in grids.items():
        if grid != g0.token_grid:
            raise DiTFlowError(
                f"the {name} has token grid F×h×w = {'×'.join(map(str, grid))} but the {first} has "
                f"{'×'.join(map(str, g0.token_grid))}; use the same frame count and size for both."
            )
    return g0


def _blocks_from_reference(config: GuidanceConfig, reference: ReferenceMotion | None) -> GuidanceConfig:
    if reference is None or not reference.has(config.loss):
        return config
    if reference.amf and reference.soft != config.soft_reference:
        kinds = {False: "hard (argmax)", True: "soft (soft-argmax)"}
        raise DiTFlowError(
            f"the reference AMF is {kinds[reference.soft]} but the guidance asks for a {kinds[config.soft_reference]} "
            "one; extract the reference with the same setting."
        )
    if not config.guidance_blocks:
        return dataclasses.replace(config, guidance_blocks=reference.blocks)
    if tuple(sorted(set(config.guidance_blocks))) != reference.blocks:
        raise DiTFlowError(
            f"guidance blocks {list(config.guidance_blocks)} differ from the blocks {list(reference.blocks)} the "
            "reference motion was extracted at; extract it at the blocks you guide with."
        )
    return config


def _check_image(model, image: Tensor | None, geometry: Geometry) -> None:
    if not model.needs_image:
        if image is not None:
            raise DiTFlowError(f"{model.name} is text-to-video and takes no start image; leave the image out or load an "
                               "image-to-video model.")
        return
    if image is None:
        raise DiTFlowError(f"{model.name} generates from a start image; give one (the reference's first frame is the "
                           "usual choice).")
    if image.ndim != 3 or image.shape[0] != 3:
        raise DiTFlowError(f"expected one start image [3, H, W] in [-1, 1], got shape {list(image.shape)}.")
    if tuple(image.shape[1:]) != (geometry.height, geometry.width):
        raise DiTFlowError(
            f"the start image is {image.shape[1]}×{image.shape[2]} px but the video is {geometry.height}×"
            f"{geometry.width}; resize the image to the video's size."
        )


def _check_inputs(model, config: GuidanceConfig, reference, embeds, size, image):
    """Fails before any compute, quoting the bad values; returns (geometry, resolved config, optimise?)."""
    geometry = sampling_geometry(model, reference, embeds, size)
    _check_image(model, image, geometry)
    optimise = embeds is None and config.mode is not Mode.NONE and config.opt_steps > 0 and config.num_guided_steps > 0
    if optimise and reference is None:
        raise DiTFlowError(f"mode '{config.mode.value}' optimises toward a reference motion: give a reference video.")
    if optimise and not reference.has(config.loss):
        held = "features (MOFT/SMM)" if reference.features else ("an AMF" if reference.amf else "no motion")
        raise DiTFlowError(
            f"loss '{config.loss.value}' needs a reference extracted for it, but this reference holds {held}; "
            f"extract the reference with loss '{config.loss.value}'."
        )
    config = _blocks_from_reference(config, reference).resolved(model)
    if embeds is not None:
        embeds.check_compatible(model, geometry.token_grid, config.num_inference_steps, geometry.latent_shape)
        embeds.check_values()
        # A replay's guided window (where KV injection runs) is the saved steps', whatever T_opt says.
        config = dataclasses.replace(config, guidance_fraction=len(embeds.tables) / config.num_inference_steps)
    return geometry, config, optimise


#: What to change when the model itself turns healthy inputs into NaN/Inf.
_MODEL_FIX = ("the model turns finite inputs into NaN/Inf: its weights are damaged (re-download or re-convert them) "
              "or its dtype overflows (with fp16 try bf16 or fp32)")


class _GuidedRun:
    """State of one sampling run; one method per phase of a denoising step (see the module docstring).

    Built and used inside ``torch.inference_mode(False)``: inputs are cloned there so that tensors made under
    ComfyUI's inference mode can enter autograd.
    """

    def __init__(self, model, prompt, config, geometry, optimise, seed, reference, embeds, image, callback):
        from diffusers.utils.torch_utils import randn_tensor

        self.model, self.config, self.geometry, self.optimise, self.seed = model, config, geometry, optimise, seed
        self.grid = geometry.token_grid
        self.embeds, self.callback = embeds, callback
        transformer = model.transformer
        device, dtype = self.device, self.dtype = transformer.device, transformer.dtype
        # KV injection needs reference latents; a target made from a flow field has none (ditflow.motion_target)
        self.inject = bool(config.kv_injection_blocks) and reference is not None and reference.latents is not None
        if config.kv_injection_blocks and reference is not None and not self.inject:
            logging.getLogger("ditflow").warning(
                "KV injection is skipped: this motion target was made without a reference video, so there are no "
                "reference keys and values to inject; turn KV injection off to silence this.")
        self.param = param_for(config.mode) if optimise else None
        self.objective = objective_for(config.loss)

        # 1. Text (cond and uncond batched for CFG) and the reference's targets, prepared once per run.
        self.cond = prompt.cond.to(device, dtype).clone()
        self.do_cfg = config.guidance_scale > 1.0
        self.text_cfg = torch.cat([prompt.uncond.to(device, dtype), self.cond]) if self.do_cfg else self.cond
        self.targets = {}
        if optimise:
            held = getattr(reference, self.objective.field)
            self.targets = self.objective.prepare({b: held[b] for b in config.guidance_blocks}, device)

        # 2. Start latents (I2V), timesteps and initial noise, drawn from one generator in the pipelines' order.
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        start = model.encode_start(image, self.generator) if model.needs_image else None
        self.inputs = model.run_inputs(geometry, device, start=start)
        self.schedule = model.schedule(config.num_inference_steps, device, self.generator)
        self.timesteps = self.schedule.timesteps
        self.noise = randn_tensor((1, *geometry.latent_shape), generator=self.generator, device=device, dtype=dtype)
        self.latents = self.noise * self.schedule.init_noise_sigma
        self.denoised = None
        if self.inject:  # the reference's latents, padded as the run's, and its own conditioning (I2V: its frame 0)
            ref = reference.latents.to(device, dtype).clone()
            self.ref_latents = model.pad_latents(ref, model.geometry_of_latents(ref))
            self.ref_inputs = model.run_inputs(geometry, device, reference=ref)

        # 3. Positions (modes rope/posemb): a trainable copy of the stock table, warm-started across guided steps.
        self.carried = None
        if self.param is not None and self.param.kind is not None:
            self.carried = self.param.initial(model.stock_positions(self.inputs, self.param.kind))

        self.controller = AttentionController()
        self.scaler = LossScaler(enabled=dtype == torch.float16)  # fp16 gradients underflow without it
        self.saved_tables: list[Tensor] = []
        self.losses: list[list[float]] = []
        self.timings = {"kv_reference": 0.0, "optimisation": 0.0, "denoising": 0.0}

    def _timed(self, phase: str, tic: float) -> None:
        self.timings[phase] += time.perf_counter() - tic

    def video_latents(self, latents: Tensor | None) -> Tensor | None:
        """The video's latent frames of padded latents (what callbacks and the result carry)."""
        return None if latents is None else self.model.unpad_latents(latents, self.geometry)

    def reference_kv(self, t: Tensor) -> dict:
        """§3 KV injection: the reference noised to ``t`` with the run's own noise, target prompt, stock positions
        (never the optimised ρ, as in the authors' code); video K/V at the injection blocks."""
        tic = time.perf_counter()
        blocks = self.config.kv_injection_blocks
        z_ref = self.schedule.add_noise(self.ref_latents, self.noise, t)
        self.controller.reset(record_kv_blocks=frozenset(blocks), stop_block=max(blocks))  # stock positions
        with torch.no_grad():
            self.model.forward_until(self.controller, z_ref, self.cond, t.expand(1), self.ref_inputs)
        self._timed("kv_reference", tic)
        return dict(self.controller.recorded_kv)

    def _loss(self, value: Tensor, t: Tensor, kv: dict) -> Tensor:
        """One optimisation pass: target prompt only (no CFG), truncated at the guidance blocks."""
        config = self.config
        self.objective.watch(self.controller, config.guidance_blocks, inject_kv=kv)
        z_in = self.param.apply(self.controller, value, self.latents)
        self.model.forward_until(self.controller, z_in, self.cond, t.expand(1), self.inputs,
                                 gradient_checkpointing=config.gradient_checkpointing)
        return self.objective(self.controller, self.targets, self.grid, config)

    def optimise_step(self, i: int, t: Tensor, kv: dict, info: dict) -> None:
        """Alg. 1 inner loop: K_opt iterations of a fresh optimiser (Adam by default, :class:`~ditflow.config.Optimizer`)
        on the mode's parameter."""
        tic = time.perf_counter()
        param = self.param.begin(self.latents, self.carried)
        param.requires_grad_(True)
        optimiser = make_optimizer(self.config.optimizer, param, self.config.learning_rate(i))
        step_losses = []
        where = f"denoising step {i + 1} of {len(self.timesteps)}"
        lr_fix = (f"the learning rate {self.config.learning_rate(i):g} is too large for this model: lower "
                  f"lr_start/lr_end (paper: 0.002 → 0.001)")
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
            check_finite(param, f"the optimised {self.param.what} at {where}, Adam iteration {k + 1}", lr_fix)
            step_losses.append(loss.item())
            if self.callback is not None:
                self.callback({**info, "iteration": k, "loss": step_losses[-1],
                               "latents": self.video_latents(self.latents), "denoised": None})
        param.requires_grad_(False)
        self.losses.append(step_losses)
        self.latents, self.carried = self.param.end(param, self.latents, self.carried)
        # the ρ carried to the next step, or (mode latent) z_t itself: one step of what a zero-shot replay injects
        self.saved_tables.append((param.detach() if self.carried is None else self.carried).clone().cpu())
        self._timed("optimisation", tic)

    def _step_positions(self, i: int, guided: bool) -> None:
        """Positions of step ``i`` on the controller: just optimised, loaded for injection, or stock; a replayed
        z_t trajectory (Fig. 7 "Ours-z_t") replaces the latents of its steps instead."""
        if guided and self.carried is not None:
            self.param.apply(self.controller, self.carried, self.latents)
        elif self.embeds is not None and i < len(self.embeds.tables):
            saved = self.embeds.tables[i].to(self.device)
            self.latents = param_for(self.embeds.mode).apply(self.controller, saved, self.latents)

    def _denoise_fix(self, i: int) -> str:
        """The likeliest cause of non-finite latents after step ``i``: CFG scale, injected embeddings, or the model."""
        scale, usual = self.config.guidance_scale, self.model.defaults.cfg
        if self.do_cfg and scale > 2.5 * usual:
            return f"the CFG scale {scale:g} is far above {self.model.name}'s {usual:g}: lower it"
        if self.embeds is not None and i < len(self.embeds.tables):
            return "the injected embeddings drive the model out of range: use embeddings from a normal run"
        return _MODEL_FIX

    def denoise_step(self, i: int, t: Tensor, kv: dict, guided: bool, info: dict) -> None:
        """The CFG step (cond and uncond batched) with the optimised z_t or embeddings and the injected K/V."""
        tic = time.perf_counter()
        self.controller.reset(inject_kv=kv)
        self._step_positions(i, guided)
        config, schedule = self.config, self.schedule
        with torch.no_grad():
            model_in = torch.cat([self.latents] * 2) if self.do_cfg else self.latents
            model_in = schedule.scale_model_input(model_in, t)
            noise_pred = self.model.predict(model_in, self.text_cfg, t, self.inputs)
        if self.do_cfg:
            scale = self.model.cfg_scale(config.guidance_scale, config.dynamic_cfg, t, len(self.timesteps))
            noise_uncond, noise_text = noise_pred.chunk(2)
            noise_pred = noise_uncond + scale * (noise_text - noise_uncond)
        self.latents = schedule.step(i, noise_pred, self.latents).to(self.dtype)
        check_finite(self.latents, f"the latents after denoising step {i + 1} of {len(self.timesteps)}",
                     self._denoise_fix(i))
        self._timed("denoising", tic)
        if self.callback is not None:
            loss = self.losses[-1][-1] if guided and self.optimise else None
            self.callback({**info, "iteration": None, "loss": loss, "latents": self.video_latents(self.latents),
                           "denoised": self.video_latents(schedule.denoised)})

    def result(self, prompt: PromptEmbeds) -> SampleResult:
        embeds = None
        if self.saved_tables:
            embeds = PositionEmbeds(
                mode=self.config.mode, variant=self.model.variant, grid=self.grid, head_dim=self.model.head_dim,
                num_inference_steps=self.config.num_inference_steps,
                timesteps=tuple(int(t) for t in self.timesteps[: len(self.saved_tables)]), tables=self.saved_tables,
                prompt=prompt.prompt, seed=self.seed,
            )
        latents = self.video_latents(self.latents).float().cpu()
        return SampleResult(latents=latents, embeds=embeds, losses=self.losses, timings=self.timings,
                            prompt_used=prompt.prompt_used, negative_prompt_used=prompt.negative_prompt_used)


def size_from_inputs(
    model, num_frames: int, height: int, width: int, *, reference: ReferenceMotion | None = None,
    embeds: PositionEmbeds | None = None,
) -> tuple[int, int, int]:
    """The (frames, height, width) in px to sample, where 0 means "as the connected reference or embeddings".

    Args:
        model: the loaded backbone (its geometry turns a latent or token grid into a video size).
        num_frames, height, width: requested values, 0 = taken from ``reference`` (its latents) or ``embeds``.
    Returns:
        the full size; the reference and embeddings are checked against each other by :func:`sample`.
    Raises:
        DiTFlowError: a 0 with neither input connected, or a non-zero value that differs from the input's (one
            sentence naming the value, the input's value and how to fix it).
    """
    asked = {"num_frames": num_frames, "height": height, "width": width}
    if reference is None and embeds is None:
        unset = [name for name, value in asked.items() if value == 0]
        if unset:
            d = model.defaults
            raise DiTFlowError(
                f"{', '.join(unset)} 0 means 'from the reference or embeddings', but neither is connected; set "
                f"{' and '.join(unset)} ({model.name} native: {d.frames} frames, height {d.height}, width {d.width}) "
                "or connect an AMF."
            )
        return num_frames, height, width
    name = "reference" if reference is not None else "embeddings"
    g = sampling_geometry(model, reference, None if reference is not None else embeds)
    given = {"num_frames": g.frames, "height": g.height, "width": g.width}
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
    image: Tensor | None = None,
    callback: Callback | None = None,
) -> SampleResult:
    """Generates latents for ``prompt``, guided toward the reference motion (Alg. 1).

    Args:
        model: a loaded backbone (:class:`~ditflow.backbones.base.Backbone`, e.g. from
            :func:`~ditflow.backbones.load_model`).
        prompt: target and negative prompt embeddings (:func:`~ditflow.text.encode_prompt`).
        config: guidance settings; its guidance blocks must match the reference's (``()`` takes them from it).
        size: (frames, height, width) in video pixels; optional when a reference or embeddings fix the grid.
        seed: seed of the start image's latent sample (I2V), the initial noise and the DPM scheduler's noise, in
            that order, as the diffusers pipelines draw them; bit-reproducible on CPU.
        reference: reference motion (:func:`~ditflow.reference.extract_reference`); needed for optimisation and
            for KV injection.
        embeds: saved embeddings (ρ or the z_t trajectory) to replay zero-shot (no optimisation; with a reference,
            KV injection runs in the saved steps).
        image: image-to-video models only (``model.needs_image``), and needed there: the start frame
            ``[3, H, W]`` in [-1, 1] at the video's size (:func:`~ditflow.video.start_image` takes it from a file
            or the reference's first frame).
        callback: see :data:`Callback`.
    Raises:
        DiTFlowError: a seed outside 0..2^64−1; incompatible grids, blocks, modes or embeddings; optimisation
            without a reference; a missing, superfluous or mis-sized start image; a loss, optimised tensor or latent
            that turns NaN/Inf or blows up (the message names the step and the fix).
    """
    check_seed(seed)
    geometry, config, optimise = _check_inputs(model, config, reference, embeds, size, image)
    with torch.inference_mode(False):
        if optimise:  # weights moved under inference mode (ComfyUI) would fail the backward
            replace_inference_tensors(model.transformer)
        image = None if image is None else image.clone()
        run = _GuidedRun(model, prompt, config, geometry, optimise, seed, reference, embeds, image, callback)
        with model.attention(run.controller):
            for i, t in enumerate(run.timesteps):
                guided = i < config.num_guided_steps
                info = {"step": i, "num_steps": len(run.timesteps), "timestep": int(t)}
                kv = run.reference_kv(t) if guided and run.inject else {}
                if guided and optimise:
                    run.optimise_step(i, t, kv, info)
                run.denoise_step(i, t, kv, guided, info)
    return run.result(prompt)
