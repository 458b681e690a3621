"""AestheticPredictor: the SigLIP2 aesthetic-LoRA scripts' interface over Scorer, on tastelab model folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import tastelab
import tiny
from tastelab import AestheticPredictor, Scorer
from tastelab.inference.aesthetic_predictor import NotAModelFolderError
from tastelab.io.images import ImageDecodeError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "images"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from tiny.one_torch_thread()


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("predictor")
    return {"distribution": tiny.save_tiny_model(root / "dist", "distribution", lora={"r": 2}),
            "score": tiny.save_tiny_model(root / "score", "score"),
            "images": root / "images"}


@pytest.fixture(scope="module")
def images(folders) -> list[Path]:
    return tiny.make_images(folders["images"], n=4)


def test_the_original_scripts_shape_runs_on_a_model_folder(folders, images) -> None:
    """What the SigLIP2 aesthetic scripts do, verbatim in shape, against a tastelab LoRA model folder."""
    predictor = AestheticPredictor(lora_weights_path=str(folders["distribution"]), device="auto", dtype="bfloat16")
    score, distribution = predictor.predict(str(images[0]))
    assert isinstance(score, float) and 1.0 <= score <= 10.0
    assert isinstance(distribution, list) and len(distribution) == 10
    assert sum(distribution) == pytest.approx(1.0, abs=1e-3)
    assert score == pytest.approx(sum((i + 1) * p for i, p in enumerate(distribution)), abs=1e-3)
    # the same numbers as the Scorer it adapts
    reference = Scorer(folders["distribution"], device="cpu", dtype="fp32").predict(images[0])
    assert (score, distribution) == (reference.score, reference.distribution)

    scores, distributions = predictor.predict_batch([str(p) for p in reversed(images)])
    assert len(scores) == len(distributions) == len(images)
    for path, s, d in zip(reversed(images), scores, distributions):  # input order, each like predict()
        one_s, one_d = predictor.predict(path)
        assert s == pytest.approx(one_s, abs=1e-3) and d == pytest.approx(one_d, abs=1e-4)


def test_bfloat16_on_cpu_runs_float32(folders, images) -> None:
    predictor = AestheticPredictor(folders["score"], device="cpu", dtype="bfloat16")
    assert predictor.device.type == "cpu" and predictor.dtype == torch.float32
    assert AestheticPredictor(folders["score"], device="cpu", dtype=torch.bfloat16).dtype == torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'bfloat8'"):
        AestheticPredictor(folders["score"], device="cpu", dtype="bfloat8")


def test_models_without_a_distribution_give_none(folders, images) -> None:
    predictor = AestheticPredictor(folders["score"], device="cpu")
    score, distribution = predictor.predict(images[1])
    assert 1.0 <= score <= 10.0 and distribution is None
    scores, distributions = predictor.predict_batch(images[:2])
    assert len(scores) == 2 and distributions == [None, None]


def test_unreadable_images_raise_instead_of_misaligning(folders, images, tmp_path: Path) -> None:
    bad = tiny.make_bad_files(tmp_path)["corrupt"]
    predictor = AestheticPredictor(folders["score"], device="cpu")
    with pytest.raises(ImageDecodeError):
        predictor.predict(bad)
    with pytest.raises(ImageDecodeError):
        predictor.predict_batch([images[0], bad])


def test_a_bare_peft_adapter_folder_is_refused_with_what_is_expected(folders, tmp_path: Path) -> None:
    adapter = folders["distribution"] / "adapter"
    assert (adapter / "adapter_config.json").is_file()  # what the original scripts were pointed at
    with pytest.raises(NotAModelFolderError, match=r"bare PEFT adapter folder.*needs a tastelab model folder"
                                                    r".*pass that folder instead"):
        AestheticPredictor(lora_weights_path=adapter, device="cpu")
    elsewhere = shutil.copytree(adapter, tmp_path / "my_lora")
    with pytest.raises(NotAModelFolderError, match=r"preset name \(default, .*\)\. Train one with `tastelab train"):
        AestheticPredictor(lora_weights_path=elsewhere, device="cpu")
    with pytest.raises(FileNotFoundError, match="not a model folder and not a preset name"):
        AestheticPredictor(lora_weights_path=tmp_path / "missing", device="cpu")


def test_the_shipped_default_preset(images) -> None:
    predictor = AestheticPredictor()  # lora_weights_path="default", device="auto", dtype="bfloat16"
    sharp, blurred = EXAMPLES / "coffee.jpg", EXAMPLES / "coffee (blurred).jpg"
    (s_sharp, d_sharp), (s_blur, d_blur) = predictor.predict(sharp), predictor.predict(blurred)
    assert d_sharp is None and d_blur is None  # a scalar technical-quality head
    assert 1.0 <= s_blur < s_sharp <= 10.0
    scores, _ = predictor.predict_batch([sharp, blurred])
    assert scores == pytest.approx([s_sharp, s_blur], abs=1e-3)
    assert AestheticPredictor("default").predict(sharp)[0] == pytest.approx(s_sharp, abs=1e-3)


def test_public_api_exports() -> None:
    assert "AestheticPredictor" in tastelab.__all__ and tastelab.AestheticPredictor is AestheticPredictor
    for name in tastelab.__all__:
        assert getattr(tastelab, name) is not None


def test_an_onnx_export_runs_in_float32_with_the_same_scores(folders, images, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from tastelab.inference.onnx import export_onnx

    export_onnx(folders["distribution"], tmp_path / "onnx")
    exported = AestheticPredictor(tmp_path / "onnx", dtype="bfloat16")
    assert exported.scorer.backend == "onnx" and exported.dtype == torch.float32
    torch_score, torch_dist = AestheticPredictor(folders["distribution"], device="cpu").predict(images[2])
    onnx_score, onnx_dist = exported.predict(images[2])
    assert onnx_score == pytest.approx(torch_score, abs=1e-2) and onnx_dist == pytest.approx(torch_dist, abs=1e-3)
