# SPDX-License-Identifier: Apache-2.0
"""Evaluation runner for DiTFlow §5.1: every method × video × prompt kind → videos, MF / IQ, one table.

A manifest (JSON) lists reference videos, each with a ``[start, end, step]`` frame range and the paper's three
prompts (``caption``, ``subject``, ``scene``)::

    {"videos": [{"name": "bmx-trees", "video": "../../../shared/videos/bmx-trees.mp4", "frames": [0, 24, 1],
                 "prompts": {"caption": "...", "subject": "...", "scene": "..."}}]}

``video`` is absolute or relative to the manifest file. An entry may instead name a DAVIS 2017 clip,
``"davis": "bmx-trees"``, read from ``<davis_root>/JPEGImages/480p/bmx-trees/`` (DAVIS is not redistributed; the
paper's 50 clips × 3 prompts are ``benchmarks/manifests/davis_paper.json``). Methods (:data:`METHODS`) are the
paper's Table 1 rows, all on one base :class:`~ditflow.config.GuidanceConfig`, so that they differ only in what the
row names.

Frames: the paper uses 24 frames per clip. By default (``clip_frames="first"``, ours) the runner keeps the **first**
``4k+1`` frames of the range, the largest such count that fits (24 → 21, capped by ``max_frames``); the authors
preset keeps the whole range (``"range"``: 24, a multiple of 8 the VAE also takes; 6 latent frames either way). MF
(:class:`~ditflow.config.MFVariant`, default the official formula) is measured between those reference frames (at
the generation size) and the generated video; IQ between the generated frames and the prompt.

Outputs in ``out``: ``videos/<video>_<method>_<kind>.<id>.mp4``, ``results/<video>_<method>_<kind>.<id>.json`` (one
record per item, written last and atomically) and ``table.csv`` / ``table.md``. ``<id>`` is a hash of everything that
makes the item's result (:meth:`BenchOptions.settings`: model, dtype, clip, frames, size, prompt, seed, method and
guidance settings, metric settings), which the record also holds: a re-run skips an item only when a record of the
same settings reads back whole and its video is there, and redoes a zero-byte or cut-short record. Results of other
settings stay on disk untouched; the table is built from this run's settings only and names the model, steps and
seed. Work runs sequentially in this process, or over a Ray cluster (``ray_address``;
``ray`` is optional and imported only then): each Ray worker loads the model once and returns frames and record,
and the driver writes every file, so workers need the model path but no shared output folder.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch
from torch import Tensor

from .config import ClipFrames, GuidanceConfig, MFVariant, ReferenceOptions
from .errors import DiTFlowError
from .files import remove_orphans, write_json, write_text
from .jobs import (
    ModelOptions,
    generate,
    memory_record,
    read_reference,
    reference_motion,
)
from .layout import MIN_FRAMES, largest_frame_count
from .video import write_video

#: Method name → the GuidanceConfig fields it sets over the base config (Table 1 rows).
#: ditflow/smm/moft keep the base config's KV injection (paper default: on at block 0), so they differ in the loss only.
METHODS: dict[str, dict] = {
    "ditflow": {"mode": "latent", "loss": "amf"},
    "smm": {"mode": "latent", "loss": "smm"},
    "moft": {"mode": "latent", "loss": "moft"},
    "injection": {"mode": "none"},  # "injection only": no optimisation, reference K/V injected
    "backbone": {"mode": "none", "kv_injection_blocks": ()},  # plain CogVideoX
}
PROMPT_KINDS = ("caption", "subject", "scene")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ---------------------------------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ManifestVideo:
    """One manifest entry: ``name`` (file-name safe), resolved ``path``, ``frames`` = (start, end, step), prompts."""

    name: str
    path: Path
    frames: tuple[int, int, int]
    prompts: dict[str, str]

    def reference_options(self, options: BenchOptions) -> ReferenceOptions:
        """The :class:`~ditflow.config.ReferenceOptions` of this clip under ``options`` (see the module docstring)."""
        if ClipFrames.parse(options.clip_frames) is ClipFrames.RANGE:
            count = len(range(*self.frames))
            count = count if options.max_frames is None else min(count, options.max_frames)
        else:
            count = clip_frame_count(self.frames, options.max_frames)
        return ReferenceOptions(num_frames=count, height=options.height, width=options.width, start=self.frames[0],
                                stride=self.frames[2], resize=options.resize, sample_seed=options.sample_seed)


def clip_frame_count(frames: tuple[int, int, int], max_frames: int | None = None) -> int:
    """Largest 4k+1 ≤ the number of frames in ``range(start, end, step)`` (and ≤ ``max_frames``); 24 → 21.

    Raises:
        DiTFlowError: if fewer than 5 frames (2 latent frames: motion needs two) remain.
    """
    start, end, step = frames
    n = len(range(start, end, step))
    if max_frames is not None:
        n = min(n, max_frames)
    if n < MIN_FRAMES:
        raise DiTFlowError(f"frame range [{start}, {end}, {step}] gives {n} frame(s); at least 5 are needed (4k+1).")
    return largest_frame_count(n, cap=n)


def _short(value) -> str:
    """A bounded repr of a manifest value for error messages (a deep or long value cannot flood the terminal)."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother, r.maxlist, r.maxdict = 2, 60, 60, 4, 4
    return r.repr(value)


