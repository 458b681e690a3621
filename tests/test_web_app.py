"""``tastelab label`` web app through FastAPI's TestClient: votes on disk, score file, undo, restart,
concurrency, pair ids, safe image paths, browse with predictions, and the CLI's server config."""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import os
import random
import threading
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient
from PIL import Image

from tastelab.cli.main import build_parser
from tastelab.io.records import load_personal_scores
from tastelab.io.votes import load_votes
from tastelab.io.writers import open_writer
from tastelab.pairwise.ratings import RatingState
from tastelab.web.app import LOOPBACK_HOSTS, create_app
from tastelab.web.guard import TOKEN_HEADER
from tastelab.web.session import DEFAULT_SCORES_NAME, DEFAULT_VOTES_NAME, SETTLE_WINDOW, LabelSession
from tastelab.web.state import rank_correlation

NAMES = ["a.jpg", "b.png", "c d.jpg", "sub/é e.jpg", "sub/deep/f.webp", "g.gif"]


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """Six images (spaces, non-ASCII, sub-folders) plus things that must never be served."""
    root = tmp_path / "photos"
    for i, name in enumerate(NAMES):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40 + i, 30), (40 * i, 90, 200 - 30 * i)).save(path)
    secret = tmp_path / "secret.jpg"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(secret)
    (root / "notes.txt").write_text("not an image")
    Image.new("RGB", (8, 8)).save(root / ".hidden.jpg")
    (root / "escape.jpg").symlink_to(secret)  # a symlinked file leading out of the folder
    outside = tmp_path / "outside_dir"
    outside.mkdir()
    Image.new("RGB", (8, 8)).save(outside / "x.jpg")
    (root / "linked_dir").symlink_to(outside, target_is_directory=True)
    return root


def _session(image_dir: Path, **kwargs) -> LabelSession:
    kwargs.setdefault("seed", 0)
    return LabelSession(image_dir, **kwargs)


def _client(session: LabelSession, base_url: str = "http://testserver", **kwargs) -> TestClient:
    """A client that sends what the labelling page sends: its own Origin and the page's token."""
    app = create_app(session, **kwargs)
    return TestClient(app, base_url=base_url, headers={"Origin": base_url, TOKEN_HEADER: app.state.token})


def _vote(client: TestClient, choice: str = "a", pair: dict | None = None) -> dict:
    if pair is None:
        pair = client.get("/api/pair").json()["pair"]
    r = client.post("/api/vote", json={"pair_id": pair["pair_id"], "a": pair["a"], "b": pair["b"], "choice": choice,
                                       "seconds": 1.25})
    assert r.status_code == 200, r.text
    return {**r.json(), "pair": pair}


def _data_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()[1:]


def raw_get(app, raw_path: bytes) -> int:
    """Status of a GET sent with exactly this request target (no client-side normalisation of ``..``).

    HTTP clients drop ``..`` segments before sending; servers (uvicorn) pass the raw target on, percent-
    decoded into ``scope["path"]`` the same way as here.
    """
    sent: list[dict] = []

    async def call() -> None:
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
            "path": unquote(raw_path.decode("ascii")), "raw_path": raw_path, "query_string": b"", "root_path": "",
            "headers": [(b"host", b"testserver")], "client": ("127.0.0.1", 5000), "server": ("testserver", 80),
        }

        requested: list[bool] = []

        async def receive() -> dict:
            if requested:  # the body was read: the next thing a server reports is the client leaving
                return {"type": "http.disconnect"}
            requested.append(True)
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        await app(scope, receive, send)

    asyncio.run(call())
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


# --------------------------------------------------------------------------------------------------
# Votes file and score file


def test_vote_is_appended_and_readable_by_load_votes(image_dir: Path) -> None:
    with _session(image_dir) as session:
        client = _client(session)
        votes_path = image_dir / DEFAULT_VOTES_NAME
        assert votes_path.read_text().splitlines() == ["image_a,image_b,votes_a,votes_b,seconds"]
        cast = []
        for choice in ("a", "b", "tie"):
            out = _vote(client, choice)
            assert out["recorded"] and not out["duplicate"]
            cast.append((out["pair"]["a"], out["pair"]["b"], choice))
            # on disk before the response: one more complete line after every vote
            assert len(_data_lines(votes_path)) == len(cast)
        comparisons, problems = load_votes(votes_path, image_root=image_dir)
        assert problems == []
        expected = {"a": (1.0, 0.0), "b": (0.0, 1.0), "tie": (0.5, 0.5)}
        got = [(os.path.relpath(c.image_a, image_dir), os.path.relpath(c.image_b, image_dir), c.votes_a, c.votes_b)
               for c in comparisons]
        assert got == [(a, b, *expected[ch]) for a, b, ch in cast]
        assert all(line.endswith(",1.250") for line in _data_lines(votes_path))
        stats = client.get("/api/stats").json()
        assert stats["votes"] == 3 and stats["ties"] == 1 and stats["images"] == len(NAMES)


