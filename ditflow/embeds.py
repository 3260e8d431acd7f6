# SPDX-License-Identifier: Apache-2.0
"""Optimised embeddings (DiTFlow-ρ_t and the z_t trajectory, §4.3, Fig. 7) and their file format: safetensors with
metadata.

A run that optimises RoPE (5B), the sin-cos table (2B) or the latent z_t saves the optimised tensor of every guided
timestep; a later run with a new prompt injects them zero-shot at the same steps (paper Fig. 7: ρ keeps the new
prompt's content, z_t leaks the old one's). Every file records the run's seed and how its reference frames were
taken, so a replay with KV injection reads the same frames. Differs from the authors'
script (method.md §6): no pickle (``torch.save`` of a dict keyed by tensor reprs); the metadata names the model
variant and grid so a mismatch is refused with both values instead of producing noise. The metadata key
``model_family`` keeps its name from format 1 (when only 2b and 5b existed); its value is the model's variant key
(:data:`ditflow.backbones.VARIANT_KEYS`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from .backbones import VARIANT_KEYS
from .config import MAX_SEED, Mode, ReferenceOptions, check_seed
from .errors import DiTFlowError, check_finite
from .files import atomic_path

FORMAT = "ditflow-position-embeds"
#: 2 adds ``seed`` and ``reference_options``; version-1 files load with those unknown.
FORMAT_VERSION = 2


@dataclass
class PositionEmbeds:
    """The optimised tensor of every guided step: positional embeddings ρ, or the latent z_t.

    Attributes:
        mode: ``Mode.ROPE`` (tables ``[2 (q, k), 2 (cos, sin), n, head_dim]``), ``Mode.POSEMB`` (tables
            ``[n, inner_dim]``) or ``Mode.LATENT`` (the run's scaled latents ``[1, F, C, H, W]`` after that step's
            optimisation, padded as the model runs them), float32.
        variant: the variant key of the model they were optimised on (``2b``, ``5b``, ``5b-i2v``, ``1.5``, ...).
        grid: latent token grid (F, h, w); ``n = F·h·w``.
        head_dim: attention head dimension of that model.
        num_inference_steps: denoising steps of the run; injection needs the same schedule.
        timesteps: the guided timesteps (scheduler values, 0..999), one per table.
        tables: one table per guided step, in step order.
        prompt: the prompt they were optimised with; reference: the reference video's file name.
        seed: seed of the run's initial noise (a replay uses it unless told otherwise); ``None`` if unknown.
        reference_options: how the reference frames were taken (:class:`~ditflow.config.ReferenceOptions` as a
            dict), so that a replay with KV injection reads the same frames at the same size; ``{}`` if unknown.
    """

    mode: Mode
    variant: str
    grid: tuple[int, int, int]
    head_dim: int
    num_inference_steps: int
    timesteps: tuple[int, ...]
    tables: list[Tensor]
    prompt: str = ""
    reference: str = ""
    seed: int | None = None
    reference_options: dict = field(default_factory=dict)

    def check_values(self, fix: str = "use embeddings saved by a rope/posemb run that finished normally") -> None:
        """Raises :class:`DiTFlowError` naming the guided step if a table holds NaN/Inf or has blown up (RoPE and
        sin-cos tables lie in [-1, 1]; such values make every injection black)."""
        for i, table in enumerate(self.tables):
            check_finite(table, f"the positional embeddings of guided step {i + 1}", fix)

    def check_compatible(self, model, grid: tuple[int, int, int], num_inference_steps: int,
                         latent_shape: tuple[int, ...] | None = None) -> None:
        """Raises :class:`DiTFlowError` naming both values if these embeddings cannot drive ``model`` at ``grid``
        (a z_t trajectory: also unless its latents have the run's ``latent_shape``, ``(F, C, H, W)`` as
        :attr:`~ditflow.backbones.base.Geometry.latent_shape`)."""
        checks = (
            ("model", self.variant, model.variant),
            ("attention head dim", self.head_dim, model.head_dim),
            ("latent grid F×h×w", "×".join(map(str, self.grid)), "×".join(map(str, grid))),
            ("number of steps", self.num_inference_steps, num_inference_steps),
        )
        if self.mode is Mode.POSEMB and self.tables:
            checks += (("table width (heads × head dim)", self.tables[0].shape[-1], model.num_heads * model.head_dim),)
        if self.mode is Mode.LATENT and self.tables and latent_shape is not None:
            checks += (("latents of shape", list(self.tables[0].shape[1:]), list(latent_shape)),)
        for name, saved, wanted in checks:
            if saved != wanted:
                raise DiTFlowError(
                    f"these embeddings were optimised with {name} {saved}, but this run has {wanted}; "
                    f"use embeddings made for the same model, frame count, size and steps."
                )


def save_embeds(path: str | os.PathLike, embeds: PositionEmbeds) -> Path:
    """Writes ``embeds`` to ``path`` (``.safetensors``) atomically: a temp file renamed when complete.

    Raises:
        DiTFlowError: if a table holds NaN/Inf or has blown up (they would make every injection black), or the seed
            is not an integer in 0..2^64−1.
    """
    from safetensors.torch import save_file

    embeds.check_values("they are not saved: optimise them again with a smaller learning rate")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"step_{i:03d}": t.detach().float().cpu().contiguous() for i, t in enumerate(embeds.tables)}
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "mode": embeds.mode.value,
        "model_family": embeds.variant,
        "latent_grid": json.dumps(list(embeds.grid)),
        "head_dim": str(embeds.head_dim),
        "num_inference_steps": str(embeds.num_inference_steps),
        "guided_timesteps": json.dumps(list(embeds.timesteps)),
        "prompt": embeds.prompt[:MAX_TEXT_CHARS],  # clipped so that load_embeds accepts the file
        "reference": embeds.reference[:MAX_TEXT_CHARS],
        "reference_options": json.dumps(embeds.reference_options),
    }
    if embeds.seed is not None:
        meta["seed"] = str(check_seed(embeds.seed, "the embeddings' seed"))
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


#: Limits of a file :func:`load_embeds` accepts; DiTFlow's own files are far below them.
MAX_HEADER_BYTES = 4_000_000  # the JSON header: a few hundred tensor entries and short texts
MAX_TEXT_CHARS = 65_536  # any metadata field (a T5 prompt uses at most 226 tokens, about 1,500 characters)
MAX_STEPS = 1000  # CogVideoX schedulers have 1000 training timesteps
MAX_GRID = (1024, 1024, 1024)  # latent frames, patch rows, patch columns (49 frames at 480×720 is 13×30×45)
_TABLE_DTYPES = {"F32", "F16", "BF16"}
_REMAKE = "make it again with a transfer run (or DiTFlow Save Embeds)"
_MODES = (Mode.ROPE, Mode.POSEMB, Mode.LATENT)


def _ints(text: str, name: str, path: Path, count: int | None = None) -> tuple[int, ...]:
    """A JSON list of integers from metadata field ``name``; raises :class:`DiTFlowError` if it is not one."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(type(v) is int for v in value) or count not in (None, len(value)):
        what = f"{count} integers" if count else "integers"
        raise DiTFlowError(f"{path} has {name} = {text[:80]!r}, not a JSON list of {what}; {_REMAKE}.")
    return tuple(value)


