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
from dataclasses import replace
from pathlib import Path

import optuna
import pytest

from judge_fakes import fake_config, judge_with_fakes, make_references, registered_fakes
from tastelab.core.errors import UserError
from tastelab.external import CommandTemplate, tune_external
from tastelab.external.ray_trial import EPOCH, SEED, RayJob, TrialThread, define_by_run, trial_values
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


def _job(tmp_path: Path, refs: Path, cmd: str, objectives: tuple[str, ...] = ("composite",)) -> RayJob:
    from tastelab.judge.config import load_judge_config

    settings = TrialSettings(command=CommandTemplate.parse(cmd), objectives=parse_objectives(list(objectives)),
                             watch="samples", poll_s=0.05, settle_s=5, quiet_s=0.0, references=str(refs),
                             judge_config=load_judge_config(raw=fake_config()), device="cpu", grace_s=2.0,
                             trial_report=False)
    return RayJob(settings=settings, space=load_space(SPACE), objectives=settings.objectives, out=tmp_path / "out",
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


def test_trial_thread_several_objectives_and_a_seed_rerun(tmp_path: Path, refs: Path, fake_metrics) -> None:
    """Several objectives: no per-checkpoint results (a Ray result must carry every objective; Optuna keeps no
    intermediate values for them), one final result with every objective; a seed re-run's config carries its
    own {seed} (SEED), which is no parameter of the trial."""
    trial = TrialThread(_job(tmp_path, refs, command(epochs=2), objectives=("composite", "train_time")),
                        {"learning_rate": 1e-4, "network_dim": 32, SEED: 7}, "abc_00001")
    assert trial.params == {"learning_rate": 1e-4, "network_dim": 32} and trial.seed == 7
    trial.start()
    final = trial.next_result()
    assert final.get("done") is True and final[EPOCH] == 2
    assert 0.0 < final["composite"] <= 1.0 and final["train_time"] > 0.0
    assert "--seed 7" in (trial.trial_dir / "trainer.log").read_text().splitlines()[0]
    trial.stop()


def test_the_searcher_knows_the_study_and_samples_the_refine_space(tmp_path: Path, refs: Path, fake_metrics) -> None:
    """OptunaSearch (no Ray running) starts from a copy of the study's finished trials, as the default back-end's
    sampler does, with the study's directions (several objectives: both metrics); in the refine phase it
    samples the space narrowed by the default back-end's refine_space, with TPE over that history."""
    pytest.importorskip("ray.tune.search.optuna")
    from tastelab.external.ray_backend import make_searcher
    from tastelab.external.study import refine_space

    space = load_space(SPACE)
    study = optuna.create_study(directions=["maximize", "minimize"])
    for i, lr in enumerate((1e-4, 2e-4, 1e-5, 1e-3)):
        study.add_trial(optuna.trial.create_trial(
            params={"learning_rate": lr, "network_dim": 32}, values=[1.0 - i / 10, 100.0 + i],
            distributions={"learning_rate": optuna.distributions.FloatDistribution(1e-6, 1e-2, log=True),
                           "network_dim": optuna.distributions.IntDistribution(16, 64, step=16)},
            user_attrs={"phase": "search", "params": {"learning_rate": lr, "network_dim": 32}}))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))
    narrowed = refine_space(study, space, 2)
    assert narrowed is not None and study.user_attrs["tastelab.external.refine_space"]
    job = _job(tmp_path, refs, command(), objectives=("composite", "train_time"))
    searcher = make_searcher(study, replace(job, space=narrowed), sampler="tpe", seed=0, n=3)
    assert searcher.metric == ["composite", "train_time"] and searcher.mode == ["max", "min"]
    history = searcher._ot_study.get_trials(deepcopy=False)
    assert [t.values for t in history] == [t.values for t in study.trials[:4]]  # the FAIL one left out
    lr = next(p for p in narrowed.params if p.key == "learning_rate")
    for k in range(3):
        config = searcher.suggest(f"t{k}")
        assert lr.low <= config["learning_rate"] <= lr.high and config["network_dim"] in (16, 32, 48)
        searcher.on_trial_complete(f"t{k}", {"composite": 0.5, "train_time": 50.0})
    assert len(searcher._ot_study.trials) == 7