def test_score_file_is_image_comparison_json(image_dir: Path) -> None:
    with _session(image_dir) as session:
        client = _client(session)
        out = _vote(client, "a")
        winner, loser = out["pair"]["a"], out["pair"]["b"]
        scores_path = image_dir / DEFAULT_SCORES_NAME
        data = json.loads(scores_path.read_text(encoding="utf-8"))
        assert set(data) == {"ImageRecords", "Metadata"}
        assert set(data["ImageRecords"]) == set(NAMES)
        for rel, entry in data["ImageRecords"].items():
            assert entry["relative_path"] == rel
            assert isinstance(entry["score"], str) and isinstance(entry["comparisons"], str)
            float(entry["score"])
        assert data["Metadata"]["generator"] == "tastelab label"
        assert all(isinstance(v, str) for v in data["Metadata"].values())
        records = load_personal_scores(scores_path)  # default root: the score file's folder
        by_rel = {os.path.relpath(r.path, image_dir): r for r in records}
        assert set(by_rel) == set(NAMES)
        assert by_rel[winner].score > by_rel[loser].score
        assert by_rel[winner].extra["comparisons"] == 1 and by_rel[loser].extra["comparisons"] == 1
        assert sum(r.extra["comparisons"] for r in records) == 2
        assert not [p for p in scores_path.parent.iterdir() if ".tmp" in p.name]  # atomic writes leave nothing


