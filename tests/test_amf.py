# SPDX-License-Identifier: Apache-2.0
"""Claims about ``ditflow.amf`` (DiTFlow Eq. 3, 7, 8), checked against the naive full-matrix ``amf_reference``.

Sizes: the small random case is F=3 latent frames on a 4×5 patch grid (S = 20, n = 60) with 3 heads of 16 dims;
``max_chunk_elements`` = S² or 2·S² forces one or two key frames per chunk (chunks {0},{1},{2} or {0,1},{2}).
"""

from __future__ import annotations

import pytest
import torch
from amf_reference import naive_amf_loss, naive_attention_motion_flow
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ditflow.amf import amf_loss, attention_motion_flow
from ditflow.errors import DiTFlowError

GRID = (3, 4, 5)  # (F, h, w): S = 20, n = 60
HEADS, DIM = 3, 16
S = GRID[1] * GRID[2]
N = GRID[0] * S
#: key frames per chunk 1 (three chunks), 2 (uneven chunks 2 + 1) and all (one chunk).
CHUNKINGS = [S * S, 2 * S * S, 10**9]

#: Displacements are at most max(h, w) − 1 = 4 patches, where the fp32 spacing is 4.8e-7; the streamed and the
#: naive soft AMF add the same terms in different orders ((A·x′) − x vs Σ A·(x′ − x), per-head vs concatenated
#: dot products), so they agree to a few ulp: 2e-6.
VALUE_ATOL = 2e-6
#: The loss gradients here are O(1e-2), where the fp32 spacing is ~1e-9; 1e-7 allows ~100 ulp of reordering and is
#: still 1e5 times smaller than the gradients themselves.
GRAD_ATOL = 1e-7


def _random_qk(seed: int, heads: int = HEADS, n: int = N, dim: int = DIM) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(heads, n, dim, generator=g), torch.randn(heads, n, dim, generator=g)


# ----------------------------------------------------------------------------------------------------------------
# 1. Streamed equals naive
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_chunk_elements", CHUNKINGS)
def test_streamed_hard_amf_equals_naive_exactly(max_chunk_elements):
    q, k = _random_qk(0)
    got = attention_motion_flow(q, k, GRID, hard=True, max_chunk_elements=max_chunk_elements)
    assert got.shape == (GRID[0] ** 2, S, 2) and got.dtype == torch.float32
    assert torch.equal(got, naive_attention_motion_flow(q, k, GRID, hard=True))


@pytest.mark.parametrize("max_chunk_elements", CHUNKINGS)
def test_streamed_soft_amf_and_loss_gradients_equal_naive(max_chunk_elements):
    q, k = _random_qk(1)
    reference = attention_motion_flow(*_random_qk(2), GRID, hard=True)
    q1, k1 = q.clone().requires_grad_(), k.clone().requires_grad_()
    q2, k2 = q.clone().requires_grad_(), k.clone().requires_grad_()

    soft = attention_motion_flow(q1, k1, GRID, temperature=2.0, hard=False, max_chunk_elements=max_chunk_elements)
    soft_naive = naive_attention_motion_flow(q2, k2, GRID, temperature=2.0, hard=False)
    torch.testing.assert_close(soft, soft_naive, rtol=0, atol=VALUE_ATOL)

    amf_loss(reference, soft).backward()
    naive_amf_loss(reference, soft_naive).backward()
    assert q2.grad.abs().max() > 1e-3 and k2.grad.abs().max() > 1e-3  # the comparison below is not vacuous
    torch.testing.assert_close(q1.grad, q2.grad, rtol=0, atol=GRAD_ATOL)
    torch.testing.assert_close(k1.grad, k2.grad, rtol=0, atol=GRAD_ATOL)


def test_bf16_inputs_are_computed_in_fp32_with_grads_in_input_dtype():
    q, k = (t.bfloat16().requires_grad_() for t in _random_qk(3))
    soft = attention_motion_flow(q, k, GRID, hard=False, max_chunk_elements=S * S)
    assert soft.dtype == torch.float32
    # bf16 values are exact in fp32, so the result is the fp32 one on the same numbers.
    q32, k32 = q.detach().float().requires_grad_(), k.detach().float().requires_grad_()
    soft32 = attention_motion_flow(q32, k32, GRID, hard=False)
    torch.testing.assert_close(soft, soft32, rtol=0, atol=VALUE_ATOL)
    soft.square().sum().backward()
    soft32.square().sum().backward()
    for got, want in ((q.grad, q32.grad), (k.grad, k32.grad)):
        assert got.dtype == torch.bfloat16 and got.shape == want.shape
        # bf16 keeps 8 significant bits (unit round-off 2⁻⁸): ∂q is rounded once, ∂k after each of F = 3 additions.
        assert (got.float() - want).abs().max() <= GRID[0] * 2**-8 * want.abs().max()


