"""Decoding / preprocessing edge cases, all on images generated into tmp_path (no network)."""

from __future__ import annotations

import io
import os
import pickle
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, features
from torchvision.transforms import functional as TF

import tastelab.io.images as images_mod
from tastelab.io.images import (
    ALPHA_BACKGROUND,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDecodeError,
    PreprocessConfig,
    load_and_preprocess,
    load_image,
    normalize_batch,
    preprocess_to_uint8,
    read_regular_file,
)

RED = (255, 0, 0)
BLUE = (0, 0, 255)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def _save(img: Image.Image, path: Path, fmt: str | None = None, **kwargs: object) -> Path:
    img.save(path, fmt, **kwargs)
    return path


def _smooth_rgb(width: int, height: int) -> Image.Image:
    """A smooth colour field: JPEG-friendly, and resizing it barely depends on the filter."""
    xs = np.linspace(0.0, 1.0, width)[None, :]
    ys = np.linspace(0.0, 1.0, height)[:, None]
    r = 255 * xs * np.ones_like(ys)
    g = 255 * ys * np.ones_like(xs)
    b = 127 + 100 * np.sin(6 * xs + 4 * ys)
    return Image.fromarray(np.stack([r, g, b], axis=-1).round().astype(np.uint8))


def _jpeg_bytes(img: Image.Image, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kwargs)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A ~100-byte PNG whose header claims width x height RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    chunks = _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def _pixel(img: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    value = img.getpixel(xy)
    assert isinstance(value, tuple)
    return value


def _close(actual: tuple[int, ...], expected: tuple[int, ...], tol: int = 8) -> bool:
    return all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True))


def _mode_of(path: Path) -> str:
    with Image.open(path) as img:
        return img.mode


def _frames_of(path: Path) -> int:
    with Image.open(path) as img:
        return getattr(img, "n_frames", 1)


def _decode_error(source: object, **kwargs: object) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as info:
        load_image(source, **kwargs)  # type: ignore[arg-type]
    return info.value


# ------------------------------------------------------------------------------------------
# EXIF, paths, input kinds
# ------------------------------------------------------------------------------------------


def test_exif_orientation_6_swaps_size_and_rotates(tmp_path: Path) -> None:
    img = Image.new("RGB", (80, 40), BLUE)
    img.paste(RED, (0, 0, 40, 40))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(img, tmp_path / "rot.jpg", quality=95, exif=exif.tobytes())

    out = load_image(path)

    assert out.mode == "RGB"
    assert out.size == (40, 80)
    # After a 90-degree clockwise rotation the former left half is on top.
    assert _close(_pixel(out, (20, 10)), RED, tol=30)
    assert _close(_pixel(out, (20, 70)), BLUE, tol=30)


def test_unicode_and_spaces_in_path_and_uppercase_extension(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (30, 20), RED), tmp_path / "ünï cödé (3).JPG", "JPEG")
    out = load_image(str(path))
    assert out.size == (30, 20)
    assert _close(_pixel(out, (10, 10)), RED)
    assert load_image(path).size == (30, 20)  # os.PathLike too


def test_bytes_input(tmp_path: Path) -> None:
    data = _jpeg_bytes(Image.new("RGB", (30, 20), RED))
    for payload in (data, bytearray(data), memoryview(data)):
        out = load_image(payload)
        assert out.size == (30, 20)
        assert out.mode == "RGB"


def test_pil_input_is_converted_without_mutating_the_caller_image() -> None:
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    out = load_image(rgba)
    assert out.mode == "RGB"
    assert _pixel(out, (5, 5)) == ALPHA_BACKGROUND
    assert rgba.mode == "RGBA"
    rgb = Image.new("RGB", (10, 10), RED)
    assert load_image(rgb).getpixel((0, 0)) == RED


