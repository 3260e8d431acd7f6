# SPDX-License-Identifier: Apache-2.0
"""Whole jobs on files: ``transfer`` (reference video → guided generation) and ``inject`` (saved embeddings →
zero-shot generation). The CLI calls these; the ComfyUI nodes call the same steps one by one.

Each job's files are one set (:class:`~ditflow.outputs.OutputSet`): ``out_dir`` is checked before the model
loads (a folder, empty unless ``overwrite``, holding no input), the files are written into a staging folder beside
it and published with one rename when everything succeeded. A failed, cancelled or killed job leaves ``out_dir``
as it was; a finished one leaves exactly its own files there, never a mix with an earlier run's.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from . import __version__
from .config import AUTO, GuidanceConfig, Mode, ReferenceOptions, check_seed
from .embeds import PositionEmbeds, load_embeds, save_embeds
from .errors import DiTFlowError, collected_warnings, collecting_warnings
from .files import write_json
from .backbones import size_of_grid, token_grid
from .layout import MIN_FRAMES, NATIVE_FRAMES, largest_frame_count
from .limits import check_decode_fits
from .memory import GB, MemoryPlan, estimate_memory, free_bytes, peak_bytes, plan_memory, reset_peak
from .outputs import OutputSet
from .reference import ReferenceMotion, extract_reference, reference_without_amf
from .sampler import Callback, SampleResult, sample, sampling_geometry
from .text import encode_prompt
from .video import check_fps, load_start_image, load_video, prepare_reference, selectable_frames, write_video


@dataclass(frozen=True)
class ModelOptions:
    """How to load and run the model: a diffusers-format folder (or hub id), dtype, device, memory policy.

    ``offload`` (``auto``, ``sequential``, ``none``) and ``gradient_checkpointing`` (``auto``, ``on``, ``off``) are
    settled per run by :func:`ditflow.memory.plan_memory` from the device's free memory: ``sequential`` keeps the
    networks on the CPU and moves each to ``device`` only while it runs, so the 5b transformer (11 GB bf16) and
    its T5 (9.5 GB) never share the GPU; ``none`` keeps them all there. The plan's checkpointing replaces
    :attr:`GuidanceConfig.gradient_checkpointing`.
    """

    path: str
    dtype: str = "bf16"
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    vae_tiling: bool = True
    vae_slicing: bool = False
    offload: str = "auto"
    gradient_checkpointing: str = "auto"
    text_encoder_file: str | None = None  # a single-file T5-XXL (kijai's layout; ditflow.t5_file)
    tokenizer_path: str | None = None




@dataclass(frozen=True)
class FlowTarget:
    """A motion target from a flow field (:func:`~ditflow.motion_target.poke_reference`): the video's frames
    (4k+1, or :data:`AUTO` = 49) and size in px, how the flow's image meets the frame, the flow's scale and the
    shortest motion (px over the clip) that gets a target."""

    num_frames: int | str = AUTO
    height: int = 480
    width: int = 720
    fit: str = "crop"
    scale: float = 1.0
    min_motion: float = 0.0


def _record(kind: str, settings: dict, config: GuidanceConfig, result: SampleResult, timings: dict,
            memory: dict) -> dict:
    return {
        "job": kind,
        "ditflow_version": __version__,
        "torch_version": torch.__version__,
        "platform": platform.platform(),
        "settings": {**settings, "prompt_used": result.prompt_used,
                     "negative_prompt_used": result.negative_prompt_used},
        "guidance": {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in dataclasses.asdict(config).items()},
        "memory": memory,
        "loss_per_step": result.losses,
        "warnings": collected_warnings(),
        "timings_s": {**timings, **{f"sample.{k}": v for k, v in result.timings.items()}},
    }


def load_for_run(options: ModelOptions, size: tuple[int, int, int] | None, config: GuidanceConfig, *,
                 grid: tuple[int, int, int] | None = None, log: Callable[[str], None] | None = None):
    """Loads the model and settles its memory plan for a run of ``config`` at the video ``size`` (frames, height,
    width in px), or, without a size, at the token ``grid`` (F, h, w) of saved embeddings.

    The free memory is read before any weight reaches the device and the peak-memory counter restarts; the
    networks load on the CPU, then stay there between uses (``sequential``) or move to the device for good
    (``none``). ``log`` (a ``str`` callback) gets a line before a hub download, and the two choices and their
    reasons.

    Returns:
        (the loaded backbone, :class:`~ditflow.memory.MemoryPlan`).
    """
    from .backbones import load_model

    free = free_bytes(options.device)
    reset_peak(options.device)
    cog = load_model(options.path, dtype=options.dtype, device=options.device, vae_tiling=options.vae_tiling,
                     vae_slicing=options.vae_slicing, offload=True, text_encoder_file=options.text_encoder_file,
                     tokenizer_path=options.tokenizer_path, log=log)
    grid = cog.geometry(*size).token_grid if size is not None else grid
    estimate = estimate_memory(cog, grid, config.resolved(cog))
    plan = plan_memory(estimate, free, offload=options.offload, gradient_checkpointing=options.gradient_checkpointing,
                       on_cpu=torch.device(options.device).type == "cpu")
    if plan.offload == "none":
        cog.keep_on_device()
    if log is not None:
        log(plan.describe())
    return cog, plan


def memory_record(plan: MemoryPlan, device: str) -> dict:
    """The plan and the peak GPU memory since :func:`load_for_run`, for run.json (``n/a`` on the CPU)."""
    peak = peak_bytes(device)
    return {**plan.record(), "peak_gpu_allocated_gb": "n/a (ran on the CPU)" if peak is None else round(peak / GB, 2)}


def reference_motion(cog, ref_latents, config: GuidanceConfig) -> ReferenceMotion | None:
    """What sampling needs from the encoded reference under ``config`` (resolved), running only the passes needed.

    Modes latent/rope/posemb: one reference pass for the configured loss (AMF, or MOFT/SMM features). Mode ``none``:
    no pass — the latents alone serve KV injection ("injection only"), or nothing at all ("backbone").
    """
    if config.mode is not Mode.NONE:
        with cog.on_device("text_encoder"):
            empty = encode_prompt(cog, "").cond
        with cog.on_device("transformer"):
            return extract_reference(cog, ref_latents, config.guidance_blocks, temperature=config.temperature,
                                     loss=config.loss, empty_prompt=empty, soft=config.soft_reference)
    # backbone or injection only: no AMF pass (the authors' script runs one anyway)
    return reference_without_amf(cog, ref_latents) if config.kv_injection_blocks else None


def generate(
    cog,
    prompt: str,
    config: GuidanceConfig,
    motion: ReferenceMotion | None,
    *,
    size: tuple[int, int, int] | None = None,
    negative_prompt: str = "",
    seed: int = 0,
    callback: Callback | None = None,
    timings: dict | None = None,
    embeds: PositionEmbeds | None = None,
    image: Tensor | None = None,
):
    """Prompt → guided sample → decoded frames with an already loaded model (the core of :func:`transfer`).

    Args:
        cog: a loaded backbone (:func:`load_for_run`).
        config: guidance settings, resolved for ``cog`` (:meth:`GuidanceConfig.resolved`).
        motion: from :func:`reference_motion` (``None`` for the backbone).
        size: (frames, height, width) in px; needed when ``motion`` is ``None`` (else checked against it).
        timings: if given, ``encode_prompt`` and ``decode`` seconds are added to it.
        embeds: saved positional embeddings to inject zero-shot (see :func:`~ditflow.sampler.sample`).
        image: the start frame ``[3, H, W]`` in [-1, 1] of an image-to-video model (``cog.needs_image``).
    Returns:
        (frames ``[F, 3, H, W]`` in [-1, 1], :class:`~ditflow.sampler.SampleResult`).
    """
    timings = {} if timings is None else timings
    geometry = sampling_geometry(cog, motion, embeds, size)
    check_decode_fits(*geometry.size)  # the decoded video must fit: refuse now rather than after minutes of sampling
    tic = time.perf_counter()
    with cog.on_device("text_encoder"):
        embeds_text = encode_prompt(cog, prompt, negative_prompt)
    timings["encode_prompt"] = time.perf_counter() - tic
    with cog.on_device("transformer", *(("vae",) if cog.needs_image else ())):  # I2V: the start image is encoded
        result = sample(cog, embeds_text, config, size=size, seed=seed, reference=motion, embeds=embeds,
                        image=image, callback=callback)
    tic = time.perf_counter()
    with cog.on_device("vae"):
        out_frames = cog.decode_latents(result.latents)
    timings["decode"] = time.perf_counter() - tic
    return out_frames, result


def read_reference(video: str | os.PathLike, reference: ReferenceOptions, log: Callable[[str], None] | None = None):
    """Loads ``video`` and picks/fits its frames per ``reference``: (frames ``[F, 3, H, W]`` in [-1, 1], fps).

    With ``num_frames`` :data:`AUTO` the count chosen is ``F`` and is said through ``log`` (one line).

    Raises:
        DiTFlowError: unreadable video, bad selection or size, or (auto) fewer than 5 frames to take.
    """
    auto = reference.num_frames == AUTO
    if not auto and not isinstance(reference.num_frames, int):
        raise DiTFlowError(f"num_frames must be a 4k+1 count or {AUTO!r}, got {reference.num_frames!r}.")
    wanted = NATIVE_FRAMES if auto else reference.num_frames
    # Decode only up to the last frame used: long clips would otherwise cost T·H·W·12 bytes for nothing.
    last = reference.start + reference.stride * (wanted - 1) + 1
    frames, src_fps = load_video(video, max_frames=max(1, last))
    num_frames = reference.num_frames
    if auto:
        available = selectable_frames(frames.shape[0], reference.start, reference.stride)
        if available < MIN_FRAMES:
            raise DiTFlowError(
                f"{Path(video).name} gives {available} frame(s) from frame {reference.start} with stride "
                f"{reference.stride}, and motion transfer needs at least {MIN_FRAMES}; use a longer clip, an "
                "earlier start or a smaller stride."
            )
        num_frames = largest_frame_count(available)
        if log is not None:
            gives = f"at least {available}" if available >= NATIVE_FRAMES else f"{available}"
            log(f"num-frames auto: {num_frames} (the clip gives {gives} from frame {reference.start} with stride "
                f"{reference.stride}; the largest 4k+1, at most the models' native {NATIVE_FRAMES})")
    ref_frames = prepare_reference(
        frames, height=reference.height, width=reference.width, num_frames=num_frames,
        start=reference.start, stride=reference.stride, resize=reference.resize,
    )
    return ref_frames, src_fps


def start_frame(cog, image: str | os.PathLike | None, ref_frames: Tensor | None, reference: ReferenceOptions | None,
                size: tuple[int, int, int] | None = None) -> Tensor | None:
    """The start frame ``[3, H, W]`` in [-1, 1] of an image-to-video model: the ``image`` file fitted to the video's
    size as the reference's frames were (``reference.resize``; centre crop without a reference), else the
    reference's first frame; ``None`` for a text-to-video model. ``size`` (frames, height, width) is needed without
    ``ref_frames``.

    Raises:
        DiTFlowError: an image given to a text-to-video model, none for an image-to-video model without a reference,
            or an unreadable image file.
    """
    if not cog.needs_image:
        if image is not None:
            raise DiTFlowError(f"{cog.name} is text-to-video and takes no start image; drop --image or load an "
                               "image-to-video model.")
        return None
    if image is None:
        if ref_frames is None:
            raise DiTFlowError(f"{cog.name} generates from a start image; give one with --image (or the reference "
                               "video with --video, whose first frame is then used).")
        return ref_frames[0].clone()
    height, width = (ref_frames.shape[2], ref_frames.shape[3]) if ref_frames is not None else size[1:]
    return load_start_image(image, height=height, width=width, resize=reference.resize if reference else "crop")


def _write_all(out: OutputSet, folder: Path, writers: dict) -> None:
    """Runs ``writers`` (file name → function of its path) into the staging ``folder`` of ``out``."""
    try:
        for name, write in writers.items():
            write(folder / name)
    except OSError as err:
        raise DiTFlowError(f"could not write the results ({err.strerror or err}); nothing was written to {out.out}: "
                           "free some space or choose another --out.") from err


def _output_fps(fps: float | None, src_fps: float, reference: ReferenceOptions, video) -> float:
    """``fps``, else the reference's rate over the stride; refused now if unwritable (not after sampling)."""
    if fps is not None:
        return fps
    try:
        return check_fps(src_fps / reference.stride)
    except DiTFlowError:
        raise DiTFlowError(f"{video} reports {src_fps:g} fps, which gives no writable frame rate at stride "
                           f"{reference.stride}; give the output frame rate (--fps).") from None


