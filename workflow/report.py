"""Report stage: render metrics.duckdb (opened read-only) into one self-contained HTML file.

All SQL lives in workflow/queries.sql; the page is reports/templates/report.html.j2 with
report.css inlined; the charts are inline SVG written here (no JavaScript, no external resources).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

import duckdb
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

REPO = Path(__file__).resolve().parent.parent
QUERIES_PATH = Path(__file__).with_name("queries.sql")
TEMPLATES_DIR = REPO / "reports" / "templates"

PPL = ("ppl", "ppl")                # (task, metric) of perplexity rows
ACCURACY = "accuracy"              # metric of retrieval rows (length x depth grid)
BASE_TRAIN_ID = "base"             # train_log cell id of the base model's pretraining
TASK_ORDER = ("passkey", "needle")  # retrieval tasks shown first, in this order; others follow

ROPE_LABELS = {"none": "RoPE (base)", "pi": "PI", "ntk": "NTK", "dynamic_ntk": "Dynamic NTK",
               "yarn": "YaRN", "clex": "CLEX"}
ATTENTION_LABELS = {"exact": "exact", "lm_infinite": "LM-Infinite", "landmark": "Landmark"}
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#17becf", "#7f7f7f", "#bcbd22", "#393b79", "#637939"]


# ----------------------------------------------------------------------------------------------
# Queries
# ----------------------------------------------------------------------------------------------

def load_queries(path: Path = QUERIES_PATH) -> dict[str, str]:
    """The named sections ("-- name: key") of queries.sql."""
    queries, name, lines = {}, None, []
    for line in path.read_text().splitlines():
        match = re.match(r"--\s*name:\s*(\w+)", line)
        if match:
            if name:
                queries[name] = "\n".join(lines).strip()
            name, lines = match.group(1), []
        elif name:
            lines.append(line)
    if name:
        queries[name] = "\n".join(lines).strip()
    return queries


class Db:
    """Runs the named queries; rows come back as dicts."""

    def __init__(self, con, queries: dict[str, str]):
        self.con, self.queries = con, queries

    def rows(self, name: str, *params) -> list[dict]:
        cur = self.con.execute(self.queries[name], list(params))
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, row)) for row in cur.fetchall()]

    def one(self, name: str, *params) -> dict:
        rows = self.rows(name, *params)
        return rows[0] if rows else {}


# ----------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------

def fmt_num(value, digits: int = 3) -> str:
    """Compact number: 3 significant figures, thousands separators, scientific when huge."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    mag = abs(value)
    if mag >= 1e6:
        return f"{value:.1e}"
    if mag >= 10 ** (digits - 1) or value == int(value) and mag >= 1:
        return f"{value:,.0f}"
    decimals = digits - 1 - int(math.floor(math.log10(mag))) if mag else 0
    return f"{value:.{max(decimals, 0)}f}"


def fmt_len(n: int) -> str:
    """Token lengths as 512, 1k, 4k, 32k."""
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else f"{n:,}"


def fmt_duration(seconds) -> str:
    if seconds is None:
        return "—"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 60:
        return f"{int(minutes)} min {seconds % 60:02.0f} s"
    return f"{int(minutes // 60)} h {minutes % 60:02.0f} min"


def fmt_count(n) -> str:
    if n is None:
        return "—"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:,}"


def method_label(rope: str, attention: str) -> str:
    rope_label = ROPE_LABELS.get(rope, rope)
    if attention == "exact":
        return rope_label
    attn = ATTENTION_LABELS.get(attention, attention)
    return attn if rope == "none" else f"{rope_label} + {attn}"


def method_family(rope: str, attention: str) -> str:
    parts = []
    if rope != "none":
        parts.append("RoPE scaling")
    if attention != "exact":
        parts.append("attention")
    return " + ".join(parts) or "unmodified"


def compact_params(params: dict) -> str:
    return ", ".join(f"{k}={fmt_num(v) if isinstance(v, float) else v}" for k, v in params.items()) or "—"


