# SPDX-License-Identifier: Apache-2.0
"""Feature losses of the baselines DiTFlow compares against (§5, Table 1), ported to the DiT (method.md §4).

Both act on the **output** hidden states of a guidance block, video tokens only, laid out as features
``[F, C, h, w]`` (tokens ``idx = f·S + y·w + x``, see ``ditflow/__init__``; :func:`video_features` reshapes).
The Attention Motion Flow loss of DiTFlow itself (Eq. 8) lives in :mod:`ditflow.amf`.

- **MOFT** (Xiao et al., "Video Diffusion Models are Training-free Motion Interpreter and Controller",
  arXiv 2405.14864): remove content by centring the features over time, keep the "motion channels" (the 4 % of
  channels with the largest weight in the first principal direction of the reference's centred features) and ask
  the generated centred features to point the same way as the reference's at every position and frame.
- **SMM** (Yatim et al., "Space-Time Diffusion Features for Zero-Shot Text-Driven Motion Transfer", CVPR 2024):
  the spatial marginal mean of each frame, m_f; for every anchor frame a the differences m_f − m_a of the generated
  video must point the same way (cosine over channels) as the reference's.

Differs from the authors' DiT port of SMM (method.md §4): the generated differences are taken against the
**generated** anchor (they subtract the reference's anchor) and the cosine is over **channels** (theirs is over
frames), as the SMM paper defines it. Pairs f = a (two zero vectors) are left out, so a perfect match scores 0.

All functions are pure tensor maths: differentiable in ``generated``, float32 inside whatever the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .errors import DiTFlowError

#: MOFT's share of channels kept as "motion channels" (method.md §4: top 4 %).
MOFT_CHANNEL_FRACTION = 0.04


def video_features(hidden: Tensor, grid: tuple[int, int, int]) -> Tensor:
    """Video-token hidden states ``[N, C]`` or ``[1, N, C]`` → features ``[F, C, h, w]``.

    Args:
        hidden: a block's video output, tokens frame-major then row-major (``idx = f·S + y·w + x``).
        grid: token grid (F, h, w); N must be F·h·w.
    Raises:
        DiTFlowError: if N ≠ F·h·w (the message gives both).
    """
    if hidden.ndim == 3:
        if hidden.shape[0] != 1:
            raise DiTFlowError(f"expected one video's hidden states [1, N, C], got batch {hidden.shape[0]}.")
        hidden = hidden[0]
    frames, h, w = grid
    if hidden.ndim != 2 or hidden.shape[0] != frames * h * w:
        raise DiTFlowError(
            f"hidden states {list(hidden.shape)} do not hold F·h·w = {frames}·{h}·{w} = {frames * h * w} tokens."
        )
    return rearrange(hidden, "(f y x) c -> f c y x", f=frames, y=h, x=w)


def _check_pair(generated: Tensor, reference: Tensor, what: str) -> None:
    if generated.ndim != 4 or generated.shape != reference.shape:
        raise DiTFlowError(
            f"{what} needs generated and reference features of one shape [F, C, h, w]; got "
            f"{list(generated.shape)} and {list(reference.shape)}."
        )
    if generated.shape[0] < 2:
        raise DiTFlowError(f"{what} compares frames with each other: it needs at least 2 latent frames (5 video frames).")


# ---------------------------------------------------------------------------------------------------------------------
# MOFT
# ---------------------------------------------------------------------------------------------------------------------


def centre_over_time(features: Tensor) -> Tensor:
    """``[F, C, h, w]`` minus its mean over frames (MOFT's content-correlation removal)."""
    return features - features.mean(dim=0, keepdim=True)


def moft_channels(reference: Tensor, fraction: float = MOFT_CHANNEL_FRACTION) -> Tensor:
    """MOFT's motion channels: indices of the top ``fraction`` of channels by |first right-singular vector|.

    The matrix is the reference's time-centred features with one row per (frame, position) and one column per
    channel, ``[F·h·w, C]``; its first right-singular vector is the top eigenvector of the ``[C, C]`` Gram matrix
    (computed that way, in float64: C×C instead of an SVD of the tall matrix).

    Args:
        reference: ``[F, C, h, w]`` reference features (not yet centred).
        fraction: share of channels kept: ``max(2, round(fraction · C))`` (123 of 3072 on the real models). At
            least two, because a cosine along a single channel is a sign and has no gradient (tiny models).
    Returns:
        ``[k]`` long channel indices, sorted ascending.
    """
    if not 0.0 < fraction <= 1.0:
        raise DiTFlowError(f"MOFT channel fraction must be in (0, 1], got {fraction}.")
    x = centre_over_time(reference.detach().double())
    x = rearrange(x, "f c h w -> (f h w) c")
    _, vectors = torch.linalg.eigh(x.T @ x)  # ascending eigenvalues: the last column is the first singular vector
    k = min(x.shape[1], max(2, round(fraction * x.shape[1])))
    return vectors[:, -1].abs().topk(k).indices.sort().values.to(reference.device)


def moft_loss(
    generated: Tensor, reference: Tensor, channels: Tensor | None = None, *, fraction: float = MOFT_CHANNEL_FRACTION
) -> Tensor:
    """MOFT loss: 1 − mean cosine between time-centred generated and reference features on the motion channels.

    The cosine is taken along the chosen channels at each (frame, y, x), averaged over positions, then over frames.

    Args:
        generated: ``[F, C, h, w]`` features of the current pass (the gradient flows through these).
        reference: ``[F, C, h, w]`` reference features (no gradient).
        channels: motion channels from :func:`moft_channels` (computed from ``reference`` when ``None``; pass them
            to compute them once per run).
        fraction: see :func:`moft_channels`.
    Returns:
        Scalar in [0, 2]; 0 when the centred motion channels point the same way everywhere.
    Raises:
        DiTFlowError: on mismatched shapes or a single frame.
    """
    _check_pair(generated, reference, "the MOFT loss")
    if channels is None:
        channels = moft_channels(reference, fraction)
    gen = centre_over_time(generated.float())[:, channels]
    ref = centre_over_time(reference.detach().float())[:, channels]
    cos = F.cosine_similarity(gen, ref, dim=1)  # [F, h, w]; 0 where either vector is zero
    return 1.0 - cos.mean(dim=(1, 2)).mean()


# ---------------------------------------------------------------------------------------------------------------------
# SMM
# ---------------------------------------------------------------------------------------------------------------------


def spatial_marginal_mean(features: Tensor) -> Tensor:
    """SMM's spatial marginal mean: ``[F, C, h, w]`` → ``[F, C]``, the mean over positions of each frame."""
    return features.mean(dim=(2, 3))


def smm_loss(generated: Tensor, reference: Tensor) -> Tensor:
    """SMM loss (Yatim et al. 2024): mean over anchors a and frames f ≠ a of 1 − cos_C(Δ_gen[a, f], Δ_ref[a, f]).

    With m the spatial marginal means, Δ[a, f] = m_f − m_a, each video against **its own** anchor; the cosine is over
    channels. Invariant to a per-channel offset and to a positive scale of either video's means.

    Args:
        generated: ``[F, C, h, w]`` features of the current pass (the gradient flows through these).
        reference: ``[F, C, h, w]`` reference features (no gradient).
    Returns:
        Scalar in [0, 2]; 0 when every frame-to-frame change of the means points the same way.
    Raises:
        DiTFlowError: on mismatched shapes or a single frame.
    """
    _check_pair(generated, reference, "the SMM loss")
    m_gen = spatial_marginal_mean(generated.float())
    m_ref = spatial_marginal_mean(reference.detach().float())
    d_gen = m_gen[None, :] - m_gen[:, None]  # [a, f, C]: m_f − m_a
    d_ref = m_ref[None, :] - m_ref[:, None]
    cos = F.cosine_similarity(d_gen, d_ref, dim=-1)  # [F, F]
    off_diagonal = ~torch.eye(cos.shape[0], dtype=torch.bool, device=cos.device)
    return 1.0 - cos[off_diagonal].mean()


__all__ = [
    "MOFT_CHANNEL_FRACTION",
    "centre_over_time",
    "moft_channels",
    "moft_loss",
    "smm_loss",
    "spatial_marginal_mean",
    "video_features",
]
