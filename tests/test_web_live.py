"""The labelling app's live model (issue 14): background training after N votes that never blocks a vote, held-out
accuracy on the page and in the learning-curve file, superseded jobs, active-learning proposals, scoring a folder
of new photos through the guarded API (confined thumbnails, a JSONL score file), saving a model folder.

Features come from a tiny injected extractor (colour statistics of each image), so the real personal recipe
search (:func:`tastelab.web.personal_fit.fit_votes`) runs in well under a second; one test uses the real
MobileNetV2 extractor at 64 px to check that a saved model scores as the live one does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import torch
from fastapi.testclient import TestClient
from PIL import Image

import tiny
from tastelab.io.writers import read_results
from tastelab.web.app import create_app
from tastelab.web.guard import TOKEN_HEADER
from tastelab.web.live import LiveConfig, LiveModel, pair_accuracy
from tastelab.web.personal_fit import LiveFit, fit_votes
from tastelab.web.session import LabelSession

#: One linear candidate: the search machinery runs, cheaply (the machine these tests run on may be busy).
SMALL_GRID = {"linear_lams": (0.1,), "mlp_widths": (), "max_ensemble": 1}
N_IMAGES = 24


def brightness(path: str) -> float:
    return float(np.asarray(Image.open(path).convert("L"), dtype=np.float64).mean())


def tiny_extractor(paths: Sequence[str], progress: Callable[[int], None] | None = None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Mean R, G, B and brightness of each image: the cheapest feature set that carries a brightness taste."""
    rows, errors = [], {}
    for p in paths:
        try:
            arr = np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0
        except OSError as exc:
            errors[p] = str(exc)
            rows.append([0.0] * 4)
            continue
        rows.append([*arr.mean(axis=(0, 1)), float(arr.mean())])
        if progress:
            progress(1)
    return {"stats": torch.tensor(rows, dtype=torch.float32)}, errors


def _photos(root: Path, n: int = N_IMAGES, seed: int = 0) -> dict[str, float]:
    """``n`` small photos of random brightness and tint; returns name -> brightness (the hidden taste)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for i in range(n):
        arr = rng.normal(rng.uniform(30, 220), 20, size=(12, 16, 3)) + rng.uniform(-30, 30, size=3)
        name = f"p{i:02d}.png"
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(root / name)
        out[name] = brightness(str(root / name))
    return out


def fast_fit(names: Sequence[str], features: Any, votes: Sequence[Any], **kw: Any) -> LiveFit:
    kw.update(SMALL_GRID, folds=3)
    return fit_votes(names, features, votes, **kw)


one_thread = pytest.fixture(scope="module", autouse=True)(tiny.one_torch_thread)


def _wait(cond: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting for the live model")
        time.sleep(0.02)


def _setup(tmp_path: Path, *, fit: Callable[..., LiveFit] = fast_fit, **config: Any
           ) -> tuple[LabelSession, LiveModel, TestClient, dict[str, float]]:
    taste = _photos(tmp_path / "photos")
    session = LabelSession(tmp_path / "photos", seed=0)
    config.setdefault("min_votes", 20)
    live = LiveModel(session.index.images, session.image_dir, session.votes_path, tiny_extractor,
                     config=LiveConfig(**config), fit=fit).start()
    session.attach_live(live)
    app = create_app(session)
    client = TestClient(app, base_url="http://testserver",
                        headers={"Origin": "http://testserver", TOKEN_HEADER: app.state.token})
    return session, live, client, taste


def _vote_brighter(client: TestClient, taste: dict[str, float], n: int) -> dict:
    """``n`` votes for the brighter photo of each proposed pair; returns the last answer."""
    pair = client.get("/api/pair").json()["pair"]
    out: dict = {}
    for _ in range(n):
        choice = "a" if taste[pair["a"]] > taste[pair["b"]] else "b"
        r = client.post("/api/vote", json={"pair_id": pair["pair_id"], "a": pair["a"], "b": pair["b"],
                                           "choice": choice})
        assert r.status_code == 200, r.text
        out = r.json()
        pair = out["next"]
    return out


class Blocking:
    """A fit that waits for ``release`` (so a test can vote while it runs) and records the vote counts it got."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.calls: list[int] = []

    def __call__(self, names: Sequence[str], features: Any, votes: Sequence[Any], **kw: Any) -> LiveFit:
        self.calls.append(len(votes))
        self.started.set()
        assert self.release.wait(30)
        return fast_fit(names, features, votes, **kw)


# -------------------------------------------------------------------------------------------------- training


