# SPDX-License-Identifier: Apache-2.0
"""Memory policy of a run: where the networks live (offload) and whether guidance recomputes activations.

Two choices trade memory for time:

- **offload** — ``none`` keeps T5, the transformer and the VAE on the GPU together; ``sequential`` keeps them on
  the CPU and moves each to the GPU only while it runs (on an H200, 33 s of a 97 s 5b job went to those moves).
- **gradient checkpointing** — recompute the activations of the blocks before the guidance block in the backward
  of each optimisation pass. On a 5b at 49 frames 480×720 it holds a guided pass to 17.5 GB instead of 58.1 GB;
  without it the whole job is ≈ 12 % faster (H200, bf16).

``auto`` picks, from the free memory of the compute device: the networks stay resident when all of them fit
beside the largest workspace (with checkpointing), else sequential; then checkpointing is off when the guided pass
without it fits beside what is resident, else on. :func:`plan_memory` is that decision as a plain function of
numbers; :func:`estimate_memory` turns a loaded model and a run into the numbers; :func:`free_bytes` reads the
device.

The workspace estimates count one hidden state of the transformer, ``U = tokens × inner_dim × dtype bytes``
(tokens = text + video tokens of batch 1), and are calibrated on the measurements above (5b, bf16, 49 frames
480×720, guidance block 20: U = 109 MB; unguided 15.7 GB, guided 17.5 GB with checkpointing and 58.1 GB without,
weights included): a CFG denoising step holds ≈ 40 U, an optimisation pass through ``k`` blocks ≈ 20 U per block
without checkpointing, and ≈ 1 U per block (the block inputs) + 20 U (one recomputed block) with it, plus ≈ 15 U
for the attention capture and the AMF.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import GuidanceConfig, Mode
from .errors import DiTFlowError

if TYPE_CHECKING:
    import torch

GB = 1e9

#: Settings of ``--offload``: keep the networks resident (``none``), move each in only while it runs
#: (``sequential``), or choose from the free memory (``auto``).
OFFLOAD = ("auto", "sequential", "none")
#: Settings of ``--gradient-checkpointing``.
CHECKPOINTING = ("auto", "on", "off")

#: A choice "fits" when need × MARGIN + RESERVE ≤ free: room for allocator fragmentation and CUDA's own buffers.
MARGIN, RESERVE = 1.15, 0.5 * GB

# Workspace per hidden state U (see the module docstring for the calibration).
_SAMPLING_U = 40  # one CFG denoising step, cond and uncond batched
_BLOCK_FULL_U = 20  # activations one block saves for the backward
_BLOCK_INPUT_U = 1  # what a checkpointed block keeps: its input
_GUIDANCE_BASE_U = 15  # captured Q/K, the streamed AMF and its backward, fp32 latents
# T5 encode: ~50 hidden states of [226, d_model]. VAE decode: peak bytes per output pixel-frame in fp32 (7.6–8.0 kB,
# measured as peak RSS on the CPU with CogVideoX's VAE config decoding 3 latent frames at 64×96 and 128×192 px),
# for the frames and the tile the VAE holds at once; scaled by the decoder's width (128 channels at full size).
_TEXT_STATES = 50
_VAE_BYTES_PER_PIXEL_FP32 = 7700
_VAE_FRAMES_AT_ONCE = 9  # the first slice: 3 latent frames (diffusers decodes 2 at a time after it) → 9 frames
_VAE_TILE_PIXELS = 240 * 360  # diffusers' tile_sample_min size at 480×720 (half the sample size)
_VAE_WIDTH = 128  # block_out_channels[0] of the CogVideoX VAE


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a run needs on the compute device, from :func:`estimate_memory`.

    Attributes:
        weights: network (``transformer``, ``text_encoder``, ``vae``) → bytes of its parameters and buffers.
        text: workspace of encoding a prompt with T5.
        vae: workspace of encoding the reference / decoding the result.
        sampling: workspace of a CFG denoising step (and of the reference pass, which is smaller).
        guided_checkpointing: workspace of one optimisation pass with gradient checkpointing (0: nothing optimised).
        guided_full: the same without gradient checkpointing.
    """

    weights: Mapping[str, int]
    text: int = 0
    vae: int = 0
    sampling: int = 0
    guided_checkpointing: int = 0
    guided_full: int = 0

    @property
    def optimises(self) -> bool:
        return self.guided_full > 0

    def transformer_workspace(self, checkpointing: bool) -> int:
        """The largest workspace of the transformer phase with or without checkpointing."""
        return max(self.sampling, self.guided_checkpointing if checkpointing else self.guided_full)

    def resident(self, checkpointing: bool) -> int:
        """Peak with every network resident: all weights + the largest workspace of any phase."""
        return sum(self.weights.values()) + max(self.text, self.vae, self.transformer_workspace(checkpointing))

    def sequential(self, checkpointing: bool) -> int:
        """Peak with sequential offload: the largest of (one network's weights + its phase's workspace)."""
        w = self.weights
        return max(w.get("text_encoder", 0) + self.text, w.get("vae", 0) + self.vae,
                   w.get("transformer", 0) + self.transformer_workspace(checkpointing))

    def peak(self, offload: str, checkpointing: bool) -> int:
        return self.resident(checkpointing) if offload == "none" else self.sequential(checkpointing)