def test_only_the_inputs_that_need_a_gradient_get_one():
    q, k = _random_qk(12)
    k.requires_grad_()
    attention_motion_flow(q, k, GRID, hard=False, max_chunk_elements=S * S).sum().backward()
    assert q.grad is None and k.grad is not None and k.grad.abs().max() > 0


def test_hard_amf_has_no_grad_and_ignores_temperature():
    q, k = _random_qk(4)
    q.requires_grad_()
    hard = attention_motion_flow(q, k, GRID, hard=True)
    assert not hard.requires_grad
    assert torch.equal(hard, attention_motion_flow(q, k, GRID, temperature=7.0, hard=True))


# ----------------------------------------------------------------------------------------------------------------
# 2–3. Known motion is recovered; soft tends to hard as τ grows
# ----------------------------------------------------------------------------------------------------------------

MOTION_GRID = (4, 6, 7)  # (F, h, w): content moves by up to 3 steps of the shift across 4 frames


def _shifted_video_qk(dx: int, dy: int, heads: int = 2, dim: int = 128, norm: float = 4.0):
    """q = k = per-patch features of a video whose frame f is frame 0's content shifted by (f·dx, f·dy) patches.

    Each patch of a "world" larger than the frame gets its own orthonormal feature (QR of a random matrix), scaled
    so a matching pair has a head-mean logit of norm² / √dim and every other pair 0; frame f at patch (x, y)
    shows world patch (x − f·dx, y − f·dy). Every head carries the same feature.
    Returns q, k [heads, n, dim] and the mask [F, F, S] of query patches whose content is still inside frame j.
    """
    num_frames, h, w = MOTION_GRID
    span = num_frames - 1
    world_h, world_w = h + span * abs(dy), w + span * abs(dx)
    assert world_h * world_w <= dim
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(5)))[0].T
    world = basis[: world_h * world_w].view(world_h, world_w, dim) * norm
    oy, ox = span * max(0, dy), span * max(0, dx)  # world offset so that every index is ≥ 0
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    frames = [world[ys - f * dy + oy, xs - f * dx + ox] for f in range(num_frames)]  # each [h, w, dim]
    feats = torch.stack(frames).reshape(-1, dim)
    q = feats.expand(heads, -1, -1).contiguous()

    i = torch.arange(num_frames)[:, None, None, None]
    j = torch.arange(num_frames)[None, :, None, None]
    x2, y2 = xs + (j - i) * dx, ys + (j - i) * dy  # where query patch (x, y) of frame i is in frame j
    inside = ((x2 >= 0) & (x2 < w) & (y2 >= 0) & (y2 < h)).view(num_frames, num_frames, h * w)
    return q, q.clone(), inside


@pytest.mark.parametrize("dx, dy", [(1, 0), (0, -1), (1, 1), (-2, 1)])
def test_hard_amf_recovers_known_shift(dx, dy):
    q, k, inside = _shifted_video_qk(dx, dy)
    num_frames = MOTION_GRID[0]
    hard = attention_motion_flow(q, k, MOTION_GRID, hard=True, max_chunk_elements=1).view(num_frames, num_frames,
                                                                                            -1, 2)
    steps = (torch.arange(num_frames)[None, :] - torch.arange(num_frames)[:, None]).float()  # j − i
    expected = torch.stack([steps * dx, steps * dy], dim=-1)[:, :, None, :].expand_as(hard)
    assert inside.sum() > 0 and not inside.all()
    assert torch.equal(hard[inside], expected[inside])


def test_soft_amf_approaches_hard_as_temperature_grows():
    q, k, inside = _shifted_video_qk(1, 1)
    hard = attention_motion_flow(q, k, MOTION_GRID, hard=True).view(inside.shape + (2,))
    errors = []
    for tau in (0.5, 2.0, 8.0, 32.0):  # head-mean logits: 16/√128 ≈ 1.41 for the match, 0 otherwise
        soft = attention_motion_flow(q, k, MOTION_GRID, temperature=tau, hard=False).view(hard.shape)
        errors.append((soft - hard)[inside].abs().max().item())
    assert errors == sorted(errors, reverse=True) and errors[0] > 0.5
    assert errors[-1] < 1e-6 * max(MOTION_GRID)


# ----------------------------------------------------------------------------------------------------------------
# 3. The masked loss (Eq. 8) and input checks
# ----------------------------------------------------------------------------------------------------------------


def test_loss_is_zero_when_generated_equals_reference():
    reference = attention_motion_flow(*_random_qk(6), GRID, hard=True)
    assert amf_loss(reference, reference.clone()).item() == 0.0


