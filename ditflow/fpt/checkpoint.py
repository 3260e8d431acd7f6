# SPDX-License-Identifier: Apache-2.0
"""FPT weights: a one-time conversion of the authors' ``.pt`` into safetensors, and loading that file.

The released checkpoint (huggingface.co/CompVis/flow-poke-transformer, ``flow_poke_open_set_base.pt``, CC BY-NC 4.0)
is a pickle whose key ``"model"`` holds the state dict. :func:`convert_checkpoint` reads it once with
``torch.load(weights_only=True)`` (PyTorch's restricted unpickler, which builds tensors and plain containers and
refuses any other object), refuses a state dict with anything but tensors in it, renames the tensors to this
package's modules and writes one safetensors file with the model's sizes in its metadata. Everything afterwards,
ComfyUI included, reads only that file (:func:`load_fpt`).

Names: the encoder's tensors are stored under ``image_encoder.`` with transformers' checkpoint names for DINOv2
(see ``ditflow.fpt.image_encoder``); the rest under this package's module names. The authors' fused DINOv2
``attn.qkv`` is split into query, key and value, and the Fourier frequencies lose their singleton axes. The
authors' cross-attention output projection (``transformer.layers.N.cross_out``) is dropped: their forward never
applies it (see ``ditflow.fpt.layers``).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch
from torch import Tensor

from ..errors import DiTFlowError
from ..files import atomic_path
from ..pickles import require_safe_torch
from .config import EncoderConfig, FPTConfig

FORMAT = "ditflow-fpt"
FORMAT_VERSION = "1"
ENCODER_PREFIX = "image_encoder."
WEIGHTS_LICENSE = "CC BY-NC 4.0 (CompVis/flow-poke-transformer weights)"

_DINO = "image_embedder.model."
#: tensors of the authors' model that their forward never uses
_UNUSED = r"transformer\.layers\.\d+\.cross_out\.weight"
#: authors' DINOv2 block tensor → transformers' checkpoint name (per layer; ``attn.qkv`` is split separately)
_DINO_BLOCK = {
    "norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.output.dense", "ls1.gamma": "layer_scale1.lambda1",
    "ls2.gamma": "layer_scale2.lambda1", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}
_DINO_TOP = {
    "cls_token": "embeddings.cls_token", "mask_token": "embeddings.mask_token",
    "register_tokens": "embeddings.register_tokens", "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj": "embeddings.patch_embeddings.projection", "norm": "layernorm",
}


def _rename(key: str, output_mlp_depth: int) -> str | None:
    """This package's name for one of the authors' FPT tensors (DINOv2 handled apart); None if unknown."""
    rules = [
        (r"cond_emb\.weight", "camera_embedding.weight"),
        (r"input_mlp\.query_token", "token_embedding.query_token"),
        (r"input_mlp\.coeffs", "token_embedding.frequencies"),
        (r"input_mlp\.mlp\.0\.weight", "token_embedding.proj.weight"),
        (r"transformer\.pos_emb\.freqs", "rope.freqs"),
        (r"transformer\.layers\.(\d+)\.(self|cross|ffn)_norm\.linear\.weight", r"blocks.\1.\2_norm.cond.weight"),
        (r"transformer\.layers\.(\d+)\.((?:self_qkv|self_out|cross_q|cross_kv|ffn_up|ffn_down)\.weight"
         r"|self_scale|cross_scale)", r"blocks.\1.\2"),
        (r"out_mlp\.0\.weight", "head.norm.weight"),
    ]
    for pattern, target in rules:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, target, key)
    if m := re.fullmatch(r"input_mlp\.mlp\.(\d+)\.([013])\.weight", key):
        part = {"0": "norm", "1": "fc1", "3": "fc2"}[m[2]]
        return f"token_embedding.blocks.{int(m[1]) - 1}.{part}.weight"
    if m := re.fullmatch(r"out_mlp\.(\d+)\.(weight|bias)", key):
        index = (int(m[1]) - 1) // 2  # Linear, SiLU, Linear, SiLU, …, Linear
        return f"head.out.{m[2]}" if index == output_mlp_depth else f"head.hidden.{index}.{m[2]}"
    return None


def _rename_dinov2(key: str, value: Tensor) -> dict[str, Tensor] | None:
    name = key[len(_DINO):]
    if m := re.fullmatch(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", name):
        q, k, v = value.chunk(3, dim=0)
        base = f"{ENCODER_PREFIX}encoder.layer.{m[1]}.attention.attention"
        return {f"{base}.query.{m[2]}": q, f"{base}.key.{m[2]}": k, f"{base}.value.{m[2]}": v}
    if m := re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias|gamma)", name):
        part = f"{m[2]}.{m[3]}" if m[3] == "gamma" else m[2]
        if part in _DINO_BLOCK:
            suffix = "" if m[3] == "gamma" else f".{m[3]}"
            return {f"{ENCODER_PREFIX}encoder.layer.{m[1]}.{_DINO_BLOCK[part]}{suffix}": value}
    stem, _, leaf = name.rpartition(".")
    if name in _DINO_TOP:
        return {ENCODER_PREFIX + _DINO_TOP[name]: value}
    if stem in _DINO_TOP and leaf in ("weight", "bias"):
        return {f"{ENCODER_PREFIX}{_DINO_TOP[stem]}.{leaf}": value}
    return None


def infer_config(state_dict: dict[str, Tensor], encoder_heads: int | None = None, image_size: int = 448) -> FPTConfig:
    """Sizes of an FPT from the authors' state dict (their tensor names).

    Two sizes are not in the shapes: the encoder's head count (default: DINOv2's 64-wide heads) and the size images
    are resized to before encoding (``image_size``, 448 for the released model).
    """
    def count(pattern: str) -> int:
        return len({m[1] for k in state_dict if (m := re.fullmatch(pattern, k))})

    try:
        output_depth = count(r"out_mlp\.(\d+)\.weight") - 2  # RMSNorm, then (Linear, SiLU) × depth, Linear
        width = state_dict["cond_emb.weight"].shape[1]
        heads = state_dict["transformer.layers.0.self_scale"].numel()
        hidden = state_dict[_DINO + "cls_token"].shape[-1]
        patch = state_dict[_DINO + "patch_embed.proj.weight"].shape[-1]
        positions = state_dict[_DINO + "pos_embed"].shape[1] - 1
        return FPTConfig(
            width=width, depth=count(r"transformer\.layers\.(\d+)\..*"), head_dim=width // heads,
            ff_expand=state_dict["transformer.layers.0.ffn_down.weight"].shape[1] // width,
            input_mlp_depth=count(r"input_mlp\.mlp\.(\d+)\.0\.weight"),  # residual blocks' norms
            output_mlp_depth=output_depth,
            components=state_dict[f"out_mlp.{2 * output_depth + 1}.weight"].shape[0] // 6,
            encoder=EncoderConfig(
                hidden_size=hidden, layers=count(re.escape(_DINO) + r"blocks\.(\d+)\..*"),
                heads=encoder_heads or max(1, hidden // 64), registers=state_dict[_DINO + "register_tokens"].shape[1],
                patch_size=patch, position_grid=math.isqrt(positions), image_size=image_size,
            ),
        )
    except KeyError as e:
        raise DiTFlowError(f"this is not a Flow Poke Transformer state dict: it has no tensor {e.args[0]!r}.") from None


def convert_state_dict(state_dict: dict[str, Tensor], config: FPTConfig) -> dict[str, Tensor]:
    """The authors' state dict → this package's names (encoder under ``image_encoder.``), contiguous tensors.

    Raises:
        DiTFlowError: a tensor with a name this conversion does not know (another model or version).
    """
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if re.fullmatch(_UNUSED, key):
            continue
        if key.startswith(_DINO):
            renamed = _rename_dinov2(key, value)
        else:
            name = _rename(key, config.output_mlp_depth)
            renamed = None if name is None else {name: value.reshape(-1) if key == "input_mlp.coeffs" else value}
        if renamed is None:
            raise DiTFlowError(f"unknown tensor {key!r} in the checkpoint: this converter knows the Flow Poke "
                               "Transformer of github.com/CompVis/flow-poke-transformer (open-set base release).")
        out.update({k: v.detach().contiguous() for k, v in renamed.items()})
    return out


def _reference_state_dict(loaded, source: str) -> dict[str, Tensor]:
    state = loaded.get("model", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not state:
        raise DiTFlowError(f"{source} holds no state dict (expected a dict with key 'model', as released).")
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise DiTFlowError(f"{source} has a non-tensor entry {key!r} ({type(value).__name__}) in its state dict; "
                               "only tensors are converted.")
    return state


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, encoder_heads: int | None = None,
                       image_size: int = 448) -> FPTConfig:
    """Converts the authors' checkpoint ``src`` (``.pt``) into the safetensors file ``dst``, once.

    Loads with ``torch.load(weights_only=True)``: a pickle that holds anything but tensors and plain containers is
    refused by PyTorch itself (safe from torch 2.6 on; older torch is refused, CVE-2025-32434), and a state dict
    with non-tensor entries by this function. ``dst`` is written
    atomically. Returns the model's sizes.

    Raises:
        DiTFlowError: unreadable file, no or unknown state dict, or a torch older than 2.6 (CVE-2025-32434).
    """
    src = Path(src)
    require_safe_torch(f"the FPT checkpoint {src.name}", "convert it on a machine with a newer torch")
    try:
        loaded = torch.load(src, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise DiTFlowError(f"checkpoint {str(src)!r} does not exist.") from None
    except Exception as e:  # noqa: BLE001 - the restricted unpickler's refusals come in several types
        raise DiTFlowError(f"{src.name} cannot be read as a weights-only PyTorch checkpoint ({e}).") from None
    state = _reference_state_dict(loaded, src.name)
    config = infer_config(state, encoder_heads=encoder_heads, image_size=image_size)
    save_fpt(convert_state_dict(state, config), config, dst, source=src.name)
    return config


def save_fpt(tensors: dict[str, Tensor], config: FPTConfig, dst: str | os.PathLike, source: str = "") -> None:
    """Writes converted tensors and their config to ``dst`` (safetensors, atomically)."""
    from safetensors.torch import save_file

    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": config.to_json(), "source": source,
                "weights_license": WEIGHTS_LICENSE}
    with atomic_path(dst) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_fpt(path: str | os.PathLike) -> tuple[dict[str, Tensor], FPTConfig]:
    """Tensors and config of a converted file (safetensors only).

    Raises:
        DiTFlowError: missing file, or a file that is not a converted FPT (the message says how to convert).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise DiTFlowError(f"FPT weights {str(path)!r} do not exist.")
    if path.suffix != ".safetensors":
        raise DiTFlowError(f"{path.name} is not a .safetensors file; convert the released .pt once with "
                           "'python -m ditflow fpt-convert flow_poke_open_set_base.pt fpt_base.safetensors'.")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise DiTFlowError(f"{path.name} is not a converted Flow Poke Transformer (no '{FORMAT}' metadata); "
                                   "convert the released .pt with 'python -m ditflow fpt-convert'.")
            if metadata.get("format_version") != FORMAT_VERSION:
                raise DiTFlowError(f"{path.name} has FPT format version {metadata.get('format_version')!r}; this "
                                   f"version of the pack reads {FORMAT_VERSION!r}: convert the .pt again.")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise DiTFlowError(f"{path.name} is not a readable safetensors file ({e}).") from None
    return tensors, FPTConfig.from_json(metadata["config"])