@dataclass(frozen=True)
class MemoryPlan:
    """The choices of :func:`plan_memory` and why they were made (one sentence each)."""

    offload: str
    gradient_checkpointing: bool
    offload_reason: str
    checkpointing_reason: str
    free_bytes: int | None
    estimated_peak_bytes: int
    workspace_bytes: int = 0  # the transformer phase's, with the chosen checkpointing (what ComfyUI is told)

    def describe(self) -> str:
        """Two lines for a log: each choice and its reason."""
        return (f"offload: {self.offload} ({self.offload_reason})\n"
                f"gradient checkpointing: {'on' if self.gradient_checkpointing else 'off'} "
                f"({self.checkpointing_reason})")

    def record(self) -> dict:
        """The plan as JSON-ready values for run.json."""
        out = dataclasses.asdict(self)
        out["free_gb"] = None if self.free_bytes is None else round(self.free_bytes / GB, 2)
        out["estimated_peak_gb"] = round(self.estimated_peak_bytes / GB, 2)
        out["workspace_gb"] = round(self.workspace_bytes / GB, 2)
        del out["free_bytes"], out["estimated_peak_bytes"], out["workspace_bytes"]
        return out


def _gb(n: float) -> str:
    return f"{n / GB:.1f} GB"


def _fits(need: int, free: int) -> bool:
    return need * MARGIN + RESERVE <= free


