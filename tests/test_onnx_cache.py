"""The default CPU path: a PyTorch model folder scored through its ONNX export, cached per content hash.

Covers the choice (auto picks ONNX on a CPU when onnxruntime is there, PyTorch when turned off), the
cache (made once, reused, stale or corrupt entries rebuilt, failures remembered), equality with PyTorch
(scores and the model columns of output rows), and that such scoring never imports torch.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tiny

pytest.importorskip("onnx", reason="ONNX tests need onnx")
pytest.importorskip("onnxruntime", reason="ONNX tests need onnxruntime")

import tastelab.inference.onnx as onnx_backend  # imported after the skips above
from tastelab.cli.main import main
from tastelab.inference.onnx_cache import AUTO_ENV, MANIFEST, onnx_cache_dir
from tastelab.inference.onnx_runtime import ONNX_FILE
from tastelab.inference.scoring import Scorer
from tastelab.io.batches import iter_array_batches
from tastelab.io.writers import read_results

SRC = Path(__file__).resolve().parents[1] / "src"
ABS = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from tiny.one_torch_thread()


@pytest.fixture(autouse=True)
def _auto_onnx_on(monkeypatch, tmp_path) -> None:
    """Automatic ONNX on (conftest turns it off for the rest of the suite), a fresh cache per test."""
    monkeypatch.setenv(AUTO_ENV, "1")
    monkeypatch.setenv("TASTELAB_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def exports(monkeypatch) -> list[str]:
    """Counts calls of the exporter (the real one runs): what the cache saves is these calls."""
    calls: list[str] = []
    real = onnx_backend.export_onnx

    def counting(model, out, **kwargs):
        calls.append(str(model))
        return real(model, out, exporter="torchscript", **kwargs)  # the faster exporter; same checks

    monkeypatch.setattr(onnx_backend, "export_onnx", counting)
    return calls


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny.save_tiny_model(tmp_path_factory.mktemp("m") / "m", "distribution", "mobilenet", layers=[3, 6],
                                pooling="meanstd")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("images")
    return [*(str(p) for p in tiny.make_images(root, n=5)), str(tiny.make_bad_files(root)["corrupt"])]


def test_cpu_auto_picks_onnx_and_the_switches_pick_torch(model_dir, exports, monkeypatch) -> None:
    auto = Scorer(model_dir, device="cpu", workers=0)
    assert auto.backend == "onnx" and auto.onnx_export is not None
    assert auto.onnx_export.parent == onnx_cache_dir() and auto.onnx_export.name == auto.identity.hash
    assert (auto.onnx_export / ONNX_FILE).is_file() and exports == [str(model_dir)]
    assert Scorer(model_dir, device="auto", workers=0).backend == "onnx"  # no GPU here: auto means the CPU
    assert Scorer(model_dir, backend="torch", device="cpu", workers=0).backend == "torch"
    assert Scorer(model_dir, device="cpu", dtype="bf16", workers=0).backend == "torch"  # a PyTorch feature
    assert Scorer(model_dir, device="cpu", decode="device", workers=0).backend == "torch"
    monkeypatch.setenv(AUTO_ENV, "0")
    off = Scorer(model_dir, device="cpu", workers=0)
    assert off.backend == "torch" and off.onnx_export is None
    assert exports == [str(model_dir)]  # one export for all of them


def test_cache_is_reused_and_stale_or_corrupt_entries_are_rebuilt(model_dir, exports, images, caplog) -> None:
    first = Scorer(model_dir, device="cpu", workers=0)
    entry = first.onnx_export
    expected = first.predict_batch(images)
    second = Scorer(model_dir, device="cpu", workers=0)
    assert second.onnx_export == entry and len(exports) == 1  # reused: no second export
    # Corrupt: same size, other bytes (a disk error, an editor) -> the content hash differs -> rebuilt.
    data = bytearray((entry / ONNX_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (entry / ONNX_FILE).write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        rebuilt = Scorer(model_dir, device="cpu", workers=0)
    assert len(exports) == 2 and "is stale (files changed since the export" in caplog.text
    assert [r.score for r in rebuilt.predict_batch(images)] == [r.score for r in expected]
    # Stale: a manifest from another cache format, or none at all.
    meta = json.loads((entry / MANIFEST).read_text())
    (entry / MANIFEST).write_text(json.dumps({**meta, "format": 0}))
    Scorer(model_dir, device="cpu", workers=0)
    (entry / MANIFEST).unlink()
    Scorer(model_dir, device="cpu", workers=0)
    assert len(exports) == 4
    assert Scorer(model_dir, device="cpu", workers=0).onnx_export == entry and len(exports) == 4
    assert [p.name for p in entry.parent.iterdir() if p.name.startswith(".")] == []  # no temporary leftovers


def test_failed_export_falls_back_to_torch_once_and_is_remembered(model_dir, monkeypatch, caplog, images) -> None:
    calls: list[str] = []

    def broken(model, out, **kwargs):
        calls.append(str(model))
        raise RuntimeError("cannot capture this model\nlong trace")

    monkeypatch.setattr(onnx_backend, "export_onnx", broken)
    with caplog.at_level(logging.INFO):
        scorer = Scorer(model_dir, device="cpu", workers=0)
    assert scorer.backend == "torch" and scorer.onnx_export is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    assert "with PyTorch: no ONNX export (RuntimeError: cannot capture this model" in warnings[0].getMessage()
    failed = onnx_cache_dir() / f"{scorer.identity.hash}.failed.json"
    assert failed.is_file()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = Scorer(model_dir, device="cpu", workers=0)
    assert again.backend == "torch" and calls == [str(model_dir)]  # not retried
    assert "delete it to retry" in caplog.text and not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert all(r.error is None for r in again.predict_batch(images[:2]))
    failed.unlink()  # the documented way to retry
    Scorer(model_dir, device="cpu", workers=0)
    assert len(calls) == 2


def test_unusable_cache_folder_falls_back_to_torch(model_dir, monkeypatch, tmp_path, caplog) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("TASTELAB_CACHE", str(blocker))
    with caplog.at_level(logging.WARNING):
        scorer = Scorer(model_dir, device="cpu", workers=0)
    assert scorer.backend == "torch"
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"cannot use the ONNX cache {blocker / 'onnx'}" in warning and "\n" not in warning


def test_onnx_scores_and_rows_equal_torch(model_dir, exports, images, tmp_path) -> None:
    torch_scorer = Scorer(model_dir, backend="torch", device="cpu", workers=0, batch_size=2)
    onnx_scorer = Scorer(model_dir, device="cpu", workers=0)
    assert onnx_scorer.backend == "onnx" and onnx_scorer.identity == torch_scorer.identity
    ref = {r.path: r for r in torch_scorer.score_files(images)}
    got = {r.path: r for r in onnx_scorer.score_files(images)}
    assert set(ref) == set(got) == set(images)
    for path, r in ref.items():
        g = got[path]
        assert (r.error is None) == (g.error is None) and r.error == g.error
        if r.error is None:
            assert g.raw_score == pytest.approx(r.raw_score, abs=ABS)
            assert g.score == pytest.approx(r.score, abs=ABS) and g.band == r.band
            assert g.distribution == pytest.approx(r.distribution, abs=ABS)
            assert g.uncertainty == pytest.approx(r.uncertainty, abs=ABS)
    # The CLI: rows name the same model and model_hash whichever runtime made them.
    common = ["--model", str(model_dir), "--workers", "0", "--device", "cpu", *images]
    assert main(["score", "--backend", "torch", "--out", str(tmp_path / "t.jsonl"), *common]) == 0
    assert main(["score", "--out", str(tmp_path / "o.jsonl"), *common]) == 0
    t_rows = read_results(tmp_path / "t.jsonl", provenance=True)
    o_rows = read_results(tmp_path / "o.jsonl", provenance=True)
    assert {(r["model"], r["model_hash"]) for r in t_rows} == {(r["model"], r["model_hash"]) for r in o_rows} \
        == {(torch_scorer.identity.name, torch_scorer.identity.hash)}
    # ... so one can resume the other's file without --allow-mixed-models.
    assert main(["score", "--backend", "torch", "--out", str(tmp_path / "o.jsonl"), *common]) == 0


def test_array_batches_in_worker_processes_equal_inline(model_dir, images) -> None:
    from tastelab.models.folder import read_config

    pre = read_config(model_dir).preprocess
    paths = images * 3
    one = [b for s in range(0, len(paths), 4) for b in iter_array_batches(paths[s:s + 4], pre, batch_size=4)]
    inline = list(iter_array_batches(paths, pre, batch_size=4, workers=0))  # a decode thread
    pooled = list(iter_array_batches(paths, pre, batch_size=4, workers=2, prefetch=1))
    for got in (inline, pooled):
        assert [(b.index, b.errors) for b in got] == [([i + 4 * k for i in b.index],
                                                       [(i + 4 * k, e) for i, e in b.errors])
                                                      for k, b in enumerate(one)]
        assert all((a.pixels == b.pixels).all() for a, b in zip(one, got))
    assert sorted(i for b in inline for i in [*b.index, *(j for j, _ in b.errors)]) == list(range(len(paths)))
    assert [len(b.index) + len(b.errors) for b in inline] == [4, 4, 4, 4, 2]


_CHILD = """
import json, sys
from tastelab.inference.scoring import Scorer
scorer = Scorer(sys.argv[1], device=sys.argv[3], workers=0)
results = [r.to_dict() for r in scorer.score_files(json.loads(sys.argv[2]))]
one = scorer.predict(json.loads(sys.argv[2])[0]).to_dict()
print(json.dumps({"backend": scorer.backend, "torch": "torch" in sys.modules, "results": results, "one": one,
                  "hash": scorer.identity.hash}))
