# SPDX-License-Identifier: Apache-2.0
"""Pixel-level FPT predictions: pokes as text, the square view, flow fields, motion density and their pictures.

Coordinate conventions are tested exactly with a constructed stand-in for the network (:class:`NearestPokeModel`:
every query near a poke moves with that poke's flow, with a 1e-3-wide Gaussian), so a poke must move the poked
pixel by exactly its drag, in (dx, dy) order, for padded and cropped non-square images. That the network itself
reads positions and flows as the authors' does is ``test_fpt_parity.py``; the same functions on the tiny random
network are at the end. Image: 90×60 px (pad: a 90-px square, offset (0, 15); crop: the centre 60-px square,
offset (−15, 0)).
"""

from __future__ import annotations

import pytest
import torch

from ditflow import DiTFlowError
from ditflow.fpt import fields, render
from ditflow.fpt.mixture import FlowMixture
from ditflow.fpt.pokes import Pokes, parse_pokes
from ditflow.fpt.view import SquareView

W, H = 90, 60


class NearestPokeModel:
    """Queries within ``radius`` (model units) of a poke move with the nearest poke's flow; others stay."""

    device = torch.device("cpu")

    def __init__(self, radius: float = 0.1):
        self.radius = radius
        self.calls = []

    def embed_image(self, image):
        self.image = image
        return torch.zeros(image.shape[0], 1, 1, 1)

    def predict_parallel(self, poke_pos, poke_flow, query_pos, features, camera_static=True, callback=None):
        self.calls.append((poke_pos, poke_flow, query_pos))
        b, q, _ = query_pos.shape
        flow = torch.zeros(b, q, 2)
        if poke_pos.shape[1]:
            d = torch.cdist(query_pos, poke_pos)
            nearest = d.argmin(-1)
            picked = torch.gather(poke_flow, 1, nearest[..., None].expand(b, q, 2))
            flow = torch.where((d.min(-1).values < self.radius)[..., None], picked, flow)
        tril = torch.eye(2, dtype=torch.float64).expand(b, q, 1, 2, 2) * 1e-3
        return FlowMixture(torch.zeros(b, q, 1, dtype=torch.float64), flow.double()[:, :, None], tril)


@pytest.fixture
def image():
    return torch.rand(2, H, W, 3, generator=torch.Generator().manual_seed(0))


# -- pokes as text ---------------------------------------------------------------------------------------------------


def test_pokes_parse_with_any_separators():
    pokes = parse_pokes(" 10,20,30,25;\n40 50 40 70 ;; ")
    assert pokes.start == ((10, 20), (40, 50)) and pokes.end == ((30, 25), (40, 70))
    start, flow = pokes.tensors()
    assert flow.tolist() == [[20, 5], [0, 20]]
    assert parse_pokes(pokes.text()) == pokes
    assert len(parse_pokes("")) == 0 and len(parse_pokes("  \n ")) == 0


def test_bad_pokes_get_one_sentence_each():
    with pytest.raises(DiTFlowError) as err:
        parse_pokes("10,20,30; 1,2,x,4; 5,6,nan,8; -3,4,5,6; 1,2,3,4")
    assert str(err.value) == (
        "Poke 1 ('10,20,30') has 3 numbers, not 4: write x0,y0,x1,y1 (start and end in pixels). "
        "Poke 2 ('1,2,x,4') has 'x', which is not a number. "
        "Poke 3 ('5,6,nan,8') has a value that is not a finite number. "
        "Poke 4 starts at (-3, 4); start coordinates are pixels from the image's top-left corner and cannot be "
        "negative.")


def test_pokes_outside_what_the_model_sees_are_refused():
    pokes = parse_pokes("95,10,90,10; 10,10,20,10")
    with pytest.raises(DiTFlowError, match=r"^Poke 1 starts at \(95, 10\), outside the 90×60 px image\.$"):
        pokes.check_view(SquareView(W, H, "pad"))
    with pytest.raises(DiTFlowError, match=r"Poke 1 .* outside the centre square the model sees \(x 15\.\.75.*"
                                           r"Poke 2 starts at \(10, 10\)"):
        pokes.check_view(SquareView(W, H, "crop"))


