# SPDX-License-Identifier: Apache-2.0
"""Model and embeddings folders registered with ComfyUI's ``folder_paths`` (also mappable in extra_model_paths.yaml).

- ``CogVideo``: ``models/CogVideo/<name>/`` folders, in the diffusers layout or kijai's CogVideoXWrapper layout
  (``transformer/ vae/ scheduler/`` only; the key is kijai's too). CogVideoX-2b/-5b are offered even when absent
  and downloaded into ``models/CogVideo/<name>`` on first use (:func:`model_path`).
- ``text_encoders`` (core ComfyUI's): single-file T5-XXL weights, for folders without ``text_encoder/``.
- ``ditflow_embeds``: ``models/ditflow_embeds/`` and ``output/ditflow/`` (where DiTFlow Save Embeds writes).
- ``cotracker``: ``models/cotracker/*.pth`` (CoTracker3's ``scaled_offline.pth`` for the Motion Fidelity node).
  Nodes take checkpoints from this list only, never a free server path.
- ``fpt``: ``models/fpt/*.safetensors``, Flow Poke Transformer weights converted by ``python -m ditflow fpt-convert``.
"""

from __future__ import annotations

import os
import sys

from ditflow import DiTFlowError
from ditflow.hub import KNOWN_MODELS, SUBFOLDERS

MODELS_KEY = "CogVideo"
TEXT_ENCODERS_KEY = "text_encoders"
EMBEDS_KEY = "ditflow_embeds"
EMBEDS_EXTENSIONS = {".safetensors"}
COTRACKER_KEY = "cotracker"
COTRACKER_EXTENSIONS = {".pth"}
FPT_KEY = "fpt"
FPT_EXTENSIONS = {".safetensors"}
#: The ``text_encoder`` choice that takes the model folder's own ``text_encoder/``, else a T5-XXL file.
AUTO_T5 = "auto"
#: kijai's download: no text encoder or tokenizer (T5 comes from models/text_encoders).
KIJAI_SUBFOLDERS = ("scheduler", "vae", "transformer")


def register() -> None:
    """Idempotent: adds the default folders (after any from extra_model_paths.yaml)."""
    import folder_paths

    folder_paths.add_model_folder_path(MODELS_KEY, os.path.join(folder_paths.models_dir, "CogVideo"))
    folder_paths.add_model_folder_path(EMBEDS_KEY, os.path.join(folder_paths.models_dir, "ditflow_embeds"))
    folder_paths.add_model_folder_path(EMBEDS_KEY, os.path.join(folder_paths.get_output_directory(), "ditflow"))
    folder_paths.add_model_folder_path(COTRACKER_KEY, os.path.join(folder_paths.models_dir, "cotracker"))
    folder_paths.add_model_folder_path(FPT_KEY, os.path.join(folder_paths.models_dir, "fpt"))
    for key, wanted in ((EMBEDS_KEY, EMBEDS_EXTENSIONS), (COTRACKER_KEY, COTRACKER_EXTENSIONS),
                        (FPT_KEY, FPT_EXTENSIONS)):
        paths, extensions = folder_paths.folder_names_and_paths[key]
        if not extensions:
            folder_paths.folder_names_and_paths[key] = (paths, set(wanted))


def _is_model_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "model_index.json")) or os.path.isfile(
        os.path.join(path, "transformer", "config.json")
    )


def model_folders() -> list[str]:
    """Names of the CogVideoX folders (with model_index.json or transformer/config.json) in every CogVideo path."""
    import folder_paths

    register()
    names = set()
    for root in folder_paths.get_folder_paths(MODELS_KEY):
        if os.path.isdir(root):
            names.update(n for n in os.listdir(root) if _is_model_folder(os.path.join(root, n)))
    return sorted(names)


def model_choices() -> list[str]:
    """The loader's model list: the folders found, then CogVideoX-5b / -2b when absent (downloaded on first use)."""
    found = model_folders()
    return found + [name for name in KNOWN_MODELS if name not in found]


def model_folder(name: str) -> str | None:
    """The folder of the model ``name`` in a CogVideo path, or ``None`` when it is not there (yet)."""
    import folder_paths

    register()
    for root in folder_paths.get_folder_paths(MODELS_KEY):
        if _is_model_folder(os.path.join(root, name)):
            return os.path.join(root, name)
    return None


def model_path(name: str, *, download: bool = False, with_text_encoder: bool = True) -> str:
    """Full path of the CogVideoX folder ``name``; a known model (:data:`ditflow.hub.KNOWN_MODELS`) that is absent is
    downloaded into the first CogVideo folder when ``download`` is set: the full repository, or kijai's
    ``transformer/ vae/ scheduler/`` when ``with_text_encoder`` is off.

    Raises:
        DiTFlowError: not found (naming the searched folders and how to get it) or a failed download.
    """
    import folder_paths

    path = model_folder(name)
    if path is not None:
        return path
    roots = folder_paths.get_folder_paths(MODELS_KEY)
    target = os.path.join(roots[0], name)
    if name in KNOWN_MODELS and download:
        from ditflow.hub import download as fetch

        subfolders = SUBFOLDERS if with_text_encoder else KIJAI_SUBFOLDERS
        return str(fetch(KNOWN_MODELS[name], local_dir=target, subfolders=subfolders,
                         log=lambda line: print(f"[DiTFlow] {line}", flush=True)))
    if name in KNOWN_MODELS:
        raise DiTFlowError(
            f"{name} is not in {', '.join(roots)}; turn on the loader's download_missing, or run `python -m ditflow "
            f"download {KNOWN_MODELS[name]} --dir {target}`, and run again."
        )
    raise DiTFlowError(
        f"model folder {name!r} was not found in {', '.join(roots)}; put a diffusers CogVideoX-2b/-5b folder there "
        "(see the DiTFlow README) and refresh."
    )


