"""``report.html``: one self-contained page a user can open, mail or attach to an issue.

Self-contained means it makes no request at all: thumbnails are small base64 JPEGs in ``data:`` URLs,
plots are inline SVG drawn by matplotlib (text kept as text), the style sheet is inline, and there is no
script. Every text that comes from the user's files (prompts, file and checkpoint names) is HTML-escaped:
a prompt is data, never markup.

Sections, in the order a user reads them: the ranking (with confidence intervals, ties and flags), the
curves (composite and family scores with their bands, each metric's mean with a 95% band), the prompt x
checkpoint grid of samples, flagged copies beside their nearest reference, and how the run was made
(which metrics ran with which encoders -- offline stand-ins labelled -- which were unavailable and why,
which families are missing, warnings).
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tastelab.core.version import __version__
from tastelab.judge.config import FAMILIES

if TYPE_CHECKING:
    from tastelab.judge.context import JudgeImage
    from tastelab.judge.run import JudgeResult

__all__ = ["render_report"]

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1400px;
     padding:0 16px;color:#1d1d1f;background:#fafafa}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:32px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.muted{color:#666}.warn{background:#fff4e5;border-left:4px solid #f0a020;padding:6px 10px;margin:4px 0}
table{border-collapse:collapse;background:#fff}th,td{border:1px solid #ddd;padding:4px 8px;text-align:right}
th{background:#f0f0f0;position:sticky;top:0}td.l,th.l{text-align:left}tr.best td{background:#eaf6ea}
tr.tied td{background:#f4fbf4}tr.pick td{background:#d4efd4;font-weight:bold}
.flag{display:inline-block;background:#fde2e2;color:#8a1c1c;border-radius:3px;
padding:0 4px;margin:1px;font-size:12px}.scroll{overflow-x:auto}
.grid td{vertical-align:top;text-align:center;padding:2px}.grid th.l{max-width:260px;font-weight:normal;
font-size:12px;white-space:normal}img.t{max-width:160px;max-height:160px;display:block;margin:auto}
.pair{display:inline-block;margin:6px 12px 6px 0;padding:6px;background:#fff;border:1px solid #ddd}
.pair figure{display:inline-block;margin:0 4px;text-align:center;font-size:12px}
.svg svg{max-width:100%;height:auto}.tag{font-size:11px;background:#e8eefc;border-radius:3px;padding:0 4px}
"""


def _e(text: Any) -> str:
    return html.escape("" if text is None else str(text), quote=True)