# -- the square view --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fit, side, offset", [("pad", 90, (0, 15)), ("crop", 60, (-15, 0))])
def test_a_pixel_lands_where_its_model_position_says(fit, side, offset):
    """A single white pixel at column 40, row 20: in the model's input it is at column 40 + ox, row 20 + oy, and
    its centre (40.5, 20.5) px maps to ((40 + ox + 0.5)/side, (20 + oy + 0.5)/side)."""
    view = SquareView(W, H, fit)
    assert (view.side, view.offset) == (side, offset)
    image = torch.zeros(1, H, W, 3)
    image[0, 20, 40] = 1.0
    square = view.image_to_model(image)
    assert square.shape == (1, 3, side, side)
    row, col = divmod(int(square[0, 0].argmax()), side)
    assert (col, row) == (40 + offset[0], 20 + offset[1])
    pos = view.to_model(torch.tensor([40.5, 20.5]))
    assert pos.tolist() == pytest.approx([(col + 0.5) / side, (row + 0.5) / side])
    assert view.to_pixels(pos).tolist() == pytest.approx([40.5, 20.5])
    if fit == "pad":
        assert square[0, :, 0, 0].tolist() == [-1, -1, -1]  # black bars


def test_query_grid_covers_the_visible_image_at_cell_centres():
    view = SquareView(W, H, "pad")
    pos, (rows, cols) = view.query_grid(9)
    assert (rows, cols) == (6, 9)
    pixels = view.to_pixels(pos).reshape(rows, cols, 2)
    assert pixels[0, 0].tolist() == pytest.approx([5, 5]) and pixels[-1, -1].tolist() == pytest.approx([85, 55])
    assert pixels[0, 1, 0] > pixels[0, 0, 0] and pixels[1, 0, 1] > pixels[0, 0, 1]  # row-major, x fastest


# -- flow fields and density through the constructed model ------------------------------------------------------------


@pytest.mark.parametrize("fit", ["pad", "crop"])
def test_a_poke_moves_the_poked_pixel_by_its_drag(image, fit):
    """Poke (30, 30) → (42, 25): the field at pixel (30, 30) is (+12, −5) px, (dx, dy), x right, y down; far away 0."""
    model = NearestPokeModel()
    embedding = fields.embed_image(model, image, fit)
    field = fields.predict_flow(model, embedding, parse_pokes("30,30,42,25"), grid=45)
    assert field.shape == (2, H, W, 2) and field.dtype == torch.float32
    assert field[:, 30, 30].tolist() == [pytest.approx([12, -5], abs=1e-4)] * 2
    assert field[:, 30, 60].abs().max() == 0 and field[:, 5, 70].abs().max() == 0
    poke_pos, poke_flow, _ = model.calls[-1]
    (ox, oy), side = embedding.view.offset, embedding.view.side
    assert poke_pos[0, 0].tolist() == pytest.approx([(30 + ox) / side, (30 + oy) / side])
    assert poke_flow[0, 0].tolist() == pytest.approx([12 / side, -5 / side])
    if fit == "crop":
        assert field[:, :, :15].abs().max() == 0  # not seen: zero


def test_sample_mode_conditions_the_fine_grid_on_coarse_samples(image):
    class Sampling(NearestPokeModel):
        def predict_autoregressive(self, poke_pos, poke_flow, query_pos, features, camera_static=True,
                                   randomize_order=False, generator=None, callback=None):
            self.generator_state = torch.rand(1, generator=generator).item()
            return torch.zeros_like(query_pos)

    model = Sampling(radius=0.01)
    field = fields.predict_flow(model, fields.embed_image(model, image), parse_pokes("30,30,42,25"), mode="sample",
                                grid=45, ar_grid=3, seed=4)
    poke_pos, _, _ = model.calls[-1]
    assert poke_pos.shape == (2, 1 + 3 * 2, 2)  # the poke, then 3×2 coarse samples (90×60 → 3 × 2)
    assert model.generator_state == torch.rand(1, generator=torch.Generator().manual_seed(4)).item()
    assert field.shape == (2, H, W, 2)