def abbreviate(obj, max_items: int = 8, max_str: int = 200):
    """A JSON value with long lists cut to their first items (for the provenance appendix)."""
    if isinstance(obj, dict):
        return {k: abbreviate(v, max_items, max_str) for k, v in obj.items()}
    if isinstance(obj, list):
        head = [abbreviate(v, max_items, max_str) for v in obj[:max_items]]
        return head + [f"… {len(obj)} items in all"] if len(obj) > max_items else head
    if isinstance(obj, str) and len(obj) > max_str:
        return obj[:max_str] + "…"
    return obj


def pretty(obj, depth: int = 0, width: int = 88) -> str:
    """Indented JSON with keys sorted; short lists of plain values stay on one line."""
    flat = json.dumps(obj, sort_keys=True, default=str, ensure_ascii=False)
    pad = "  " * depth
    if isinstance(obj, dict) and obj:
        items = [f"{pad}  {json.dumps(str(k), ensure_ascii=False)}: {pretty(v, depth + 1, width)}"
                 for k, v in sorted(obj.items())]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    nested = isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj)
    if isinstance(obj, list) and obj and (nested or len(flat) + len(pad) > width):
        return "[\n" + ",\n".join(f"{pad}  {pretty(v, depth + 1, width)}" for v in obj) + f"\n{pad}]"
    return flat