@collecting_warnings
def transfer(
    model: ModelOptions,
    video: str | os.PathLike,
    prompt: str,
    out_dir: str | os.PathLike,
    *,
    negative_prompt: str = "",
    reference: ReferenceOptions = ReferenceOptions(),
    config: GuidanceConfig = GuidanceConfig(),
    seed: int = 0,
    fps: float | None = None,
    overwrite: bool = False,
    image: str | os.PathLike | None = None,
    callback: Callback | None = None,
    log: Callable[[str], None] | None = None,
    preset: str = "paper",
) -> dict:
    """Motion transfer end to end; publishes ``result.mp4``, ``reference.mp4``, ``run.json`` and, for modes
    ``rope``/``posemb``, ``embeds.safetensors`` as ``out_dir`` (see the module docstring). Returns the run record
    (``run.json``'s content).

    ``log`` (a ``str`` callback) gets one-line notes for the user: the frame count ``auto`` chose and the memory plan
    (:func:`load_for_run`). The record keeps the requested ``reference.num_frames`` and the count used
    (``settings.num_frames``), and in ``memory`` the plan with the peak GPU memory.

    Args:
        fps: frame rate of the written videos (default: the reference's over ``reference.stride``).
        overwrite: replace a non-empty ``out_dir`` (at the end, as a whole); without it a non-empty one is refused.
        image: image-to-video models: the start frame's image file (default: the reference's first frame).
    Raises:
        DiTFlowError: any bad input (output folder, fps, video, sizes, frames, blocks, model), before the model is
            loaded where possible; a run that goes non-finite; a failed write (``out_dir`` is then unchanged).
    """
    check_fps(fps)
    check_seed(seed)
    out = OutputSet(out_dir, overwrite=overwrite, inputs=(video, model.path) + (() if image is None else (image,)))
    with out as folder:
        timings = {}
        tic = time.perf_counter()
        ref_frames, src_fps = read_reference(video, reference, log=log)
        timings["read_video"] = time.perf_counter() - tic
        out_fps = _output_fps(fps, src_fps, reference, video)

        tic = time.perf_counter()
        size = tuple(ref_frames.shape[i] for i in (0, 2, 3))  # frames, height, width
        cog, plan = load_for_run(model, size, config, log=log)
        timings["load_model"] = time.perf_counter() - tic
        resolved = dataclasses.replace(config.resolved(cog), gradient_checkpointing=plan.gradient_checkpointing)
        start = start_frame(cog, image, ref_frames, reference)

        tic = time.perf_counter()
        with cog.on_device("vae"):
            ref_latents = cog.encode_video(ref_frames, sample_seed=reference.sample_seed)
        timings["encode_reference"] = time.perf_counter() - tic
        tic = time.perf_counter()
        motion = reference_motion(cog, ref_latents, resolved)
        timings["extract_amf"] = time.perf_counter() - tic

        out_frames, result = generate(cog, prompt, resolved, motion, size=size, negative_prompt=negative_prompt,
                                      seed=seed, callback=callback, timings=timings, image=start)

        settings = {
            "model": dataclasses.asdict(model), "model_family": cog.variant, "video": str(video), "prompt": prompt,
            "image": None if start is None else (str(image) if image is not None else "the reference's first frame"),
            "preset": preset, "negative_prompt": negative_prompt, "reference": dataclasses.asdict(reference),
            "num_frames": int(ref_frames.shape[0]), "seed": seed, "fps": out_fps,
            "frames_written": int(out_frames.shape[0]),
        }
        record = _record("transfer", settings, resolved, result, timings, memory_record(plan, model.device))
        writers = {
            "result.mp4": lambda p: write_video(p, out_frames, out_fps),
            "reference.mp4": lambda p: write_video(p, ref_frames, out_fps),
        }
        if result.embeds is not None:
            result.embeds.reference = Path(video).name
            # the count read, not "auto": a replay reads the same frames
            result.embeds.reference_options = dataclasses.asdict(
                dataclasses.replace(reference, num_frames=int(ref_frames.shape[0])))
            writers["embeds.safetensors"] = lambda p: save_embeds(p, result.embeds)
        writers["run.json"] = lambda p: write_json(p, record)
        _write_all(out, folder, writers)
    return record


