"""The report's SVG chart library: scales, axes, line charts (with confidence bands and per-cell markers) and heat
maps. Every chart is drawn once and comes out twice: inline for the HTML page (styled by the page's CSS) and as a
standalone SVG file (its own xmlns, viewBox, stylesheet and white background) for reuse elsewhere. No scripts, no
external resources; every text and attribute is escaped here."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape

from markupsafe import Markup

from workflow.report.formatting import fmt_len, fmt_num
from workflow.report.style import Style, marker_path, text_color_on

SVG_NS = "http://www.w3.org/2000/svg"
DASH = "6 3"   # the dash pattern of frozen cells' lines


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

    def open(self, tag: str, **attrs) -> None:
        self.parts.append(f"<{tag}{_attrs(attrs)}>")

    def close(self, tag: str) -> None:
        self.parts.append(f"</{tag}>")

    def _root(self, extra: str = "") -> str:
        w, h = round(self.width), round(self.height)
        return (f'<svg{extra} class="chart" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
                f'aria-label="{escape(self.title)}"><title>{escape(self.title)}</title>')

    def render(self) -> Markup:
        """Inline SVG for the HTML page, which styles it."""
        return Markup(self._root() + "".join(self.parts) + "</svg>")

    def standalone(self, css: str) -> str:
        """A standalone SVG document: namespace, viewBox, its own stylesheet, a white background."""
        if "]]>" in css:
            raise ValueError("the chart stylesheet must not contain ']]>'")
        return ('<?xml version="1.0" encoding="UTF-8"?>\n' + self._root(f' xmlns="{SVG_NS}"')
                + f"<style><![CDATA[\n{css}\n]]></style>"
                + f'<rect class="background" width="{round(self.width)}" height="{round(self.height)}" fill="#ffffff"/>'
                + "".join(self.parts) + "</svg>\n")


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
    style: Style
    dashed: bool = False
    band: list[tuple[float, float, float]] = field(default_factory=list)  # (x, low, high) of a confidence band
    markers: bool = True  # draw the style's marker on the points (and in the legend)


@dataclass
class Chart:
    drawing: Svg
    name: str                # file stem of the standalone copy
    clipped: int = 0
    notes: list[str] = field(default_factory=list)
    file: str | None = None  # where the standalone copy is written, relative to the report

    @property
    def svg(self) -> Markup:
        """Inline, for the page."""
        return self.drawing.render()

    def document(self, css: str) -> str:
        """The same chart as a standalone SVG document styled by `css`."""
        return self.drawing.standalone(css)


def _domain(values: list[float], kind: str) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if kind == "log10":
        return 10 ** math.floor(math.log10(lo)), 10 ** math.ceil(math.log10(hi))
    if kind == "log2":
        return 2 ** math.floor(math.log2(lo)), 2 ** math.ceil(math.log2(hi))
    pad = (hi - lo) * 0.05 or 1.0
    return lo - pad, hi + pad


def draw_marker(svg: Svg, style: Style, cx: float, cy: float, r: float = 4.0) -> None:
    svg.add("path", d=marker_path(style.marker, cx, cy, r), stroke=style.color,
            fill="#ffffff" if style.hollow else style.color, class_=f"point point-{style.marker}")


def legend_key(style: Style, dashed: bool = False, markers: bool = True) -> Markup:
    """A cell's line and marker as a small inline SVG (the key beside its name in a table)."""
    svg = Svg(30, 12, "")
    svg.add("line", x1=1, y1=6, x2=29, y2=6, stroke=style.color, stroke_dasharray=DASH if dashed else None,
            class_="series")
    if markers:
        draw_marker(svg, style, 15, 6, 3.6)
    return Markup('<svg class="key" viewBox="0 0 30 12" width="30" height="12" aria-hidden="true">'
                  + "".join(svg.parts) + "</svg>")