def test_loss_averages_summed_squared_error_over_moving_entries_only():
    # 2 frames → 4 pairs, 2 patches each. Two moving entries; the zero ones differ from `generated` but count 0.
    reference = torch.zeros(4, 2, 2)
    reference[1, 0] = torch.tensor([1.0, 0.0])
    reference[2, 1] = torch.tensor([0.0, -1.0])
    generated = torch.full((4, 2, 2), 0.5, requires_grad=True)
    loss = amf_loss(reference, generated)
    # ((0.5 − 1)² + 0.5²) + (0.5² + (0.5 + 1)²) = 0.5 + 2.5, over 2 entries.
    assert loss.item() == pytest.approx(1.5)
    loss.backward()
    assert generated.grad[reference.ne(0).any(-1)].ne(0).all()
    assert generated.grad[~reference.ne(0).any(-1)].eq(0).all()


def test_unmasked_loss_averages_over_every_entry():
    """The authors' threshloss=False ablation: static entries and i = j pairs count too, and a still reference is
    then a valid target (every generated displacement is pulled to zero)."""
    reference = torch.zeros(4, 2, 2)
    reference[1, 0] = torch.tensor([1.0, 0.0])
    reference[2, 1] = torch.tensor([0.0, -1.0])
    generated = torch.full((4, 2, 2), 0.5)
    # The two moving entries as above (3.0) plus six static ones at 0.5² + 0.5² = 0.5 each, over 8 entries.
    assert amf_loss(reference, generated, masked=False).item() == pytest.approx((3.0 + 6 * 0.5) / 8)
    assert amf_loss(torch.zeros(9, 20, 2), torch.ones(9, 20, 2), masked=False).item() == 2.0


def test_loss_raises_when_the_reference_does_not_move():
    with pytest.raises(DiTFlowError, match="no motion"):
        amf_loss(torch.zeros(9, 20, 2), torch.ones(9, 20, 2))


def test_loss_raises_on_mismatched_shapes_naming_both():
    with pytest.raises(DiTFlowError, match=r"\[9, 20, 2\].*\[4, 20, 2\]"):
        amf_loss(torch.ones(9, 20, 2), torch.ones(4, 20, 2))


def test_amf_rejects_bad_inputs_naming_the_numbers():
    q, k = _random_qk(7)
    with pytest.raises(DiTFlowError, match=r"60 video tokens.*F·h·w = 48"):
        attention_motion_flow(q, k, (3, 4, 4), hard=True)
    with pytest.raises(DiTFlowError, match=r"\[3, 60, 16\].*\[3, 59, 16\]"):
        attention_motion_flow(q, k[:, :59], GRID, hard=True)
    with pytest.raises(DiTFlowError, match="temperature"):
        attention_motion_flow(q, k, GRID, temperature=0.0, hard=False)


# ----------------------------------------------------------------------------------------------------------------
# 4. Streaming: no [n, n] tensor is ever allocated, forward or backward
# ----------------------------------------------------------------------------------------------------------------


class _LargestAllocation(TorchDispatchMode):
    """Records, per phase, the largest storage (in elements) of any op output and how many ops ran."""

    def __init__(self):
        super().__init__()
        self.phase = "forward"
        self.largest: dict[str, int] = {}
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops[self.phase] = self.ops.get(self.phase, 0) + 1
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):  # storage, not numel: an expand() view allocates nothing
                size = t.untyped_storage().nbytes() // t.element_size()
                self.largest[self.phase] = max(self.largest.get(self.phase, 0), size)
        return out


def _random_displacements(seed: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """A stand-in reference AMF [F², S, 2] of integer displacements in −3..3 (mostly moving)."""
    num_frames, h, w = grid
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 4, (num_frames**2, h * w, 2), generator=g).float()


def _loss_forward_backward(amf, q, k, grid, reference):
    q, k = q.clone().requires_grad_(), k.clone().requires_grad_()
    with _LargestAllocation() as seen:
        loss = amf_loss(reference, amf(q, k, grid, hard=False))
        seen.phase = "backward"
        loss.backward()
    assert q.grad is not None and k.grad is not None
    return seen


def test_naive_amf_allocates_n_squared_so_the_detector_sees_it():
    q, k = _random_qk(8)
    reference = _random_displacements(9, GRID)
    seen = _loss_forward_backward(naive_attention_motion_flow, q, k, GRID, reference)
    assert seen.largest["forward"] >= N * N and seen.largest["backward"] >= N * N


def test_streamed_soft_amf_loss_never_allocates_n_squared():
    # CogVideoX-like frames at a quarter of the 30×45 grid: F=13, 15×22 patches → S = 330, n = 4290; 8 heads × 64.
    grid, heads, dim = (13, 15, 22), 8, 64
    n = grid[0] * grid[1] * grid[2]
    q, k = _random_qk(10, heads, n, dim)
    reference = _random_displacements(11, grid)
    seen = _loss_forward_backward(attention_motion_flow, q, k, grid, reference)
    assert seen.ops["backward"] > 0  # the detector also watched the (recomputing) backward
    assert max(seen.largest.values()) < n * n, seen.largest
    # Default chunk: one query frame against all 13 key frames, [S, n] = 330 × 4290 logits, far below n².
    assert max(seen.largest.values()) <= max(grid[1] * grid[2] * n, heads * n * dim)
