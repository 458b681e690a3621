"""``tune --external --backend ray``: OptunaSearch over the project's own define-by-run space, ASHA on the
per-epoch composite, the fake trainer (tests/fake_lora_trainer.py) and the judge's fake metrics. The unit tests
need no Ray running; the end-to-end one starts a local Ray on the CPU (slow: Ray's start-up)."""

from __future__ import annotations

import collections
import logging
import math
import os
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest

from judge_fakes import fake_config, judge_with_fakes, make_references, registered_fakes
from tastelab.core.errors import UserError
from tastelab.external import CommandTemplate, tune_external
from tastelab.external.ray_trial import EPOCH, RayJob, TrialThread, define_by_run, trial_values
from tastelab.external.runner import TrialSettings, parse_objectives
from tastelab.tuning.space import load_space

TRAINER = Path(__file__).with_name("fake_lora_trainer.py")
PY = shlex.quote(sys.executable)
SPACE = {"params": {"learning_rate": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True, "default": 1e-4},
                    "network_dim": {"type": "int", "low": 16, "high": 64, "step": 16, "default": 32}}}


def command(*extra: str, epochs: int = 3, sleep: float = 0.05) -> str:
    return (f"{PY} {shlex.quote(str(TRAINER))} --out {{trial_dir}} --lr {{learning_rate}} --dim {{network_dim}} "
            f"--epochs {epochs} --sleep {sleep} --seed {{seed}} " + " ".join(extra))


@pytest.fixture
def fake_metrics() -> Iterator[collections.Counter[str]]:
    yield from registered_fakes()


@pytest.fixture
def refs(tmp_path: Path) -> Path:
    make_references(tmp_path / "refs")
    return tmp_path / "refs"


