"""Trainer: run folders, both training paths, config validation, and exact resume after SIGKILL."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import tastelab
import tiny
from tastelab import Scorer, load_model
from tastelab.training.config import ConfigError, load_train_config
from tastelab.training.trainer import Trainer

TINY_SIGLIP = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
               "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 8}


def _make_dataset(root: Path, n: int = 32) -> Path:
    """Images whose brightness determines the label, so a model can actually learn something."""
    return tiny.make_brightness_dataset(root, n)


def _recipe(root: Path, **train: object) -> dict:
    return {
        "seed": 3,
        "data": {"format": "mos", "path": str(root / "labels.csv"), "image_root": str(root / "img"),
                 "score_range": [1, 5]},
        "model": {"name": "tiny", "backbone": {"kind": "hf", "name": "tiny-siglip", "hf_config": TINY_SIGLIP},
                  "head": {"kind": "score", "hidden": [16], "dropout_hidden": 0.2},
                  "preprocess": {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}},
        "optim": {"lr": 1e-3},
        "train": {"mode": "frozen", "epochs": 3, "batch_size": 4, "workers": 0,
                  "cache_dir": str(root / "cache"), **train},
    }


@pytest.fixture()
def data_root(tmp_path: Path) -> Path:
    return _make_dataset(tmp_path / "data")


def test_unknown_key_is_a_clear_error(tmp_path: Path, data_root: Path) -> None:
    raw = _recipe(data_root)
    raw["train"]["epoch"] = 3  # typo for "epochs"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"train\.epoch.*[Ee]xtra"):
        load_train_config(path)
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        load_train_config(raw=_recipe(data_root), overrides=["optim.lr=-1"])
    with pytest.raises(ConfigError, match="key=value"):
        load_train_config(raw=_recipe(data_root), overrides=["optim.lr"])


def test_overrides_parse_yaml_values(data_root: Path) -> None:
    cfg = load_train_config(raw=_recipe(data_root), overrides=["train.epochs=7", "model.head.hidden=[8, 4]",
                                                                "train.resolution_schedule=null"])
    assert cfg.train.epochs == 7 and cfg.model.head.hidden == [8, 4]


def test_frozen_run_folder_and_scoring(tmp_path: Path, data_root: Path) -> None:
    cfg = load_train_config(raw=_recipe(data_root))
    run = tmp_path / "run"
    summary = Trainer(cfg, run).fit()
    for name in ("config.yaml", "split.json", "metrics.jsonl", "summary.json", "curves.png",
                 "best/config.json", "best/model.safetensors", "final/model.safetensors",
                 "checkpoints/latest/state.json"):
        assert (run / name).exists(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert {"val/srcc", "val/plcc", "val/mae", "train_loss"} <= set(rows[0])
    assert summary["parameters"]["trainable"] < summary["parameters"]["total"]
    assert summary["best"]["epoch"] in (1, 2, 3) and "best" in summary["test"]
    assert not list(run.rglob("*.pkl")) and not list(run.rglob("*.bin"))
    model = load_model(run / "best")
    assert model.config.score_range == (1.0, 5.0) and model.config.metrics
    res = Scorer(model, workers=0).predict(data_root / "img" / "im 0.jpg")
    assert 1.0 <= res.score <= 10.0 and res.band

    # The feature cache makes a second run skip extraction entirely (same fingerprint).
    cache_files = sorted((data_root / "cache").rglob("*.safetensors"))
    Trainer(load_train_config(raw=_recipe(data_root)), tmp_path / "run2").fit()
    assert sorted((data_root / "cache").rglob("*.safetensors")) == cache_files


def test_saved_folders_record_their_provenance_and_test_metrics(tmp_path: Path, data_root: Path) -> None:
    """best/ and final/ say how they were made (recipe, code, split, seed, sizes, times) and carry the test
    metrics measured on them after training: the same numbers the run's summary reports."""
    import hashlib

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(data_root)))
    cfg = load_train_config(recipe)
    run = tmp_path / "run"
    summary = Trainer(cfg, run, recipe_path=recipe).fit()
    split_sha = hashlib.sha256((run / "split.json").read_bytes()).hexdigest()
    split = json.loads((run / "split.json").read_text())["splits"]
    for name in ("best", "final"):
        training = load_model(run / name).config.training
        assert training["recipe"]["path"] == str(recipe) and training["recipe"]["name"] == "tiny"
        assert training["recipe"]["resolved"] == cfg.model_dump(mode="json")
        assert len(training["recipe"]["sha256"]) == 64
        assert training["tastelab_version"] == tastelab.__version__ and training["seed"] == 3
        assert "git_commit" in training
        assert training["split"]["sha256"] == split_sha
        assert training["split"]["sizes"] == {k: len(v) for k, v in split.items()}
        assert training["started_at"] <= training["saved_at"] <= training["test_measured_at"]
        assert training["test_metrics"] == pytest.approx(summary["test"][name])
        assert training["test_metrics"]["srcc"] == pytest.approx(summary["test"][name]["srcc"])
    best = load_model(run / "best").config
    best_row = next(r for r in summary["history"] if r["epoch"] == summary["best"]["epoch"])
    assert best.training["epoch"] == summary["best"]["epoch"]
    assert best.metrics["srcc"] == pytest.approx(best_row["val/srcc"])  # its validation metrics