"""


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_scoring_through_the_cached_export_never_imports_torch(model_dir, exports, images, device) -> None:
    reference = Scorer(model_dir, backend="torch", device="cpu", workers=0)
    Scorer(model_dir, device="cpu", workers=0)  # makes the cache entry (this process has torch anyway)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", _CHILD, str(model_dir), json.dumps(images), device], env=env,
                         capture_output=True, text=True, timeout=300, check=True)
    child = json.loads(out.stdout.strip().splitlines()[-1])
    assert child["backend"] == "onnx" and child["torch"] is False
    assert child["hash"] == reference.identity.hash
    ref = {r.path: r for r in reference.score_files(images)}
    for r in child["results"]:
        if r["error"] is None:
            assert r["score"] == pytest.approx(ref[r["path"]].score, abs=ABS)
        else:
            assert r["error"] == ref[r["path"]].error
    assert child["one"]["score"] == pytest.approx(ref[images[0]].score, abs=ABS)


# --------------------------------------------------------------------------------------------------
# A bounded cache: least recently used entries are evicted, never one in use


def _fake_entry(root: Path, name: str, size: int, used: float) -> Path:
    entry = root / name
    entry.mkdir(parents=True)
    (entry / ONNX_FILE).write_bytes(b"x" * size)
    (entry / MANIFEST).write_text("{}")
    os.utime(entry / MANIFEST, (used, used))
    return entry


def test_cache_bound_evicts_least_recently_used_but_never_kept_or_in_use(tmp_path) -> None:
    from tastelab.inference.onnx_cache import _locked, _use_lock, collect_garbage

    root = tmp_path / "onnx"
    for i, name in enumerate(["a", "b", "c", "d", "e"]):  # a is the least recently used, e the most
        _fake_entry(root, name, 1000, used=1_000_000 + i)
    (root / ".x.evict-1234").mkdir()  # an eviction a crash interrupted: removed
    with _locked(_use_lock(root, "b"), shared=True):  # another process is loading b right now
        evicted = collect_garbage(root, keep="a", max_bytes=3100)  # three entries fit
    assert evicted == ["c", "d"]  # a kept (this process's), b in use: skipped, c and d go, e stays
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["a", "b", "e"]
    assert collect_garbage(root, max_bytes=2500) == ["a"]  # b is free now: the oldest goes until it fits
    assert collect_garbage(root, max_bytes=None) == []  # unbounded


def test_cache_bound_comes_from_the_environment(monkeypatch) -> None:
    from tastelab.core.errors import UserError
    from tastelab.inference.onnx_cache import DEFAULT_MAX_BYTES, MAX_BYTES_ENV, cache_max_bytes

    monkeypatch.delenv(MAX_BYTES_ENV, raising=False)
    assert cache_max_bytes() == DEFAULT_MAX_BYTES
    monkeypatch.setenv(MAX_BYTES_ENV, "500_000_000")
    assert cache_max_bytes() == 500_000_000
    monkeypatch.setenv(MAX_BYTES_ENV, "none")
    assert cache_max_bytes() is None
    for bad in ("-1", "2GB", "nan"):
        monkeypatch.setenv(MAX_BYTES_ENV, bad)
        with pytest.raises(UserError, match=MAX_BYTES_ENV):
            cache_max_bytes()


def test_new_exports_evict_old_ones_and_an_evicted_entry_is_exported_again(model_dir, exports, images,
                                                                          tmp_path, monkeypatch, caplog) -> None:
    import tastelab.inference.onnx_cache as cache
    from tastelab.inference.onnx_cache import MAX_BYTES_ENV

    monkeypatch.setenv(MAX_BYTES_ENV, "1")  # room for one entry: the newest is always kept
    first = Scorer(model_dir, device="cpu", workers=0)
    other = tiny.save_tiny_model(tmp_path / "other", "score", "mobilenet", layers=[3])
    second = Scorer(other, device="cpu", workers=0)
    assert second.backend == "onnx" and second.onnx_export is not None and second.onnx_export.is_dir()
    assert first.onnx_export is not None and not first.onnx_export.exists()  # evicted by the newer export
    assert first.predict(images[0]).score is not None  # loaded before the eviction: still scores
    # The entry vanishes between lookup and load (another process's eviction): exported again, not a crash.
    monkeypatch.setenv(MAX_BYTES_ENV, "none")
    real = cache.cached_onnx
    raced: list[Path] = []

    def racing(source, model_hash, **kwargs):
        entry = real(source, model_hash, **kwargs)
        if not raced:
            raced.append(entry)
            assert cache.evict(entry.parent, model_hash)
        return entry

    monkeypatch.setattr(cache, "cached_onnx", racing)
    before = len(exports)
    with caplog.at_level(logging.INFO, logger="tastelab"):
        again = Scorer(model_dir, device="cpu", workers=0)
    assert again.backend == "onnx" and again.onnx_export == raced[0] and again.onnx_export.is_dir()
    # Exported twice: once because the second model's export evicted it, once more after the race.
    assert exports[before:] == [str(model_dir)] * 2 and "evicted before it could be loaded" in caplog.text
    assert again.predict(images[0]).score == pytest.approx(first.predict(images[0]).score, abs=ABS)


# --------------------------------------------------------------------------------------------------
# Lock files exist only while in use; a killed holder's lock neither lingers nor blocks eviction


def _valid_entry(root: Path, model_hash: str, used: float) -> Path:
    """An entry cached_onnx accepts without exporting: a manifest that matches its files."""
    from tastelab.inference.onnx_cache import CACHE_FORMAT
    from tastelab.models.identity import folder_hash

    entry = _fake_entry(root, model_hash, 1000, used)
    meta = {"format": CACHE_FORMAT, "model_hash": model_hash, "content_hash": folder_hash(entry)}
    (entry / MANIFEST).write_text(json.dumps(meta))
    os.utime(entry / MANIFEST, (used, used))
    return entry


def _markers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_file())


def test_lock_files_are_removed_once_nobody_holds_them(model_dir, exports, monkeypatch) -> None:
    from tastelab.inference.onnx_cache import MAX_BYTES_ENV, _locked, _use_lock, collect_garbage, load_cached_onnx

    root = onnx_cache_dir()
    scorer = Scorer(model_dir, device="cpu", workers=0)  # an export (<hash>.lock), a gc pass, a load (.use)
    assert scorer.backend == "onnx" and _markers(root) == []
    for i, name in enumerate(["a", "b", "c"]):
        _valid_entry(root, name, used=1_000_000 + i)
    with _locked(_use_lock(root, "a"), shared=True):  # two loaders share a's use lock
        with _locked(_use_lock(root, "a"), shared=True):
            assert _markers(root) == ["a.use"]
        assert _markers(root) == ["a.use"]  # the other one still loads: the file stays
        assert collect_garbage(root, keep=scorer.identity.hash, max_bytes=0) == ["b", "c"]
        assert _markers(root) == ["a.use"]
    assert _markers(root) == []  # the last holder removed it
    monkeypatch.setenv(MAX_BYTES_ENV, "none")
    assert load_cached_onnx("unused", "a", lambda entry: entry.name) == (root / "a", "a")
    assert _markers(root) == []


def test_a_lock_file_removed_while_waited_on_is_never_held_twice(tmp_path) -> None:
    """A waiter that opened the file its last holder then removed must not lock that orphan: it would
    hold a lock that nobody else sees, and an eviction could remove the entry it is loading."""
    import threading

    from tastelab.inference.onnx_cache import _locked

    locks = Path("/proc/locks")
    if not locks.is_file():
        pytest.skip("needs /proc/locks to see that the waiter is blocked")
    path = tmp_path / "e.use"
    held, release = threading.Event(), threading.Event()

    def loader() -> None:
        with _locked(path, shared=True):
            held.set()
            release.wait(30)

    with _locked(path):  # an evictor holds the lock exclusively...
        inode = path.stat().st_ino
        thread = threading.Thread(target=loader)
        thread.start()
        for _ in range(500):  # ...until the loader is blocked on this very file
            if any("->" in line and f":{inode} " in line for line in locks.read_text().splitlines()):
                break
            threading.Event().wait(0.01)
        else:
            pytest.fail("the loader never blocked on the lock file")
    # The evictor removed the file on leaving; the loader now holds the lock on the current file.
    assert held.wait(30)
    try:
        assert path.is_file()  # re-made by the loader (its inode number may well be the old one's)
        with _locked(path, wait=False) as got:
            assert got is False  # an evictor sees the loader's lock
    finally:
        release.set()
        thread.join(30)
    assert not path.exists()


_HOLDER = """
import fcntl, sys, time
f = open(sys.argv[1], "a")
fcntl.flock(f, fcntl.LOCK_SH)
print("held", flush=True)
time.sleep(120)
"""


def test_a_killed_loaders_lock_neither_blocks_eviction_nor_lingers(tmp_path) -> None:
    import signal

    from tastelab.inference.onnx_cache import _use_lock, collect_garbage, evict

    root = tmp_path / "onnx"
    for i, name in enumerate(["a", "b"]):
        _fake_entry(root, name, 1000, used=1_000_000 + i)
    (root / "gone.lock").write_text("")  # an exporter killed earlier, its entry never made
    child = subprocess.Popen([sys.executable, "-c", _HOLDER, str(_use_lock(root, "a"))], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        assert evict(root, "a") is False  # a live loader: never evicted
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
    assert _markers(root) == ["a.use", "gone.lock"]  # what a killed process leaves behind
    assert collect_garbage(root, max_bytes=1500) == ["a"]  # its lock died with it
    assert _markers(root) == []
