# SPDX-License-Identifier: Apache-2.0
"""CogVideoX's text encoder from one safetensors file, as ComfyUI keeps T5-XXL in ``models/text_encoders``.

CogVideoX-2b and -5b encode prompts with the encoder of T5-v1.1-XXL (google/t5-v1_1-xxl; 24 blocks, d_model 4096,
64 heads, gated-GELU feed-forward). Core ComfyUI and kijai's CogVideoXWrapper take it from a single file such as
``t5xxl_fp16.safetensors``, ``t5xxl_fp8_e4m3fn.safetensors`` or ``t5xxl_fp8_e4m3fn_scaled.safetensors``, whose keys
are those of transformers' ``T5EncoderModel`` (``shared.weight``, ``encoder.block.{i}.layer.{0,1}…``,
``encoder.final_layer_norm.weight``), possibly under a prefix, and whose linear weights may be float8. A *scaled*
fp8 file adds a ``scaled_fp8`` marker and a float32 ``<layer>.scale_weight`` per linear layer: the stored weight
times that scale is the real one (ComfyUI's ``scaled_fp8_ops``, ``comfy/ops.py``).

:func:`load_t5_file` builds the ``T5EncoderModel`` on the meta device from the shapes in the file, converts each
tensor to the requested dtype (fp8 → that dtype, times its scale) and assigns it, one tensor at a time: peak memory
is the model in the target dtype. Safetensors only.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .errors import DiTFlowError

_LAST_NORM = "encoder.final_layer_norm.weight"
_FP8 = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name))
#: T5 v1.1's relative-attention distance; not stored in the weights (transformers' default, and google's config).
RELATIVE_ATTENTION_MAX_DISTANCE = 128


def _prefix(keys: list[str], path: Path) -> str:
    ends = [k for k in keys if k.endswith(_LAST_NORM)]
    if len(ends) != 1:
        raise DiTFlowError(
            f"{path.name} is not a single T5 text encoder (found {len(ends)} '{_LAST_NORM}' keys); pick a T5-XXL file "
            "such as t5xxl_fp16.safetensors."
        )
    return ends[0][: -len(_LAST_NORM)]


def t5_config(shapes: dict[str, tuple[int, ...]], path: Path):
    """``transformers.T5Config`` of the encoder whose un-prefixed tensor shapes are ``shapes``.

    Raises:
        DiTFlowError: a T5 v1.0 file (ungated ``wi``: not what CogVideoX was trained with) or missing tensors.
    """
    from transformers import T5Config

    if "encoder.block.0.layer.1.DenseReluDense.wi.weight" in shapes:
        raise DiTFlowError(
            f"{path.name} is a T5 v1.0 encoder (ungated feed-forward); CogVideoX needs T5-v1.1-XXL, e.g. "
            "t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors."
        )
    needed = ("shared.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
              "encoder.block.0.layer.0.SelfAttention.q.weight", "encoder.block.0.layer.1.DenseReluDense.wi_0.weight")
    missing = [k for k in needed if k not in shapes]
    if missing:
        raise DiTFlowError(f"{path.name} lacks the T5 tensors {', '.join(missing)}; it is not a T5-XXL text encoder.")
    vocab, d_model = shapes["shared.weight"]
    buckets, heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.block\.(\d+)\.", k))}
    return T5Config(
        vocab_size=vocab, d_model=d_model, num_heads=heads, num_layers=max(blocks) + 1,
        d_kv=shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0] // heads,
        d_ff=shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0],
        relative_attention_num_buckets=buckets, relative_attention_max_distance=RELATIVE_ATTENTION_MAX_DISTANCE,
        feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, tie_word_embeddings=False,
        is_encoder_decoder=False, use_cache=False, dropout_rate=0.0,
    )


def load_t5_file(path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16):
    """A ``transformers.T5EncoderModel`` (eval mode, on the CPU, in ``dtype``) from a single-file T5 encoder.

    Args:
        path: ``.safetensors`` file in ComfyUI's layout (see the module docstring): fp32/fp16/bf16, fp8, or
            scaled fp8.
        dtype: the model's dtype. Under fp16 the feed-forward output layers (``wo``) stay fp32, as transformers
            keeps them (``T5EncoderModel._keep_in_fp32_modules``): T5 v1.1 overflows fp16 there.
    Raises:
        DiTFlowError: a missing or non-safetensors file, or one that is not a T5 v1.1 encoder (one sentence).
    """
    from safetensors import SafetensorError, safe_open
    from transformers import T5EncoderModel

    path = Path(path).expanduser()
    if not path.is_file():
        raise DiTFlowError(f"text encoder file {path} does not exist; put a T5-XXL .safetensors file there.")
    if path.suffix != ".safetensors":
        raise DiTFlowError(f"{path.name} is not a .safetensors file; only safetensors are loaded, never pickles.")
    try:
        with torch.inference_mode(False), safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            prefix = _prefix(keys, path)
            own = {k[len(prefix):]: k for k in keys if k.startswith(prefix)}
            shapes = {k: tuple(f.get_slice(full).get_shape()) for k, full in own.items()}
            config = t5_config(shapes, path)
            with torch.device("meta"):
                model = T5EncoderModel(config)
            keep_fp32 = tuple(T5EncoderModel._keep_in_fp32_modules or ()) if dtype == torch.float16 else ()
            state = {}
            for name in model.state_dict():
                if name == "encoder.embed_tokens.weight":  # tied to shared.weight in transformers' T5
                    state[name] = state["shared.weight"]
                    continue
                if name not in own:
                    raise DiTFlowError(f"{path.name} lacks the T5 tensor {name}; it is not a complete T5 encoder.")
                tensor = f.get_tensor(own[name])
                if tensor.dtype in _FP8:
                    scale = own.get(name.removesuffix(".weight") + ".scale_weight")
                    tensor = tensor.float() * (f.get_tensor(scale).float() if scale else 1.0)
                target = torch.float32 if any(f".{m}." in f".{name}" for m in keep_fp32) else dtype
                state[name] = tensor.to(target)
            model.load_state_dict(state, strict=True, assign=True)
    except SafetensorError as exc:
        raise DiTFlowError(f"cannot read {path.name} as safetensors ({exc}); re-download the file.") from None
    return model.eval().requires_grad_(False)


__all__ = ["RELATIVE_ATTENTION_MAX_DISTANCE", "load_t5_file", "t5_config"]