def _num(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "&ndash;"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return _e(x)


def _img(result: JudgeResult, im: JudgeImage, alt: str) -> str:
    data = result.thumbnails.get(im.sha)
    if data is None:
        return f'<span class="muted">{_e(alt)}</span>'
    b64 = base64.b64encode(data).decode("ascii")
    return f'<img class="t" src="data:image/jpeg;base64,{b64}" alt="{_e(alt)}" title="{_e(im.path.name)}">'


# ------------------------------------------------------------------------------------------------ ranking
def _ranking(result: JudgeResult) -> str:
    board = result.leaderboard
    metrics = list(board.metrics)
    head = ("<tr><th>rank</th><th class=l>checkpoint</th><th>pick</th><th>composite</th><th>95% interval</th>"
            "<th>tied</th>"
            "<th class=l>flags</th>" + "".join(f"<th>{_e(f)}</th>" for f in FAMILIES)
            + "".join(f"<th>{_e(m)}</th>" for m in metrics) + "</tr>")
    rows = []
    for r in board.rows:
        cls = "pick" if r.recommended else ("best" if r.rank == 1 else ("tied" if r.tied_with_best else ""))
        flags = "".join(f'<span class="flag">{_e(f)}</span>' for f in r.flags)
        rows.append(
            f'<tr class="{cls}" data-checkpoint="{_e(r.checkpoint)}"><td>{r.rank}</td><td class=l>{_e(r.checkpoint)}'
            f"</td><td>{'recommended' if r.recommended else ''}</td><td>{_num(r.composite)}</td>"
            f"<td>{_num(r.composite_low)} &ndash; {_num(r.composite_high)}</td>"
            f"<td>{'best' if r.rank == 1 else ('yes' if r.tied_with_best else '')}</td><td class=l>{flags}</td>"
            + "".join(f"<td>{_num(r.family_scores.get(f))}</td>" for f in FAMILIES)
            + "".join(f"<td>{_num(r.metric_means.get(m), 4)}</td>" for m in metrics) + "</tr>")
    note = ("<p class=muted>Composite: weighted mean of the family scores (each 0..1). Checkpoints whose 95% "
            "bootstrap interval overlaps the best one's are marked tied: the data cannot tell them apart. "
            "Family columns are normalised 0..1; metric columns are raw means.</p>")
    return (f'{_pick(result)}<div class="scroll"><table id="leaderboard">{head}{"".join(rows)}</table></div>'
            f"{note}")


def _pick(result: JudgeResult) -> str:
    """One paragraph: the recommended checkpoint and why the higher-ranked ones were passed over."""
    board = result.leaderboard
    rule = result.config.recommend
    above = board.passed_over()
    why = "; ".join(f"{_e(r.checkpoint)} (rank {r.rank}: {_e(', '.join(rule.disqualifies(r.flags)))})"
                    for r in above)
    rules = _e(", ".join(rule.disqualifying_flags) or "none")
    pick = board.recommended
    if pick is None:
        if not above:
            return ""
        return (f'<p id="recommended"><b>No checkpoint is recommended</b>: every checkpoint carries a disqualifying '
                f"flag ({rules}): {why}.</p>")
    text = (f'<p id="recommended"><b>Recommended: {_e(pick.checkpoint)}</b> (rank {pick.rank}), the best-ranked '
            f"checkpoint without a disqualifying flag ({rules}).")
    if above:
        text += f" Passed over: {why}."
    return text + "</p>"


# ------------------------------------------------------------------------------------------------ curves
def _x_axis(result: JudgeResult) -> tuple[list[float], list[str], str]:
    """x positions of the checkpoints (training order): epoch, else step, else order."""
    rows = result.checkpoints
    names = [r["checkpoint"] for r in rows]
    for key in ("epoch", "step"):
        values = [r.get(key) for r in rows]
        present = [v for v in values if v is not None]
        if values and len(present) == len(values) and len(set(present)) == len(present):
            return [float(v) for v in present], names, key
    return [float(i) for i in range(len(rows))], names, "checkpoint"


def _svg(fig: Any) -> str:
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "tastelab"}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and DOCTYPE (it names a DTD URL)


def _metric_bands(result: JudgeResult) -> dict[str, dict[str, tuple[float, float, float]]]:
    """metric -> checkpoint -> (mean, low, high): mean of the values and a normal 95% band of the mean."""
    import numpy as np

    values: dict[str, dict[str, list[float]]] = {}
    for row in result.scores:
        if row["value"] is not None:
            values.setdefault(row["metric"], {}).setdefault(row["checkpoint"], []).append(row["value"])
    out: dict[str, dict[str, tuple[float, float, float]]] = {}
    for metric, per in values.items():
        out[metric] = {}
        for ckpt, vs in per.items():
            a = np.asarray(vs, dtype=np.float64)
            half = 1.96 * a.std(ddof=1) / math.sqrt(a.size) if a.size > 1 else 0.0
            out[metric][ckpt] = (float(a.mean()), float(a.mean() - half), float(a.mean() + half))
    return out


