"""Judge configs never switch on code execution: a metric option ``trust_remote_code: true`` (``aesthetic``,
``hf_aesthetic``, ``vqa_score``) is only a request. ``tastelab judge`` and ``tastelab tune --external`` refuse it
with one line naming the judge config and the metric (exit 2) before any model loads, unless the user passes
``--trust-remote-code`` (``trust_remote_code=True`` in :func:`tastelab.judge.judge` / ``tune_external``); then
the metric's loader gets ``trust_remote_code=True``. A metric whose config does not ask never gets True, even
with the flag.

Each metric's model loader is replaced by a recorder (which then fails as an offline hub would, so the metric
is unavailable and the fake metrics carry the run): nothing is downloaded and no code can run.
"""

from __future__ import annotations

import collections
import logging
import os
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from judge_fakes import fake_config, make_references, make_subfolders, registered_fakes
from tastelab.cli.main import main
from tastelab.judge.config import JudgeConfigError
from tastelab.judge.run import judge

TRAINER = Path(__file__).with_name("fake_lora_trainer.py")
SPACE = {"params": {"learning_rate": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True, "default": 1e-5},
                    "network_dim": {"type": "int", "low": 16, "high": 64, "step": 16, "default": 32}}}

#: The metrics that read ``trust_remote_code`` from their options, and their option besides it.
METRICS = ("aesthetic", "hf_aesthetic", "vqa_score")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def fake_metrics() -> Iterator[collections.Counter[str]]:
    yield from registered_fakes()


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """Every model load of the three metrics, as (metric, trust_remote_code); each load then fails like a hub
    model that is not cached (the metric becomes unavailable)."""
    import transformers

    from tastelab.judge.metrics import aesthetics

    calls: list[tuple[str, Any]] = []

    def recorder(metric: str) -> Any:
        def load(*args: Any, **kwargs: Any) -> Any:
            calls.append((metric, kwargs.get("trust_remote_code", "not passed")))
            raise OSError("not cached (offline test)")
        return load

    monkeypatch.setattr(aesthetics, "Scorer", recorder("aesthetic"))
    monkeypatch.setattr(transformers, "pipeline", recorder("hf_aesthetic"))
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", recorder("vqa_score"))
    return calls


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    make_subfolders(tmp_path / "samples", [1, 2])
    make_references(tmp_path / "refs")
    (tmp_path / "model").mkdir()  # the aesthetic metric's model folder (its loader is the recorder)
    (tmp_path / "model" / "config.json").write_text("{}")
    return tmp_path


def _config(root: Path, metric: str, *, request: bool | None, name: str = "shared-judge.yaml") -> Path:
    """A judge config with the fakes on and ``metric`` enabled (asking for remote code when ``request``)."""
    options: dict[str, Any] = {} if request is None else {"trust_remote_code": request}
    spec: dict[str, Any] = {"enabled": True, "options": options}
    if metric == "aesthetic":
        spec["model"] = str(root / "model")
    path = root / name
    path.write_text(yaml.safe_dump(fake_config(metrics={metric: spec})), encoding="utf-8")
    return path


def _judge(root: Path, config: Path, **kw: Any) -> Any:
    return judge(root / "samples", references=root / "refs", config=config, device="cpu", progress=False, **kw)


def _one_error(caplog: pytest.LogCaptureFixture) -> str:
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert "\n" not in errors[0] and "Traceback" not in errors[0]
    return errors[0]


# ------------------------------------------------------------------------------------------------ API
@pytest.mark.parametrize("metric", METRICS)
def test_api_refuses_a_config_asking_for_code_before_any_load(inputs: Path, fake_metrics, loads, metric: str) -> None:
    config = _config(inputs, metric, request=True)
    with pytest.raises(JudgeConfigError) as info:
        _judge(inputs, config)
    message = str(info.value)
    assert "\n" not in message
    for part in (str(config), f"metrics.{metric}.options.trust_remote_code", "--trust-remote-code"):
        assert part in message, (part, message)
    assert loads == [], "a model was loaded for a config the user did not allow"
    assert sum(fake_metrics.values()) == 0  # refused before any metric computed anything


