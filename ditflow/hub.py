# SPDX-License-Identifier: Apache-2.0
"""Models by Hugging Face hub id (``THUDM/CogVideoX-5b``): found in the local cache, downloaded when missing.

:func:`resolve_model` turns what a user typed into a local folder: an existing folder is itself; a hub id becomes its
snapshot folder in the Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``), after ``huggingface_hub`` has fetched any
missing file. Only configs, safetensors weights (with their shard indexes) and the tokenizer are fetched
(:func:`allow_patterns`), never pickled ``.bin``/``.pt`` weights; an interrupted download resumes where it stopped,
with ``huggingface_hub``'s progress bars on stderr. With ``HF_HUB_OFFLINE=1`` nothing is fetched and a model that is
not complete in the cache gets one sentence naming the id and the command that downloads it.

Everything is then loaded from that folder by :func:`ditflow.backbones.cogvideox.loading.load_cogvideox`, the same code as for a folder.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from .backbones import VARIANT_INFO
from .errors import DiTFlowError

#: A hub id is ``owner/name``; anything else that is not an existing folder is a missing local path.
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")

#: Folder names (as in ``models/CogVideo/<name>``) of the models this pack supports → their hub ids (5b first: the
#: loader's default), and the size of the full download (configs + safetensors + tokenizer; the T5 text encoder alone
#: is ≈ 9.5 GB of it). The I2V and 1.5 models have 5b's networks (42 blocks, 48 × 64), so their size is 5b's,
#: estimated from their configs (their downloads were not measured here).
KNOWN_MODELS = {hub_id.split("/")[1]: hub_id for _, hub_id, _ in sorted(VARIANT_INFO.values(),
                                                                       key=lambda info: info[1] != "THUDM/CogVideoX-5b")}
_SIZES = {"THUDM/CogVideoX-5b": "≈ 21 GB", "THUDM/CogVideoX-2b": "≈ 13 GB", "THUDM/CogVideoX-5b-I2V": "≈ 21 GB",
          "THUDM/CogVideoX1.5-5B": "≈ 21 GB", "THUDM/CogVideoX1.5-5B-I2V": "≈ 21 GB"}

#: The subfolders of a diffusers CogVideoX repository, in download order.
SUBFOLDERS = ("scheduler", "tokenizer", "vae", "transformer", "text_encoder")


def is_hub_id(text: str | os.PathLike) -> bool:
    """True for ``owner/name`` that is not an existing local path."""
    text = os.fspath(text)
    return bool(HUB_ID.match(text)) and not Path(text).expanduser().exists()


def allow_patterns(subfolders: tuple[str, ...] | list[str] = SUBFOLDERS) -> list[str]:
    """``huggingface_hub`` patterns for ``model_index.json`` and, per subfolder, its JSON configs, its safetensors
    (and shard index) and, for ``tokenizer``, every file (``spiece.model`` and its JSON files). Nothing else."""
    patterns = ["model_index.json"]
    for sub in subfolders:
        if sub == "tokenizer":
            patterns.append("tokenizer/*")
        else:
            patterns += [f"{sub}/*.json", f"{sub}/*.safetensors"]
    return patterns


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) was set when ``huggingface_hub`` was imported."""
    from huggingface_hub import constants

    is_offline = getattr(constants, "is_offline_mode", None)
    return bool(is_offline() if is_offline else constants.HF_HUB_OFFLINE)


def _how_to_get(repo_id: str) -> str:
    size = f" ({_SIZES[repo_id]})" if repo_id in _SIZES else ""
    return (f"download it{size} where the hub is reachable with `python -m ditflow download {repo_id}` "
            "(or `--dir FOLDER`, then pass that folder)")


def _in_cache(repo_id: str, cache_dir, local_dir) -> bool:
    """Whether any file of ``repo_id`` is on disk (its cache folder, or a non-empty ``local_dir``)."""
    if local_dir is not None:
        return Path(local_dir).is_dir() and any(Path(local_dir).iterdir())
    from huggingface_hub import constants

    root = Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE)
    return (root / f"models--{repo_id.replace('/', '--')}" / "snapshots").is_dir()


