"""io/transforms: every transform returns the geometry it applied; points and boxes follow and map back."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from tastelab.io.transforms import Geometry, center_crop, crop, hflip, random_resized_crop, resize, resize_shorter


def _marked(size: tuple[int, int], at: tuple[int, int]) -> Image.Image:
    """A black image with one white pixel at ``at``: where it lands after a transform is measurable."""
    arr = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    arr[at[1], at[0]] = 255
    return Image.fromarray(arr)


def _where(img: Image.Image) -> tuple[float, float]:
    a = np.asarray(img.convert("L"), dtype=float)
    ys, xs = np.nonzero(a > 0)
    w = a[ys, xs]
    return float((xs * w).sum() / w.sum()), float((ys * w).sum() / w.sum())


def test_flip_and_crop_move_a_pixel_where_the_geometry_says() -> None:
    img = _marked((40, 30), (5, 7))
    out, g1 = crop(img, (2, 3, 30, 20))
    out, g2 = hflip(out)
    g = g1.then(g2)
    # Pixel centres: the marked pixel's centre (5.5, 7.5) must land on the marked pixel's centre.
    expected = g.points_to_output([[5.5, 7.5]])[0]
    x, y = _where(out)
    assert (x + 0.5, y + 0.5) == pytest.approx(tuple(expected))


def test_composition_equals_step_by_step_and_inverts() -> None:
    img = Image.new("RGB", (100, 60))
    rng = random.Random(3)
    a, g1 = random_resized_crop(img, (32, 32), rng)
    b, g2 = hflip(a)
    c, g3 = resize(b, (64, 48))
    d, g4 = center_crop(c, (40, 40))
    _, g5 = hflip(d)
    total = g1.then(g2).then(g3).then(g4).then(g5)
    pts = np.array([[10.0, 20.0], [50, 30], [99, 1]])
    step = pts
    for g in (g1, g2, g3, g4, g5):
        step = g.points_to_output(step)
    np.testing.assert_allclose(total.points_to_output(pts), step, atol=1e-9)
    np.testing.assert_allclose(total.points_to_input(total.points_to_output(pts)), pts, atol=1e-9)
    assert total.output_size == (40, 40) and total.input_size == (100, 60)


def test_boxes_follow_a_flip_and_a_resize_and_clip() -> None:
    img = Image.new("RGB", (200, 100))
    _, g = resize_shorter(img, 50)  # 100 x 50: scale 0.5
    _, f = hflip(Image.new("RGB", g.output_size))
    both = g.then(f)
    box = both.boxes_to_output([[20, 10, 40, 30]])[0]
    # x: 20..60 -> 10..30 -> flipped in a 100-wide image: 70..90
    np.testing.assert_allclose(box, [70, 5, 20, 15])
    np.testing.assert_allclose(both.boxes_to_input([box])[0], [20, 10, 40, 30])
    out_of_frame = Geometry.identity((10, 10)).boxes_to_output([[8, 8, 5, 5]])[0]
    np.testing.assert_allclose(out_of_frame, [8, 8, 2, 2])


def test_composing_mismatched_sizes_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot compose"):
        Geometry.identity((10, 10)).then(Geometry.identity((5, 5)))
