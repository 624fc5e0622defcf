"""The report's statistics on numbers small enough to check by hand."""

from __future__ import annotations

import math
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.stats import (
    ALPHA,
    MIN_SEEDS,
    mean_ranks,
    paired_test,
    ranks,
    t_interval,
    wilson_interval,
)
from tests.reportutil import T975


def test_t_interval_uses_student_t_with_n_minus_1_degrees_of_freedom():
    values = [0.80, 0.84, 0.83, 0.85]
    iv = t_interval(values)
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    half = T975[3] * sd / math.sqrt(4)
    assert (iv.mean, iv.low, iv.high, iv.n) == pytest.approx((mean, mean - half, mean + half, 4))


def test_t_interval_of_one_value_has_no_bounds():
    iv = t_interval([0.7])
    assert (iv.mean, iv.low, iv.high, iv.sd, iv.n) == (0.7, None, None, None, 1)


def test_an_accuracy_interval_never_leaves_0_to_100_and_says_when_it_was_clipped():
    # The 2-seed case a reviewer saw as "98.61 [95.07, 102.15]".
    iv = t_interval([0.9722, 1.0])
    assert iv.high == 1.0 and iv.clipped
    assert iv.low == pytest.approx(0.9861 - T975[1] * statistics.stdev([0.9722, 1.0]) / 2**0.5)
    assert not t_interval([0.80, 0.84, 0.83]).clipped
    low = t_interval([0.0, 0.05])
    assert low.low == 0.0 and low.clipped
    unbounded = t_interval([0.9722, 1.0], bounds=None)
    assert unbounded.high > 1 and not unbounded.clipped


@pytest.mark.parametrize(
    ("p", "n", "low", "high"),
    [
        (0.5, 100, 0.4038, 0.5962),  # textbook values
        (1.0, 50, 0.9287, 1.0),  # a perfect score still has an interval, inside [0, 1]
        (0.0, 10, 0.0, 0.2775),
    ],
)
def test_wilson_interval_for_one_runs_test_accuracy(p, n, low, high):
    assert wilson_interval(p, n) == pytest.approx((low, high), abs=1e-4)


def test_paired_test_needs_three_shared_seeds():
    result = paired_test({0: 0.9, 1: 0.8, 2: 0.7}, {1: 0.7, 2: 0.6, 3: 0.1})
    assert (result.n, result.p_value, result.verdict) == (2, None, "not enough evidence")
    assert result.describe() == "not enough evidence (2 shared seeds; a verdict needs 3)"


def test_a_constant_difference_is_not_enough_evidence_never_p_0():
    """Equal per-seed differences: SD 0, and scipy says p=0 (today's main printed
    'distinguishable (paired t-test, n=2, p=0)'). Float noise (2.2e-16) counts as equal."""
    exact = paired_test({0: 0.75, 1: 0.5, 2: 0.25}, {0: 0.5, 1: 0.25, 2: 0.0})
    noisy = paired_test({0: 0.3, 1: 0.7, 2: 0.9}, {0: 0.2, 1: 0.6, 2: 0.8})
    for result in (exact, noisy):
        assert (result.p_value, result.verdict) == (None, "not enough evidence")
        assert "the same difference on every seed" in result.describe()


def test_paired_test_of_identical_results_is_not_enough_evidence():
    result = paired_test({0: 0.9, 1: 0.8, 2: 0.7}, {0: 0.9, 1: 0.8, 2: 0.7})
    assert result.verdict == "not enough evidence"


def test_a_tiny_p_value_reads_as_a_bound_never_zero():
    from service.stats import format_p

    assert format_p(1e-300) == "p<0.001" and format_p(0.0) == "p<0.001"
    assert format_p(0.0123) == "p=0.012"


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), min_size=0, max_size=6),
    st.integers(5, 40),
)
def test_no_verdict_the_data_cannot_support(pairs, n_test):
    """Random small samples of accuracies on a small test set (k/n_test): a verdict is only
    printed with enough shared seeds, differences that vary and a p-value that is > 0 and
    below alpha; its text never reads p=0."""
    a = {s: x / n_test for s, (x, _) in enumerate(pairs)}
    b = {s: y / n_test for s, (_, y) in enumerate(pairs)}
    result = paired_test(a, b)
    text = result.describe()
    assert "p=0 " not in text + " " and "p=0)" not in text
    diffs = [a[s] - b[s] for s in a]
    if result.verdict == "distinguishable":
        assert len(diffs) >= MIN_SEEDS and max(diffs) - min(diffs) > 1e-9
        assert 0 < result.p_value < ALPHA
    if len(diffs) < MIN_SEEDS or (diffs and max(diffs) - min(diffs) <= 1e-9):
        assert result.verdict == "not enough evidence" and result.p_value is None


def test_paired_test_only_pairs_the_seeds_both_have():
    a = {0: 0.90, 1: 0.92, 2: 0.91, 3: 0.10}
    b = {0: 0.85, 1: 0.86, 2: 0.84}
    assert paired_test(a, b).n == 3
    assert paired_test(a, b).mean_diff == pytest.approx(0.06)


def test_ranks_put_the_highest_first_and_share_ties():
    assert ranks({"a": 0.9, "b": 0.95, "c": 0.9, "d": 0.1}) == {
        "b": 1.0,
        "a": 2.5,
        "c": 2.5,
        "d": 4.0,
    }


def test_mean_ranks_count_the_datasets_each_backbone_was_ranked_on():
    assert mean_ranks([{"a": 1, "b": 2}, {"a": 2, "b": 1}, {"a": 1}]) == {
        "a": (pytest.approx(4 / 3), 3),
        "b": (1.5, 2),
    }


@pytest.mark.parametrize(
    ("lo", "hi"), [(1.8, 4.5), (0.02, 0.5), (0.1, 300), (4.1, 4.46), (0.5, 0.5)]
)
def test_log_axes_get_tick_values_even_inside_one_decade(lo, hi):
    from service.report.plots import nice_log_ticks

    ticks = nice_log_ticks(lo, hi)
    assert ticks == sorted(set(ticks)) and 1 <= len(ticks) <= 8
    assert all(lo / 1.2 <= t <= hi * 1.2 for t in ticks)
    if hi / lo > 2:
        assert len(ticks) >= 3