def _text(value) -> bool:
    return isinstance(value, str) and bool(value.strip()) and "\x00" not in value


#: Where a DAVIS clip's frames are looked for under ``davis_root``, in order (the DAVIS 2017 layout first).
DAVIS_LAYOUTS = ("JPEGImages/480p/{clip}", "{clip}")


def davis_clip(davis_root: str | os.PathLike | None, clip: str, where: str) -> Path:
    """The frame folder of DAVIS clip ``clip`` under ``davis_root`` (:data:`DAVIS_LAYOUTS`).

    Raises:
        DiTFlowError: no ``davis_root`` given, or the clip is not there (the message names the clip and the folders
            looked at).
    """
    if davis_root is None:
        raise DiTFlowError(f"{where} names the DAVIS clip {clip!r}: give the folder of a local DAVIS 2017 copy "
                           "(--davis-root DIR, holding JPEGImages/480p/<clip>/; DAVIS is not shipped with DiTFlow).")
    root = Path(davis_root).expanduser()
    tried = [root / layout.format(clip=clip) for layout in DAVIS_LAYOUTS]
    for folder in tried:
        if folder.is_dir():
            return folder.resolve()
    raise DiTFlowError(f"DAVIS clip {clip!r} ({where}) is missing: none of {', '.join(map(str, tried))} is a folder; "
                       "check --davis-root (a DAVIS 2017 trainval copy has JPEGImages/480p/<clip>/).")


