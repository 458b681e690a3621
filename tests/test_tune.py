"""Hyper-parameter search: space files, studies on a tiny frozen model, resume, pruning, Pareto fronts,
the CLI, and a worker SIGKILLed mid-trial (heartbeat -> FAIL -> retried from its checkpoint)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

optuna = pytest.importorskip("optuna")

from optuna.trial import FixedTrial, TrialState  # noqa: E402

from tastelab import load_model  # noqa: E402
from tastelab.cli.main import main  # noqa: E402
from tastelab.tuning import SpaceError, load_space, parse_objective, show, tune  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    import tiny

    yield from tiny.one_torch_thread()


def make_dataset(root: Path, n: int = 48) -> Path:
    """``n`` images whose brightness sets the label (learnable) + labels.csv; features cache in root/cache."""
    import tiny

    return tiny.make_brightness_dataset(root, n)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("tune-data") / "d")


def _recipe(root: Path, **train: object) -> dict:
    return {
        "seed": 3,
        "data": {"format": "mos", "path": str(root / "labels.csv"), "image_root": str(root / "img"),
                 "score_range": [1, 5], "split": {"train": 0.7, "val": 0.2, "test": 0.1}},
        # A random-init torchvision CNN: no transformers import, so worker processes start quickly.
        "model": {"name": "tiny", "backbone": {"kind": "torchvision", "name": "mobilenet_v2", "weights": None,
                                               "layers": [2, -1]},
                  "head": {"kind": "score", "hidden": [16], "dropout_hidden": 0.1},
                  "preprocess": {"size": 48, "resize": "squash"}},
        "optim": {"lr": 1e-3},
        "train": {"mode": "frozen", "epochs": 2, "batch_size": 8, "workers": 0, "hflip": False,
                  "cache_dir": str(root / "cache"), **train},
    }


SPACE = {"params": {
    "optim.lr": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True},
    "model.head.hidden": {"type": "categorical", "choices": [[8], [16, 8], []]},
    "model.head.dropout_hidden": {"type": "float", "low": 0.0, "high": 0.3, "step": 0.1},
    "train.epochs": 2,
}}


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _storage(out: Path) -> optuna.storages.RDBStorage:
    return optuna.storages.RDBStorage(f"sqlite:///{out / 'study.db'}")


# ------------------------------------------------------------------------------------------ space
def test_space_parsing_and_round_trip(tmp_path: Path) -> None:
    path = _write(tmp_path / "space.yaml", {
        "objectives": ["val/plcc"],
        "params": {
            "optim.name": {"type": "categorical", "choices": ["adamw", "lion", "prodigy"]},
            "optim.lr": {"type": "float", "low": "1e-5", "high": 1e-2, "log": True,  # YAML 1.1 reads 1e-5 as text
                         "when": {"optim.name": ["adamw", "lion"]}, "else": 1.0},
            "optim.weight_decay": {"type": "float", "low": 0.0, "high": 0.1, "step": 0.02},
            "train.epochs": {"type": "int", "low": 10, "high": 40, "step": 10},
            "model.head.hidden": {"type": "categorical", "choices": [[512, 128], [256], []]},
            "train.resolution_schedule": {"type": "categorical", "choices": [None, {0: 224, 3: 384}]},
            "train.batch_size": 64,
        }})
    space = load_space(path)
    assert space.objectives == ("val/plcc",)
    by_key = {p.key: p for p in space.params}
    assert by_key["optim.lr"].low == 1e-5 and by_key["optim.lr"].log
    assert by_key["train.epochs"].corner_values() == [10, 40]
    assert by_key["optim.weight_decay"].corner_values() == [0.0, 0.1]
    assert by_key["train.batch_size"].kind == "fixed"
    hidden = by_key["model.head.hidden"]
    assert hidden.encoded and hidden.labels == ("[512, 128]", "[256]", "[]")

    trial = FixedTrial({"optim.name": "adamw", "optim.lr": 3e-4, "optim.weight_decay": 0.04, "train.epochs": 20,
                        "model.head.hidden": "[256]", "train.resolution_schedule": '{"0": 224, "3": 384}'})
    overrides = space.suggest(trial)
    assert overrides == {"optim.name": "adamw", "optim.lr": 3e-4, "optim.weight_decay": 0.04, "train.epochs": 20,
                         "model.head.hidden": [256], "train.resolution_schedule": {0: 224, 3: 384},
                         "train.batch_size": 64}
    # Prodigy: the lr is not searched (it is a multiplier); the 'else' value applies.
    prodigy = space.suggest(FixedTrial({"optim.name": "prodigy", "optim.weight_decay": 0.0, "train.epochs": 10,
                                        "model.head.hidden": "[]", "train.resolution_schedule": "null"}))
    assert prodigy["optim.lr"] == 1.0 and prodigy["model.head.hidden"] == []
    assert prodigy["train.resolution_schedule"] is None
    # Stored params -> overrides (used to retrain the best trial) gives the same mapping back.
    assert space.from_params(trial.params) == overrides


@pytest.mark.parametrize(("params", "match"), [
    ({"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True, "step": 1e-4}},
     r"params\.optim\.lr: 'log' and 'step'"),
    ({"optim.lr": {"type": "float", "low": 1e-2, "high": 1e-4}}, r"params\.optim\.lr: low .* greater"),
    ({"optim.lr": {"type": "float", "low": 0.0, "high": 1e-2, "log": True}}, r"params\.optim\.lr: a log-scale"),
    ({"optim.lr": {"type": "floaty", "low": 0, "high": 1}}, r"params\.optim\.lr: 'type' must be"),
    ({"optim.lr": {"type": "float", "low": "small", "high": 1}}, r"params\.optim\.lr\.low: expected a number"),
    ({"train.epochs": {"type": "int", "low": 1.5, "high": 4}}, r"params\.train\.epochs\.low: an int parameter"),
    ({"model.head.hidden": [[8], [16]]}, r"params\.model\.head\.hidden: a bare list is ambiguous"),
    ({"optim.name": {"type": "categorical", "choices": []}}, r"params\.optim\.name: .*non-empty 'choices'"),
    ({"optim.name": {"type": "categorical", "choices": ["adamw"], "low": 1}}, r"params\.optim\.name: unknown field"),
    ({"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "when": {"optim.name": "lion"}}},
     r"params\.optim\.lr\.when: 'optim\.name' is not a parameter declared before"),
    ({"train.cache_dir": "/tmp/x"}, r"params\.train\.cache_dir: cannot be searched"),
    ({"optim..lr": 1}, r"'optim\.\.lr' is not a dotted config key"),
])
def test_space_shape_errors_name_the_key(tmp_path: Path, params: dict, match: str) -> None:
    path = _write(tmp_path / "bad.yaml", {"params": params})
    with pytest.raises(SpaceError, match=str(path).replace(".", r"\.") + ".*" + match):
        load_space(path)


def test_space_top_level_errors(tmp_path: Path) -> None:
    with pytest.raises(SpaceError, match=r"unknown top-level key.*'parmas'"):
        load_space({"parmas": {"optim.lr": 1}})
    with pytest.raises(SpaceError, match="nothing to search"):
        load_space({"params": {"optim.lr": 1e-3}})
    with pytest.raises(SpaceError, match="no such space file"):
        load_space(tmp_path / "missing.yaml")


def test_space_checked_against_the_recipe_before_any_trial(tmp_path: Path, data_root: Path) -> None:
    out = tmp_path / "out"
    bad_key = {"params": {"optim.lrr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}}
    with pytest.raises(SpaceError, match=r"params\.optim\.lrr.*\n.*optim\.lrr: Extra inputs"):
        tune(_recipe(data_root), bad_key, out, trials=1)
    # Only the third choice is invalid: every choice is validated, not just the first.
    bad_choice = {"params": {"optim.name": {"type": "categorical", "choices": ["adamw", "lion", "rmsprop"]}}}
    with pytest.raises(SpaceError, match=r"params\.optim\.name = 'rmsprop'.*\n.*optim\.name"):
        tune(_recipe(data_root), bad_choice, out, trials=1)
    # The high end of a range is checked too (warmup_ratio must be < 1).
    bad_high = {"params": {"optim.warmup_ratio": {"type": "float", "low": 0.0, "high": 1.0}}}
    with pytest.raises(SpaceError, match=r"params\.optim\.warmup_ratio = 1\.0"):
        tune(_recipe(data_root), bad_high, out, trials=1)
    # LoRA keys on a frozen recipe: the recipe's own consistency rule names the problem.
    lora = {"params": {"model.lora.r": {"type": "int", "low": 4, "high": 16}}}
    with pytest.raises(SpaceError, match=r"model\.lora is set but train\.mode is 'frozen'"):
        tune(_recipe(data_root), lora, out, trials=1)
    assert not (out / "study.db").exists()  # nothing ran


@pytest.mark.parametrize(("recipe", "space"), [
    ("configs/biq2021_quality.yaml", "configs/tune/biq2021_head_space.yaml"),
    ("configs/ava_siglip2_lora.yaml", "configs/tune/siglip2_lora_space.yaml"),
])
def test_example_spaces_fit_their_recipes(recipe: str, space: str) -> None:
    root = Path(__file__).resolve().parents[1]
    raw = yaml.safe_load((root / recipe).read_text())
    parsed = load_space(root / space)
    parsed.check(raw, base_dir=(root / recipe).parent)  # every bound and choice makes a valid TrainConfig
    assert parsed.objectives == ("val/srcc",)


def test_objective_names_and_directions() -> None:
    assert parse_objective("val/srcc").direction == "maximize"
    assert parse_objective("val/mae").direction == "minimize"
    assert parse_objective("cost/params").direction == "minimize"
    assert parse_objective("val/srcc_derived:max").direction == "maximize"
    with pytest.raises(ValueError, match="unknown metric direction"):
        parse_objective("val/novel")
    with pytest.raises(ValueError, match="test metrics are never tuned on"):
        parse_objective("test/srcc")
    with pytest.raises(ValueError, match="unknown cost metric"):
        parse_objective("cost/flops")


# ------------------------------------------------------------------------------------------ studies
def test_study_writes_outputs_and_resumes_to_the_total(tmp_path: Path, data_root: Path) -> None:
    out = tmp_path / "out"
    res = tune(_recipe(data_root), SPACE, out, trials=2, pruner="none", sampler="random")
    assert (out / "study.db").exists() and (out / "tune_summary.json").exists()
    summary = json.loads((out / "tune_summary.json").read_text())
    assert summary["counts"]["COMPLETE"] == 2 and summary["best"]["trial"] == res.best_trial
    assert summary["best"]["values"]["val/srcc"] == pytest.approx(res.best_values["val/srcc"])
    assert isinstance(res.best_params["model.head.hidden"], list)  # decoded, not the stored JSON text
    model = load_model(out / "best-run" / "best")
    assert model.config.head.hidden == res.best_params["model.head.hidden"]
    # Every trial keeps its metrics and summary; only the best keeps model folders.
    trials = sorted((out / "trials").iterdir())
    assert [t.name for t in trials] == ["trial-0000", "trial-0001"]
    for t in trials:
        assert (t / "summary.json").exists() and (t / "metrics.jsonl").exists()
        assert not (t / "checkpoints").exists()
        assert (t / "best").exists() == (t.name == f"trial-{res.best_trial:04d}")

    # Same command with a larger total: 1 more trial, numbers continue, no trial is run twice.
    res2 = tune(_recipe(data_root), SPACE, out, trials=3, pruner="none", sampler="random")
    study = optuna.load_study(study_name="tiny", storage=_storage(out))
    assert [t.number for t in study.trials] == [0, 1, 2] and res2.counts["COMPLETE"] == 3
    assert len({json.dumps(t.params, sort_keys=True) for t in study.trials}) == 3  # re-run: new proposals
    # Already complete: a re-run does nothing and keeps the best run.
    res3 = tune(_recipe(data_root), SPACE, out, trials=3, pruner="none", sampler="random")
    assert len(optuna.load_study(study_name="tiny", storage=_storage(out)).trials) == 3
    assert res3.summary["best"]["source"] == "unchanged"


class _PruneAfterFirstEpoch(optuna.pruners.BasePruner):
    """Deterministic pruning: trial 0 completes, every later trial is pruned after its first epoch."""

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return trial.number > 0 and trial.last_step is not None and trial.last_step >= 1


def test_pruned_trials_are_recorded_as_pruned(tmp_path: Path, data_root: Path) -> None:
    out = tmp_path / "out"
    res = tune(_recipe(data_root, epochs=3), SPACE, out, trials=3, pruner=_PruneAfterFirstEpoch(), sampler="random")
    study = optuna.load_study(study_name="tiny", storage=_storage(out))
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.PRUNED]
    assert study.trials[1].intermediate_values.keys() == {1}  # reported epoch 1, then stopped
    assert res.counts == {**res.counts, "COMPLETE": 1, "PRUNED": 2, "FAIL": 0}
    metrics = (out / "trials" / "trial-0001" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 1 and not (out / "trials" / "trial-0001" / "best").exists()
    assert json.loads((out / "trials" / "trial-0001" / "trial.json").read_text())["state"] == "PRUNED"


def test_median_pruner_prunes_a_bad_learning_rate(tmp_path: Path, data_root: Path) -> None:
    """Real pruner, objective minimised: a huge lr makes val/mae explode and MedianPruner stops it."""
    space = {"params": {"optim.lr": {"type": "categorical", "choices": [1e-2, 50.0]},
                        "optim.warmup_ratio": 0.0, "optim.clip_grad_norm": None}}
    out = tmp_path / "out"
    out.mkdir()
    study = optuna.create_study(storage=f"sqlite:///{out / 'study.db'}", study_name="tiny", direction="minimize")
    study.enqueue_trial({"optim.lr": 1e-2})  # a sane run first, then the deliberately bad category
    study.enqueue_trial({"optim.lr": 50.0})
    pruner = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)
    tune(_recipe(data_root, epochs=3), space, out, trials=2, pruner=pruner, objectives=["val/mae"])
    states = [t.state for t in optuna.load_study(study_name="tiny", storage=_storage(out)).trials]
    assert states == [TrialState.COMPLETE, TrialState.PRUNED]


def test_multi_objective_study_reports_a_pareto_front(tmp_path: Path, data_root: Path) -> None:
    out = tmp_path / "out"
    space = {"params": {"model.head.hidden": {"type": "categorical", "choices": [[4], [64, 32], [8]]},
                        "optim.lr": 3e-3}}
    res = tune(_recipe(data_root), space, out, trials=3, sampler="random",
               objectives=["val/srcc", "cost/trainable_params"])
    assert [o["name"] for o in res.objectives] == ["val/srcc", "cost/trainable_params"]
    assert res.pareto_front and all(set(r["values"]) == {"val/srcc", "cost/trainable_params"}
                                    for r in res.pareto_front)
    study = optuna.load_study(study_name="tiny", storage=_storage(out))
    assert len(study.directions) == 2 and {t.number for t in study.best_trials} == {
        r["trial"] for r in res.pareto_front}
    csv_rows = (out / "pareto_front.csv").read_text().splitlines()
    assert csv_rows[0].startswith("trial,val/srcc,cost/trainable_params") and len(csv_rows) == len(res.pareto_front) + 1
    # The best run is the front's best on the first objective; pruning was switched off.
    assert res.best_trial == max(res.pareto_front, key=lambda r: r["values"]["val/srcc"])["trial"]
    assert (out / "best-run" / "best" / "config.json").exists()
    for r in res.pareto_front:  # Pareto-front trials keep their models
        assert (out / "trials" / f"trial-{r['trial']:04d}" / "best").exists()


def test_best_run_is_retrained_when_its_folder_is_gone(tmp_path: Path, data_root: Path) -> None:
    out = tmp_path / "out"
    space = {"params": {"optim.lr": {"type": "categorical", "choices": [3e-3]}}}
    res = tune(_recipe(data_root), space, out, trials=1, pruner="none")
    value = res.best_values["val/srcc"]
    import shutil

    shutil.rmtree(out / "best-run")
    shutil.rmtree(out / "trials" / "trial-0000" / "best")  # e.g. the trial ran on another machine
    res2 = tune(_recipe(data_root), space, out, trials=1, pruner="none")
    assert res2.summary["best"]["source"] == "retrained"
    info = json.loads((out / "best-run" / "trial.json").read_text())
    assert info["retrained_values"][0] == pytest.approx(value, abs=1e-6)  # same seed, same result
    assert load_model(out / "best-run" / "best").config.metrics


@pytest.mark.slow  # spawned workers cold-start torch: ~20 s idle, a minute on a busy machine
def test_jobs_run_worker_processes_on_one_sqlite_study(tmp_path: Path, data_root: Path) -> None:
    """--jobs 2: one trial alone (fills the feature cache), then two spawned workers finish the total."""
    out = tmp_path / "out"
    res = tune(_recipe(data_root), SPACE, out, trials=3, jobs=2, pruner="none", sampler="random")
    study = optuna.load_study(study_name="tiny", storage=_storage(out))
    finished = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(finished) == 3 and res.counts["COMPLETE"] == 3
    assert all(t.state == TrialState.COMPLETE or t.user_attrs.get("surplus") for t in study.trials)
    assert len({json.dumps(t.params, sort_keys=True) for t in finished}) == 3
    assert (out / "best-run" / "best" / "config.json").exists()


def test_cli_tune_and_show(tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture,
                           caplog: pytest.LogCaptureFixture) -> None:
    cfg = _write(tmp_path / "recipe.yaml", _recipe(data_root))
    space = _write(tmp_path / "space.yaml", SPACE)
    out = tmp_path / "out"
    rc = main(["-q", "tune", str(cfg), "--space", str(space), "--trials", "2", "--out", str(out),
               "--sampler", "qmc", "--pruner", "hyperband", "--study", "cli", "--set", "optim.weight_decay=0.0"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "best trial" in printed and "best-run" in printed
    assert json.loads((out / "tune_summary.json").read_text())["study"] == "cli"
    assert main(["-q", "tune", "--show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "study cli: 2 trials" in shown and "COMPLETE" in shown
    _, listed = show(f"sqlite:///{out / 'study.db'}")  # the study alone: list choices decoded from their JSON
    assert listed["study"] == "cli" and isinstance(listed["best"]["params"]["model.head.hidden"], list)
    # A bad key is an error before anything runs (exit code 2, message names file and key).
    bad = _write(tmp_path / "bad.yaml", {"params": {"optim.lrr": {"type": "float", "low": 1, "high": 2}}})
    assert main(["-q", "tune", str(cfg), "--space", str(bad), "--out", str(tmp_path / "o2")]) == 2
    assert "bad.yaml: params.optim.lrr = 1.0 makes an invalid training config" in caplog.text


# ------------------------------------------------------------------------------------------ crash
def _wait_for(cond, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_stale_trial_of_a_dead_worker_is_failed_and_retried(tmp_path: Path, data_root: Path) -> None:
    """In-process stand-in for a dead worker: a RUNNING trial whose heartbeat stopped. The next worker
    marks it FAIL (after the grace period), re-runs its params as a new trial and reaches the total."""
    from optuna.distributions import FloatDistribution

    from tastelab.tuning.storage import make_storage

    space = {"params": {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}}
    out = tmp_path / "out"
    out.mkdir()
    storage = make_storage(f"sqlite:///{out / 'study.db'}", heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(storage=storage, study_name="tiny", direction="maximize")
    dead = study.ask({"optim.lr": FloatDistribution(1e-3, 1e-2, log=True)})
    storage.record_heartbeat(dead._trial_id)  # it beat once, then its process "died"
    # SQLite's CURRENT_TIMESTAMP has 1 s resolution: 2.5 s guarantees "older than the 1 s grace period".
    time.sleep(2.5)
    res = tune(_recipe(data_root), space, out, trials=1, pruner="none", heartbeat_interval=1, grace_period=1)
    trials = optuna.load_study(study_name="tiny", storage=_storage(out)).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].system_attrs.get("failed_trial") == 0 and trials[1].params == trials[0].params
    assert res.best_trial == 1 and res.counts["RUNNING"] == 0


@pytest.mark.slow  # a cold-started worker process (~10 s) plus the resumed study: ~25 s on an idle 2-core box
def test_killed_worker_trial_fails_and_is_retried(tmp_path: Path, data_root: Path) -> None:
    """SIGKILL a worker mid-trial; a new worker (heartbeat 1 s, grace 2 s) marks it FAIL, retries its
    params from the dead attempt's checkpoint and finishes the requested number of trials."""
    cfg = _write(tmp_path / "recipe.yaml", _recipe(data_root))
    space = _write(tmp_path / "space.yaml", {"params": {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2,
                                                                     "log": True}}})
    out = tmp_path / "out"
    # The doomed worker trains 500-epoch trials, so it is surely mid-trial when killed.
    cmd = [sys.executable, "-m", "tastelab.cli.main", "-q", "tune", str(cfg), "--space", str(space), "--out",
           str(out), "--trials", "1", "--pruner", "none", "--heartbeat-interval", "1", "--grace-period", "2",
           "--set", "train.epochs=500"]
    log = tmp_path / "doomed.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                start_new_session=True)
    metrics = out / "trials" / "trial-0000" / "metrics.jsonl"
    try:
        _wait_for(lambda: (metrics.exists() and metrics.read_text().count("\n") >= 1) or proc.poll() is not None,
                  120, "the first trial's first epoch")
        assert proc.poll() is None, log.read_text()
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    study = optuna.load_study(study_name="recipe", storage=_storage(out))
    assert [t.state for t in study.trials] == [TrialState.RUNNING]
    time.sleep(2.5)  # past the grace period: the dead trial's heartbeat is stale

    res = tune(cfg, space, out, trials=1, pruner="none", heartbeat_interval=1, grace_period=2)
    study = optuna.load_study(study_name="recipe", storage=_storage(out))
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert res.counts["COMPLETE"] == 1 and res.counts["RUNNING"] == 0 and res.best_trial == 1
    retry = study.trials[1]
    assert retry.system_attrs.get("failed_trial") == 0 and retry.params == study.trials[0].params
    # The retry continued the dead attempt's run (its epochs are in the history), not a fresh one.
    rows = (out / "trials" / f"trial-{retry.number:04d}" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) >= 1 and (out / "trials" / f"trial-{retry.number:04d}" / "summary.json").exists()