def kendall_tau(xs: list[float], ys: list[float]) -> float | None:
    """Kendall's tau-b (ties allowed); None when undefined."""
    conc = disc = ties_x = ties_y = 0
    for i in range(len(xs)):
        for j in range(i + 1, len(xs)):
            dx, dy = xs[i] - xs[j], ys[i] - ys[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                conc += 1
            else:
                disc += 1
    denom = math.sqrt((conc + disc + ties_x) * (conc + disc + ties_y))
    return (conc - disc) / denom if denom else None


# ----------------------------------------------------------------------------------------------
# SVG: one scale/axis helper shared by every chart
# ----------------------------------------------------------------------------------------------

def _attrs(attrs: dict) -> str:
    return "".join(f' {k.rstrip("_").replace("_", "-")}="{escape(str(v))}"'
                   for k, v in attrs.items() if v is not None)


class Svg:
    """Collects SVG elements; every text and attribute is escaped."""

    def __init__(self, width: float, height: float, title: str):
        self.width, self.height, self.title, self.parts = width, height, title, []

    def add(self, tag: str, text: str | None = None, **attrs) -> None:
        if text is None:
            self.parts.append(f"<{tag}{_attrs(attrs)}/>")
        else:
            self.parts.append(f"<{tag}{_attrs(attrs)}>{escape(str(text))}</{tag}>")

    def render(self) -> Markup:
        w, h = round(self.width), round(self.height)
        return Markup(f'<svg class="chart" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
                      f'aria-label="{escape(self.title)}"><title>{escape(self.title)}</title>'
                      + "".join(self.parts) + "</svg>")


class Scale:
    """Maps a data interval onto pixels; kind is 'linear', 'log10' or 'log2'."""

    def __init__(self, lo: float, hi: float, px0: float, px1: float, kind: str = "linear"):
        self.kind, self.px0, self.px1 = kind, px0, px1
        if hi <= lo:  # a single value: widen around it
            lo, hi = (lo - 0.5, hi + 0.5) if kind == "linear" else (lo / 2, hi * 2)
        self.lo, self.hi = lo, hi

    def _t(self, v: float) -> float:
        return {"linear": v, "log10": math.log10(v) if v > 0 else -math.inf,
                "log2": math.log2(v) if v > 0 else -math.inf}[self.kind]

    def __call__(self, v: float) -> float:
        frac = (self._t(v) - self._t(self.lo)) / (self._t(self.hi) - self._t(self.lo))
        return self.px0 + frac * (self.px1 - self.px0)

    def ticks(self) -> list[tuple[float, str]]:
        """(pixel, label) of round values inside the interval."""
        if self.kind == "log2":
            exps = range(math.ceil(math.log2(self.lo) - 1e-9), math.floor(math.log2(self.hi) + 1e-9) + 1)
            values = [2.0 ** e for e in exps]
            labels = [fmt_len(int(v)) if v >= 1 else f"{v:g}" for v in values]
        elif self.kind == "log10":
            exps = range(math.ceil(math.log10(self.lo) - 1e-9), math.floor(math.log10(self.hi) + 1e-9) + 1)
            mults = (1,) if len(exps) > 2 else (1, 2, 5)
            values = [m * 10.0 ** e for e in exps for m in mults if self.lo <= m * 10.0 ** e <= self.hi * 1.0001]
            labels = [f"{v:,g}" for v in values]
        else:
            raw = (self.hi - self.lo) / 5
            step = 10 ** math.floor(math.log10(raw))
            step *= next(m for m in (1, 2, 2.5, 5, 10) if step * m >= raw)
            first = math.ceil(self.lo / step - 1e-9)
            values = [k * step for k in range(first, int(math.floor(self.hi / step + 1e-9)) + 1)]
            labels = [f"{round(v, 10):,g}" for v in values]
        return [(self(v), label) for v, label in zip(values, labels)]


class BandScale:
    """Maps categories onto equal bands; ticks sit at band centres."""

    def __init__(self, cats: list, px0: float, px1: float, labels: list[str] | None = None):
        self.cats, self.px0 = list(cats), px0
        self.band = (px1 - px0) / max(len(self.cats), 1)
        self.labels = labels or [str(c) for c in self.cats]

    def __call__(self, cat) -> float:
        return self.px0 + self.cats.index(cat) * self.band

    def ticks(self) -> list[tuple[float, str]]:
        return [(self(c) + self.band / 2, lab) for c, lab in zip(self.cats, self.labels)]


def _span(scale) -> tuple[float, float]:
    """(smallest, largest) pixel of a scale."""
    end = scale.px1 if isinstance(scale, Scale) else scale.px0 + scale.band * len(scale.cats)
    return min(scale.px0, end), max(scale.px0, end)


def draw_axes(svg: Svg, x, y, xlabel: str, ylabel: str, grid: bool = True) -> None:
    """Frame, ticks, tick labels, optional grid lines and axis titles of a plot area."""
    (left, right), (top, bottom) = _span(x), _span(y)
    for px, label in x.ticks():
        if grid:
            svg.add("line", x1=f"{px:.1f}", y1=top, x2=f"{px:.1f}", y2=bottom, class_="grid")
        svg.add("line", x1=f"{px:.1f}", y1=bottom, x2=f"{px:.1f}", y2=bottom + 4, class_="tick")
        svg.add("text", label, x=f"{px:.1f}", y=bottom + 16, class_="tick-label", text_anchor="middle")
    for py, label in y.ticks():
        if grid:
            svg.add("line", x1=left, y1=f"{py:.1f}", x2=right, y2=f"{py:.1f}", class_="grid")
        svg.add("line", x1=left - 4, y1=f"{py:.1f}", x2=left, y2=f"{py:.1f}", class_="tick")
        svg.add("text", label, x=left - 7, y=f"{py + 4:.1f}", class_="tick-label", text_anchor="end")
    if grid:
        svg.add("rect", x=left, y=top, width=right - left, height=bottom - top, class_="frame")
    svg.add("text", xlabel, x=(left + right) / 2, y=bottom + 34, class_="axis-label", text_anchor="middle")
    mid = (top + bottom) / 2
    svg.add("text", ylabel, x=14, y=mid, class_="axis-label", text_anchor="middle",
            transform=f"rotate(-90 14 {mid})")


@dataclass
class Series:
    name: str
    points: list[tuple[float, float]]
    color: str
    dashed: bool = False


@dataclass
class Chart:
    svg: Markup
    clipped: int = 0
    notes: list[str] = field(default_factory=list)


def _domain(values: list[float], kind: str) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if kind == "log10":
        return 10 ** math.floor(math.log10(lo)), 10 ** math.ceil(math.log10(hi))
    if kind == "log2":
        return 2 ** math.floor(math.log2(lo)), 2 ** math.ceil(math.log2(hi))
    pad = (hi - lo) * 0.05 or 1.0
    return lo - pad, hi + pad


def line_chart(series: list[Series], *, title: str, xlabel: str, ylabel: str, x_kind: str = "linear",
               y_kind: str = "linear", markers: list[tuple[float, str]] = (), clip: float | None = None,
               width: int = 1040, height: int = 400) -> Chart:
    """Polylines with a legend; y values above `clip` are drawn at the top edge with a triangle."""
    usable = lambda v, kind: v is not None and math.isfinite(v) and (kind == "linear" or v > 0)
    xs = [x for s in series for x, _ in s.points if usable(x, x_kind)] + [m for m, _ in markers]
    ys = [y for s in series for _, y in s.points if usable(y, y_kind)]
    if not xs or not ys:
        svg = Svg(width, 60, title)
        svg.add("text", "no data", x=10, y=30, class_="axis-label")
        return Chart(svg.render())
    capped = [min(y, clip) if clip else y for y in ys]
    legend = len(series) > 1
    legend_w = min(360, 30 + 6.6 * max(len(s.name) for s in series)) if legend else 0
    left, top, bottom = 64, 24 + (24 if markers else 0), height - 46
    right = width - legend_w - 16
    x = Scale(*_domain(xs, x_kind), left, right, x_kind)
    y = Scale(*_domain(capped, y_kind), bottom, top, y_kind)
    svg = Svg(width, height, title)
    svg.add("text", title, x=left, y=14, class_="panel-title")
    draw_axes(svg, x, y, xlabel, ylabel)
    for i, (mx, label) in enumerate(sorted(markers)):
        px = x(mx)
        svg.add("line", x1=f"{px:.1f}", y1=top, x2=f"{px:.1f}", y2=bottom, class_="marker")
        svg.add("text", label, x=f"{px:.1f}", y=top - 6 - 11 * (i % 2), class_="marker-label",
                text_anchor="middle")
    clipped = 0
    for s in series:
        dash = "5 3" if s.dashed else None
        segment: list[str] = []
        segments = [segment]
        for px_, py_ in s.points:
            if not (usable(px_, x_kind) and usable(py_, y_kind)):
                segment = []
                segments.append(segment)
                continue
            over = clip is not None and py_ > clip
            cx, cy = x(px_), y(min(py_, clip) if over else py_)
            segment.append(f"{cx:.1f},{cy:.1f}")
            if over:
                clipped += 1
                svg.add("path", d=f"M{cx:.1f},{cy - 7:.1f} l5,8 h-10 z", fill=s.color, class_="clip-mark")
        for seg in segments:
            if len(seg) > 1:
                svg.add("polyline", points=" ".join(seg), stroke=s.color, stroke_dasharray=dash,
                        class_="series")
            elif seg:
                cx, cy = seg[0].split(",")
                svg.add("circle", cx=cx, cy=cy, r=2.5, fill=s.color)
    for i, s in enumerate(series if legend else []):
        ly = top + 8 + 16 * i
        lx = right + 14
        svg.add("line", x1=lx, y1=ly, x2=lx + 18, y2=ly, stroke=s.color,
                stroke_dasharray="5 3" if s.dashed else None, class_="series")
        svg.add("text", s.name, x=lx + 24, y=ly + 4, class_="legend-label")
    notes = []
    if clipped:
        notes.append(f"{clipped} value{'s' if clipped > 1 else ''} above {fmt_num(clip)} "
                     f"{'are' if clipped > 1 else 'is'} drawn at the top edge (▲).")
    return Chart(svg.render(), clipped, notes)


def accuracy_color(v: float) -> str:
    """Red (0) through yellow (0.5) to green (1)."""
    stops = [(0.0, (215, 48, 39)), (0.5, (254, 224, 139)), (1.0, (26, 152, 80))]
    v = min(max(v, 0.0), 1.0)
    (a, ca), (b, cb) = (stops[0], stops[1]) if v <= 0.5 else (stops[1], stops[2])
    t = (v - a) / (b - a)
    return "#" + "".join(f"{round(p + (q - p) * t):02x}" for p, q in zip(ca, cb))


def heatmap(values: dict[tuple, float], xcats: list, ycats: list, *, title: str, xlabel: str,
            ylabel: str, square: int = 38) -> Markup:
    """Accuracy grid: x categories (lengths) by y categories (depths), value in % in each square."""
    left, top = 58, 26
    width = max(left + square * len(xcats) + 12, 7.3 * len(title) + 8)
    height = top + square * len(ycats) + 44
    x = BandScale(xcats, left, left + square * len(xcats), [fmt_len(c) for c in xcats])
    y = BandScale(ycats, top, top + square * len(ycats), [f"{c:g}" for c in ycats])
    svg = Svg(width, height, title)
    svg.add("text", title, x=4, y=16, class_="panel-title")
    for (cx, cy), v in values.items():
        px, py = x(cx), y(cy)
        svg.add("rect", x=f"{px:.1f}", y=f"{py:.1f}", width=f"{square - 1:.1f}", height=f"{square - 1:.1f}",
                fill=accuracy_color(v), class_="heat")
        svg.add("text", f"{100 * v:.0f}", x=f"{px + square / 2:.1f}", y=f"{py + square / 2 + 4:.1f}",
                class_="heat-label dark" if 0.25 < v < 0.85 else "heat-label", text_anchor="middle")
    draw_axes(svg, x, y, xlabel, ylabel, grid=False)
    return svg.render()


# ----------------------------------------------------------------------------------------------
# Report content
# ----------------------------------------------------------------------------------------------

def length_table(cells: list[dict], rows: list[dict], *, better: str, fmt) -> dict:
    """Rows = cells, columns = eval lengths; best per column, training length and beyond marked."""
    lengths = sorted({r["eval_len"] for r in rows})
    by_cell = {(r["cell_id"], r["eval_len"]): r for r in rows}
    best = {}
    for length in lengths:
        vals = [r["value"] for (c, l), r in by_cell.items() if l == length and r["value"] is not None
                and math.isfinite(r["value"])]
        if vals:
            best[length] = min(vals) if better == "low" else max(vals)
    out_rows = []
    for cell in cells:
        has_any = any((cell["cell_id"], l) in by_cell for l in lengths)
        values = []
        for length in lengths:
            r = by_cell.get((cell["cell_id"], length))
            classes = ["num"]
            if length == cell["train_len"]:
                classes.append("at-train")
            elif length > cell["train_len"]:
                classes.append("beyond")
            title = None
            if r is None or r["value"] is None:
                text = "—"
            else:
                text = fmt(r["value"])
                if r["value"] == best.get(length):
                    classes.append("best")
                if r.get("ci_low") is not None and r.get("ci_high") is not None:
                    title = f"95% CI {fmt(r['ci_low'])}–{fmt(r['ci_high'])}, n = {r['n']}"
                elif r.get("n") is not None:
                    title = f"n = {r['n']}"
            values.append({"text": text, "classes": " ".join(classes), "title": title,
                           "best": "best" in classes})
        out_rows.append({**cell, "missing": not has_any, "vals": values})
    return {"lengths": [{"value": l, "label": fmt_len(l)} for l in lengths], "rows": out_rows}


def _json(value):
    return json.loads(value) if isinstance(value, str) else value


def describe_model(model: dict, base_window) -> str:
    model = model or {}
    parts = []
    name = model.get("name") or model.get("architecture")
    if model.get("n_params") is not None:
        parts.append(f"{fmt_count(model['n_params'])} parameters")
    layers = model.get("num_hidden_layers", model.get("layers"))
    if layers is not None:
        parts.append(f"{layers} layers")
    hidden = model.get("hidden_size", model.get("hidden"))
    if hidden is not None:
        parts.append(f"hidden size {hidden}")
    heads = model.get("num_attention_heads", model.get("heads"))
    if heads is not None:
        parts.append(f"{heads} heads")
    if model.get("vocab_size") is not None:
        parts.append(f"vocabulary {model['vocab_size']:,}")
    if base_window is not None:
        parts.append(f"base window {base_window:,} tokens")
    return (f"{name}: " if name else "") + ", ".join(parts) if parts or name else "not recorded"


def token_counts(data: dict) -> dict[str, int]:
    """Tokens per split from the manifest summary: data.splits.<split>.tokens, data.token_counts
    or data.tokens (a split -> count mapping)."""
    if isinstance(data.get("splits"), dict):
        counts = {k: v.get("tokens", v.get("n_tokens")) for k, v in data["splits"].items()
                  if isinstance(v, dict)}
        return {k: v for k, v in counts.items() if v is not None}
    for key in ("token_counts", "tokens"):
        if isinstance(data.get(key), dict):
            return dict(data[key])
    return {}


def describe_data(data: dict) -> dict:
    data = data or {}
    share = data.get("passkey_share")
    if share is not None and share > 1:
        share = share / 100
    order = ("train", "validation", "test")
    counts = sorted(token_counts(data).items(),
                    key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0]))
    return {"source": data.get("source") or "not recorded", "description": data.get("description"),
            "tokens": [(k, fmt_count(v)) for k, v in counts],
            "passkey_share": None if share is None else f"{100 * share:g}%"}


