"""The statistics module against values computed by hand here (textbook formulas, quantiles from tables)."""
import math

import pytest

from workflow import stats

T_975 = {1: 12.706204736, 5: 2.570581836, 19: 2.093024054}   # Student t quantiles (tables)
Z_975 = 1.959963985


def test_t_interval_uses_the_t_quantile_of_n_minus_1_degrees_of_freedom():
    values = [4.10, 4.25, 3.95, 4.40, 4.05, 4.30]           # e.g. six perplexity spans on the loss scale
    mean = sum(values) / 6
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 5)
    got = stats.t_interval(values)
    assert got[0] == pytest.approx(mean)
    assert got[1] == pytest.approx(mean - T_975[5] * sd / math.sqrt(6), rel=1e-8)
    assert got[2] == pytest.approx(mean + T_975[5] * sd / math.sqrt(6), rel=1e-8)
    # the old z-interval was ~24% too narrow with six spans
    assert (got[2] - got[1]) / (2 * Z_975 * sd / math.sqrt(6)) == pytest.approx(T_975[5] / Z_975)


def test_t_interval_edge_cases():
    assert stats.t_interval([3.0])[0] == 3.0 and math.isnan(stats.t_interval([3.0])[1])
    assert stats.t_interval([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)
    assert all(math.isnan(x) for x in stats.t_interval([]))


@pytest.mark.parametrize("k,n", [(0, 4), (3, 4), (5, 10), (19, 20), (20, 20)])
def test_wilson_matches_the_closed_form(k, n):
    p, z = k / n, Z_975
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low, high = stats.wilson(k, n)
    assert low == pytest.approx(max(0.0, centre - half), abs=1e-9) and high == pytest.approx(min(1.0, centre + half), abs=1e-9)


def test_score_interval_is_wilson_for_proportions_and_t_otherwise():
    assert stats.score_interval([1, 0, 1, 1])[1:] == stats.wilson(3, 4)
    mean, low, high = stats.score_interval([0.5, 0.6, 0.7])
    assert low == pytest.approx(0.6 - 4.302652730 * 0.1 / math.sqrt(3), rel=1e-8)
    assert stats.score_interval([0.0, 0.5, 0.0])[1] == 0.0      # clipped to [0, 1]


def test_median_of_an_even_count_is_the_mean_of_the_middle_two():
    assert stats.median([1.10, 1.12, 1.14, 1.15]) == pytest.approx(1.13)
    assert stats.median([3.0, 1.0, 2.0]) == 2.0


def test_kendall_against_a_hand_count():
    xs, ys = [1, 2, 3, 4, 5], [5, 6, 7, 9, 8]          # 9 concordant, 1 discordant pair, no ties
    tau, p = stats.kendall(xs, ys)
    assert tau == pytest.approx((9 - 1) / 10) and 0 < p < 0.1
    assert stats.kendall([1, 2], [2, 1]) == (None, None)            # fewer than three pairs
    assert stats.kendall([1, 2, 3], [4, 4, 4]) == (None, None)      # a constant variable
    assert stats.kendall([1, None, 3, 4], [1, 2, float("nan"), 4]) == (None, None)  # only two usable pairs