def test_lora_with_resolution_curriculum(tmp_path: Path, data_root: Path) -> None:
    cfg = load_train_config(raw=_recipe(data_root, mode="lora", epochs=2, resolution_schedule={0: 16, 1: 32}),
                            overrides=["model.lora={r: 4, alpha: 8}"])
    run = tmp_path / "run"
    summary = Trainer(cfg, run).fit()
    assert (run / "best" / "adapter" / "adapter_model.safetensors").exists()
    assert summary["lora"]["r"] == 4
    model = load_model(run / "final")
    assert any("lora_" in n for n, _ in model.named_parameters())


def test_split_is_persisted_and_reused(tmp_path: Path, data_root: Path) -> None:
    cfg = load_train_config(raw=_recipe(data_root, epochs=1))
    Trainer(cfg, tmp_path / "a").fit()
    raw = _recipe(data_root, epochs=1)
    raw["data"]["split_file"] = str(tmp_path / "a" / "split.json")
    raw["seed"] = 99  # a different seed must not change the split that is given
    Trainer(load_train_config(raw=raw), tmp_path / "b").fit()
    a = json.loads((tmp_path / "a" / "split.json").read_text())
    b = json.loads((tmp_path / "b" / "split.json").read_text())
    assert a["splits"] == b["splits"]


_RUNNER = textwrap.dedent("""
    import os, signal, sys, yaml
    from tastelab.training.config import load_train_config
    from tastelab.training.trainer import Trainer
    raw = yaml.safe_load(open(sys.argv[1]))
    kill_at = int(sys.argv[3])
    def on_step(state):
        if kill_at and state.global_step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit: like a crash or OOM kill
    Trainer(load_train_config(raw=raw), sys.argv[2], on_step=on_step).fit()
""")