def _check_setting(value: str, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise DiTFlowError(f"{what} must be one of {', '.join(choices)}, got {value!r}.")
    return value


def plan_memory(
    estimate: MemoryEstimate,
    free: int | None,
    *,
    offload: str = "auto",
    gradient_checkpointing: str = "auto",
    on_cpu: bool = False,
) -> MemoryPlan:
    """Chooses offload and gradient checkpointing for a run (the module docstring gives the rule).

    Args:
        estimate: the run's needs (:func:`estimate_memory`).
        free: bytes free on the compute device before any network is placed there (:func:`free_bytes`); ``None``
            when unknown (``auto`` then keeps checkpointing on).
        offload: ``auto``, ``sequential`` or ``none`` (:data:`OFFLOAD`).
        gradient_checkpointing: ``auto``, ``on`` or ``off`` (:data:`CHECKPOINTING`).
        on_cpu: the compute device is the CPU: the networks are in its memory anyway, offload is ``none``.
    Returns:
        :class:`MemoryPlan`; an explicit setting is followed even when the estimate says it will not fit (except
        offload on the CPU, which has nowhere to offload to).
    Raises:
        DiTFlowError: an unknown setting.
    """
    _check_setting(offload, OFFLOAD, "offload")
    _check_setting(gradient_checkpointing, CHECKPOINTING, "gradient checkpointing")
    asked_ckpt = {"on": True, "off": False}.get(gradient_checkpointing)
    free_text = "free memory unknown" if free is None else f"{_gb(free)} free"

    # 1. Offload, sized with the smaller guided workspace unless checkpointing was fixed.
    if on_cpu:
        chosen_offload, offload_reason = "none", "the compute device is the CPU: there is nothing to offload to"
    elif offload != "auto":
        chosen_offload, offload_reason = offload, f"as asked; {free_text}"
    elif free is None:
        chosen_offload, offload_reason = "sequential", "free memory unknown: the smallest footprint"
    else:
        need = estimate.resident(True if asked_ckpt is None else asked_ckpt)
        if _fits(need, free):
            chosen_offload = "none"
            offload_reason = f"all networks and the largest workspace (≈ {_gb(need)}) fit in {_gb(free)} free"
        else:
            chosen_offload = "sequential"
            offload_reason = (f"all networks together would need ≈ {_gb(need)} with {_gb(free)} free: each visits the "
                              "GPU only while it runs")

    # 2. Checkpointing, given what stays resident.
    if asked_ckpt is not None:
        ckpt, ckpt_reason = asked_ckpt, "as asked"
    elif not estimate.optimises:
        ckpt, ckpt_reason = False, "no optimisation pass in this run"
    else:
        need = estimate.peak(chosen_offload, False)
        if free is None:
            ckpt, ckpt_reason = True, "free memory unknown: the smallest footprint"
        elif _fits(need, free):
            ckpt, ckpt_reason = False, f"the guided pass without it (≈ {_gb(need)}) fits in {_gb(free)} free: faster"
        else:
            ckpt, ckpt_reason = True, (f"the guided pass without it would need ≈ {_gb(need)} with {_gb(free)} free; "
                                       f"with it ≈ {_gb(estimate.peak(chosen_offload, True))}")
    return MemoryPlan(offload=chosen_offload, gradient_checkpointing=ckpt, offload_reason=offload_reason,
                      checkpointing_reason=ckpt_reason, free_bytes=free,
                      estimated_peak_bytes=estimate.peak(chosen_offload, ckpt),
                      workspace_bytes=estimate.transformer_workspace(ckpt))


# ---------------------------------------------------------------------------------------------------------------
# Estimates and the device's free memory
# ---------------------------------------------------------------------------------------------------------------


def module_bytes(module: torch.nn.Module | None) -> int:
    """Bytes of a module's parameters and buffers (0 for ``None``)."""
    if module is None:
        return 0
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def _unit(model, grid: tuple[int, int, int]) -> int:
    """U: bytes of one hidden state of the transformer, ``(text + video tokens) × inner_dim × dtype bytes``."""
    import torch

    frames, h, w = grid
    tc = model.transformer_config
    inner = int(tc["num_attention_heads"]) * int(tc["attention_head_dim"])
    tokens = model.text_tokens + frames * h * w
    return tokens * inner * torch.empty((), dtype=model.dtype).element_size()


def text_workspace(model) -> int:
    """Workspace of one T5 prompt encoding, in bytes."""
    import torch

    text_dim = int(getattr(getattr(model.text_encoder, "config", None), "d_model", 4096))
    return _TEXT_STATES * model.text_tokens * text_dim * torch.empty((), dtype=model.dtype).element_size()


def vae_workspace(model, grid: tuple[int, int, int], tiling: bool | None = None) -> int:
    """Workspace of VAE-encoding or decoding a video of latent ``grid`` (F, h, w), in bytes.

    Tiled (``tiling``, as the nodes pass it; ``None``: diffusers' ``enable_tiling`` read from the loaded VAE, assumed
    when none is loaded) the VAE holds one 240×360-px tile of one frame slice at a time, else whole frames of one
    slice.
    """
    import torch

    frames, h, w = grid
    if tiling is None:
        tiling = getattr(model.vae, "use_tiling", True) if model.vae is not None else True
    pixels = (8 * model.patch_size * h) * (8 * model.patch_size * w)
    pixels = min(pixels, _VAE_TILE_PIXELS) if tiling else pixels
    slice_frames = min(_VAE_FRAMES_AT_ONCE, 4 * (frames - 1) + 1)
    width = ((model.vae_config or {}).get("block_out_channels") or [_VAE_WIDTH])[0]
    dtype_bytes = torch.empty((), dtype=model.dtype).element_size()
    return _VAE_BYTES_PER_PIXEL_FP32 * pixels * slice_frames * dtype_bytes * width // (4 * _VAE_WIDTH)


def reference_workspace(model, grid: tuple[int, int, int]) -> int:
    """Workspace of one batch-1 pass without gradients (reference AMF or features), in bytes: half a CFG step."""
    return _SAMPLING_U // 2 * _unit(model, grid)


def transformer_workspaces(model, grid: tuple[int, int, int], config: GuidanceConfig) -> tuple[int, int, int]:
    """(sampling, guided with checkpointing, guided without) workspaces of the transformer phase, in bytes.

    The guided ones are 0 when ``config`` (resolved) optimises nothing. An optimisation pass runs blocks 0..n, n the
    deepest guidance block (the AMF pass stops inside block n, the feature losses read its output): n + 1 blocks.
    """
    unit = _unit(model, grid)
    sampling = _SAMPLING_U * unit
    if config.mode is Mode.NONE or config.opt_steps == 0 or config.num_guided_steps == 0 or not config.guidance_blocks:
        return sampling, 0, 0
    blocks = max(config.guidance_blocks) + 1
    full = (_BLOCK_FULL_U * blocks + _GUIDANCE_BASE_U) * unit
    checkpointed = (_BLOCK_INPUT_U * blocks + _BLOCK_FULL_U + _GUIDANCE_BASE_U) * unit
    return sampling, checkpointed, full


def estimate_memory(model, grid: tuple[int, int, int], config: GuidanceConfig) -> MemoryEstimate:
    """Memory a run of ``config`` at latent ``grid`` needs on the compute device (see the module docstring).

    Args:
        model: a loaded backbone (any component may be missing; its weights count 0).
        grid: (F, h, w) token grid of the run (latent frames, patch rows, patch columns).
        config: the run's guidance settings, resolved (:meth:`GuidanceConfig.resolved`); its guidance blocks and
            whether anything is optimised set the guided workspace.
    """
    sampling, checkpointed, full = transformer_workspaces(model, grid, config)
    return MemoryEstimate(
        weights={name: module_bytes(getattr(model, name)) for name in ("transformer", "text_encoder", "vae")},
        text=text_workspace(model), vae=vae_workspace(model, grid), sampling=sampling,
        guided_checkpointing=checkpointed, guided_full=full,
    )


def plan_sampling(model, config: GuidanceConfig, free: int | None, *, gradient_checkpointing: str = "auto",
                  on_cpu: bool = False, reference=None, embeds=None, size=None) -> MemoryPlan:
    """Checkpointing for one :func:`~ditflow.sampler.sample` call where a memory manager (ComfyUI's) evicts other
    networks as needed: only the transformer's weights and workspace must fit in ``free``.

    Args:
        model, config: as for :func:`~ditflow.sampler.sample` (``config`` need not be resolved).
        free: bytes the manager can give the transformer's device (free now + what it may evict).
        reference, embeds, size: as for :func:`~ditflow.sampler.sample`; they fix the latent grid.
    Returns:
        :class:`MemoryPlan` whose :attr:`~MemoryPlan.workspace_bytes` is the working memory to declare.
    Raises:
        DiTFlowError: what :func:`~ditflow.sampler.sample` would raise for the grid, blocks or settings.
    """
    from .sampler import sampling_geometry

    grid = sampling_geometry(model, reference, embeds, size).token_grid
    blocks = reference.blocks if reference is not None and not config.guidance_blocks else config.guidance_blocks
    resolved = dataclasses.replace(config, guidance_blocks=blocks).resolved(model)
    sampling, checkpointed, full = transformer_workspaces(model, grid, resolved)
    if reference is None or embeds is not None:  # nothing to optimise toward (sample refuses or injects)
        checkpointed = full = 0
    estimate = MemoryEstimate(weights={"transformer": module_bytes(model.transformer)}, sampling=sampling,
                              guided_checkpointing=checkpointed, guided_full=full)
    return plan_memory(estimate, free, offload="sequential", gradient_checkpointing=gradient_checkpointing,
                       on_cpu=on_cpu)


def free_bytes(device: str | torch.device) -> int | None:
    """Free memory of the device in bytes: ``torch.cuda.mem_get_info`` on CUDA, ``MemAvailable`` of
    ``/proc/meminfo`` on the CPU (Linux); ``None`` where neither applies."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration, ValueError):
            return None
    return None


def reset_peak(device: str | torch.device) -> None:
    """Starts counting the peak allocated memory of a CUDA device afresh (no-op elsewhere)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: str | torch.device) -> int | None:
    """Peak memory allocated by torch on a CUDA device since :func:`reset_peak`; ``None`` for the CPU."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    return int(torch.cuda.max_memory_allocated(device))