def test_undo_removes_exactly_the_last_vote(image_dir: Path) -> None:
    with _session(image_dir) as session:
        client = _client(session)
        votes_path = image_dir / DEFAULT_VOTES_NAME
        _vote(client, "a")
        _vote(client, "tie")
        before_bytes = votes_path.read_bytes()
        before_scores = dict(session.ranker.scores)
        before_counts = dict(session.ranker.counts)
        third = _vote(client, "b")
        assert votes_path.read_bytes() != before_bytes
        r = client.post("/api/undo", json={"pair_id": third["pair"]["pair_id"]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert votes_path.read_bytes() == before_bytes  # the file is exactly what it was
        assert dict(session.ranker.scores) == before_scores  # exact, not approximately
        assert dict(session.ranker.counts) == before_counts
        assert body["stats"]["votes"] == 2
        assert body["undone"] == {"a": third["pair"]["a"], "b": third["pair"]["b"], "votes_a": 0.0, "votes_b": 1.0}
        assert {body["pair"]["a"], body["pair"]["b"]} == {third["pair"]["a"], third["pair"]["b"]}  # judge it again
        scores_file = json.loads((image_dir / DEFAULT_SCORES_NAME).read_text())
        assert scores_file["Metadata"]["votes"] == "2"
        # no body: the last vote of the file, whoever cast it
        assert client.post("/api/undo", json={}).status_code == 200
        assert client.post("/api/undo", json={}).status_code == 200
        assert _data_lines(votes_path) == []
        assert client.post("/api/undo", json={}).status_code == 409  # nothing left
        assert all(v == 0 for v in session.ranker.scores.values())


def test_undo_refuses_a_vote_another_tab_cast(image_dir: Path) -> None:
    with _session(image_dir) as session:
        tab1, tab2 = _client(session), _client(session)
        mine = _vote(tab1, "a")
        _vote(tab2, "b")
        before = (image_dir / DEFAULT_VOTES_NAME).read_bytes()
        r = tab1.post("/api/undo", json={"pair_id": mine["pair"]["pair_id"]})
        assert r.status_code == 409 and "another tab" in r.json()["detail"]
        assert (image_dir / DEFAULT_VOTES_NAME).read_bytes() == before


def test_restart_replays_the_votes_file(image_dir: Path) -> None:
    choices = ["a", "b", "tie", "a", "a", "b", "tie", "a"]
    with _session(image_dir) as first:
        client = _client(first)
        for choice in choices:
            _vote(client, choice)
        client.post("/api/undo", json={})
        scores, counts, stats = dict(first.ranker.scores), dict(first.ranker.counts), first.stats()
    with _session(image_dir) as second:
        assert dict(second.ranker.scores) == scores
        assert dict(second.ranker.counts) == counts
        assert second.stats() == stats
        client = _client(second)
        _vote(client, "a")  # and the session goes on appending
        assert len(_data_lines(image_dir / DEFAULT_VOTES_NAME)) == len(choices)


def test_restart_drops_a_torn_last_line(image_dir: Path, caplog) -> None:
    with _session(image_dir) as session:
        client = _client(session)
        _vote(client)
        _vote(client)
    votes_path = image_dir / DEFAULT_VOTES_NAME
    with votes_path.open("a") as f:
        f.write("a.jpg,b.png,0.")  # a crash in the middle of a write
    with caplog.at_level(logging.WARNING), _session(image_dir) as session:
        assert session.stats()["votes"] == 2
    assert "incomplete last line" in caplog.text
    assert votes_path.read_text().endswith("\n") and len(_data_lines(votes_path)) == 2
    comparisons, _ = load_votes(votes_path, image_root=image_dir)
    assert len(comparisons) == 2


def test_a_damaged_line_never_swallows_the_next_vote(image_dir: Path, caplog) -> None:
    """An unterminated quote (a hand edit) is one unusable row at file:line; the votes after it replay."""
    odd = 'q "x", y.jpg'  # quotes and the delimiter in a name: quoted on write, one line
    Image.new("RGB", (9, 9)).save(image_dir / odd)
    votes_path = image_dir / DEFAULT_VOTES_NAME
    votes_path.write_text('image_a,image_b,votes_a,votes_b,seconds\n'
                          'a.jpg,b.png,1,0,\n'
                          '"a.jpg,g.gif,1,0,\n'  # damaged: the quote is never closed
                          'b.png,g.gif,0,1,\n'
                          'g.gif,a.jpg,0.5,0.5,2.000\n')
    with caplog.at_level(logging.WARNING), _session(image_dir) as session:
        assert session.stats()["votes"] == 3 and session.stats()["rows"] == 4
        assert f"{votes_path}:3" in caplog.text
        pair = session._issue((odd, "a.jpg"))
        session.vote(pair["pair_id"], odd, "a.jpg", "a")
        session.vote(session._issue(("a.jpg", "b.png"))["pair_id"], "a.jpg", "b.png", "b")
        session.undo()  # rewrites the file: the damaged line stays as it was, nothing else changes
    lines = votes_path.read_text().split("\n")
    assert lines[2] == '"a.jpg,g.gif,1,0,' and lines[5] == '"q ""x"", y.jpg",a.jpg,1,0,' and lines[6] == ""
    with _session(image_dir) as again:
        assert again.stats()["votes"] == 4 and again.stats()["rows"] == 5
        assert again.votes.rows[-1].vote.image_a == odd


def test_existing_four_column_file_keeps_its_layout(image_dir: Path) -> None:
    votes_path = image_dir / "old.csv"
    votes_path.write_text("image_a,image_b,votes_a,votes_b\na.jpg,b.png,1,0\nA.JPG,gone.jpg,0,1\n")
    with _session(image_dir, votes_path=votes_path) as session:
        assert session.stats()["votes"] == 1  # the row naming a missing image stays in the file, unapplied
        assert session.stats()["rows"] == 2
        _vote(_client(session), "tie")
    lines = votes_path.read_text().splitlines()
    assert lines[:3] == ["image_a,image_b,votes_a,votes_b", "a.jpg,b.png,1,0", "A.JPG,gone.jpg,0,1"]
    assert lines[3].endswith(",0.5,0.5") and lines[3].count(",") == 3


def test_concurrent_votes_from_threads_leave_a_consistent_file(image_dir: Path) -> None:
    n_threads, per_thread = 2, 20
    with _session(image_dir) as session:
        app = create_app(session)
        errors: list[BaseException] = []
        start = threading.Barrier(n_threads)

        def tab(seed: int) -> None:
            try:
                # one client per thread: two browser tabs
                client = TestClient(app, headers={"Origin": "http://testserver", TOKEN_HEADER: app.state.token})
                rng = random.Random(seed)
                start.wait()
                for _ in range(per_thread):
                    _vote(client, rng.choice(["a", "b", "tie"]))
            except BaseException as exc:  # surfaced in the main thread below
                errors.append(exc)

        threads = [threading.Thread(target=tab, args=(i,)) for i in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        total = n_threads * per_thread
        votes_path = image_dir / DEFAULT_VOTES_NAME
        raw = votes_path.read_bytes()
        assert raw.endswith(b"\n")
        lines = _data_lines(votes_path)
        assert len(lines) == total
        for row in csv.reader(lines):  # no torn or interleaved lines
            assert len(row) == 5 and row[0] in NAMES and row[1] in NAMES
            assert float(row[2]) + float(row[3]) == 1 and float(row[4]) == 1.25
        comparisons, problems = load_votes(votes_path, image_root=image_dir)
        assert len(comparisons) == total and problems == []
        stats = session.stats()
        assert stats["votes"] == total
        assert sum(session.ranker.counts.values()) == 2 * total
        live = dict(session.ranker.scores)
    # The live ranking equals a replay of the file: votes were applied in file order, none lost or doubled.
    with _session(image_dir) as replayed:
        assert dict(replayed.ranker.scores) == live


# --------------------------------------------------------------------------------------------------
# Pair ids and validation


def test_pair_ids_stale_tabs_duplicates_and_validation(image_dir: Path) -> None:
    with _session(image_dir) as session:
        tab1, tab2 = _client(session), _client(session)
        old = tab1.get("/api/pair").json()["pair"]
        for _ in range(5):
            _vote(tab2, "b")  # the ranking moves on meanwhile
        stale = _vote(tab1, "a", pair=old)
        assert stale["recorded"]
        last = next(csv.reader(_data_lines(image_dir / DEFAULT_VOTES_NAME)[-1:]))
        assert last[:4] == [old["a"], old["b"], "1", "0"]  # recorded against the images that tab showed
        # the same pair answered twice (double click, retried request): recorded once
        again = tab1.post("/api/vote", json={"pair_id": old["pair_id"], "a": old["a"], "b": old["b"], "choice": "a"})
        assert again.status_code == 200 and again.json()["duplicate"] and not again.json()["recorded"]
        assert session.stats()["votes"] == 6

        fresh = tab1.get("/api/pair").json()["pair"]
        other = next(n for n in NAMES if n not in (fresh["a"], fresh["b"]))
        cases = [
            ({"a": fresh["a"], "b": other}, 400),  # the pair id showed other images
            ({"a": "nope.jpg"}, 400),  # unknown image
            ({"a": "../secret.jpg"}, 400),
            ({"b": fresh["a"]}, 400),  # self-pair
            ({"choice": "left"}, 422),
            ({"pair_id": "has spaces"}, 422),
            ({"extra": 1}, 422),
            ({"seconds": -1}, 422),
        ]
        for change, status in cases:
            body = {"pair_id": fresh["pair_id"], "a": fresh["a"], "b": fresh["b"], "choice": "a", **change}
            r = tab1.post("/api/vote", json=body)
            assert r.status_code == status, (change, r.text)
        assert session.stats()["votes"] == 6
        # an id the server never issued (a forged request, a tab left open across a restart): refused, not recorded
        unknown = {"pair_id": "0123456789abcdef", "a": NAMES[0], "b": NAMES[1], "choice": "tie"}
        r = tab1.post("/api/vote", json=unknown)
        assert r.status_code == 409 and "not issued" in r.json()["detail"]
        assert session.stats()["votes"] == 6


def test_skip_and_pairs(image_dir: Path) -> None:
    with _session(image_dir) as session:
        client = _client(session)
        first = client.get("/api/pair").json()
        assert first["stats"]["votes"] == 0
        pair = first["pair"]
        assert pair["a"] != pair["b"] and {pair["a"], pair["b"]} <= set(NAMES)
        nxt = client.get("/api/pair", params={"skip": pair["pair_id"]}).json()["pair"]
        assert {nxt["a"], nxt["b"]} != {pair["a"], pair["b"]}  # the skipped pair is not proposed straight away
        assert session.stats()["votes"] == 0  # a skip records nothing
        assert client.get(nxt["url_a"]).status_code == 200


def test_settledness_appears_after_the_window(image_dir: Path) -> None:
    with _session(image_dir) as session:
        client = _client(session)
        rank = {name: i for i, name in enumerate(NAMES)}  # a consistent rater: earlier names are better
        for i in range(SETTLE_WINDOW + 15):
            pair = client.get("/api/pair").json()["pair"]
            out = _vote(client, "a" if rank[pair["a"]] < rank[pair["b"]] else "b", pair=pair)
            if i + 1 <= SETTLE_WINDOW:
                assert out["stats"]["settledness"] is None
        stats = out["stats"]
        assert stats["images_seen"] == len(NAMES)
        assert stats["mean_comparisons"] == pytest.approx(2 * stats["votes"] / len(NAMES))
        assert 0.5 < stats["settledness"] <= 1.0
        client.post("/api/undo", json={})  # the trailing ranker steps back too
        assert session.stats()["votes"] == SETTLE_WINDOW + 14


# --------------------------------------------------------------------------------------------------
# Images: only indexed files inside the folder


def test_images_are_served_from_the_folder(image_dir: Path) -> None:
    with _session(image_dir) as session:
        client = _client(session)
        assert set(session.index.images) == set(NAMES)  # no hidden file, no text file, no escaping symlink
        for name in NAMES:
            r = client.get(f"/img/{name}")
            assert r.status_code == 200, name
            assert r.content == (image_dir / name).read_bytes()
        assert client.get("/img/c%20d.jpg").status_code == 200
        assert client.get("/img/sub/%C3%A9%20e.jpg").status_code == 200
        thumb = client.get("/thumb/sub/deep/f.webp")
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"


@pytest.mark.parametrize("raw", [
    b"/img/../secret.jpg",
    b"/img/sub/../../secret.jpg",
    b"/img/%2e%2e/secret.jpg",
    b"/img/%2E%2E/secret.jpg",
    b"/img/..%2fsecret.jpg",
    b"/img/%2e%2e%2fsecret.jpg",
    b"/img/sub/%2e%2e/a.jpg",  # even when it would land inside the folder
    b"/img/./a.jpg",
    b"/img//etc/passwd",
    b"/img/%2fetc%2fpasswd",
    b"/img/..%5csecret.jpg",
    b"/img/sub%5c..%5c..%5csecret.jpg",
    b"/img/a.jpg%00.png",
    b"/img/a.jpg%00",
    b"/img/%252e%252e/secret.jpg",
    b"/img/escape.jpg",  # a symlink leading out of the folder
    b"/img/linked_dir/x.jpg",  # a symlinked folder leading out
    b"/img/.hidden.jpg",
    b"/img/notes.txt",
    b"/img/tastelab_votes.csv",
    b"/img/tastelab_scores.json",
    b"/img/missing.jpg",
    b"/img/",
    b"/thumb/../secret.jpg",
    b"/thumb/escape.jpg",
])
def test_image_paths_outside_the_index_are_404(image_dir: Path, raw: bytes) -> None:
    with _session(image_dir) as session:
        app = create_app(session)
        assert raw_get(app, raw) == 404
        assert raw_get(app, b"/img/a.jpg") == 200  # the same helper serves a real image


def test_symlink_swapped_after_start_is_refused(image_dir: Path, tmp_path: Path) -> None:
    with _session(image_dir) as session:
        client = _client(session)
        assert client.get("/img/a.jpg").status_code == 200
        (image_dir / "a.jpg").unlink()
        (image_dir / "a.jpg").symlink_to(tmp_path / "secret.jpg")
        assert client.get("/img/a.jpg").status_code == 404


# --------------------------------------------------------------------------------------------------
# Browse


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_browse_with_predictions_sorts_by_disagreement(image_dir: Path, tmp_path: Path, suffix: str,
                                                       monkeypatch) -> None:
    from tastelab.web.predictions import load_predictions

    with _session(image_dir) as session:
        client = _client(session)
        rank = {name: i for i, name in enumerate(NAMES)}  # votes: NAMES[0] best
        for _ in range(60):
            pair = client.get("/api/pair").json()["pair"]
            _vote(client, "a" if rank[pair["a"]] < rank[pair["b"]] else "b", pair=pair)
        # the model agrees except that it loves the worst image; paths as `tastelab score` records them
        predicted = {name: 9.0 - i for i, name in enumerate(NAMES)}
        predicted[NAMES[-1]] = 9.5
        out = tmp_path / f"scores{suffix}"
        monkeypatch.chdir(image_dir.parent)
        with open_writer(out, resume=False) as writer:
            for i, name in enumerate(NAMES):
                path = str(image_dir / name) if i % 2 else os.path.join("photos", name)  # absolute or cwd-relative
                writer.write({"path": path, "score": predicted[name], "band": "x", "error": None})
            writer.write({"path": "elsewhere/z.jpg", "score": 5.0, "error": None})
            writer.write({"path": str(image_dir / "a.jpg"), "score": None, "error": "cannot decode"})
        monkeypatch.chdir(tmp_path)  # the app may run from anywhere
        session.predictions = load_predictions(out, image_dir, session.index.images)
        assert session.predictions == pytest.approx(predicted)
        data = client.get("/api/browse").json()
        assert data["sort"] == "disagreement" and data["has_predictions"]
        items = data["items"]
        assert items[0]["path"] == NAMES[-1]  # model rank 1, vote rank 6
        top = items[0]
        assert (top["rank"], top["pred_rank"], top["rank_diff"]) == (6, 1, -5)
        assert sorted(it["path"] for it in items) == sorted(NAMES)
        assert [abs(it["rank_diff"]) for it in items] == sorted((abs(it["rank_diff"]) for it in items), reverse=True)
        by_score = client.get("/api/browse", params={"sort": "score"}).json()["items"]
        assert [it["path"] for it in by_score] == NAMES
        assert by_score[0]["thumb"].startswith("/thumb/")
        assert client.get("/api/browse", params={"sort": "nonsense"}).status_code == 400


def test_browse_without_predictions(image_dir: Path) -> None:
    with _session(image_dir) as session:
        data = _client(session).get("/api/browse").json()
        assert data["sort"] == "score" and not data["has_predictions"] and data["spearman"] is None
        assert sorted(it["path"] for it in data["items"]) == sorted(NAMES)
        assert all(it["prediction"] is None for it in data["items"])


# --------------------------------------------------------------------------------------------------
# Pages, hosts, CLI


def test_pages_and_security_headers(image_dir: Path) -> None:
    with _session(image_dir) as session:
        client = _client(session)
        page = client.get("/")
        assert page.status_code == 200 and "/static/label.js" in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["x-content-type-options"] == "nosniff"
        assert "/static/browse.js" in client.get("/browse").text
        for name in ("label.js", "browse.js", "style.css"):
            assert client.get(f"/static/{name}").status_code == 200
        assert client.get("/api/stats").headers["cache-control"] == "no-store"


def test_loopback_app_refuses_foreign_host_headers(image_dir: Path) -> None:
    """A DNS-rebinding page reaches 127.0.0.1 under its own host name: refused."""
    with _session(image_dir) as session:
        client = TestClient(create_app(session, allowed_hosts=LOOPBACK_HOSTS), base_url="http://127.0.0.1:8765")
        assert client.get("/api/stats").status_code == 200
        assert client.get("/api/stats", headers={"host": "evil.example:8765"}).status_code == 400


def test_cli_binds_loopback_by_default(image_dir: Path, caplog) -> None:
    from tastelab.cli import label

    args = build_parser().parse_args(["label", str(image_dir), "--seed", "1"])
    app = label.build_app(args)
    try:
        config = label.server_config(args, app)
        assert config.host == "127.0.0.1" and config.port == label.DEFAULT_PORT
        # Bound to loopback: only loopback Host headers pass (DNS rebinding blocked); off loopback: any.
        hosts = label.allowed_hosts(args.host)
        assert hosts is not None and {"127.0.0.1", "localhost"} <= set(hosts) and "evil.example" not in hosts
        assert label.allowed_hosts("0.0.0.0") is None
        assert app.state.session.votes_path == image_dir / DEFAULT_VOTES_NAME
    finally:
        app.state.session.close()
    wide = build_parser().parse_args(["label", str(image_dir), "--host", "0.0.0.0", "--port", "9000"])
    with caplog.at_level(logging.WARNING, logger="tastelab"):
        config = label.server_config(wide, app)
    assert config.host == "0.0.0.0" and config.port == 9000
    assert "anyone who can reach this machine" in caplog.text
    assert label.allowed_hosts("0.0.0.0") is None
    assert label.is_loopback("::1") and label.is_loopback("localhost") and not label.is_loopback("192.168.1.2")


def test_refuses_a_score_file_it_did_not_write(image_dir: Path) -> None:
    foreign = image_dir / "mine.json"
    foreign.write_text(json.dumps({"ImageRecords": {"a.jpg": {"relative_path": "a.jpg", "score": "1.5",
                                                              "comparisons": "3"}}, "Metadata": {}}))
    with pytest.raises(ValueError, match="refusing to overwrite"):
        LabelSession(image_dir, scores_path=foreign)
    assert json.loads(foreign.read_text())["ImageRecords"]["a.jpg"]["score"] == "1.5"


def test_one_process_per_votes_file(image_dir: Path) -> None:
    with _session(image_dir), pytest.raises(ValueError, match="in use"):
        LabelSession(image_dir)
    with _session(image_dir) as again:  # released on close
        assert again.stats()["votes"] == 0


def test_votes_and_scores_elsewhere(image_dir: Path, tmp_path: Path) -> None:
    votes, scores = tmp_path / "labels" / "new" / "votes.csv", tmp_path / "labels" / "scores.json"
    with _session(image_dir, votes_path=votes, scores_path=scores) as session:
        _vote(_client(session), "b")
    comparisons, problems = load_votes(votes, image_root=image_dir)  # paths are relative to IMAGE_DIR
    assert len(comparisons) == 1 and problems == []
    assert len(load_personal_scores(scores, image_root=image_dir)) == len(NAMES)


def test_a_score_file_elsewhere_says_its_paths_are_relative_to_the_image_folder(image_dir: Path,
                                                                              tmp_path: Path) -> None:
    scores = tmp_path / "labels" / "scores.json"
    with _session(image_dir, scores_path=scores) as session:
        _vote(_client(session), "a")
    data = json.loads(scores.read_text())
    assert set(data["ImageRecords"]) == set(NAMES)  # image-folder relative names, as load_personal_scores expects
    assert data["Metadata"]["paths"] == f"relative to {os.path.realpath(image_dir)}"


def test_refuses_too_few_images(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "only.jpg")
    with pytest.raises(ValueError, match="at least 2"):
        LabelSession(tmp_path)


# --------------------------------------------------------------------------------------------------
# Ranking interface


def test_the_app_ranks_with_the_documented_elo_update(image_dir: Path) -> None:
    """The session's ranking is the shared RatingState: the documented update, exact undo, ``exclude`` honoured."""
    with _session(image_dir, k=0.05) as session:
        assert isinstance(session.ranker, RatingState) and session.ranker.k == 0.05
    ranker = RatingState(["x", "y", "z"], k=0.05)
    ranker.vote("x", "y", votes_a=1, votes_b=0)
    assert ranker.scores["x"] == pytest.approx(0.025) and ranker.scores["y"] == pytest.approx(-0.025)
    p = 1 / (1 + 10 ** -(0.025 - 0.0))
    ranker.vote("x", "z", votes_a=0.5, votes_b=0.5)
    assert ranker.scores["x"] == pytest.approx(0.025 + 0.05 * (0.5 - p))
    snapshot = dict(ranker.scores)
    ranker.vote("y", "z", votes_a=0, votes_b=1)
    ranker.undo()
    assert dict(ranker.scores) == snapshot and ranker.counts["y"] == 1
    rng = np.random.default_rng(0)
    for _ in range(20):  # the excluded pair is avoided when possible
        a, b = ranker.propose(rng, exclude={frozenset(("z", "x"))})
        assert {a, b} != {"z", "x"}


def test_rank_correlation_is_scipys_spearman_or_none() -> None:
    from scipy.stats import spearmanr

    rng = random.Random(3)
    x = [rng.choice([0.0, 0.5, 1.0, 2.0]) for _ in range(30)]
    y = [v + rng.random() for v in x]
    assert rank_correlation(x, y) == pytest.approx(spearmanr(x, y).statistic)
    assert rank_correlation([1, 1, 1], [1, 2, 3]) is None and rank_correlation([1, 2], [2, 1]) is None


# --------------------------------------------------------------------------------------------------
# Cross-origin and malformed requests (issue 11, serious item 2)


def test_other_pages_cannot_undo_or_vote(image_dir: Path) -> None:
    """An empty cross-origin form post, a body-less POST, a missing token: refused, the votes file untouched."""
    with _session(image_dir) as session:
        client = _client(session)
        for _ in range(2):
            _vote(client, "a")
        votes_path = image_dir / DEFAULT_VOTES_NAME
        before = votes_path.read_bytes()
        token = client.headers[TOKEN_HEADER]
        bare = TestClient(client.app)  # no Origin, no token: what curl or a no-cors beacon sends
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        attempts = [
            (bare, {}, None, 403),  # body-less, no Origin
            (bare, {"Origin": "https://evil.example", **form}, b"", 403),  # the cross-origin form post
            (bare, {"Origin": "https://evil.example", TOKEN_HEADER: token, "Content-Type": "application/json"},
             b"{}", 403),
            (bare, {"Origin": "http://testserver", "Content-Type": "application/json"}, b"{}", 403),  # no token
            (bare, {"Origin": "http://testserver", TOKEN_HEADER: "guess", "Content-Type": "application/json"},
             b"{}", 403),
            (client, {"Sec-Fetch-Site": "cross-site", "Content-Type": "application/json"}, b"{}", 403),
            (client, form, b"pair_id=x", 415),  # right origin and token, but not JSON
            (client, {}, None, 415),  # body-less
            (client, {"Content-Type": "text/plain"}, b"{}", 415),
            (client, {"Content-Type": "application/json"}, b"", 422),  # JSON type, no body
        ]
        for who, headers, body, status in attempts:
            r = who.post("/api/undo", headers=headers, content=body)
            assert r.status_code == status, (headers, r.text)
            r = who.post("/api/vote", headers=headers, content=body)
            assert r.status_code == status, (headers, r.text)
        assert votes_path.read_bytes() == before
        assert session.stats()["votes"] == 2
        # the page itself (same origin, its token, JSON, Sec-Fetch-Site same-origin) still can
        r = client.post("/api/undo", json={}, headers={"Sec-Fetch-Site": "same-origin"})
        assert r.status_code == 200 and session.stats()["votes"] == 1


def test_page_carries_the_token_and_the_server_its_origins(image_dir: Path) -> None:
    from tastelab.cli import label

    args = build_parser().parse_args(["label", str(image_dir), "--port", "8765"])
    app = label.build_app(args)
    try:
        page = TestClient(app, base_url="http://127.0.0.1:8765").get("/")
        assert f'content="{app.state.token}"' in page.text and page.headers["cache-control"] == "no-store"
        pair = TestClient(app, base_url="http://127.0.0.1:8765").get("/api/pair").json()["pair"]
        body = {"pair_id": pair["pair_id"], "a": pair["a"], "b": pair["b"], "choice": "a"}
        for base, origin, status in [
            ("http://127.0.0.1:8765", "http://127.0.0.1:8765", 200),
            ("http://localhost:8765", "http://localhost:8765", 200),  # a duplicate by then: still 200
            ("http://127.0.0.1:8765", "http://127.0.0.1:9999", 403),  # another local server's page
            ("http://127.0.0.1:8765", "null", 403),  # sandboxed iframe, file:// page
        ]:
            client = TestClient(app, base_url=base, headers={"Origin": origin, TOKEN_HEADER: app.state.token})
            assert client.post("/api/vote", json=body).status_code == status, (base, origin)
        assert app.state.session.stats()["votes"] == 1
    finally:
        app.state.session.close()


def test_request_bodies_are_bounded_and_never_echoed(image_dir: Path) -> None:
    from tastelab.web.guard import MAX_BODY

    with _session(image_dir) as session:
        client = _client(session)
        pair = client.get("/api/pair").json()["pair"]
        big = b'{"pair_id": "' + b"x" * (4 * MAX_BODY) + b'"}'
        r = client.post("/api/vote", content=big, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and len(r.content) < 200

        def chunks():  # no Content-Length: the limit applies to the bytes as they arrive
            for _ in range(8):
                yield b" " * MAX_BODY

        r = client.post("/api/undo", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and len(r.content) < 200
        marker = "ECHO" * 1000  # under the limit but invalid: the 422 names the field, not the input
        body = {"pair_id": pair["pair_id"], "a": pair["a"], "b": pair["b"], "choice": marker, marker: 1}
        r = client.post("/api/vote", json=body)
        assert r.status_code == 422 and "ECHO" not in r.text and len(r.content) < 1000
        assert "choice" in r.json()["detail"]
        json_type = {"Content-Type": "application/json"}
        r = client.post("/api/vote", content=b'{"pair_id": "' + b"y" * 5000, headers=json_type)
        assert r.status_code == 422 and "yyyy" not in r.text
        for seconds in ("NaN", "Infinity", "-Infinity", "-1", "1e400"):
            fields = json.dumps({"pair_id": pair["pair_id"], "a": pair["a"], "b": pair["b"], "choice": "a"})
            raw = fields[:-1] + f', "seconds": {seconds}}}'
            r = client.post("/api/vote", content=raw.encode(), headers={"Content-Type": "application/json"})
            assert r.status_code == 422, (seconds, r.text)
            assert "seconds" in r.json()["detail"]
        assert session.stats()["votes"] == 0


def test_favicon_question_and_stability_wording(image_dir: Path, tmp_path: Path) -> None:
    from tastelab.cli import label

    question = 'Which photo would you rather hang on your wall? <b>&"'
    args = build_parser().parse_args(["label", str(image_dir), "--question", question])
    app = label.build_app(args)
    try:
        client = TestClient(app, base_url="http://127.0.0.1:8765")  # the CLI app answers loopback names only
        fav = client.get("/favicon.ico")
        assert fav.status_code == 200 and fav.headers["content-type"].startswith("image/svg+xml")
        page = client.get("/").text
        assert "Which photo would you rather hang on your wall? &lt;b&gt;&amp;&quot;" in page and "<b>&" not in page
        assert 'rel="icon"' in page and 'rel="icon"' in client.get("/browse").text
        assert "order stability" in page and "not whether the ranking is right" in page
        assert client.get("/api/stats").json()["question"] == question
    finally:
        app.state.session.close()
    meta = json.loads((image_dir / DEFAULT_SCORES_NAME).read_text())["Metadata"]
    assert meta["question"] == question
    with _session(image_dir) as again:  # a restart without --question keeps the stored one
        assert again.question == question
    with _session(image_dir, question="  Sharper?  ") as changed:
        assert changed.question == "Sharper?"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
def test_entries_that_are_not_regular_files_are_not_images_of_the_folder(tmp_path: Path) -> None:
    """A FIFO named like an image is never served (404), so no pair may show it: it is left out of the index."""
    from tastelab.web.paths import index_images

    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    os.mkfifo(tmp_path / "b.jpg")
    os.symlink(tmp_path / "b.jpg", tmp_path / "c.jpg")
    assert index_images(tmp_path) == ["a.jpg"]
