"""JPEG decoding on the scoring device (``decode="device"``).

The CUDA decoder (nvJPEG) cannot run here; the same code path runs with the CPU decoder of the same
library call, so what is tested is everything around it: header probing, batching, fallbacks, EXIF
orientation, on-device resizing, joining with Pillow-decoded files and error records.
"""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tiny
from tastelab.inference.scoring import Scorer
from tastelab.io.device_decode import (
    apply_orientation,
    decode_batch_on_device,
    decode_jpegs,
    probe_jpeg,
    resize_to_input,
)
from tastelab.io.images import ImageDecodeError, PreprocessConfig, load_image, preprocess_to_uint8

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from tiny.one_torch_thread()


def _photo(w: int = 96, h: int = 64, seed: int = 0) -> Image.Image:
    """A smooth, asymmetric image (JPEG-friendly, so decoders agree closely)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(seed)
    a, b = rng.uniform(0.5, 2.0, 2)
    arr = np.stack([255 * x / w, 255 * y / h, 127 + 100 * np.sin(a * x / 9 + b * y / 13)], -1)
    arr[: h // 4, : w // 5] = (250, 20, 20)  # a corner marker: orientation mistakes move it
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")


def _jpeg_bytes(img: Image.Image, orientation: int | None = None, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    img.save(buf, "JPEG", quality=quality, exif=exif.tobytes() if orientation else b"")
    return buf.getvalue()


def _as_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).contiguous()


@pytest.fixture(params=["torchcodec", "torchvision"])
def decoder(request, monkeypatch) -> Iterator[str]:
    """Both decode libraries: TorchCodec when installed, torchvision's deprecated decoder otherwise."""
    from tastelab.io import device_decode

    if request.param == "torchcodec":
        pytest.importorskip("torchcodec")
    else:
        monkeypatch.setitem(sys.modules, "torchcodec", None)
        monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)
    device_decode._decoder.cache_clear()  # the choice is cached per process
    yield request.param
    device_decode._decoder.cache_clear()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_pillow_exif_transpose(orientation: int, decoder: str) -> None:
    data = _jpeg_bytes(_photo(), orientation)
    assert probe_jpeg(data, "x.jpg", None) == orientation
    ours = decode_jpegs([torch.frombuffer(bytearray(data), dtype=torch.uint8)], [orientation], CPU)[0]
    ref = _as_tensor(load_image(data))  # Pillow applies EXIF orientation
    assert ours.shape == ref.shape
    assert (ours.float() - ref.float()).abs().mean() < 2.0


def test_apply_orientation_on_a_known_tensor() -> None:
    t = torch.arange(6).reshape(1, 2, 3)  # [[0 1 2], [3 4 5]]
    assert apply_orientation(t, 2).tolist() == [[[2, 1, 0], [5, 4, 3]]]
    assert apply_orientation(t, 3).tolist() == [[[5, 4, 3], [2, 1, 0]]]
    assert apply_orientation(t, 6).tolist() == [[[3, 0], [4, 1], [5, 2]]]  # 90 degrees clockwise
    assert apply_orientation(t, 8).tolist() == [[[2, 5], [1, 4], [0, 3]]]  # 90 degrees counter-clockwise
    assert apply_orientation(t, 1) is t


def test_probe_routes_only_plain_jpegs_and_checks_the_pixel_limit() -> None:
    rgb = _jpeg_bytes(_photo())
    assert probe_jpeg(rgb, "a.jpg", None) == 1
    buf = io.BytesIO()
    _photo().convert("CMYK").save(buf, "JPEG")
    assert probe_jpeg(buf.getvalue(), "cmyk.jpg", None) is None  # Pillow converts CMYK
    buf = io.BytesIO()
    _photo().save(buf, "PNG")
    assert probe_jpeg(buf.getvalue(), "a.png", None) is None
    with pytest.raises(ImageDecodeError, match="pixels"):
        probe_jpeg(rgb, "big.jpg", 100)


@pytest.mark.parametrize("mode", ["squash", "center_crop", "pad"])
def test_resize_on_device_matches_the_pillow_geometry(mode: str) -> None:
    img = _photo(160, 96)
    cfg = PreprocessConfig(size=48, resize=mode)
    ours = resize_to_input(_as_tensor(img), cfg)
    ref = preprocess_to_uint8(img, cfg)
    assert ours.shape == ref.shape == (3, 48, 48) and ours.dtype == torch.uint8
    assert (ours.float() - ref.float()).abs().mean() < 3.0