def _runs(items: list, ok) -> list[list]:
    """The maximal runs of consecutive items for which ok(item) holds."""
    runs, run = [], []
    for item in items:
        if ok(item):
            run.append(item)
        elif run:
            runs.append(run)
            run = []
    return runs + ([run] if run else [])


def line_chart(series: list[Series], *, title: str, xlabel: str, ylabel: str, name: str,
               x_kind: str = "linear", y_kind: str = "linear", guides: list[tuple[float, str]] = (),
               clip: float | None = None, width: int = 1040, height: int = 400, max_markers: int = 12) -> Chart:
    """Polylines, each with its style's markers, an optional translucent confidence band and a legend entry;
    `guides` are labelled vertical lines; y values above `clip` are drawn at the top edge with a triangle. The chart
    grows taller when the legend needs it (one row per series)."""
    usable = lambda v, kind: v is not None and math.isfinite(v) and (kind == "linear" or v > 0)
    xs = [x for s in series for x, _ in s.points if usable(x, x_kind)] + [m for m, _ in guides]
    ys = [y for s in series for _, y in s.points if usable(y, y_kind)]
    ys += [v for s in series for _, lo, hi in s.band for v in (lo, hi) if usable(v, y_kind)]
    if not xs or not ys:
        svg = Svg(width, 60, title)
        svg.add("text", "no data", x=10, y=30, class_="axis-label")
        return Chart(svg, name)
    cap = (lambda v: min(v, clip)) if clip else (lambda v: v)
    legend = len(series) > 1
    legend_w = min(360, 42 + 6.6 * max(len(s.name) for s in series)) if legend else 0
    top = 24 + (24 if guides else 0)
    height = max(height, top + 16 * len(series) + 60) if legend else height
    bottom = height - 46
    left, right = 64, width - legend_w - 16
    x = Scale(*_domain(xs, x_kind), left, right, x_kind)
    y = Scale(*_domain([cap(v) for v in ys], y_kind), bottom, top, y_kind)
    svg = Svg(width, height, title)
    svg.add("text", title, x=left, y=14, class_="panel-title")
    draw_axes(svg, x, y, xlabel, ylabel)
    for i, (gx, label) in enumerate(sorted(guides)):
        px = x(gx)
        svg.add("line", x1=f"{px:.1f}", y1=top, x2=f"{px:.1f}", y2=bottom, class_="guide")
        svg.add("text", label, x=f"{px:.1f}", y=top - 6 - 11 * (i % 2), class_="guide-label", text_anchor="middle")
    # bands under every line, fainter the more there are, so that where all overlap they stay below ~55% opacity
    opacity = min(0.16, 0.8 / max(1, sum(bool(s.band) for s in series)))
    for s in series:
        ok = lambda b: usable(b[0], x_kind) and usable(b[1], y_kind) and usable(b[2], y_kind)
        for run in _runs(sorted(s.band), ok):
            upper = [f"{x(bx):.1f},{y(cap(hi)):.1f}" for bx, _, hi in run]
            lower = [f"{x(bx):.1f},{y(cap(lo)):.1f}" for bx, lo, _ in reversed(run)]
            svg.add("path", d="M" + " L".join(upper + lower) + " z", fill=s.style.color, fill_opacity=f"{opacity:.3f}",
                    class_="band")
    clipped = 0
    for i, s in enumerate(series):
        ok = lambda p: usable(p[0], x_kind) and usable(p[1], y_kind)
        # at most `max_markers` markers per curve, staggered from curve to curve, so curves that coincide still
        # show each of their markers
        every = max(1, math.ceil(len(s.points) / max_markers))
        phase = i % every
        for run in _runs(s.points, ok):
            pts = [(x(px_), y(cap(py_))) for px_, py_ in run]
            if len(pts) > 1:
                svg.add("polyline", points=" ".join(f"{cx:.1f},{cy:.1f}" for cx, cy in pts), stroke=s.style.color,
                        stroke_dasharray=DASH if s.dashed else None, class_="series")
            for k, ((_, py_), (cx, cy)) in enumerate(zip(run, pts)):
                if clip is not None and py_ > clip:
                    clipped += 1
                    svg.add("path", d=f"M{cx:.1f},{cy - 7:.1f} l5,8 h-10 z", fill=s.style.color, class_="clip-mark")
                elif s.markers and ((k + phase) % every == 0 or len(pts) == 1):
                    draw_marker(svg, s.style, cx, cy)
                elif len(pts) == 1:
                    svg.add("circle", cx=f"{cx:.1f}", cy=f"{cy:.1f}", r=2.5, fill=s.style.color)
    for i, s in enumerate(series if legend else []):
        ly, lx = top + 8 + 16 * i, right + 14
        svg.open("g", class_="legend-item")
        svg.add("line", x1=lx, y1=ly, x2=lx + 28, y2=ly, stroke=s.style.color,
                stroke_dasharray=DASH if s.dashed else None, class_="series")
        if s.markers:
            draw_marker(svg, s.style, lx + 14, ly, 3.6)
        svg.add("text", s.name, x=lx + 34, y=ly + 4, class_="legend-label")
        svg.close("g")
    notes = []
    if clipped:
        notes.append(f"{clipped} value{'s' if clipped > 1 else ''} above {fmt_num(clip)} "
                     f"{'are' if clipped > 1 else 'is'} drawn at the top edge (▲).")
    return Chart(svg, name, clipped, notes)