def t5_files() -> list[str]:
    """Single-file text encoders in ComfyUI's ``models/text_encoders`` (``.safetensors`` only)."""
    import folder_paths

    register()
    try:
        return [f for f in folder_paths.get_filename_list(TEXT_ENCODERS_KEY) if f.endswith(".safetensors")]
    except KeyError:  # a ComfyUI without the text_encoders key
        return []


def _t5_rank(name: str) -> tuple:
    """Preference among T5 files: T5-XXL first, then fp16 over bf16/fp32 over fp8 (closest to CogVideoX's own)."""
    low = os.path.basename(name).lower()
    precision = 0 if "fp16" in low else 2 if "fp8" in low else 1
    return ("t5xxl" not in low and "t5-xxl" not in low and "t5_xxl" not in low, not low.startswith("t5"), precision,
            low)


def text_encoder_file(choice: str, model_folder: str | None) -> str | None:
    """The T5 file for the loader's ``text_encoder`` ``choice``; ``None`` means the model folder's ``text_encoder/``.

    ``auto``: the folder's own ``text_encoder/`` when it has one, else the preferred T5-XXL file of models/text_encoders
    (:func:`_t5_rank`), else ``None`` (the library then says what is missing).
    """
    import folder_paths

    if choice != AUTO_T5:
        path = folder_paths.get_full_path(TEXT_ENCODERS_KEY, choice)
        if path is None:
            raise DiTFlowError(f"text encoder {choice!r} was not found in models/text_encoders; refresh the list.")
        return path
    if model_folder is not None and os.path.isdir(os.path.join(model_folder, "text_encoder")):
        return None
    files = sorted(t5_files(), key=_t5_rank)
    return folder_paths.get_full_path(TEXT_ENCODERS_KEY, files[0]) if files else None


def tokenizer_folder(model_folder: str, t5_file: str | None) -> str | None:
    """The tokenizer to pair with a T5 file: ``None`` (the folder's own ``tokenizer/``, or no T5 file), else
    ComfyUI's own T5 tokenizer (:func:`comfy_t5_tokenizer`); the library fetches one when this is ``None`` too."""
    if t5_file is None or os.path.isdir(os.path.join(model_folder, "tokenizer")):
        return None
    return comfy_t5_tokenizer()


def comfy_t5_tokenizer() -> str | None:
    """The T5 tokenizer that ships with the running ComfyUI (``comfy/text_encoders/t5_tokenizer``), used at run time
    for folders without ``tokenizer/``; ``None`` when this ComfyUI has none."""
    comfy = sys.modules.get("comfy")
    for root in getattr(comfy, "__path__", None) or ():
        folder = os.path.join(root, "text_encoders", "t5_tokenizer")
        if os.path.isfile(os.path.join(folder, "tokenizer.json")) or os.path.isfile(os.path.join(folder, "spiece.model")):
            return folder
    return None


def embeds_files() -> list[str]:
    import folder_paths

    register()
    return folder_paths.get_filename_list(EMBEDS_KEY)


def lists_embeds(path: str) -> bool:
    """Whether ``path`` lies in a folder that DiTFlow Load Embeds lists."""
    import folder_paths

    register()
    path = os.path.abspath(path)
    roots = [os.path.abspath(root) for root in folder_paths.get_folder_paths(EMBEDS_KEY)]
    return any(os.path.commonpath((root, path)) == root for root in roots)


def embeds_path(name: str) -> str:
    import folder_paths

    register()
    path = folder_paths.get_full_path(EMBEDS_KEY, name)
    if path is None:
        raise DiTFlowError(
            f"embeddings file {name!r} was not found in {', '.join(folder_paths.get_folder_paths(EMBEDS_KEY))}."
        )
    return path


def cotracker_files() -> list[str]:
    """The ``.pth`` files in every registered ``cotracker`` folder (names relative to their folder)."""
    import folder_paths

    register()
    return folder_paths.get_filename_list(COTRACKER_KEY)


def cotracker_path(name: str) -> str:
    """Full path of a listed CoTracker checkpoint; any other name is refused without saying what exists on disk."""
    import folder_paths

    register()
    path = folder_paths.get_full_path(COTRACKER_KEY, name) if name in cotracker_files() else None
    if path is None:
        raise DiTFlowError(
            f"CoTracker checkpoint {name!r} is not one of the files in "
            f"{', '.join(folder_paths.get_folder_paths(COTRACKER_KEY))}; put scaled_offline.pth there and refresh."
        )
    return path


def fpt_files() -> list[str]:
    """Converted FPT weights in every ``fpt`` folder."""
    import folder_paths

    register()
    return folder_paths.get_filename_list(FPT_KEY)


def fpt_path(name: str) -> str:
    import folder_paths

    register()
    path = folder_paths.get_full_path(FPT_KEY, name) if name in fpt_files() else None  # listed files only
    if path is None:
        raise DiTFlowError(
            f"FPT weights {name!r} were not found in {', '.join(folder_paths.get_folder_paths(FPT_KEY))}; convert "
            "flow_poke_open_set_base.pt with 'python -m ditflow fpt-convert' into models/fpt (see the README)."
        )
    return path
