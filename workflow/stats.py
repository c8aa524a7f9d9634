"""The statistics of the study, in one place and on scipy: confidence intervals of every stored value, the rank
correlation, the medians of the report's rules, the spread of a cell over its seeds and the paired comparison of two
cells over the same seeds. Every interval is two-sided at `CONFIDENCE`."""
from __future__ import annotations

import math
import statistics
from typing import Sequence

from scipy.stats import binomtest, kendalltau, norm, t, ttest_rel

CONFIDENCE = 0.95
NAN = float("nan")


def wilson(correct: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval (no continuity correction) of a binomial proportion correct / n; (nan, nan) for n = 0."""
    if n == 0:
        return NAN, NAN
    ci = binomtest(int(correct), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval of the mean of `values` (n - 1 degrees of freedom); the bounds are nan
    with fewer than two values."""
    n = len(values)
    if n == 0:
        return NAN, NAN, NAN
    mean = math.fsum(values) / n
    if n < 2:
        return mean, NAN, NAN
    sem = statistics.stdev(values) / math.sqrt(n)
    if sem == 0:
        return mean, mean, mean
    low, high = t.interval(confidence, n - 1, loc=mean, scale=sem)
    return mean, float(low), float(high)


def score_interval(scores: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(mean, low, high) of per-sample scores in [0, 1]: Wilson when every score is 0 or 1 (a proportion), else the
    t-interval of the mean clipped to [0, 1]."""
    n = len(scores)
    if n == 0:
        return NAN, NAN, NAN
    mean = math.fsum(scores) / n
    if all(s in (0.0, 1.0) for s in scores):
        return (mean, *wilson(int(sum(scores)), n, confidence))
    _, low, high = t_interval(scores, confidence)
    return mean, max(0.0, low), min(1.0, high)


def stderr_interval(value: float, stderr: float, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Normal-approximation interval value ± z·stderr (for a mean whose standard error another tool reports, e.g.
    lm-eval's `<metric>_stderr`)."""
    z = float(norm.ppf(0.5 + confidence / 2))
    return value - z * stderr, value + z * stderr


def kendall(xs: Sequence[float], ys: Sequence[float]) -> tuple[float | None, float | None]:
    """Kendall's tau-b and its two-sided p-value (scipy); (None, None) when fewer than three pairs or a constant
    variable make it undefined."""
    pairs = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None
             and math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 3 or len({x for x, _ in pairs}) < 2 or len({y for _, y in pairs}) < 2:
        return None, None
    result = kendalltau([x for x, _ in pairs], [y for _, y in pairs])
    tau, p = float(result.statistic), float(result.pvalue)
    return (tau if math.isfinite(tau) else None), (p if math.isfinite(p) else None)


def median(values: Sequence[float]) -> float:
    """The median (the mean of the two middle values for an even count)."""
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> dict:
    """The spread of one quantity over repeated runs (a cell's value at one length over its seeds): n, mean, sample
    standard deviation (n - 1 in the denominator; nan for a single value), min and max."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": NAN, "sd": NAN, "min": NAN, "max": NAN}
    return {"n": n, "mean": math.fsum(values) / n, "sd": statistics.stdev(values) if n > 1 else NAN,
            "min": float(min(values)), "max": float(max(values))}


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> dict:
    """Paired comparison of two quantities measured on the same runs (two methods' perplexity, seed by seed): n, the
    mean of a_i - b_i, its Student-t interval (n - 1 degrees of freedom) and the two-sided p-value of the paired t-test
    (scipy.stats.ttest_rel). With fewer than two pairs the bounds and p are nan; when every difference is the same the
    interval is that value and p is nan (the test is undefined)."""
    if len(a) != len(b):
        raise ValueError(f"paired values need the same number of runs, got {len(a)} and {len(b)}")
    n = len(a)
    diffs = [x - y for x, y in zip(a, b)]
    mean = math.fsum(diffs) / n if n else NAN
    if n < 2:
        return {"n": n, "mean": mean, "low": NAN, "high": NAN, "p": NAN}
    if statistics.stdev(diffs) == 0:
        return {"n": n, "mean": mean, "low": mean, "high": mean, "p": NAN}
    result = ttest_rel(a, b)
    ci = result.confidence_interval(confidence_level=confidence)
    return {"n": n, "mean": mean, "low": float(ci.low), "high": float(ci.high), "p": float(result.pvalue)}
