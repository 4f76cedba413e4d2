"""The dashboard's two charts as server-rendered SVG (pure: `GET /activity`'s JSON in, markup out).

`throughput(hours)`: one stacked bar per clock hour, completed below failed, the tallest hour at
full height; `per_model(models)`: a row per model with its calls split into accepted, rejected and
other, its tokens and its cost, each bar scaled to the largest of its column. No script draws them
(they read with JavaScript off); the colours are classes of `static/dashboard.css` (the content
security policy allows no inline style). Every bar carries its figures as `data-*` attributes and
a `<title>` (the tooltip), and each chart has a text alternative.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from html import escape
from typing import Any

WIDTH = 720
BAR_AREA = 120          # the throughput bars' height in px
LABEL_EVERY = 3         # an hour label under every third bar
ROW = 26                # one model's row in the per-model chart
NAME_W = 230            # the model names' column
COLUMN_W = 130          # each bar column (calls, tokens, cost)
GAP = 70                # after each bar column: its value


def svg(width: int, height: int, label: str, body: str, ident: str) -> str:
    return (f'<svg id="{ident}" class="chart" role="img" viewBox="0 0 {width} {height}" width="{width}" '
            f'height="{height}" aria-label="{escape(label)}" xmlns="http://www.w3.org/2000/svg">'
            f"<title>{escape(label)}</title>{body}</svg>")


def hour_label(start: str) -> str:
    try:
        return datetime.fromisoformat(start).strftime("%H:00")
    except ValueError:
        return "?"


def throughput(hours: Sequence[Mapping[str, Any]]) -> str:
    """Tasks completed and failed per hour (UTC), oldest on the left."""
    if not hours:
        return '<p class="meta" id="throughput-chart">no hours to show</p>'
    tallest = max((int(h["completed"]) + int(h["failed"]) for h in hours), default=0)
    slot = WIDTH / len(hours)
    bar_w = max(2.0, slot - 4)
    top, bottom = 16, 16 + BAR_AREA
    parts = [f'<line class="axis" x1="0" y1="{bottom}" x2="{WIDTH}" y2="{bottom}"/>',
             f'<text class="scale" x="0" y="11">{tallest} per hour at most</text>']
    for n, hour in enumerate(hours):
        done, failed = int(hour["completed"]), int(hour["failed"])
        x = n * slot + 2
        done_h = BAR_AREA * done / tallest if tallest else 0.0
        failed_h = BAR_AREA * failed / tallest if tallest else 0.0
        label = hour_label(str(hour["start"]))
        tip = f"{label} UTC: {done} completed, {failed} failed"
        parts.append(f'<g class="hour" data-start="{escape(str(hour["start"]))}" data-completed="{done}" '
                     f'data-failed="{failed}"><title>{escape(tip)}</title>'
                     f'<rect class="bar slot" x="{x:.1f}" y="{top}" width="{bar_w:.1f}" height="{BAR_AREA}"/>'
                     f'<rect class="bar completed" x="{x:.1f}" y="{bottom - done_h:.1f}" width="{bar_w:.1f}" '
                     f'height="{done_h:.1f}"/>'
                     f'<rect class="bar failed" x="{x:.1f}" y="{bottom - done_h - failed_h:.1f}" '
                     f'width="{bar_w:.1f}" height="{failed_h:.1f}"/></g>')
        if n % LABEL_EVERY == 0 or n == len(hours) - 1:
            parts.append(f'<text class="tick" x="{x + bar_w / 2:.1f}" y="{bottom + 13}">{label}</text>')
    total_done = sum(int(h["completed"]) for h in hours)
    total_failed = sum(int(h["failed"]) for h in hours)
    summary = (f"Tasks per hour over the last {len(hours)} hours (UTC): {total_done} completed, "
               f"{total_failed} failed")
    return svg(WIDTH, bottom + 18, summary, "".join(parts), "throughput-chart")


def compact(n: float) -> str:
    """12345 -> 12.3k, 2500000 -> 2.5M."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= limit:
            return f"{n / limit:.1f}{suffix}"
    return f"{n:g}"


