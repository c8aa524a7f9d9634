"""The report's SVG chart library: scales, axes, line charts and heat maps, all inline SVG (no scripts, no external
resources); every text and attribute is escaped here."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape

from markupsafe import Markup

from workflow.report.formatting import fmt_len, fmt_num


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