@collecting_warnings
def transfer_flow(
    model: ModelOptions,
    flow_path: str | os.PathLike,
    prompt: str,
    out_dir: str | os.PathLike,
    *,
    target: FlowTarget = FlowTarget(),
    image: str | os.PathLike | None = None,
    negative_prompt: str = "",
    config: GuidanceConfig = GuidanceConfig(),
    seed: int = 0,
    fps: float | None = None,
    overwrite: bool = False,
    callback: Callback | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Generation that follows a flow field instead of a reference video (``python -m ditflow poke``'s
    ``flow.safetensors``): the straight-line motion target of :func:`~ditflow.motion_target.poke_reference` at the
    guidance block(s), on the model's token grid, no KV injection. Publishes ``result.mp4`` and ``run.json`` as
    ``out_dir`` (as :func:`transfer`); returns the run record.

    Args:
        image: image-to-video models: the start frame's image file, fitted like the flow (``target.fit``); the
            poked image is the natural one. Text-to-video models take none.
    Raises:
        DiTFlowError: as for :func:`transfer`; a flow file that cannot be read, a target where nothing moves, a
            ``config`` that cannot use a motion target (loss moft/smm, mode none), or a start image missing (I2V)
            or given to a text-to-video model.
    """
    from .config import Loss
    from .motion_target import poke_reference, read_flow

    if config.mode is Mode.NONE or Loss.parse(config.loss) is not Loss.AMF:
        raise DiTFlowError("a flow gives an AMF motion target: use --loss amf with --mode latent, rope or posemb.")
    check_fps(fps)  # None: the model's own rate (8 on CogVideoX 1.0, 16 on 1.5), known once it is loaded
    check_seed(seed)
    size = (NATIVE_FRAMES if target.num_frames == AUTO else target.num_frames, target.height, target.width)
    out = OutputSet(out_dir, overwrite=overwrite, inputs=(flow_path, model.path) + (() if image is None else (image,)))
    with out as folder:
        flow, flow_metadata = read_flow(flow_path)

        def motion_at(blocks, backbone=None):  # checks flow, size and options: done before the model loads too
            return poke_reference(flow, num_frames=size[0], height=size[1], width=size[2], blocks=blocks,
                                  fit=target.fit, scale=target.scale, min_motion=target.min_motion,
                                  temperature=config.temperature, model=backbone)

        motion_at(config.guidance_blocks or (0,))
        timings = {}
        tic = time.perf_counter()
        cog, plan = load_for_run(model, size, config, log=log)
        timings["load_model"] = time.perf_counter() - tic
        fps = cog.defaults.fps if fps is None else fps
        if cog.needs_image and image is None:
            raise DiTFlowError(f"{cog.name} generates from a start image; give it with --image (the poked image, "
                               "whose motion the flow describes).")
        start = start_frame(cog, image, None, ReferenceOptions(resize=target.fit), size)
        resolved = dataclasses.replace(config.resolved(cog), kv_injection_blocks=(),
                                       gradient_checkpointing=plan.gradient_checkpointing)
        out_frames, result = generate(cog, prompt, resolved, motion_at(resolved.guidance_blocks, cog), size=size,
                                      negative_prompt=negative_prompt, seed=seed, callback=callback, timings=timings,
                                      image=start)
        settings = {
            "model": dataclasses.asdict(model), "model_family": cog.variant, "flow": str(flow_path),
            "flow_metadata": flow_metadata, "target": dataclasses.asdict(target), "prompt": prompt,
            "negative_prompt": negative_prompt, "num_frames": size[0], "seed": seed, "fps": fps,
            "frames_written": int(out_frames.shape[0]), "image": None if image is None else str(image),
        }
        record = _record("transfer_flow", settings, resolved, result, timings, memory_record(plan, model.device))
        _write_all(out, folder, {"result.mp4": lambda p: write_video(p, out_frames, fps),
                                 "run.json": lambda p: write_json(p, record)})
    return record


def replay_reference(embeds: PositionEmbeds, reference: ReferenceOptions | None = None) -> ReferenceOptions:
    """The reference frames a replay of ``embeds`` reads for KV injection: ``reference`` if given, else the options
    stored in the file, else the embeddings' own frame count and size (first frames, centre crop).

    Raises:
        DiTFlowError: if those options give another latent grid than the embeddings' (the message gives both).
    """
    frames, height, width = size_of_grid(embeds.variant, tuple(embeds.grid))
    own = ReferenceOptions(num_frames=frames, height=height, width=width)
    if reference is None:
        reference = ReferenceOptions(**embeds.reference_options) if embeds.reference_options else own
    # Token grids compare (CogVideoX 1.5: 2 latent frames a token); the embeddings' own size has the fewest frames.
    grid = token_grid(embeds.variant, reference.num_frames, reference.height, reference.width)
    if grid != tuple(embeds.grid):
        raise DiTFlowError(
            f"the reference for KV injection ({reference.num_frames} frames at {reference.height}×{reference.width} px, "
            f"latent grid {'×'.join(map(str, grid))}) does not match the embeddings' grid "
            f"{'×'.join(map(str, embeds.grid))}; use {own.num_frames} frames at {own.height}×{own.width} px."
        )
    return reference


@collecting_warnings
def inject(
    model: ModelOptions,
    embeds_path: str | os.PathLike,
    prompt: str,
    out_dir: str | os.PathLike,
    *,
    video: str | os.PathLike | None = None,
    image: str | os.PathLike | None = None,
    reference: ReferenceOptions | None = None,
    negative_prompt: str = "",
    config: GuidanceConfig = GuidanceConfig(mode=Mode.NONE),
    seed: int | None = None,
    fps: float | None = None,
    overwrite: bool = False,
    callback: Callback | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Zero-shot generation with saved embeddings and a new prompt (no optimisation).

    With ``video`` (the reference the embeddings were made from, read as :func:`replay_reference` says), the saved
    steps also run KV injection at ``config.kv_injection_blocks`` (default on, as the authors' ``--inject_embeds``;
    ``()`` turns it off). The number of steps is the embeddings' (they are tied to its timesteps); ``config``
    supplies CFG and the KV injection blocks. ``seed`` defaults to the seed stored in the file (else 0).
    Publishes ``result.mp4`` and ``run.json`` as ``out_dir`` (see the module docstring); returns the run record.

    Args:
        image: image-to-video models: the start frame's image file (default: the ``video``'s first frame; one of
            them is needed).
        fps: frame rate of the written video (default: the model's, 8 on CogVideoX 1.0 and 16 on 1.5).
        overwrite, log: as for :func:`transfer`.
    Raises:
        DiTFlowError: as for :func:`transfer`; embeddings that do not fit the model; a reference of another size.
    """
    check_fps(fps)  # None: the model's own rate (8 on CogVideoX 1.0, 16 on 1.5), known once it is loaded
    if seed is not None:
        check_seed(seed)
    inputs = (embeds_path, model.path) + (() if video is None else (video,)) + (() if image is None else (image,))
    out = OutputSet(out_dir, overwrite=overwrite, inputs=inputs)
    with out as folder:
        timings = {}
        embeds = load_embeds(embeds_path)
        embeds.check_values()  # before the model loads (the sampler checks again, for every caller)
        seed = seed if seed is not None else (embeds.seed if embeds.seed is not None else 0)
        inject_kv = video is not None and bool(config.kv_injection_blocks)
        if inject_kv:
            reference = replay_reference(embeds, reference)
            tic = time.perf_counter()
            ref_frames, _ = read_reference(video, reference)
            timings["read_video"] = time.perf_counter() - tic
        # Injection replays the saved steps, so the schedule is the embeddings' own.
        config = dataclasses.replace(config, mode=Mode.NONE, num_inference_steps=embeds.num_inference_steps,
                                     kv_injection_blocks=config.kv_injection_blocks if inject_kv else ())
        tic = time.perf_counter()
        cog, plan = load_for_run(model, None, config, grid=tuple(embeds.grid), log=log)
        timings["load_model"] = time.perf_counter() - tic
        fps = cog.defaults.fps if fps is None else fps
        config = config.resolved(cog)
        motion = None
        if inject_kv:
            tic = time.perf_counter()
            with cog.on_device("vae"):
                motion = reference_without_amf(cog, cog.encode_video(ref_frames, sample_seed=reference.sample_seed))
            timings["encode_reference"] = time.perf_counter() - tic
        start = start_frame(cog, image, ref_frames if inject_kv else None, reference if inject_kv else None,
                            size=cog.size_of_grid(tuple(embeds.grid)))
        frames, result = generate(cog, prompt, config, motion, negative_prompt=negative_prompt, seed=seed,
                                  callback=callback, timings=timings, embeds=embeds, image=start)
        settings = {
            "model": dataclasses.asdict(model), "model_family": cog.variant, "embeds": str(embeds_path),
            "embeds_prompt": embeds.prompt, "embeds_reference": embeds.reference, "prompt": prompt,
            "negative_prompt": negative_prompt, "seed": seed, "fps": fps, "frames_written": int(frames.shape[0]),
            "latent_grid": list(embeds.grid), "video_frames": cog.size_of_grid(tuple(embeds.grid))[0],
            "video": None if video is None else str(video),
            "reference": dataclasses.asdict(reference) if inject_kv else None,
        }
        record = _record("inject", settings, config, result, timings, memory_record(plan, model.device))
        _write_all(out, folder, {"result.mp4": lambda p: write_video(p, frames, fps),
                                 "run.json": lambda p: write_json(p, record)})
    return record


__all__ = [
    "AUTO", "DiTFlowError", "FlowTarget", "ModelOptions", "ReferenceOptions", "generate", "inject", "load_for_run",
    "memory_record", "read_reference", "reference_motion", "replay_reference", "transfer", "transfer_flow",
]