VIRIDIS = [(0.0, (68, 1, 84)), (0.25, (59, 82, 139)), (0.5, (33, 145, 140)), (0.75, (94, 201, 98)),
           (1.0, (253, 231, 37))]  # perceptually uniform and colour-blind safe


def accuracy_color(v: float) -> str:
    """Viridis: dark purple (0) through teal (0.5) to yellow (1)."""
    v = min(max(v, 0.0), 1.0)
    (a, ca), (b, cb) = next((VIRIDIS[i], VIRIDIS[i + 1]) for i in range(len(VIRIDIS) - 1) if v <= VIRIDIS[i + 1][0])
    t = (v - a) / (b - a)
    return "#" + "".join(f"{round(p + (q - p) * t):02x}" for p, q in zip(ca, cb))


def heatmap(values: dict[tuple, float], xcats: list, ycats: list, *, title: str, xlabel: str, ylabel: str,
            name: str, style: Style | None = None, square: int = 38) -> Chart:
    """Accuracy grid: x categories (lengths) by y categories (depths), value in % in each square, written in black
    or white, whichever contrasts more with the square; the cell's marker before the title."""
    left, top, indent = 58, 26, 16 if style else 0
    width = max(left + square * len(xcats) + 12, 7.3 * len(title) + 8 + indent)
    height = top + square * len(ycats) + 44
    x = BandScale(xcats, left, left + square * len(xcats), [fmt_len(c) for c in xcats])
    y = BandScale(ycats, top, top + square * len(ycats), [f"{c:g}" for c in ycats])
    svg = Svg(width, height, title)
    if style:
        draw_marker(svg, style, 9, 12, 4.2)
    svg.add("text", title, x=4 + indent, y=16, class_="panel-title")
    for (cx, cy), v in values.items():
        px, py = x(cx), y(cy)
        fill = accuracy_color(v)
        svg.add("rect", x=f"{px:.1f}", y=f"{py:.1f}", width=f"{square - 1:.1f}", height=f"{square - 1:.1f}",
                fill=fill, class_="heat")
        svg.add("text", f"{100 * v:.0f}", x=f"{px + square / 2:.1f}", y=f"{py + square / 2 + 4:.1f}",
                fill=text_color_on(fill), class_="heat-label", text_anchor="middle")
    draw_axes(svg, x, y, xlabel, ylabel, grid=False)
    return Chart(svg, name)
