"""From per-request records to the report: aggregated rows, the issue's goals checked against
them, and three files: JSON (everything, requests included), a Markdown table per task, and an
SVG plot of reward against model tokens per request (log x), one panel per task, drawn by hand
(no plotting dependency).

A result is a plain dict:
    {"meta": {...}, "tasks": {name: Task.describe()}, "configs": {label: StrategyConfig.describe()},
     "rows": [row, ...], "goals": [goal, ...], "walls": [...], "requests": [record, ...]}
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from alignserve.evaluation.metrics import mean

# The row each task's rows are compared with (metric differences in `vs_baseline`).
BASELINES = {"continuation": "greedy"}


# ------------------------------------------------------------------------------ aggregation
def aggregate(records: Sequence[dict[str, Any]], walls: Sequence[dict[str, Any]] = (),
              configs: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per (task, strategy) in first-seen order: means over the successful requests."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["task"], r["strategy"]), []).append(r)
    wall = {(w["task"], w["strategy"]): w["wall_seconds"] for w in walls}
    rows = []
    for (task, label), recs in groups.items():
        ok = [r for r in recs if not r.get("error")]
        names = list(dict.fromkeys(k for r in ok for k in (r.get("metrics") or {})))
        errors = [r["error"] for r in recs if r.get("error")]
        rows.append({
            "task": task,
            "strategy": label,
            "strategy_name": recs[0].get("strategy_name"),
            "alignment": ((configs or {}).get(label) or {}).get("alignment"),
            "requests": len(recs),
            "errors": len(errors),
            "first_error": errors[0] if errors else None,
            "metrics": {k: mean(r["metrics"].get(k) for r in ok) for k in names},
            "reward": mean(r.get("reward") for r in ok),
            "model_tokens": mean(r.get("model_tokens") for r in ok),
            "seconds": mean(r.get("seconds") for r in ok),
            "client_seconds": mean(r.get("client_seconds") for r in ok),
            "candidates_scored": mean(r.get("candidates_scored") for r in ok),
            "completion_tokens": mean(r.get("completion_tokens") for r in ok),
            "wall_seconds": wall.get((task, label)),
        })
    by_key = {(r["task"], r["strategy"]): r for r in rows}
    for row in rows:
        base = by_key.get((row["task"], BASELINES.get(row["task"], "")))
        if base is not None and base is not row:
            row["vs_baseline"] = {
                "strategy": base["strategy"],
                **{k: (v - base["metrics"][k] if v is not None and base["metrics"].get(k)
                       is not None else None) for k, v in row["metrics"].items()}}
    return rows


# ------------------------------------------------------------------------------ goals
DEAL_COVERAGE = 0.95  # issue 17: deal at its defaults
SEARCH_REWARD_GAP, SEARCH_TOKEN_SHARE = 0.03, 0.4  # issue 17: sr / pf against best_of_16
CONTRASTIVE_REP4_SHARE = 0.5  # issue 17: contrastive's rep4 against greedy's


def _search_goals(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pruning searches with 16 candidates against best_of_16, per task: within
    SEARCH_REWARD_GAP of its reward at no more than SEARCH_TOKEN_SHARE of its model tokens."""
    out = []
    for r in rows:
        if r["strategy_name"] not in ("speculative_rejection", "particle_filter") \
                or (r.get("alignment") or {}).get("candidates") != 16 \
                or r["requests"] == r["errors"] or r["reward"] is None:
            continue
        base = _row(rows, r["task"], "best_of_16")
        if base is None or base["reward"] is None or not base["model_tokens"]:
            continue
        share = r["model_tokens"] / base["model_tokens"]
        gap = base["reward"] - r["reward"]
        out.append({"goal": f"{r['strategy']} on {r['task']} reaches best_of_16's reward within "
                            f"{SEARCH_REWARD_GAP} at <= {SEARCH_TOKEN_SHARE}x its model tokens",
                    "measured": f"reward {r['reward']:.3f} vs {base['reward']:.3f} (gap "
                                f"{gap:+.3f}); model tokens {r['model_tokens']:.0f} vs "
                                f"{base['model_tokens']:.0f} ({share:.2f}x)",
                    "met": gap <= SEARCH_REWARD_GAP and share <= SEARCH_TOKEN_SHARE})
    return out


def _row(rows: Sequence[dict[str, Any]], task: str, label: str) -> dict[str, Any] | None:
    for r in rows:
        if r["task"] == task and r["strategy"] == label and r["requests"] > r["errors"]:
            return r
    return None