def test_live_model_trains_after_n_votes_without_blocking_votes(tmp_path: Path) -> None:
    fit = Blocking()
    session, live, client, taste = _setup(tmp_path, fit=fit)
    try:
        stats = _vote_brighter(client, taste, 19)["stats"]
        assert stats["model"]["enabled"] and not stats["model"]["ready"] and stats["model"]["votes_needed"] == 1
        assert not fit.started.wait(0.3)  # 19 votes: nothing trains
        _vote_brighter(client, taste, 1)
        assert fit.started.wait(10)  # the 20th vote queued the first training
        t = time.perf_counter()
        answer = _vote_brighter(client, taste, 1)  # answered while the training is still running
        assert time.perf_counter() - t < 2.0 and answer["stats"]["votes"] == 21
        assert answer["stats"]["model"]["training"] and answer["stats"]["model"]["training_on_votes"] == 20
        fit.release.set()
        _wait(lambda: client.get("/api/model").json()["ready"])
        model = client.get("/api/stats").json()["model"]
        assert model["votes_used"] == 20 and model["trained_at"] and not model["training"]
        assert 0.0 <= model["heldout_accuracy"] <= 1.0 and "never saw" in model["heldout_kind"]
        assert model["curve"][-1]["votes"] == 20
        stored = live._read_curve()  # the learning curve beside the votes file
        assert live.curve_path.parent == session.votes_path.parent
        assert stored[-1]["votes"] == 20 and stored[-1]["heldout_accuracy"] == model["heldout_accuracy"]
        # At 30 votes the next model is trained, and the previous one is scored on the 10 votes it never saw.
        _vote_brighter(client, taste, 10)
        _wait(lambda: client.get("/api/model").json()["votes_used"] == 30)
        curve = client.get("/api/model").json()["curve"]
        assert [p["votes"] for p in curve] == [20, 30] and live.curve[-1]["next_votes"] == 10
        assert curve[-1]["next_votes_accuracy"] is not None
    finally:
        fit.release.set()
        live.stop()
        session.close()


def test_a_newer_vote_count_supersedes_a_waiting_job(tmp_path: Path) -> None:
    fit = Blocking()
    session, live, client, taste = _setup(tmp_path, fit=fit)
    try:
        _vote_brighter(client, taste, 20)
        assert fit.started.wait(10)
        _vote_brighter(client, taste, 10)  # 30 votes: a job waits behind the running one
        _vote_brighter(client, taste, 10)  # 40 votes: it replaces the waiting one
        assert live.status()["superseded"] == 1
        fit.release.set()
        _wait(lambda: live.status()["votes_used"] == 40)
        assert fit.calls == [20, 40]  # the 30-vote job never ran
        assert [p["votes"] for p in live.status()["curve"]] == [20, 40]
    finally:
        fit.release.set()
        live.stop()
        session.close()


def test_held_out_accuracy_tracks_the_taste(tmp_path: Path) -> None:
    """Votes for the brighter photo: the live model learns it and says so on images it never trained on."""
    session, live, client, taste = _setup(tmp_path, min_votes=60)
    try:
        _vote_brighter(client, taste, 60)
        _wait(lambda: live.status()["ready"])
        status = live.status()
        assert status["heldout_accuracy"] > 0.8
        scores = live.scores()
        names = sorted(taste)
        assert np.corrcoef([scores[n] for n in names], [taste[n] for n in names])[0, 1] > 0.8
    finally:
        live.stop()
        session.close()


def test_an_undo_discards_a_model_trained_on_the_undone_vote(tmp_path: Path) -> None:
    fit = Blocking()
    session, live, client, taste = _setup(tmp_path, fit=fit)
    try:
        _vote_brighter(client, taste, 20)
        assert fit.started.wait(10)
        assert client.post("/api/undo", json={}).status_code == 200  # 19 votes: the running fit is stale
        fit.release.set()
        _wait(lambda: live.status()["fits"] == 1)
        assert live.status()["discarded"] == 1 and not live.status()["ready"]
    finally:
        fit.release.set()
        live.stop()
        session.close()


# -------------------------------------------------------------------------------------------------- active learning


class _Fixed:
    """A stub model whose scores the test sets."""

    def __init__(self, scores: dict[str, float]) -> None:
        self.scores, self.heldout, self.heldout_kind, self.cv, self.chosen = scores, 0.5, "stub", 0.5, "stub"
        self.n_votes = self.n_images = 0

    def predict(self, features: Any) -> np.ndarray:  # rows in the live model's name order
        return np.array([self.scores[n] for n in self._names])


