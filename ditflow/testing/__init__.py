# SPDX-License-Identifier: Apache-2.0
"""Test helpers shipped with the package: a tiny random CogVideoX in the real diffusers folder layout.

``build_tiny_model`` is resolved lazily so that ``python -m ditflow.testing.tiny_model`` does not import its own
module twice, and importing this package stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_tiny_model"]


def __getattr__(name: str) -> Any:
    if name == "build_tiny_model":
        from .tiny_model import build_tiny_model

        return build_tiny_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
