"""``tastelab tune --external``: a fake trainer (tests/fake_lora_trainer.py, run with sys.executable) writes
kohya sample images or checkpoints epoch by epoch, with a quality known from its parameters; the judge runs with
the fake metrics of judge_fakes, so a trial takes about a second."""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest

from judge_fakes import REF_COLOUR, fake_config, make_references, registered_fakes
from tastelab.core.errors import UserError
from tastelab.external import CommandTemplate, tune_external
from tastelab.external.phases import baseline_params, narrow_space
from tastelab.external.process import TrainerProcess
from tastelab.external.runner import TrialSettings, parse_objectives, run_trial
from tastelab.external.watcher import Watcher, checkpoint_position
from tastelab.tuning import show
from tastelab.tuning.space import SpaceError, load_space

TRAINER = Path(__file__).with_name("fake_lora_trainer.py")
PY = shlex.quote(sys.executable)
SPACE = {"params": {"learning_rate": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True, "default": 1e-5},
                    "network_dim": {"type": "int", "low": 16, "high": 64, "step": 16, "default": 32}}}


def command(*extra: str, epochs: int = 2, sleep: float = 0.05) -> str:
    return (f"{PY} {shlex.quote(str(TRAINER))} --out {{trial_dir}} --lr {{learning_rate}} --dim {{network_dim}} "
            f"--epochs {epochs} --sleep {sleep} --seed {{seed}} " + " ".join(extra))


@pytest.fixture
def fake_metrics() -> Iterator[collections.Counter[str]]:
    yield from registered_fakes()


@pytest.fixture
def refs(tmp_path: Path) -> Path:
    make_references(tmp_path / "refs")
    return tmp_path / "refs"


def _base(tmp_path: Path, refs: Path, **kw: Any) -> dict[str, Any]:
    settings: dict[str, Any] = dict(space=SPACE, out=str(tmp_path / "out"), judge=fake_config(), references=str(refs),
                                    poll_interval=0.05, settle=5, quiet=0.0, pruner="none", device="cpu", trials=1,
                                    kill_grace=2.0, trial_reports=False)  # the judge's report: where asserted
    settings.update(kw)
    return settings


