"""``study_report.html``: one self-contained page about an external-trainer study.

Trials table (phase, state, values, best checkpoint and its CI), the best configuration with a link to its
judge ``report.html``, the seed spread, the Pareto front (several objectives), a value-vs-trial plot and a
parameter-importance plot (Optuna's PED-ANOVA importance evaluator, over the baseline and search trials: the refine
phase's narrowed distributions are not comparable). Plots are matplotlib SVG inline; no script, no URL.
"""

from __future__ import annotations

import html
import io
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from tastelab.core.atomic import write_text_atomic
from tastelab.tuning.report import trials_table

__all__ = ["param_importances", "print_external_summary", "render_study_report", "write_study_report"]

logger = logging.getLogger(__name__)

_STYLE = ("body{font:14px system-ui,sans-serif;margin:24px;max-width:1200px;color:#222}"
          "table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 7px;text-align:left}"
          "th{background:#f4f4f4}.svg svg{max-width:100%;height:auto}.muted{color:#777}"
          ".COMPLETE{color:#186a2b}.PRUNED{color:#8a6d00}.FAIL{color:#a11}")
_PHASE_COLOURS = {"baseline": "#444444", "search": "#1f77b4", "refine": "#2ca02c", "seeds": "#d62728"}


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def _num(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, (dict, list)):
        return _e(json.dumps(x))
    return _e(x)


def _svg(fig: Any) -> str:
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "tastelab"}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg"):]


def param_importances(study: optuna.Study) -> dict[str, float]:
    """Importance of each parameter for the first objective over the COMPLETE baseline/search trials
    (empty when fewer than two such trials or nothing varied)."""
    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if t.user_attrs.get("phase") in ("baseline", "search")]
    if len(trials) < 2:
        return {}
    view = optuna.create_study(directions=study.directions)
    view.add_trials(trials)
    # PED-ANOVA (Optuna's default, no scikit-learn needed) ranks what it takes to get *low* target values
    sign = -1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1.0
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            evaluator = optuna.importance.PedAnovaImportanceEvaluator()
            found = dict(optuna.importance.get_param_importances(view, evaluator=evaluator,
                                                                 target=lambda t: sign * t.values[0]))
        # Too few trials: PED-ANOVA says its quantiles select the same trials and every importance is equal,
        # which would be drawn as a finding. Its reminder about low targets is handled by the sign above.
        if any("select the same set of trials" in str(w.message) for w in caught):
            return {}
        return found
    except (ValueError, RuntimeError, ImportError) as exc:  # one distinct configuration, no shared parameter
        logger.info("parameter importance not available: %s", exc)
        return {}


def _value_plot(summary: dict[str, Any]) -> str:
    from matplotlib.figure import Figure

    name = summary["objectives"][0]["name"]
    maximize = summary["objectives"][0]["direction"] == "maximize"
    rows = [r for r in summary["trials"] if r["state"] == "COMPLETE" and r["values"]]
    if not rows:
        return '<p class="muted">no completed trial yet</p>'
    fig = Figure(figsize=(7, 3.2))
    ax = fig.add_subplot()
    for phase, colour in _PHASE_COLOURS.items():
        pts = [(r["trial"], r["values"][name]) for r in rows if r.get("phase") == phase]
        if pts:
            ax.scatter([x for x, _ in pts], [y for _, y in pts], s=22, color=colour, label=phase)
    best, xs, ys = None, [], []
    for r in sorted(rows, key=lambda r: r["trial"]):
        v = r["values"][name]
        best = v if best is None or (v > best if maximize else v < best) else best
        xs.append(r["trial"])
        ys.append(best)
    ax.step(xs, ys, where="post", color="#999999", lw=1, label="best so far")
    pruned = [r for r in summary["trials"] if r["state"] == "PRUNED" and r.get("intermediate")]
    if pruned:
        ax.scatter([r["trial"] for r in pruned], [list(r["intermediate"].values())[-1] for r in pruned], s=18,
                   marker="x", color="#8a6d00", label="pruned (last value)")
    ax.set_xlabel("trial")
    ax.set_ylabel(name)
    ax.legend(fontsize=8)
    return f'<div class="svg">{_svg(fig)}</div>'


def _importance_plot(importances: dict[str, float]) -> str:
    from matplotlib.figure import Figure

    if not importances:
        return ('<p class="muted">not enough completed baseline/search trials with varied parameters for an '
                'importance estimate</p>')
    items = sorted(importances.items(), key=lambda kv: kv[1])
    fig = Figure(figsize=(7, 0.4 * len(items) + 1))
    ax = fig.add_subplot()
    ax.barh([k for k, _ in items], [v for _, v in items], color="#1f77b4")
    ax.set_xlabel("importance (Optuna PED-ANOVA, first objective)")
    return f'<div class="svg">{_svg(fig)}</div>'


def _link(target: str | None, base: Path, text: str) -> str:
    if not target:
        return "-"
    rel = os.path.relpath(target, base)
    return f'<a href="{_e(Path(rel).as_posix())}">{_e(text)}</a>'


