# SPDX-License-Identifier: Apache-2.0
"""Motion Fidelity, the flow tracker, CLIP score plumbing and the MF plot (ditflow.metrics, ditflow.tracking).

Synthetic clips: 9 frames of 64×64 px. A 24×24 px smooth-noise textured square on black moves (2, 1) px/frame
(16 px right and 8 px down by frame 8); a "pan" is a 64×64 window sliding over a larger smooth-noise texture,
so the whole frame translates 2 px/frame. Most tests use an 11×11 grid (121 tracks) to stay fast; one uses the
paper's 55×55. No tracker weights exist here, so every number comes from the "flow" tracker.
"""

from __future__ import annotations

import json
import string

import cv2
import numpy as np
import pytest
import torch

from ditflow.errors import DiTFlowError
from ditflow.metrics import (
    clip_frame_scores,
    clip_score,
    load_clip,
    motion_fidelity,
    motion_fidelity_from_tracks,
    plot_motion_fidelity,
)
from ditflow.tracking import query_grid, track_flow, track_points

FRAMES, SIZE, SIDE = 9, 64, 24
GRID = 11


def _ours(ref, gen):
    return motion_fidelity_from_tracks(ref, gen, variant="ours")


@pytest.fixture(autouse=True)
def no_cotracker_cache(tmp_path, monkeypatch):
    """Points torch.hub at an empty folder, so CoTracker is never found and nothing can be fetched."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))


def _texture(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth noise in [-1, 1] (σ = 1.5 px blur: trackable by optical flow)."""
    r = cv2.GaussianBlur(np.random.default_rng(seed).random((h, w)).astype(np.float32), (0, 0), 1.5)
    return (r - r.min()) / (r.max() - r.min()) * 2 - 1


def square_clip(start=(12, 16), velocity=(2, 1), background=None) -> torch.Tensor:
    """[9, 3, 64, 64]: the textured square with top-left ``start`` (x, y) moving ``velocity`` px/frame."""
    tex, out = _texture(SIDE, SIDE, 1), []
    for t in range(FRAMES):
        frame = np.full((SIZE, SIZE), -1.0, np.float32) if background is None else background.copy()
        x0, y0 = start[0] + velocity[0] * t, start[1] + velocity[1] * t
        frame[y0 : y0 + SIDE, x0 : x0 + SIDE] = tex
        out.append(np.repeat(frame[None], 3, 0))
    return torch.from_numpy(np.stack(out))


def pan_clip(velocity: int) -> torch.Tensor:
    """[9, 3, 64, 64]: the whole frame translating ``velocity`` px/frame along x (content moves right if > 0)."""
    margin = 2 * FRAMES + 20
    big = _texture(SIZE + 40, SIZE + 2 * margin, 2)
    frames = [big[20 : 20 + SIZE, margin - velocity * t : margin - velocity * t + SIZE] for t in range(FRAMES)]
    return torch.from_numpy(np.stack([np.repeat(f[None], 3, 0) for f in frames]))


# --- Motion Fidelity from tracks: the zero-vector rule and the chunked matmul -----------------------------------


def test_zero_steps_have_cosine_zero_with_anything():
    # One track each, so the claim is about S itself: the formula without the official own-point subtraction.
    still = torch.zeros(3, 1, 2)  # 3 frames, 1 track, never moves
    right = torch.tensor([[[0.0, 0.0]], [[1.0, 0.0]], [[2.0, 0.0]]])
    left = -right
    assert _ours(still, still)[0] == 0.0  # two still tracks: 0, not 1 and not NaN
    assert _ours(right, still)[0] == 0.0
    assert _ours(still, right)[0] == 0.0
    assert _ours(right, right)[0] == pytest.approx(1.0)
    assert _ours(right, left)[0] == pytest.approx(-1.0)
    # A track that stops halfway earns credit for its moving steps only: (1 + 0) / 2.
    halfway = torch.tensor([[[0.0, 0.0]], [[1.0, 0.0]], [[1.0, 0.0]]])
    assert _ours(right, halfway)[0] == pytest.approx(0.5)


def test_frozen_output_is_not_rewarded_by_a_still_reference_track():
    # Reference: one track moving right, one never moving. A frozen generated video used to match the still track
    # perfectly (MF 1); now it scores 0, below a generated video that moves like the reference.
    moving = torch.arange(5.0)[:, None, None] * torch.tensor([1.0, 0.0])
    ref = torch.cat([moving, torch.zeros(5, 1, 2)], dim=1)
    frozen = torch.zeros(5, 2, 2)
    assert _ours(ref, frozen)[0] == 0.0
    assert _ours(ref, moving.repeat(1, 2, 1))[0] == pytest.approx(1.0)