def load_manifest(path: str | os.PathLike, davis_root: str | os.PathLike | None = None) -> list[ManifestVideo]:
    """Reads and checks a manifest (format in the module docstring); relative video paths are resolved against
    the manifest's folder, DAVIS clip names against ``davis_root``. Every field must have its JSON type: ``name``,
    ``video`` (or ``davis``) and each prompt non-empty strings (a ``null`` prompt is refused, not turned into the
    text "None"), ``frames`` three integers (not booleans).

    Raises:
        DiTFlowError: unreadable or too deeply nested JSON, a missing field or one of the wrong type, a bad name,
            range or prompt kind, or a DAVIS clip that is not under ``davis_root`` (the message names the entry and
            the field, or the clip).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except RecursionError:
        raise DiTFlowError(f"manifest {path} is nested too deeply to be a manifest; see the format in "
                           "ditflow/evaluation.py.") from None
    except (OSError, ValueError) as err:
        raise DiTFlowError(f"cannot read manifest {path}: {err}") from None
    entries = data.get("videos") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DiTFlowError(f"manifest {path} needs a non-empty list 'videos'.")
    videos, seen = [], set()
    for i, e in enumerate(entries):
        where = f"manifest {path}, video {i}"
        if not isinstance(e, dict) or not {"name", "frames", "prompts"} <= set(e) or len({"video", "davis"} & set(e)) != 1:
            raise DiTFlowError(f"{where}: needs the keys name, frames, prompts and one of video, davis.")
        name = e["name"]
        if not isinstance(name, str) or not _NAME.match(name) or name in seen:
            raise DiTFlowError(f"{where}: name {_short(name)} must be a unique string of letters, digits, '.', '_', "
                               "'-'.")
        seen.add(name)
        source = "davis" if "davis" in e else "video"
        if not _text(e[source]):
            what = "a DAVIS clip name" if source == "davis" else "a path"
            raise DiTFlowError(f"{where} ({name}): {source} must be {what} as a string, got {_short(e[source])}.")
        frames = e["frames"]
        if not (isinstance(frames, list) and len(frames) == 3
                and all(isinstance(v, int) and not isinstance(v, bool) for v in frames)
                and frames[0] >= 0 and frames[2] >= 1):
            raise DiTFlowError(f"{where} ({name}): frames must be [start, end, step] integers, start ≥ 0, step ≥ 1; "
                               f"got {_short(frames)}.")
        prompts = e["prompts"]
        if not isinstance(prompts, dict) or not prompts or not set(prompts) <= set(PROMPT_KINDS):
            raise DiTFlowError(f"{where} ({name}): prompts must map some of {', '.join(PROMPT_KINDS)} to text; "
                               f"got {_short(prompts)}.")
        for kind, text in prompts.items():
            if not _text(text):
                raise DiTFlowError(f"{where} ({name}): the {kind} prompt must be non-empty text, got {_short(text)}.")
        if source == "davis":
            video = davis_clip(davis_root, e["davis"], f"{where} ({name})")
        else:
            video = Path(e["video"]).expanduser()
            video = (video if video.is_absolute() else (path.parent / video)).resolve()
        videos.append(ManifestVideo(name, video, tuple(frames), dict(prompts)))
    return videos


# ---------------------------------------------------------------------------------------------------------------------
# Options and items
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchOptions:
    """Everything but the manifest: model, methods, generation size, base guidance, metrics.

    Attributes:
        height, width: generation size in px (paper: 480×720). ``max_frames`` caps the frames per clip.
        resize, sample_seed: how reference frames are fitted and encoded (:class:`~ditflow.config.ReferenceOptions`).
        clip_frames: the first 4k+1 frames of each range (ours) or the whole range (the authors preset).
        mf_variant: the Motion Fidelity formula (:class:`~ditflow.config.MFVariant`; default the official one).
        guidance: base settings every method starts from (steps, T_opt, blocks, ...; defaults: the paper's).
        grid_size, tracker, cotracker_checkpoint: MF tracking (paper: 55×55 CoTracker3; ``auto`` falls back to flow).
        clip_model: folder of CLIP ViT-B/32 for IQ; ``None`` tries the local Hugging Face cache, and IQ is skipped
            (the reason recorded) when it lacks the weights; a folder given here that cannot be loaded is an error,
            raised by :func:`run_benchmark` before any work where the folder is missing or holds no safetensors.
    """

    model: ModelOptions
    methods: tuple[str, ...] = tuple(METHODS)
    height: int = 480
    width: int = 720
    max_frames: int | None = None
    guidance: GuidanceConfig = GuidanceConfig()
    seed: int = 0
    negative_prompt: str = ""
    grid_size: int = 55
    tracker: str = "auto"
    cotracker_checkpoint: str | None = None
    clip_model: str | None = None
    resize: str = "crop"
    sample_seed: int | None = None
    clip_frames: ClipFrames = ClipFrames.FIRST
    mf_variant: MFVariant = MFVariant.OFFICIAL

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise DiTFlowError(f"unknown method(s) {unknown or '(none given)'}; choose from {', '.join(METHODS)}.")

    def config(self, method: str) -> GuidanceConfig:
        return dataclasses.replace(self.guidance, **METHODS[method])

    def settings(self, item: Item) -> dict:
        """Everything that makes ``item``'s video and scores, as plain JSON values: the key a finished item is
        found by on a re-run. The device and the memory savers (offload, VAE slicing) are left out: they change how,
        not what, is computed."""
        model = self.model
        local = Path(model.path).expanduser()
        settings = {
            "model": str(local.resolve()) if local.exists() else str(model.path), "dtype": model.dtype,
            "vae_tiling": model.vae_tiling, "video": str(item.video.path), "frames": list(item.video.frames),
            "num_frames": item.video.reference_options(self).num_frames, "size": [self.height, self.width],
            "resize": self.resize, "reference_sample_seed": self.sample_seed,
            "method": item.method, "prompt_kind": item.kind, "prompt": item.prompt,
            "negative_prompt": self.negative_prompt, "seed": self.seed,
            "guidance": {k: (v.value if isinstance(v, Enum) else v)
                         for k, v in dataclasses.asdict(self.config(item.method)).items()},
            "metrics": {"grid_size": self.grid_size, "tracker": self.tracker,
                        "cotracker_checkpoint": self.cotracker_checkpoint, "clip_model": self.clip_model,
                        "mf_variant": MFVariant.parse(self.mf_variant).value},
        }
        return json.loads(json.dumps(settings))  # as a record reads back: tuples are lists


@dataclass(frozen=True)
class Item:
    """One generation: a manifest video, a method and a prompt kind; ``key`` names its files."""

    video: ManifestVideo
    method: str
    kind: str

    @property
    def key(self) -> str:
        return f"{self.video.name}_{self.method}_{self.kind}"

    @property
    def prompt(self) -> str:
        return self.video.prompts[self.kind]


def items_of(videos: list[ManifestVideo], methods) -> list[Item]:
    """Every (video, method, prompt kind), video-major so that a worker's reference caches are reused."""
    return [Item(v, m, k) for v in videos for m in methods for k in PROMPT_KINDS if k in v.prompts]


def settings_id(settings: dict) -> str:
    """12 hex digits of the SHA-256 of ``settings`` (canonical JSON): the ``<id>`` in an item's file names."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _paths(out: Path, item: Item, settings: dict) -> tuple[Path, Path]:
    stem = f"{item.key}.{settings_id(settings)}"
    return out / "videos" / f"{stem}.mp4", out / "results" / f"{stem}.json"


def finished_record(out: Path, item: Item, settings: dict) -> tuple[dict | None, str]:
    """The record of ``item`` finished under ``settings``, or ``None`` and why it must be (re)done.

    Finished means: the record (written last) reads back as a whole JSON object made with the same settings, and
    the video beside it is a non-empty file. A zero-byte or cut-short record (a crash or a full disk while it was
    written by an older version, or damage since) is redone, not an error.
    """
    video, path = _paths(out, item, settings)
    if not path.exists():
        return None, "not run yet with these settings"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None, f"its result record {path.name} is unreadable (empty or cut short)"
    if not isinstance(record, dict) or record.get("settings") != settings:
        return None, f"its result record {path.name} was made with other settings"
    if not video.is_file() or video.stat().st_size == 0:
        return None, f"its video {video.name} is missing"
    return record, "finished"


# ---------------------------------------------------------------------------------------------------------------------
# One worker: a loaded model, reference caches, the metrics
# ---------------------------------------------------------------------------------------------------------------------


class Worker:
    """Runs items with one loaded model (lazily loaded); caches reference latents and motion per video."""

    def __init__(self, options: BenchOptions):
        self.options = options
        self._cog = None
        self._plan = None  # the memory plan, settled at load for the first item's size (ditflow.memory)
        self._latents: dict[str, Tensor] = {}
        self._motion: dict[tuple, object] = {}
        self._clip = None  # (model, processor) or the reason IQ is skipped

    def _load(self, ref_frames: Tensor):
        """The model, loaded on first use with a memory plan for this item's size and the DiTFlow method."""
        if self._cog is None:
            from . import jobs  # looked up at call time, so tests can stand in for the loader

            size = (ref_frames.shape[0], ref_frames.shape[2], ref_frames.shape[3])
            self._cog, self._plan = jobs.load_for_run(self.options.model, size, self.options.config("ditflow"))
        return self._cog

    def _clip_or_reason(self):
        if self._clip is None:
            from .metrics import load_clip

            try:
                self._clip = load_clip(self.options.clip_model)
            except DiTFlowError as err:
                if self.options.clip_model is not None:  # given explicitly: not a reason to skip IQ quietly
                    raise
                self._clip = str(err)
            except ImportError as err:  # pragma: no cover - transformers is a dependency
                self._clip = f"transformers cannot load CLIP: {err}"
        return self._clip

    def run(self, item: Item, ref_frames: Tensor) -> tuple[Tensor, dict]:
        """Generates ``item`` and measures it; returns (frames ``[F, 3, H, W]`` in [-1, 1], result record)."""
        from .metrics import clip_score, motion_fidelity

        cog, opts = self._load(ref_frames), self.options
        timings: dict[str, float] = {}
        config = dataclasses.replace(opts.config(item.method).resolved(cog),
                                     gradient_checkpointing=self._plan.gradient_checkpointing)
        tic = time.perf_counter()
        name = item.video.name
        if name not in self._latents:
            with cog.on_device("vae"):
                self._latents[name] = cog.encode_video(ref_frames, sample_seed=opts.sample_seed)
        key = (name, config.mode, config.loss, config.guidance_blocks, config.temperature, config.soft_reference,
               bool(config.kv_injection_blocks))
        if key not in self._motion:
            self._motion[key] = reference_motion(cog, self._latents[name], config)
        timings["reference"] = time.perf_counter() - tic
        tic = time.perf_counter()
        size = (ref_frames.shape[0], ref_frames.shape[2], ref_frames.shape[3])
        image = ref_frames[0] if cog.needs_image else None  # I2V: the reference's first frame starts the video
        frames, result = generate(cog, item.prompt, config, self._motion[key], size=size,
                                  negative_prompt=opts.negative_prompt, seed=opts.seed, timings=timings, image=image)
        timings["generate"] = time.perf_counter() - tic

        tic = time.perf_counter()
        mf = motion_fidelity(ref_frames, frames, grid_size=opts.grid_size, tracker=opts.tracker,
                             cotracker_checkpoint=opts.cotracker_checkpoint, variant=opts.mf_variant)
        timings["motion_fidelity"] = time.perf_counter() - tic
        clip = self._clip_or_reason()
        iq, iq_skipped = None, None
        if isinstance(clip, str):
            iq_skipped = clip
        else:
            tic = time.perf_counter()
            iq = clip_score(frames, item.prompt, model=clip[0], processor=clip[1])
            timings["clip_score"] = time.perf_counter() - tic
        record = {
            "video": name, "method": item.method, "prompt_kind": item.kind, "prompt": item.prompt,
            "mf": mf.score, "mf_variant": MFVariant.parse(opts.mf_variant).value, "tracker": mf.tracker, "iq": iq,
            "iq_skipped": iq_skipped,
            "frames": int(frames.shape[0]), "size": [opts.height, opts.width], "seed": opts.seed,
            "model": str(opts.model.path), "model_family": cog.variant,
            "guidance": {k: (v.value if hasattr(v, "value") else v) for k, v in dataclasses.asdict(config).items()},
            "memory": memory_record(self._plan, opts.model.device),
            "loss_per_step": result.losses, "timings_s": timings,
        }
        return frames, record


# ---------------------------------------------------------------------------------------------------------------------
# Runner
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class BenchReport:
    """What :func:`run_benchmark` did: records of every item (new and skipped), and the files of the table."""

    records: list[dict]
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    table_csv: Path | None = None
    table_md: Path | None = None


def _finish(out: Path, item: Item, settings: dict, frames: Tensor, record: dict, fps: float) -> dict:
    video, path = _paths(out, item, settings)
    record = {**record, "settings": settings, "settings_id": settings_id(settings)}
    write_video(video, frames, fps)  # atomic
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record)  # atomic, and last: its presence marks the item done
    return record