def _table(summary: dict[str, Any], rows: list[dict[str, Any]], base: Path) -> str:
    names = [o["name"] for o in summary["objectives"]]
    keys = sorted({k for r in rows for k in r.get("params", {})})
    head = ["trial", "phase", "state", *names, "best checkpoint", "epoch", "CI", *keys, "judge"]
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        vals = r.get("values") or {}
        ci = (f"{_num(r.get('composite_low'))} .. {_num(r.get('composite_high'))}"
              if r.get("composite_low") is not None else "-")
        cells = [_e(r["trial"]), _e(r.get("phase")), f'<span class="{_e(r["state"])}">{_e(r["state"])}</span>',
                 *(_num(vals.get(n)) for n in names), _e(r.get("best_checkpoint") or "-"),
                 _num(r.get("best_epoch") if r.get("best_epoch") is not None else r.get("pruned_at")), ci,
                 *(_num(r.get("params", {}).get(k)) for k in keys),
                 _link(r.get("judge_report"), base, "report")]
        title = f' title="{_e(r["error"])}"' if r.get("error") else ""
        out.append(f"<tr{title}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</table>")
    return "".join(out)


def render_study_report(study: optuna.Study, summary: dict[str, Any], base: Path) -> str:
    """The page's HTML; links are relative to ``base`` (the folder the page is written to)."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>tastelab tune --external: "
             f"{_e(summary['study'])}</title><style>{_STYLE}</style></head><body>",
             f"<h1>Study {_e(summary['study'])}</h1>",
             f"<p class='muted'>{_e(summary.get('storage'))} &middot; phases {_e(', '.join(summary.get('phases', [])))}"
             f" &middot; {_e(summary.get('value_definition'))}</p>",
             f"<p><code>{_e(summary.get('command'))}</code></p>"]
    counts = ", ".join(f"{k} {v}" for k, v in summary["counts"].items() if v)
    parts.append(f"<p>trials: {_e(counts) or 'none'}</p>")
    best = summary.get("best")
    parts.append("<h2>Best configuration</h2>")
    if best:
        vals = ", ".join(f"{k} = {_num(v)}" for k, v in (best.get("values") or {}).items())
        parts.append(f"<p>trial {_e(best['trial'])} ({_e(best.get('phase'))}): {_e(vals)}; best checkpoint "
                     f"<b>{_e(best.get('best_checkpoint'))}</b> (epoch {_num(best.get('best_epoch'))}, composite CI "
                     f"{_num(best.get('composite_low'))} .. {_num(best.get('composite_high'))}) &middot; "
                     f"{_link(best.get('judge_report'), base, 'its judge report')}</p>")
        parts.append("<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{_num(v)}</td></tr>"
                                         for k, v in best.get("params", {}).items()) + "</table>")
        if best.get("best_checkpoint_path"):
            parts.append(f"<p>checkpoint file: <code>{_e(best['best_checkpoint_path'])}</code></p>")
    else:
        parts.append("<p class='muted'>no completed trial yet</p>")
    spread = summary.get("seed_spread")
    if spread:
        runs = ", ".join(f"seed {r['seed']}: {_num(r['value'])}" for r in spread["runs"])
        parts.append(f"<h2>Seed spread</h2><p>trial {_e(spread['trial'])}'s configuration over {spread['n']} runs: "
                     f"mean {_num(spread['mean'])}, std {_num(spread['std'])} ({_e(runs)})</p>")
    if summary.get("pareto_front"):
        parts.append(f"<h2>Pareto front ({len(summary['pareto_front'])} trials)</h2>")
        parts.append(_table(summary, summary["pareto_front"], base))
    parts.append("<h2>Value by trial</h2>" + _value_plot(summary))
    parts.append("<h2>Parameter importance</h2>" + _importance_plot(param_importances(study)))
    parts.append("<h2>Trials</h2>" + _table(summary, summary["trials"], base))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_study_report(study: optuna.Study, summary: dict[str, Any], path: Path) -> Path:
    """Write ``study_report.html`` atomically; returns its path."""
    write_text_atomic(path, render_study_report(study, summary, path.parent))
    return path


def print_external_summary(console: Any, summary: dict[str, Any], limit: int = 15) -> None:
    """The terminal view: trials table, Pareto front, best trial with its checkpoint, the seed spread."""
    console.print(trials_table(summary, limit))
    counts = {k: v for k, v in summary["counts"].items() if v}
    console.print("states: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if summary.get("pareto_front"):
        front = {**summary, "trials": summary["pareto_front"]}
        console.print(trials_table(front, limit=len(summary["pareto_front"]),
                                   title=f"Pareto front ({len(summary['pareto_front'])} trials)"))
    best = summary.get("best")
    if not best:
        console.print("[yellow]no completed trial[/yellow]")
        return
    vals = ", ".join(f"{k} = {_fmt(v)}" for k, v in (best.get("values") or {}).items())
    console.print(f"[bold]best trial {best['trial']}[/bold] ({best.get('phase')}): {vals}; checkpoint "
                  f"{best.get('best_checkpoint')} (epoch {best.get('best_epoch')}, CI {_fmt(best.get('composite_low'))}"
                  f"..{_fmt(best.get('composite_high'))})")
    console.print("params: " + json.dumps(best.get("params"), default=str))
    if best.get("best_checkpoint_path"):
        console.print(f"checkpoint: {best['best_checkpoint_path']}")
    if best.get("judge_report"):
        console.print(f"judge report: {best['judge_report']}")
    spread = summary.get("seed_spread")
    if spread:
        console.print(f"seed spread of trial {spread['trial']}'s configuration: mean {_fmt(spread['mean'])}, "
                      f"std {_fmt(spread['std'])} over {spread['n']} runs")


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)
