# SPDX-License-Identifier: Apache-2.0
"""The backbones DiTFlow runs on: a registry from a checkpoint's transformer class to the package that serves it.

Each backbone is one package here (``cogvideox/``) implementing :class:`~ditflow.backbones.base.Backbone`; the
method reaches a model only through that interface. Adding a backbone touches its own package, :data:`BACKBONES`,
the tiny-model builder and the tests. Importing this module is cheap (no torch model library is imported).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import DiTFlowError
from .cogvideox.variants import VARIANTS as _COGVIDEOX_VARIANTS


@dataclass(frozen=True)
class BackboneEntry:
    """One registered backbone.

    Attributes:
        name: display name of the family; transformer_classes: the ``_class_name`` s of ``transformer/config.json``
            it serves; loader: ``"module:function"`` that loads a folder or hub id (keyword options as
            :func:`ditflow.backbones.cogvideox.loading.load_cogvideox`); variants: the variant keys it can detect.
    """

    name: str
    transformer_classes: tuple[str, ...]
    loader: str
    variants: tuple[str, ...]

    def load_function(self) -> Callable:
        module, function = self.loader.split(":")
        return getattr(importlib.import_module(module), function)


#: Every backbone, in the order they are tried.
BACKBONES: tuple[BackboneEntry, ...] = (
    BackboneEntry("CogVideoX", ("CogVideoXTransformer3DModel",), "ditflow.backbones.cogvideox.loading:load_cogvideox",
                  tuple(_COGVIDEOX_VARIANTS)),
)

#: Every variant key a saved file may name (embeddings files record the one they were optimised on).
VARIANT_KEYS: tuple[str, ...] = tuple(key for entry in BACKBONES for key in entry.variants)

#: Variant key → (display name, Hugging Face hub id, :class:`~ditflow.backbones.base.Defaults`), for help texts and
#: downloads before any model is loaded.
VARIANT_INFO: dict[str, tuple] = {k: (v.name, v.hub_id, v.defaults) for k, v in _COGVIDEOX_VARIANTS.items()}


def size_of_grid(variant: str, grid: tuple[int, int, int]) -> tuple[int, int, int]:
    """The video size ``(frames, height, width)`` in px of a token ``grid`` on the model ``variant`` (a key of
    :data:`VARIANT_KEYS`), from its registry entry alone, before any model is loaded (e.g. to read a saved run's
    reference again); the same as the loaded model's ``size_of_grid``."""
    from .cogvideox.layout import size_of_grid as cogvideox_size

    return cogvideox_size(_variant(variant).layout_config, grid)


def token_grid(variant: str, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """The token grid ``(F, h, w)`` of a ``frames × height × width`` px video on the model ``variant``, before any
    model is loaded (the inverse of :func:`size_of_grid`)."""
    from .cogvideox.layout import token_grid as cogvideox_grid

    return cogvideox_grid(_variant(variant).layout_config, frames, height, width)


def _variant(key: str):
    if key not in _COGVIDEOX_VARIANTS:
        raise DiTFlowError(f"unknown model variant {key!r}; known: {', '.join(VARIANT_KEYS)}.")
    return _COGVIDEOX_VARIANTS[key]


def detect(transformer_config: dict) -> BackboneEntry:
    """The backbone serving a ``transformer/config.json``; raises :class:`DiTFlowError` naming the class otherwise."""
    cls = transformer_config.get("_class_name", "CogVideoXTransformer3DModel")
    for entry in BACKBONES:
        if cls in entry.transformer_classes:
            return entry
    raise DiTFlowError(f"a {cls} transformer is not supported; DiTFlow runs "
                       f"{', '.join(e.name for e in BACKBONES)} models.")


def load_model(path: str | os.PathLike, **options):
    """Loads the model at ``path`` (a folder or hub id) with the backbone its transformer config names.

    A hub id or a folder without a readable ``transformer/config.json`` goes to the first backbone's loader, which
    fetches it or says what is missing. ``options``: see :func:`ditflow.backbones.cogvideox.loading.load_cogvideox`.
    """
    from ..checkpoint import read_json

    config_path = Path(os.fspath(path)).expanduser() / "transformer" / "config.json"
    entry = BACKBONES[0]
    if config_path.is_file():
        try:
            config = read_json(config_path)
        except DiTFlowError:
            config = None  # the loader reports the damaged file in its own words
        if isinstance(config, dict):
            entry = detect(config)
    return entry.load_function()(path, **options)
