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
  if (s.model) renderModel(s.model);
}

// ------------------------------------------------------------------------------------------ the live model
const SVG = "http://www.w3.org/2000/svg";
const fmt = (x) => (x === null || x === undefined ? "–" : x.toFixed(2));
let shownJob = null; // the score job whose ranking is on the panel (or being polled)

function svgEl(name, attrs, text) {
  const el = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

// Held-out accuracy (line) and next-votes accuracy (dots) against the votes each model was trained on.
function drawCurve(curve) {
  const svg = $("curve");
  svg.replaceChildren();
  const W = 340, H = 170, L = 34, R = 8, T = 8, B = 24;
  const pts = curve.filter((p) => p.heldout_accuracy !== null || p.next_votes_accuracy !== null);
  const maxV = Math.max(10, ...pts.map((p) => p.votes));
  const x = (v) => L + (W - L - R) * (v / maxV);
  const y = (a) => T + (H - T - B) * (1 - (Math.max(0.4, Math.min(1, a)) - 0.4) / 0.6);
  svg.append(svgEl("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }),
             svgEl("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }));
  for (const a of [0.5, 0.75, 1.0]) svg.append(svgEl("text", { x: 2, y: y(a) + 3 }, a.toFixed(2)));
  svg.append(svgEl("text", { x: L, y: H - 6 }, "0"), svgEl("text", { x: W - R - 40, y: H - 6 }, `${maxV} votes`));
  const line = pts.filter((p) => p.heldout_accuracy !== null).map((p) => `${x(p.votes)},${y(p.heldout_accuracy)}`);
  if (line.length) svg.append(svgEl("polyline", { class: "heldout", points: line.join(" ") }));
  for (const p of pts) {
    if (p.heldout_accuracy !== null) svg.append(svgEl("circle", { class: "heldout-point", cx: x(p.votes), cy: y(p.heldout_accuracy), r: 2.5, fill: "#7cc4ff" }));
    if (p.next_votes_accuracy !== null) svg.append(svgEl("circle", { class: "next", cx: x(p.votes), cy: y(p.next_votes_accuracy), r: 2.5 }));
  }
}

function renderModel(m) {
  if (!m || !m.enabled) {
    $("model-summary").hidden = true;
    $("btn-model").hidden = true;
    return;
  }
  let text;
  if (m.features === "failed") text = `features could not be computed: ${m.features_error}`;
  else if (m.features === "extracting") text = `reading the photos (${m.features_done}/${m.features_total})…`;
  else if (m.votes_needed > 0) text = `trains after ${m.min_votes} votes: ${m.votes_needed} to go`;
  else if (m.training) text = `training on ${m.training_on_votes} votes…`;
  else text = "";
  if (m.ready) {
    const when = m.trained_at ? new Date(m.trained_at).toLocaleTimeString() : "";
    text = `trained on ${m.votes_used} votes over ${m.images_used} photos at ${when} (${m.chosen})` + (text ? `; ${text}` : "");
  }
  if (m.error) text += ` — last training failed: ${m.error}`;
  $("model-status").textContent = text;
  $("model-acc").textContent = m.ready ? fmt(m.heldout_accuracy) : (m.training ? "training…" : "–");
  $("model-heldout").textContent = fmt(m.heldout_accuracy);
  $("model-kind").textContent = m.heldout_kind ? `(${m.heldout_kind})` : "";
  $("model-next").textContent = fmt(m.next_votes_accuracy);
  $("btn-save").disabled = !m.ready || !m.saveable;
  $("score-btn").disabled = !m.ready;
  if (m.saved_to) $("save-result").textContent = `saved to ${m.saved_to}`;
  if (m.score_folder && !$("score-path").value) $("score-path").value = m.score_folder;
  drawCurve(m.curve || []);
  if (m.last_job && m.last_job !== shownJob) pollJob(m.last_job);
}

async function refreshModel() {
  try { renderModel(await api("GET", "/api/model")); } catch (err) { /* the next poll tries again */ }
}

function renderJob(job) {
  if (job.state === "failed") { $("score-status").textContent = `scoring failed: ${job.error}`; return; }
  if (job.state !== "done") {
    $("score-status").textContent = `scoring ${job.folder}: ${job.done}/${job.total}…`;
    return;
  }
  $("score-status").textContent = `${job.items.length} photos of ${job.folder} ranked by the model trained on `
    + `${job.model_votes} votes; scores in ${job.out}`;
  const list = $("scored-list");
  list.replaceChildren();
  for (const it of job.items) {
    const li = document.createElement("li");
    li.dataset.path = it.path;
    const img = document.createElement("img");
    img.src = it.thumb; img.alt = it.path; img.loading = "lazy";
    const score = document.createElement("span");
    score.className = "score"; score.textContent = it.score.toFixed(2);
    const name = document.createElement("span");
    name.className = "path"; name.textContent = it.path;
    li.append(img, score, name);
    list.append(li);
  }
}

async function pollJob(id) {
  shownJob = id;
  while (shownJob === id) {
    let job;
    try { job = await api("GET", `/api/jobs/${encodeURIComponent(id)}`); } catch (err) {
      $("score-status").textContent = err.message; return;
    }
    renderJob(job);
    if (job.state === "done" || job.state === "failed") return;
    await new Promise((r) => setTimeout(r, 400));
  }
}

$("score-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  $("score-status").textContent = "";
  try {
    const job = await api("POST", "/api/score-folder", { path: $("score-path").value.trim() });
    $("scored-list").replaceChildren();
    pollJob(job.id);
  } catch (err) {
    $("score-status").textContent = err.message;
  }
});

$("btn-save").addEventListener("click", async () => {
  try {
    const r = await api("POST", "/api/model/save", {});
    $("save-result").textContent = `saved to ${r.saved_to} (tastelab score PHOTOS --model that folder)`;
  } catch (err) {
    $("save-result").textContent = err.message;
  }
});

function toggleModel() {
  $("model-panel").hidden = !$("model-panel").hidden;
  if (!$("model-panel").hidden) refreshModel();
}
$("btn-model").addEventListener("click", toggleModel);
setInterval(refreshModel, 2000); // training runs in the background: its results arrive between votes too

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
  m: () => toggleModel(),
};

document.addEventListener("keydown", (e) => {
  if (e.ctrlKey || e.altKey || e.metaKey) return; // leave browser shortcuts alone
  if (e.target instanceof HTMLInputElement) return; // typing a folder path is not voting
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
