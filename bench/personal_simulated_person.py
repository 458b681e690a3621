"""A simulated person labels real photos through the real labelling page; the live model must learn their taste.

For each (rule, seed): a hidden taste is drawn at random (seeded) from image statistics computed with NumPy/PIL
(brightness, colourfulness, contrast, sharpness, warmth, saturation); the recipe is the app's live default, fixed
before any rule is drawn and never tuned on these numbers. ``--photos`` real photos from
``../shared/data/biq2021`` (a seeded sample, downscaled into a temporary folder) are split into photos to label
and UNSEEN photos (never shown). ``tastelab label``'s app runs on 127.0.0.1 (uvicorn, the same app, guard and live
model as the CLI) and headless Chromium opens the page; each vote picks the side whose hidden value is higher,
flipped with probability ``--noise``:

* ``--mode fetch`` (default, fast): a loop inside the page posts each vote with the page's own ``api()`` helper,
  i.e. through the guard with the page's token and Origin, reading the pair the server proposed;
* ``--mode click``: Playwright clicks the left or right image for every vote (slow; the full page path).

At every checkpoint (``--checkpoints``, default 50,100,200,400 votes) the live model retrains (its cadence is set
to double), the bench waits for it, then reports: the model's held-out vote accuracy (nested image-fold CV on the
labelled photos, as the page shows it), its accuracy on the next votes, and the Spearman correlation between
the hidden rule and the model's scores of the unseen photos, scored through ``POST /api/score-folder``.

    python bench/personal_simulated_person.py --rules 3 --seeds 0,1 --photos 300 [--family heldout]

``--family heldout`` draws rules on a held-out network's features instead (see HELDOUT_RULES): the fair test
once the statistics features are candidates.

Writes ``bench/results/personal_simulated_person.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "biq2021" / "images"
OUT = ROOT / "bench" / "results" / "personal_simulated_person.json"
CHROMIUM = os.environ.get("TASTELAB_CHROMIUM", "/usr/bin/chromium")
SIDE = 384  # photos are downscaled to this longest side (the model reads 320 px)


# -------------------------------------------------------------------------------------------------- hidden rules


def _rgb(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0


def brightness(img: Image.Image) -> float:
    return float(np.asarray(img.convert("L"), dtype=np.float64).mean())


def colourfulness(img: Image.Image) -> float:
    """Hasler & Suesstrunk (2003): spread and mean of the opponent channels."""
    a = _rgb(img)
    rg, yb = a[..., 0] - a[..., 1], 0.5 * (a[..., 0] + a[..., 1]) - a[..., 2]
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def contrast(img: Image.Image) -> float:
    return float(np.asarray(img.convert("L"), dtype=np.float64).std())


def sharpness(img: Image.Image) -> float:
    """Variance of the Laplacian of the grey image (PIL's 3x3 edge kernel)."""
    grey = img.convert("L")
    lap = grey.filter(ImageFilter.Kernel((3, 3), [0, 1, 0, 1, -4, 1, 0, 1, 0], scale=1, offset=128))
    return float(np.asarray(lap, dtype=np.float64).var())


def warmth(img: Image.Image) -> float:
    a = _rgb(img)
    return float(a[..., 0].mean() - a[..., 2].mean())


def saturation(img: Image.Image) -> float:
    return float(np.asarray(img.convert("HSV"), dtype=np.float64)[..., 1].mean())


RULES = {"brightness": brightness, "colourfulness": colourfulness, "contrast": contrast, "sharpness": sharpness,
         "warmth": warmth, "saturation": saturation}

# Rules OUTSIDE every candidate feature family (``--family heldout``). The statistics rules above are, up to
# details, features of the ``statistics`` backbone (tastelab.models.backbones.statistics): with its sets among
# the candidates (``--statistics``) they would be a test of reading a feature off, not of learning a taste. A
# held-out network is one no candidate uses: the shift-tolerant AlexNet whose weights ship in stlpips-pytorch
# (the judge's LPIPS network; ``judge`` extra); a rule is its mean-pooled conv5 features (256) projected on a
# seeded random unit direction: a smooth, learnable, but not directly observed taste.
_ALEX: dict[str, Any] = {}


def _alexnet_conv5(img: Image.Image) -> np.ndarray:
    import torch

    from tastelab.judge.metrics.diversity import _build_shift_tolerant

    if "net" not in _ALEX:
        _ALEX["net"] = _build_shift_tolerant("alex").eval()
    lp = _ALEX["net"]
    x = torch.from_numpy(_rgb(img.resize((224, 224), Image.Resampling.BICUBIC))).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        feats = lp.net(lp.scaling_layer(x * 2.0 - 1.0))  # LPIPS input range -1..1
    return feats[-1].mean(dim=(2, 3))[0].double().numpy()


def _alexnet_direction(k: int) -> Any:
    def rule(img: Image.Image) -> float:
        v = np.random.default_rng(1000 + k).standard_normal(256)
        return float(_alexnet_conv5(img) @ (v / np.linalg.norm(v)))

    rule.__doc__ = f"Held-out network rule {k}: ST-AlexNet conv5 (mean-pooled) on seeded direction {k}."
    return rule


HELDOUT_RULES = {f"alexnet_direction{k}": _alexnet_direction(k) for k in range(6)}
FAMILIES = {"statistics": RULES, "heldout": HELDOUT_RULES}


# -------------------------------------------------------------------------------------------------- photos


def sample_photos(n: int, seed: int, dest: Path) -> list[str]:
    """``n`` BIQ2021 photos (seeded), downscaled into ``dest`` (deterministic bytes: the feature cache hits)."""
    names = sorted(os.listdir(DATA))
    picked = sorted(np.random.default_rng(seed).choice(len(names), n, replace=False))
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for k, i in enumerate(picked):
        name = f"photo{k:04d}.jpg"
        if not (dest / name).exists():
            img = Image.open(DATA / names[i]).convert("RGB")
            img.thumbnail((SIDE, SIDE))
            img.save(dest / name, quality=90)
        out.append(name)
    return out


# -------------------------------------------------------------------------------------------------- the app


def start_app(session: Any) -> tuple[Any, Any, socket.socket, str]:
    import uvicorn

    from tastelab.web.app import LOOPBACK_HOSTS, create_app
    from tastelab.web.guard import loopback_origins

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_app(session, allowed_hosts=LOOPBACK_HOSTS, origins=loopback_origins(port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, sock, f"http://127.0.0.1:{port}"


FETCH_LOOP = """async ([values, flips]) => {
  // the page's own helper (token + same Origin): every vote passes the server's guard
  let r = await api("GET", "/api/pair");
  let pair = r.pair;
  for (const flip of flips) {
    let choice = values[pair.a] > values[pair.b] ? "a" : "b";
    if (flip) choice = choice === "a" ? "b" : "a";
    r = await api("POST", "/api/vote", {pair_id: pair.pair_id, a: pair.a, b: pair.b, choice});
    pair = r.next;
  }
  await show(pair);
  return r.stats.votes;
}"""


def cast_votes(page: Any, values: dict[str, float], flips: list[bool], mode: str) -> None:
    if mode == "fetch":
        page.evaluate(FETCH_LOOP, [values, flips])
        return
    for flip in flips:
        shown = page.evaluate("() => ({id: document.body.dataset.pairId, a: document.getElementById('name-a')"
                              ".textContent, b: document.getElementById('name-b').textContent})")
        left = (values[shown["a"]] > values[shown["b"]]) != flip
        page.click("#side-a" if left else "#side-b", position={"x": 10, "y": 10})
        page.wait_for_function("id => document.body.dataset.state === 'ready' && document.body.dataset.pairId !== id",
                               arg=shown["id"], timeout=60_000)


def wait_model(live: Any, votes: int, timeout: float = 900) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        st = live.status()
        if st["votes_used"] == votes and not st["training"]:
            return st
        if st["error"] and not st["training"] and st["fits"]:
            raise RuntimeError(st["error"])
        if time.monotonic() > deadline:
            raise TimeoutError(f"no model on {votes} votes: {st}")
        time.sleep(0.2)


def score_unseen(page: Any, folder: Path) -> dict[str, float]:
    """POST /api/score-folder from the page; poll the job; the ranked items as {name: score}."""
    job = page.evaluate("async (p) => await api('POST', '/api/score-folder', {path: p})", str(folder))
    while True:
        done = page.evaluate("async (id) => await api('GET', '/api/jobs/' + id)", job["id"])
        if done["state"] == "done":
            return {it["path"]: it["raw_score"] for it in done["items"]}
        if done["state"] == "failed":
            raise RuntimeError(done["error"])
        time.sleep(0.3)


# -------------------------------------------------------------------------------------------------- one run


def run_one(rule: str, seed: int, pool: Path, names: list[str], values_all: dict[str, float], args: argparse.Namespace,
            browser: Any, work: Path) -> dict[str, Any]:
    from tastelab.web.live import LiveConfig, LiveModel
    from tastelab.web.personal_fit import mobilenet_extractor
    from tastelab.web.session import LabelSession

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(names))
    n_unseen = int(round(len(names) * args.unseen))
    unseen = [names[i] for i in order[:n_unseen]]
    labelled = [names[i] for i in order[n_unseen:]]
    run_dir = work / f"{rule}-{seed}"
    for sub, group in (("label", labelled), ("unseen", unseen)):
        (run_dir / sub).mkdir(parents=True)
        for n in group:
            shutil.copy(pool / n, run_dir / sub / n)  # same bytes as the pool: the feature cache hits
    checkpoints = sorted(args.checkpoints)
    session = LabelSession(run_dir / "label", seed=seed)
    extractor, spec = mobilenet_extractor(cache_dir=args.cache, device="cpu")
    live = LiveModel(session.index.images, session.image_dir, session.votes_path, extractor, saveable=spec,
                     config=LiveConfig(min_votes=checkpoints[0], retrain_every=checkpoints[0], retrain_growth=1.0,
                                       seed=seed)).start()
    session.attach_live(live)
    server, thread, sock, url = start_app(session)
    page = browser.new_page()
    page.set_default_timeout(120_000)
    rows = []
    t0 = time.perf_counter()
    try:
        page.goto(url + "/")
        page.wait_for_selector("body[data-state=ready]")
        values = {n: values_all[n] for n in labelled}
        flip_rng = np.random.default_rng([seed, 7])
        done = 0
        for cp in checkpoints:
            flips = list(map(bool, flip_rng.random(cp - done) < args.noise))
            cast_votes(page, values, flips, args.mode)
            done = cp
            st = wait_model(live, cp)
            scores = score_unseen(page, run_dir / "unseen")
            truth = [values_all[n] for n in scores]
            rho = float(spearmanr(list(scores.values()), truth).statistic)
            model_votes = session.stats()
            rows.append({"votes": cp, "heldout_accuracy": st["heldout_accuracy"], "heldout_kind": st["heldout_kind"],
                         "next_votes_accuracy": st["next_votes_accuracy"], "unseen_spearman": rho,
                         "unseen_photos": len(scores), "chosen": st["chosen"], "train_seconds": st["train_seconds"],
                         "images_seen": model_votes["images_seen"]})
            print(f"  {rule:13s} seed {seed} votes {cp:4d}: held-out acc {st['heldout_accuracy']:.3f}  "
                  f"unseen Spearman {rho:+.3f}  ({st['train_seconds']:.1f}s fit)", flush=True)
        # the app's proposal mix, as cast
        votes = session.votes.rows
        assert len(votes) == checkpoints[-1]
    finally:
        page.close()
        server.should_exit = True
        thread.join(10)
        sock.close()
        live.stop()
        session.close()
    return {"rule": rule, "seed": seed, "labelled_photos": len(labelled), "unseen_photos": len(unseen),
            "noise": args.noise, "mode": args.mode, "seconds": round(time.perf_counter() - t0, 1), "points": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rules", type=int, default=3, help="hidden rules drawn at random (seeded by --rule-seed)")
    p.add_argument("--rule-seed", type=int, default=14)
    p.add_argument("--family", choices=sorted(FAMILIES), default="statistics",
                   help="statistics: rules from image statistics (NOT a fair test when the statistics features "
                   "are candidates); heldout: rules on a held-out network's features (stlpips' AlexNet)")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--photos", type=int, default=300)
    p.add_argument("--unseen", type=float, default=0.3, help="share of photos never shown (default: %(default)s)")
    p.add_argument("--checkpoints", type=lambda s: [int(x) for x in s.split(",")], default=[50, 100, 200, 400])
    p.add_argument("--noise", type=float, default=0.1, help="share of votes flipped (default: %(default)s)")
    p.add_argument("--mode", choices=("fetch", "click"), default="fetch")
    p.add_argument("--cache", default=None, help="feature cache (default: $TASTELAB_CACHE/features)")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    if args.cache is None:
        from tastelab.features.cache import default_cache_dir

        args.cache = str(default_cache_dir())
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    family = FAMILIES[args.family]
    rules = sorted(np.random.default_rng(args.rule_seed).choice(sorted(family), args.rules, replace=False))
    seeds = [int(s) for s in args.seeds.split(",")]
    from playwright.sync_api import sync_playwright

    t0 = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="simperson-") as tmp:
        work = Path(tmp)
        names = sample_photos(args.photos, 0, work / "pool")
        stats = {r: {} for r in rules}
        for n in names:
            with Image.open(work / "pool" / n) as img:
                for r in rules:
                    stats[r][n] = family[r](img)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                         args=["--no-sandbox", "--disable-gpu", "--headless"])
            try:
                for rule in rules:
                    for seed in seeds:
                        results.append(run_one(rule, seed, work / "pool", names, stats[rule], args, browser, work))
            finally:
                browser.close()
    cps = sorted(args.checkpoints)
    print("\nrule           seed " + "".join(f" | {c:>4d} votes: acc  rho" for c in cps))
    for r in results:
        cells = "".join(f" |        {p['heldout_accuracy']:.3f} {p['unseen_spearman']:+.2f}" for p in r["points"])
        print(f"{r['rule']:14s} {r['seed']:4d}{cells}")
    mean = {c: (float(np.mean([p["heldout_accuracy"] for r in results for p in r["points"] if p["votes"] == c])),
                float(np.mean([p["unseen_spearman"] for r in results for p in r["points"] if p["votes"] == c])))
            for c in cps}
    print(f"{'mean':14s}     " + "".join(f" |        {mean[c][0]:.3f} {mean[c][1]:+.2f}" for c in cps))
    shown_args = sys.argv[1:] if argv is None else argv
    report = {"command": "python bench/personal_simulated_person.py " + " ".join(shown_args),
              "photos": args.photos, "unseen_share": args.unseen, "noise": args.noise, "mode": args.mode,
              "rules": rules, "seeds": seeds, "checkpoints": cps, "seconds": round(time.perf_counter() - t0, 1),
              "mean": {str(c): {"heldout_accuracy": m[0], "unseen_spearman": m[1]} for c, m in mean.items()},
              "runs": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(report, indent=1))
    os.replace(tmp_out, out)
    print(f"wrote {out} ({report['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