def _gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_the_define_by_run_space_is_the_project_space() -> None:
    """OptunaSearch samples with SearchSpace.suggest; a trial's config turns back into the trainer's values
    (JSON-encoded choices decoded, conditional parameters only when active) with the same code."""
    space = load_space({"params": {
        "optimizer": {"type": "categorical", "choices": ["AdamW", "Prodigy"]},
        "lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True, "when": {"optimizer": "AdamW"}},
        "dims": {"type": "categorical", "choices": [[16, 8], [32, 16]]},
        "epochs": {"type": "fixed", "value": 10}}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        define_by_run(space)(trial)
        values, params, dists = trial_values(space, trial.params)
        assert params == trial.params and dists == trial.distributions
        assert values == space.from_params(trial.params)
        assert values["epochs"] == 10 and values["dims"] in ([16, 8], [32, 16])
        assert ("lr" in values) == (values["optimizer"] == "AdamW")
        seen.add(values["optimizer"])
        study.tell(trial, 0.0)
    assert seen == {"AdamW", "Prodigy"}


def _job(tmp_path: Path, refs: Path, cmd: str) -> RayJob:
    from tastelab.judge.config import load_judge_config

    settings = TrialSettings(command=CommandTemplate.parse(cmd), objectives=parse_objectives(["composite"]),
                             watch="samples", poll_s=0.05, settle_s=5, quiet_s=0.0, references=str(refs),
                             judge_config=load_judge_config(raw=fake_config()), device="cpu", grace_s=2.0,
                             trial_report=False)
    return RayJob(settings=settings, space=load_space(SPACE), objective=settings.objectives[0], out=tmp_path / "out",
                  cwd=Path.cwd())


def test_trial_thread_reports_each_epoch_and_stop_ends_the_trainer_group(tmp_path: Path, refs: Path,
                                                                          fake_metrics) -> None:
    """What the Ray trainable does, without Ray: one result per judged epoch (the objective and ``epoch``),
    and ``stop`` (Ray's cleanup when ASHA stops the trial) terminates the trainer and its child."""
    trial = TrialThread(_job(tmp_path, refs, command("--child", epochs=100, sleep=0.4)),  # 40 s left alone
                        {"learning_rate": 1e-4, "network_dim": 32}, "abc_00002")
    assert trial.number == 2 and trial.trial_dir == tmp_path / "out" / "trials" / "trial-abc_00002"
    trial.start()
    first = trial.next_result()
    assert first[EPOCH] == 1 and 0.0 < first["composite"] <= 1.0 and "done" not in first
    assert trial.report(2, 0.5) is False  # not stopped yet: the trainer keeps going
    leader, child = map(int, (trial.trial_dir / "pids.txt").read_text().split())
    t0 = time.monotonic()
    trial.stop()
    assert time.monotonic() - t0 < 15 and not trial._thread.is_alive()
    assert _gone(leader) and _gone(child)
    assert trial.report(3, 0.5) is True  # after stop: every report asks to stop


def test_trial_thread_final_result_is_the_best_checkpoint(tmp_path: Path, refs: Path, fake_metrics) -> None:
    trial = TrialThread(_job(tmp_path, refs, command(epochs=2)), {"learning_rate": 1e-4, "network_dim": 32},
                        "abc_00000")
    trial.start()
    results = [trial.next_result()]
    while not results[-1].get("done"):
        results.append(trial.next_result())
    assert [r[EPOCH] for r in results] == [1, 2, 2]
    assert results[-1]["composite"] == max(r["composite"] for r in results[:-1])
    assert '"best_checkpoint": "lora-000002"' in results[-1]["outcome"]
    trial.stop()


def test_ray_backend_refuses_what_it_cannot_do(tmp_path: Path, refs: Path, fake_metrics,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    base = dict(command=command(), space=SPACE, out=str(tmp_path / "out"), judge=fake_config(),
                references=str(refs), backend="ray", device="cpu")
    with pytest.raises(UserError, match="one objective only"):
        tune_external(**base, objectives=["composite", "train_time"])
    with pytest.raises(UserError, match="refine needs the default back-end"):
        tune_external(**base, phases="all")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    with pytest.raises(UserError, match=r"needs the ray extra: pip install 'tastelab\[ray\]'") as info:
        tune_external(**base)
    assert "\n" not in str(info.value)


@pytest.fixture
def local_ray(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A local Ray on two CPUs; its workers import this checkout's src and the test helpers."""
    ray = pytest.importorskip("ray")
    here = Path(__file__).parent
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(here.parent / "src"), str(here),
                                                      os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.slow  # Ray's start-up and three trials (about a minute)
def test_ray_tune_runs_trials_and_asha_stops_the_bad_one(tmp_path: Path, refs: Path, fake_metrics,
                                                         local_ray) -> None:
    """Baseline (lr 1e-4, the fake trainer's best) first, then two sampled trials one at a time: ASHA compares
    each trial's epoch-1 composite with the earlier ones and stops a worse one; a completed trial's value is
    its best checkpoint's composite; the same summary and study report are written."""
    result = tune_external(command=command("--child", epochs=4, sleep=2.0), space=SPACE, out=str(tmp_path / "out"),
                           judge=fake_config(), references=str(refs), backend="ray", phases="baseline,search",
                           trials=2, jobs=1, cpus_per_trial=1, sampler="random", seed=1, device="cpu",
                           poll_interval=0.05, settle=5, quiet=0.0, kill_grace=2.0, trial_reports=False,
                           judge_fn=judge_with_fakes)
    rows = result.summary["trials"]
    assert len(rows) == 3
    assert rows[0]["phase"] == "baseline" and rows[0]["params"] == {"learning_rate": 1e-4, "network_dim": 32}
    assert rows[0]["state"] == "COMPLETE"
    states = [r["state"] for r in rows]
    assert "PRUNED" in states, rows
    for row in rows:
        epochs = sorted(int(k) for k in row.get("intermediate", {}))
        if row["state"] == "COMPLETE":
            assert epochs == [1, 2, 3, 4]
            assert math.isclose(row["values"]["composite"], max(row["intermediate"].values()))
        elif row["state"] == "PRUNED":
            assert len(epochs) < 4  # stopped before the trainer finished
            leader, child = map(int, (Path(row["trial_dir"]) / "pids.txt").read_text().split())
            assert _gone(leader) and _gone(child)  # the trainer's whole group is gone
            assert "epoch 4 done" not in (Path(row["trial_dir"]) / "trainer.log").read_text()  # stopped, not done
    assert result.best_trial == 0 and result.best_params["learning_rate"] == 1e-4
    assert (tmp_path / "out" / "study_report.html").is_file()
    assert (tmp_path / "out" / "tune_summary.json").is_file()
    study = optuna.load_study(study_name="external", storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    assert [t.user_attrs["backend"] for t in study.trials] == ["ray"] * 3


def test_cli_backend_ray_errors_are_one_line(tmp_path: Path, refs: Path, fake_metrics,
                                             caplog: pytest.LogCaptureFixture) -> None:
    import yaml

    from tastelab.cli.main import main

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    judge = tmp_path / "judge.yaml"
    judge.write_text(yaml.safe_dump(fake_config()))
    args = ["tune", "--external", command(), "--space", str(space), "--judge", str(judge), "--references", str(refs),
            "--out", str(tmp_path / "out"), "--backend", "ray", "--gpus-per-trial", "0.5", "--cpus-per-trial", "2"]
    for extra, needle in ((["--objectives", "composite,train_time"], "one objective only"),
                          (["--phases", "all"], "refine needs the default back-end")):
        caplog.clear()
        assert main([*args, *extra]) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and needle in errors[0] and "\n" not in errors[0]
    assert not (tmp_path / "out" / "trials").exists()
