"""``tastelab score`` / ``tastelab models``: in-process through ``main()``, plus one real console-script run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tiny
from tastelab.cli.main import main
from tastelab.io.writers import read_results
from tastelab.models import list_models

FORMATS = (".jsonl", ".csv", ".parquet")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from tiny.one_torch_thread()


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # rich tables: keep long tmp paths on one line


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny.save_tiny_model(tmp_path_factory.mktemp("m") / "tiny-model", "distribution", "siglip")


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, object]:
    """photos/ with good and bad files at the top and good ones in a sub-folder."""
    root = tmp_path / "photos"
    top = [str(p) for p in tiny.make_images(root, n=4)]
    bad = [str(p) for p in tiny.make_bad_files(root).values()]
    nested = [str(p) for p in tiny.make_images(root / "sub" / "deeper", n=2)]
    return {"root": root, "top": top, "bad": bad, "nested": nested}


def _score(model_dir: Path, *args: str) -> int:
    return main(["score", "--model", str(model_dir), "--workers", "0", "--batch-size", "3", *args])


def _rows_by_path(out: Path) -> dict[str, dict]:
    rows = read_results(out)
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)), "duplicate rows"
    return {r["path"]: r for r in rows}


@pytest.mark.parametrize("suffix", FORMATS)
def test_score_folder_to_file_and_resume(model_dir, tree, tmp_path, capsys, suffix) -> None:
    out = tmp_path / f"scores{suffix}"
    assert _score(model_dir, str(tree["root"]), "--out", str(out)) == 0
    printed = capsys.readouterr().out
    rows = _rows_by_path(out)
    assert set(rows) == set(tree["top"]) | set(tree["bad"])  # not recursive: sub/ is not scored
    for p in tree["top"]:
        assert rows[p]["error"] is None and 1 <= rows[p]["score"] <= 10 and rows[p]["band"]
        assert len(rows[p]["distribution"]) == 10
    for p in tree["bad"]:
        assert rows[p]["error"] and rows[p]["score"] is None
    assert "4 scored, 3 errors" in printed
    assert f"wrote {out}" in printed
    assert "error:" in printed  # bad files are shown in the table

    assert _score(model_dir, str(tree["root"]), "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "skipped" in printed and "7 already in" in printed
    assert "0 scored, 0 errors" in printed
    assert _rows_by_path(out) == rows  # nothing duplicated, nothing changed

    assert _score(model_dir, str(tree["root"]), "-r", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "2 scored" in printed and "7 already in" in printed
    assert set(_rows_by_path(out)) == set(tree["top"]) | set(tree["bad"]) | set(tree["nested"])


def test_no_resume_rewrites(model_dir, tree, tmp_path, capsys) -> None:
    out = tmp_path / "scores.jsonl"
    assert _score(model_dir, str(tree["root"]), "--out", str(out)) == 0
    assert _score(model_dir, tree["top"][0], "--out", str(out), "--no-resume") == 0
    assert list(_rows_by_path(out)) == [tree["top"][0]]
    assert "skipped" not in capsys.readouterr().out.splitlines()[-2]


def test_recursive_glob_and_list_inputs(model_dir, tree, tmp_path) -> None:
    root: Path = tree["root"]  # type: ignore[assignment]
    # A path list: comments and blank lines ignored, relative entries are relative to the list.
    (root / "list.txt").write_text(f"# some photos\n{Path(tree['top'][0]).name}\n\n{tree['nested'][0]}\n",
                                   encoding="utf-8")

    out = tmp_path / "glob.csv"
    assert _score(model_dir, str(root / "*.jpg"), "--out", str(out)) == 0
    jpgs = {p for p in tree["top"] + tree["bad"] if p.endswith(".jpg")}
    assert set(_rows_by_path(out)) == jpgs

    out = tmp_path / "recursive.jsonl"
    assert _score(model_dir, str(root), "--recursive", "--out", str(out)) == 0
    assert set(_rows_by_path(out)) == set(tree["top"]) | set(tree["bad"]) | set(tree["nested"])

    out = tmp_path / "list.jsonl"
    assert _score(model_dir, str(root / "list.txt"), "--out", str(out)) == 0
    assert set(_rows_by_path(out)) == {tree["top"][0], tree["nested"][0]}

    out = tmp_path / "mixed.parquet"  # several kinds of input at once, overlapping: each path once
    assert _score(model_dir, str(root / "list.txt"), str(root / "**" / "*.png"), tree["top"][0],
                  "--out", str(out)) == 0
    pngs = {p for p in tree["top"] + tree["bad"] + tree["nested"] if p.endswith(".png")}
    assert set(_rows_by_path(out)) == {tree["top"][0], tree["nested"][0]} | pngs


def test_show_distribution_without_out(model_dir, tree, capsys) -> None:
    assert _score(model_dir, tree["top"][0], tree["top"][1], "--show-distribution") == 0
    printed = capsys.readouterr().out
    assert "distribution (1..10)" in printed
    assert "2 scored, 0 errors" in printed
    assert "wrote" not in printed
    line = next(ln for ln in printed.splitlines() if Path(tree["top"][0]).name in ln)
    probs = [float(tok) for tok in line.replace("│", " ").split() if tok.count(".") == 1 and len(tok) == 4]
    assert len(probs) >= 10


def test_max_rows_limits_the_table(model_dir, tree, capsys) -> None:
    assert _score(model_dir, str(tree["root"]), "--max-rows", "2") == 0
    printed = capsys.readouterr().out
    assert "table shows the first 2" in printed


def test_file_names_are_not_rich_markup(model_dir, tmp_path, capsys) -> None:
    folder = tmp_path / "[red]album[/red]"
    good = tiny.make_images(folder, n=1)[0].rename(folder / "holiday [edited] [b].jpg")
    bad = folder / "scan [draft].png"
    bad.write_bytes(b"")
    out = tmp_path / "[x].jsonl"
    assert _score(model_dir, str(good), str(bad), "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert str(good) in printed and str(bad) in printed
    assert f"wrote {out}" in printed
    assert set(_rows_by_path(out)) == {str(good), str(bad)}


def test_missing_input_becomes_an_error_row(model_dir, tree, tmp_path, capsys) -> None:
    missing = str(tmp_path / "nope" / "missing.jpg")
    out = tmp_path / "scores.jsonl"
    assert _score(model_dir, missing, tree["top"][0], "--out", str(out)) == 0
    rows = _rows_by_path(out)
    assert rows[missing]["error"] and rows[missing]["score"] is None
    assert rows[tree["top"][0]]["error"] is None
    assert "1 scored, 1 errors" in capsys.readouterr().out


def test_empty_folder_is_a_clear_error(model_dir, tmp_path, caplog) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _score(model_dir, str(empty)) == 2
    assert "no images found" in caplog.text


def test_unknown_model_exit_code_2(tree, caplog) -> None:
    code = main(["score", "--model", "no-such-model", "--workers", "0", tree["top"][0]])
    assert code == 2
    assert "unknown model preset 'no-such-model'" in caplog.text
    assert "\"unknown model preset" not in caplog.text  # printed as a message, not a KeyError repr
    assert "biq2021-mobilenetv2" in caplog.text


def test_bad_output_suffix_exit_code_2(model_dir, tree, tmp_path, caplog) -> None:
    assert _score(model_dir, tree["top"][0], "--out", str(tmp_path / "scores.xlsx")) == 2
    assert "unsupported format" in caplog.text


def test_models_lists_presets(capsys) -> None:
    assert main(["models"]) == 0
    printed = capsys.readouterr().out
    for name in list_models():
        assert name in printed
    assert "(default)" in printed


def test_usage_errors(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["score"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert "tastelab" in capsys.readouterr().out


def test_console_script_entry_point(tmp_path) -> None:
    """The installed ``tastelab`` script runs end to end in a fresh process (MobileNet: no HF imports)."""
    script = Path(sys.executable).with_name("tastelab")
    if not script.exists():
        pytest.skip(f"console script not installed beside {sys.executable}")
    model = tiny.save_tiny_model(tmp_path / "cnn-model", "gaussian", "mobilenet", layers=[3])
    images = tiny.make_images(tmp_path / "imgs", n=2)
    bad = tiny.make_bad_files(tmp_path / "imgs")
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "COLUMNS": "250"}
    proc = subprocess.run(
        [str(script), "score", str(tmp_path / "imgs"), "--model", str(model), "--workers", "0",
         "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 scored, 3 errors" in proc.stdout
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert {r["path"] for r in rows} == {str(p) for p in [*images, *bad.values()]}
    assert all(r["error"] for r in rows if r["path"] in {str(p) for p in bad.values()})
    assert all(r["uncertainty"] is not None for r in rows if r["error"] is None)


# --------------------------------------------------------------------------------------------------
# Hardening: one-line errors (exit 2) naming the input; resume by model and by file; odd file names


def _one_error(caplog) -> str:
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert "Traceback" not in caplog.text
    return errors[0]


@pytest.mark.parametrize("device", ["cuda:7", "gpu", "cuda:x"])
def test_missing_or_invalid_device_is_one_line(tree, tmp_path, caplog, device) -> None:
    # The model does not exist either: the device is reported first, before anything is loaded.
    if device == "cuda:7" and __import__("torch").cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    code = main(["score", "--model", str(tmp_path / "no-model"), "--device", device, tree["top"][0]])
    assert code == 2
    message = _one_error(caplog)
    assert message.startswith("--device ") and device in message


@pytest.mark.parametrize("where", ["parent-is-a-file", "is-a-directory"])
def test_unwritable_out_is_refused_before_scoring(model_dir, tree, tmp_path, caplog, monkeypatch, where) -> None:
    import tastelab.inference.scoring as scoring_mod

    (tmp_path / "f").write_text("x", encoding="utf-8")
    out = tmp_path / "f" / "scores.jsonl" if where == "parent-is-a-file" else tmp_path / "dir.jsonl"
    if where == "is-a-directory":
        out.mkdir()
    monkeypatch.setattr(scoring_mod.Scorer, "score_files",
                        lambda *a, **k: pytest.fail("scoring started before --out was checked"))
    assert _score(model_dir, str(tree["root"]), "--out", str(out)) == 2
    assert str(out) in _one_error(caplog)


def test_resume_with_another_model_is_refused(model_dir, tree, tmp_path, caplog) -> None:
    other = tiny.save_tiny_model(tmp_path / "other-model", "distribution", "siglip", seed=5)
    out = tmp_path / "scores.csv"
    assert _score(model_dir, tree["top"][0], "--out", str(out)) == 0
    caplog.clear()
    assert _score(other, *tree["top"][:2], "--out", str(out)) == 2
    message = _one_error(caplog)
    assert str(out) in message and "tiny" in message and "--allow-mixed-models" in message
    assert len(read_results(out)) == 1  # nothing was added
    assert _score(other, *tree["top"][:2], "--out", str(out), "--allow-mixed-models") == 0
    models = [r["model_hash"] for r in read_results(out, provenance=True)]
    assert len(models) == 2 and len(set(models)) == 2


def test_relative_then_absolute_is_one_row(model_dir, tree, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tree["root"])
    out = tmp_path / "scores.jsonl"
    first = Path(tree["top"][0])
    assert _score(model_dir, first.name, "--out", str(out)) == 0
    assert _score(model_dir, str(first), "--out", str(out)) == 0
    assert [r["path"] for r in read_results(out)] == [first.name]


def test_bad_line_in_resumed_jsonl_names_file_and_line(model_dir, tree, tmp_path, caplog) -> None:
    out = tmp_path / "scores.jsonl"
    out.write_text('{"path": "a.jpg", "score": 5.0}\n[1, 2]\n', encoding="utf-8")
    assert _score(model_dir, tree["top"][0], "--out", str(out)) == 2
    assert f"{out}:2: " in _one_error(caplog)


def test_merge_errors_are_one_line(model_dir, tree, tmp_path, caplog) -> None:
    bad = tmp_path / "part-bad.jsonl"
    bad.write_text('{"path": "a.jpg"}\n42\n', encoding="utf-8")
    assert main(["merge", str(tmp_path / "all.jsonl"), str(bad)]) == 2
    assert f"{bad}:2: " in _one_error(caplog)
    caplog.clear()
    (tmp_path / "f").write_text("x", encoding="utf-8")
    assert main(["merge", str(tmp_path / "f" / "all.jsonl"), str(bad)]) == 2
    assert "cannot create its folder" in _one_error(caplog)
    caplog.clear()
    other = tiny.save_tiny_model(tmp_path / "other-model", "distribution", "siglip", seed=5)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert _score(model_dir, tree["top"][0], "--out", str(a)) == 0
    assert _score(other, tree["top"][1], "--out", str(b)) == 0
    assert main(["merge", str(tmp_path / "all.jsonl"), str(a), str(b)]) == 2
    assert "--allow-mixed-models" in _one_error(caplog)
    assert main(["merge", str(tmp_path / "all.jsonl"), str(a), str(b), "--allow-mixed-models"]) == 0
    assert len(read_results(tmp_path / "all.jsonl")) == 2


@pytest.mark.skipif(sys.platform != "linux", reason="byte file names: Linux")
@pytest.mark.parametrize("suffix", FORMATS)
def test_non_utf8_file_name_through_the_cli(model_dir, tmp_path, capsys, suffix) -> None:
    folder = tmp_path / "odd"
    good = tiny.make_images(folder, n=1)[0]
    raw = os.fsencode(folder) + b"/\xe9t\xe9.jpg"
    with open(raw, "wb") as f:
        f.write(good.read_bytes())
    out = tmp_path / f"scores{suffix}"
    assert _score(model_dir, str(folder), "--out", str(out)) == 0
    assert "\\xe9t\\xe9.jpg" in capsys.readouterr().out  # the table shows a readable form
    paths = {r["path"] for r in read_results(out)}
    assert paths == {str(good), os.fsdecode(raw)}
    assert _score(model_dir, str(folder), "--out", str(out)) == 0  # resume: nothing new, no crash
    assert "2 already in" in capsys.readouterr().out
