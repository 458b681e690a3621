"""An ONNX model folder is untrusted input too: a model.onnx ONNX Runtime refuses (not ONNX at all, or weights
stored as external data outside the folder) is one line naming the file, exit code 2, never a traceback."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="needs onnxruntime")

from tastelab.cli.main import main
from tastelab.inference.onnx_runtime import ONNX_FILE, OnnxModel
from tastelab.models.folder import CONFIG_FILE, ModelFolderError

PRESET = Path(__file__).resolve().parents[1] / "src" / "tastelab" / "presets" / "biq2021_mobilenetv2"


def _folder(tmp_path: Path, onnx_bytes: bytes) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(PRESET / CONFIG_FILE, folder / CONFIG_FILE)
    (folder / ONNX_FILE).write_bytes(onnx_bytes)
    return folder


def _graph_with_external_weights(location: str) -> bytes:
    """score = sum(pixel_values * w), with ``w`` stored as external data at ``location``."""
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1])
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "4")):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["b", 3, 8, 8])
    y = helper.make_tensor_value_info("score", TensorProto.FLOAT, ["b"])
    nodes = [helper.make_node("Mul", ["pixel_values", "w"], ["m"]),
             helper.make_node("ReduceSum", ["m", "axes"], ["score"], keepdims=0)]
    axes = helper.make_tensor("axes", TensorProto.INT64, [3], [1, 2, 3])
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=[w, axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


@pytest.mark.parametrize("kind", ["not onnx", "external data outside"])
def test_an_onnx_folder_ort_refuses_is_a_model_folder_error(tmp_path: Path, kind: str, caplog) -> None:
    if kind == "not onnx":
        folder = _folder(tmp_path, b"<html>not a model</html>")
    else:
        (tmp_path / "secret.bin").write_bytes(np.float32(1.0).tobytes())  # a file outside the model folder
        folder = _folder(tmp_path, _graph_with_external_weights("../secret.bin"))
    with pytest.raises(ModelFolderError, match=rf"{ONNX_FILE}: ONNX Runtime cannot load it"):
        OnnxModel(folder, device="cpu")
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (16, 16), (10, 20, 30)).save(image)
    with caplog.at_level(logging.ERROR, logger="tastelab"):
        assert main(["score", str(image), "--model", str(folder), "--backend", "onnx", "--workers", "0"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0] and str(folder / ONNX_FILE) in errors[0], errors