def _stub_live(names: list[str], scores: dict[str, float], **config: Any) -> LiveModel:
    stub = _Fixed(scores)
    stub._names = names

    def extractor(paths: Sequence[str], progress: Any = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        return {"x": torch.zeros(len(paths), 1)}, {}

    live = LiveModel(names, "/", "/nonexistent/votes.csv", extractor, config=LiveConfig(**config),
                     fit=lambda *a, **k: stub)
    live._extract()
    live._train(())
    assert live.status()["ready"]
    return live


def test_active_learning_prefers_pairs_the_model_is_unsure_about() -> None:
    names = [f"{i:04d}.jpg" for i in range(40)]
    live = _stub_live(names, {n: float(i) for i, n in enumerate(names)})  # neighbours differ by 1, spread ~11.5
    rng = np.random.default_rng(0)
    gaps = []
    for _ in range(100):
        a, b, why = live.propose(rng)
        assert why == "uncertain" and a != b
        gaps.append(abs(int(a[:4]) - int(b[:4])))
    random_gaps = [abs(i - j) for i in range(40) for j in range(40) if i != j]
    assert np.median(gaps) <= 1 < np.median(random_gaps) / 5
    # Excluded pairs are never proposed.
    a, b, _ = live.propose(np.random.default_rng(1))
    for _ in range(20):
        assert {*live.propose(np.random.default_rng(1), exclude=[(a, b)])[:2]} != {a, b}


def test_active_learning_asks_where_the_model_and_the_votes_disagree() -> None:
    names = [f"{i:04d}.jpg" for i in range(30)]
    live = _stub_live(names, {n: float(i) for i, n in enumerate(names)})
    ranking = {n: float(i) for i, n in enumerate(names)}
    ranking[names[2]], ranking[names[27]] = 27.0, 2.0  # the person ranks 2 and 27 the other way round
    counts = dict.fromkeys(names, 3.0)
    rng = np.random.default_rng(0)
    picked = [live.propose(rng, ranking=ranking, counts=counts) for _ in range(60)]
    clashes = [p for p in picked if p[2] == "disagrees with your votes"]
    assert len(clashes) > 15
    assert sum({p[0], p[1]} == {names[2], names[27]} for p in clashes) > len(clashes) / 3
    assert all(names[2] in p[:2] or names[27] in p[:2] for p in clashes)


def test_proposals_stay_fast_and_keep_pair_ids_undo_and_skip(tmp_path: Path) -> None:
    names = [f"{i:05d}.jpg" for i in range(5000)]
    live = _stub_live(names, {n: float(i % 97) for i, n in enumerate(names)})
    ranking, counts = {n: 0.0 for n in names}, {n: 1.0 for n in names}
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for _ in range(20):
        live.propose(rng, ranking=ranking, counts=counts)
    assert (time.perf_counter() - t) / 20 < 0.05
    # In the session: explore=0 -> every pair comes from the model, with an issued id; skip and undo still work.
    taste = _photos(tmp_path / "photos")
    session = LabelSession(tmp_path / "photos", seed=0)
    order = sorted(taste, key=taste.get)
    stub_live = _stub_live(session.index.images, {n: float(order.index(n)) for n in session.index.images},
                           explore=0.0)
    session.attach_live(stub_live)
    try:
        pair = session.new_pair()
        assert pair["proposed_by"].startswith("model")
        skipped = session.new_pair(skip=pair["pair_id"])
        assert skipped["pair_id"] != pair["pair_id"]
        out = session.vote(skipped["pair_id"], skipped["a"], skipped["b"], "a")
        assert out["recorded"] and out["next"]["proposed_by"].startswith("model")
        back = session.undo(skipped["pair_id"])
        assert {back["pair"]["a"], back["pair"]["b"]} == {skipped["a"], skipped["b"]}
        assert back["pair"]["proposed_by"] == "undo"
    finally:
        session.close()


def test_pair_accuracy_counts_ties_half() -> None:
    s = {"a": 2.0, "b": 1.0, "c": 1.0}
    assert pair_accuracy(s, [("a", "b", 1, 0), ("b", "a", 1, 0), ("b", "c", 1, 0)]) == pytest.approx(1.5 / 3)
    assert pair_accuracy(s, []) is None


# -------------------------------------------------------------------------------------------------- new folders


def test_score_folder_api(tmp_path: Path) -> None:
    session, live, client, taste = _setup(tmp_path, min_votes=30)
    new = tmp_path / "new"
    new_taste = _photos(new, n=8, seed=5)
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8), (255, 255, 255)).save(secret)
    (new / "escape.png").symlink_to(secret)  # a symlink out of the folder: never scored, never served
    try:
        body = {"path": str(new)}
        assert client.post("/api/score-folder", json=body).status_code == 409  # no model yet
        # The guard: no token, a foreign Origin, no Origin.
        assert client.post("/api/score-folder", json=body, headers={TOKEN_HEADER: ""}).status_code == 403
        assert client.post("/api/score-folder", json=body, headers={"Origin": "http://evil.example"}).status_code == 403
        bare = TestClient(client.app, base_url="http://testserver")
        assert bare.post("/api/score-folder", json=body).status_code == 403
        _vote_brighter(client, taste, 30)
        _wait(lambda: live.status()["ready"])
        for bad in (str(secret), "relative/folder", str(tmp_path / "missing"), "line\nbreak"):
            r = client.post("/api/score-folder", json={"path": bad})
            assert r.status_code == 400, (bad, r.text)
            assert "\n" not in r.json()["detail"]
        r = client.post("/api/score-folder", json={"path": str(new), "extra": 1})
        assert r.status_code == 422
        job = client.post("/api/score-folder", json=body).json()
        assert job["state"] in ("queued", "running", "done") and job["total"] == 8
        _wait(lambda: client.get(f"/api/jobs/{job['id']}").json()["state"] in ("done", "failed"))
        done = client.get(f"/api/jobs/{job['id']}").json()
        assert done["state"] == "done", done
        items = done["items"]
        assert sorted(it["path"] for it in items) == sorted(new_taste)  # escape.png left out
        assert [it["rank"] for it in items] == list(range(1, 9))
        assert [it["score"] for it in items] == sorted((it["score"] for it in items), reverse=True)
        # The model ranks the new photos by brightness (what the votes taught it).
        rho = np.corrcoef([it["score"] for it in items], [new_taste[it["path"]] for it in items])[0, 1]
        assert rho > 0.7
        rows = read_results(done["out"])
        assert Path(done["out"]).parent == session.votes_path.parent / "tastelab_scored"
        assert len(rows) == 8 and all(r["error"] is None and 1 <= r["score"] <= 10 for r in rows)
        assert {Path(r["path"]).name for r in rows} == set(new_taste)
        thumb = client.get(items[0]["thumb"])
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        for probe in ("escape.png", "../secret.png", "%2e%2e/secret.png", "nope.png"):
            assert client.get(f"/scored/{job['id']}/{probe}").status_code == 404
        assert client.get(f"/scored/{'0' * 16}/{items[0]['path']}").status_code == 404
        assert client.get("/api/jobs/unknownjob").status_code == 404
        # Too many images for the page: refused with the bound.
        live.config.max_score_images = 3
        r = client.post("/api/score-folder", json=body)
        assert r.status_code == 400 and "at most 3" in r.json()["detail"]
    finally:
        live.stop()
        session.close()