def test_pil_input_lazily_opened_is_loaded(tmp_path: Path) -> None:
    path = _save(Image.new("L", (12, 8), 200), tmp_path / "g.png")
    with Image.open(path) as lazy:
        out = load_image(lazy)
    assert out.mode == "RGB"
    assert _pixel(out, (0, 0)) == (200, 200, 200)


# ------------------------------------------------------------------------------------------
# modes
# ------------------------------------------------------------------------------------------


def _palette_image(transparent_index: int | None) -> Image.Image:
    img = Image.new("P", (20, 10), 0)
    img.putpalette([*RED, *BLUE])
    img.paste(1, (10, 0, 20, 10))  # right half = palette index 1 (blue)
    if transparent_index is not None:
        img.info["transparency"] = transparent_index
    return img


def test_palette_without_transparency(tmp_path: Path) -> None:
    path = _save(_palette_image(None), tmp_path / "p.png")
    assert _mode_of(path) == "P"
    out = load_image(path)
    assert _pixel(out, (2, 2)) == RED
    assert _pixel(out, (15, 2)) == BLUE


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency_uses_background(tmp_path: Path, fmt: str) -> None:
    path = _save(_palette_image(0), tmp_path / f"pt.{fmt.lower()}", fmt, transparency=0)
    with Image.open(path) as raw:
        assert raw.mode == "P" and "transparency" in raw.info
    out = load_image(path)
    assert _pixel(out, (2, 2)) == ALPHA_BACKGROUND  # transparent red -> background
    assert _pixel(out, (15, 2)) == BLUE


def test_rgba_fully_transparent_red_becomes_background(tmp_path: Path) -> None:
    img = Image.new("RGBA", (20, 10), (255, 0, 0, 0))  # fully transparent *red*
    img.paste((0, 0, 255, 255), (10, 0, 20, 10))  # opaque blue right half
    path = _save(img, tmp_path / "rgba.png")
    out = load_image(path)
    assert out.mode == "RGB"
    assert _pixel(out, (2, 2)) == ALPHA_BACKGROUND
    assert _pixel(out, (15, 2)) == BLUE
    assert _pixel(load_image(path, background=(0, 0, 0)), (2, 2)) == (0, 0, 0)


def test_rgba_half_transparent_is_blended() -> None:
    out = load_image(Image.new("RGBA", (4, 4), (0, 0, 0, 128)))
    assert _close(_pixel(out, (0, 0)), (127, 127, 127), tol=2)


def test_l_and_la(tmp_path: Path) -> None:
    out = load_image(_save(Image.new("L", (8, 8), 77), tmp_path / "l.png"))
    assert _pixel(out, (0, 0)) == (77, 77, 77)

    la = Image.new("LA", (8, 8), (30, 0))
    la.paste((30, 255), (4, 0, 8, 8))
    out = load_image(_save(la, tmp_path / "la.png"))
    assert _pixel(out, (1, 1)) == ALPHA_BACKGROUND
    assert _pixel(out, (6, 1)) == (30, 30, 30)


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk(tmp_path: Path, fmt: str) -> None:
    cmyk_red = Image.new("CMYK", (32, 32), (0, 255, 255, 0))
    path = _save(cmyk_red, tmp_path / f"cmyk.{fmt.lower()}", fmt)
    assert _mode_of(path) == "CMYK"
    out = load_image(path)
    assert out.mode == "RGB"
    assert _close(_pixel(out, (16, 16)), RED, tol=20)


def _gradient16() -> np.ndarray:
    return np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (4, 1))