def test_chunked_similarity_equals_dense_cosines():
    gen, ref = torch.randn(6, 50, 2).cumsum(0), torch.randn(6, 40, 2).cumsum(0)
    score, sim = motion_fidelity_from_tracks(ref, gen, return_similarity=True, chunk=7, variant="ours")
    dg, dr = gen.diff(dim=0), ref.diff(dim=0)  # no zero steps in random walks, so plain cosines apply
    dense = torch.nn.functional.cosine_similarity(dg[:, :, None], dr[:, None, :], dim=-1).mean(0)  # [50, 40]
    assert sim.shape == (50, 40)
    torch.testing.assert_close(sim, dense, atol=1e-5, rtol=0)  # float32 matmul vs float32 cosines
    assert score == pytest.approx(dense.max(dim=1).values.mean().item(), abs=1e-5)


def test_chunked_official_and_symmetric_equal_their_dense_formulas():
    gen, ref = torch.randn(6, 40, 2).cumsum(0), torch.randn(8, 40, 2).cumsum(0)  # 8 reference frames: cut to 6
    dg, dr = gen.diff(dim=0), ref[:6].diff(dim=0)
    dense = torch.nn.functional.cosine_similarity(dg[:, :, None], dr[:, None, :], dim=-1).mean(0)  # [40, 40]
    official = (dense - torch.eye(40)).max(dim=1).values.mean()
    symmetric = (dense.max(dim=1).values.mean() + dense.max(dim=0).values.mean()) / 2
    assert motion_fidelity_from_tracks(ref, gen, chunk=7)[0] == pytest.approx(official.item(), abs=1e-5)
    assert motion_fidelity_from_tracks(ref, gen, chunk=7, variant="symmetric")[0] == pytest.approx(symmetric.item(),
                                                                                                   abs=1e-5)


def _tracks(*steps_per_track) -> torch.Tensor:
    """Tracks ``[T, P, 2]`` from each track's list of (dx, dy) steps, all starting at the origin."""
    steps = torch.tensor(steps_per_track, dtype=torch.float32).transpose(0, 1)  # [T-1, P, 2]
    return torch.cat([torch.zeros(1, *steps.shape[1:]), steps.cumsum(0)])


R, L, D = (1.0, 0.0), (-1.0, 0.0), (0.0, 1.0)  # one pixel right, left, down


@pytest.mark.parametrize("variant,expected", [("official", 1 / 2), ("symmetric", 3 / 4), ("ours", 2 / 3)])
def test_motion_fidelity_formulas_on_constructed_tracks(variant, expected):
    """Three reference and three generated tracks with hand-computed S (rows: generated; columns: reference):

        reference: r0 = right, right;  r1 = down, down;  r2 = right, down
        generated: g0 = right, right;  g1 = right, down;  g2 = left, left
        S = [[ 1,  0,  1/2],      row max (ours): 1, 1, 0            → 2/3
             [1/2, 1/2, 1  ],     S − I row max (official): 1/2, 1, 0 → 1/2
             [-1,  0, -1/2]]      column max: 1, 1/2, 1 → 5/6; symmetric (2/3 + 5/6)/2 = 3/4
    """
    ref = _tracks([R, R], [D, D], [R, D])
    gen = _tracks([R, R], [R, D], [L, L])
    score, sim = motion_fidelity_from_tracks(ref, gen, variant=variant, return_similarity=True)
    torch.testing.assert_close(sim, torch.tensor([[1, 0, 0.5], [0.5, 0.5, 1], [-1, 0, -0.5]]))
    assert score == pytest.approx(expected)


def test_official_formula_cuts_to_the_first_common_frames_and_needs_one_grid():
    ref = torch.cat([_tracks([R, R], [D, D], [R, D]), torch.tensor([[[9.0, 9.0]] * 3])])  # one more, odd frame
    gen = _tracks([R, R], [R, D], [L, L])
    assert motion_fidelity_from_tracks(ref, gen)[0] == pytest.approx(1 / 2)  # the extra frame is not used
    with pytest.raises(DiTFlowError, match="same points"):
        motion_fidelity_from_tracks(ref[:, :2], gen)
    with pytest.raises(DiTFlowError, match="one frame count"):
        motion_fidelity_from_tracks(ref, gen, variant="ours")


# --- Tracker ------------------------------------------------------------------------------------------------------


def test_flow_tracker_follows_moving_square_within_one_pixel():
    centre = torch.tensor([[12 + (SIDE - 1) / 2, 16 + (SIDE - 1) / 2]])  # pixel centres at integers
    tracks = track_flow(square_clip(), centre)
    expected = centre[0] + torch.arange(FRAMES)[:, None] * torch.tensor([2.0, 1.0])
    assert tracks.shape == (FRAMES, 1, 2)
    assert (tracks[:, 0] - expected).norm(dim=-1).max() < 1.0


