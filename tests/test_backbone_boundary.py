# SPDX-License-Identifier: Apache-2.0
"""The method never names a model (issue 12): outside ``ditflow/backbones`` no module imports a backbone's package or
branches on a variant key; it asks the backbone object (capabilities, geometry, defaults) or the registry."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from ditflow.backbones import VARIANT_KEYS

ROOT = Path(__file__).resolve().parents[1]
#: The method and its callers; the backbones themselves and the tiny-model builder (which builds each variant) aside.
METHOD = sorted(
    p for p in [*(ROOT / "ditflow").rglob("*.py"), *(ROOT / "nodes").rglob("*.py")]
    if not {"backbones", "testing"} & set(p.relative_to(ROOT).parts)
)


def _names_a_model(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and "cogvideox" in (node.module or "").split("."):
            found.append(f"line {node.lineno}: imports {node.module}")
        if isinstance(node, ast.Import) and any("backbones.cogvideox" in a.name for a in node.names):
            found.append(f"line {node.lineno}: imports a backbone package")
        if isinstance(node, ast.Compare):
            for side in (node.left, *node.comparators):
                if isinstance(side, ast.Constant) and side.value in VARIANT_KEYS:
                    found.append(f"line {node.lineno}: compares with the variant key {side.value!r}")
    return found


@pytest.mark.parametrize("path", METHOD, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_method_asks_the_backbone_and_never_names_a_model(path):
    assert METHOD and _names_a_model(ast.parse(path.read_text())) == []


def test_the_check_finds_what_it_forbids():
    code = "from .backbones.cogvideox.layout import geometry\nif model.variant == '5b':\n    pass\n"
    assert len(_names_a_model(ast.parse(code))) == 2
