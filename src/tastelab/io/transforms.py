"""Image transforms that return the geometry they applied, so boxes and keypoints can follow.

Vision tasks resize, crop and flip images; detection boxes and pose keypoints must move with the
pixels, and predictions must map back to the original image. Every transform here returns the new
image *and* a :class:`Geometry` that maps points from the original image into the output
(:meth:`Geometry.points_to_output`) and back (:meth:`Geometry.points_to_input`). Composing transforms
composes their geometries (:meth:`Geometry.then`), so a pipeline keeps one Geometry per image.

Random choices take a ``random.Random`` (or a float in [0, 1) from
:func:`tastelab.training.data.seeded_unit`-style seeding) supplied by the caller: a transform never draws
from a global RNG, which keeps training resumable exactly.

Coordinates are pixels with the origin at the image's top-left corner, x to the right, y down;
boxes are ``[x, y, w, h]`` (COCO). A flip maps x to ``width - x`` (pixel edges, not pixel centres), so
flipping twice is the identity and a box ``[x, y, w, h]`` becomes ``[W - x - w, y, w, h]``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

__all__ = ["Geometry", "center_crop", "crop", "hflip", "random_resized_crop", "resize", "resize_shorter"]

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
             "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}


@dataclass(frozen=True)
class Geometry:
    """An affine map from input pixels to output pixels: ``out = (in - crop) * scale``, then a flip.

    ``input_size`` / ``output_size`` are ``(width, height)``. ``scale`` is ``(sx, sy)`` applied after
    subtracting ``offset`` (the crop's top-left corner in input pixels); ``flipped``: the output is
    mirrored horizontally (x -> output width - x) after scaling.
    """

    input_size: tuple[int, int]
    output_size: tuple[int, int]
    scale: tuple[float, float] = (1.0, 1.0)
    offset: tuple[float, float] = (0.0, 0.0)
    flipped: bool = False
    steps: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def identity(cls, size: tuple[int, int]) -> Geometry:
        return cls(input_size=size, output_size=size)

    # ------------------------------------------------------------------ points
    def points_to_output(self, xy: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
        """``(N, 2)`` input-image points -> output-image points."""
        p = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        out = (p - np.asarray(self.offset)) * np.asarray(self.scale)
        if self.flipped:
            out[:, 0] = self.output_size[0] - out[:, 0]
        return out

    def points_to_input(self, xy: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
        """``(N, 2)`` output-image points -> input-image points (predictions back to the original image)."""
        p = np.asarray(xy, dtype=np.float64).reshape(-1, 2).copy()
        if self.flipped:
            p[:, 0] = self.output_size[0] - p[:, 0]
        return p / np.asarray(self.scale) + np.asarray(self.offset)

    # ------------------------------------------------------------------ boxes
    def boxes_to_output(self, boxes: np.ndarray | Sequence[Sequence[float]], *, clip: bool = True) -> np.ndarray:
        """``(N, 4)`` ``[x, y, w, h]`` input boxes -> output boxes (clipped to the output image)."""
        return self._map_boxes(boxes, self.points_to_output, self.output_size if clip else None)

    def boxes_to_input(self, boxes: np.ndarray | Sequence[Sequence[float]], *, clip: bool = True) -> np.ndarray:
        """``(N, 4)`` ``[x, y, w, h]`` output boxes -> boxes in the original image's pixels."""
        return self._map_boxes(boxes, self.points_to_input, self.input_size if clip else None)

    @staticmethod
    def _map_boxes(boxes: np.ndarray | Sequence[Sequence[float]], fn, size: tuple[int, int] | None) -> np.ndarray:
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        corners = np.concatenate([fn(b[:, :2]), fn(b[:, :2] + b[:, 2:])], axis=1)  # (N, 4): two corners
        x0 = np.minimum(corners[:, 0], corners[:, 2])
        x1 = np.maximum(corners[:, 0], corners[:, 2])
        y0 = np.minimum(corners[:, 1], corners[:, 3])
        y1 = np.maximum(corners[:, 1], corners[:, 3])
        if size is not None:
            x0, x1 = np.clip(x0, 0, size[0]), np.clip(x1, 0, size[0])
            y0, y1 = np.clip(y0, 0, size[1]), np.clip(y1, 0, size[1])
        return np.stack([x0, y0, x1 - x0, y1 - y0], axis=1)

    def inside_output(self, xy: np.ndarray) -> np.ndarray:
        """Boolean mask of output points that fall inside the output image (keypoints cropped away)."""
        p = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        w, h = self.output_size
        return (p[:, 0] >= 0) & (p[:, 0] <= w) & (p[:, 1] >= 0) & (p[:, 1] <= h)

    # ------------------------------------------------------------------ composition
    def then(self, nxt: Geometry) -> Geometry:
        """This geometry followed by ``nxt`` (whose input is this one's output), as one geometry."""
        if nxt.input_size != self.output_size:
            raise ValueError(f"cannot compose: output {self.output_size} != next input {nxt.input_size}")
        if self.flipped:
            # A flip then a crop/scale equals a crop/scale of the mirrored window, then a flip:
            # W2 - (x - o') * s2 = (W1 - x - o2) * s2  gives  o' = W1 - o2 - W2 / s2.
            ox = self.output_size[0] - nxt.offset[0] - nxt.output_size[0] / nxt.scale[0]
            inner_offset, flipped = (ox, nxt.offset[1]), not nxt.flipped
        else:
            inner_offset, flipped = nxt.offset, nxt.flipped
        sx, sy = self.scale[0] * nxt.scale[0], self.scale[1] * nxt.scale[1]
        offx = self.offset[0] + inner_offset[0] / self.scale[0]
        offy = self.offset[1] + inner_offset[1] / self.scale[1]
        return Geometry(self.input_size, nxt.output_size, (sx, sy), (offx, offy), flipped, self.steps + nxt.steps)

    def to_dict(self) -> dict[str, object]:
        return {"input_size": list(self.input_size), "output_size": list(self.output_size),
                "scale": list(self.scale), "offset": list(self.offset), "flipped": self.flipped,
                "steps": list(self.steps)}


# ---------------------------------------------------------------------- transforms
def resize(img: Image.Image, size: tuple[int, int], interpolation: str = "bilinear"
           ) -> tuple[Image.Image, Geometry]:
    """Resize to exactly ``(width, height)`` (aspect ratio not kept)."""
    w, h = img.size
    out = img.resize(size, _RESAMPLE[interpolation])
    return out, Geometry((w, h), size, (size[0] / w, size[1] / h), steps=(f"resize{size}",))


def resize_shorter(img: Image.Image, shorter: int, interpolation: str = "bilinear", max_longer: int | None = None
                   ) -> tuple[Image.Image, Geometry]:
    """Resize so the shorter side is ``shorter`` (aspect kept; the longer side capped at ``max_longer``)."""
    w, h = img.size
    s = shorter / min(w, h)
    if max_longer is not None and max(w, h) * s > max_longer:
        s = max_longer / max(w, h)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return resize(img, size, interpolation)


def crop(img: Image.Image, box: tuple[int, int, int, int]) -> tuple[Image.Image, Geometry]:
    """Crop ``(left, top, width, height)`` (may extend past the image: the outside is black)."""
    left, top, cw, ch = box
    out = img.crop((left, top, left + cw, top + ch))
    return out, Geometry(img.size, (cw, ch), (1.0, 1.0), (float(left), float(top)), steps=(f"crop{box}",))


def center_crop(img: Image.Image, size: tuple[int, int]) -> tuple[Image.Image, Geometry]:
    w, h = img.size
    return crop(img, ((w - size[0]) // 2, (h - size[1]) // 2, size[0], size[1]))


def hflip(img: Image.Image) -> tuple[Image.Image, Geometry]:
    out = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out, Geometry(img.size, img.size, flipped=True, steps=("hflip",))


def random_resized_crop(img: Image.Image, size: tuple[int, int], rng: random.Random,
                        scale: tuple[float, float] = (0.5, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        interpolation: str = "bilinear") -> tuple[Image.Image, Geometry]:
    """torchvision's RandomResizedCrop with the caller's RNG: a random area/aspect window -> ``size``."""
    w, h = img.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        log_r = (np.log(ratio[0]), np.log(ratio[1]))
        aspect = float(np.exp(rng.uniform(*log_r)))
        cw = round((target * aspect) ** 0.5)
        ch = round((target / aspect) ** 0.5)
        if 0 < cw <= w and 0 < ch <= h:
            left = rng.randint(0, w - cw)
            top = rng.randint(0, h - ch)
            break
    else:  # fall back to the centre crop of the allowed aspect range
        cw, ch = w, h
        if w / h < ratio[0]:
            ch = round(w / ratio[0])
        elif w / h > ratio[1]:
            cw = round(h * ratio[1])
        left, top = (w - cw) // 2, (h - ch) // 2
    cropped, g1 = crop(img, (left, top, cw, ch))
    out, g2 = resize(cropped, size, interpolation)
    return out, g1.then(g2)