def load_fpt(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """A :class:`~ditflow.fpt.model.FlowPokeTransformer` from a converted file, fp32, in eval mode, no gradients.

    Weights stay fp32 (0.9 GB for the base model); lower precision is autocast at prediction time, as the authors
    run it. Built on the meta device and filled from the file (no random initialisation). Call it outside
    ``torch.inference_mode()`` if the weights may later be moved by code that runs outside it (ComfyUI's loader).

    Raises:
        DiTFlowError: see :func:`read_fpt`; tensors missing from or extra to the file.
    """
    from .image_encoder import build_dinov2
    from .model import FlowPokeTransformer

    tensors, config = read_fpt(path)
    encoder = build_dinov2(config.encoder, {k[len(ENCODER_PREFIX):]: v for k, v in tensors.items()
                                            if k.startswith(ENCODER_PREFIX)})
    with torch.device("meta"):
        model = FlowPokeTransformer(config, image_encoder=encoder)
    rest = {k: v for k, v in tensors.items() if not k.startswith(ENCODER_PREFIX)}
    result = model.load_state_dict(rest, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not k.startswith(ENCODER_PREFIX)]
    if missing or result.unexpected_keys:
        raise DiTFlowError(f"{Path(path).name} does not fit its own config: missing {missing[:3]}, unexpected "
                           f"{result.unexpected_keys[:3]}; convert the .pt again.")
    return model.float().to(device).eval().requires_grad_(False)


__all__ = ["convert_checkpoint", "convert_state_dict", "infer_config", "load_fpt", "read_fpt", "save_fpt"]
