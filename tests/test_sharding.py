"""Sharding, launcher detection, merging: N processes cover every input exactly once, merges equal one run."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

import tiny
from tastelab.cli.main import main
from tastelab.inference.sharding import (
    Launch,
    distributed_launch,
    expand_parts,
    merge_results,
    parse_shard,
    plan_shard,
    rank_output,
    shard_of,
    shard_paths,
)
from tastelab.io.writers import open_writer, read_results

PATHS = [f"/data/set{i % 3}/img_{i:03d}.jpg" for i in range(17)] + ["rel/été.png", "a b/c (1).gif", "x.webp"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from tiny.one_torch_thread()


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")


# --------------------------------------------------------------------------------------------------
# Partition


def test_three_shards_cover_twenty_paths_exactly_once() -> None:
    assert len(PATHS) == 20
    shards = [shard_paths(PATHS, k, 3) for k in range(3)]
    flat = [p for s in shards for p in s]
    assert sorted(flat) == sorted(PATHS)  # every path once, none twice
    assert all(shards), [len(s) for s in shards]
    for s in shards:  # input order kept inside a shard
        assert s == [p for p in PATHS if p in s]
    shuffled = PATHS[:]
    random.Random(4).shuffle(shuffled)
    for k in range(3):
        assert set(shard_paths(shuffled, k, 3)) == set(shards[k])
    assert shard_paths(PATHS, 0, 1) == PATHS


def test_shard_membership_is_a_fixed_function_of_the_path() -> None:
    # blake2b-64 of the UTF-8 path, big-endian, mod N: pinned so a change cannot split a running job.
    assert [shard_of(p, 3) for p in ("/data/a.jpg", "photos/été 01.png", "https://example.com/x.jpg?s=1")] == [0, 0, 1]
    assert [shard_of(p, 1000) for p in ("/data/a.jpg", "photos/été 01.png")] == [634, 103]
    assert shard_of("bad-\udcff-name.jpg", 7) in range(7)  # undecodable file names hash too


def test_shards_do_not_depend_on_the_hash_seed() -> None:
    import tastelab.inference.sharding

    # Load the module file alone (it needs only the standard library): no torch import, a fast subprocess.
    code = ("import importlib.util as u, sys; s = u.spec_from_file_location('s', sys.argv[1]); "
            "m = sys.modules['s'] = u.module_from_spec(s); s.loader.exec_module(m); "
            "print([m.shard_of(p, 3) for p in sys.argv[2:]])")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    proc = subprocess.run([sys.executable, "-c", code, tastelab.inference.sharding.__file__, *PATHS],
                          capture_output=True, text=True, env=env,
                          timeout=120, check=True)
    assert json.loads(proc.stdout) == [shard_of(p, 3) for p in PATHS]


@pytest.mark.parametrize("text", ["3/3", "-1/2", "1", "a/b", "0/0", "1/2/3"])
def test_parse_shard_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="--shard"):
        parse_shard(text)


def test_parse_shard_and_bad_counts() -> None:
    assert parse_shard("0/4") == (0, 4) and parse_shard(" 3/4") == (3, 4)
    with pytest.raises(ValueError):
        shard_paths(PATHS, 2, 2)
    with pytest.raises(ValueError):
        shard_of("x", 0)


# --------------------------------------------------------------------------------------------------
# Launchers


def test_distributed_launch_from_environment() -> None:
    assert distributed_launch({}) is None
    assert distributed_launch({"WORLD_SIZE": "1", "RANK": "0"}) is None
    assert distributed_launch({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"}) == Launch(2, 4, 0)
    assert distributed_launch({"WORLD_SIZE": "2", "RANK": "1"}) == Launch(1, 2, 1)
    with pytest.raises(ValueError, match="outside"):
        distributed_launch({"WORLD_SIZE": "2", "RANK": "2"})
    with pytest.raises(ValueError, match="integers"):
        distributed_launch({"WORLD_SIZE": "two"})


def test_plan_shard() -> None:
    env = {"WORLD_SIZE": "3", "RANK": "1"}
    assert rank_output("out/scores.jsonl", 1) == str(Path("out/scores.rank1.jsonl"))
    plan = plan_shard(None, "scores.parquet", "cpu", env)
    assert (plan.index, plan.count, plan.out, plan.device) == (1, 3, "scores.rank1.parquet", "cpu")
    assert plan.select(PATHS) == shard_paths(PATHS, 1, 3)
    plan = plan_shard("2/5", "mine.csv", "cpu", env)  # explicit --shard wins, --out as given
    assert (plan.index, plan.count, plan.out) == (2, 5, "mine.csv")
    plan = plan_shard(None, None, "auto", {})
    assert (plan.index, plan.out, plan.launch) == (None, None, None) and plan.select(PATHS) == PATHS
    assert plan_shard(None, None, "cpu", env).out is None


# --------------------------------------------------------------------------------------------------
# Merge


def _row(path: str, score: float | None = None, error: str | None = None) -> dict:
    ok = error is None
    return {"path": path, "score": score if ok else None, "raw_score": score if ok else None,
            "band": "Good" if ok else None, "distribution": [0.1] * 10 if ok else None,
            "uncertainty": 0.5 if ok else None, "error": error}


def _write(path: Path, rows: list[dict]) -> Path:
    with open_writer(path, resume=False) as w:
        w.write_many(rows)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_merge_keeps_one_record_per_path(tmp_path: Path, suffix: str) -> None:
    a = _write(tmp_path / "a.jsonl", [_row("x", 6.0), _row("y", error="file not found"), _row("z", 3.0)])
    b = _write(tmp_path / "b.csv", [_row("x", 9.0), _row("y", 5.5), _row("w", error="truncated")])
    c = _write(tmp_path / "c.parquet", [_row("w", error="other"), _row("v", 2.0), _row("y", error="late")])
    out = tmp_path / f"merged{suffix}"
    counts = merge_results(out, [a, b, c])
    assert (counts.parts, counts.rows, counts.paths, counts.scored, counts.errors) == (3, 9, 5, 4, 1)
    assert (counts.duplicates, counts.recovered) == (4, 1)
    rows = {r["path"]: r for r in read_results(out)}
    assert len(rows) == 5 and len(read_results(out)) == 5
    assert rows["x"]["score"] == 6.0  # the first success wins
    assert rows["y"]["score"] == 5.5 and rows["y"]["error"] is None  # a success replaces an error
    assert rows["w"]["error"] == "truncated"  # only errors: the first one
    assert rows["v"]["distribution"] == pytest.approx([0.1] * 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a.jsonl", "b.csv", "c.parquet", out.name])


def test_merge_a_non_finite_score_is_an_error_never_a_score(tmp_path: Path) -> None:
    """A part is a stranger's file: its NaN / inf scores are error rows, so they neither hide another part's
    real score for the same image (first success wins) nor count as scored."""
    a = tmp_path / "a.csv"
    a.write_text("path,score,raw_score,band,error\nx,nan,nan,Good,\ny,inf,1e999,Good,\n")
    b = _write(tmp_path / "b.jsonl", [_row("x", 7.0)])
    counts = merge_results(tmp_path / "merged.jsonl", [a, b])
    rows = {r["path"]: r for r in read_results(tmp_path / "merged.jsonl")}
    assert rows["x"]["score"] == 7.0 and rows["x"]["error"] is None
    assert rows["y"]["score"] is None and "non-finite" in rows["y"]["error"]
    assert (counts.paths, counts.scored, counts.errors, counts.recovered) == (2, 1, 1, 1)


def test_merge_errors_and_cli(tmp_path: Path, capsys, caplog) -> None:
    a = _write(tmp_path / "s.rank0.jsonl", [_row("x", 6.0)])
    b = _write(tmp_path / "s.rank1.jsonl", [_row("y", error="bad"), _row("x", 1.0)])
    assert expand_parts([str(tmp_path / "s.rank*.jsonl")]) == [str(a), str(b)]
    with pytest.raises(FileNotFoundError):
        merge_results(tmp_path / "m.jsonl", [tmp_path / "missing.jsonl"])
    with pytest.raises(ValueError, match="unsupported"):
        merge_results(tmp_path / "m.xlsx", [a])
    with pytest.raises(FileNotFoundError, match="matches no file"):
        expand_parts([str(tmp_path / "nothing*.jsonl")])
    assert main(["merge", str(tmp_path / "m.csv"), str(tmp_path / "s.rank*.jsonl")]) == 0
    printed = capsys.readouterr().out
    assert "merged 2 parts (3 records)" in printed and "2 paths, 1 scored, 1 errors; 1 duplicates dropped" in printed
    assert main(["merge", str(tmp_path / "m.csv"), str(tmp_path / "nope.jsonl")]) == 2
    assert "no such score output" in caplog.text
    assert {r["path"] for r in read_results(tmp_path / "m.csv")} == {"x", "y"}  # untouched by the failed merge


# --------------------------------------------------------------------------------------------------
# End to end: shards and ranks through `tastelab score`, joined by `tastelab merge`


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("shard-job")
    images = [str(p) for p in tiny.make_images(root / "imgs", n=7)]
    bad = str(tiny.make_bad_files(root / "imgs")["corrupt"])
    paths = [*images, bad, str(root / "imgs" / "missing.jpg")]
    listing = root / "list.txt"
    listing.write_text("\n".join(paths) + "\n", encoding="utf-8")
    model = tiny.save_tiny_model(root / "model", "gaussian", "mobilenet", layers=[3])
    single = root / "single.jsonl"
    assert main(["score", str(listing), "--model", str(model), "--workers", "0", "--out", str(single)]) == 0
    return {"root": root, "paths": paths, "list": listing, "model": model,
            "single": {r["path"]: r for r in read_results(single)}}


def _assert_same_as_single(merged: Path, job: dict) -> None:
    rows = read_results(merged)
    assert len(rows) == len(job["paths"]) == len({r["path"] for r in rows})
    for r in rows:
        s = job["single"][r["path"]]
        assert (r["error"] is None) == (s["error"] is None)
        if s["error"] is None:
            assert r["score"] == pytest.approx(s["score"], abs=1e-6)
            assert r["uncertainty"] == pytest.approx(s["uncertainty"], abs=1e-6)


def test_cli_shards_then_merge_equal_a_single_run(job, tmp_path, capsys) -> None:
    parts = []
    for k, suffix in enumerate([".jsonl", ".csv", ".parquet"]):
        out = tmp_path / f"part{k}{suffix}"
        assert main(["score", str(job["list"]), "--model", str(job["model"]), "--workers", "0",
                     "--shard", f"{k}/3", "--out", str(out)]) == 0
        n = len(shard_paths(job["paths"], k, 3))
        assert f"shard {k}/3 (--shard): {n} of {len(job['paths'])} inputs" in capsys.readouterr().out
        assert {r["path"] for r in read_results(out)} == set(shard_paths(job["paths"], k, 3))
        parts.append(str(out))
    merged = tmp_path / "merged.parquet"
    assert main(["merge", str(merged), *parts]) == 0
    assert f"{len(job['paths'])} paths, 7 scored, 2 errors; 0 duplicates" in capsys.readouterr().out
    _assert_same_as_single(merged, job)


def test_empty_shard_still_writes_its_output(job, tmp_path) -> None:
    one = job["paths"][0]
    empty_k = next(k for k in range(3) if shard_of(one, 3) != k)
    out = tmp_path / "empty.jsonl"
    assert main(["score", one, "--model", str(job["model"]), "--workers", "0", "--shard", f"{empty_k}/3",
                 "--out", str(out)]) == 0
    assert out.is_file() and read_results(out) == []


def test_distributed_launch_shards_by_rank(job, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "scores.jsonl"
    args = ["score", str(job["list"]), "--model", str(job["model"]), "--workers", "0", "--out", str(out)]
    # Rank 1 in a real separate process, as `accelerate launch` / torchrun would start it.
    env = {**os.environ, "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "3", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "COLUMNS": "250"}
    proc = subprocess.run([sys.executable, "-m", "tastelab.cli.main", *args], capture_output=True, text=True,
                          env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "process 1 of a 3-process launch" in proc.stdout
    rank1 = tmp_path / "scores.rank1.jsonl"
    assert {r["path"] for r in read_results(rank1)} == set(shard_paths(job["paths"], 1, 3))
    # Ranks 0 and 2 in this process through the same environment variables.
    for rank in (0, 2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "3")
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        assert main(args) == 0
    assert "join the ranks with: tastelab merge" in capsys.readouterr().out  # rank 0 says how to merge
    assert not out.exists()
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert main(["merge", str(out), str(tmp_path / "scores.rank*.jsonl")]) == 0
    _assert_same_as_single(out, job)