def _assert_full_gradient(img: Image.Image) -> None:
    row = np.asarray(img)[0, :, 0].astype(int)
    assert row[0] <= 1 and row[-1] >= 254, "16-bit gradient must span black..white"
    assert np.all(np.diff(row) >= 0), "gradient must stay monotonic"
    assert len(np.unique(row)) > 200, "must not collapse to a few levels"
    mid = row[len(row) // 2]
    assert 120 <= mid <= 135


def test_16bit_png_scaled_by_bit_depth(tmp_path: Path) -> None:
    path = _save(Image.fromarray(_gradient16()), tmp_path / "g16.png")
    assert _mode_of(path) == "I;16"
    _assert_full_gradient(load_image(path))


def test_16bit_big_endian_tiff(tmp_path: Path) -> None:
    big = Image.frombytes("I;16B", (256, 4), _gradient16().astype(">u2").tobytes())
    path = _save(big, tmp_path / "g16b.tif")
    assert _mode_of(path) == "I;16B"
    _assert_full_gradient(load_image(path))
    _assert_full_gradient(load_image(big))


def test_dark_16bit_image_stays_dark() -> None:
    dark = Image.fromarray(np.full((4, 4), 1000, dtype=np.uint16))  # ~1.5% of full scale
    assert _pixel(load_image(dark), (0, 0)) == (4, 4, 4)


def test_mode_i_with_16bit_data(tmp_path: Path) -> None:
    img_i = Image.fromarray(_gradient16().astype(np.int32))
    assert img_i.mode == "I"
    _assert_full_gradient(load_image(img_i))
    path = _save(img_i, tmp_path / "gi.tif")
    assert _mode_of(path) == "I"
    _assert_full_gradient(load_image(path))


def test_mode_i_with_wide_data_is_stretched() -> None:
    wide = Image.fromarray(np.tile(np.linspace(-1e6, 1e6, 256).astype(np.int32), (4, 1)))
    _assert_full_gradient(load_image(wide))


def test_float_tiff(tmp_path: Path) -> None:
    unit = np.tile(np.linspace(0.0, 1.0, 256, dtype=np.float32), (4, 1))
    path = _save(Image.fromarray(unit), tmp_path / "f.tif")
    assert _mode_of(path) == "F"
    _assert_full_gradient(load_image(path))
    hdr = Image.fromarray(unit * 5000.0 - 100.0)
    _assert_full_gradient(load_image(hdr))


def test_bilevel(tmp_path: Path) -> None:
    img = Image.new("1", (16, 8), 0)
    img.paste(1, (8, 0, 16, 8))
    out = load_image(_save(img, tmp_path / "b.png"))
    assert _pixel(out, (2, 2)) == (0, 0, 0)
    assert _pixel(out, (12, 2)) == (255, 255, 255)


def test_animated_gif_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, (0, 255, 0), BLUE)]
    path = _save(frames[0], tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert _frames_of(path) == 3
    out = load_image(path)
    assert out.size == (16, 16)
    assert _pixel(out, (8, 8)) == RED


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP")
def test_animated_webp_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, (0, 255, 0), BLUE)]
    path = _save(frames[0], tmp_path / "anim.webp", save_all=True, append_images=frames[1:], lossless=True)
    assert _frames_of(path) == 3
    out = load_image(path)
    assert out.mode == "RGB"
    assert _close(_pixel(out, (8, 8)), RED, tol=2)
    assert tuple(preprocess_to_uint8(out, PreprocessConfig(size=8))[:, 4, 4].tolist()) == RED


# ------------------------------------------------------------------------------------------
# broken files
# ------------------------------------------------------------------------------------------


def _noisy_jpeg(tmp_path: Path) -> bytes:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    return _jpeg_bytes(Image.fromarray(noise), quality=90)


