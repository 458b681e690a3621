"""``tastelab label`` end to end: a real uvicorn server on a free localhost port, driven by Debian's Chromium
through Playwright (keyboard, on-screen button, undo, counter, browse page), plus raw HTTP requests that a
browser or httpx would normalise before sending.

Needs ``playwright`` (the Python package only: no ``playwright install``) and ``/usr/bin/chromium`` (Debian's
``chromium`` package); skips with the reason when either is missing. ``TASTELAB_SCREENSHOTS=DIR`` keeps the
screenshots in DIR instead of the test's temporary folder.
"""

from __future__ import annotations

import csv
import http.client
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import uvicorn
from PIL import Image, ImageDraw

from tastelab.web.app import LOOPBACK_HOSTS, create_app
from tastelab.web.guard import loopback_origins
from tastelab.web.session import DEFAULT_VOTES_NAME, LabelSession

CHROMIUM = os.environ.get("TASTELAB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"
TIMEOUT_MS = 20_000


def _images(root: Path) -> list[str]:
    """The README's sample photos when present (a realistic screenshot), else generated ones."""
    root.mkdir(parents=True)
    examples = sorted(EXAMPLES.glob("*.jpg")) if EXAMPLES.is_dir() else []
    if len(examples) >= 4:
        for path in examples:
            shutil.copy(path, root / path.name)
        return sorted(p.name for p in examples)
    names = []
    for i in range(6):
        img = Image.new("RGB", (640, 440), (30 * i, 110, 220 - 30 * i))
        ImageDraw.Draw(img).ellipse((100 + 30 * i, 80, 400 + 30 * i, 380), fill=(240, 200 - 25 * i, 40))
        name = f"photo {i}.jpg"
        img.save(root / name, quality=90)
        names.append(name)
    return names


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[dict]:
    """The app on 127.0.0.1 with a kernel-chosen port (socket bound here, so no race for a free port)."""
    tmp = tmp_path_factory.mktemp("label")
    root = tmp / "photos"
    names = _images(root)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp / "secret.jpg")
    session = LabelSession(root, seed=0, question="Which photo would you rather hang on your wall?")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_app(session, allowed_hosts=LOOPBACK_HOSTS, origins=loopback_origins(port))  # as `tastelab label`
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield {"url": f"http://127.0.0.1:{port}", "port": port, "root": root, "names": names, "session": session,
               "tmp": tmp}
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        session.close()


def _raw_status(port: int, target: str, host: str = "127.0.0.1") -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", target, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", f"{host}:{port}")
        conn.endheaders()
        return conn.getresponse().status
    finally:
        conn.close()


def _raw_post(port: int, target: str, headers: dict[str, str], body: bytes = b"") -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", target, body=body, headers={"Host": f"127.0.0.1:{port}", **headers})
        return conn.getresponse().status
    finally:
        conn.close()


def test_real_server_refuses_posts_from_other_pages(served: dict) -> None:
    """What another page's form or fetch can send (no token, a foreign Origin): refused, nothing changes."""
    port = served["port"]
    before = served["session"].stats()["votes"]
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    assert _raw_post(port, "/api/undo", {}) == 403
    assert _raw_post(port, "/api/undo", {"Origin": "https://evil.example", **form}) == 403
    assert _raw_post(port, "/api/undo", {"Origin": f"http://127.0.0.1:{port}", "Content-Type": "application/json"},
                     b"{}") == 403  # right origin, no token
    assert _raw_post(port, "/api/vote", {"Content-Length": str(10**9)}) == 413
    assert served["session"].stats()["votes"] == before


def test_real_server_refuses_traversal_and_foreign_hosts(served: dict) -> None:
    port = served["port"]
    assert _raw_status(port, "/img/" + served["names"][0].replace(" ", "%20")) == 200
    for target in ("/img/../secret.jpg", "/img/%2e%2e/secret.jpg", "/img/..%2fsecret.jpg", "/img/%2e%2e%2fsecret.jpg",
                   "/img//etc/passwd", "/img/a.jpg%00", "/img/..%5csecret.jpg", "/thumb/../secret.jpg"):
        assert _raw_status(port, target) in (400, 404), target  # 400: the HTTP parser refused it first
    assert _raw_status(port, "/api/stats", host="rebound.example") == 400


