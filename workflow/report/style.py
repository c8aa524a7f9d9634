"""The figures' visual identity of a cell, and colour contrast.

Every cell gets one `Style` (a colour, a marker shape and filled or hollow markers) from its position in the study's
cell list, and keeps it in every figure and legend. The palette has 10 colours and there are 7 marker shapes; 10 and
7 are coprime, so cells 0..69 all get different (colour, marker) pairs and neighbouring cells differ in both; cells
70..139 repeat those pairs with hollow markers. Line dashes are left to say something else (frozen cells are drawn
dashed).

Contrast follows WCAG 2.x: relative luminance of sRGB colours and the ratio (L1 + 0.05) / (L2 + 0.05).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# Ten colours, each at least 4.2:1 against white (so thin lines and markers stay visible, WCAG 1.4.11 asks 3:1).
PALETTE = ("#1f77b4", "#d62728", "#2a8a2a", "#c85a00", "#8856b8", "#8c564b", "#c2378f", "#00838f", "#6b6b6b",
           "#7d7d00")
MARKERS = ("circle", "square", "triangle", "diamond", "triangle-down", "plus", "star")
DISTINCT = len(PALETTE) * len(MARKERS) * 2   # 140 cells before a style repeats
BLACK, WHITE = "#000000", "#ffffff"


@dataclass(frozen=True)
class Style:
    color: str
    marker: str = "circle"
    hollow: bool = False


def cell_style(index: int) -> Style:
    """The style of the cell at `index` in the study's cell list."""
    return Style(PALETTE[index % len(PALETTE)], MARKERS[index % len(MARKERS)],
                 hollow=(index // (len(PALETTE) * len(MARKERS))) % 2 == 1)


def marker_path(marker: str, cx: float, cy: float, r: float = 4.0) -> str:
    """SVG path data of a marker of radius about `r` centred on (cx, cy)."""
    if marker == "circle":
        return f"M{cx - r:.1f},{cy:.1f} a{r:.1f},{r:.1f} 0 1,0 {2 * r:.1f},0 a{r:.1f},{r:.1f} 0 1,0 {-2 * r:.1f},0 z"
    if marker == "square":
        s = r * 0.85
        points = [(-s, -s), (s, -s), (s, s), (-s, s)]
    elif marker == "triangle":
        points = [(0, -r * 1.15), (r * 1.05, r * 0.75), (-r * 1.05, r * 0.75)]
    elif marker == "triangle-down":
        points = [(0, r * 1.15), (r * 1.05, -r * 0.75), (-r * 1.05, -r * 0.75)]
    elif marker == "diamond":
        points = [(0, -r * 1.2), (r * 0.95, 0), (0, r * 1.2), (-r * 0.95, 0)]
    elif marker == "plus":
        a, b = r * 0.38, r * 1.1
        points = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a),
                  (-a, -a)]
    elif marker == "star":
        points = [((r * 1.25 if k % 2 == 0 else r * 0.55) * math.sin(math.pi * k / 5),
                   -(r * 1.25 if k % 2 == 0 else r * 0.55) * math.cos(math.pi * k / 5)) for k in range(10)]
    else:
        raise ValueError(f"unknown marker {marker!r} (known: {', '.join(MARKERS)})")
    return "M" + " L".join(f"{cx + dx:.1f},{cy + dy:.1f}" for dx, dy in points) + " z"


def _channel(value: int) -> float:
    c = value / 255
    return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4


def relative_luminance(color: str) -> float:
    """WCAG relative luminance of a #rrggbb colour (0 for black, 1 for white)."""
    r, g, b = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    return 0.2126 * _channel(r) + 0.7152 * _channel(g) + 0.0722 * _channel(b)


def contrast_ratio(a: str, b: str) -> float:
    """WCAG contrast ratio of two colours, from 1 (the same) to 21 (black on white)."""
    la, lb = sorted((relative_luminance(a), relative_luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def text_color_on(background: str) -> str:
    """Black or white, whichever contrasts more with `background`. One of them always reaches 4.58:1: white gives
    at least 4.5:1 up to a background luminance of 0.183, black from 0.175 on."""
    return BLACK if contrast_ratio(BLACK, background) >= contrast_ratio(WHITE, background) else WHITE
