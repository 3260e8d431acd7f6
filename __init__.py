# SPDX-License-Identifier: Apache-2.0
"""ComfyUI entry point of the DiTFlow node pack (this folder is the pack: custom_nodes/<folder>/).

The pack folder is *appended* to ``sys.path`` so that ``import ditflow`` finds the library next to this file
without shadowing ComfyUI's own top-level ``nodes`` module. Nothing heavy is imported here.
"""

import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    sys.path.append(_here)

if __package__:  # ComfyUI imports the pack as a package, whatever its folder is called
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    try:  # register models/CogVideo and the embeddings folders with ComfyUI (absent outside ComfyUI)
        from .nodes import paths as _paths

        _paths.register()
    except ImportError:
        pass
else:  # pytest imports this file as a plain module when the checkout's name is no identifier (ComfyUI-DiTFlow)
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

#: Frontend extension (web/ditflow.js): the sampler's 0-or-4k+1 frame widget, Save Embeds' file display.
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