def _chromium_page_context(tmp: Path):  # -> (playwright, context)
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the Python package) is not installed")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)")
    pw = sync_api.sync_playwright().start()
    profile = tmp / "chromium-profile"  # a fresh profile: nothing cached or remembered between runs
    try:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1600, "height": 900},
        )
    except Exception:
        pw.stop()
        raise
    return pw, context


def test_label_page_in_chromium(served: dict, tmp_path: Path) -> None:
    shots = Path(os.environ.get("TASTELAB_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    session: LabelSession = served["session"]
    assert session.stats()["votes"] == 0
    pw, context = _chromium_page_context(tmp_path)
    try:
        page = context.pages[0] if context.pages else context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        failed: list[str] = []  # every request the page makes must succeed (the favicon included)
        page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        page.goto(served["url"] + "/")
        page.wait_for_selector("body[data-state=ready]")
        assert page.locator("#question").inner_text() == "Which photo would you rather hang on your wall?"
        assert "order stability" in page.locator("#stability").inner_text()
        # Record, at every change of pair, whether a side still carries the previous choice's highlight.
        page.evaluate("""() => {
            window.__highlightOnNewPair = [];
            new MutationObserver(() => window.__highlightOnNewPair.push(
                document.querySelectorAll('.side.chosen').length)).observe(
                document.body, {attributes: true, attributeFilter: ['data-pair-id']});
        }""")
        for side in ("#img-a", "#img-b"):  # both images really decoded, and large
            assert page.eval_on_selector(side, "img => img.complete && img.naturalWidth > 0")
            box = page.locator(side).bounding_box()
            assert box is not None and box["width"] > 600 and box["height"] > 600

        def current() -> dict:
            return page.evaluate("""() => ({id: document.body.dataset.pairId,
                a: decodeURIComponent(new URL(document.getElementById('img-a').src).pathname.slice(5)),
                b: decodeURIComponent(new URL(document.getElementById('img-b').src).pathname.slice(5))})""")

        def act(do) -> dict:
            """Do one action on the pair on screen; wait until the next pair is fully shown."""
            shown = current()
            do()
            page.wait_for_function(
                "id => document.body.dataset.state === 'ready' && document.body.dataset.pairId !== id", arg=shown["id"])
            return shown

        expected: list[tuple[str, str, str, str]] = []
        wins = {"ArrowLeft": ("1", "0"), "ArrowRight": ("0", "1"), "ArrowDown": ("0.5", "0.5")}
        for key in ["ArrowLeft"] * 3 + ["ArrowRight"] * 2 + ["ArrowDown"]:
            shown = act(lambda key=key: page.keyboard.press(key))
            expected.append((shown["a"], shown["b"], *wins[key]))
        assert page.locator("#votes").inner_text() == "6"
        act(lambda: page.keyboard.press("u"))  # takes the tie back and shows that pair again
        undone = expected.pop()
        again = current()
        assert (again["a"], again["b"]) == undone[:2]  # the undone pair, same sides, to judge again
        assert page.locator("#votes").inner_text() == "5"
        shown = act(lambda: page.click("#btn-a"))  # the on-screen "left better" button
        expected.append((shown["a"], shown["b"], "1", "0"))
        page.wait_for_timeout(300)  # let the click's highlight fade before the picture
        page.screenshot(path=str(shots / "label.png"))
        highlights = page.evaluate("() => window.__highlightOnNewPair")
        assert len(highlights) >= 8 and not any(highlights), highlights  # never a pre-selected-looking side

        with (served["root"] / DEFAULT_VOTES_NAME).open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["image_a", "image_b", "votes_a", "votes_b", "seconds"]
        assert [tuple(r[:4]) for r in rows[1:]] == expected  # 3 left + 2 right (tie undone) + 1 left by click
        assert all(float(r[4]) >= 0 for r in rows[1:])
        assert page.locator("#votes").inner_text() == "6"
        assert page.locator("#seen").inner_text() == str(session.stats()["images_seen"])
        assert page.locator("#images").inner_text() == str(len(served["names"]))
        assert session.stats()["votes"] == 6 and session.stats()["ties"] == 0

        page.goto(served["url"] + "/browse")
        page.wait_for_selector("body[data-state=ready]")
        listed = page.eval_on_selector_all("#rows tr", "rows => rows.map(r => r.dataset.path)")
        assert sorted(listed) == sorted(served["names"])
        ranks = page.eval_on_selector_all("#rows tr td:first-child", "cells => cells.map(c => c.textContent)")
        assert ranks == [str(i + 1) for i in range(len(served["names"]))]  # sorted by vote score
        page.wait_for_function("() => [...document.querySelectorAll('#rows img')].slice(0, 3)"
                               ".every(i => i.complete && i.naturalWidth > 0)")
        page.screenshot(path=str(shots / "browse.png"))
        page.wait_for_timeout(200)
        assert failed == [], failed
    finally:
        context.close()
        pw.stop()


# -------------------------------------------------------------------------------------------------- live model


@pytest.fixture
def served_live(tmp_path: Path) -> Iterator[dict]:
    """The app with a live model (tiny colour-statistics features, the real recipe search), trained after 20 votes."""
    from tastelab.web.live import LiveConfig, LiveModel
    from test_web_live import _photos, fast_fit, tiny_extractor

    taste = _photos(tmp_path / "photos", n=16)
    new_taste = _photos(tmp_path / "new photos", n=6, seed=9)
    session = LabelSession(tmp_path / "photos", seed=0)
    live = LiveModel(session.index.images, session.image_dir, session.votes_path, tiny_extractor,
                     config=LiveConfig(min_votes=20), fit=fast_fit).start()
    session.attach_live(live)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_app(session, allowed_hosts=LOOPBACK_HOSTS, origins=loopback_origins(port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield {"url": f"http://127.0.0.1:{port}", "taste": taste, "new": tmp_path / "new photos",
               "new_taste": new_taste, "live": live, "session": session}
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        live.stop()
        session.close()


def test_live_model_on_the_page_in_chromium(served_live: dict, tmp_path: Path) -> None:
    """Click the brighter photo until the model trains; its held-out accuracy and learning curve appear; a folder of
    new photos is scored from the page and listed best first, with thumbnails."""
    shots = Path(os.environ.get("TASTELAB_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    taste = served_live["taste"]
    pw, context = _chromium_page_context(tmp_path)
    try:
        page = context.pages[0] if context.pages else context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(served_live["url"] + "/")
        page.wait_for_selector("body[data-state=ready]")
        page.click("#btn-model")
        assert "to go" in page.locator("#model-status").inner_text()
        for _ in range(20):
            shown = page.evaluate("() => ({id: document.body.dataset.pairId,"
                                  " a: document.getElementById('name-a').textContent,"
                                  " b: document.getElementById('name-b').textContent})")
            side = "#side-a" if taste[shown["a"]] > taste[shown["b"]] else "#side-b"
            page.click(side, position={"x": 20, "y": 20})  # the image itself, as a person clicks it
            page.wait_for_function(
                "id => document.body.dataset.state === 'ready' && document.body.dataset.pairId !== id", arg=shown["id"])
        assert page.locator("#votes").inner_text() == "20"
        page.wait_for_function("() => /^0\\.\\d\\d|^1\\.00/.test(document.getElementById('model-acc').textContent)",
                               timeout=120_000)
        acc = float(page.locator("#model-heldout").inner_text())
        assert acc == pytest.approx(served_live["live"].status()["heldout_accuracy"], abs=0.006)
        assert "never saw" in page.locator("#model-kind").inner_text()
        assert "trained on 20 votes" in page.locator("#model-status").inner_text()
        assert page.locator("#curve circle.heldout-point").count() == 1  # one retrain so far: one point
        page.fill("#score-path", "relative/path")
        page.click("#score-btn")
        page.wait_for_function("() => /absolute path/.test(document.getElementById('score-status').textContent)")
        page.fill("#score-path", str(served_live["new"]))
        page.click("#score-btn")
        page.wait_for_function("() => document.querySelectorAll('#scored-list li').length === 6", timeout=60_000)
        listed = page.eval_on_selector_all("#scored-list li", "items => items.map(li => li.dataset.path)")
        scores = [float(s) for s in page.eval_on_selector_all("#scored-list .score", "s => s.map(x => x.textContent)")]
        assert sorted(listed) == sorted(served_live["new_taste"]) and scores == sorted(scores, reverse=True)
        page.wait_for_function("() => [...document.querySelectorAll('#scored-list img')]"
                               ".every(i => i.complete && i.naturalWidth > 0)")
        assert "tastelab_scored" in page.locator("#score-status").inner_text()
        page.screenshot(path=str(shots / "label_live_model.png"))
    finally:
        context.close()
        pw.stop()