def _best_of_n_curve(rows: Sequence[dict[str, Any]], task: str) -> list[tuple[float, float]]:
    """(model tokens, coverage) of sample (best of 1) and the best_of_n rows, by tokens."""
    pts = []
    for r in rows:
        if r["task"] != task or r["requests"] == r["errors"]:
            continue
        if r["strategy_name"] == "best_of_n" or r["strategy"] == "sample":
            cov, tok = r["metrics"].get("coverage"), r["model_tokens"]
            if cov is not None and tok:
                pts.append((float(tok), float(cov)))
    return sorted(pts)


def interpolate_log(points: Sequence[tuple[float, float]], x: float) -> tuple[float, bool]:
    """y at x on the piecewise-linear curve in log(x); outside the measured range, the nearest
    end's y, with False (not bracketed)."""
    if x <= points[0][0]:
        return points[0][1], x == points[0][0]
    if x >= points[-1][0]:
        return points[-1][1], x == points[-1][0]
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 <= x <= x1:
            t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0)) if x1 > x0 else 0.0
            return y0 + t * (y1 - y0), True
    raise AssertionError("unreachable")


def goals(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's goals, each with what was measured and `met` (None: not measured here)."""
    out: list[dict[str, Any]] = []
    deals = [r for r in rows if r["task"] == "keywords" and r["strategy_name"] == "deal"
             and r["requests"] > r["errors"]]
    curve = _best_of_n_curve(rows, "keywords")
    for d in deals:
        cov, tok = d["metrics"].get("coverage"), d["model_tokens"]
        out.append({"goal": f"{d['strategy']} reaches at least {DEAL_COVERAGE} keyword coverage",
                    "measured": f"coverage {cov:.3f}", "met": cov >= DEAL_COVERAGE})
        if curve and tok:
            ref, bracketed = interpolate_log(curve, tok)
            if bracketed:
                note = (f"best_of_n interpolated at {tok:.0f} model tokens: {ref:.3f}; "
                        f"{d['strategy']}: {cov:.3f}")
                met: bool | None = cov > ref
            elif tok > curve[-1][0]:
                note = (f"{d['strategy']} spends {tok:.0f} model tokens, more than the largest "
                        f"best_of_n measured ({curve[-1][0]:.0f}, coverage {curve[-1][1]:.3f}); "
                        f"{d['strategy']}: {cov:.3f}")
                met = False if cov <= curve[-1][1] else None
            else:
                note = (f"{d['strategy']} spends {tok:.0f} model tokens, fewer than any "
                        f"best_of_n measured ({curve[0][0]:.0f}, coverage {curve[0][1]:.3f}); "
                        f"{d['strategy']}: {cov:.3f}")
                met = True if cov > curve[0][1] else None
            out.append({"goal": f"{d['strategy']} beats best_of_n at equal model tokens on "
                                "keyword coverage", "measured": note, "met": met})
    out += _search_goals(rows)
    bo16 = _row(rows, "sentiment", "best_of_16")
    vases = [r for r in rows if r["task"] == "sentiment" and r["strategy_name"] == "vas"
             and r["requests"] > r["errors"] and r["reward"] is not None]
    if bo16 is None or bo16["reward"] is None:
        vases = []
    for vas in vases:
        share = vas["model_tokens"] / bo16["model_tokens"] if bo16["model_tokens"] else math.inf
        out.append({"goal": f"{vas['strategy']} reaches best_of_16's reward with under a "
                            "quarter of its model tokens",
                    "measured": f"reward {vas['reward']:.3f} vs {bo16['reward']:.3f}; model "
                                f"tokens {vas['model_tokens']:.0f} vs {bo16['model_tokens']:.0f} "
                                f"({share:.2f}x)",
                    "met": vas["reward"] >= bo16["reward"] and share < 0.25})
    greedy, cd = _row(rows, "continuation", "greedy"), _row(rows, "continuation", "contrastive")
    if greedy and cd and greedy["metrics"].get("rep4") is not None \
            and cd["metrics"].get("rep4") is not None:
        g, c = greedy["metrics"]["rep4"], cd["metrics"]["rep4"]
        out.append({"goal": "contrastive cuts greedy's 4-gram repetition rate to <= "
                            f"{CONTRASTIVE_REP4_SHARE}x",
                    "measured": f"rep4 {c:.3f} vs greedy {g:.3f} ({c / g:.2f}x)" if g else
                                f"rep4 {c:.3f} vs greedy {g:.3f}",
                    "met": c <= CONTRASTIVE_REP4_SHARE * g})
    return out


# ------------------------------------------------------------------------------ Markdown
def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}f}"


