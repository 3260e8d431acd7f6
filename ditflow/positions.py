# SPDX-License-Identifier: Apache-2.0
"""Positional embeddings of CogVideoX, owned explicitly so they can be optimised (DiTFlow-ρ_t, §4.3).

- 5B: 3D RoPE on video Q/K. :func:`rope_tables` builds the (cos, sin) tables for a run's own grid, as diffusers'
  pipeline does (never from the config's sample size: method.md §7). Trainable copies are separate for Q and K,
  shared by all blocks and heads: ``[2 (q, k), 2 (cos, sin), n_video, head_dim]``.
- 2B: 3D sin-cos table added once inside ``CogVideoXPatchEmbed`` (diffusers ≥ 0.32). :func:`owned_sincos`
  switches that addition off and adds our table instead, exactly once. The authors' script adds it a second time
  on current diffusers; the test suite checks ours against the stock model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from .layout import PATCH_SIZE

# ---------------------------------------------------------------------------------------------------------------------
# 5B: RoPE tables
# ---------------------------------------------------------------------------------------------------------------------


def rope_tables(transformer, grid: tuple[int, int, int], device=None) -> tuple[Tensor, Tensor]:
    """RoPE (cos, sin) for video tokens of a ``grid = (F, h, w)`` run, each ``Float[Tensor, "n head_dim"]``, fp32.

    Same computation as diffusers' ``CogVideoXPipeline._prepare_rotary_positional_embeddings`` for CogVideoX 1.0.
    """
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    frames, h, w = grid
    cfg = transformer.config
    base_w, base_h = cfg.sample_width // cfg.patch_size, cfg.sample_height // cfg.patch_size
    crops = get_resize_crop_region_for_grid((h, w), base_w, base_h)
    cos, sin = get_3d_rotary_pos_embed(
        embed_dim=cfg.attention_head_dim, crops_coords=crops, grid_size=(h, w), temporal_size=frames, device=device
    )
    return cos, sin


def stack_rope(cos: Tensor, sin: Tensor) -> Tensor:
    """Trainable layout ``[2 (q, k), 2 (cos, sin), n, head_dim]`` from one shared (cos, sin) pair, fp32."""
    pair = torch.stack([cos, sin]).float()
    return torch.stack([pair, pair.clone()])


def unstack_rope(tables: Tensor) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``[2, 2, n, d]`` → ((cos_q, sin_q), (cos_k, sin_k)), the controller's ``rope`` field."""
    return (tables[0, 0], tables[0, 1]), (tables[1, 0], tables[1, 1])


# ---------------------------------------------------------------------------------------------------------------------
# 2B: additive sin-cos table
# ---------------------------------------------------------------------------------------------------------------------


def sincos_table(transformer, grid: tuple[int, int, int]) -> Tensor:
    """The stock additive 3D sin-cos table for the video tokens of ``grid = (F, h, w)``: ``[n, inner_dim]``, fp32.

    Built by diffusers' own ``CogVideoXPatchEmbed._get_positional_embeddings`` for the run's grid (the table the
    stock model recomputes whenever the size differs from the config's sample size; method.md §7).
    """
    pe = transformer.patch_embed
    frames, h, w = grid
    pixel_frames = (frames - 1) * pe.temporal_compression_ratio + 1
    table = pe._get_positional_embeddings(h * PATCH_SIZE, w * PATCH_SIZE, pixel_frames)
    return table[0, pe.max_text_seq_length :].float()


@contextlib.contextmanager
def owned_sincos(transformer, table: Callable[[], Tensor]) -> Iterator[None]:
    """Within the ``with``, the patch embedding adds ``table()`` (``[n, inner_dim]``) to the video tokens, once.

    ``table`` is called on every forward, so a trainable tensor swapped in between passes takes effect. The stock
    addition is switched off and restored in ``finally``. No-op on RoPE models (they add no table).
    """
    pe = transformer.patch_embed
    if not pe.use_positional_embeddings:
        yield
        return

    def add_table(_module, _inputs, embeds: Tensor) -> Tensor:
        pos = table().to(embeds.dtype)
        n = pos.shape[0]
        return torch.cat([embeds[:, : embeds.shape[1] - n], embeds[:, -n:] + pos], dim=1)

    pe.use_positional_embeddings = False
    handle = pe.register_forward_hook(add_table)
    try:
        yield
    finally:
        handle.remove()
        pe.use_positional_embeddings = True