def _int(text: str, name: str, path: Path, hi: int) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= hi:
        raise DiTFlowError(f"{path} has {name} = {text[:80]!r}, not an integer in 1..{hi}; {_REMAKE}.")
    return int(text)


def _seed(path: Path, meta: dict[str, str]) -> int | None:
    text = meta.get("seed")
    if text is None:
        return None
    if not (text.isascii() and text.isdigit() and len(text) <= 20) or int(text) > MAX_SEED:  # 20 digits: 2^64 − 1
        raise DiTFlowError(f"{path} has seed = {text[:80]!r}, not an integer in 0..2^64−1; {_REMAKE}.")
    return int(text)


def _reference_options(path: Path, meta: dict[str, str]) -> dict:
    """The stored reference options: a JSON object of :class:`~ditflow.config.ReferenceOptions` fields and types."""
    text = meta.get("reference_options", "{}")
    try:
        options = json.loads(text)
    except ValueError:
        options = None
    types = {f.name: (str,) if f.name == "resize" else (int, type(None)) if f.name == "sample_seed" else (int,)
             for f in dataclasses.fields(ReferenceOptions)}
    bad = "not a JSON object" if not isinstance(options, dict) else next(
        (f"{k}={v!r}" for k, v in options.items() if k not in types or type(v) not in types[k]), None)
    if bad:
        raise DiTFlowError(
            f"{path} has reference_options = {text[:80]!r} ({bad}: the fields are {', '.join(types)}); {_REMAKE}."
        )
    return options


