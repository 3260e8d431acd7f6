# SPDX-License-Identifier: Apache-2.0
"""CogVideoX's positions, owned explicitly so they can be optimised (DiTFlow-ρ_t, §4.3).

- RoPE (5b, 5b-I2V, 1.5, 1.5-I2V): (cos, sin) tables on the video Q/K of every block, built for a run's own token
  grid as diffusers' pipelines build them (``_prepare_rotary_positional_embeddings``): CogVideoX 1.0 spreads the grid
  over the config's sample grid ("linspace" with a resize-crop region), 1.5 takes the first rows/columns of a fixed
  grid ("slice", bounded by the sample grid: 150×150 patches on the real models) with one temporal position per
  token frame. Never from the config's sample size alone (method.md §7).
- Sin-cos (2b): a 3D table added once to the video tokens inside ``CogVideoXPatchEmbed`` (diffusers ≥ 0.32).
  :func:`owned_sincos` switches that addition off and adds a table we own instead, exactly once; the authors'
  script adds it a second time on current diffusers. Tested against the stock model.
- Learned (5b-I2V): a trained table for the 60×90 latent grid only, added by the stock patch embedding; we leave
  it there (it is why 5b-I2V runs at 480×720 only). diffusers replaces it by a freshly computed sin-cos table when
  the frame count differs from the config's ``sample_frames`` (49): that is the stock behaviour and stays ours.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor


def _config(transformer_or_config) -> dict:
    config = getattr(transformer_or_config, "config", transformer_or_config)
    return config if isinstance(config, dict) else dict(config)


def rope_max_grid(transformer_or_config) -> tuple[int, int] | None:
    """Largest patch grid (h, w) of CogVideoX 1.5's "slice" RoPE (the sample grid in patches); ``None`` on 1.0,
    whose "linspace" RoPE stretches to any grid."""
    c = _config(transformer_or_config)
    if c.get("patch_size_t") is None:
        return None
    return c["sample_height"] // c["patch_size"], c["sample_width"] // c["patch_size"]


def rope_tables(transformer_or_config, grid: tuple[int, int, int], device=None) -> tuple[Tensor, Tensor]:
    """RoPE (cos, sin) for the video tokens of a token ``grid = (F, h, w)``, each ``[n, head_dim]`` fp32.

    The computation of diffusers' ``CogVideoXPipeline._prepare_rotary_positional_embeddings`` (the I2V pipeline's
    is the same): ``F`` is the number of token frames, i.e. latent frames ÷ ``patch_size_t`` on 1.5.

    Args:
        transformer_or_config: the transformer or its config (``patch_size``, ``patch_size_t``, ``sample_height``,
            ``sample_width``, ``attention_head_dim``).
    """
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    c = _config(transformer_or_config)
    frames, h, w = grid
    base_h, base_w = c["sample_height"] // c["patch_size"], c["sample_width"] // c["patch_size"]
    if c.get("patch_size_t") is None:  # CogVideoX 1.0
        crops = get_resize_crop_region_for_grid((h, w), base_w, base_h)
        return get_3d_rotary_pos_embed(embed_dim=c["attention_head_dim"], crops_coords=crops, grid_size=(h, w),
                                       temporal_size=frames, device=device)
    return get_3d_rotary_pos_embed(embed_dim=c["attention_head_dim"], crops_coords=None, grid_size=(h, w),
                                   temporal_size=frames, grid_type="slice", max_size=(base_h, base_w), device=device)


def sincos_table(transformer, grid: tuple[int, int, int]) -> Tensor:
    """The stock additive 3D sin-cos table for the video tokens of ``grid = (F, h, w)``: ``[n, inner_dim]``, fp32.

    Built by diffusers' own ``CogVideoXPatchEmbed._get_positional_embeddings`` for the run's grid (the table the
    stock model recomputes whenever the size differs from the config's sample size; method.md §7).
    """
    pe = transformer.patch_embed
    frames, h, w = grid
    pixel_frames = (frames - 1) * pe.temporal_compression_ratio + 1
    table = pe._get_positional_embeddings(h * pe.patch_size, w * pe.patch_size, pixel_frames)
    return table[0, pe.max_text_seq_length :].float()


@contextlib.contextmanager
def owned_sincos(transformer, table: Callable[[tuple[int, int, int]], Tensor]) -> Iterator[None]:
    """Within the ``with``, the patch embedding adds ``table(grid)`` (``[n, inner_dim]``) to the video tokens, once.

    ``table`` is called on every forward with the pass's token grid, so a trainable tensor swapped in between passes
    takes effect. The stock addition is switched off and restored in ``finally``. A no-op on models without the
    sin-cos table (RoPE models add none; 5b-I2V's learned table stays stock).
    """
    pe = transformer.patch_embed
    if not pe.use_positional_embeddings:
        yield
        return

    def grid_of(latents: Tensor) -> tuple[int, int, int]:
        return latents.shape[1], latents.shape[3] // pe.patch_size, latents.shape[4] // pe.patch_size

    def add_table(_module, inputs, embeds: Tensor) -> Tensor:
        pos = table(grid_of(inputs[1])).to(embeds.dtype)
        n = pos.shape[0]
        return torch.cat([embeds[:, : embeds.shape[1] - n], embeds[:, -n:] + pos], dim=1)

    pe.use_positional_embeddings = False
    handle = pe.register_forward_hook(add_table)
    try:
        yield
    finally:
        handle.remove()
        pe.use_positional_embeddings = True
