// Ranking page: every image by vote score, or beside a model's predictions (largest rank disagreement first).
"use strict";

const $ = (id) => document.getElementById(id);
const fmt = (v, nd = 3) => (v === null || v === undefined ? "–" : Number(v).toFixed(nd));

function cell(row, text, cls) {
  const td = document.createElement("td");
  if (cls) td.className = cls;
  td.textContent = text;
  row.appendChild(td);
  return td;
}

function render(data) {
  document.body.classList.toggle("no-predictions", !data.has_predictions);
  $("sort").value = data.sort;
  for (const opt of $("sort").options) opt.disabled = !data.has_predictions && opt.value !== "score";
  let summary = `${data.images} images, ${data.votes} votes`;
  if (data.has_predictions) {
    summary += ` · ${data.compared_with_prediction} with votes and a prediction`;
    summary += ` · Spearman(votes, model) ${fmt(data.spearman, 2)}`;
  }
  $("summary").textContent = summary;
  const big = Math.max(3, Math.round(data.compared_with_prediction / 4)); // a quarter of the list or more
  const frag = document.createDocumentFragment();
  for (const it of data.items) {
    const tr = document.createElement("tr");
    tr.dataset.path = it.path;
    cell(tr, String(it.rank), "num");
    const td = document.createElement("td");
    td.className = "thumb";
    const a = document.createElement("a");
    a.href = it.url;
    a.target = "_blank";
    a.rel = "noopener";
    const img = document.createElement("img");
    img.loading = "lazy"; // only the rows scrolled into view fetch their thumbnail
    img.decoding = "async";
    img.width = 160;
    img.height = 160;
    img.alt = it.path;
    img.src = it.thumb;
    a.appendChild(img);
    td.appendChild(a);
    tr.appendChild(td);
    cell(tr, it.path, "path");
    cell(tr, it.comparisons ? fmt(it.score) : "–", "num");
    cell(tr, String(it.comparisons), "num");
    cell(tr, fmt(it.prediction, 2), "num pred");
    cell(tr, it.pred_rank === null ? "–" : String(it.pred_rank), "num pred");
    const d = it.rank_diff;
    cell(tr, d === null ? "–" : (d > 0 ? `+${d}` : String(d)), "num pred" + (d !== null && Math.abs(d) >= big ? " big-diff" : ""));
    frag.appendChild(tr);
  }
  $("rows").replaceChildren(frag);
  document.body.dataset.state = "ready";
}

async function load(sort) {
  document.body.dataset.state = "loading";
  const url = sort ? `/api/browse?sort=${encodeURIComponent(sort)}` : "/api/browse";
  const res = await fetch(url);
  const data = await res.json();
  if (!res.ok) {
    $("summary").textContent = data.detail || res.statusText;
    return;
  }
  render(data);
}

$("sort").addEventListener("change", (e) => load(e.target.value));
load(new URLSearchParams(location.search).get("sort"));