@pytest.mark.slow  # ~22 s per mode: killed and resumed runs; the default suite is at CI's 10-minute budget
@pytest.mark.parametrize("mode", ["frozen", "lora"])
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path: Path, data_root: Path, mode: str) -> None:
    recipe = _recipe(data_root, mode=mode, epochs=3, checkpoint_every_steps=1, grad_accum=2)
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
    # 25 train images / batch 4 = 7 batches; accumulation 2 -> 4 optimizer steps per epoch (the last
    # group is one batch); step 5 is in the middle of the second epoch.
    killed = run(tmp_path / "crash", 5)
    assert killed.returncode == -9, killed.stderr[-2000:]
    state = json.loads((tmp_path / "crash" / "checkpoints" / "latest" / "state.json").read_text())
    assert state["epoch"] == 1 and state["batches_done"] == 2, state  # really stopped mid-epoch
    resumed = run(tmp_path / "crash", 0)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    ref_rows = (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()
    new_rows = (tmp_path / "crash" / "metrics.jsonl").read_text().splitlines()
    assert len(new_rows) == len(ref_rows) == 3
    for a, b in zip(ref_rows, new_rows, strict=True):
        ra, rb = json.loads(a), json.loads(b)
        for key in ("epoch", "step", "val/srcc", "val/plcc", "val/mse", "lr"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-7), key
    sa = json.loads((tmp_path / "ref" / "summary.json").read_text())
    sb = json.loads((tmp_path / "crash" / "summary.json").read_text())
    assert sa["test"]["final"]["srcc"] == pytest.approx(sb["test"]["final"]["srcc"], abs=1e-7)
    assert sa["test"]["final"]["mse"] == pytest.approx(sb["test"]["final"]["mse"], rel=1e-6)


def _write_votes(root: Path, n_pairs: int = 60) -> Path:
    """A/B votes where the brighter image (higher label) usually wins, plus some ties."""
    labels = {line.split(",")[0]: float(line.split(",")[1])
              for line in (root / "labels.csv").read_text().splitlines()[1:]}
    names = sorted(labels)
    rng = np.random.default_rng(5)
    rows = ["image_a,image_b,votes_a,votes_b"]
    for _ in range(n_pairs):
        a, b = rng.choice(len(names), 2, replace=False)
        na, nb = names[a], names[b]
        p_a = 1 / (1 + np.exp(-(labels[na] - labels[nb]) * 3))
        va = int(rng.binomial(3, p_a))
        rows.append(f"{na},{nb},{va},{3 - va}")
    (root / "votes.csv").write_text("\n".join(rows) + "\n")
    return root / "votes.csv"


@pytest.mark.parametrize("loss", ["bradley_terry", "margin_ranking"])
def test_pairwise_training_from_votes(tmp_path: Path, data_root: Path, loss: str) -> None:
    votes = _write_votes(data_root)
    raw = _recipe(data_root, epochs=3, loss=loss, margin=0.1)
    raw["data"] = {"format": "pairs", "path": str(votes), "image_root": str(data_root / "img"),
                   "split": {"train": 0.7, "val": 0.15, "test": 0.15}}
    run = tmp_path / "run"
    summary = Trainer(load_train_config(raw=raw), run).fit()
    assert summary["loss"] == loss and summary["best"]["metric"] == "pair_acc"
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0.0 <= row["val/pair_acc"] <= 1.0 and "val/pair_acc_unweighted" in row
    assert -1.0 <= row["val/srcc_derived"] <= 1.0  # vs Bradley-Terry scores of the held-out votes
    assert "pair_acc" in summary["test"]["best"]
    split = json.loads((run / "split.json").read_text())
    assert split["kind"] == "pairs" and all("\t" in k for k in split["splits"]["train"])
    model = load_model(run / "best")
    lo, hi = model.config.score_range
    assert hi > lo  # latent scale mapped from the training images' predictions
    res = Scorer(model, workers=0).predict(data_root / "img" / "im 0.jpg")
    assert 1.0 <= res.score <= 10.0

    # Resuming with the saved pair split reuses it exactly.
    Trainer(load_train_config(raw=raw | {"train": raw["train"] | {"epochs": 4}}), run).fit()
    assert json.loads((run / "split.json").read_text())["splits"] == split["splits"]


def test_pair_losses_need_pair_data(data_root: Path) -> None:
    with pytest.raises(ConfigError, match="needs pairwise data"):
        load_train_config(raw=_recipe(data_root, loss="bradley_terry"))
    raw = _recipe(data_root, loss="mse")
    raw["data"] = {"format": "pairs", "path": "votes.csv"}
    with pytest.raises(ConfigError, match="pairs"):
        load_train_config(raw=raw)


def test_learned_layer_weights_train_on_cached_features(tmp_path: Path, data_root: Path) -> None:
    """chrisgoringe-style personal head: several hidden layers, learned softmax weights, cached path."""
    raw = _recipe(data_root, epochs=2)
    raw["model"]["backbone"] |= {"layers": [0, 1, -1], "layer_combine": "learned"}
    raw["optim"]["lr"] = 0.05
    run = tmp_path / "run"
    Trainer(load_train_config(raw=raw), run).fit()
    model = load_model(run / "final")
    logits = model.backbone.combiner.layer_logits
    assert logits is not None and not torch.allclose(logits, torch.zeros_like(logits))
    flat = torch.randn(2, sum(model.backbone.layer_widths))
    assert model.head_on_cached(flat).score.shape == (2,)


# --------------------------------------------------------------------------------------------------
# Non-finite numbers and what a new user reads (issue 11)


@pytest.mark.parametrize(("override", "key"), [
    ("optim.lr=.inf", "optim.lr"),
    ("data.score_range=[-.inf, 0]", "data.score_range.0"),
    ("train.margin=.nan", "train.margin"),
    ("model.preprocess.size=100000", "model.preprocess.size"),
    ("train.resolution_schedule={0: 32, 2: 100000}", "train.resolution_schedule"),
])
def test_non_finite_and_unbounded_recipe_values_are_one_line_errors(tmp_path: Path, data_root: Path,
                                                                    override: str, key: str) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_recipe(data_root)))
    with pytest.raises(ConfigError) as info:
        load_train_config(path, [override])
    msg = str(info.value)
    assert msg.startswith(f"{path}: invalid training config: ") and key in msg and "\n" not in msg