def _curves(result: JudgeResult) -> str:
    from matplotlib.figure import Figure

    if not result.checkpoints:
        return "<p class=muted>No checkpoint was scored.</p>"
    xs, names, xlabel = _x_axis(result)
    rows = result.checkpoints

    def ticks(ax: Any) -> None:
        ax.set_xlabel(xlabel)
        if xlabel == "checkpoint":
            ax.set_xticks(xs, names, rotation=45, ha="right", fontsize=7)
        else:  # epochs and steps are whole numbers: no "epoch 1.25" ticks
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)

    fig = Figure(figsize=(11, 3.6))
    ax1, ax2 = fig.subplots(1, 2)
    comp = [r["composite"] for r in rows]
    low = [r["composite_low"] for r in rows]
    high = [r["composite_high"] for r in rows]
    nan = float("nan")
    ax1.fill_between(xs, [nan if v is None else v for v in low], [nan if v is None else v for v in high],
                     alpha=0.25, color="C0", label="95% interval")
    ax1.plot(xs, [nan if v is None else v for v in comp], "o-", color="C0", label="composite")
    ax1.set_title("composite")
    ax1.set_ylim(-0.03, 1.03)  # a score of exactly 0 or 1 stays visible, not hidden in the frame
    ax1.legend(fontsize=8)
    ticks(ax1)
    for i, f in enumerate(FAMILIES):
        ys = [nan if r.get(f) is None else r[f] for r in rows]
        if not all(math.isnan(y) for y in ys):
            ax2.plot(xs, ys, "o-", color=f"C{i + 1}", label=f)
    ax2.set_title("family scores (0..1)")
    ax2.set_ylim(-0.03, 1.03)
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend(fontsize=8)
    ticks(ax2)
    parts = [_svg(fig)]

    bands = _metric_bands(result)
    metrics = [m for m in result.leaderboard.metrics if m in bands]
    if metrics:
        cols = min(4, len(metrics))
        nrows = math.ceil(len(metrics) / cols)
        fig = Figure(figsize=(3.0 * cols, 2.6 * nrows))
        axes = fig.subplots(nrows, cols, squeeze=False).ravel()
        for ax, metric in zip(axes, metrics, strict=False):
            b = bands[metric]
            mean = [b.get(n, (nan, nan, nan))[0] for n in names]
            ax.fill_between(xs, [b.get(n, (nan, nan, nan))[1] for n in names],
                            [b.get(n, (nan, nan, nan))[2] for n in names], alpha=0.25, color="C0")
            ax.plot(xs, mean, "o-", color="C0", markersize=3)
            ax.set_title(metric, fontsize=9)
            ticks(ax)
        for ax in axes[len(metrics):]:
            ax.set_visible(False)
        fig.tight_layout()
        parts.append(_svg(fig))
    note = ("<p class=muted>Bands: the composite's 95% bootstrap interval (prompts and seeds resampled); for each "
            "metric, mean &plusmn; 1.96 standard errors over the checkpoint's images (or prompts, for set "
            "metrics).</p>")
    return f'<div class="svg">{"".join(parts)}</div>{note}'


# ------------------------------------------------------------------------------------------------ grid
def _grid(result: JudgeResult) -> str:
    checkpoints = [r["checkpoint"] for r in result.checkpoints]
    cells: dict[tuple[Any, str], JudgeImage] = {}
    prompts: dict[Any, str | None] = {}
    for im in result.images:
        s = im.sample
        assert s is not None
        cells.setdefault((s.prompt_idx, s.checkpoint), im)
        prompts.setdefault(s.prompt_idx, s.prompt)
    order = sorted(prompts, key=lambda p: (p is None, p if p is not None else 0))
    head = "<tr><th class=l>prompt</th>" + "".join(f"<th>{_e(c)}</th>" for c in checkpoints) + "</tr>"
    body = []
    for p in order:
        label = f"#{p}: {prompts[p]}" if prompts[p] else (f"#{p}" if p is not None else "(no prompt)")
        row = [f"<th class=l>{_e(label)}</th>"]
        for c in checkpoints:
            cell = cells.get((p, c))
            row.append(f"<td>{_img(result, cell, f'{c} prompt {p}') if cell is not None else ''}</td>")
        body.append("<tr>" + "".join(row) + "</tr>")
    refs = "".join(_img(result, r, r.path.name).replace('class="t"', 'class="t" style="display:inline-block"')
                   for r in result.references)
    ref_block = f"<h3>References ({len(result.references)})</h3><div>{refs}</div>" if result.references else ""
    return (f'<p class=muted>First seed of each prompt at each checkpoint.</p><div class="scroll"><table class="grid" '
            f'id="grid">{head}{"".join(body)}</table></div>{ref_block}')


# ------------------------------------------------------------------------------------------------ copies
def _copies(result: JudgeResult) -> str:
    if not result.copies:
        threshold = result.config.copying.similarity_threshold
        ran = any(m.name == result.config.copying.metric and m.status == "ran" for m in result.metrics)
        return (f"<p>No image reached the copy threshold ({_num(threshold)}).</p>" if ran else
                "<p class=muted>Copy detection did not run (see the metrics below).</p>")
    pairs = []
    for c in result.copies:
        s = c.image.sample
        assert s is not None
        near = (f"<figure>{_img(result, c.nearest, c.nearest.path.name)}<figcaption>nearest: "
                f"{_e(c.nearest.path.name)}</figcaption></figure>") if c.nearest is not None else ""
        pairs.append(f'<div class="pair"><figure>{_img(result, c.image, c.image.path.name)}<figcaption>'
                     f"{_e(s.checkpoint)} #{_e(s.prompt_idx)}<br>similarity {c.similarity:.3f}</figcaption></figure>"
                     f"{near}</div>")
    by = _e(result.copies[0].nearest_by)
    return f"<p class=muted>Nearest reference found by {by}.</p>" + "".join(pairs)