def test_track_points_reports_flow_without_cotracker_cache():
    tracks, name = track_points(square_clip(), grid_size=GRID)
    assert name == "flow"
    assert tracks.shape == (FRAMES, GRID * GRID, 2)
    torch.testing.assert_close(tracks[0], query_grid(SIZE, SIZE, GRID))


def test_cotracker_missing_is_an_error_when_asked_for(tmp_path):
    with pytest.raises(DiTFlowError, match="CoTracker3 is not available"):
        track_points(square_clip(), grid_size=GRID, tracker="cotracker")
    with pytest.raises(DiTFlowError, match="does not exist"):
        track_points(square_clip(), grid_size=GRID, tracker="cotracker", cotracker_checkpoint=tmp_path / "no.pth")
    # "auto" falls back to flow and says so.
    assert track_points(square_clip(), GRID, "auto", cotracker_checkpoint=tmp_path / "no.pth")[1] == "flow"
    with pytest.raises(DiTFlowError, match="Unknown tracker"):
        track_points(square_clip(), grid_size=GRID, tracker="raft")


@pytest.fixture
def fake_cotracker(tmp_path):
    """A CoTracker 'hub cache' whose hubconf records that it ran, and a checkpoint file beside it."""
    repo = tmp_path / "hub" / "facebookresearch_co-tracker_main"
    repo.mkdir(parents=True)
    (repo / "hubconf.py").write_text("def cotracker3_offline(**kwargs):\n    raise RuntimeError('hubconf ran')\n")
    checkpoint = tmp_path / "scaled_offline.pth"
    checkpoint.write_bytes(b"a pickle we must not open on an unsafe torch")
    return checkpoint


def test_cotracker_is_refused_on_a_torch_with_cve_2025_32434(fake_cotracker, monkeypatch):
    with pytest.raises(RuntimeError, match="hubconf ran"):  # torch 2.13: CoTracker is found and loading starts
        track_points(square_clip(), GRID, "cotracker", cotracker_checkpoint=fake_cotracker)
    monkeypatch.setattr(torch, "__version__", "2.5.1+cu121")
    with pytest.raises(DiTFlowError, match=r"CVE-2025-32434.*torch ≥ 2\.6 or use tracker 'flow'"):
        track_points(square_clip(), GRID, "cotracker", cotracker_checkpoint=fake_cotracker)
    assert track_points(square_clip(), GRID, "auto", cotracker_checkpoint=fake_cotracker)[1] == "flow"


def test_query_grid_is_evenly_spaced_cell_centres():
    grid = query_grid(64, 32, 4)  # cells of 8×16 px → centres at 3.5, 11.5, ... (x) and 7.5, 23.5, ... (y)
    assert grid.shape == (16, 2)
    torch.testing.assert_close(grid[:4, 0], torch.tensor([3.5, 11.5, 19.5, 27.5]))
    torch.testing.assert_close(grid[::4, 1], torch.tensor([7.5, 23.5, 39.5, 55.5]))


# --- Motion Fidelity on videos ----------------------------------------------------------------------------------


def test_identical_videos_score_one_at_paper_grid():
    result = motion_fidelity(square_clip(), square_clip())  # default 55×55 = 3025 tracks
    assert result.score >= 0.99
    assert result.tracker == "flow"
    assert result.tracks_ref.shape == (FRAMES, 3025, 2)


def test_mirrored_square_motion_scores_low():
    ref = square_clip()
    same = motion_fidelity(ref, ref, grid_size=GRID).score
    mirrored = motion_fidelity(ref, ref.flip(-1), grid_size=GRID).score  # square moves left instead of right
    assert same >= 0.99
    assert mirrored < 0.5


def test_opposite_pans_score_low():
    score = motion_fidelity(pan_clip(2), pan_clip(-2), grid_size=GRID).score
    assert score < -0.9  # every step points the other way; points leaving the frame keep moving (not clamped)


def test_static_videos_score_zero_and_never_nan():
    still_a = pan_clip(0)
    still_b = square_clip(velocity=(0, 0))
    for ref, gen in ((still_a, still_a), (still_a, still_b)):
        result = motion_fidelity(ref, gen, grid_size=GRID, return_similarity=True)
        assert result.score == pytest.approx(0.0)
        assert torch.isfinite(result.similarity).all()
    # A frozen video against a pan or the moving square: nothing to match, cosine 0 everywhere.
    assert motion_fidelity(pan_clip(2), still_a, grid_size=GRID).score == pytest.approx(0.0)
    assert motion_fidelity(square_clip(), still_b, grid_size=GRID).score == pytest.approx(0.0)