def _check_metadata(path: Path, meta: dict[str, str]) -> None:
    """Tag, version and the size of every text field, before anything else is read."""
    if meta.get("format") != FORMAT:
        raise DiTFlowError(f"{path} is a safetensors file but not DiTFlow positional embeddings (no '{FORMAT}' tag).")
    version = meta.get("format_version", "0")
    if not (version.isascii() and version.isdigit()):
        raise DiTFlowError(f"{path} has format version {version[:80]!r}, not an integer; {_REMAKE}.")
    if int(version) > FORMAT_VERSION:
        raise DiTFlowError(f"{path} has format version {version}; update the DiTFlow node pack to read it.")
    for key, value in meta.items():
        if len(value) > MAX_TEXT_CHARS:
            raise DiTFlowError(
                f"{path} has a metadata field {key!r} of {len(value):,} characters, more than the {MAX_TEXT_CHARS:,} "
                f"DiTFlow writes; {_REMAKE}."
            )
    missing = [k for k in ("mode", "model_family", "latent_grid", "head_dim", "num_inference_steps",
                           "guided_timesteps") if k not in meta]
    if missing:
        raise DiTFlowError(f"{path} has incomplete DiTFlow metadata (no {', '.join(missing)}); {_REMAKE}.")


def _check_tables(path: Path, tensors: dict, mode: Mode, grid: tuple[int, int, int], head_dim: int,
                  steps: int) -> list[str]:
    """Names of the tables in step order, after checking their names, count, dtypes and shapes from the header."""
    names = sorted(tensors)
    if names != [f"step_{i:03d}" for i in range(len(names))]:
        raise DiTFlowError(
            f"{path} holds tensors {names[:4]}{'…' if len(names) > 4 else ''}, not step_000, step_001, … in order; "
            f"{_REMAKE}."
        )
    if not 1 <= len(names) <= steps:
        raise DiTFlowError(f"{path} holds {len(names)} tables for a run of {steps} steps; {_REMAKE}.")
    n = grid[0] * grid[1] * grid[2]
    first = tensors[names[0]].shape
    width = first[1] if len(first) == 2 and first[1] > 0 else "inner_dim"  # posemb: checked against the model later
    # latent: any [1, F, C, H, W] (the model's padded latent shape, checked against the run by check_compatible)
    latent = (1, *first[1:]) if len(first) == 5 and min(first) > 0 else (1, "F", "C", "H", "W")
    want, layout = {
        Mode.ROPE: ((2, 2, n, head_dim), "[2 (q, k), 2 (cos, sin), tokens, head_dim]"),
        Mode.POSEMB: ((n, width), "[tokens, inner_dim]"),
        Mode.LATENT: (latent, "[1, F, C, H, W] latents"),
    }[mode]
    for name in names:
        info = tensors[name]
        if info.dtype not in _TABLE_DTYPES:
            raise DiTFlowError(f"{path} holds {name} as {info.dtype}; tables are float32 ({_REMAKE}).")
        if info.shape != want:
            raise DiTFlowError(
                f"{path} holds {name} of shape {list(info.shape)}, but mode {mode.value} on latent grid "
                f"{'×'.join(map(str, grid))} (= {n} tokens) needs {list(want)} {layout}; {_REMAKE}."
            )
    return names


