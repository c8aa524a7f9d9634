"""The report: render metrics.duckdb (opened read-only) into one self-contained HTML file (run by the report stage,
`workflow.stages.report`).

All SQL lives in workflow/queries.sql; the page is reports/templates/report.html.j2 with
report.css inlined; the charts are inline SVG written here (no JavaScript, no external resources).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

import duckdb
import yaml
from scipy import stats
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

REPO = Path(__file__).resolve().parent.parent
QUERIES_PATH = Path(__file__).with_name("queries.sql")
TEMPLATES_DIR = REPO / "reports" / "templates"
REFERENCE_DIR = REPO / "reports" / "reference"   # methods.yaml (overview text), paper.yaml (published numbers)
EXPORT_DIR = "report_tables"                     # beside report.html: one CSV + Parquet per table

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


def kendall(xs: list[float], ys: list[float]) -> tuple[float | None, float | None]:
    """Kendall's tau-b and its two-sided p-value (scipy); (None, None) when undefined."""
    if len(xs) < 3:
        return None, None
    result = stats.kendalltau(xs, ys)
    tau, p = float(result.statistic), float(result.pvalue)
    return (None, None) if math.isnan(tau) else (tau, p)


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


VIRIDIS = [(0.0, (68, 1, 84)), (0.25, (59, 82, 139)), (0.5, (33, 145, 140)), (0.75, (94, 201, 98)),
           (1.0, (253, 231, 37))]  # perceptually uniform and colour-blind safe