def test_unknown_metric_is_a_config_error_before_any_data_is_read(tmp_path: Path) -> None:
    raw = _recipe(tmp_path / "no-such-data", metric="srrc")
    with pytest.raises(ConfigError, match=r"train\.metric: .*Unknown metric 'srrc'"):
        load_train_config(raw=raw)
    with pytest.raises(ConfigError, match=r"train\.metric 'pair_acc' is never computed for data\.format 'mos'"):
        load_train_config(raw=_recipe(tmp_path / "no-such-data", metric="pair_acc"))


def test_absurd_labels_are_rejected(tmp_path: Path, data_root: Path) -> None:
    labels = data_root / "labels.csv"
    lines = labels.read_text().splitlines()
    lines[3] = lines[3].split(",")[0] + ",1e308"
    labels.write_text("\n".join(lines) + "\n")
    raw = _recipe(data_root)
    raw["data"]["score_range"] = None
    with pytest.raises(ValueError, match=r"labels\.csv: label 1e\+308 of .*im 2\.jpg .*not a usable finite number"):
        Trainer(load_train_config(raw=raw), tmp_path / "run").fit()


def test_training_stops_when_the_loss_becomes_non_finite(tmp_path: Path, data_root: Path, capsys, caplog) -> None:
    from tastelab.cli.main import main
    from tastelab.training.trainer import NonFiniteLossError

    raw = _recipe(data_root)
    raw["optim"] = {"lr": 1e30, "clip_grad_norm": None}
    with pytest.raises(NonFiniteLossError, match=r"loss became (nan|inf) at epoch 1/3, batch \d+/\d+ "
                                                 r"\(optimizer step \d+\); check optim\.lr"):
        Trainer(load_train_config(raw=raw), tmp_path / "run").fit()
    path = tmp_path / "diverge.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path), "--out", str(tmp_path / "run2")]) == 2
    assert "score with" not in capsys.readouterr().out
    assert "training stopped: the loss became" in caplog.text


