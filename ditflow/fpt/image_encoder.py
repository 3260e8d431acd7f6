# SPDX-License-Identifier: Apache-2.0
"""FPT's image encoder: DINOv2 with registers (Oquab et al. 2024; Darcet et al. 2024) from ``transformers``.

The authors build DINOv2-B/14-reg with their own copy of the network and fetch its initial weights with
``torch.hub.load`` inside the constructor. Here the network is ``transformers``' ``Dinov2WithRegistersModel``, built
from a config (nothing is downloaded) and filled from the FPT checkpoint, which holds the fine-tuned encoder.
timm's ``vit_base_patch14_reg4_dinov2`` is the same network, but timm imports torchvision, which a CPU-only torch
from a wheel other than torchvision's own cannot always import; transformers is already a dependency.

Weights use transformers' checkpoint names, as in the hub's ``facebook/dinov2-with-registers-base``
(``embeddings.cls_token``, ``encoder.layer.N.attention.attention.query.weight``, …). ``from_pretrained`` maps them
onto whatever module names the installed transformers version has (5.x renamed the attention projections).

Images: ``[b, 3, S, S]`` in [-1, 1], square. They are resized to ``EncoderConfig.image_size`` (bilinear,
antialiased), mapped to ImageNet statistics and encoded; the patch tokens after the class and register tokens are
the features, ``[b, hidden, g, g]`` with ``g = image_size / patch_size`` (32 for the released model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..errors import DiTFlowError
from .config import EncoderConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def dinov2_config(cfg: EncoderConfig):
    from transformers import Dinov2WithRegistersConfig

    return Dinov2WithRegistersConfig(
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, mlp_ratio=4,
        num_register_tokens=cfg.registers, patch_size=cfg.patch_size, image_size=cfg.position_grid * cfg.patch_size,
        layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu", use_swiglu_ffn=False,
    )


def build_dinov2(cfg: EncoderConfig, state_dict: dict[str, Tensor] | None = None) -> nn.Module:
    """A ``Dinov2WithRegistersModel`` of size ``cfg``: random, or holding ``state_dict`` (checkpoint names).

    Raises:
        DiTFlowError: ``state_dict`` misses tensors or has extra or mis-shaped ones (the message names a few).
    """
    from transformers import Dinov2WithRegistersModel
    from transformers.utils import logging as hf_logging

    config = dinov2_config(cfg)
    if state_dict is None:
        return Dinov2WithRegistersModel(config)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Loading weights" bar counts tensors already in memory
    try:
        model, info = Dinov2WithRegistersModel.from_pretrained(
            None, config=config, state_dict=state_dict, output_loading_info=True
        )
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        details = "; ".join(f"{k.replace('_', ' ')}: {', '.join(map(str, list(v)[:3]))}" for k, v in bad.items())
        raise DiTFlowError(f"the checkpoint's DINOv2 weights do not fit a {cfg.layers}-layer, {cfg.hidden_size}-wide "
                           f"encoder ({details}).")
    return model


def encode_image(dinov2: nn.Module, image: Tensor, cfg: EncoderConfig) -> Tensor:
    """Features ``[b, hidden, g, g]`` of square images ``[b, 3, S, S]`` in [-1, 1] (in the encoder's dtype).

    Raises:
        DiTFlowError: the images are not square RGB.
    """
    if image.ndim != 4 or image.shape[1] != 3 or image.shape[2] != image.shape[3]:
        raise DiTFlowError(f"the FPT encodes square RGB images [b, 3, S, S]; got shape {list(image.shape)} "
                           "(fit the image to a square first: ditflow.fpt.view.SquareView).")
    size, g = cfg.image_size, cfg.feature_grid
    x = F.interpolate(image.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=x.device)[:, None, None]
    x = ((x + 1) / 2 - mean) / std
    dtype = next(dinov2.parameters()).dtype
    tokens = dinov2(pixel_values=x.to(dtype)).last_hidden_state  # [b, 1 + registers + g², hidden]
    return rearrange(tokens[:, 1 + cfg.registers :], "b (h w) d -> b d h w", h=g, w=g)


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "build_dinov2", "dinov2_config", "encode_image"]
