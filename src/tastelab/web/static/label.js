// A/B labelling page: ← / → choose a side, ↓ tie vote, space skip (no vote), u undo, n show/hide file names.
// A key press counts only while both images of the current pair are on screen (body[data-state=ready]):
// a vote must be for images the user has seen, so presses during loading are ignored, not queued.
"use strict";

const $ = (id) => document.getElementById(id);
// own: pair ids of this page's votes, newest last; shownAt: when the current pair finished loading
const state = { pair: null, busy: true, own: [], shownAt: 0 };
// This server process's token (embedded in the page): every request that changes something sends it back.
const TOKEN = document.querySelector('meta[name="tastelab-token"]').content;

function setStatus(text) { $("status").textContent = text || ""; }

async function api(method, url, body) {
  const opts = { method, headers: {} };
  if (method !== "GET") opts.headers["X-Tastelab-Token"] = TOKEN;
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const res = await fetch(url, opts);
  const data = await res.json().catch(() => ({}));
  if (!res.ok) {
    const err = new Error(typeof data.detail === "string" ? data.detail : `${res.status} ${res.statusText}`);
    err.status = res.status;
    throw err;
  }
  return data;
}

function renderStats(s) {
  if (!s) return;
  $("votes").textContent = s.votes;
  $("seen").textContent = s.images_seen;
  $("images").textContent = s.images;
  $("mean-comparisons").textContent = s.mean_comparisons.toFixed(1);
  $("settled").textContent = s.settledness === null ? `– (after ${s.settle_window} votes)` : s.settledness.toFixed(2);
  if (s.question) $("question").textContent = s.question;
}

function loadImage(img, url) {
  return new Promise((resolve) => {
    if (img.src === new URL(url, location.href).href && img.complete && img.naturalWidth > 0) {
      resolve(true); // already on screen (undo brings back a pair that shares an image): no load event comes
      return;
    }
    img.onload = () => resolve(true);
    img.onerror = () => resolve(false);
    img.src = url;
  });
}

let flashTimer = 0;

function clearChosen() {
  clearTimeout(flashTimer);
  for (const el of document.querySelectorAll(".side.chosen")) el.classList.remove("chosen");
}

async function show(pair) {
  state.busy = true;
  clearChosen(); // the last choice's highlight must never sit on the next pair (it reads as a pre-selection)
  document.body.dataset.state = "loading";
  state.pair = pair;
  document.body.dataset.pairId = pair.pair_id; // lets scripts (and the browser test) see which pair is up
  $("name-a").textContent = pair.a;
  $("name-b").textContent = pair.b;
  $("img-a").title = pair.a;
  $("img-b").title = pair.b;
  const [okA, okB] = await Promise.all([loadImage($("img-a"), pair.url_a), loadImage($("img-b"), pair.url_b)]);
  if (state.pair !== pair) return; // a newer pair replaced this one meanwhile
  if (!okA || !okB) setStatus(`could not display ${!okA ? pair.a : pair.b}; press space to skip`);
  state.shownAt = performance.now();
  state.busy = false;
  document.body.dataset.state = "ready";
}

function flash(side) {
  const el = $(side === "a" ? "side-a" : "side-b");
  el.classList.add("chosen");
  flashTimer = setTimeout(clearChosen, 180);
}

async function act(fn) {
  if (state.busy || !state.pair) return;
  state.busy = true;
  try {
    await fn();
  } catch (err) {
    setStatus(err.message);
    state.busy = false; // keep the current pair on screen: nothing changed on the server
  }
}

function vote(choice) {
  return act(async () => {
    const p = state.pair;
    const seconds = Math.round(performance.now() - state.shownAt) / 1000; // answer time, for speed weighting
    if (choice !== "tie") flash(choice);
    let r;
    try {
      r = await api("POST", "/api/vote", { pair_id: p.pair_id, a: p.a, b: p.b, choice, seconds });
    } catch (err) {
      clearChosen();
      if (err.status !== 409) throw err;
      // the server does not know this pair (it restarted): nothing was recorded, show a new one
      const fresh = await api("GET", "/api/pair");
      setStatus(`${err.message}`);
      renderStats(fresh.stats);
      await show(fresh.pair);
      return;
    }
    if (r.recorded) state.own.push(p.pair_id);
    setStatus(r.warning || "");
    renderStats(r.stats);
    await show(r.next);
  });
}

function skip() {
  return act(async () => {
    const r = await api("GET", `/api/pair?skip=${encodeURIComponent(state.pair.pair_id)}`);
    setStatus("");
    renderStats(r.stats);
    await show(r.pair);
  });
}

function undo() {
  return act(async () => {
    const mine = state.own.length ? state.own[state.own.length - 1] : null;
    const r = await api("POST", "/api/undo", { pair_id: mine });
    if (mine !== null) state.own.pop();
    setStatus(r.warning || "undone: judge this pair again");
    renderStats(r.stats);
    await show(r.pair);
  });
}

const KEYS = {
  ArrowLeft: () => vote("a"),
  ArrowRight: () => vote("b"),
  ArrowDown: () => vote("tie"),
  " ": () => skip(),
  u: () => undo(),
  U: () => undo(),
  n: () => document.body.classList.toggle("show-names"),
};

document.addEventListener("keydown", (e) => {
  if (e.ctrlKey || e.altKey || e.metaKey) return; // leave browser shortcuts alone
  const handler = KEYS[e.key];
  if (!handler) return;
  e.preventDefault(); // no scrolling on arrows / space
  if (e.repeat) return; // a held key is one judgement, not twenty
  handler();
});

$("btn-a").addEventListener("click", () => vote("a"));
$("btn-b").addEventListener("click", () => vote("b"));
$("btn-tie").addEventListener("click", () => vote("tie"));
$("btn-skip").addEventListener("click", () => skip());
$("btn-undo").addEventListener("click", () => undo());
$("side-a").addEventListener("click", () => vote("a"));
$("side-b").addEventListener("click", () => vote("b"));
// Buttons keep focus after a click; blur them so space/arrows keep meaning skip/vote, not "press the button".
for (const b of document.querySelectorAll("button")) b.addEventListener("mouseup", () => b.blur());

(async () => {
  try {
    const r = await api("GET", "/api/pair");
    renderStats(r.stats);
    await show(r.pair);
  } catch (err) {
    setStatus(`cannot load a pair: ${err.message}`);
  }
})();