def _alignment_text(alignment: dict[str, Any] | None) -> str:
    if not alignment:
        return ""
    keys = {k: v for k, v in alignment.items() if k != "strategy"}
    inner = ", ".join(f"{k}={v}" for k, v in keys.items())
    return f"`{alignment.get('strategy')}`" + (f" ({inner})" if inner else "")


def markdown(result: dict[str, Any]) -> str:
    meta = result.get("meta", {})
    lines = ["# alignserve evaluation", ""]
    for key in ("model", "device", "commit", "date", "base_url", "max_tokens", "temperature",
                "limit", "concurrency"):
        if meta.get(key) is not None:
            lines.append(f"- {key}: {meta[key]}")
    lines += ["", ("Means per request over the items; model tokens and seconds are the server's "
                   "`alignment` report (seconds measured with the pair's requests in flight "
                   "together)."), ""]
    tasks = result.get("tasks", {})
    rows = result.get("rows", [])
    for task in dict.fromkeys(r["task"] for r in rows):
        info = tasks.get(task, {})
        metric_info = info.get("metrics") or [{"name": k, "higher_is_better": True} for k in
                                              rows[0]["metrics"]]
        task_rows = [r for r in rows if r["task"] == task]
        has_base = any("vs_baseline" in r for r in task_rows)
        primary = metric_info[0]["name"] if metric_info else None
        arrow = {m["name"]: ("↑" if m["higher_is_better"] else "↓") for m in metric_info}
        lines.append(f"## {task}")
        if info.get("description"):
            lines.append("")
            lines.append(f"{info['description']} ({task_rows[0]['requests']} requests)")
        lines.append("")
        head = ["strategy", "alignment"] + [f"{m['name']} {arrow[m['name']]}" for m in metric_info]
        if has_base:
            base = next(r["vs_baseline"]["strategy"] for r in task_rows if "vs_baseline" in r)
            head.append(f"{primary} vs {base}")
        head += ["reward", "model tokens/req", "seconds/req", "candidates/req",
                 "tokens out/req", "ok/requests"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|")
        for r in task_rows:
            cells = [r["strategy"], _alignment_text(r.get("alignment")
                                                    or {"strategy": r.get("strategy_name")})]
            cells += [_fmt(r["metrics"].get(m["name"])) for m in metric_info]
            if has_base:
                delta = (r.get("vs_baseline") or {}).get(primary)
                cells.append("-" if delta is None else f"{delta:+.3f}")
            cells += [_fmt(r["reward"]),
                      "-" if r["model_tokens"] is None else f"{r['model_tokens']:.0f}",
                      _fmt(r["seconds"], 2), _fmt(r["candidates_scored"], 1),
                      _fmt(r["completion_tokens"], 1),
                      f"{r['requests'] - r['errors']}/{r['requests']}"]
            lines.append("| " + " | ".join(cells) + " |")
        errs = [r for r in task_rows if r["errors"]]
        for r in errs:
            lines.append("")
            lines.append(f"- {r['strategy']}: {r['errors']} failed, e.g. {r['first_error']}")
        lines.append("")
    if result.get("goals"):
        lines += ["## Goals (issues 3 and 17)", "", "| goal | measured | met |", "|---|---|---|"]
        for g in result["goals"]:
            met = {True: "yes", False: "no", None: "n/a"}[g["met"]]
            lines.append(f"| {g['goal']} | {g['measured']} | {met} |")
        lines.append("")
    if result.get("plot"):
        lines += [f"![reward against model tokens]({result['plot']})", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ SVG
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf"]


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 10))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def _log_ticks(lo: float, hi: float) -> list[float]:
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    if a == b:
        b += 1
    mults = (1, 2, 5) if b - a <= 3 else (1,)
    return [m * 10 ** e for e in range(a, b + 1) for m in mults if lo / 1.5 <= m * 10 ** e
            <= hi * 1.5] or [10 ** a, 10 ** b]


def _tick_label(v: float) -> str:
    if v >= 1000:
        return f"{v / 1000:g}k"
    return f"{v:g}"


