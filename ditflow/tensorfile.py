# SPDX-License-Identifier: Apache-2.0
"""Cheap checks of ``.safetensors`` files and their shard indexes before anything reads the tensors.

An interrupted download leaves a truncated shard; a damaged disk or a hostile file leaves a header that lies about
its length or offsets; a ``*.safetensors.index.json`` may point diffusers at a pickled ``.bin``. Each is refused
here in one sentence that names the file, reading only the 8-byte length, the JSON header and the file size (a
5B shard of 5 GB costs a few kilobytes of I/O), then letting ``safetensors.safe_open`` validate the layout.

Format (safetensors): an unsigned little-endian 64-bit header length ``N``, ``N`` bytes of JSON mapping each tensor
name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to byte ``8 + N``) plus an optional
``"__metadata__"`` string map, then the tensor bytes, which must cover ``[0, max end)`` exactly.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DiTFlowError

#: safetensors refuses headers above 100 MB (``HeaderTooLarge``); so do we, before reading them.
MAX_HEADER_BYTES = 100_000_000

#: Bytes per element of each safetensors dtype.
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
#: The floating dtypes (weights and embedding tables must be one of these).
FLOAT_DTYPES = frozenset({"F8_E5M2", "F8_E4M3", "F16", "BF16", "F32", "F64"})


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a safetensors header."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


@dataclass(frozen=True)
class Header:
    """A checked safetensors header: tensors by name, the ``__metadata__`` strings, and the file's size in bytes."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    header_bytes: int = 0


def _size(n: int) -> str:
    return f"{n:,} bytes"


def read_header(path: str | os.PathLike, *, advice: str, max_header_bytes: int = MAX_HEADER_BYTES) -> Header:
    """Reads and checks the header of one safetensors file without reading its tensors.

    Args:
        path: the file.
        advice: what the user should do, ending every error sentence (e.g. "re-download it").
        max_header_bytes: refuse a longer header before reading it (DiTFlow's own files are small).
    Returns:
        :class:`Header`.
    Raises:
        DiTFlowError: a missing, empty or truncated file (fewer bytes than the header's offsets need), a header
            length beyond the file or ``max_header_bytes``, a header that is not a JSON object of well-formed
            entries, or any other layout ``safetensors.safe_open`` rejects; the sentence names the file.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise DiTFlowError(
                    f"{path} has {size} bytes, too few for a safetensors file (an interrupted download?); {advice}."
                )
            n = struct.unpack("<Q", head)[0]
            if n > max_header_bytes:
                raise DiTFlowError(
                    f"{path} declares a header of {_size(n)}, more than the {_size(max_header_bytes)} allowed, so it "
                    f"is damaged or not a safetensors file; {advice}."
                )
            if n > size - 8:
                raise DiTFlowError(
                    f"{path} is truncated: its header alone needs {_size(n)} but the file has {_size(size)} "
                    f"(an interrupted download?); {advice}."
                )
            raw = f.read(n)
    except OSError as e:
        raise DiTFlowError(f"cannot read {path} ({e.strerror or e}); {advice}.") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        header = None
    if not isinstance(header, dict):
        raise DiTFlowError(f"{path} has a corrupt header (not a JSON object); {advice}.")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise DiTFlowError(f"{path} has corrupt metadata (not a map of strings); {advice}.")
    tensors, end = {}, 0
    for name, entry in header.items():
        info = _entry(entry)
        if info is None:
            raise DiTFlowError(f"{path} has a corrupt header entry for tensor {name!r}; {advice}.")
        (dtype, shape), (begin, stop) = info
        if stop - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise DiTFlowError(
                f"{path} is damaged: tensor {name!r} ({dtype} {list(shape)}) has {stop - begin} bytes of data, not "
                f"{math.prod(shape) * DTYPE_BYTES[dtype]}; {advice}."
            )
        tensors[name] = TensorInfo(dtype, shape)
        end = max(end, stop)
    present = size - 8 - n
    if present < end:
        raise DiTFlowError(
            f"{path} is truncated: its header describes {_size(end)} of tensors but only {_size(present)} follow "
            f"(an interrupted download?); {advice}."
        )
    try:  # the layout checks we do not repeat (contiguous, non-overlapping, fully covered)
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError, ValueError) as e:
        raise DiTFlowError(f"{path} is not a valid safetensors file ({e}); {advice}.") from None
    return Header(path, tensors, dict(metadata), n)


def _entry(entry) -> tuple[tuple[str, tuple[int, ...]], tuple[int, int]] | None:
    """((dtype, shape), (begin, end)) of a well-formed header entry, else None."""
    if not isinstance(entry, dict):
        return None
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    ints = (lambda xs: isinstance(xs, list) and all(type(x) is int and x >= 0 for x in xs))
    if dtype not in DTYPE_BYTES or not ints(shape) or not ints(offsets) or len(offsets) != 2:
        return None
    if offsets[1] < offsets[0]:
        return None
    return (dtype, tuple(shape)), (offsets[0], offsets[1])


def read_shard_index(index: str | os.PathLike, *, advice: str) -> dict[str, Path]:
    """The ``weight_map`` of a ``*.safetensors.index.json``: tensor name → shard path inside the index's folder.

    Raises:
        DiTFlowError: the index is not a JSON object with a ``weight_map`` of strings, or a shard is not a plain
            ``.safetensors`` file name in the same folder (a ``.bin``/``.pt`` would be unpickled by the loaders;
            a path with a separator or ``..`` would leave the folder), or a named shard does not exist.
    """
    index = Path(index)
    try:
        data = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        data = None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise DiTFlowError(f"{index} is not a shard index (a JSON object with a 'weight_map' of file names); {advice}.")
    shards = {}
    for name in sorted(set(weight_map.values())):
        if Path(name).name != name or name in (".", "..") or "\\" in name or not name.endswith(".safetensors"):
            raise DiTFlowError(
                f"{index} points at {name!r}, which is not a .safetensors file in that folder; only safetensors "
                f"beside the index are read (never pickles), so {advice}."
            )
        if not (index.parent / name).is_file():
            raise DiTFlowError(
                f"{index} names the shard {name}, which is missing (an interrupted download?); {advice}."
            )
        shards[name] = index.parent / name
    return {key: shards[name] for key, name in weight_map.items()}


__all__ = ["DTYPE_BYTES", "FLOAT_DTYPES", "Header", "MAX_HEADER_BYTES", "TensorInfo", "read_header",
           "read_shard_index"]