@pytest.mark.parametrize("metric", METRICS)
def test_api_permission_reaches_the_loader(inputs: Path, fake_metrics, loads, metric: str) -> None:
    result = _judge(inputs, _config(inputs, metric, request=True), trust_remote_code=True)
    assert loads and all(call == (metric, True) for call in loads), loads
    assert {m.name: m.status for m in result.metrics}[metric] == "unavailable"  # the recorder's offline error


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("request_", [None, False])
def test_no_request_never_runs_code_even_with_permission(inputs: Path, fake_metrics, loads, metric: str,
                                                         request_: bool | None) -> None:
    _judge(inputs, _config(inputs, metric, request=request_), trust_remote_code=True)
    assert loads and all(call == (metric, False) for call in loads), loads


def test_only_a_boolean_asks(inputs: Path) -> None:
    path = inputs / "quoted.yaml"
    path.write_text(yaml.safe_dump({"metrics": {"vqa_score": {"enabled": True,
                                                               "options": {"trust_remote_code": "yes"}}}}))
    with pytest.raises(JudgeConfigError, match=r"quoted\.yaml.*trust_remote_code must be true or false"):
        _judge(inputs, path, trust_remote_code=True)


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_judge_refuses_in_one_line_and_runs_with_the_flag(inputs: Path, fake_metrics, loads,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    config = _config(inputs, "vqa_score", request=True)
    out = inputs / "out"
    argv = ["judge", str(inputs / "samples"), "--references", str(inputs / "refs"), "--config", str(config),
            "--device", "cpu", "--out", str(out)]
    assert main(argv) == 2
    error = _one_error(caplog)
    assert str(config) in error and "vqa_score" in error and "--trust-remote-code" in error, error
    assert loads == [] and not out.exists()
    assert main([*argv, "--trust-remote-code"]) == 0
    assert loads and all(call == ("vqa_score", True) for call in loads), loads


def test_cli_judge_generate_is_refused_before_generating(inputs: Path, loads, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    import tastelab.generate.run as generate_run

    generated: list[Any] = []
    monkeypatch.setattr(generate_run, "generate_samples", lambda *a, **k: generated.append(a))
    prompts = inputs / "prompts.txt"
    prompts.write_text("a photo of a dog\n")
    config = _config(inputs, "hf_aesthetic", request=True)
    code = main(["judge", "--generate", "--base", str(inputs / "base"), "--lora", str(inputs / "lora"),
                 "--prompts", str(prompts), "--references", str(inputs / "refs"), "--config", str(config),
                 "--out", str(inputs / "out")])
    assert code == 2
    error = _one_error(caplog)
    assert str(config) in error and "hf_aesthetic" in error, error
    assert generated == [] and loads == []


def _command() -> str:
    py = shlex.quote(sys.executable)
    return (f"{py} {shlex.quote(str(TRAINER))} --out {{trial_dir}} --lr {{learning_rate}} --dim {{network_dim}} "
            "--epochs 1 --sleep 0.05 --seed {seed}")


def test_tune_external_refuses_before_any_trial_and_passes_the_permission(
        inputs: Path, fake_metrics, loads, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    import tastelab.judge.run as judge_run

    seen: list[Any] = []
    real = judge_run.judge

    def recording_judge(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("trust_remote_code", "not passed"))
        return real(*args, **kwargs)

    monkeypatch.setattr(judge_run, "judge", recording_judge)
    space = inputs / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    config = _config(inputs, "hf_aesthetic", request=True)
    out = inputs / "tune"
    argv = ["tune", "--external", _command(), "--space", str(space), "--judge", str(config), "--references",
            str(inputs / "refs"), "--trials", "1", "--poll-interval", "0.05", "--settle", "5", "--device", "cpu",
            "--out", str(out), "--pruner", "none", "--no-trial-reports", "--refine-seeds", "0"]
    assert main(argv) == 2
    error = _one_error(caplog)
    assert str(config) in error and "hf_aesthetic" in error and "--trust-remote-code" in error, error
    assert not out.exists() and seen == [] and loads == []  # no study, no trainer, no judge
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert main([*argv, "--trust-remote-code"]) == 0
    assert seen and all(s is True for s in seen), seen
    assert loads and all(call == ("hf_aesthetic", True) for call in loads), loads
