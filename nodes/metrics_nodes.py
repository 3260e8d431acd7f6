# SPDX-License-Identifier: Apache-2.0
"""DiTFlow Motion Fidelity: the evaluation metric of DiTFlow §5.1 (SMM's MF) on two IMAGE batches (ditflow.metrics)."""

from __future__ import annotations

from . import paths

#: The checkpoint choice that means "the torch.hub checkpoint cache" (CoTracker's own download location).
HUB_CACHE = "(torch.hub cache)"


class DiTFlowMotionFidelity:
    CATEGORY = "DiTFlow/evaluation"
    FUNCTION = "measure"
    RETURN_TYPES = ("FLOAT", "IMAGE")
    RETURN_NAMES = ("motion_fidelity", "plot")
    OUTPUT_TOOLTIPS = (
        ("MF in [-1, 1]: mean over generated tracks of the best mean step-direction cosine with a reference track "
         "(1 = the same motion; a frozen video scores 0)."),
        ("Both videos' tracks over the first reference frame, the score and the tracker; the generated first frame "
         "is inset top right."),
    )
    DESCRIPTION = "Measures how closely a generated video's motion follows a reference video (Motion Fidelity, §5.1)."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "reference": ("IMAGE", {"tooltip": "Reference video frames (e.g. the frames output of DiTFlow Encode "
                              "Reference). Its size is the working size; the generated video is resized to it."}),
                "generated": ("IMAGE", {"tooltip": "Generated video frames (CogVideoX Decode). Frame counts may "
                              "differ: the shorter count is used (first frames; resampled for variant 'ours')."}),
                "grid_size": ("INT", {"default": 55, "min": 2, "max": 200, "tooltip": "Tracked first-frame points per "
                              "side (paper: 55 → 3025 tracks)."}),
                "tracker": (["auto", "flow", "cotracker"], {"default": "auto", "tooltip": "cotracker: CoTracker3 "
                            "offline, the paper's, only from the local torch.hub cache (never downloaded); flow: "
                            "weight-free optical flow, not comparable with the paper's numbers; auto: cotracker when "
                            "on disk, else flow. The plot names the one used."}),
            },
            "optional": {
                "cotracker_checkpoint": ([HUB_CACHE, *paths.cotracker_files()], {
                    "default": HUB_CACHE, "tooltip": "CoTracker3's scaled_offline.pth from models/cotracker/ "
                    "(refresh after adding it), or the torch.hub checkpoint cache."}),
                "variant": (["official", "symmetric", "ours"], {"default": "official", "tooltip": "official: the "
                            "SMM/DiTFlow evaluation code (comparable with the paper's Table 1: a track may not be "
                            "matched by its own grid point, first frames of each video); symmetric: the SMM paper's "
                            "both-ways mean; ours: generated → reference on resampled frames."}),
            },
        }

    def measure(self, reference, generated, grid_size, tracker, cotracker_checkpoint=HUB_CACHE, variant="official"):
        import torch

        from ditflow.layout import image_to_frames
        from ditflow.metrics import motion_fidelity, plot_motion_fidelity

        checkpoint = None if cotracker_checkpoint == HUB_CACHE else paths.cotracker_path(cotracker_checkpoint)
        ref, gen = image_to_frames(reference), image_to_frames(generated)
        result = motion_fidelity(ref, gen, grid_size=grid_size, tracker=tracker, cotracker_checkpoint=checkpoint,
                                 variant=variant)
        plot = plot_motion_fidelity(ref, gen, result.tracks_ref, result.tracks_gen, result.score,
                                    tracker=result.tracker, size=result.size)
        return (result.score, torch.from_numpy(plot).float().div(255.0)[None])
