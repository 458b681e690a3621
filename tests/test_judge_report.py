"""``report.html``: one self-contained file (no request but itself), user text escaped, and what it shows --
checked as text and in headless Chromium (Debian's /usr/bin/chromium through Playwright, as the labelling
app is tested; skipped with the reason when either is missing). ``TASTELAB_SCREENSHOTS=DIR`` keeps the
screenshot in DIR instead of the test's temporary folder."""

from __future__ import annotations

import collections
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from judge_fakes import fake_config, make_kohya, make_references, registered_fakes
from tastelab.judge.report import render_report
from tastelab.judge.run import judge

CHROMIUM = os.environ.get("TASTELAB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
TIMEOUT_MS = 20_000


@pytest.fixture
def fake_metrics() -> Iterator[collections.Counter[str]]:
    yield from registered_fakes()


@pytest.fixture
def judged(tmp_path: Path, fake_metrics):
    prompts = make_kohya(tmp_path / "run", [1, 2, 3, 4], prompts=3)
    refs = make_references(tmp_path / "refs")
    sample = tmp_path / "run" / "sample"
    for p in (0, 1):  # the last epoch reproduces two references (2 of its 6 images: flagged)
        shutil.copy(refs[p], next(sample.glob(f"lora_e000004_{p:02d}_*_100.png")))
    out = tmp_path / "out"
    result = judge(tmp_path / "run", references=tmp_path / "refs", prompts=prompts,
                   config=fake_config(vlm=True), out=out, progress=False)
    return result, out / "report.html"


def test_report_is_self_contained_and_escapes_user_text(judged) -> None:
    result, path = judged
    html = path.read_text(encoding="utf-8")
    # nothing is fetched: every src/href is inline data (SVG namespace URIs are names, not requests)
    links = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert links and all(link.startswith("data:") or link.startswith("#") for link in links), links
    assert "<?xml" not in html and "<!DOCTYPE svg" not in html
    assert "<b>bold</b>" not in html and "&lt;b&gt;bold&lt;/b&gt;" in html  # a prompt is text, never markup
    assert html.count('class="t"') >= 4 * 3 + 3  # the 4 x 3 grid and the references
    assert "fake_vlm" in html and "huggingface-cli download" in html  # the unavailable metric and what to do
    assert "Missing families" in html and "alignment" in html
    assert "copies_references" in html and "nearest: ref_1.png" in html
    assert render_report(result) == html.rstrip("\n") + "\n"  # deterministic (SVG ids salted)


def test_report_in_chromium(judged, tmp_path: Path) -> None:
    result, path = judged
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the Python package) is not installed")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)")
    shots = Path(os.environ.get("TASTELAB_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    pw = sync_api.sync_playwright().start()
    try:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000})
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            requests: list[str] = []
            failed: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.on("requestfailed", lambda r: failed.append(r.url))
            page.goto(path.as_uri())
            page.wait_for_load_state("load")
            assert failed == []
            assert [u for u in requests if not u.startswith("data:")] == [path.as_uri()]  # only the file itself
            ranked = page.eval_on_selector_all("#leaderboard tr[data-checkpoint]", "rows => rows.map(r => "
                                               "r.dataset.checkpoint)")
            assert ranked == [r.checkpoint for r in result.leaderboard.rows] and len(ranked) == 4
            assert page.eval_on_selector_all("#grid img", "imgs => imgs.every(i => i.complete && i.naturalWidth > 0)")
            assert page.locator("#grid img").count() == 12
            assert page.locator("#curves svg").count() == 2
            assert page.locator("#copies img").count() == 4  # each copy beside its reference
            page.screenshot(path=str(shots / "judge_report.png"), full_page=True)
        finally:
            context.close()
    finally:
        pw.stop()
    assert (shots / "judge_report.png").stat().st_size > 10_000