# ------------------------------------------------------------------------------------------------ run facts
def _run_facts(result: JudgeResult) -> str:
    rows = []
    for m in result.metrics:
        resolved = ", ".join(f"{_e(k)}: {_e(v)}" for k, v in m.resolved.items())
        norm = (f"{m.normalisation[0]:g} .. {m.normalisation[1]:g} ({_e(m.normalisation_source)})"
                if m.normalisation else "")
        status = _e(m.status) if m.status == "ran" else f"<b>{_e(m.status)}</b>: {_e(m.reason)}"
        rows.append(f"<tr><td class=l>{_e(m.name)}</td><td class=l>{_e(m.family)}</td><td class=l>{_e(m.per)}</td>"
                    f"<td class=l>{status}</td><td class=l>{resolved}</td><td class=l>{norm}</td>"
                    f"<td>{m.computed}</td><td>{m.cached}</td></tr>")
    metrics = ("<table id=metrics><tr><th class=l>metric</th><th class=l>family</th><th class=l>per</th>"
               "<th class=l>status</th><th class=l>resolved</th><th class=l>normalisation</th><th>computed</th>"
               "<th>from cache</th></tr>" + "".join(rows) + "</table>")
    if result.encoders:
        enc = "".join(f"<tr><td class=l>{_e(e.spec)}</td><td class=l>{_e(e.label)}"
                      f"{' <span class=tag>offline stand-in</span>' if e.stand_in else ''}</td></tr>"
                      for e in result.encoders)
        encoders = ("<h3>Encoders</h3><table id=encoders><tr><th class=l>spec</th><th class=l>what it is</th></tr>"
                    f"{enc}</table>")
    else:
        encoders = "<p class=muted>No embedding encoder was loaded.</p>"
    missing = result.missing_families
    miss = (f'<p class="warn">Missing families (the composite is re-weighted without them): '
            f"{_e(', '.join(missing))}</p>" if missing else "<p>Every weighted family was measured.</p>")
    return metrics + encoders + "<h3>Families</h3>" + miss


def _warnings(result: JudgeResult) -> str:
    if not result.warnings:
        return ""
    shown = result.warnings[:50]
    more = f"<p class=muted>and {len(result.warnings) - 50} more</p>" if len(result.warnings) > 50 else ""
    return "<h2>Warnings</h2>" + "".join(f'<div class="warn">{_e(w)}</div>' for w in shown) + more


def _summary(result: JudgeResult) -> str:
    best = result.leaderboard.rows[0] if result.leaderboard.rows else None
    tied = [r.checkpoint for r in result.leaderboard.rows if r.tied_with_best and best and r is not best]
    text = [f"{len(result.checkpoints)} checkpoints, {len(result.images)} sample images ({_e(result.layout)} layout),"
            f" {len(result.references)} references, {len(result.train_images)} training images."]
    if best is not None and not math.isnan(best.composite):
        text.append(f"Best: <b>{_e(best.checkpoint)}</b> (composite {best.composite:.3f}, 95% interval "
                    f"{_num(best.composite_low)} &ndash; {_num(best.composite_high)})"
                    + (f"; statistically tied with {_e(', '.join(tied))}" if tied else "") + ".")
    return "<p>" + " ".join(text) + "</p>"


def _section(title: str, body: str, anchor: str) -> str:
    return f'<section id="{anchor}"><h2>{_e(title)}</h2>{body}</section>'


def render_report(result: JudgeResult, title: str = "tastelab judge report") -> str:
    """The report as one HTML string (see the module docstring)."""
    sections: Sequence[str] = (
        _section("Ranking", _ranking(result), "ranking"),
        _section("Curves", _curves(result), "curves"),
        _section("Samples", _grid(result), "samples"),
        _section("Copies of references and training images", _copies(result), "copies"),
        _section("How this was measured", _run_facts(result), "run"),
    )
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            '<meta name="viewport" content="width=device-width,initial-scale=1"><link rel="icon" href="data:,">'
            f'<style>{_CSS}</style></head>'
            f'<body><h1>{_e(title)}</h1><p class=muted>tastelab {_e(__version__)}</p>{_summary(result)}'
            f'{"".join(sections)}{_warnings(result)}</body></html>\n')