def findings(cells, ppl_rows, retrieval, base_cell) -> list[str]:
    """A few sentences read off the numbers."""
    out = []
    ppl = {(r["cell_id"], r["eval_len"]): r["value"] for r in ppl_rows if r["value"] is not None}
    at_longest = {}
    if ppl:
        longest = max(length for _, length in ppl)
        at_longest = {c: v for (c, length), v in ppl.items() if length == longest}
        best = min(at_longest.values())
        winners = [c for c, v in at_longest.items() if v == best]
        text = (f"At the longest evaluation length ({fmt_len(longest)} tokens) the lowest perplexity is "
                f"{fmt_num(best)}, reached by {', '.join(winners)}")
        if base_cell in at_longest and base_cell not in winners:
            text += f"; the unmodified base model reaches {fmt_num(at_longest[base_cell])}"
        out.append(text + ".")
        ratios = {}
        for c in cells:
            own, twice = ppl.get((c["cell_id"], c["train_len"])), ppl.get((c["cell_id"], 2 * c["train_len"]))
            if c["regime"] == "finetuned" and own and twice is not None:
                ratios[c["cell_id"]] = twice / own
        if ratios:
            worst = max(ratios, key=ratios.get)
            out.append(f"At twice their training length, fine-tuned cells reach {min(ratios.values()):.1f}× to "
                       f"{ratios[worst]:.1f}× their perplexity at the training length (largest: {worst}).")
    for task, info in retrieval.items():
        means = info["means"]
        if not means:
            continue
        best_id = max(means, key=means.get)
        out.append(f"Highest mean {task} accuracy over all lengths and depths: "
                   f"{100 * means[best_id]:.0f}% ({best_id}).")
        common = [c for c in means if c in at_longest]
        tau = kendall_tau([at_longest[c] for c in common], [means[c] for c in common]) if len(common) >= 3 else None
        if tau is not None:
            out.append(f"Rank correlation between perplexity at {fmt_len(longest)} and mean {task} accuracy "
                       f"over {len(common)} cells: Kendall τ = {tau:+.2f} (negative: lower perplexity goes "
                       f"with higher accuracy).")
    missing = [c["cell_id"] for c in cells if c["status"] != "ok"]
    if missing:
        out.append(f"{len(missing)} cell{'s have' if len(missing) > 1 else ' has'} no results yet: "
                   + ", ".join(missing) + ".")
    return out