def test_cli_points_only_at_a_model_that_exists_and_rounds(tmp_path: Path, data_root: Path, capsys, caplog) -> None:
    from tastelab.cli.main import main

    labels = data_root / "labels.csv"  # constant labels: srcc is undefined on every split
    labels.write_text("\n".join([ln.split(",")[0] + ",3.0" for ln in labels.read_text().splitlines()[1:]]
                                ).join(["image,mos\n", "\n"]))
    path = tmp_path / "const.yaml"
    path.write_text(yaml.safe_dump(_recipe(data_root, epochs=2)))
    caplog.set_level("INFO")
    assert main(["train", str(path), "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "run" / "best").exists()
    assert f"--model {tmp_path / 'run' / 'final'}" in out.replace("\n", "") and "/best" not in out
    assert "srcc = n/a" in out
    warnings = [r.getMessage() for r in caplog.records if "srcc undefined" in r.getMessage()]
    assert warnings and all(w.startswith(("val split: ", "test split: ")) for w in warnings)
    assert len(warnings) == len(set(warnings))  # each once per split, not once per epoch or per metric


def test_training_log_has_units_once_and_the_selection_metric(tmp_path: Path, data_root: Path, capsys,
                                                              caplog) -> None:
    from tastelab.cli.main import main

    votes = _write_votes(data_root)
    raw = _recipe(data_root, epochs=2)
    raw["data"] = {"format": "pairs", "path": str(votes), "image_root": str(data_root / "img"),
                   "split": {"train": 0.7, "val": 0.15, "test": 0.15}}
    path = tmp_path / "pairs.yaml"
    path.write_text(yaml.safe_dump(raw))
    caplog.set_level("INFO")
    assert main(["train", str(path), "--out", str(tmp_path / "run")]) == 0
    text = caplog.text
    sizes = [r.getMessage() for r in caplog.records if "train " in r.getMessage() and " pairs" in r.getMessage()]
    assert len(sizes) == 1 and re.search(r"train \d+ images / \d+ pairs, val \d+ images / \d+ pairs", sizes[0])
    assert "split sizes" not in text
    graph = [r.getMessage() for r in caplog.records if "comparison graph" in r.getMessage()]
    assert graph and all(w.startswith(("val split: ", "test split: ")) for w in graph)
    epochs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(epochs) == 2 and all("val pair_acc=" in e for e in epochs)
    out = capsys.readouterr().out
    assert re.search(r"best epoch \d: pair_acc = \d\.\d{4}\n", out)
    assert f"--model {tmp_path / 'run' / 'best'}" in out.replace("\n", "")


def test_trained_learned_combination_reads_the_cache_its_trainer_filled(tmp_path: Path, data_root: Path,
                                                                        monkeypatch) -> None:
    """The cache key covers the encoder, not the head's layer combination (issue 12 §3): a saved model whose
    learned layer weights moved away from their initial values still finds every image its trainer cached."""
    from tastelab.features.cache import FeatureCache, hash_files
    from tastelab.features.extract import extract
    from tastelab.models.backbones.base import Backbone

    raw = _recipe(data_root, epochs=2, hflip=False)
    raw["model"]["backbone"] |= {"layers": [0, 1, -1], "layer_combine": "learned"}
    raw["optim"]["lr"] = 0.05
    run = tmp_path / "run"
    Trainer(load_train_config(raw=raw), run).fit()
    model = load_model(run / "final")
    logits = model.backbone.combiner.layer_logits
    assert not torch.allclose(logits, torch.zeros_like(logits))  # trained: not the combiner the trainer began with
    paths = sorted(str(p) for p in (data_root / "img").iterdir())
    cache = FeatureCache.for_model(data_root / "cache", model)
    assert len(cache) == len(paths) and all(f"{h}:orig" in cache for h in hash_files(paths))
    expected = extract(model, paths, level="pooled", cache_dir=None, workers=0, device="cpu").features["orig"]

    def no_encoder(*_: object) -> None:
        raise AssertionError("the encoder ran: the trained model missed its trainer's cache")

    monkeypatch.setattr(Backbone, "forward_flat_layers", no_encoder)
    got = extract(model, paths, level="pooled", cache_dir=data_root / "cache", workers=0, device="cpu")
    assert torch.allclose(got.features["orig"], expected, atol=1e-5)


def test_set_paths_are_relative_to_the_working_directory(data_root: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`--set data.path=my_scores.json` means ./my_scores.json (issue 11: the documented ratings -> train
    commands), while a relative path written in the recipe file stays relative to the recipe's folder."""
    recipe_dir = tmp_path / "recipes"
    recipe_dir.mkdir()
    recipe = recipe_dir / "r.yaml"
    raw = _recipe(data_root)
    raw["data"]["path"] = "labels.csv"
    recipe.write_text(yaml.safe_dump(raw))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert load_train_config(recipe).data.path == str(recipe_dir / "labels.csv")
    cfg = load_train_config(recipe, overrides=["data.path=mine.csv", "data.image_root=pics",
                                               "model.backbone.weights=IMAGENET1K_V1"])
    assert cfg.data.path == str(work / "mine.csv") and cfg.data.image_root == str(work / "pics")
    assert cfg.model.backbone.weights == "IMAGENET1K_V1"


def test_every_recipe_path_follows_one_rule_recipe_folder_or_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One rule for every path key (training.config.PATH_KEYS), in every reader of a quality recipe's --set: a
    relative path written in the recipe resolves against the recipe's folder, one typed with --set against the
    working directory. Before, ``--set select.priors=[...]`` (a list), a whole section given with --set and
    ``tastelab tune --set`` resolved against the recipe's folder, and a recipe's ``train.cache_dir`` against
    whatever the working directory was."""
    from tastelab.tuning.study import _load_raw

    recipe_dir, work = tmp_path / "recipes", tmp_path / "work"
    recipe_dir.mkdir()
    work.mkdir()
    monkeypatch.chdir(work)
    raw = _recipe(tmp_path)
    raw["data"].update(path="labels.csv", image_root="pics")
    raw["train"]["cache_dir"] = "cache"
    recipe = recipe_dir / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    cfg = load_train_config(recipe)
    assert (cfg.data.path, cfg.data.image_root, cfg.train.cache_dir) == (
        str(recipe_dir / "labels.csv"), str(recipe_dir / "pics"), str(recipe_dir / "cache"))
    cfg = load_train_config(recipe, ["train.cache_dir=mycache", "data={format: mos, path: mine.csv}",
                                     "model.backbone.weights=w/enc.safetensors"])
    assert cfg.train.cache_dir == str(work / "mycache") and cfg.data.path == str(work / "mine.csv")
    assert cfg.model.backbone.weights == str(work / "w" / "enc.safetensors")

    select = {"seed": 1, "data": {"format": "mos", "path": "labels.csv", "split": {"train": 0.7, "test": 0.3}},
              "train": {"mode": "select"}, "select": {"priors": ["generic"]}}
    (recipe_dir / "s.yaml").write_text(yaml.safe_dump(select))
    assert load_train_config(recipe_dir / "s.yaml").select.priors == [str(recipe_dir / "generic")]
    cfg = load_train_config(recipe_dir / "s.yaml", ["select.priors=[mine, /abs/prior, ~/home_prior]"])
    assert cfg.select.priors == [str(work / "mine"), "/abs/prior", str(Path.home() / "home_prior")]
    assert cfg.data.path == str(recipe_dir / "labels.csv")  # the recipe's own paths keep their folder

    # tastelab tune reads --set through the same rule (its trials validate with the recipe's folder as base).
    tuned_raw, base, _ = _load_raw(recipe, ["data.path=mine.csv", "train.cache_dir=mycache"])
    tuned = load_train_config(raw=tuned_raw, base_dir=base)
    assert tuned.data.path == str(work / "mine.csv") and tuned.train.cache_dir == str(work / "mycache")
    assert tuned.data.image_root == str(recipe_dir / "pics")
