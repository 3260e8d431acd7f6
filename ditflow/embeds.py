# SPDX-License-Identifier: Apache-2.0
"""Optimised positional embeddings (DiTFlow-ρ_t, §4.3) and their file format: safetensors with metadata.

A run that optimises RoPE (5B) or the sin-cos table (2B) saves one table per guided timestep; a later run with a
new prompt and no reference injects them zero-shot at the same steps (paper Fig. 7). Differs from the authors'
script (method.md §6): no pickle (``torch.save`` of a dict keyed by tensor reprs); the metadata names the model
family and grid so a mismatch is refused with both values instead of producing noise.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from .config import Mode
from .errors import DiTFlowError
from .files import atomic_path

FORMAT = "ditflow-position-embeds"
FORMAT_VERSION = 1


@dataclass
class PositionEmbeds:
    """Positional embeddings per guided step.

    Attributes:
        mode: ``Mode.ROPE`` (tables ``[2 (q, k), 2 (cos, sin), n, head_dim]``) or ``Mode.POSEMB``
            (tables ``[n, inner_dim]``), float32.
        family: model family they were optimised on ("2b" or "5b").
        grid: latent token grid (F, h, w); ``n = F·h·w``.
        head_dim: attention head dimension of that model.
        num_inference_steps: denoising steps of the run; injection needs the same schedule.
        timesteps: the guided timesteps (scheduler values, 0..999), one per table.
        tables: one table per guided step, in step order.
        prompt: the prompt they were optimised with; reference: the reference video's file name.
    """

    mode: Mode
    family: str
    grid: tuple[int, int, int]
    head_dim: int
    num_inference_steps: int
    timesteps: tuple[int, ...]
    tables: list[Tensor]
    prompt: str = ""
    reference: str = ""

    def check_compatible(self, model, grid: tuple[int, int, int], num_inference_steps: int) -> None:
        """Raises :class:`DiTFlowError` naming both values if these embeddings cannot drive ``model`` at ``grid``."""
        checks = (
            ("model family", self.family, model.family),
            ("attention head dim", self.head_dim, model.head_dim),
            ("latent grid F×h×w", "×".join(map(str, self.grid)), "×".join(map(str, grid))),
            ("number of steps", self.num_inference_steps, num_inference_steps),
        )
        for name, saved, wanted in checks:
            if saved != wanted:
                raise DiTFlowError(
                    f"these embeddings were optimised with {name} {saved}, but this run has {wanted}; "
                    f"use embeddings made for the same model, frame count, size and steps."
                )


def save_embeds(path: str | os.PathLike, embeds: PositionEmbeds) -> Path:
    """Writes ``embeds`` to ``path`` (``.safetensors``) atomically: a temp file renamed when complete."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"step_{i:03d}": t.detach().float().cpu().contiguous() for i, t in enumerate(embeds.tables)}
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "mode": embeds.mode.value,
        "model_family": embeds.family,
        "latent_grid": json.dumps(list(embeds.grid)),
        "head_dim": str(embeds.head_dim),
        "num_inference_steps": str(embeds.num_inference_steps),
        "guided_timesteps": json.dumps(list(embeds.timesteps)),
        "prompt": embeds.prompt,
        "reference": embeds.reference,
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load_embeds(path: str | os.PathLike) -> PositionEmbeds:
    """Reads a file written by :func:`save_embeds` (safetensors only, never pickle).

    Raises:
        DiTFlowError: missing file, not a safetensors file, not a DiTFlow embeddings file, or a newer format.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise DiTFlowError(f"embeddings file {path} does not exist; give the .safetensors written by a rope/posemb run.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise DiTFlowError(f"{path} is not a readable safetensors file ({e}); give a DiTFlow embeddings file.") from None
    if meta.get("format") != FORMAT:
        raise DiTFlowError(f"{path} is a safetensors file but not DiTFlow positional embeddings (no '{FORMAT}' tag).")
    if int(meta.get("format_version", "0")) > FORMAT_VERSION:
        raise DiTFlowError(f"{path} has format version {meta['format_version']}; update the DiTFlow node pack to read it.")
    try:
        return PositionEmbeds(
            mode=Mode(meta["mode"]),
            family=meta["model_family"],
            grid=tuple(json.loads(meta["latent_grid"])),
            head_dim=int(meta["head_dim"]),
            num_inference_steps=int(meta["num_inference_steps"]),
            timesteps=tuple(json.loads(meta["guided_timesteps"])),
            tables=[tensors[k] for k in sorted(tensors)],
            prompt=meta.get("prompt", ""),
            reference=meta.get("reference", ""),
        )
    except (KeyError, ValueError) as e:
        raise DiTFlowError(f"{path} has incomplete DiTFlow metadata ({e}); re-save it with this version.") from None