def svg(result: dict[str, Any], width: int = 380, height: int = 300) -> str:
    """Reward (or the task's primary metric where it has no reward) against model tokens per
    request, log x, one panel per task, each point labelled with its strategy."""
    rows = [r for r in result.get("rows", []) if r.get("model_tokens")]
    tasks_info = result.get("tasks", {})
    labels = list(dict.fromkeys(r["strategy"] for r in result.get("rows", [])))
    color = {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}
    task_names = list(dict.fromkeys(r["task"] for r in rows))
    ml, mr, mt, mb = 58, 20, 34, 44  # margins
    total_w = max(1, len(task_names)) * width
    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{total_w}" height="{height}" '
            f'viewBox="0 0 {total_w} {height}" font-family="sans-serif" font-size="11">'),
           f'<rect width="{total_w}" height="{height}" fill="white"/>']
    if not task_names:
        out.append('<text x="10" y="20">no measured rows</text>')
    for p, task in enumerate(task_names):
        x0 = p * width
        pts = []
        info = tasks_info.get(task, {})
        use_reward = any(r["reward"] is not None for r in rows if r["task"] == task)
        metric = (info.get("metrics") or [{"name": None}])[0]["name"]
        ylabel = "mean reward" if use_reward else f"mean {metric}"
        for r in rows:
            if r["task"] != task:
                continue
            y = r["reward"] if use_reward else r["metrics"].get(metric)
            if y is not None:
                pts.append((float(r["model_tokens"]), float(y), r["strategy"]))
        pw, ph = width - ml - mr, height - mt - mb
        out.append(f'<g transform="translate({x0},0)">')
        out.append(f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="13" '
                   f'font-weight="bold">{escape(task)}</text>')
        if not pts:
            out.append('</g>')
            continue
        xs, ys = [q[0] for q in pts], [q[1] for q in pts]
        xt = _log_ticks(min(xs), max(xs))
        lx0, lx1 = math.log10(min(xt[0], min(xs))), math.log10(max(xt[-1], max(xs)))
        pad = (max(ys) - min(ys)) * 0.1 or 0.05
        yt = _nice_ticks(min(ys) - pad, max(ys) + pad)
        y0, y1 = yt[0], yt[-1]

        def sx(v: float, lx0: float = lx0, lx1: float = lx1, pw: float = pw) -> float:
            return ml + (math.log10(v) - lx0) / ((lx1 - lx0) or 1.0) * pw

        def sy(v: float, y0: float = y0, y1: float = y1, ph: float = ph) -> float:
            return mt + ph - (v - y0) / ((y1 - y0) or 1.0) * ph

        out.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" '
                   f'stroke="#444"/>')
        for t in xt:
            if lx0 <= math.log10(t) <= lx1:
                X = sx(t)
                out.append(f'<line x1="{X:.1f}" y1="{mt}" x2="{X:.1f}" y2="{mt + ph}" '
                           f'stroke="#ddd"/>')
                out.append(f'<text x="{X:.1f}" y="{mt + ph + 14}" text-anchor="middle">'
                           f'{_tick_label(t)}</text>')
        for t in yt:
            Y = sy(t)
            out.append(f'<line x1="{ml}" y1="{Y:.1f}" x2="{ml + pw}" y2="{Y:.1f}" stroke="#ddd"/>')
            out.append(f'<text x="{ml - 5}" y="{Y + 4:.1f}" text-anchor="end">{t:g}</text>')
        out.append(f'<text x="{ml + pw / 2}" y="{height - 8}" text-anchor="middle">'
                   'model tokens per request (log)</text>')
        out.append(f'<text transform="translate(14,{mt + ph / 2}) rotate(-90)" '
                   f'text-anchor="middle">{escape(ylabel)}</text>')
        for i, (x, y, label) in enumerate(sorted(pts)):
            X, Y = sx(x), sy(y)
            dy = -7 if i % 2 == 0 else 14
            anchor = "end" if X > ml + pw * 0.75 else "start"
            dx = -6 if anchor == "end" else 6
            out.append(f'<circle cx="{X:.1f}" cy="{Y:.1f}" r="4" fill="{color[label]}">'
                       f'<title>{escape(label)}: {y:.3f} at {x:.0f} tokens</title></circle>')
            out.append(f'<text x="{X + dx:.1f}" y="{Y + dy:.1f}" text-anchor="{anchor}" '
                       f'fill="{color[label]}">{escape(label)}</text>')
        out.append('</g>')
    out.append('</svg>')
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------ files
def write(result: dict[str, Any], out_dir: str | Path, stem: str = "eval") -> dict[str, Path]:
    """Write STEM.json, STEM.md and STEM.svg into out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "svg": out / f"{stem}.svg"}
    result = dict(result, plot=paths["svg"].name)
    paths["svg"].write_text(svg(result))
    paths["md"].write_text(markdown(result))
    paths["json"].write_text(json.dumps(result, indent=2, default=str) + "\n")
    return paths