def test_a_bad_jpeg_in_the_batch_does_not_lose_the_others(decoder: str) -> None:
    good = _jpeg_bytes(_photo())
    broken = good[:200] + b"\x00" * 50  # header intact, entropy data garbage: passes the probe
    cfg = PreprocessConfig(size=32)
    items = [(torch.frombuffer(bytearray(d), dtype=torch.uint8), 1) for d in (good, broken, good)]
    out = decode_batch_on_device(items, cfg, CPU, None)
    assert len(out) == 3
    # The good ones: the input tensor the Pillow path makes, from the device decoder.
    ref = preprocess_to_uint8(load_image(good), cfg)
    for i in (0, 2):
        img = out[i]
        assert isinstance(img, torch.Tensor), (i, img)
        assert img.shape == (3, 32, 32) and img.dtype == torch.uint8
        assert (img.float() - ref.float()).abs().mean() < 3.0
    assert torch.equal(out[0], out[2])
    # The broken one: the device decoder rejects it, the Pillow fallback cannot decode it either, and its
    # record carries exactly the reason the Pillow path gives for the same bytes.
    with pytest.raises(ImageDecodeError) as pillow:
        load_image(broken, draft_size=cfg.size)
    assert pillow.value.reason.startswith("corrupt image data")
    assert out[1] == pillow.value.reason


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("imgs")
    good = [str(p) for p in tiny.make_images(root, n=5, size=(72, 56))]
    for i, o in enumerate((6, 3)):
        p = root / f"rotated_{i}.jpg"
        p.write_bytes(_jpeg_bytes(_photo(80, 50, seed=i), o))
        good.append(str(p))
    cmyk = root / "cmyk.jpg"
    _photo().convert("CMYK").save(cmyk, "JPEG")
    good.append(str(cmyk))
    bad = [str(p) for p in tiny.make_bad_files(root).values()]
    paths = [*good[:3], *bad, *good[3:], str(root / "missing.jpg")]
    return {"paths": paths, "good": good, "bad": [*bad, str(root / "missing.jpg")]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny.save_tiny_model(tmp_path_factory.mktemp("m") / "m", "distribution", "siglip", seed=3)


@pytest.mark.parametrize("workers", [0, 2])
def test_scorer_device_decode_matches_cpu_decode(model_dir, folder, workers: int, decoder: str) -> None:
    cpu = {r.path: r for r in Scorer(model_dir, device="cpu", workers=0, batch_size=4).score_files(folder["paths"])}
    dev = list(Scorer(model_dir, device="cpu", workers=workers, batch_size=4, decode="device")
               .score_files(folder["paths"]))
    assert len(dev) == len(folder["paths"]) == len({r.path for r in dev})  # every input exactly once
    for r in dev:
        ref = cpu[r.path]
        if r.path in folder["bad"]:
            assert r.error and ref.error
            continue
        assert r.error is None, (r.path, r.error)
        # Different (but both antialiased) resamplers: scores agree closely, not bit for bit.
        assert r.score == pytest.approx(ref.score, abs=0.05), r.path
        assert r.band is not None and r.distribution is not None


def test_hflip_cannot_be_combined_with_encoded_loading(folder) -> None:
    from tastelab.io.loader import iter_batches

    with pytest.raises(ValueError, match="hflip"):
        next(iter_batches(folder["good"], PreprocessConfig(size=32), hflip=True, encoded_jpeg=True, workers=0))


def test_scorer_rejects_unknown_decode_mode(model_dir) -> None:
    with pytest.raises(ValueError, match="decode"):
        Scorer(model_dir, device="cpu", decode="gpu-please")


@pytest.mark.slow  # ~18 s: console-script subprocesses; the default suite is at CI's 10-minute budget
def test_cli_decode_device(model_dir, folder, tmp_path: Path) -> None:
    out = tmp_path / "scores.jsonl"
    res = subprocess.run([sys.executable, "-m", "tastelab.cli.main", "score", *folder["good"][:4],
                          "--model", str(model_dir), "--device", "cpu", "--decode", "device", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert len(out.read_text().splitlines()) == 4