def download(
    repo_id: str,
    *,
    local_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    subfolders: tuple[str, ...] | list[str] = SUBFOLDERS,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Fetches the configs, safetensors and tokenizer of ``repo_id`` that are not on disk yet; returns the folder.

    Args:
        repo_id: ``owner/name`` on the Hugging Face hub.
        local_dir: write a plain folder there (as ``models/CogVideo/<name>``) instead of the cache.
        cache_dir: the hub cache to use (default: ``HF_HUB_CACHE``, ``~/.cache/huggingface/hub``).
        subfolders: which of :data:`SUBFOLDERS` to fetch (``model_index.json`` always); kijai's layout is
            ``("scheduler", "vae", "transformer")`` with T5 from a single file.
        log: receives one line before anything is fetched.
    Returns:
        the snapshot folder in the cache, or ``local_dir``; laid out as the repository.
    Raises:
        DiTFlowError: one sentence for an unknown or gated id, an unreachable hub, ``HF_HUB_OFFLINE`` with the files
            not on disk, or a failed transfer (rerunning resumes it).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hf_errors

    where = f"into {local_dir}" if local_dir is not None else "into the Hugging Face cache"
    if log is not None and not offline():
        log(f"fetching what is missing of {repo_id} ({', '.join(subfolders)}: configs and safetensors) {where}; "
            "an interrupted download resumes when rerun")
    try:
        folder = snapshot_download(
            repo_id, local_dir=None if local_dir is None else str(local_dir),
            cache_dir=None if cache_dir is None else str(cache_dir), allow_patterns=allow_patterns(subfolders),
        )
    except (hf_errors.RepositoryNotFoundError, hf_errors.GatedRepoError) as exc:
        raise DiTFlowError(
            f"{repo_id} is not a model the Hugging Face hub lets this machine download ({type(exc).__name__}); check "
            "the id (e.g. THUDM/CogVideoX-5b), or log in with `hf auth login` for a gated or private model."
        ) from None
    except Exception as exc:  # offline, unreachable, incomplete snapshot, disk full: one sentence each
        if offline():
            state = "incomplete in" if _in_cache(repo_id, cache_dir, local_dir) else "not in"
            where = "the Hugging Face cache" if local_dir is None else os.fspath(local_dir)
            raise DiTFlowError(
                f"{repo_id} is {state} {where} and HF_HUB_OFFLINE is set, so nothing can be downloaded; "
                f"{_how_to_get(repo_id)}, or unset HF_HUB_OFFLINE."
            ) from None
        raise DiTFlowError(
            f"{repo_id} could not be fetched from the Hugging Face hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no details'}); check the connection and disk space and "
            "rerun (the download resumes), or pass a local folder."
        ) from None
    return Path(folder)


def resolve_model(
    model: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    subfolders: tuple[str, ...] | list[str] = SUBFOLDERS,
    log: Callable[[str], None] | None = None,
) -> Path:
    """The local folder of ``model``: itself if it is a folder, else the hub snapshot of the id (see :func:`download`).

    Raises:
        DiTFlowError: a missing local path that is no hub id, or any failure of :func:`download`.
    """
    text = os.fspath(model)
    local = Path(text).expanduser()
    if local.is_dir():
        return local
    if not is_hub_id(text):
        raise DiTFlowError(
            f"model folder {text} does not exist; give a CogVideoX folder or a hub id such as THUDM/CogVideoX-5b."
        )
    return download(text, cache_dir=cache_dir, subfolders=subfolders, log=log)


def incomplete_hint(folder: Path) -> str | None:
    """For a snapshot folder in the hub cache (``…/models--owner--name/snapshots/<commit>``), how to complete it."""
    parts = folder.resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        repo_id = parts[-3].removeprefix("models--").replace("--", "/", 1)
        return f"the cached {repo_id} is incomplete; `python -m ditflow download {repo_id}` fetches the rest"
    return None


__all__ = ["KNOWN_MODELS", "SUBFOLDERS", "allow_patterns", "download", "incomplete_hint", "is_hub_id", "offline",
           "resolve_model"]
