"""How the report writes numbers, lengths, durations, counts and JSON (plain strings; the template escapes them)."""
from __future__ import annotations

import json
import math


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


def fmt_pct(v) -> str:
    """A score in [0, 1] as a whole percentage."""
    return "—" if v is None else f"{100 * v:.0f}%"


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


def as_json(value):
    """A JSON column value as Python (DuckDB returns JSON as text)."""
    return json.loads(value) if isinstance(value, str) else value
