"""Scorer: bands, single/batch/streamed prediction, bad files, worker processes, device/dtype rules."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

import tiny
from tastelab.inference.scoring import (
    BANDS,
    Scorer,
    ScoreResult,
    default_workers,
    rating_band,
    score_paths_to_file,
)
from tastelab.io.images import ImageDecodeError
from tastelab.models.heads import HeadOutput

KINDS = ("score", "distribution", "gaussian")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from tiny.one_torch_thread()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {kind: tiny.save_tiny_model(root / kind, kind, "siglip", seed=i) for i, kind in enumerate(KINDS)}


@pytest.fixture(scope="module")
def image_set(tmp_path_factory) -> dict[str, object]:
    """Good images, bad files and a missing path, ordered so one batch of 3 holds only failures."""
    root = tmp_path_factory.mktemp("images")
    good = [str(p) for p in tiny.make_images(root, n=6)]
    bad = {k: str(v) for k, v in tiny.make_bad_files(root).items()}
    missing = str(root / "does-not-exist.jpg")
    paths = [*good[:3], bad["corrupt"], bad["empty"], bad["text"], *good[3:], missing]
    return {"root": root, "good": good, "bad": bad, "missing": missing, "paths": paths}


def _scorer(folder: Path, workers: int = 0, batch_size: int = 3) -> Scorer:
    return Scorer(folder, device="cpu", workers=workers, batch_size=batch_size)


# --------------------------------------------------------------------------------------------------
# Bands


@pytest.mark.parametrize(
    ("score", "band"),
    [
        (10.0, "Excellent"),
        (7.5, "Excellent"),
        (7.4999, "Very Good"),
        (6.5, "Very Good"),
        (6.4999, "Good"),
        (5.5, "Good"),
        (5.4999, "Average"),
        (4.5, "Average"),
        (4.4999, "Below Average"),
        (3.5, "Below Average"),
        (3.4999, "Poor"),
        (1.0, "Poor"),
        (0.0, "Poor"),
    ],
)
def test_rating_band_boundaries(score: float, band: str) -> None:
    assert rating_band(score) == band


def test_bands_table_is_ordered() -> None:
    bounds = [b for b, _ in BANDS]
    assert bounds == sorted(bounds, reverse=True) == [7.5, 6.5, 5.5, 4.5, 3.5]


def test_results_band_matches_shown_score_and_score_is_clamped(model_dirs) -> None:
    scorer = _scorer(model_dirs["score"])
    native = torch.tensor([7.49996, 3.499996, 11.7, -2.0, 6.5])
    results = scorer._results(HeadOutput(score=native), [f"p{i}" for i in range(5)])
    assert [r.score for r in results] == [7.5, 3.5, 10.0, 1.0, 6.5]
    assert [r.band for r in results] == ["Excellent", "Below Average", "Excellent", "Poor", "Very Good"]
    assert [r.raw_score for r in results] == pytest.approx([7.49996, 3.499996, 11.7, -2.0, 6.5])
    assert all(r.uncertainty is None and r.distribution is None for r in results)


def test_distribution_uncertainty_is_on_the_1_10_scale(tmp_path: Path) -> None:
    folder = tiny.save_tiny_model(tmp_path / "m5", "distribution", "siglip", num_bins=5)
    scorer = _scorer(folder)
    probs = torch.tensor([[0.5, 0.0, 0.0, 0.0, 0.5], [0.0, 0.0, 1.0, 0.0, 0.0]])
    out = HeadOutput(score=probs @ torch.arange(1.0, 6.0), logits=probs.log(), probs=probs)
    a, b = scorer._results(out, ["a", "b"])
    assert a.score == pytest.approx(5.5) and b.score == pytest.approx(5.5)
    assert a.raw_score == pytest.approx(3.0)
    assert a.uncertainty == pytest.approx(2.0 * 9.0 / 4.0)  # std 2 bins on 1..5 -> 4.5 on 1..10
    assert b.uncertainty == pytest.approx(0.0, abs=1e-3)
    assert a.distribution == [0.5, 0.0, 0.0, 0.0, 0.5]


def test_gaussian_uncertainty_scale(tmp_path: Path) -> None:
    folder = tiny.save_tiny_model(tmp_path / "g", "gaussian", "siglip", score_range=(0.0, 1.0))
    scorer = _scorer(folder)
    (res,) = scorer._results(HeadOutput(score=torch.tensor([0.5]), var=torch.tensor([0.01])), ["x"])
    assert res.score == pytest.approx(5.5)
    assert res.uncertainty == pytest.approx(0.1 * 9.0)


# --------------------------------------------------------------------------------------------------
# Device and dtype


def test_scorer_defaults_on_cpu(model_dirs) -> None:
    scorer = Scorer(model_dirs["distribution"], device="auto", workers=0)
    if scorer.device.type == "cpu":
        assert scorer.dtype == torch.float32
    assert not scorer.model.training
    assert default_workers() >= 1
    assert Scorer(scorer.model, device="cpu", workers=0).model is scorer.model


# --------------------------------------------------------------------------------------------------
# predict / predict_batch


def test_predict_path_pil_and_bytes_agree(model_dirs, image_set) -> None:
    scorer = _scorer(model_dirs["distribution"])
    path = image_set["good"][0]
    by_path = scorer.predict(path)
    by_pathlib = scorer.predict(Path(path))
    by_bytes = scorer.predict(Path(path).read_bytes())
    with Image.open(path) as img:
        by_pil = scorer.predict(img.copy())
    assert by_path.path == path and by_pathlib.path == path
    assert by_bytes.path is None and by_pil.path is None
    for other in (by_pathlib, by_bytes, by_pil):
        assert other.score == pytest.approx(by_path.score, abs=1e-4)
        assert other.band == by_path.band
    assert by_path.error is None
    assert 1.0 <= by_path.score <= 10.0


@pytest.mark.parametrize("bad", ["corrupt", "empty", "text"])
def test_predict_bad_file_raises(model_dirs, image_set, bad) -> None:
    scorer = _scorer(model_dirs["score"])
    with pytest.raises(ImageDecodeError) as info:
        scorer.predict(image_set["bad"][bad])
    assert info.value.reason
    with pytest.raises(ImageDecodeError):
        scorer.predict(b"not an image at all")


def test_predict_batch_turns_bad_inputs_into_error_results(model_dirs, image_set) -> None:
    scorer = _scorer(model_dirs["gaussian"], batch_size=2)
    good, bad = image_set["good"], image_set["bad"]
    with Image.open(good[1]) as img:
        pil = img.copy()
    inputs = [good[0], bad["corrupt"], pil, b"\x00garbage", Path(good[2]), bad["empty"], image_set["missing"]]
    results = scorer.predict_batch(inputs)
    assert len(results) == len(inputs)
    assert [r.error is None for r in results] == [True, False, True, False, True, False, False]
    assert [r.path for r in results] == [good[0], bad["corrupt"], None, None, good[2], bad["empty"],
                                         image_set["missing"]]
    for r in results:
        if r.error is None:
            assert 1.0 <= r.score <= 10.0 and r.band and r.uncertainty is not None and r.uncertainty > 0
        else:
            assert isinstance(r.error, str) and r.error
            assert r.score is None and r.band is None
    assert scorer.predict_batch([]) == []
    with pytest.raises(ImageDecodeError):
        scorer.predict_batch(inputs, raise_errors=True)


# --------------------------------------------------------------------------------------------------
# score_files (streaming, DataLoader workers)


def _check_stream(results: list[ScoreResult], image_set, kind: str) -> dict[str, ScoreResult]:
    by_path = {r.path: r for r in results}
    assert len(results) == len(by_path) == len(image_set["paths"])  # every input exactly once
    assert set(by_path) == set(image_set["paths"])
    failed = {*image_set["bad"].values(), image_set["missing"]}
    for path, r in by_path.items():
        if path in failed:
            assert r.error and isinstance(r.error, str), path
            assert r.score is None and r.band is None and r.distribution is None
            continue
        assert r.error is None, (path, r.error)
        assert 1.0 <= r.score <= 10.0
        assert r.band == rating_band(r.score)
        if kind == "distribution":
            assert r.distribution is not None and len(r.distribution) == 10
            assert math.fsum(r.distribution) == pytest.approx(1.0, abs=1e-4)
            assert all(v >= 0 for v in r.distribution)
        else:
            assert r.distribution is None
        if kind == "score":
            assert r.uncertainty is None
        else:
            assert r.uncertainty is not None and r.uncertainty > 0
    return by_path


def _same_numbers(a: ScoreResult, b: ScoreResult) -> None:
    assert a.error == b.error
    if a.error is None:
        assert a.score == pytest.approx(b.score, abs=2e-4)
        assert a.raw_score == pytest.approx(b.raw_score, abs=2e-4)
        assert a.band == b.band
        if a.uncertainty is not None:
            assert a.uncertainty == pytest.approx(b.uncertainty, abs=2e-4)
        if a.distribution is not None:
            assert a.distribution == pytest.approx(b.distribution, abs=2e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_score_files_streams_every_input_once(model_dirs, image_set, kind) -> None:
    scorer = _scorer(model_dirs[kind], workers=0)
    stream = scorer.score_files(image_set["paths"])
    assert iter(stream) is stream  # a generator: results stream, nothing is collected up front
    by_path = _check_stream(list(stream), image_set, kind)
    # Same numbers as predict_batch on the same files.
    for r in scorer.predict_batch(image_set["paths"]):
        _same_numbers(r, by_path[r.path])


def test_score_files_with_worker_processes_matches_in_process(model_dirs, image_set) -> None:
    kind = "distribution"
    in_process = _check_stream(list(_scorer(model_dirs[kind], workers=0).score_files(image_set["paths"])),
                               image_set, kind)
    with_workers = _check_stream(list(_scorer(model_dirs[kind], workers=2).score_files(image_set["paths"])),
                                 image_set, kind)
    for path, r in in_process.items():
        _same_numbers(r, with_workers[path])
        assert r.error == with_workers[path].error


def test_score_files_skip_and_empty(model_dirs, image_set) -> None:
    scorer = _scorer(model_dirs["score"])
    skip = [*image_set["good"][:2], image_set["bad"]["corrupt"]]
    got = [r.path for r in scorer.score_files(image_set["paths"], skip=skip)]
    assert sorted(got) == sorted(p for p in image_set["paths"] if p not in skip)
    assert list(scorer.score_files([])) == []
    assert list(scorer.score_files(image_set["good"][:1], skip=image_set["good"][:1])) == []


def test_score_paths_to_file_counts_and_progress(model_dirs, image_set, tmp_path) -> None:
    scorer = _scorer(model_dirs["distribution"])
    seen: list[ScoreResult] = []
    out = tmp_path / "scores.jsonl"
    counts = score_paths_to_file(scorer, image_set["paths"], out, progress=seen.append)
    n_bad = len(image_set["bad"]) + 1
    assert counts == {"total": len(image_set["paths"]), "skipped": 0,
                      "scored": len(image_set["paths"]) - n_bad, "errors": n_bad}
    assert len(seen) == len(image_set["paths"])
    again = score_paths_to_file(scorer, image_set["paths"], out)
    assert again == {"total": len(image_set["paths"]), "skipped": len(image_set["paths"]), "scored": 0,
                     "errors": 0}


def test_bytes_io_like_inputs(model_dirs, image_set) -> None:
    scorer = _scorer(model_dirs["score"])
    buf = io.BytesIO()
    Image.new("RGB", (20, 30), (200, 10, 10)).save(buf, format="PNG")
    res = scorer.predict(buf.getvalue())
    assert res.error is None and res.path is None and 1.0 <= res.score <= 10.0


# --------------------------------------------------------------------------------------------------
# Non-finite predictions are errors, never scores; devices are checked before a model is loaded


def _poisoned(scorer: Scorer, value: float, field: str) -> None:
    """Make the model's forward return ``value`` for the first image's ``field`` (score/probs/var)."""
    real = scorer._forward

    def forward(x):
        out = real(x)
        tensor = getattr(out, field).clone()
        tensor[0] = value
        setattr(out, field, tensor)
        return out

    scorer._forward = forward


@pytest.mark.parametrize(("kind", "field", "value"), [
    ("score", "score", math.nan), ("score", "score", math.inf), ("score", "score", -math.inf),
    ("distribution", "probs", math.nan), ("gaussian", "var", math.inf)])
def test_non_finite_prediction_is_an_error_row(model_dirs, image_set, tmp_path, kind, field, value) -> None:
    scorer = _scorer(model_dirs[kind])
    _poisoned(scorer, value, field)
    first, second = scorer.predict_batch(image_set["good"][:2])
    assert first.score is None and first.band is None and first.raw_score is None
    assert "non-finite prediction" in first.error
    assert second.error is None and math.isfinite(second.score)
    out = tmp_path / "scores.jsonl"
    score_paths_to_file(scorer, image_set["good"][:2], out)
    text = out.read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in JSONL")) for line in text.splitlines()]
    assert rows[0]["score"] is None and "non-finite" in rows[0]["error"]


def test_missing_or_invalid_devices_are_one_line_errors_before_loading(tmp_path) -> None:
    missing_model = tmp_path / "no-such-model"  # the device is checked first: this is never loaded
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match=r"--device cuda:7: no (such device|CUDA device)"):
        if count > 7:
            pytest.skip("this machine has a cuda:7")
        Scorer(missing_model, device="cuda:7")
    for bad in ("gpu", "cuda:x", "cpu:-1:2", ""):
        with pytest.raises(ValueError, match="not a device name"):
            Scorer(missing_model, device=bad)
    with pytest.raises(FileNotFoundError):
        Scorer(missing_model, device="cpu")


def test_model_identity_follows_content(model_dirs, tmp_path) -> None:
    import shutil

    from tastelab.models import load_model
    from tastelab.models.identity import folder_hash, module_hash

    copy = tmp_path / "copy"
    shutil.copytree(model_dirs["score"], copy)
    assert folder_hash(copy) == folder_hash(model_dirs["score"])  # where it lives does not matter
    (copy / ".DS_Store").write_bytes(b"finder")
    assert folder_hash(copy) == folder_hash(model_dirs["score"])
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert folder_hash(copy) != folder_hash(model_dirs["score"])
    scorer = _scorer(model_dirs["score"])
    assert scorer.identity.name == scorer.config.name and scorer.identity.hash == folder_hash(model_dirs["score"])
    in_memory = Scorer(load_model(model_dirs["score"]), device="cpu", workers=0)
    assert in_memory.identity.hash == module_hash(load_model(model_dirs["score"]))
    assert in_memory.identity.hash != module_hash(load_model(model_dirs["distribution"]))


def test_bands_come_from_the_model(tmp_path: Path) -> None:
    """A personal-taste model says no quality words (bands: null) or its own; NaN has no band (issue 11)."""
    model = tiny.build_tiny_model("score", "siglip")
    native = torch.tensor([9.0, 2.0])
    model.config = model.config.model_copy(update={"bands": None})
    results = Scorer(model, workers=0)._results(HeadOutput(score=native), ["a", "b"])
    assert [r.band for r in results] == [None, None] and results[0].score == 9.0
    model.config = model.config.model_copy(update={"bands": [(6.0, "more like my taste"), (1.0, "less")]})
    results = Scorer(model, workers=0)._results(HeadOutput(score=native), ["a", "b"])
    assert [r.band for r in results] == ["more like my taste", "less"]
    assert rating_band(float("nan")) is None
