"""Ray Data integration: the actor callable on its own (fast) and a local 2-CPU Ray run (slow)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tiny
from tastelab.inference.ray_data import RayScorer
from tastelab.inference.scoring import ArrayOutput, Scorer, _as_array
from tastelab.io.writers import COLUMNS, ModelMismatchError, ParquetWriter, read_results


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from tiny.one_torch_thread()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ray")
    images = [str(p) for p in tiny.make_images(root / "imgs", n=8)]
    model = tiny.save_tiny_model(root / "model", "distribution", "mobilenet", layers=[3])
    expected = {r.path: r for r in Scorer(model, device="cpu", workers=0).score_files(images)}
    return {"root": root, "images": images, "model": model, "expected": expected}


def _check(rows: list[dict], setup: dict, missing: str) -> None:
    by_path = {r["path"]: r for r in rows}
    assert len(rows) == len(by_path) == len(setup["images"]) + 1
    assert by_path[missing]["error"] == "file not found" and by_path[missing]["score"] is None
    for path in setup["images"]:
        r, e = by_path[path], setup["expected"][path]
        assert r["error"] is None and r["band"] == e.band
        assert r["score"] == pytest.approx(e.score, abs=1e-4)
        assert r["raw_score"] == pytest.approx(e.raw_score, abs=1e-4)
        assert r["uncertainty"] == pytest.approx(e.uncertainty, abs=1e-4)
        assert list(r["distribution"]) == pytest.approx(e.distribution, abs=1e-4)


def test_ray_scorer_callable_without_ray(setup) -> None:
    """The map_batches callable: columns, nulls for failures, relative paths read from base_dir."""
    root: Path = setup["root"]
    rel = [os.path.relpath(p, root) for p in setup["images"][:3]]
    scorer = RayScorer(setup["model"], base_dir=root, device="cpu", batch_size=2)
    batch = {"path": np.array([*rel, "imgs/missing.jpg", None, rel[0]], dtype=object)}
    out = scorer(batch)
    assert list(out) == COLUMNS and all(len(col) == 6 and col.dtype == object for col in out.values())
    assert list(out["path"]) == list(batch["path"])  # the input values verbatim: join key to the input table
    assert list(out["error"]) == [None, None, None, "file not found", "empty path", None]
    assert out["score"][0] == pytest.approx(setup["expected"][setup["images"][0]].score)
    assert out["score"][5] == out["score"][0]
    assert isinstance(out["distribution"][1], list) and len(out["distribution"][1]) == 10
    assert out["distribution"][3] is None and out["uncertainty"][4] is None


@pytest.mark.slow
def test_score_with_ray_two_actors(setup, tmp_path: Path, monkeypatch) -> None:
    ray = pytest.importorskip("ray", reason="Ray tests need the ray extra: pip install 'tastelab[ray]'")
    from tastelab.inference.ray_data import score_with_ray

    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")  # no usage report: tests never touch the network
    missing = str(setup["root"] / "imgs" / "missing.jpg")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        out = score_with_ray([*setup["images"], missing], tmp_path / "out", setup["model"], num_actors=2,
                             batch_size=3, device="cpu")
        table = pq.read_table(out)
        assert table.schema.names == COLUMNS
        ident = Scorer(setup["model"], device="cpu", workers=0).identity
        assert set(table.column("model").to_pylist()) == {ident.name}  # error rows too, like tastelab score
        assert set(table.column("model_hash").to_pylist()) == {ident.hash}
        _check(table.to_pylist(), setup, missing)
        # A Parquet path list read by Ray itself; relative entries are relative to the list's folder.
        rel = [os.path.relpath(p, setup["root"]) for p in [*setup["images"], missing]]
        listing = setup["root"] / "todo.parquet"
        pq.write_table(pa.table({"file": rel}), listing)
        with pytest.raises(ValueError, match="not empty"):
            score_with_ray(listing, out, setup["model"])
        # Ray's Parquet read tasks need a CPU slot beside the actors on this 2-CPU runtime.
        out2 = score_with_ray(listing, tmp_path / "out", setup["model"], num_actors=2, batch_size=4,
                              path_column="file", device="cpu", overwrite=True, num_cpus_per_actor=0.5)
        rows = pq.read_table(out2).to_pylist()
        assert sorted(r["path"] for r in rows) == sorted(rel)
        for r in rows:
            r["path"] = str(setup["root"] / r["path"])
        _check(rows, setup, missing)
        # Resume after a crash: one complete file lost, another left half-written. The resume scores exactly
        # the inputs no complete file holds (relative entries matched through the list's folder).
        # Ray may write one file for so few rows: split it into the state a crash leaves behind.
        files = sorted(tmp_path.joinpath("out").glob("*.parquet"))
        written = pa.concat_tables([pq.read_table(f) for f in files])
        for f in files:
            f.unlink()
        pq.write_table(written.slice(0, 4), tmp_path / "out" / "complete.parquet")
        torn = tmp_path / "out" / "torn.parquet"
        pq.write_table(written.slice(4, 3), torn)  # rows 7.. are lost outright
        torn.write_bytes(torn.read_bytes()[:-40])
        files = [tmp_path / "out" / "complete.parquet", torn]
        out3 = score_with_ray(listing, tmp_path / "out", setup["model"], num_actors=2, batch_size=4,
                              path_column="file", device="cpu", resume=True, num_cpus_per_actor=0.5)
        assert files[1].with_name(f".{files[1].name}.partial").is_file() and not files[1].exists()
        rows = pq.read_table(sorted(out3.glob("*.parquet"))).to_pylist()
        assert sorted(r["path"] for r in rows) == sorted(rel)  # nothing lost, nothing twice
        for r in rows:
            r["path"] = str(setup["root"] / r["path"])
        _check(rows, setup, missing)
    finally:
        ray.shutdown()


def test_cli_score_ray_plumbing(setup, tmp_path: Path, monkeypatch, capsys) -> None:
    """`tastelab score-ray` passes its options through and counts what Ray wrote (Ray itself stubbed)."""
    import tastelab.inference.ray_data as ray_data
    from tastelab.cli.main import main
    from tastelab.io.writers import ParquetWriter

    calls: list[tuple] = []

    def fake(inputs, out_dir, model, **kwargs):
        calls.append((inputs, model, kwargs))
        Path(out_dir).mkdir()
        rows = [{"path": "a", "score": 5.0, "error": None}, {"path": "b", "error": "file not found"}]
        pq.write_table(pa.Table.from_pylist(rows, schema=ParquetWriter._schema()), Path(out_dir) / "x.parquet")
        return Path(out_dir)

    monkeypatch.setattr(ray_data, "score_with_ray", fake)
    listing = tmp_path / "todo.parquet"
    assert main(["score-ray", str(listing), "--out", str(tmp_path / "o"), "--model", str(setup["model"]),
                 "--actors", "3", "--cpus-per-actor", "0.5", "--path-column", "file", "--backend", "torch"]) == 0
    assert "1 scored, 1 errors" in capsys.readouterr().out
    inputs, model, kwargs = calls[0]
    assert inputs == str(listing) and model == str(setup["model"])  # one .parquet: read by Ray itself
    assert kwargs["num_actors"] == 3 and kwargs["num_cpus_per_actor"] == 0.5 and kwargs["path_column"] == "file"
    assert kwargs["backend"] == "torch" and kwargs["allow_urls"] is False
    assert main(["score-ray", *setup["images"][:2], "--out", str(tmp_path / "p")]) == 0
    assert calls[1][0] == setup["images"][:2]  # anything else: a list expanded on the driver
    # One INPUT goes as itself; whether it is a path list Ray reads is decided in one place (ray_data).
    assert main(["score-ray", setup["images"][0], "--out", str(tmp_path / "q")]) == 0
    assert calls[2][0] == setup["images"][0]


def test_one_rule_says_which_inputs_are_a_parquet_path_list(tmp_path: Path, monkeypatch) -> None:
    """Reading (_dataset) and resuming (_resume_keys) both ask parquet_path_list, so they cannot disagree."""
    from tastelab.inference.ray_data import parquet_path_list

    monkeypatch.chdir(tmp_path)
    assert parquet_path_list("todo.parquet") == tmp_path / "todo.parquet"  # absolute: actors run elsewhere
    assert parquet_path_list(Path("lists") / "TODO.PARQUET") == tmp_path / "lists" / "TODO.PARQUET"
    assert parquet_path_list(["todo.parquet"]) is None  # a sequence is expanded on the driver, like score's
    assert parquet_path_list("todo.txt") is None and parquet_path_list([]) is None


def _write_ray_output(folder: Path, scorer: RayScorer, paths: list[str], name: str) -> Path:
    """One Parquet file as score_with_ray writes it (the actor's columns, the writers' schema)."""
    folder.mkdir(exist_ok=True)
    cols = scorer({"path": np.array(paths, dtype=object)})
    table = pa.Table.from_pydict({k: list(v) for k, v in cols.items()}, schema=ParquetWriter._schema(COLUMNS))
    pq.write_table(table, folder / name)
    return folder / name


def test_ray_rows_carry_the_model_and_non_finite_predictions_are_error_rows(setup, monkeypatch) -> None:
    """Parity with `tastelab score`: every row (error rows too) names the model; NaN/inf is an error row."""
    scorer = RayScorer(setup["model"], device="cpu", batch_size=4)
    ident = Scorer(setup["model"], device="cpu", workers=0).identity
    missing = str(setup["root"] / "imgs" / "missing.jpg")
    out = scorer({"path": np.array([*setup["images"][:2], missing], dtype=object)})
    assert list(out) == COLUMNS
    assert list(out["model"]) == [ident.name] * 3 and list(out["model_hash"]) == [ident.hash] * 3
    real = scorer.scorer._run

    def nan_run(batch):
        res = real(batch)
        score = _as_array(res.score).copy()
        score[0] = np.nan
        return ArrayOutput(score=score, probs=None, var=None)

    monkeypatch.setattr(scorer.scorer, "_run", nan_run)
    out = scorer({"path": np.array(setup["images"][:2], dtype=object)})
    assert out["score"][0] is None and "non-finite" in out["error"][0] and out["model_hash"][0] == ident.hash
    assert out["error"][1] is None and np.isfinite(out["score"][1])


def test_ray_resume_reads_complete_files_only_and_refuses_another_model(setup, tmp_path: Path) -> None:
    """Resume bookkeeping (no Ray needed): half-written files do not count, another model is refused."""
    pytest.importorskip("ray", reason="score_with_ray needs the ray extra")
    from tastelab.inference.ray_data import recorded_inputs, score_with_ray

    scorer = RayScorer(setup["model"], device="cpu", batch_size=4)
    out = tmp_path / "out"
    done = _write_ray_output(out, scorer, setup["images"][:3], "a.parquet")
    half = _write_ray_output(out, scorer, setup["images"][3:6], "b.parquet")
    half.write_bytes(half.read_bytes()[:-40])  # no footer: what a killed writer leaves
    paths, models = recorded_inputs(out)
    assert paths == set(setup["images"][:3]) and models == {(scorer.identity.name, scorer.identity.hash)}
    assert done.is_file() and not half.exists() and (out / ".b.parquet.partial").is_file()
    assert read_results(done, provenance=True)[0]["model_hash"] == scorer.identity.hash  # a score output
    with pytest.raises(ValueError, match="not empty"):
        score_with_ray(setup["images"], out, setup["model"])
    with pytest.raises(ValueError, match="exclude each other"):
        score_with_ray(setup["images"], out, setup["model"], overwrite=True, resume=True)
    other = tiny.save_tiny_model(tmp_path / "other", "score", "mobilenet", layers=[3])
    with pytest.raises(ModelMismatchError, match="--allow-mixed-models"):
        score_with_ray(setup["images"], out, other, resume=True)


def test_cli_score_ray_passes_trust_and_resume_flags(setup, tmp_path: Path, monkeypatch) -> None:
    """`score-ray` takes the loading flags `score` takes (a folder can never set them) and the resume ones."""
    import tastelab.inference.ray_data as ray_data
    from tastelab.cli.main import main

    calls: list[dict] = []

    def fake(inputs, out_dir, model, **kwargs):
        calls.append(kwargs)
        Path(out_dir).mkdir(exist_ok=True)
        return Path(out_dir)

    monkeypatch.setattr(ray_data, "score_with_ray", fake)
    args = ["score-ray", *setup["images"][:2], "--out", str(tmp_path / "o")]
    assert main(args) == 0  # an empty folder (all done on a resume): 0 scored, no crash
    assert calls[0]["trust_remote_code"] is False and calls[0]["allow_external_weights"] is False
    assert calls[0]["resume"] is False and calls[0]["allow_mixed_models"] is False
    assert calls[0]["dtype"] == "auto" and calls[0]["url_timeout"] > 0  # the Scorer options `score` has
    assert main([*args, "--trust-remote-code", "--allow-external-weights", "--resume", "--allow-mixed-models",
                 "--dtype", "bf16", "--url-timeout", "3"]) == 0
    assert calls[1]["dtype"] == "bf16" and calls[1]["url_timeout"] == 3.0
    assert calls[1]["trust_remote_code"] is True and calls[1]["allow_external_weights"] is True
    assert calls[1]["resume"] is True and calls[1]["allow_mixed_models"] is True
    with pytest.raises(SystemExit) as exc:  # one or the other (argparse says so, exit code 2)
        main([*args, "--resume", "--overwrite"])
    assert exc.value.code == 2