def _study(tmp_path: Path) -> optuna.Study:
    return optuna.load_study(study_name="external", storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")


def _gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # a zombie of ours counts as gone once reaped; the trainer's child is reparented to init
        time.sleep(0.05)
    return False


# ------------------------------------------------------------------------------------------ command template
def test_placeholders_fill_per_token_and_keep_values_one_argument() -> None:
    t = CommandTemplate.parse("train.py --lr {lr} --name 'my {name}' --opt={optim.kind} --json '{{\"a\": 1}}' "
                              "{trial_dir}")
    assert t.names == {"lr", "name", "optim.kind", "trial_dir"}
    argv = t.fill({"lr": 1e-4, "name": "a b; rm -rf /", "optim.kind": "AdamW", "trial_dir": "/tmp/x y"})
    assert argv == ["train.py", "--lr", "0.0001", "--name", "my a b; rm -rf /", "--opt=AdamW", "--json", '{"a": 1}',
                    "/tmp/x y"]
    assert CommandTemplate.parse("p {flag} {dims}").fill({"flag": True, "dims": [1, 2]}) == ["p", "true", "[1, 2]"]


def test_shell_mode_quotes_every_value(tmp_path: Path) -> None:
    t = CommandTemplate.parse("echo {v} > {trial_dir}/o.txt && echo done", shell=True)
    argv = t.fill({"v": "x; touch pwned $(id)", "trial_dir": str(tmp_path)})
    assert argv[:2] == ["/bin/sh", "-c"]
    subprocess.run(argv, check=True, cwd=tmp_path)
    assert (tmp_path / "o.txt").read_text().strip() == "x; touch pwned $(id)"
    assert not (tmp_path / "pwned").exists()


def test_unknown_placeholder_fails_before_any_trial(tmp_path: Path, refs: Path, fake_metrics) -> None:
    with pytest.raises(UserError, match=r"unknown placeholder\(s\) \{learning_rat\}") as info:
        tune_external(**_base(tmp_path, refs, command="train --lr {learning_rat} --out {trial_dir}"))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out" / "trials").exists()
    for bad in ("train {", "train {a b}", "train 'open"):
        with pytest.raises(UserError):
            CommandTemplate.parse(bad)


def test_space_defaults_are_validated() -> None:
    with pytest.raises(SpaceError, match=r"learning_rate.default: 0.5 is outside"):
        load_space({"params": {"learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "default": 0.5}}})
    with pytest.raises(SpaceError, match="not one of the choices"):
        load_space({"params": {"opt": {"type": "categorical", "choices": ["AdamW", "Lion"], "default": "SGD"}}})
    space = load_space({"params": {"opt": {"type": "categorical", "choices": ["AdamW", "Lion"], "default": "Lion"},
                                   "lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True}}})
    with pytest.raises(UserError, match="baseline phase needs a value for lr"):
        baseline_params(space)
    assert baseline_params(space, {"lr": "2e-4"}) == {"opt": "Lion", "lr": 2e-4}


def test_shipped_lora_space_parses_with_defaults() -> None:
    space = load_space(Path(__file__).parents[1] / "configs" / "tune" / "lora_space.yaml")
    assert {p.key for p in space.params} >= {"learning_rate", "network_dim", "epochs", "optimizer"}
    assert baseline_params(space)  # every searched parameter has a default


def test_objectives_parse() -> None:
    objs = parse_objectives(["composite", "train_time", "diversity:min", "metric:clip_t"])
    assert [(o.name, o.direction) for o in objs] == [("composite", "maximize"), ("train_time", "minimize"),
                                                     ("diversity", "minimize"), ("metric:clip_t", "maximize")]
    for bad in (["speed"], ["composite", "composite:min"], ["composite:up"]):
        with pytest.raises(UserError):
            parse_objectives(bad)
    from types import SimpleNamespace

    row = SimpleNamespace(composite=0.6, composite_low=0.5, family_scores={"diversity": 0.3, "consistency": 0.8},
                          metric_scores={"clip_t": 0.7})
    assert [o.value(row, 12.5) for o in objs] == [0.6, 12.5, 0.3, 0.7]
    assert math.isnan(parse_objectives(["alignment"])[0].value(row, 1.0))  # not measured: never a score


# ------------------------------------------------------------------------------------------ watcher
def test_watcher_waits_for_a_growing_file_and_knows_the_layouts(tmp_path: Path) -> None:
    w = Watcher(tmp_path, quiet_s=0.0)
    ckpt = tmp_path / "lora-000001.safetensors"
    ckpt.write_bytes(b"x" * 10)
    assert w.poll() == []  # first sight: cannot know yet whether it grows
    with ckpt.open("ab") as fh:
        fh.write(b"y" * 10)
    assert w.poll() == []  # grew since the last poll
    units = w.poll()
    assert [(u.name, u.epoch, u.path) for u in units] == [("lora-000001", 1, ckpt)]
    assert w.poll() == []  # once only
    (tmp_path / "lora-000002-state").mkdir()
    (tmp_path / "lora-000002-state" / "model.safetensors").write_bytes(b"s")  # training state: not a LoRA
    (tmp_path / "checkpoint-500").mkdir()
    (tmp_path / "checkpoint-500" / "pytorch_lora_weights.safetensors").write_bytes(b"d")
    (tmp_path / "lora.safetensors").write_bytes(b"f")
    w.poll()
    units = w.poll()
    assert [(u.name, u.epoch, u.step) for u in units] == [("checkpoint-500", None, 500), ("lora", None, None)]
    assert units[0].path == tmp_path / "checkpoint-500"
    assert checkpoint_position("lora-step00000500") == (None, 500)
    g = Watcher(tmp_path, checkpoint_glob="checkpoint-*", quiet_s=0.0)
    assert g.poll(final=True)[0].name == "checkpoint-500"  # final: the trainer exited, files are complete


def test_watcher_sample_sets_complete_when_a_later_epoch_appears(tmp_path: Path) -> None:
    from judge_fakes import make_kohya

    make_kohya(tmp_path, [1])
    w = Watcher(tmp_path, "samples", settle_s=60, quiet_s=0.0)
    assert w.poll() == [] and w.poll() == []  # stable files, but the set may still grow (settle 60 s)
    make_kohya(tmp_path, [2])
    assert [u.name for u in w.poll()] == ["lora-000001"]  # a later set appeared: epoch 1 is complete
    assert w.poll() == []  # epoch 2: complete files, but the last set may still grow
    assert [(u.name, u.epoch, len(u.samples)) for u in w.poll(final=True)] == [("lora-000002", 2, 4)]
    x = Watcher(tmp_path, "samples", settle_s=60, expected_images=4, quiet_s=0.0)
    x.poll()
    assert [u.name for u in x.poll()] == ["lora-000001", "lora-000002"]


# ------------------------------------------------------------------------------------------ one trial
def _settings(refs: Path, cmd: str, **kw: Any) -> TrialSettings:
    from tastelab.judge.config import load_judge_config

    base: dict[str, Any] = dict(command=CommandTemplate.parse(cmd), objectives=parse_objectives(["composite"]),
                                watch="samples", poll_s=0.05, settle_s=5, quiet_s=0.0, references=str(refs),
                                judge_config=load_judge_config(raw=fake_config()), device="cpu", grace_s=2.0)
    base.update(kw)
    return TrialSettings(**base)


def test_run_trial_reports_each_epoch_as_it_appears(tmp_path: Path, refs: Path, fake_metrics) -> None:
    reported: list[tuple[int, float, int]] = []
    tdir = tmp_path / "t"
    tdir.mkdir()

    def report(step: int, value: float) -> bool:
        epochs_on_disk = len({p.name.split("_")[1] for p in (tdir / "sample").glob("*.png")})
        reported.append((step, value, epochs_on_disk))
        return False

    outcome = run_trial(_settings(refs, command(epochs=3, sleep=0.4)), {"learning_rate": 1e-4, "network_dim": 32},
                        tdir, report)
    assert [s for s, _, _ in reported] == [1, 2, 3]
    assert reported[0][2] < 3  # epoch 1 was judged while the trainer was still training
    values = [v for _, v, _ in reported]
    assert values == sorted(values) and values[0] < values[-1]  # the fake trainer improves with epochs
    assert outcome.best["checkpoint"] == "lora-000003" and outcome.best["epoch"] == 3
    assert outcome.best["composite_low"] <= outcome.values["composite"] <= outcome.best["composite_high"]
    assert (tdir / "_tastelab" / "judge" / "report.html").is_file()
    assert "fake trainer: lr=0.0001" in (tdir / "trainer.log").read_text()


def test_checkpoints_are_generated_only_once_complete(tmp_path: Path, refs: Path, fake_metrics) -> None:
    """The generator gets each checkpoint once it stops growing (written in 6 chunks, 60 ms apart, polled every
    20 ms: the file looks unchanged between two polls, so only the quiet period tells), the final un-numbered
    save included."""
    from judge_fakes import _picture

    seen: list[tuple[str, int, int]] = []

    def generator(ckpt: Path, out: Path) -> None:
        data = ckpt.read_bytes()
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + size])
        seen.append((ckpt.name, len(data), header["epoch"]))
        off = int(min(150.0, 10 + 300 * abs(math.log10(header["lr"]) + 4)) / header["epoch"])
        folder = out / ckpt.stem
        folder.mkdir(parents=True, exist_ok=True)
        for p in range(2):
            for s in range(2):
                _picture((REF_COLOUR[0] - off, REF_COLOUR[1] + off // 2, REF_COLOUR[2] + off), 6 * s + 3 * p).save(
                    folder / f"p{p}_s{s}.png")

    tdir = tmp_path / "t"
    tdir.mkdir()
    steps: list[int] = []
    settings = _settings(refs, command("--mode checkpoints --chunks 6 --chunk-pause 0.06", epochs=3),
                         watch="checkpoints", poll_s=0.02, quiet_s=0.25)
    outcome = run_trial(settings, {"learning_rate": 1e-4, "network_dim": 32}, tdir,
                        lambda step, value: steps.append(step) or False, generator=generator)
    full = len(json.dumps({"lr": 1e-4, "dim": 32, "epoch": 1, "seed": 0})) + 8 + 4096
    assert [(name, size) for name, size, _ in seen] == [("lora-000001.safetensors", full),
                                                        ("lora-000002.safetensors", full),
                                                        ("lora.safetensors", full)]
    assert steps == [1, 2, 3]  # the final save comes after the numbered epochs
    assert outcome.best["checkpoint"] == "lora" and outcome.best["path"].endswith("lora.safetensors")


def test_the_default_generator_needs_the_generate_extra(tmp_path: Path, refs: Path, fake_metrics,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if the extra were not installed (find_spec: None)
    with pytest.raises(UserError, match=r"needs the generate extra: pip install 'tastelab\[generate\]'") as info:
        tune_external(**_base(tmp_path, refs, command=command(), base="sd15", prompts=str(refs / "p.txt")))
    assert "diffusers not installed" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(UserError, match="needs --base MODEL and --prompts"):
        tune_external(**_base(tmp_path, refs, command=command(), watch="checkpoints"))
    assert not (tmp_path / "out" / "trials").exists()


# ------------------------------------------------------------------------------------------ process control
def test_pruning_terminates_the_whole_process_group(tmp_path: Path, refs: Path, fake_metrics) -> None:
    t0 = time.monotonic()
    result = tune_external(**_base(tmp_path, refs, command=command("--child", epochs=20, sleep=0.3),
                                   pruner=optuna.pruners.ThresholdPruner(lower=0.99)))
    assert time.monotonic() - t0 < 20
    trial = _study(tmp_path).trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert list(trial.intermediate_values) == [1]
    leader, child = map(int, (Path(trial.user_attrs["trial_dir"]) / "pids.txt").read_text().split())
    assert _gone(leader) and _gone(child)
    assert result.best_trial is None and result.summary["counts"]["PRUNED"] == 1


def test_a_trainer_ignoring_sigterm_is_killed(tmp_path: Path) -> None:
    proc = TrainerProcess([sys.executable, str(TRAINER), "--out", str(tmp_path), "--lr", "1e-4", "--epochs", "50",
                           "--sleep", "1", "--child", "--ignore-term"], tmp_path / "trainer.log", grace_s=0.5)
    proc.start()
    while not (tmp_path / "pids.txt").exists():
        time.sleep(0.05)
    code, timed_out = proc.wait(lambda: None, poll_s=0.05, timeout_s=0.5)
    assert timed_out and code == -signal.SIGKILL
    leader, child = map(int, (tmp_path / "pids.txt").read_text().split())
    assert _gone(leader) and _gone(child)


def test_timeout_without_checkpoints_fails_with_the_log_tail(tmp_path: Path, refs: Path, fake_metrics) -> None:
    tune_external(**_base(tmp_path, refs, command=command(epochs=5, sleep=10), trial_timeout=0.5))
    trial = _study(tmp_path).trials[0]
    assert trial.state == optuna.trial.TrialState.FAIL
    assert "ran past --trial-timeout (0.5s)" in trial.user_attrs["error"]
    assert "fake trainer: lr=" in trial.user_attrs["log_tail"]


def test_failure_without_checkpoints_is_fail_with_log_tail_and_with_checkpoints_counts(
        tmp_path: Path, refs: Path, fake_metrics) -> None:
    tune_external(**_base(tmp_path, refs, command=command("--fail-after 0")))
    trial = _study(tmp_path).trials[0]
    assert trial.state == optuna.trial.TrialState.FAIL
    assert "exited with code 3" in trial.user_attrs["error"] and trial.user_attrs["returncode"] == 3
    assert "CUDA out of memory (fake)" in trial.user_attrs["log_tail"]

    out2 = tmp_path / "second"
    result = tune_external(**_base(tmp_path, refs, command=command("--fail-after 1", epochs=3), out=str(out2)))
    row = result.summary["trials"][0]
    assert row["state"] == "COMPLETE" and row["best_checkpoint"] == "lora-000001"
    assert any("exited with code 3" in w for w in row["warnings"])


# ------------------------------------------------------------------------------------------ phases and studies
@pytest.mark.slow  # eight trials, each judged and reported (about 30 s)
def test_phases_baseline_first_refine_narrows_and_seeds_measure_spread(tmp_path: Path, refs: Path,
                                                                       fake_metrics) -> None:
    result = tune_external(**_base(tmp_path, refs, command=command(), phases="all", trials=3, refine_trials=2,
                                   refine_top_k=2, refine_seeds=[1, 2], trial_reports=True))
    study = _study(tmp_path)
    trials = study.trials
    assert trials[0].user_attrs["phase"] == "baseline"
    assert trials[0].params == {"learning_rate": 1e-5, "network_dim": 32}  # the space's defaults
    assert [t.user_attrs["phase"] for t in trials] == ["baseline", *["search"] * 3, *["refine"] * 2, "seeds", "seeds"]
    top = sorted((t for t in trials[:4]), key=lambda t: -t.values[0])[:2]
    lrs = [t.params["learning_rate"] for t in top]
    refine = study.user_attrs["tastelab.external.refine_space"]["params"]["learning_rate"]
    assert refine["low"] >= min(lrs) / 1.5 - 1e-12 and refine["high"] <= max(lrs) * 1.5 + 1e-12
    assert refine["high"] - refine["low"] < 1e-2 - 1e-6  # narrower than the space
    for t in trials[4:6]:
        assert refine["low"] <= t.params["learning_rate"] <= refine["high"]
    seeds = [t for t in trials if t.user_attrs["phase"] == "seeds"]
    assert {t.user_attrs["seed"] for t in seeds} == {1, 2}
    best_of = seeds[0].user_attrs["seed_of"]
    assert all(t.params == trials[best_of].params for t in seeds)
    spread = result.seed_spread
    assert spread is not None and spread["n"] == 3 and spread["std"] > 0
    assert set(json.loads((tmp_path / "out" / "tune_summary.json").read_text())) >= {"seed_spread", "refine_space",
                                                                                     "trials", "best"}
    html = (tmp_path / "out" / "study_report.html").read_text()
    assert "Seed spread" in html and "<svg" in html and "_tastelab/judge/report.html" in html


def test_trial_folders_are_fresh_and_leftovers_are_kept_aside(tmp_path: Path) -> None:
    from tastelab.external.study import trial_folder

    old = tmp_path / "trials" / "trial-0007"
    old.mkdir(parents=True)
    (old / "lora.safetensors").write_bytes(b"keep me")
    fresh = trial_folder(tmp_path, 7)
    assert fresh == old and list(fresh.iterdir()) == []
    aside = [p for p in (tmp_path / "trials").iterdir() if p.name.startswith("trial-0007.old-")]
    assert len(aside) == 1 and (aside[0] / "lora.safetensors").read_bytes() == b"keep me"


def test_narrow_space_keeps_the_grid_and_fixes_agreed_choices() -> None:
    space = load_space({"params": {
        "lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
        "dim": {"type": "int", "low": 16, "high": 64, "step": 16},
        "opt": {"type": "categorical", "choices": ["AdamW", "Lion", "Prodigy"]},
        "mix": {"type": "categorical", "choices": ["a", "b"]}}})
    top = [{"lr": 2e-4, "dim": 32, "opt": "Lion", "mix": "a"}, {"lr": 5e-5, "dim": 48, "opt": "Lion", "mix": "b"}]
    raw = narrow_space(space, top)["params"]
    assert raw["lr"] == {"type": "float", "low": 5e-5, "high": 2e-4, "log": True}
    assert raw["dim"] == {"type": "int", "low": 32, "high": 48, "step": 16}
    assert raw["opt"] == {"type": "fixed", "value": "Lion"}
    assert raw["mix"]["choices"] == ["a", "b"]
    one = narrow_space(space, top[:1])["params"]
    assert one["dim"] == {"type": "int", "low": 16, "high": 48, "step": 16}  # one grid step either side
    assert one["lr"]["low"] == pytest.approx(2e-4 / 1.5) and one["lr"]["high"] == pytest.approx(3e-4)


def test_multi_objective_pareto_front(tmp_path: Path, refs: Path, fake_metrics,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    space = {"params": {"learning_rate": {"type": "fixed", "value": 1e-4},
                        "network_dim": {"type": "fixed", "value": 32},
                        "epochs": {"type": "int", "low": 1, "high": 3}}}
    cmd = (f"{PY} {shlex.quote(str(TRAINER))} --out {{trial_dir}} --lr {{learning_rate}} --dim {{network_dim}} "
           "--epochs {epochs} --sleep 0.3")
    result = tune_external(**_base(tmp_path, refs, command=cmd, space=space, trials=3, sampler="random",
                                   objectives=["composite", "train_time"]))
    study = _study(tmp_path)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert result.pareto_front and {r["trial"] for r in result.pareto_front} == {t.number for t in study.best_trials}
    assert (tmp_path / "out" / "pareto_front.csv").read_text().startswith("trial,composite,train_time")
    assert "Pareto front" in (tmp_path / "out" / "study_report.html").read_text()
    # tune --show names the objectives (it printed objective0 / objective1 for external studies)
    from tastelab.cli.main import main

    assert study.metric_names == ["composite", "train_time"]
    _, shown = show(f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    assert shown["objectives"] == [{"name": "composite", "direction": "maximize"},
                                   {"name": "train_time", "direction": "minimize"}]
    assert set(shown["pareto_front"][0]["values"]) == {"composite", "train_time"}
    capsys.readouterr()
    assert main(["-q", "tune", "--show", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "composite" in printed and "train_time" in printed and "objective0" not in printed, printed


@pytest.mark.parametrize("attr", ["tastelab.external.objectives", "tastelab.objectives", None])
def test_show_names_objectives_of_studies_without_metric_names(tmp_path: Path, attr: str | None) -> None:
    """Studies made before the tune flows set Optuna's metric names: the names come from either flow's
    recorded NAME:DIRECTION list (names may hold colons), else objectiveN."""
    storage = f"sqlite:///{tmp_path / 'old.db'}"
    old = optuna.create_study(study_name="old", storage=storage, directions=["maximize", "minimize"])
    if attr is not None:
        old.set_user_attr(attr, ["metric:clip_score:maximize", "train_time:minimize"])
    old.add_trial(optuna.trial.create_trial(values=[0.5, 10.0]))
    _, shown = show(storage)
    names = ["metric:clip_score", "train_time"] if attr else ["objective0", "objective1"]
    assert [o["name"] for o in shown["objectives"]] == names
    assert [o["direction"] for o in shown["objectives"]] == ["maximize", "minimize"]
    assert shown["trials"][0]["values"] == dict(zip(names, [0.5, 10.0]))


def test_jobs_pin_each_trial_to_its_own_gpu(tmp_path: Path, refs: Path, fake_metrics) -> None:
    tune_external(**_base(tmp_path, refs, command=command("--record-env", epochs=2, sleep=0.5), trials=2, jobs=2,
                          gpus=["0", "1"]))
    trials = _study(tmp_path).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    envs = [json.loads((Path(t.user_attrs["trial_dir"]) / "env.json").read_text()) for t in trials]
    assert sorted(e["CUDA_VISIBLE_DEVICES"] for e in envs) == ["0", "1"]
    assert {e["TASTELAB_TRIAL_NUMBER"] for e in envs} == {"0", "1"}
    starts = sorted(t.datetime_start for t in trials)
    ends = sorted(t.datetime_complete for t in trials)
    assert starts[1] < ends[0]  # ran at the same time
    with pytest.raises(UserError, match="--jobs 3 needs 3 GPUs"):
        tune_external(**_base(tmp_path, refs, command=command(), jobs=3, gpus=["0", "1"]))


def test_a_second_invocation_resumes_the_study(tmp_path: Path, refs: Path, fake_metrics) -> None:
    tune_external(**_base(tmp_path, refs, command=command(), trials=2))
    logs = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "trials").glob("*/trainer.log")}
    assert len(logs) == 2
    result = tune_external(**_base(tmp_path, refs, command=command(), trials=3))
    assert [t.number for t in _study(tmp_path).trials] == [0, 1, 2]
    assert {p: p.stat().st_mtime_ns for p in logs} == logs  # the finished trials did not run again
    assert result.summary["counts"]["COMPLETE"] == 3
    assert all(sorted(t.intermediate_values) == [1, 2] for t in _study(tmp_path).trials)  # one value per epoch
    again = tune_external(**_base(tmp_path, refs, command=command(), trials=3))
    assert len(_study(tmp_path).trials) == 3 and again.best_trial == result.best_trial


@pytest.mark.slow  # eight trials
def test_the_search_finds_the_good_learning_rate(tmp_path: Path, refs: Path, fake_metrics) -> None:
    result = tune_external(**_base(tmp_path, refs, command=command(epochs=1, sleep=0.0), trials=8, sampler="random",
                                   space={"params": {"learning_rate": SPACE["params"]["learning_rate"],
                                                     "network_dim": {"type": "fixed", "value": 32}}}))
    rows = [r for r in result.summary["trials"] if r["state"] == "COMPLETE"]
    best_lr = result.best_params["learning_rate"]
    assert all(abs(math.log10(best_lr) + 4) <= abs(math.log10(r["params"]["learning_rate"]) + 4)
               for r in rows)


# ------------------------------------------------------------------------------------------ CLI
def test_cli_external_end_to_end_and_one_line_errors(tmp_path: Path, refs: Path, fake_metrics,
                                                     capsys: pytest.CaptureFixture[str],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    import yaml

    from tastelab.cli.main import main

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    judge = tmp_path / "judge.yaml"
    judge.write_text(yaml.safe_dump(fake_config()))
    db = tmp_path / "lora.db"
    args = ["tune", "--external", command(), "--space", str(space), "--judge", str(judge), "--references",
            str(refs), "--study", f"sqlite:///{db}", "--trials", "1", "--poll-interval", "0.05", "--device", "cpu",
            "--out", str(tmp_path / "out"), "--pruner", "none"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "best trial 0" in out and "study_report.html" in out.replace("\n", ""), out
    assert optuna.load_study(study_name="external", storage=f"sqlite:///{db}").trials[0].state.name == "COMPLETE"

    bad = list(args)
    bad[2] = command().replace("{network_dim}", "{netdim}")
    caplog.clear()
    assert main(bad) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "{netdim}" in errors[0] and "\n" not in errors[0]
    caplog.clear()
    assert main([*args[:-2], "--phases", "warmup"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "warmup" in errors[0] and "\n" not in errors[0]


@pytest.mark.slow  # a second Python process with the tuner's imports
def test_ctrl_c_stops_the_trainer_group(tmp_path: Path, refs: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from judge_fakes import fake_config, registered_fakes
fakes = registered_fakes()
next(fakes)  # registered while this generator is alive
from tastelab.external import tune_external
tune_external(command={command("--child", epochs=50, sleep=1.0)!r}, space={SPACE!r}, out={str(tmp_path / "out")!r},
              judge=fake_config(), references={str(refs)!r}, trials=1, poll_interval=0.05, pruner="none",
              device="cpu", kill_grace=2.0)
""")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stderr=subprocess.PIPE, text=True)
    pids = tmp_path / "out" / "trials" / "trial-0000" / "pids.txt"
    deadline = time.monotonic() + 60
    while not pids.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert pids.exists(), proc.stderr.read() if proc.poll() is not None else "no trainer started"
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    leader, child = map(int, pids.read_text().split())
    assert _gone(leader) and _gone(child)
    study = optuna.load_study(study_name="external", storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    assert study.trials[0].state.name == "FAIL"