def test_ray_backend_refuses_what_it_cannot_do(tmp_path: Path, refs: Path, fake_metrics,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    base = dict(command=command(), space=SPACE, out=str(tmp_path / "out"), judge=fake_config(),
                references=str(refs), backend="ray", device="cpu")
    space = {"params": {**SPACE["params"], SEED: {"type": "int", "low": 1, "high": 2}}}
    with pytest.raises(UserError, match="tastelab_seed is the seed re-runs' config key"):
        tune_external(**{**base, "space": space})
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


RAY_RUN = dict(judge=fake_config(), backend="ray", jobs=1, cpus_per_trial=1, sampler="random", seed=1, device="cpu",
               poll_interval=0.05, settle=5, quiet=0.0, kill_grace=2.0, trial_reports=False,
               judge_fn=judge_with_fakes)


@pytest.mark.slow  # Ray's start-up and three trials
def test_ray_tune_several_objectives_make_a_pareto_study(tmp_path: Path, refs: Path, fake_metrics,
                                                         local_ray) -> None:
    """composite,train_time on Ray: OptunaSearch gets both metrics, no trial is stopped early (as the default
    back-end, which does not prune several objectives), every trial lands in the study with both values and
    the Pareto front is in tune_summary.json and pareto_front.csv."""
    out = tmp_path / "out"
    result = tune_external(command=command(epochs=2, sleep=0.2), space=SPACE, out=str(out), references=str(refs),
                           phases="baseline,search", trials=2, objectives=["composite", "train_time"], **RAY_RUN)
    study = optuna.load_study(study_name="external", storage=f"sqlite:///{out / 'study.db'}")
    assert len(study.directions) == 2 and len(study.trials) == 3
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert all(len(t.values) == 2 and t.values[1] > 0 and not t.intermediate_values for t in study.trials)
    assert study.trials[0].user_attrs["phase"] == "baseline"
    front = result.summary["pareto_front"]
    assert front and result.pareto_front == front
    assert {r["trial"] for r in front} == {t.number for t in study.best_trials}
    lines = (out / "pareto_front.csv").read_text().splitlines()
    assert lines[0] == "trial,composite,train_time,learning_rate,network_dim" and len(lines) == len(front) + 1
    assert all(set(r["values"]) == {"composite", "train_time"} for r in result.summary["trials"])


@pytest.mark.slow  # Ray's start-up, then four Tuner runs (search, refine, seed re-runs)
def test_ray_tune_runs_the_refine_phase(tmp_path: Path, refs: Path, fake_metrics, local_ray) -> None:
    """--phases all on Ray: after baseline and search, the space narrowed with the default back-end's code
    (stored in the study), the refine trials sampled in it through Ray, then the best configuration re-run
    with each refine seed through Ray (its {seed}), and the seed spread in the summary."""
    from tastelab.external.phases import load_narrowed

    out = tmp_path / "out"
    result = tune_external(command=command(epochs=2, sleep=0.2), space=SPACE, out=str(out), references=str(refs),
                           phases="all", trials=2, refine_trials=1, refine_top_k=2, refine_seeds=[5], **RAY_RUN)
    rows = result.summary["trials"]
    assert [r["phase"] for r in rows] == ["baseline", "search", "search", "refine", "seeds"], rows
    study = optuna.load_study(study_name="external", storage=f"sqlite:///{out / 'study.db'}")
    raw = study.user_attrs["tastelab.external.refine_space"]
    assert result.summary["refine_space"] == raw
    narrowed = load_narrowed(raw, "space")
    refine = study.trials[3]
    lr = next(p for p in narrowed.params if p.key == "learning_rate")
    assert refine.distributions["learning_rate"].low == lr.low and refine.distributions["learning_rate"].high == lr.high
    assert lr.low <= refine.params["learning_rate"] <= lr.high
    assert (lr.low, lr.high) != (1e-6, 1e-2)  # narrowed around the top trials
    seeds = rows[4]
    assert seeds["state"] == "COMPLETE" and seeds["seed"] == 5
    best = max((r for r in rows[:4] if r["state"] == "COMPLETE"), key=lambda r: (r["values"]["composite"], -r["trial"]))
    assert study.trials[4].user_attrs["seed_of"] == result.seed_spread["trial"] == best["trial"]
    assert seeds["params"] == best["params"]
    assert "--seed 5" in (Path(seeds["trial_dir"]) / "trainer.log").read_text().splitlines()[0]
    assert [r["seed"] for r in result.seed_spread["runs"]] == [1, 5] and result.seed_spread["n"] == 2


def test_cli_backend_ray_errors_are_one_line(tmp_path: Path, refs: Path, fake_metrics,
                                             caplog: pytest.LogCaptureFixture) -> None:
    import yaml

    from tastelab.cli.main import main

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"params": {**SPACE["params"],
                                                SEED: {"type": "int", "low": 1, "high": 2, "default": 1}}}))
    judge = tmp_path / "judge.yaml"
    judge.write_text(yaml.safe_dump(fake_config()))
    args = ["tune", "--external", command(), "--space", str(space), "--judge", str(judge), "--references", str(refs),
            "--out", str(tmp_path / "out"), "--backend", "ray", "--gpus-per-trial", "0.5", "--cpus-per-trial", "2",
            "--objectives", "composite,train_time", "--phases", "all"]
    assert main(args) == 2  # several objectives and every phase are fine on Ray; the parameter's name is not
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "seed re-runs' config key" in errors[0] and "\n" not in errors[0]
    assert not (tmp_path / "out" / "trials").exists()