def _check_out(out: Path) -> None:
    """``out`` is a folder (created if missing) this process can write to; orphans of killed writes are removed."""
    if out.exists() and not out.is_dir():
        raise DiTFlowError(f"--out {out} is a file; give a folder (it is created if missing, and reused to resume).")
    try:
        for sub in ("videos", "results"):
            (out / sub).mkdir(parents=True, exist_ok=True)
            remove_orphans(out / sub)
        remove_orphans(out)
        if not os.access(out / "results", os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as err:
        raise DiTFlowError(f"cannot write into --out {out} ({err.strerror or err}); choose a folder you can write "
                           "to.") from None


def _reference_frames(videos: list[ManifestVideo], options: BenchOptions) -> dict[str, tuple[Tensor, float]]:
    refs = {}
    for v in videos:
        frames, fps = read_reference(v.path, v.reference_options(options))
        refs[v.name] = (frames, fps / v.frames[2])
    return refs


def run_benchmark(
    manifest: str | os.PathLike,
    options: BenchOptions,
    out: str | os.PathLike,
    *,
    ray_address: str | None = None,
    ray_workers: int | None = None,
    davis_root: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
) -> BenchReport:
    """Runs every unfinished item of ``manifest`` × ``options.methods`` and writes the table (see module docstring).

    Args:
        ray_address: a Ray cluster address (``"auto"``, ``"ray://host:10001"``, ``"local"`` to start one here);
            ``None`` runs sequentially in this process. An already initialised Ray is used as it is.
        ray_workers: Ray actors, each holding one model (default: the cluster's GPU count, else 1). Each asks for a
            GPU when the model device is CUDA.
        davis_root: a local DAVIS 2017 copy, for manifests whose entries name DAVIS clips.
        log: receives one line per item (default: silent).
    Raises:
        DiTFlowError: bad manifest, options (a ``clip_model`` folder that is missing or holds no safetensors) or
            videos (before any model is loaded); a ``clip_model`` that fails to load; ``ray`` missing.
    """
    out = Path(out).expanduser()
    log = log or (lambda line: None)
    videos = load_manifest(manifest, davis_root)
    if options.clip_model is not None:  # asked for explicitly: an error now, not IQ skipped after every generation
        from .metrics import check_clip_folder

        check_clip_folder(options.clip_model)
    _check_out(out)
    refs = _reference_frames(videos, options)  # reads and checks every clip before any model is loaded
    items = items_of(videos, options.methods)
    settings = {i.key: options.settings(i) for i in items}
    records, todo = {}, []
    report = BenchReport(records=[])
    for item in items:
        record, why = finished_record(out, item, settings[item.key])
        if record is None:
            todo.append(item)
            if why != "not run yet with these settings":
                log(f"redo {item.key}: {why}")
        else:
            records[item.key] = record
            report.skipped.append(item.key)
            log(f"skip {item.key} (finished with these settings)")
    if todo:
        run = _run_ray if ray_address is not None else _run_local
        for item, frames, record in run(todo, refs, options, ray_address=ray_address, ray_workers=ray_workers):
            records[item.key] = _finish(out, item, settings[item.key], frames, record, refs[item.video.name][1])
            report.ran.append(item.key)
            log(f"done {item.key}: MF {record['mf']:.3f} ({record['tracker']})"
                + ("" if record["iq"] is None else f", IQ {record['iq']:.3f}"))
    report.records = [records[i.key] for i in items]
    report.table_csv, report.table_md = write_table(out, report.records, options.methods)
    return report


def _run_local(todo, refs, options, **_):
    worker = Worker(options)
    for item in todo:
        frames, record = worker.run(item, refs[item.video.name][0])
        yield item, frames, record


class _RayWorker:  # the body of the Ray actor: a Worker plus uint8 frames (a quarter of the float32 payload)
    def __init__(self, options: BenchOptions):
        self.worker = Worker(options)

    def run(self, item: Item, ref_frames: Tensor):
        frames, record = self.worker.run(item, ref_frames)
        return ((frames.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8), record


def _run_ray(todo, refs, options, *, ray_address, ray_workers):
    try:
        import ray
        from ray.util import ActorPool
    except ImportError:
        raise DiTFlowError("--ray needs the optional 'ray' package (pip install ray); without --ray the benchmark "
                           "runs sequentially here.") from None
    if not ray.is_initialized():
        ray.init(address=None if ray_address == "local" else ray_address)
    gpu = str(options.model.device).startswith("cuda")
    if ray_workers is None:
        ray_workers = max(1, int(ray.cluster_resources().get("GPU", 0))) if gpu else 1
    actor = ray.remote(num_gpus=1 if gpu else 0, num_cpus=1)(_RayWorker)
    workers = [actor.remote(options) for _ in range(min(ray_workers, len(todo)))]
    ref_refs = {name: ray.put(frames) for name, (frames, _) in refs.items()}
    by_key = {i.key: i for i in todo}
    pool = ActorPool(workers)
    for frames, record in pool.map_unordered(lambda w, it: w.run.remote(it, ref_refs[it.video.name]), todo):
        item = by_key[f"{record['video']}_{record['method']}_{record['prompt_kind']}"]
        yield item, frames.float() / 127.5 - 1, record
    for w in workers:
        ray.kill(w)


# ---------------------------------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------------------------------


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _values(records, read) -> str:
    """The distinct values ``read`` gives over ``records``, joined by "; " (one value in a table from one run)."""
    return "; ".join(dict.fromkeys(str(read(r)) for r in records))


#: What a table names besides the scores: model, steps and seed (columns of table.csv, a line of table.md).
_SETTINGS = {"model": lambda r: r["model"], "steps": lambda r: r["guidance"]["num_inference_steps"],
             "seed": lambda r: r["seed"]}


def summarise(records: list[dict], methods) -> list[dict]:
    """Rows (method, prompt kind incl. ``all``) with the mean MF and IQ over videos, the item count, and the model,
    steps and seed they were made with."""
    rows = []
    for m in methods:
        mine = [r for r in records if r["method"] == m]
        for kind in [*PROMPT_KINDS, "all"]:
            sel = [r for r in mine if kind in ("all", r["prompt_kind"])]
            if sel:
                rows.append({"method": m, "prompt_kind": kind, "n": len(sel), "mf": _mean(r["mf"] for r in sel),
                             "iq": _mean(r["iq"] for r in sel),
                             **{k: _values(sel, read) for k, read in _SETTINGS.items()}})
    return rows


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def write_table(out: Path, records: list[dict], methods) -> tuple[Path, Path]:
    """Writes ``table.csv`` (one row per method × prompt kind) and ``table.md`` (methods × kinds, MF / IQ)."""
    rows = summarise(records, methods)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["method", "prompt_kind", "n", "mf", "iq", *_SETTINGS],
                            lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({**r, "mf": "" if r["mf"] is None else f"{r['mf']:.4f}",
                         "iq": "" if r["iq"] is None else f"{r['iq']:.4f}"})
    kinds = [k for k in [*PROMPT_KINDS, "all"] if any(r["prompt_kind"] == k for r in rows)]
    trackers = sorted({r["tracker"] for r in records})
    skipped = sorted({r["iq_skipped"] for r in records if r.get("iq_skipped")})
    lines = ["| method | " + " | ".join(f"{k.capitalize()} MF / IQ" for k in kinds) + " |",
             "|---|" + "---|" * len(kinds)]
    cell = {(r["method"], r["prompt_kind"]): r for r in rows}
    for m in methods:
        vals = [cell.get((m, k)) for k in kinds]
        lines.append(f"| {m} | " + " | ".join("–" if v is None else f"{_fmt(v['mf'])} / {_fmt(v['iq'])}"
                                            for v in vals) + " |")
    videos = sorted({r["video"] for r in records})
    lines += ["", f"{len(videos)} video(s): {', '.join(videos)}. MF tracker: {', '.join(trackers)}.",
              f"Model {_values(records, _SETTINGS['model'])} ({_values(records, lambda r: r['model_family'])}), "
              f"{_values(records, _SETTINGS['steps'])} steps, seed {_values(records, _SETTINGS['seed'])}, "
              f"{_values(records, lambda r: '×'.join(map(str, r['size'])))} px, "
              f"{_values(records, lambda r: r['frames'])} frames."]
    if skipped:
        lines.append(f"IQ skipped: {skipped[0]}")
    csv_path, md_path = out / "table.csv", out / "table.md"
    out.mkdir(parents=True, exist_ok=True)
    write_text(csv_path, buf.getvalue())
    write_text(md_path, "\n".join(lines) + "\n")
    return csv_path, md_path


__all__ = [
    "METHODS", "PROMPT_KINDS", "BenchOptions", "BenchReport", "Item", "ManifestVideo", "Worker",
    "clip_frame_count", "finished_record", "items_of", "load_manifest", "run_benchmark", "settings_id", "summarise",
    "write_table",
]