def test_motion_density_peaks_where_the_query_goes(image):
    model = NearestPokeModel()
    embedding = fields.embed_image(model, image, "pad")
    density = fields.motion_density(model, embedding, parse_pokes("30,30,42,25"), (30.5, 30.5))
    assert density.shape == (2, H, W)
    assert density[0].sum().item() == pytest.approx(1.0, abs=1e-3)
    row, col = divmod(int(density[0].argmax()), W)
    assert (col, row) == (42, 25)  # 30.5 + 12, 30.5 − 5: pixel (42, 25)'s centre
    with pytest.raises(DiTFlowError, match=r"query point \(95, 10\) is outside"):
        fields.motion_density(model, embedding, Pokes(), (95, 10))


def test_bad_options_are_refused(image):
    model = NearestPokeModel()
    embedding = fields.embed_image(model, image)
    with pytest.raises(DiTFlowError, match="unknown mode 'best'"):
        fields.predict_flow(model, embedding, Pokes(), mode="best")
    with pytest.raises(DiTFlowError, match="unknown fit 'stretch'"):
        fields.embed_image(model, image, "stretch")
    with pytest.raises(DiTFlowError, match="unknown precision 'fp8'"):
        fields.predict_flow(model, embedding, Pokes(), precision="fp8")


# -- pictures --------------------------------------------------------------------------------------------------------


def test_flow_image_colours_direction_and_draws_pokes():
    flow = torch.zeros(H, W, 2)
    flow[:, :45, 0] = 10.0  # left half moves right
    pokes = parse_pokes("60,30,80,30")
    picture = render.flow_image(flow, pokes)
    assert picture.shape == (H, W, 3)
    assert picture[5, 5].tolist() == pytest.approx([1.0, 0.0, 0.0], abs=0.01)  # hue 0: red
    assert picture[5, 80].tolist() == pytest.approx([1.0, 1.0, 1.0], abs=0.01)  # still: white
    assert picture[30, 70].max() < 0.1  # the poke's black shaft


def test_density_image_marks_the_query():
    density = torch.zeros(H, W)
    density[25, 42] = 1.0
    picture = render.density_image(torch.full((H, W, 3), 0.5), density, (30.5, 30.5), Pokes())
    assert picture.shape == (H, W, 3)
    assert picture[25, 42].tolist() == pytest.approx([0.992, 0.906, 0.145], abs=0.02)  # viridis top: yellow
    assert picture[30, 30, 0] > picture[30, 30, 2]  # the orange cross


# -- the same on the tiny random network ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from ditflow.fpt.checkpoint import load_fpt
    from ditflow.testing.tiny_fpt import build_tiny_fpt

    return load_fpt(build_tiny_fpt(tmp_path_factory.mktemp("fpt") / "tiny.safetensors"))


def test_the_network_gives_finite_fields_and_a_normalised_density(tiny, image):
    embedding = fields.embed_image(tiny, image, "crop")
    assert embedding.features.shape == (2, 32, 4, 4)
    pokes = parse_pokes("30,30,42,25")
    mean = fields.predict_flow(tiny, embedding, pokes, grid=8)
    sample = fields.predict_flow(tiny, embedding, pokes, mode="sample", grid=8, ar_grid=2, seed=1)
    assert torch.isfinite(mean).all() and torch.isfinite(sample).all() and not torch.equal(mean, sample)
    assert torch.equal(sample, fields.predict_flow(tiny, embedding, pokes, mode="sample", grid=8, ar_grid=2, seed=1))
    density = fields.motion_density(tiny, embedding, pokes, (40, 30))
    assert 0 < density[0].sum() <= 1 + 1e-4
