# SPDX-License-Identifier: Apache-2.0
"""Tiny random Flow Poke Transformers, made in the released checkpoint's layout and converted like the real one.

:func:`reference_layout` lists the tensors (names and shapes) of the authors' ``FlowPokeTransformer.state_dict()``
for a config: github.com/CompVis/flow-poke-transformer at commit 104f9c3, ``flow_poke/model.py`` and
``flow_poke/dinov2.py``. :func:`random_reference_state_dict` fills it from a seed, and :func:`build_tiny_fpt`
converts that (``ditflow.fpt.checkpoint.convert_state_dict``) into a safetensors file that loads through
``load_fpt`` exactly as converted real weights do. The parity test builds the same seeded state dict for the
authors' model (see ``tests/test_fpt_parity.py``), so this module may only depend on torch and the config.

Sizes of :data:`TINY` (fast tests): width 32, 2 blocks of 2 heads × 16, DINOv2 32 wide with 1 layer, 2 heads and
4 registers, 14-px patches; images resized to 56 px → 4×4 feature cells. ≈ 0.15 M parameters.
"""

from __future__ import annotations

import math
import os
import re

import torch
from torch import Tensor

from ..fpt.config import EncoderConfig, FPTConfig

TINY = FPTConfig(width=32, depth=2, head_dim=16, input_mlp_depth=1, output_mlp_depth=1,
                 encoder=EncoderConfig(hidden_size=32, layers=1, heads=2, image_size=56))


def reference_layout(config: FPTConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the authors' state dict for ``config`` (their module names)."""
    w, enc, d = config.width, config.encoder, config.encoder.hidden_size
    ff = config.ff_expand * w
    shapes: dict[str, tuple[int, ...]] = {
        "cond_emb.weight": (2, w), "input_mlp.query_token": (1, 1, 2 * w), "input_mlp.coeffs": (1, 1, 1, w // 2),
        "input_mlp.mlp.0.weight": (w, 2 * w + d), "transformer.pos_emb.freqs": (2, config.heads, config.head_dim // 4),
        "out_mlp.0.weight": (w,),
    }
    for i in range(1, config.input_mlp_depth + 1):
        shapes |= {f"input_mlp.mlp.{i}.0.weight": (w,), f"input_mlp.mlp.{i}.1.weight": (w, w),
                   f"input_mlp.mlp.{i}.3.weight": (w, w)}
    for i in range(config.depth):
        p = f"transformer.layers.{i}."
        shapes |= {p + f"{n}_norm.linear.weight": (w, w) for n in ("self", "cross", "ffn")}
        shapes |= {p + "self_qkv.weight": (3 * w, w), p + "self_out.weight": (w, w), p + "cross_q.weight": (w, w),
                   p + "cross_kv.weight": (2 * w, d), p + "cross_out.weight": (w, w), p + "ffn_up.weight": (2 * ff, w),
                   p + "ffn_down.weight": (w, ff), p + "self_scale": (config.heads,), p + "cross_scale": (config.heads,)}
    for j in range(config.output_mlp_depth):
        shapes |= {f"out_mlp.{2 * j + 1}.weight": (w, w), f"out_mlp.{2 * j + 1}.bias": (w,)}
    last = 2 * config.output_mlp_depth + 1
    shapes |= {f"out_mlp.{last}.weight": (6 * config.components, w), f"out_mlp.{last}.bias": (6 * config.components,)}
    m = "image_embedder.model."
    shapes |= {m + "cls_token": (1, 1, d), m + "pos_embed": (1, 1 + enc.position_grid**2, d),
               m + "register_tokens": (1, enc.registers, d), m + "mask_token": (1, d),
               m + "patch_embed.proj.weight": (d, 3, enc.patch_size, enc.patch_size), m + "patch_embed.proj.bias": (d,),
               m + "norm.weight": (d,), m + "norm.bias": (d,)}
    for i in range(enc.layers):
        b = f"{m}blocks.{i}."
        shapes |= {b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "attn.qkv.weight": (3 * d, d),
                   b + "attn.qkv.bias": (3 * d,), b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                   b + "ls1.gamma": (d,), b + "norm2.weight": (d,), b + "norm2.bias": (d,),
                   b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc1.bias": (4 * d,), b + "mlp.fc2.weight": (d, 4 * d),
                   b + "mlp.fc2.bias": (d,), b + "ls2.gamma": (d,)}
    return shapes


def _is_gain(name: str) -> bool:
    """Norm weights and layer scales: multiplicative, drawn around 1."""
    return bool(re.fullmatch(r".*(norm[12]\.weight|model\.norm\.weight|gamma)|out_mlp\.0\.weight"
                             r"|input_mlp\.mlp\.[1-9]\d*\.0\.weight", name))


def random_reference_state_dict(config: FPTConfig, seed: int) -> dict[str, Tensor]:
    """Seeded fp32 tensors for :func:`reference_layout`, drawn in sorted-name order from one CPU generator.

    Each tensor is ``randn`` times a scale that keeps activations of order 1: ``1/√fan_in`` for matrices, 0.1 for
    biases, ``1 + 0.1·randn`` for norm weights and layer scales, ``10 + 2·randn`` for the attention scales,
    ``|randn|·10`` for the RoPE and Fourier frequencies (drawn, not computed, so that loading them is tested) and
    ``0.5·randn`` for tokens, position and camera embeddings.
    """
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in sorted(reference_layout(config).items()):
        x = torch.randn(shape, generator=generator)
        if name.endswith(("freqs", "coeffs")):
            x = x.abs() * 10
        elif name.endswith("_scale"):
            x = 10 + 2 * x
        elif _is_gain(name):
            x = 1 + 0.1 * x
        elif name.endswith("bias"):
            x = 0.1 * x
        elif name.endswith(("token", "tokens", "pos_embed", "cond_emb.weight")):
            x = 0.5 * x
        else:
            x = x / math.sqrt(math.prod(shape[1:]))
        out[name] = x
    return out


def build_tiny_fpt(path: str | os.PathLike, config: FPTConfig = TINY, seed: int = 0) -> str:
    """Writes a random FPT of ``config`` as a converted safetensors file at ``path``; returns the path."""
    from ..fpt.checkpoint import convert_state_dict, save_fpt

    save_fpt(convert_state_dict(random_reference_state_dict(config, seed), config), config, path,
             source=f"ditflow.testing.tiny_fpt seed {seed}")
    return str(path)


__all__ = ["TINY", "build_tiny_fpt", "random_reference_state_dict", "reference_layout"]
