"""ONNX export and the ONNX Runtime backend: same scores as PyTorch, dynamic batch, CLI round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tiny

pytest.importorskip("onnx", reason="ONNX tests need the onnx extra: pip install 'tastelab[onnx]'")
pytest.importorskip("onnxruntime", reason="ONNX tests need the onnx extra: pip install 'tastelab[onnx]'")

from tastelab.cli.main import main
from tastelab.inference.onnx import (  # imported after the skips above
    CONFIG_FILE,
    ONNX_FILE,
    OUTPUT_NAMES,
    OnnxModel,
    export_onnx,
    onnx_providers,
    require,
)
from tastelab.inference.scoring import Scorer, resolve_backend
from tastelab.io.writers import read_results
from tastelab.models import load_model
from tastelab.models.artifact import ModelFolderError

LORA = {"r": 4, "alpha": 8.0}
#: Every head on both backbone families, each family with and without LoRA; CNNs with multi-stage meanstd.
CASES = {
    "score-siglip": ("score", "siglip", None, {}),
    "distribution-siglip-lora": ("distribution", "siglip", LORA, {"layers": [-1, -2]}),
    "gaussian-siglip-lora": ("gaussian", "siglip", LORA, {"pooling": "meanstd"}),
    "score-mobilenet-lora": ("score", "mobilenet", LORA, {"layers": [3, 6], "pooling": "meanstd"}),
    "distribution-mobilenet": ("distribution", "mobilenet", None, {"layers": [3, 6], "pooling": "meanstd"}),
    "gaussian-mobilenet": ("gaussian", "mobilenet", None, {"layers": [3]}),
}
ABS = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from tiny.one_torch_thread()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("onnx-images")
    bad = tiny.make_bad_files(root)["corrupt"]
    return [*(str(p) for p in tiny.make_images(root, n=4)), str(bad)]


def _same(a, b) -> None:
    assert a.path == b.path and a.error == b.error
    if a.error is not None:
        return
    assert a.raw_score == pytest.approx(b.raw_score, abs=ABS)
    assert a.score == pytest.approx(b.score, abs=ABS) and a.band == b.band
    if a.uncertainty is None:
        assert b.uncertainty is None
    else:
        assert a.uncertainty == pytest.approx(b.uncertainty, abs=ABS)
    if a.distribution is None:
        assert b.distribution is None
    else:
        assert b.distribution == pytest.approx(a.distribution, abs=ABS)


@pytest.mark.parametrize("case", list(CASES))
def test_export_matches_torch(case: str, tmp_path: Path, images: list[str]) -> None:
    kind, family, lora, overrides = CASES[case]
    folder = tiny.save_tiny_model(tmp_path / "torch", kind, family, lora, **overrides)
    report = export_onnx(folder, tmp_path / "onnx")
    out = tmp_path / "onnx"
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_FILE, ONNX_FILE]
    assert (out / CONFIG_FILE).read_bytes() == (folder / CONFIG_FILE).read_bytes()
    assert report.exporter == "dynamo" and report.outputs == OUTPUT_NAMES[kind]
    assert report.max_abs_diff is not None and report.max_abs_diff < ABS

    import onnx

    onnx.checker.check_model(str(out / ONNX_FILE))
    # The graph itself, batch 1 and 3 on the dynamic axis, against the PyTorch forward.
    model = load_model(folder)
    runner = OnnxModel(out, device="cpu")
    assert runner.providers == ["CPUExecutionProvider"]
    for n in (1, 3):
        x = tiny.pixels(model, n, seed=7 + n)
        with torch.inference_mode():
            ref = model(x)
        got = runner(x)
        assert got.score.shape == (n,)
        torch.testing.assert_close(got.score, ref.score, atol=ABS, rtol=0)
        for name in ("probs", "var"):
            r, g = getattr(ref, name), getattr(got, name)
            assert (r is None) == (g is None), name
            if r is not None:
                torch.testing.assert_close(g, r, atol=ABS, rtol=0)
    # Through the Scorer: same decode pipeline and result mapping, batch sizes 1 and 3.
    reference = Scorer(folder, device="cpu", workers=0, batch_size=3)
    expected = {r.path: r for r in reference.score_files(images)}
    for batch_size in (1, 3):
        scorer = Scorer(out, device="cpu", workers=0, batch_size=batch_size)
        assert scorer.backend == "onnx" and scorer.config == reference.config
        got = list(scorer.score_files(images))  # streamed per batch: errors come first within a batch
        assert sorted(r.path for r in got) == sorted(images)
        for r in got:
            _same(expected[r.path], r)
    for a, b in zip(reference.predict_batch(images), scorer.predict_batch(images), strict=True):
        _same(a, b)


def test_torchscript_exporter_and_model_instance(tmp_path: Path, images: list[str]) -> None:
    model = tiny.build_tiny_model("distribution", "mobilenet", LORA, layers=[3, 6], pooling="meanstd")
    report = export_onnx(model, tmp_path / "onnx", exporter="torchscript")
    assert report.exporter == "torchscript" and report.max_abs_diff < ABS
    assert OnnxModel(tmp_path / "onnx").config == model.config.model_copy(
        update={"feature_dim": model.backbone.num_features})
    a = Scorer(model, device="cpu", workers=0, batch_size=3).predict_batch(images)
    b = Scorer(tmp_path / "onnx", backend="onnx", device="cpu", workers=0, batch_size=3).predict_batch(images)
    for x, y in zip(a, b, strict=True):
        _same(x, y)


def test_failed_verification_leaves_nothing(tmp_path: Path) -> None:
    folder = tiny.save_tiny_model(tmp_path / "m", "score", "mobilenet", layers=[3])
    with pytest.raises(ValueError, match="differs from PyTorch"):
        export_onnx(folder, tmp_path / "onnx", exporter="torchscript", tolerance=-1.0)
    assert not (tmp_path / "onnx").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folder left either
    with pytest.raises(ValueError, match="unknown exporter"):
        export_onnx(folder, tmp_path / "onnx", exporter="tf2onnx")


def test_backend_resolution(tmp_path: Path) -> None:
    torch_dir = tiny.save_tiny_model(tmp_path / "m", "gaussian", "mobilenet", layers=[3])
    onnx_dir = tmp_path / "m-onnx"
    export_onnx(torch_dir, onnx_dir, exporter="torchscript", verify=False)
    assert resolve_backend(str(torch_dir)) == "torch"
    assert resolve_backend(onnx_dir) == "onnx"
    assert resolve_backend(onnx_dir, "torch") == "torch"
    assert resolve_backend("default") == "torch"
    model = load_model(torch_dir)
    assert resolve_backend(model) == "torch"
    with pytest.raises(ValueError, match="needs an exported folder"):
        resolve_backend(model, "onnx")
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend(torch_dir, "tensorrt")
    with pytest.raises(FileNotFoundError, match="tastelab export"):
        Scorer(torch_dir, backend="onnx", workers=0)
    with pytest.raises(ModelFolderError, match=r"model\.safetensors: missing"):
        Scorer(onnx_dir, backend="torch", workers=0)
    runner = OnnxModel(onnx_dir)
    assert resolve_backend(runner) == "onnx"
    scorer = Scorer(runner, dtype="bf16", workers=0)  # dtype is ignored (fp32 graph) with a warning
    assert scorer.model is runner and scorer.dtype == torch.float32 and scorer.device.type == "cpu"
    assert scorer.model.config.name == scorer.config.name == "tiny-mobilenet-gaussian"


def test_providers_and_missing_extra() -> None:
    import onnxruntime as ort

    assert onnx_providers("cpu") == ["CPUExecutionProvider"]
    assert onnx_providers("auto")[-1] == "CPUExecutionProvider"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ValueError, match="onnxruntime-gpu"):
            onnx_providers("cuda:1")
    else:
        assert onnx_providers("cuda:1")[0] == ("CUDAExecutionProvider", {"device_id": 1})
    with pytest.raises(ValueError, match="not supported by the ONNX backend"):
        onnx_providers("mps")
    with pytest.raises(ImportError, match=r"pip install 'tastelab\[onnx\]'"):
        require("tastelab_no_such_module")


def test_cli_export_then_score_with_onnx(tmp_path: Path, images: list[str], capsys) -> None:
    folder = tiny.save_tiny_model(tmp_path / "m", "distribution", "siglip", LORA)
    onnx_dir = tmp_path / "exported"
    assert main(["export", str(folder), "--format", "onnx", "--out", str(onnx_dir)]) == 0
    printed = capsys.readouterr().out
    assert "dynamo exporter" in printed and "ONNX Runtime matches PyTorch" in printed
    common = ["--workers", "0", "--batch-size", "3", "--device", "cpu", *images]
    assert main(["score", "--model", str(folder), "--backend", "torch", "--out", str(tmp_path / "t.jsonl"),
                 *common]) == 0
    assert main(["score", "--model", str(onnx_dir), "--backend", "onnx", "--out", str(tmp_path / "o.csv"),
                 *common]) == 0
    printed = capsys.readouterr().out
    assert "4 scored, 1 errors" in printed and "tiny-siglip-distribution" in printed
    ref = {r["path"]: r for r in read_results(tmp_path / "t.jsonl")}
    got = {r["path"]: r for r in read_results(tmp_path / "o.csv")}
    assert set(ref) == set(got) == set(images)
    for path, r in ref.items():
        g = got[path]
        assert (r["error"] is None) == (g["error"] is None)
        if r["error"] is None:
            assert g["raw_score"] == pytest.approx(r["raw_score"], abs=ABS)
            assert g["band"] == r["band"] and g["distribution"] == pytest.approx(r["distribution"], abs=ABS)
    # auto picks ONNX Runtime for the exported folder; a bad export target is a clean exit code 2.
    assert main(["score", "--model", str(onnx_dir), *common]) == 0
    assert main(["export", str(onnx_dir), "--out", str(tmp_path / "again")]) == 2


def test_auto_exporter_falls_back_to_torchscript(tmp_path: Path, monkeypatch, caplog) -> None:
    import tastelab.inference.onnx as onnx_backend

    real = onnx_backend._export_graph

    def dynamo_fails(wrapper, example, path, outputs, exporter, *args):
        if exporter == "dynamo":
            path.write_bytes(b"partial")  # a half-written file must not survive the retry
            raise RuntimeError("cannot capture this model\nlong trace")
        return real(wrapper, example, path, outputs, exporter, *args)

    monkeypatch.setattr(onnx_backend, "_export_graph", dynamo_fails)
    folder = tiny.save_tiny_model(tmp_path / "m", "gaussian", "mobilenet", layers=[3])
    report = export_onnx(folder, tmp_path / "onnx")
    assert report.exporter == "torchscript" and report.max_abs_diff < ABS
    assert "dynamo export failed (RuntimeError: cannot capture this model)" in caplog.text
    with pytest.raises(RuntimeError, match="cannot capture"):
        export_onnx(folder, tmp_path / "onnx2", exporter="dynamo")
    assert not (tmp_path / "onnx2").exists()