def _load_cells(db: Db) -> list[dict]:
    cells = db.rows("cells")
    for i, c in enumerate(cells):
        c["method"] = method_label(c["rope"], c["attention"])
        c["family"] = method_family(c["rope"], c["attention"])
        c["params"] = compact_params({**(_json(c["method_params"]) or {}), **(_json(c["attention_params"]) or {})})
        c["scale"] = fmt_num(c["train_len"] / c["base_window"]) if c["base_window"] else "—"
        c["hash"] = (c["config_hash"] or "—")[:12]
        c["color"] = PALETTE[i % len(PALETTE)]
    return cells


def perplexity_section(db: Db, cells: list[dict], base_window, ppl_clip: float) -> dict:
    rows = db.rows("length_values", *PPL)
    series = []
    for c in cells:
        pts = [(r["eval_len"], r["value"]) for r in rows if r["cell_id"] == c["cell_id"]]
        if pts:
            series.append(Series(c["cell_id"], pts, c["color"], dashed=c["regime"] == "frozen"))
    marks = {base_window: f"base {fmt_len(base_window)}"} if base_window else {}
    for c in cells:
        marks.setdefault(c["train_len"], f"train {fmt_len(c['train_len'])}")
    chart = line_chart(series, title="Perplexity by evaluation length", xlabel="evaluation length (tokens, log₂)",
                       ylabel="perplexity (log)", x_kind="log2", y_kind="log10",
                       markers=sorted(marks.items()), clip=ppl_clip)
    return {"rows": rows, "table": length_table(cells, rows, better="low", fmt=fmt_num), "chart": chart}