def test_without_a_live_model_the_endpoints_say_so(tmp_path: Path) -> None:
    _photos(tmp_path / "photos", n=4)
    session = LabelSession(tmp_path / "photos", seed=0)
    app = create_app(session)
    client = TestClient(app, headers={"Origin": "http://testserver", TOKEN_HEADER: app.state.token})
    try:
        assert client.get("/api/model").json() == {"enabled": False}
        assert client.get("/api/stats").json()["model"] == {"enabled": False}
        assert client.post("/api/score-folder", json={"path": str(tmp_path)}).status_code == 409
        assert client.post("/api/model/save", json={}).status_code == 409
    finally:
        session.close()


def test_cli_refuses_a_score_folder_that_is_not_a_folder(tmp_path: Path, caplog) -> None:
    from tastelab.cli.main import main

    _photos(tmp_path / "photos", n=4)
    with caplog.at_level("ERROR", logger="tastelab"):
        assert main(["label", str(tmp_path / "photos"), "--score-folder", str(tmp_path / "nope")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0] and "--score-folder" in errors[0] and "nope" in errors[0]
    assert not (tmp_path / "photos" / "tastelab_votes.csv").exists()  # refused before the session opened


def test_cli_label_refuses_a_missing_or_invalid_prior(tmp_path: Path, caplog) -> None:
    from tastelab.cli.main import main

    _photos(tmp_path / "photos", n=4)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    for prior in (tmp_path / "nope", bad):
        caplog.clear()
        with caplog.at_level("ERROR", logger="tastelab"):
            assert main(["label", str(tmp_path / "photos"), "--prior", str(prior)]) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and "\n" not in errors[0] and str(prior) in errors[0] and "prior" in errors[0]


def test_saved_live_model_scores_like_the_live_one(tmp_path: Path) -> None:
    """The real extractor (MobileNetV2 at 64 px, cached): POST /api/model/save writes a model folder that
    `tastelab score` loads and that scores new photos as the live model ranked them."""
    from tastelab.inference.scoring import Scorer
    from tastelab.personal.features import parse_feature_set
    from tastelab.web.personal_fit import mobilenet_extractor

    taste = _photos(tmp_path / "photos")
    session = LabelSession(tmp_path / "photos", seed=0)
    extractor, spec = mobilenet_extractor(size=64, cache_dir=tmp_path / "cache",
                                          feature_sets=[parse_feature_set("mobilenet_v2[18]/mean")])
    live = LiveModel(session.index.images, session.image_dir, session.votes_path, extractor, saveable=spec,
                     config=LiveConfig(min_votes=30), fit=fast_fit).start()
    session.attach_live(live)
    app = create_app(session)
    client = TestClient(app, headers={"Origin": "http://testserver", TOKEN_HEADER: app.state.token})
    try:
        _vote_brighter(client, taste, 30)
        _wait(lambda: live.status()["ready"], timeout=120)
        r = client.post("/api/model/save", json={})
        assert r.status_code == 200, r.text
        folder = Path(r.json()["saved_to"])
        assert folder == session.votes_path.parent / "tastelab_model" and (folder / "config.json").is_file()
        assert live.status()["saved_to"] == str(folder)
        scores = live.scores()
        names = sorted(scores)
        got = Scorer(folder, backend="torch", device="cpu").predict_batch(
            [str(tmp_path / "photos" / n) for n in names])
        np.testing.assert_allclose([g.score for g in got], [scores[n] for n in names], atol=2e-3)
    finally:
        live.stop()
        session.close()


def test_live_model_with_a_prior_saves_a_folder_scoring_like_it(tmp_path: Path) -> None:
    """``tastelab label --prior``: the extractor adds the prior's scores, the live search may use them (its
    candidates include the prior), and the saved folder (personal + prior members) scores as the live model."""
    from tastelab.inference.scoring import Scorer
    from tastelab.models.folder import unit_scale
    from tastelab.models.identity import folder_hash
    from tastelab.personal.api import fit_personal
    from tastelab.personal.features import parse_feature_set
    from tastelab.web.personal_fit import PRIOR_KEY, mobilenet_extractor

    taste = _photos(tmp_path / "photos")
    feature = parse_feature_set("mobilenet_v2[18]/mean")
    labels = tmp_path / "prior_scores.csv"
    labels.write_text("image,mean_rating\n" + "".join(f"{n},{b:.3f}\n" for n, b in taste.items()))
    fit_personal(labels, tmp_path / "photos", out=tmp_path / "prior", feature_sets=[feature], size=64,
                 cache_dir=tmp_path / "cache", nested=False, folds=3, workers=0, mlp_widths=(), linear_lams=(1.0,),
                 max_ensemble=1)
    session = LabelSession(tmp_path / "photos", seed=0)
    extractor, spec = mobilenet_extractor(size=224, cache_dir=tmp_path / "cache", feature_sets=[feature],
                                          priors=[tmp_path / "prior"])
    assert spec.preprocess.size == 64 and [p.hash for p in spec.priors] == [folder_hash(tmp_path / "prior")]
    feats, _ = extractor([str(tmp_path / "photos" / n) for n in sorted(taste)], None)
    assert f"{PRIOR_KEY}prior" in feats and feats[f"{PRIOR_KEY}prior"].shape == (len(taste), 1)
    live = LiveModel(session.index.images, session.image_dir, session.votes_path, extractor, saveable=spec,
                     config=LiveConfig(min_votes=30), fit=fast_fit).start()
    session.attach_live(live)
    app = create_app(session)
    client = TestClient(app, headers={"Origin": "http://testserver", TOKEN_HEADER: app.state.token})
    try:
        _vote_brighter(client, taste, 30)
        _wait(lambda: live.status()["ready"], timeout=120)
        fit = live._fit
        assert fit is not None and any(c["stage"] == "prior" for c in fit.result.candidates)
        r = client.post("/api/model/save", json={})
        assert r.status_code == 200, r.text
        folder = Path(r.json()["saved_to"])
        scores = live.scores()
        names = sorted(scores)
        got = Scorer(folder, backend="torch", device="cpu").predict_batch(
            [str(tmp_path / "photos" / n) for n in names])
        cfg_range = Scorer(folder, backend="torch", device="cpu").config.score_range
        units = unit_scale(np.array([g.raw_score for g in got]), cfg_range)
        np.testing.assert_allclose(units, [scores[n] for n in names], atol=2e-3)
    finally:
        live.stop()
        session.close()
