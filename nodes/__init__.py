# SPDX-License-Identifier: Apache-2.0
"""DiTFlow ComfyUI nodes: thin callers of the ``ditflow`` library (unpack → one library call → pack).

Importing this package imports neither diffusers nor transformers nor ComfyUI's model management; the node
functions import what they need when they run.
"""

from .embeds_nodes import DiTFlowLoadEmbeds, DiTFlowSaveEmbeds
from .metrics_nodes import DiTFlowMotionFidelity
from .model_nodes import DiTFlowDecode, DiTFlowLoadCogVideoX, DiTFlowTextEncode
from .motion_nodes import DiTFlowEncodeReference, DiTFlowExtractAMF, DiTFlowVisualizeAMF
from .poke_nodes import (DiTFlowFPTEmbedImage, DiTFlowFPTMotionDensity, DiTFlowFPTPredictFlow, DiTFlowLoadFPT,
                         DiTFlowPokeMotionTarget, DiTFlowPokes)
from .sampler_node import DiTFlowGuidedSampler

NODE_CLASS_MAPPINGS = {
    "DiTFlowLoadCogVideoX": DiTFlowLoadCogVideoX,
    "DiTFlowTextEncode": DiTFlowTextEncode,
    "DiTFlowEncodeReference": DiTFlowEncodeReference,
    "DiTFlowExtractAMF": DiTFlowExtractAMF,
    "DiTFlowGuidedSampler": DiTFlowGuidedSampler,
    "DiTFlowDecode": DiTFlowDecode,
    "DiTFlowSaveEmbeds": DiTFlowSaveEmbeds,
    "DiTFlowLoadEmbeds": DiTFlowLoadEmbeds,
    "DiTFlowVisualizeAMF": DiTFlowVisualizeAMF,
    "DiTFlowMotionFidelity": DiTFlowMotionFidelity,
    "DiTFlowLoadFPT": DiTFlowLoadFPT,
    "DiTFlowFPTEmbedImage": DiTFlowFPTEmbedImage,
    "DiTFlowPokes": DiTFlowPokes,
    "DiTFlowFPTPredictFlow": DiTFlowFPTPredictFlow,
    "DiTFlowFPTMotionDensity": DiTFlowFPTMotionDensity,
    "DiTFlowPokeMotionTarget": DiTFlowPokeMotionTarget,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "DiTFlowLoadCogVideoX": "DiTFlow Load CogVideoX",
    "DiTFlowTextEncode": "CogVideoX Text Encode (DiTFlow)",
    "DiTFlowEncodeReference": "DiTFlow Encode Reference",
    "DiTFlowExtractAMF": "DiTFlow Extract AMF",
    "DiTFlowGuidedSampler": "DiTFlow Guided Sampler",
    "DiTFlowDecode": "CogVideoX Decode (DiTFlow)",
    "DiTFlowSaveEmbeds": "DiTFlow Save Embeds",
    "DiTFlowLoadEmbeds": "DiTFlow Load Embeds",
    "DiTFlowVisualizeAMF": "DiTFlow Visualize AMF",
    "DiTFlowMotionFidelity": "DiTFlow Motion Fidelity",
    "DiTFlowLoadFPT": "Load FPT (Flow Poke Transformer)",
    "DiTFlowFPTEmbedImage": "FPT Embed Image",
    "DiTFlowPokes": "FPT Pokes",
    "DiTFlowFPTPredictFlow": "FPT Predict Flow",
    "DiTFlowFPTMotionDensity": "FPT Motion Density",
    "DiTFlowPokeMotionTarget": "DiTFlow Motion Target from Flow",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