def test_different_frame_counts_and_sizes_are_resampled():
    ref = square_clip()  # 9 frames, 64×64
    gen = torch.nn.functional.interpolate(pan_clip(2).repeat(2, 1, 1, 1)[:13], size=(48, 80), mode="bilinear")
    result = motion_fidelity(ref, gen, grid_size=GRID)  # → 9 frames at the reference's 64×64
    assert result.size == (SIZE, SIZE)
    assert result.tracks_gen.shape == (FRAMES, GRID * GRID, 2)
    assert np.isfinite(result.score) and -1.0 <= result.score <= 1.0
    assert motion_fidelity(ref, gen, grid_size=GRID, size=(32, 48)).tracks_ref.shape == (FRAMES, GRID * GRID, 2)


def test_time_reversed_real_clip_scores_below_zero(bmx_path):
    capture, frames = cv2.VideoCapture(str(bmx_path)), []
    while (read := capture.read())[0]:
        frames.append(cv2.cvtColor(read[1], cv2.COLOR_BGR2RGB))
    clip = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1  # [24, 3, 480, 720]
    size = (120, 180)  # working size ¼ of 480×720 keeps this under a second; 55×55 grid as in the paper
    assert motion_fidelity(clip, clip, size=size).score >= 0.99
    assert motion_fidelity(clip, clip.flip(0), size=size).score < 0.0  # measured −0.57 (−0.22 at full size)


def test_bad_frames_raise_ditflow_error():
    with pytest.raises(DiTFlowError, match="at least 2"):
        motion_fidelity(square_clip()[:1], square_clip(), grid_size=GRID)
    with pytest.raises(DiTFlowError, match=r"\[F, 3, H, W\]"):
        motion_fidelity(square_clip()[:, :1], square_clip(), grid_size=GRID)


def test_plot_draws_an_rgb_image():
    ref, gen = square_clip(), square_clip().flip(-1)
    result = motion_fidelity(ref, gen, grid_size=GRID)
    image = plot_motion_fidelity(ref, gen, result.tracks_ref, result.tracks_gen, result.score, tracker=result.tracker)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert min(image.shape[:2]) >= 256  # 64 px frames are upscaled ×4 for legibility


# --- CLIP score (IQ) plumbing on a tiny random CLIP ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """Random-init CLIP: 32-wide, 2-layer towers, 32×32 px images in 8 px patches; a 54-token letter vocabulary."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

    try:  # transformers 5 without torchvision: the PIL backend, named explicitly to skip a fallback warning
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # pragma: no cover - older transformers
        from transformers import CLIPImageProcessor as ImageProcessor

    folder = tmp_path_factory.mktemp("tiny_clip")
    letters = string.ascii_lowercase
    vocab = {t: i for i, t in enumerate([*letters, *(c + "</w>" for c in letters), "<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")  # no merges: every letter is its own token
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    images = ImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    tower = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    eos = vocab["<|endoftext|>"]
    config = CLIPConfig(
        text_config={
            **tower,
            "vocab_size": len(vocab),
            "max_position_embeddings": 77,
            "eos_token_id": eos,
            "bos_token_id": eos - 1,
            "pad_token_id": eos,
        },
        vision_config={**tower, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    return CLIPModel(config).eval(), CLIPProcessor(image_processor=images, tokenizer=tokenizer)


def test_clip_score_is_a_per_frame_cosine_mean(tiny_clip):
    model, processor = tiny_clip
    frames = torch.rand(5, 3, 40, 48) * 2 - 1
    per_frame = clip_frame_scores(frames, "a cat on a mat", model=model, processor=processor)
    assert per_frame.shape == (5,)
    assert torch.isfinite(per_frame).all() and per_frame.abs().max() <= 1.0
    score = clip_score(frames, "a cat on a mat", model=model, processor=processor)
    assert score == pytest.approx(per_frame.mean().item(), abs=1e-6)


def test_clip_weights_as_a_pickle_are_refused_unread(tiny_clip, tmp_path, monkeypatch):
    model, processor = tiny_clip
    folder = tmp_path / "clip"
    processor.save_pretrained(folder)
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # no model.safetensors
    opened = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: opened.append(a[0]) or real_load(*a, **k))
    with pytest.raises(DiTFlowError, match="no .safetensors weights.*never read"):
        load_clip(folder)
    assert opened == []
    model.save_pretrained(folder)  # the same weights as safetensors load
    assert isinstance(load_clip(folder)[0], type(model))


def test_clip_without_weights_says_how_to_provide_them(tmp_path):
    with pytest.raises(DiTFlowError, match="does not exist"):
        load_clip(tmp_path / "missing")
    with pytest.raises(DiTFlowError, match="no .safetensors weights"):
        load_clip(tmp_path)  # a folder without weights