def load_embeds(path: str | os.PathLike) -> PositionEmbeds:
    """Reads a file written by :func:`save_embeds` (safetensors only, never pickle), checking it before any tensor.

    The header alone is checked first (cheaply, before any model is loaded): the format tag and version, every
    metadata field's size (at most :data:`MAX_TEXT_CHARS`), the mode and family, a latent grid of positive
    integers within :data:`MAX_GRID`, ``num_inference_steps`` in 1..:data:`MAX_STEPS`, one guided timestep (0..999,
    decreasing) per table, each table's name, float dtype and shape for the mode and grid, the seed (a
    non-negative integer, if present) and the reference options (known fields of their types, if present).

    Raises:
        DiTFlowError: missing file, not a safetensors file (or a damaged one), not a DiTFlow embeddings file, a
            newer format, or any check above, in one sentence naming the file and the bad value.
    """
    from safetensors import SafetensorError, safe_open

    from .tensorfile import read_header

    path = Path(path)
    if not path.is_file():
        raise DiTFlowError(f"embeddings file {path} does not exist; give the .safetensors written by a transfer run.")
    header = read_header(path, advice="give a DiTFlow embeddings file", max_header_bytes=MAX_HEADER_BYTES)
    meta = header.metadata
    _check_metadata(path, meta)
    if meta["mode"] not in [m.value for m in _MODES]:
        raise DiTFlowError(f"{path} has mode {meta['mode'][:80]!r}; embeddings files hold mode rope, posemb or latent.")
    mode = Mode(meta["mode"])
    if meta["model_family"] not in VARIANT_KEYS:
        raise DiTFlowError(f"{path} has model family {meta['model_family'][:80]!r}, not one of "
                           f"{', '.join(VARIANT_KEYS)}; {_REMAKE}.")
    grid = _ints(meta["latent_grid"], "latent_grid", path, count=3)
    if not all(1 <= g <= hi for g, hi in zip(grid, MAX_GRID)):
        raise DiTFlowError(
            f"{path} has latent grid {list(grid)}; each of F×h×w must be a positive integer up to "
            f"{'×'.join(map(str, MAX_GRID))}; {_REMAKE}."
        )
    head_dim = _int(meta["head_dim"], "head_dim", path, 4096)
    steps = _int(meta["num_inference_steps"], "num_inference_steps", path, MAX_STEPS)
    timesteps = _ints(meta["guided_timesteps"], "guided_timesteps", path)
    names = _check_tables(path, header.tensors, mode, grid, head_dim, steps)
    if len(timesteps) != len(names):
        raise DiTFlowError(
            f"{path} has {len(names)} tables but {len(timesteps)} guided timesteps; each guided step needs one; "
            f"{_REMAKE}."
        )
    if not all(0 <= t < MAX_STEPS for t in timesteps) or any(a <= b for a, b in zip(timesteps, timesteps[1:])):
        raise DiTFlowError(
            f"{path} has guided timesteps {list(timesteps)[:8]}, not decreasing values in 0..{MAX_STEPS - 1}; "
            f"{_REMAKE}."
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            tables = [f.get_tensor(k).float() for k in names]
    except (SafetensorError, OSError, ValueError) as e:
        raise DiTFlowError(f"{path} is not a readable safetensors file ({e}); give a DiTFlow embeddings file.") from None
    return PositionEmbeds(
        mode=mode, variant=meta["model_family"], grid=grid, head_dim=head_dim, num_inference_steps=steps,
        timesteps=timesteps, tables=tables, prompt=meta.get("prompt", ""), reference=meta.get("reference", ""),
        seed=_seed(path, meta), reference_options=_reference_options(path, meta),
    )
