# SPDX-License-Identifier: Apache-2.0
"""The one exception type users see.

Every check on user input (files, sizes, frame counts, blocks, embeddings) raises :class:`DiTFlowError` with a
single sentence that says what was wrong and what to do. The CLI prints it without a traceback and the ComfyUI
nodes let it reach the UI as is. It subclasses ``ValueError`` so callers that catch that keep working.
"""


class DiTFlowError(ValueError):
    """Bad input or an unsupported model, explained in one sentence."""