def test_truncated_jpeg(tmp_path: Path) -> None:
    data = _noisy_jpeg(tmp_path)
    path = tmp_path / "half.jpg"
    path.write_bytes(data[: len(data) // 2])
    err = _decode_error(path)
    assert "truncated" in err.reason
    assert err.path == str(path)
    assert str(path) in str(err)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # never flipped globally
    assert "truncated" in _decode_error(data[:400]).reason  # cut inside the headers


def test_truncated_png(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    path = tmp_path / "half.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    assert "truncated" in _decode_error(path).reason


def test_corrupt_bytes(tmp_path: Path) -> None:
    noise = np.random.default_rng(2).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    path = tmp_path / "noise.jpg"
    path.write_bytes(b"\x00\x01" + noise)
    err = _decode_error(path)
    assert err.path == str(path)
    assert "unrecognised image format" in err.reason

    fake_jpeg = tmp_path / "fake.jpg"  # JPEG magic followed by garbage
    fake_jpeg.write_bytes(b"\xff\xd8\xff" + noise)
    err = _decode_error(fake_jpeg)
    assert err.path == str(fake_jpeg)
    assert err.reason


def test_corrupt_png_payload(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[80] ^= 0xFF  # inside the IDAT stream
    path = tmp_path / "bad.png"
    path.write_bytes(bytes(data))
    err = _decode_error(path)
    assert "corrupt" in err.reason or "truncated" in err.reason


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    err = _decode_error(path)
    assert err.reason == "empty file (0 bytes)"
    assert err.path == str(path)
    assert _decode_error(b"").reason == "empty file (0 bytes)"


def test_text_and_html_named_jpg(tmp_path: Path) -> None:
    text = tmp_path / "notes.jpg"
    text.write_text("just some notes, definitely not pixels\n", encoding="utf-8")
    assert "text file" in _decode_error(text).reason
    html = tmp_path / "404.JPG"
    html.write_text("<!DOCTYPE html><html><body>Not Found</body></html>", encoding="utf-8")
    assert "HTML" in _decode_error(html).reason


def test_missing_file_and_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "missing.jpg"
    err = _decode_error(missing)
    assert err.reason == "file not found"
    assert err.path == str(missing)
    assert "directory" in _decode_error(tmp_path).reason


def test_decode_error_pickles_and_rebuilds_from_message() -> None:
    err = ImageDecodeError("/x/ü.jpg", "truncated image data")
    clone = pickle.loads(pickle.dumps(err))
    assert (clone.path, clone.reason, str(clone)) == (err.path, err.reason, str(err))
    assert ImageDecodeError("only a message").path == "only a message"  # DataLoader re-raise


# ------------------------------------------------------------------------------------------
# decompression bombs
# ------------------------------------------------------------------------------------------


def test_bomb_header_rejected_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(_bomb_png())
    loads: list[object] = []
    original_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self) or original_load(self))

    err = _decode_error(path)
    assert "too many pixels" in err.reason
    assert "100000x100000" in err.reason
    assert loads == []  # rejected from the header alone


def test_bomb_rejected_even_when_pillow_global_limit_disabled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert "too many pixels" in _decode_error(_bomb_png()).reason


def test_genuine_image_over_per_call_limit(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (40, 30), RED), tmp_path / "small.jpg")
    err = _decode_error(path, max_pixels=1000)
    assert "too many pixels" in err.reason
    assert load_image(path, max_pixels=1200).size == (40, 30)  # limit is inclusive
    assert load_image(path, max_pixels=None).size == (40, 30)


def test_per_call_limit_overrides_stricter_pillow_global(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pillow's global check (error above 2x, warning above 1x) must not decide for us."""
    path = _save(Image.new("RGB", (40, 30), RED), tmp_path / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow alone would raise DecompressionBombError
    assert load_image(path).size == (40, 30)
    assert "too many pixels" in _decode_error(path, max_pixels=500).reason

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1200 px: Pillow would only warn ...
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ... and the warning is escalated to an exception
        assert load_image(path).size == (40, 30)


# ------------------------------------------------------------------------------------------
# draft mode and preprocessing
# ------------------------------------------------------------------------------------------


@pytest.fixture
def big_jpeg(tmp_path: Path) -> Path:
    return _save(_smooth_rgb(2000, 1500), tmp_path / "big.jpg", quality=95)


def test_draft_decodes_fewer_pixels_but_enough(big_jpeg: Path) -> None:
    drafted = load_image(big_jpeg, draft_size=224)
    assert drafted.size[0] < 2000 and drafted.size[1] < 1500
    assert min(drafted.size) >= 224
    assert load_image(big_jpeg).size == (2000, 1500)
    assert load_image(big_jpeg, draft_size=1000).size == (2000, 1500)  # less than 2x: full decode


@pytest.mark.parametrize("resize", ["squash", "center_crop", "pad"])
def test_draft_path_matches_full_decode(big_jpeg: Path, resize: str) -> None:
    cfg = PreprocessConfig(size=224, resize=resize)  # type: ignore[arg-type]
    full = preprocess_to_uint8(load_image(big_jpeg), cfg)
    fast = load_and_preprocess(big_jpeg, cfg)
    diff = (full.float() - fast.float()).abs().mean().item()
    assert diff < 6.0
    assert torch.equal(fast, preprocess_to_uint8(load_image(big_jpeg, draft_size=224), cfg))


def test_draft_respects_exif_rotation(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 8
    path = _save(_smooth_rgb(1800, 600), tmp_path / "pano.jpg", quality=90, exif=exif.tobytes())
    out = load_image(path, draft_size=128)
    assert out.size[0] < out.size[1]
    assert min(out.size) >= 128


@pytest.mark.parametrize("resize", ["squash", "center_crop", "pad"])
@pytest.mark.parametrize("size_wh", [(300, 200), (200, 300), (224, 224), (50, 10)])
def test_preprocess_shape_dtype_contiguity(resize: str, size_wh: tuple[int, int]) -> None:
    cfg = PreprocessConfig(size=224, resize=resize)  # type: ignore[arg-type]
    out = preprocess_to_uint8(_smooth_rgb(*size_wh), cfg)
    assert out.shape == (3, 224, 224)
    assert out.dtype == torch.uint8
    assert out.is_contiguous()


def _stripes(width: int, height: int, edge: int) -> Image.Image:
    """Green image with red left/right bands of width ``edge``."""
    img = Image.new("RGB", (width, height), (0, 255, 0))
    img.paste(RED, (0, 0, edge, height))
    img.paste(RED, (width - edge, 0, width, height))
    return img


def test_center_crop_drops_the_sides() -> None:
    out = preprocess_to_uint8(_stripes(400, 200, 50), PreprocessConfig(size=64, resize="center_crop"))
    assert torch.all(out[0] == 0) and torch.all(out[1] == 255)


def test_squash_keeps_the_sides() -> None:
    out = preprocess_to_uint8(_stripes(400, 200, 50), PreprocessConfig(size=64, resize="squash"))
    assert out[:, 32, 0].tolist() == list(RED)


def test_pad_letterboxes_with_mean_colour() -> None:
    cfg = PreprocessConfig(size=64, resize="pad")
    out = preprocess_to_uint8(Image.new("RGB", (200, 100), RED), cfg)
    mean_rgb = [round(m * 255) for m in IMAGENET_MEAN]
    assert out[:, 0, 32].tolist() == mean_rgb  # top band
    assert out[:, 63, 32].tolist() == mean_rgb  # bottom band
    assert out[:, 32, 32].tolist() == list(RED)
    assert normalize_batch(out[None], IMAGENET_MEAN, IMAGENET_STD)[0, :, 0, 32].abs().max() < 0.02


def test_preprocess_accepts_non_rgb_input() -> None:
    out = preprocess_to_uint8(Image.new("RGBA", (30, 20), (0, 0, 0, 0)), PreprocessConfig(size=16))
    assert torch.all(out == 255)


def test_preprocess_config_validation() -> None:
    with pytest.raises(ValueError):
        PreprocessConfig(resize="stretch")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        PreprocessConfig(sizee=224)  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        PreprocessConfig(size=0)


# ------------------------------------------------------------------------------------------
# normalisation
# ------------------------------------------------------------------------------------------


def _random_batch(device: str = "cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (4, 3, 32, 24), dtype=torch.uint8, generator=gen).to(device)


def _devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.mark.parametrize("device", _devices())
def test_normalize_batch_matches_torchvision(device: str) -> None:
    batch = _random_batch(device)
    out = normalize_batch(batch, IMAGENET_MEAN, IMAGENET_STD)
    expected = TF.normalize(batch.float() / 255.0, list(IMAGENET_MEAN), list(IMAGENET_STD))
    assert out.device == batch.device
    assert out.dtype == torch.float32
    assert out.shape == batch.shape
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_normalize_batch_other_dtypes(dtype: torch.dtype) -> None:
    batch = _random_batch()
    out = normalize_batch(batch, IMAGENET_MEAN, IMAGENET_STD, dtype=dtype)
    assert out.dtype == dtype
    expected = TF.normalize(batch.double() / 255.0, list(IMAGENET_MEAN), list(IMAGENET_STD))
    torch.testing.assert_close(out.double(), expected, atol=2e-2 if dtype != torch.float64 else 1e-12, rtol=0)


def test_normalize_batch_single_image_and_errors() -> None:
    batch = _random_batch()
    single = normalize_batch(batch[0], IMAGENET_MEAN, IMAGENET_STD)
    assert torch.equal(single, normalize_batch(batch, IMAGENET_MEAN, IMAGENET_STD)[0])
    with pytest.raises(TypeError):
        normalize_batch(batch.float(), IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(ValueError):
        normalize_batch(batch[:, :2], IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(TypeError):
        normalize_batch(batch, IMAGENET_MEAN, IMAGENET_STD, dtype=torch.int32)


def test_end_to_end_pipeline_shapes(tmp_path: Path) -> None:
    sizes = [(640, 480), (300, 900)]
    paths = [_save(_smooth_rgb(w, h), tmp_path / f"{i}.jpg") for i, (w, h) in enumerate(sizes)]
    cfg = PreprocessConfig(size=96, resize="center_crop", interpolation="lanczos")
    batch = torch.stack([load_and_preprocess(p, cfg) for p in paths])
    out = normalize_batch(batch, cfg.mean, cfg.std)
    assert out.shape == (2, 3, 96, 96)
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------------
# Only regular files are images: FIFOs, devices and folders are refused without ever blocking


needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")


@needs_fifo
@pytest.mark.timeout(30)
def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)  # no writer: a plain open() for reading would wait forever
    for call in (load_image, read_regular_file):
        with pytest.raises(ImageDecodeError, match=r"not a regular file .*FIFO"):
            call(fifo)
    with pytest.raises(ImageDecodeError, match="FIFO"):
        load_and_preprocess(str(fifo), PreprocessConfig(size=16))


@needs_fifo
@pytest.mark.timeout(30)
def test_file_swapped_for_a_fifo_after_stat_is_caught_by_fstat(tmp_path: Path, monkeypatch) -> None:
    fifo = tmp_path / "swapped.jpg"
    os.mkfifo(fifo)
    real = images_mod._not_regular_reason
    calls: list[int] = []

    def stat_says_regular_first(mode: int) -> str | None:  # the stat saw a regular file; then it was swapped
        calls.append(mode)
        return None if len(calls) == 1 else real(mode)

    monkeypatch.setattr(images_mod, "_not_regular_reason", stat_says_regular_first)
    with pytest.raises(ImageDecodeError, match="FIFO"):
        load_image(fifo)
    assert len(calls) == 2  # the non-blocking open returned, and fstat refused the descriptor


@pytest.mark.timeout(30)
@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_devices_and_folders_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match="character device"):
        load_image("/dev/zero")  # endless: reading it would never finish
    with pytest.raises(ImageDecodeError, match="a directory"):
        load_image(tmp_path)
    with pytest.raises(ImageDecodeError, match="file not found"):
        read_regular_file(tmp_path / "missing.jpg")