def per_model(models: Sequence[Mapping[str, Any]]) -> str:
    """Each model's calls (accepted, rejected, other), tokens (prompt + completion) and cost."""
    if not models:
        return '<p class="meta" id="models-chart">no model calls in these hours</p>'
    most_calls = max(int(m["calls"]) for m in models) or 1
    most_tokens = max(int(m["prompt_tokens"]) + int(m["completion_tokens"]) for m in models) or 1
    most_cost = max(float(m["cost"]) for m in models) or 1.0
    columns = (NAME_W, NAME_W + COLUMN_W + GAP, NAME_W + 2 * (COLUMN_W + GAP))
    parts = [f'<text class="head" x="{x}" y="12">{head}</text>'
             for x, head in zip(columns, ("calls", "tokens", "cost (USD)"), strict=True)]
    for n, m in enumerate(models):
        y = 20 + n * ROW
        accepted, rejected, other = int(m["accepted"]), int(m["rejected"]), int(m["other"])
        tokens = int(m["prompt_tokens"]) + int(m["completion_tokens"])
        cost = float(m["cost"])
        name = str(m["model"])
        shown = name if len(name) <= 34 else name[:33] + "…"
        tip = (f"{name}: {accepted} accepted, {rejected} rejected, {other} other; {m['prompt_tokens']} prompt + "
               f"{m['completion_tokens']} completion tokens; ${cost:.6f}")
        bars, x = [], float(columns[0])
        for kind, count in (("accepted", accepted), ("rejected", rejected), ("other", other)):
            w = COLUMN_W * count / most_calls
            bars.append(f'<rect class="bar {kind}" x="{x:.1f}" y="{y + 4}" width="{w:.1f}" height="14"/>')
            x += w
        token_w, cost_w = COLUMN_W * tokens / most_tokens, COLUMN_W * cost / most_cost
        parts.append(
            f'<g class="model" data-model="{escape(name)}" data-accepted="{accepted}" data-rejected="{rejected}" '
            f'data-other="{other}" data-tokens="{tokens}" data-cost="{cost:.10g}"><title>{escape(tip)}</title>'
            f'<text class="name" x="0" y="{y + 15}">{escape(shown)}</text>{"".join(bars)}'
            f'<text class="value" x="{x + 4:.1f}" y="{y + 15}">{accepted + rejected + other}</text>'
            f'<rect class="bar tokens" x="{columns[1]}" y="{y + 4}" width="{token_w:.1f}" height="14"/>'
            f'<text class="value" x="{columns[1] + token_w + 4:.1f}" y="{y + 15}">{compact(tokens)}</text>'
            f'<rect class="bar cost" x="{columns[2]}" y="{y + 4}" width="{cost_w:.1f}" height="14"/>'
            f'<text class="value" x="{columns[2] + cost_w + 4:.1f}" y="{y + 15}">${cost:.4f}</text></g>')
    label = "Calls, tokens and cost per model over the same hours: " + "; ".join(
        f"{m['model']} {m['accepted']} accepted, {m['rejected']} rejected, {m['other']} other" for m in models)
    return svg(NAME_W + 3 * (COLUMN_W + GAP), 24 + len(models) * ROW, label, "".join(parts), "models-chart")


def legend() -> str:
    items = (("completed", "completed"), ("failed", "failed"), ("accepted", "accepted"), ("rejected", "rejected"),
             ("other", "other outcome"))
    return "<p class=legend>" + "".join(f'<span class="key {k}"></span>{escape(t)} ' for k, t in items) + "</p>"


def charts_section(activity: Mapping[str, Any]) -> str:
    """The overview's charts section (live: the script swaps it for a fresh one)."""
    hours = activity.get("hours") or []
    return (f'<section id=charts data-live><h2>The last {len(hours)} hours</h2>{legend()}'
            f'<h3>Tasks finished per hour</h3>{throughput(hours)}'
            f'<h3>Per model</h3>{per_model(activity.get("models") or [])}</section>')
