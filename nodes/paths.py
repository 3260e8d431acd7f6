# SPDX-License-Identifier: Apache-2.0
"""Model and embeddings folders registered with ComfyUI's ``folder_paths`` (also mappable in extra_model_paths.yaml).

- ``CogVideo``: ``models/CogVideo/<name>/`` diffusers folders (the key and layout kijai's CogVideoXWrapper uses).
- ``ditflow_embeds``: ``models/ditflow_embeds/`` and ``output/ditflow/`` (where DiTFlow Save Embeds writes).
- ``cotracker``: ``models/cotracker/*.pth`` (CoTracker3's ``scaled_offline.pth`` for the Motion Fidelity node).
  Nodes take checkpoints from this list only, never a free server path.
- ``fpt``: ``models/fpt/*.safetensors``, Flow Poke Transformer weights converted by ``python -m ditflow fpt-convert``.
"""

from __future__ import annotations

import os

from ditflow import DiTFlowError

MODELS_KEY = "CogVideo"
EMBEDS_KEY = "ditflow_embeds"
EMBEDS_EXTENSIONS = {".safetensors"}
COTRACKER_KEY = "cotracker"
COTRACKER_EXTENSIONS = {".pth"}
FPT_KEY = "fpt"
FPT_EXTENSIONS = {".safetensors"}


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


def model_path(name: str) -> str:
    """Full path of the CogVideoX folder ``name``; raises :class:`DiTFlowError` naming the searched folders."""
    import folder_paths

    register()
    roots = folder_paths.get_folder_paths(MODELS_KEY)
    for root in roots:
        path = os.path.join(root, name)
        if os.path.isdir(path):
            return path
    raise DiTFlowError(
        f"model folder {name!r} was not found in {', '.join(roots)}; put a diffusers CogVideoX-2b/-5b folder there "
        "(see the DiTFlow README) and refresh."
    )


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