def retrieval_section(db: Db, cells: list[dict]) -> dict:
    """Per length x depth task: mean-over-depth table, one heatmap per cell, mean accuracy per cell."""
    out = {}
    tasks = [r["task"] for r in db.rows("retrieval_tasks", ACCURACY)]
    for task in sorted(tasks, key=lambda t: (TASK_ORDER.index(t) if t in TASK_ORDER else len(TASK_ORDER), t)):
        grid = db.rows("retrieval_grid", task, ACCURACY)
        lengths = sorted({r["eval_len"] for r in grid})
        depths = sorted({r["depth"] for r in grid})
        panels, absent = [], []
        for c in cells:
            vals = {(r["eval_len"], r["depth"]): r["value"] for r in grid if r["cell_id"] == c["cell_id"]}
            if vals:
                panels.append(heatmap(vals, lengths, depths, title=c["cell_id"],
                                      xlabel="length (tokens)", ylabel="depth"))
            else:
                absent.append(c["cell_id"])
        by_len = db.rows("retrieval_by_length", task, ACCURACY)
        out[task] = {
            "table": length_table(cells, by_len, better="high", fmt=lambda v: f"{100 * v:.0f}"),
            "panels": panels, "absent": absent,
            "means": {r["cell_id"]: r["value"] for r in db.rows("retrieval_mean", task, ACCURACY)},
        }
    return out