def accuracy_color(v: float) -> str:
    """Viridis: dark purple (0) through teal (0.5) to yellow (1)."""
    v = min(max(v, 0.0), 1.0)
    (a, ca), (b, cb) = next((VIRIDIS[i], VIRIDIS[i + 1]) for i in range(len(VIRIDIS) - 1) if v <= VIRIDIS[i + 1][0])
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
                class_="heat-label dark" if v > 0.6 else "heat-label", text_anchor="middle")
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
        if len(set(vals)) > 1:  # a column where every value ties has no best
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
            elif cell["train_len"] is not None and length > cell["train_len"]:
                classes.append("beyond")
            title = ci = None
            if r is None or r["value"] is None:
                text = "—"
            else:
                text = fmt(r["value"])
                if r["value"] == best.get(length):
                    classes.append("best")
                if r.get("ci_low") is not None and r.get("ci_high") is not None:
                    ci = f"{fmt(r['ci_low'])}–{fmt(r['ci_high'])}"
                    title = f"95% CI {ci}, n = {r['n']}"
                elif r.get("n") is not None:
                    title = f"n = {r['n']}"
            values.append({"text": text, "classes": " ".join(classes), "title": title, "ci": ci,
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


def load_reference(directory: Path = REFERENCE_DIR) -> tuple[dict, dict]:
    """(methods.yaml, paper.yaml): the method overview text and the reference study's numbers."""
    return tuple(yaml.safe_load((directory / name).read_text()) for name in ("methods.yaml", "paper.yaml"))


def _load_cells(db: Db, expected: list[str], methods: dict) -> list[dict]:
    """Every stored cell, then every cell study.json expects but the store never saw (status says so)."""
    cells = db.rows("cells")
    seen = {c["cell_id"] for c in cells}
    for cid in expected or []:
        if cid not in seen:
            cells.append({"cell_id": cid, "study": None, "rope": None, "attention": None, "train_len": None,
                          "regime": "—", "base_window": None, "method_params": None, "attention_params": None,
                          "config_hash": None, "code_version": None, "train_wall_s": None,
                          "train_tokens_per_s": None, "train_peak_mem_mb": None, "status": "no cell record",
                          "status_reason": None})
    for i, c in enumerate(cells):
        rope = methods["rope"].get(c["rope"], {})
        attn = methods["attention"].get(c["attention"], {})
        known = c["rope"] is not None
        c["method"] = method_label(c["rope"], c["attention"]) if known else "—"
        c["family"] = ("approximate" if "approximate" in (rope.get("family"), attn.get("family")) else "exact") \
            if known else "—"
        c["changes"] = "; ".join(d["changes"] for d, name in ((rope, c["rope"]), (attn, c["attention"]))
                                 if d and name not in ("none", "exact")) or (rope.get("changes", "—"))
        c["params_added"] = ", ".join(sorted({d.get("params_added", "none") for d in (rope, attn)} - {"none"})) \
            or ("none" if known else "—")
        c["spec"] = ", ".join(d["spec"] for d, name in ((rope, c["rope"]), (attn, c["attention"]))
                              if d and name not in ("none", "exact")) or rope.get("spec", "—")
        c["params"] = compact_params({**(_json(c["method_params"]) or {}), **(_json(c["attention_params"]) or {})})
        c["scale"] = fmt_num(c["train_len"] / c["base_window"]) if c["base_window"] and c["train_len"] else "—"
        c["hash"] = (c["config_hash"] or "—")[:12]
        c["color"] = PALETTE[i % len(PALETTE)]
        c["ok"] = c["status"] == "ok"
        c["status_text"] = c["status"] + (f": {c['status_reason']}" if c.get("status_reason") else "")
    return cells


# ----------------------------------------------------------------------------------------------
# Evidence: the per-cell numbers the findings, the correlations and the claims scoreboard rest on
# ----------------------------------------------------------------------------------------------

@dataclass
class Evidence:
    cells: list[dict]
    ppl: dict                # (cell_id, eval_len) -> perplexity
    downstream: dict         # score name -> {cell_id: mean score in [0, 1]}
    base_cell: str | None
    base_window: int | None
    thresholds: dict         # paper.yaml `thresholds`: significance, extrapolation_hard

    @property
    def longest(self) -> int | None:
        return max((length for _, length in self.ppl), default=None)

    def ppl_at(self, length) -> dict:
        return {c: v for (c, l), v in self.ppl.items() if l == length}

    def of(self, pred) -> list[dict]:
        return [c for c in self.cells if c["ok"] and pred(c)]


def correlations(ev: Evidence, downstream: dict, paper: dict) -> list[dict]:
    """Kendall tau between perplexity at the longest length and each downstream mean score, across cells."""
    at_longest = ev.ppl_at(ev.longest)
    out = []
    for name, means in downstream.items():
        common = sorted(c for c in means if c in at_longest)
        tau, p = kendall([at_longest[c] for c in common], [means[c] for c in common])
        ref = paper["kendall"].get(name.split(" ")[0]) or {}
        note = ("fewer than 3 cells" if len(common) < 3 else
                "same score for every cell" if len({means[c] for c in common}) < 2 else
                "same perplexity for every cell" if tau is None else "")
        out.append({"score": name, "n": len(common), "tau": tau, "p": p, "cells": common, "note": note,
                    "paper_task": ref.get("task"), "paper_tau": ref.get("tau"), "paper_p": ref.get("p")})
    return out


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.0f}%"


def _ratio_beyond(ev: Evidence, cell: dict) -> tuple[float, int] | None:
    """(perplexity at the first evaluated length beyond the training length / at the training length, that length)."""
    own = ev.ppl.get((cell["cell_id"], cell["train_len"]))
    beyond = sorted(l for (c, l) in ev.ppl if c == cell["cell_id"] and l > cell["train_len"])
    if not own or not beyond:
        return None
    return ev.ppl[(cell["cell_id"], beyond[0])] / own, beyond[0]


def _mean_downstream(ev: Evidence, cid: str) -> float | None:
    vals = [m[cid] for m in ev.downstream.values() if m.get(cid) is not None]
    return sum(vals) / len(vals) if vals else None


# Each rule returns (verdict, deciding numbers, cells it rests on). Verdicts: supported, not supported,
# not testable. The rule names are the `rule` keys of reports/reference/paper.yaml.

def rule_ppl_tracks_downstream(ev: Evidence, corr: list[dict]):
    usable = [c for c in corr if c["tau"] is not None]
    if not usable:
        return "not testable", "; ".join(f"{c['score']}: {c['note']}" for c in corr) or "no downstream scores", []
    text = "; ".join(f"{c['score']}: τ = {c['tau']:+.2f}, p = {c['p']:.3f} over {c['n']} cells" for c in usable)
    cited = sorted({x for c in usable for x in c["cells"]})
    if any(c["tau"] >= 0 for c in usable):  # the direction itself disagrees
        return "not supported", text, cited
    alpha = ev.thresholds["significance"]
    if all(c["p"] < alpha for c in usable):
        return "supported", text, cited
    return "not testable", text + f" (negative, but not significant at p < {alpha:g} with this few cells)", cited


def rule_approximate_underperforms(ev: Evidence, corr):
    approx = {c["cell_id"]: _mean_downstream(ev, c["cell_id"]) for c in ev.of(lambda c: c["family"] == "approximate")}
    exact = {c["cell_id"]: _mean_downstream(ev, c["cell_id"])
             for c in ev.of(lambda c: c["family"] == "exact" and c["regime"] == "finetuned")}
    approx = {k: v for k, v in approx.items() if v is not None}
    exact = {k: v for k, v in exact.items() if v is not None}
    if not ev.downstream:
        return "not testable", "no downstream score differs between cells", []
    if not approx or not exact:
        return "not testable", "needs approximate-attention and exact fine-tuned cells with downstream scores", []
    best_approx = max(approx, key=approx.get)
    median_exact = sorted(exact.values())[len(exact) // 2]
    text = (f"mean downstream score: best approximate {best_approx} {_pct(approx[best_approx])}, "
            f"median of {len(exact)} exact fine-tuned cells {_pct(median_exact)}")
    return ("supported" if approx[best_approx] < median_exact else "not supported"), text, [*approx, *exact]


def rule_finetuned_within_not_beyond(ev: Evidence, corr):
    cells = ev.of(lambda c: c["family"] == "exact" and c["regime"] == "finetuned")
    ratios = {c["cell_id"]: r for c in cells if (r := _ratio_beyond(ev, c))}
    base = ev.ppl_at  # perplexity of the unmodified base at each cell's training length
    within = {c["cell_id"]: (ev.ppl.get((c["cell_id"], c["train_len"])), base(c["train_len"]).get(ev.base_cell))
              for c in cells if c["cell_id"] in ratios}
    if not ratios or ev.base_cell is None:
        return "not testable", "needs the base cell and exact fine-tuned cells evaluated past their training length", []
    better_within = sum(1 for own, b in within.values() if own is not None and b is not None and own < b)
    rising = sorted(r for r, _ in ratios.values())
    median = rising[len(rising) // 2]
    text = (f"{better_within} of {len(within)} cells beat the base at their training length; one evaluated length "
            f"beyond it, perplexity is {rising[0]:.2f}× to {rising[-1]:.2f}× (median {median:.2f}×) its value "
            f"at the training length (the rule: every cell beats the base there, and the median rise exceeds "
            f"{ev.thresholds['extrapolation_hard']:g}×)")
    ok = better_within == len(within) and median > ev.thresholds["extrapolation_hard"]
    return ("supported" if ok else "not supported"), text, [*ratios, ev.base_cell]


def rule_dynamic_ntk_best(ev: Evidence, corr):
    tuned = ev.of(lambda c: c["regime"] == "finetuned")
    if not any(c["rope"] == "dynamic_ntk" for c in tuned) or len(tuned) < 2:
        return "not testable", "needs a fine-tuned Dynamic NTK cell and other fine-tuned cells", []
    ids = {c["cell_id"] for c in tuned}
    rope_of = {c["cell_id"]: c["rope"] for c in tuned}
    at_longest = {c: v for c, v in ev.ppl_at(ev.longest).items() if c in ids}
    wins, parts = 0, []
    criteria = [(f"perplexity at {fmt_len(ev.longest)}" if ev.longest else "perplexity", at_longest, min)]
    criteria += [(name, {c: v for c, v in m.items() if c in ids}, max) for name, m in ev.downstream.items()]
    for name, values, pick in criteria:
        if not values:
            continue
        best = pick(values, key=values.get)
        wins += rope_of[best] == "dynamic_ntk"
        parts.append(f"{name}: best {best}")
    if not parts:
        return "not testable", "no scores for the fine-tuned cells", []
    return ("supported" if wins > len(parts) / 2 else "not supported"), \
        f"Dynamic NTK best on {wins} of {len(parts)} criteria ({'; '.join(parts)})", sorted(ids)


def rule_short_range_cost(ev: Evidence, corr):
    if ev.base_cell is None or not ev.ppl:
        return "not testable", "needs the base cell's perplexity", []
    shortest = min(length for _, length in ev.ppl)
    at = ev.ppl_at(shortest)
    tuned = {c["cell_id"]: at[c["cell_id"]] for c in ev.of(lambda c: c["regime"] == "finetuned") if c["cell_id"] in at}
    if ev.base_cell not in at or not tuned:
        return "not testable", f"needs base and fine-tuned perplexity at {fmt_len(shortest)}", []
    worse = sum(v > at[ev.base_cell] for v in tuned.values())
    text = (f"at {fmt_len(shortest)} tokens the base reaches {fmt_num(at[ev.base_cell])}; {worse} of {len(tuned)} "
            f"fine-tuned cells are worse ({fmt_num(min(tuned.values()))} to {fmt_num(max(tuned.values()))})")
    return ("supported" if worse > len(tuned) / 2 else "not supported"), text, [ev.base_cell, *tuned]


RULES = {"ppl_tracks_downstream": rule_ppl_tracks_downstream,
         "approximate_underperforms": rule_approximate_underperforms,
         "finetuned_within_not_beyond": rule_finetuned_within_not_beyond,
         "dynamic_ntk_best": rule_dynamic_ntk_best, "short_range_cost": rule_short_range_cost}


def claims_scoreboard(ev: Evidence, corr: list[dict], paper: dict) -> list[dict]:
    out = []
    for claim in paper["claims"]:
        rule = claim.get("rule")
        if rule is None:
            verdict, ours, cited = "not testable", claim["untestable"], []
        elif rule not in RULES:
            raise ValueError(f"paper.yaml: claim {claim['id']} names unknown rule {rule!r} (known: {', '.join(RULES)})")
        else:
            verdict, ours, cited = RULES[rule](ev, corr)
        out.append({**claim, "verdict": verdict, "ours": ours, "cells": cited,
                    "verdict_class": verdict.replace(" ", "-")})
    return out


def findings(ev: Evidence, corr: list[dict], claims: list[dict], retrieval: dict) -> list[dict]:
    """4-6 statements read off the numbers, each with the cells it rests on (rules in this function)."""
    out = []
    at_longest = ev.ppl_at(ev.longest)
    if at_longest:
        best = min(at_longest.values())
        winners = [c for c, v in at_longest.items() if v == best]
        text = (f"At the longest evaluation length ({fmt_len(ev.longest)} tokens) the lowest perplexity is "
                f"{fmt_num(best)}, reached by {', '.join(winners)}")
        cited = list(winners)
        if ev.base_cell in at_longest and ev.base_cell not in winners:
            text += (f"; the unmodified base model reaches {fmt_num(at_longest[ev.base_cell])} "
                     f"({fmt_num(at_longest[ev.base_cell] / best)}× higher)")
            cited.append(ev.base_cell)
        out.append({"text": text + ".", "cells": cited})
    ratios = {c["cell_id"]: r for c in ev.of(lambda c: c["regime"] == "finetuned") if (r := _ratio_beyond(ev, c))}
    if ratios:
        lo, hi = min(ratios, key=lambda k: ratios[k][0]), max(ratios, key=lambda k: ratios[k][0])
        out.append({"text": f"One evaluated length beyond their training length, fine-tuned cells reach "
                            f"{ratios[lo][0]:.2f}× ({lo}) to {ratios[hi][0]:.2f}× ({hi}) their perplexity at the "
                            f"training length.", "cells": [lo, hi]})
    flat = {task: info["means"] for task, info in retrieval.items() if info["means"] and task not in ev.downstream}
    if flat:
        out.append({"text": "Retrieval does not separate the methods here: every cell has the same mean accuracy on "
                            + ", ".join(f"{task} ({_pct(next(iter(m.values())))})" for task, m in flat.items())
                            + " over all lengths and depths.",
                    "cells": sorted({c for m in flat.values() for c in m})})
    for task in ev.downstream:
        if task in retrieval:
            means = ev.downstream[task]
            best_id, worst_id = max(means, key=means.get), min(means, key=means.get)
            out.append({"text": f"Mean {task} accuracy over all lengths and depths ranges from "
                                f"{_pct(means[worst_id])} ({worst_id}) to {_pct(means[best_id])} ({best_id}).",
                        "cells": [worst_id, best_id]})
            break  # one retrieval finding; the tables show the rest
    usable = [c for c in corr if c["tau"] is not None]
    if usable:
        alpha = ev.thresholds["significance"]
        sig = [c for c in usable if c["p"] < alpha]
        text = (f"Rank correlation between perplexity at {fmt_len(ev.longest)} and downstream scores across cells: "
                + "; ".join(f"{c['score']} τ = {c['tau']:+.2f} (p = {c['p']:.3f}, {c['n']} cells)" for c in usable)
                + (". " + (f"Significant (p < {alpha:g}) for " + ", ".join(c["score"] for c in sig) if sig
                           else f"None is significant at p < {alpha:g}, so this study cannot confirm that perplexity "
                                "ranks downstream performance") + "."))
        out.append({"text": text, "cells": sorted({x for c in usable for x in c["cells"]})})
    against = [c for c in claims if c["verdict"] == "not supported"]
    if against:
        out.append({"text": "The data contradict the reference study on: " + "; ".join(
            f"claim {c['id']} ({c['claim'].rstrip('.')}: {c['ours']})" for c in against) + ".",
            "cells": sorted({x for c in against for x in c["cells"]})})
    absent = [c for c in ev.cells if not c["ok"]]
    if absent:
        several = len(absent) > 1
        out.insert(0, {"text": f"{len(absent)} expected cell{'s are' if several else ' is'} not reported "
                               f"because {'they have' if several else 'it has'} no results: " + ", ".join(f"{c['cell_id']} ({c['status_text']})"
                                                                       for c in absent) + ".",
                       "cells": [c["cell_id"] for c in absent]})
    return out[:6]


def perplexity_section(db: Db, cells: list[dict], base_window, ppl_clip: float) -> dict:
    rows = db.rows("length_values", *PPL)
    series = []
    for c in cells:
        pts = [(r["eval_len"], r["value"]) for r in rows if r["cell_id"] == c["cell_id"]]
        if pts:
            series.append(Series(c["cell_id"], pts, c["color"], dashed=c["regime"] == "frozen"))
    marks = {base_window: f"base {fmt_len(base_window)}"} if base_window else {}
    for c in cells:
        if c["train_len"] is not None:
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
            "grid": grid,
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


def task_suites_section(db: Db, cells: list[dict]) -> list[dict]:
    """Every suite other than ppl/passkey/needle: average over tasks by length, and per task by length."""
    out = []
    fmt = lambda v: f"{100 * v:.1f}" if v is not None and abs(v) <= 1 else fmt_num(v)
    for suite in db.rows("task_suites"):
        name, metric = suite["suite"], suite["metric"]
        by_task = db.rows("suite_by_task", name, metric)
        tasks = sorted({r["task"] for r in by_task})
        out.append({
            "suite": name, "metric": metric, "n_tasks": suite["n_tasks"],
            "average": length_table(cells, db.rows("suite_average", name, metric), better="high", fmt=fmt),
            "rows": by_task,
            "per_task": [{"task": t, "table": length_table(cells, [r for r in by_task if r["task"] == t],
                                                           better="high", fmt=fmt)} for t in tasks],
            "means": {r["cell_id"]: r["value"] for r in db.rows("suite_mean", name, metric)},
        })
    return out


def reference_section(cells: list[dict], ev: Evidence, downstream: dict, paper: dict) -> dict:
    """Each cell that has a counterpart in the reference study, with the published numbers beside ours."""
    rows = []
    for c in cells:
        match = next((m["method"] for m in paper["match"] if (m["rope"], m["attention"], m["regime"])
                      == (c["rope"], c["attention"], c["regime"])), None)
        ref = paper["overview"].get(match, {}) if match else {}
        ours = {"ppl": fmt_num(ev.ppl.get((c["cell_id"], ev.longest)))}
        for name, means in downstream.items():
            ours[name] = _pct(means.get(c["cell_id"]))
        rows.append({"cell_id": c["cell_id"], "status": c["status"], "paper_method": match or "—",
                     "ref": {k: "—" if ref.get(k) is None else f"{ref[k]:g}" for k in paper["overview_columns"]},
                     "ours": ours})
    return {"rows": rows, "columns": paper["overview_columns"], "study": paper["study"],
            "ours_columns": [f"ppl @{fmt_len(ev.longest)}" if ev.longest else "ppl", *downstream]}


PACKAGES = ("torch", "transformers", "lm-eval", "snakemake", "hydra-core", "duckdb", "jinja2", "scipy", "numpy")


def package_versions() -> list[tuple[str, str]]:
    from importlib import metadata
    out = []
    for name in PACKAGES:
        try:
            out.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            out.append((name, "not installed"))
    return out


def rerun_command(study: str, cell: dict) -> str:
    """The shell command that recomputes one cell's results and the report (see README)."""
    stages = "finetune evaluate" if cell["regime"] == "finetuned" else "evaluate"
    return (f"snakemake results/{study}/cells/{cell['cell_id']}/eval/ppl.json --cores all "
            f"--forcerun {stages} --config study={study} && snakemake report --cores all --config study={study}")


def data_hashes(manifest: dict) -> list[dict]:
    splits = manifest.get("splits") if isinstance(manifest.get("splits"), dict) else {}
    return [{"split": k, "files": v.get("files"), "tokens": fmt_count(v.get("tokens")),
             "file_list_sha256": v.get("file_list_sha256"), "text_sha256": v.get("text_sha256")}
            for k, v in splits.items() if isinstance(v, dict)]


def build_context(db: Db, ppl_clip: float) -> dict:
    """Everything the template shows, computed from the database (and the two reference files)."""
    methods, paper = load_reference()
    study = {r["key"]: _json(r["value"]) for r in db.rows("study")}
    cells = _load_cells(db, study.get("cells"), methods)
    base_window = study.get("base_window") or next((c["base_window"] for c in cells if c["base_window"]), None)
    base_cell = next((c["cell_id"] for c in cells if c["rope"] == "none" and c["attention"] == "exact"
                      and c["regime"] == "frozen"), None)
    ppl = perplexity_section(db, cells, base_window, ppl_clip)
    retrieval = retrieval_section(db, cells)
    suites = task_suites_section(db, cells)
    downstream = {task: info["means"] for task, info in retrieval.items()}
    for s in suites:  # a suite with several metrics gets one score per metric
        several = sum(x["suite"] == s["suite"] for x in suites) > 1
        downstream[f"{s['suite']} ({s['metric']})" if several else s["suite"]] = s["means"]
    # A score that is the same for every cell (e.g. 0% everywhere) ranks nothing: findings and claims skip it.
    informative = {k: v for k, v in downstream.items() if len(set(v.values())) > 1}
    ev = Evidence(cells, {(r["cell_id"], r["eval_len"]): r["value"] for r in ppl["rows"] if r["value"] is not None},
                  informative, base_cell, base_window, paper["thresholds"])
    corr = correlations(ev, downstream, paper)
    claims = claims_scoreboard(ev, corr, paper)
    training = training_section(db, cells, study.get("base_train") or {})
    totals = db.one("compute_totals")
    runs = db.rows("runs")
    manifest = study.get("manifest") or study.get("data") or {}
    n_ft = sum(c["regime"] == "finetuned" for c in cells)
    code_version = study.get("code_version") or (runs[-1]["code_version"] if runs else "unknown")
    name = str(study.get("name") or (cells[0]["study"] if cells else "unnamed study"))
    configs = {r["cell_id"]: r for r in db.rows("cell_configs")}
    return {
        "name": name,
        "description": study.get("description"),
        "model": describe_model(study.get("model"), base_window),
        "data": describe_data(study.get("data") or manifest),
        "grid": {"cells": len(cells), "finetuned": n_ft, "frozen": sum(c["regime"] == "frozen" for c in cells),
                 "not_ok": sum(not c["ok"] for c in cells),
                 "methods": sorted({c["method"] for c in cells if c["method"] != "—"}),
                 "targets": [fmt_len(n) for n in sorted({c["train_len"] for c in cells if c["train_len"]}
                                                        - {base_window})],
                 "eval_lens": [col["label"] for col in ppl["table"]["lengths"]]},
        "compute": {"total": fmt_duration(sum(v or 0 for v in totals.values())),
                    "pretrain": fmt_duration(totals.get("pretrain_s")),
                    "finetune": fmt_duration(totals.get("finetune_s")),
                    "eval": fmt_duration(totals.get("eval_s"))},
        "date": runs[-1]["started_at"][:10] if runs else "—",
        "code_version": code_version,
        "other_code_versions": sorted({c["code_version"] for c in cells if c["code_version"]} - {code_version}),
        "findings": findings(ev, corr, claims, retrieval),
        "cells": cells,
        "ppl_table": ppl["table"], "ppl_chart": ppl["chart"],
        "retrieval": retrieval,
        "suites": suites,
        "correlations": [{**c, "tau_text": "—" if c["tau"] is None else f"{c['tau']:+.2f}",
                          "p_text": "—" if c["p"] is None else f"{c['p']:.3f}",
                          "paper_tau_text": "—" if c["paper_tau"] is None else f"{c['paper_tau']:+.4f}",
                          "paper_p_text": "—" if c["paper_p"] is None else f"{c['paper_p']:.4f}"} for c in corr],
        "longest": fmt_len(ev.longest) if ev.longest else "—",
        "reference": reference_section(cells, ev, downstream, paper),
        "claims": claims,
        "train_charts": training["charts"], "efficiency": training["table"],
        "config_json": pretty(study["config"]) if study.get("config") is not None else None,
        "cell_configs": [{"cell_id": c["cell_id"], "status": c["status"],
                          "config": pretty(_json(configs[c["cell_id"]]["config"])) if c["cell_id"] in configs
                          else None, "rerun": rerun_command(name, c) if c["regime"] != "—" else
                          f"snakemake --cores all --config study={name} report"} for c in cells],
        "manifest_json": pretty(abbreviate(manifest)) if manifest else None,
        "data_hashes": data_hashes(manifest),
        "packages": package_versions(),
        "runs": runs,
        "schema_version": db.one("schema_version").get("version"),
        "exports": export_tables(cells, ppl["rows"], retrieval, suites, corr, claims, training["table"]),
    }


def export_tables(cells, ppl_rows, retrieval, suites, corr, claims, efficiency) -> dict[str, list[dict]]:
    """The report's tables as plain rows (numbers unformatted), one entry per exported file."""
    keep = ("cell_id", "method", "family", "regime", "train_len", "rope", "attention", "changes", "params_added",
            "params", "spec", "config_hash", "status")
    tables = {"cells": [{k: c[k] for k in keep} for c in cells], "perplexity": ppl_rows}
    for task, info in retrieval.items():
        tables[f"retrieval_{task}"] = info["grid"]
    for s in suites:
        tables[f"suite_{s['suite']}_{s['metric']}"] = s["rows"]
    tables["correlation"] = [{k: c[k] for k in ("score", "n", "tau", "p", "paper_task", "paper_tau", "paper_p")}
                             for c in corr]
    tables["claims"] = [{"id": c["id"], "claim": c["claim"], "reference_numbers": c["evidence"],
                         "verdict": c["verdict"], "deciding_numbers": c["ours"], "cells": ", ".join(c["cells"])}
                        for c in claims]
    tables["efficiency"] = efficiency
    return tables


def write_exports(tables: dict[str, list[dict]], out_dir: Path) -> list[Path]:
    """Each table as <name>.csv and <name>.parquet (DuckDB COPY); a table with no rows is skipped."""
    import pandas as pd

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    con = duckdb.connect(":memory:")
    try:
        for name, rows in tables.items():
            if not rows:
                continue
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
            con.register("export_rows", pd.DataFrame(rows))
            for ext, options in (("csv", "(HEADER)"), ("parquet", "(FORMAT parquet)")):
                path = out_dir / f"{safe}.{ext}"
                tmp = out_dir / f".{safe}.{ext}.tmp"
                con.execute(f"COPY export_rows TO '{tmp}' {options}")
                tmp.replace(path)
                written.append(path)
            con.unregister("export_rows")
    finally:
        con.close()
    return written


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
    write_exports(context["exports"], out_path.parent / EXPORT_DIR)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    tmp.write_text(html)
    tmp.replace(out_path)
