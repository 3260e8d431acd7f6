# SPDX-License-Identifier: Apache-2.0
"""Checks of a CogVideoX folder's configs and weight files before diffusers / transformers read them (method.md §7).

A damaged folder should cost one sentence that names the file and what to do, not a traceback from deep inside
the loaders (which report a missing tensor as "Cannot copy out of meta tensor", and a config that describes fewer
blocks than the weights hold not at all: the extra blocks are dropped and the model runs truncated). So, per
component and before any tensor is read:

1. :func:`check_config`: the JSON is an object, its size fields are positive integers (VAE ``scaling_factor`` a
   positive number), and the library can build the model from it (on the ``meta`` device: no memory, no weights).
2. :func:`check_weights`: the weight files the loader will read (``diffusion_pytorch_model.safetensors`` or, for T5,
   ``model.safetensors``, single or sharded) have sound headers and sizes (:mod:`ditflow.tensorfile`); a shard
   index may name only ``.safetensors`` files beside it, never a pickled ``.bin``; and the tensors' names, shapes
   and dtypes are exactly what the config's model needs: none missing, none extra, none of another shape.

The scheduler config is checked by building the scheduler (:meth:`ditflow.backbones.cogvideox.model.CogVideoX.make_scheduler`).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from .errors import DiTFlowError, quote
from .tensorfile import Header, read_header, read_shard_index

#: Component → stem of its weight files: diffusers' and transformers' safetensors names.
WEIGHT_STEMS = {"transformer": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}

#: Config fields that size the model: each must be a positive integer when present (absent ones take defaults).
_POSITIVE_INTS = {
    "transformer": ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "time_embed_dim",
                    "text_embed_dim", "num_layers", "sample_width", "sample_height", "sample_frames", "patch_size",
                    "temporal_compression_ratio", "max_text_seq_length"),
    "vae": ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups", "sample_height",
            "sample_width"),
    "text_encoder": ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                     "relative_attention_num_buckets", "relative_attention_max_distance"),
    "scheduler": ("num_train_timesteps",),
}
#: Config fields that must be positive finite numbers when present.
_POSITIVE_NUMBERS = {
    "vae": ("scaling_factor", "temporal_compression_ratio"),  # diffusers types the VAE's ratio as a float
    "scheduler": ("beta_start", "beta_end", "snr_shift_scale"),
}
#: Where each stack of blocks sits in the weights, and the config field that counts them.
_BLOCKS = {"transformer": ("transformer_blocks", "num_layers"), "text_encoder": ("encoder.block", "num_layers")}


def _advice(folder: Path) -> str:
    return f"re-download {folder.name}/ from the model's Hugging Face repository (or restore the original file)"


def _positive_int(value) -> bool:
    return type(value) is int and value > 0


# ---------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------


def check_config(kind: str, config, path: Path) -> dict:
    """Checks one component's parsed config (``kind``: transformer, vae, text_encoder or scheduler); returns it.

    Raises:
        DiTFlowError: not a JSON object, a size field that is not a positive integer or a scale that is not a
            positive number (quoting it), or a model config the library cannot build a model from (quoting the
            library's complaint). Schedulers are built by :func:`ditflow.backbones.cogvideox.schedule.build_scheduler`.
    """
    advice = _advice(path.parent)
    if not isinstance(config, dict):
        raise DiTFlowError(f"{path} is not a JSON object but a {type(config).__name__}; {advice}.")
    for key in _POSITIVE_INTS[kind]:
        if key in config and not (config[key] is None and key == "out_channels") and not _positive_int(config[key]):
            raise DiTFlowError(f"{path} has {key} = {config[key]!r}, which must be a positive integer; {advice}.")
    if kind == "vae":
        blocks = config.get("block_out_channels", [1])
        if not isinstance(blocks, list) or not blocks or not all(_positive_int(b) for b in blocks):
            raise DiTFlowError(
                f"{path} has block_out_channels = {blocks!r}, which must list positive integers; {advice}."
            )
    for key in _POSITIVE_NUMBERS.get(kind, ()):
        value = config.get(key, 1.0)
        if type(value) not in (int, float) or not (math.isfinite(value) and value > 0):
            raise DiTFlowError(f"{path} has {key} = {value!r}, which must be a positive number; {advice}.")
    if kind != "scheduler":
        _meta_model(kind, config, path)
    return config


def _meta_model(kind: str, config: dict, path: Path):
    """The component built from ``config`` on the meta device (shapes only; nothing allocated, nothing read)."""
    import torch

    try:
        with torch.device("meta"):
            if kind == "text_encoder":
                from transformers import T5Config, T5EncoderModel

                return T5EncoderModel(T5Config.from_dict(config))
            from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel

            cls = CogVideoXTransformer3DModel if kind == "transformer" else AutoencoderKLCogVideoX
            return cls.from_config(config)
    except Exception as e:  # the libraries raise many types for bad values; the message quotes theirs
        raise DiTFlowError(
            f"{path} describes a {kind} that cannot be built ({quote(e)}); {_advice(path.parent)}."
        ) from None


# ---------------------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------------------


def _weight_files(folder: Path, kind: str) -> dict[str, Path]:
    """The safetensors file of every tensor the loader will read: from the shard index or the single file.

    diffusers reads a shard index first and transformers the single file first; both are followed here. Every
    ``*.safetensors.index.json`` in the folder is checked, whichever the loader picks, so none can point at a pickle.
    """
    advice = _advice(folder)
    stem = WEIGHT_STEMS[kind]
    indexes = {p.name: read_shard_index(p, advice=advice) for p in sorted(folder.glob("*.safetensors.index.json"))}
    single, index = folder / f"{stem}.safetensors", f"{stem}.safetensors.index.json"
    order = ("single", "index") if kind == "text_encoder" else ("index", "single")
    for source in order:
        if source == "index" and index in indexes:
            return indexes[index]
        if source == "single" and single.is_file():
            return {}
    raise DiTFlowError(f"{folder} has neither {single.name} nor {index}; {advice}.")


def _read_weights(folder: Path, kind: str) -> tuple[dict, dict[str, Path]]:
    """(name → :class:`~ditflow.tensorfile.TensorInfo`, name → file) over the files the loader will read."""
    advice = _advice(folder)
    where = _weight_files(folder, kind)
    files = sorted(set(where.values())) or [folder / f"{WEIGHT_STEMS[kind]}.safetensors"]
    headers: dict[Path, Header] = {f: read_header(f, advice=advice) for f in files}
    tensors, origin = {}, {}
    for f, header in headers.items():
        for name, info in header.tensors.items():
            tensors[name], origin[name] = info, f
    for name, f in where.items():
        if name not in headers[f].tensors:
            raise DiTFlowError(f"{f} lacks the tensor {name!r} that its shard index places there; {advice}.")
    return tensors, origin


def _expected(module) -> tuple[dict, dict, set[str]]:
    """(name → tensor of the state dict, name → names sharing its storage, non-persistent buffer names)."""
    state = module.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for name, t in state.items():
        groups.setdefault(id(t), []).append(name)
    aliases = {name: groups[id(t)] for name, t in state.items()}
    buffers = {name for name, _ in module.named_buffers()} - set(state)
    return state, aliases, buffers


def _matches(name: str, patterns) -> bool:
    return any(re.search(p, name) for p in patterns or ())


def _block_count(names, prefix: str) -> int:
    found = {int(m.group(1)) for n in names if (m := re.match(rf"^{re.escape(prefix)}\.(\d+)\.", n))}
    return max(found) + 1 if found else 0


def check_weights(folder: Path, kind: str, config: dict) -> None:
    """Checks the weight files of one component folder against the model its (checked) ``config`` describes.

    Args:
        folder: e.g. ``<model>/transformer``.
        kind: ``"transformer"``, ``"vae"`` or ``"text_encoder"``.
        config: the component's config, already passed through :func:`check_config`.
    Raises:
        DiTFlowError: a damaged or truncated file, a shard index naming anything but a ``.safetensors`` beside it,
            a block count in the config that differs from the weights', or tensors missing, extra, of another
            shape, or not floating where the model has floating weights; the sentence names the file or folder.
    """
    advice = _advice(folder)
    tensors, origin = _read_weights(folder, kind)
    model = _meta_model(kind, config, folder / "config.json")
    state, aliases, nonpersistent = _expected(model)
    if kind in _BLOCKS:
        prefix, key = _BLOCKS[kind]
        in_weights, in_config = _block_count(tensors, prefix), _block_count(state, prefix)
        if in_weights != in_config:
            raise DiTFlowError(
                f"{folder / 'config.json'} says {key} = {in_config} but the weights hold {in_weights} blocks; set "
                f"{key} to {in_weights} or {advice}."
            )
    ignore_missing = getattr(type(model), "_keys_to_ignore_on_load_missing", None)
    ignore_extra = getattr(type(model), "_keys_to_ignore_on_load_unexpected", None)
    missing = [n for n in state if not any(a in tensors for a in aliases[n]) and not _matches(n, ignore_missing)]
    if missing:
        raise DiTFlowError(
            f"{folder} lacks {len(missing)} of the {len(state)} tensors its config.json needs (e.g. {missing[0]!r}), "
            f"so the weights are incomplete or of another model; {advice}."
        )
    extra = [n for n in tensors if n not in state and n not in nonpersistent and not _matches(n, ignore_extra)]
    if extra:
        raise DiTFlowError(
            f"{folder} holds {len(extra)} tensors that its config.json has no place for (e.g. {extra[0]!r}), so the "
            f"config describes another model than the weights; {advice}."
        )
    for name, info in tensors.items():
        if name not in state:
            continue
        want = state[name]
        if tuple(want.shape) != info.shape:
            raise DiTFlowError(
                f"{origin[name]} holds {name!r} with shape {list(info.shape)}, but its config.json needs "
                f"{list(want.shape)}; {advice}."
            )
        if want.is_floating_point() and not info.is_float:
            raise DiTFlowError(f"{origin[name]} holds {name!r} as {info.dtype}, not a float type; {advice}.")


def read_json(path: Path) -> object:
    """Parsed JSON of a config file; raises :class:`DiTFlowError` naming it when unreadable or not JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DiTFlowError(f"cannot read {path} as JSON ({e}); {_advice(path.parent)}.") from None


__all__ = ["WEIGHT_STEMS", "check_config", "check_weights", "read_json"]