def _loss_series(log_rows: list[dict], cid: str, name: str, color: str, max_points: int = 1000):
    pts = [(r["step"], r["loss"]) for r in log_rows if r["cell_id"] == cid]
    stride = max(1, len(pts) // max_points)
    pts = pts[::stride] + ([pts[-1]] if (len(pts) - 1) % stride else [])
    return Series(name, pts, color) if pts else None


def training_section(db: Db, cells: list[dict], base_train: dict) -> dict:
    """Loss curves (base pretraining; all fine-tuned cells) and the cost table."""
    log_rows = db.rows("train_log")
    charts = []
    base = _loss_series(log_rows, BASE_TRAIN_ID, "base pretraining", "#333333")
    if base:
        charts.append(line_chart([base], title="Base model pretraining", xlabel="step",
                                 ylabel="training loss", height=280))
    tuned = [_loss_series(log_rows, c["cell_id"], c["cell_id"], c["color"])
             for c in cells if c["regime"] == "finetuned"]
    if any(tuned):
        charts.append(line_chart([s for s in tuned if s], title="Fine-tuning (every fine-tuned cell)",
                                 xlabel="step", ylabel="training loss", height=320))
    steps = {r["cell_id"]: r["steps"] for r in db.rows("train_steps")}
    eval_wall = {r["cell_id"]: r["eval_wall_s"] for r in db.rows("eval_wall")}
    table = []
    if base_train:
        table.append({"name": "base pretraining", "regime": "pretraining",
                      "steps": steps.get(BASE_TRAIN_ID, base_train.get("steps", "—")),
                      "wall": fmt_duration(base_train.get("wall_s")), "tps": fmt_num(base_train.get("tokens_per_s")),
                      "mem": fmt_num(base_train.get("peak_mem_mb")), "eval": "—"})
    for c in cells:
        table.append({"name": c["cell_id"], "regime": c["regime"], "steps": steps.get(c["cell_id"], "—"),
                      "wall": fmt_duration(c["train_wall_s"]), "tps": fmt_num(c["train_tokens_per_s"]),
                      "mem": fmt_num(c["train_peak_mem_mb"]), "eval": fmt_duration(eval_wall.get(c["cell_id"]))})
    return {"charts": charts, "table": table}


def build_context(db: Db, ppl_clip: float) -> dict:
    """Everything the template shows, computed from the database."""
    study = {r["key"]: _json(r["value"]) for r in db.rows("study")}
    cells = _load_cells(db)
    base_window = study.get("base_window") or next((c["base_window"] for c in cells if c["base_window"]), None)
    base_cell = next((c["cell_id"] for c in cells if c["rope"] == "none" and c["attention"] == "exact"
                      and c["regime"] == "frozen"), None)
    ppl = perplexity_section(db, cells, base_window, ppl_clip)
    retrieval = retrieval_section(db, cells)
    training = training_section(db, cells, study.get("base_train") or {})
    totals = db.one("compute_totals")
    runs = db.rows("runs")
    manifest = study.get("manifest") or study.get("data") or {}
    n_ft = sum(c["regime"] == "finetuned" for c in cells)
    code_version = study.get("code_version") or (runs[-1]["code_version"] if runs else "unknown")
    return {
        "name": str(study.get("name") or (cells[0]["study"] if cells else "unnamed study")),
        "description": study.get("description"),
        "model": describe_model(study.get("model"), base_window),
        "data": describe_data(study.get("data") or manifest),
        "grid": {"cells": len(cells), "finetuned": n_ft, "frozen": len(cells) - n_ft,
                 "methods": sorted({c["method"] for c in cells}),
                 "targets": [fmt_len(n) for n in sorted({c["train_len"] for c in cells} - {base_window})],
                 "eval_lens": [col["label"] for col in ppl["table"]["lengths"]]},
        "compute": {"total": fmt_duration(sum(v or 0 for v in totals.values())),
                    "pretrain": fmt_duration(totals.get("pretrain_s")),
                    "finetune": fmt_duration(totals.get("finetune_s")),
                    "eval": fmt_duration(totals.get("eval_s"))},
        "date": runs[-1]["started_at"][:10] if runs else "—",
        "code_version": code_version,
        "other_code_versions": sorted({c["code_version"] for c in cells if c["code_version"]} - {code_version}),
        "findings": findings(cells, ppl["rows"], retrieval, base_cell),
        "cells": cells,
        "ppl_table": ppl["table"], "ppl_chart": ppl["chart"],
        "retrieval": retrieval,
        "train_charts": training["charts"], "efficiency": training["table"],
        "config_json": pretty(study["config"]) if study.get("config") is not None else None,
        "manifest_json": pretty(abbreviate(manifest)) if manifest else None,
        "runs": runs,
        "schema_version": db.one("schema_version").get("version"),
    }


def make_env(templates_dir: Path = TEMPLATES_DIR) -> Environment:
    return Environment(loader=FileSystemLoader(str(templates_dir)),
                       autoescape=select_autoescape(enabled_extensions=("html", "j2"), default=True,
                                                    default_for_string=True),
                       undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def render_report(db_path: Path, out_path: Path, ppl_clip: float = 1e4,
                  templates_dir: Path = TEMPLATES_DIR) -> None:
    """Render the study in `db_path` (opened read-only) into the self-contained HTML `out_path`."""
    db_path, out_path = Path(db_path), Path(out_path)
    if not db_path.exists():
        raise FileNotFoundError(f"no database at {db_path}; run the store stage first")
    con = duckdb.connect(str(db_path), read_only=True)
    try:
        context = build_context(Db(con, load_queries()), ppl_clip)
    finally:
        con.close()
    env = make_env(templates_dir)
    css = Markup((templates_dir / "report.css").read_text())
    html = env.get_template("report.html.j2").render(css=css, **context)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    tmp.write_text(html)
    tmp.replace(out_path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Render a study's metrics.duckdb into one HTML report.")
    parser.add_argument("--db", type=Path, required=True, help="results/<study>/metrics.duckdb")
    parser.add_argument("--out", type=Path, required=True, help="results/<study>/report.html")
    parser.add_argument("--ppl-clip", type=float, default=1e4,
                        help="perplexities above this are drawn at the top of the chart")
    args = parser.parse_args(argv)
    try:
        render_report(args.db, args.out, ppl_clip=args.ppl_clip)
    except (FileNotFoundError, duckdb.Error) as exc:
        print(f"report: error: {exc}", file=sys.stderr)
        return 2
    print(f"report: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
