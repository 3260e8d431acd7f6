# SPDX-License-Identifier: Apache-2.0
"""The pack's root ``__init__.py`` as ComfyUI loads it (a package named after its folder, whatever that name is) and
as pytest probes it when the checkout's folder name is no Python identifier (``git clone … ComfyUI-DiTFlow``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

INIT = Path(__file__).resolve().parents[1] / "__init__.py"


def _load(name: str, as_package: bool):
    locations = [str(INIT.parent)] if as_package else None
    spec = importlib.util.spec_from_file_location(name, INIT, submodule_search_locations=locations)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    return module


def test_comfyui_loads_the_pack_from_a_hyphenated_folder_with_every_node():
    # ComfyUI's load_custom_node: spec_from_file_location(folder name, __init__.py, submodule_search_locations=[dir])
    module = _load("ComfyUI-DiTFlow", as_package=True)
    assert "DiTFlowGuidedSampler" in module.NODE_CLASS_MAPPINGS
    assert set(module.NODE_CLASS_MAPPINGS) == set(module.NODE_DISPLAY_NAME_MAPPINGS)


def test_the_entry_file_imports_without_its_package_as_pytest_does_in_such_a_checkout():
    module = _load("__init__", as_package=False)  # raised "attempted relative import with no known parent package"
    assert module.NODE_CLASS_MAPPINGS == {}
