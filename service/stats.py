"""The statistics of the report, as small pure functions over plain numbers.

- A 95% t-interval of the mean over seeds: with 3 seeds a normal interval would be far too
  narrow (t(0.975, 2) = 4.30, not 1.96). Accuracy lives in [0, 1]: an interval that would
  cross a bound is clipped to it and says so (with 2-3 seeds a bootstrap has nothing to resample).
- Beside it, the test-set sampling uncertainty of one run: a 95% Wilson score interval for a
  proportion measured on n_test images (it stays inside [0, 1] by construction).
- A paired t-test between two backbones over the seeds they share: seed s fixes the split,
  the subsample and the data order for both, so pairing removes that shared noise.
- Ranks within a dataset (1 = best, ties share the average rank) and their mean across
  datasets, as the paper ranks backbones per domain.
"""

from __future__ import annotations

import functools
import math
import statistics
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

CONFIDENCE = 0.95
ALPHA = 0.05
MIN_SEEDS = 3  # shared seeds a paired verdict needs (with 2, one df: a t-test is all noise)
PAIRED_METHOD = (
    "paired t-test over the seeds both backbones completed (scipy.stats.ttest_rel, two-sided, "
    f"alpha {ALPHA}); a verdict needs at least {MIN_SEEDS} shared seeds whose differences vary: "
    "fewer seeds, or the same difference on every seed (no spread to test against), is 'not "
    "enough evidence', never p=0"
)
INTERVAL_METHOD = (
    "mean over seeds with a 95% Student-t confidence interval (n-1 degrees of freedom), "
    "clipped to [0, 100] where it would cross a bound (marked *)"
)
SAMPLING_METHOD = (
    "test-set sampling uncertainty of a single run: half-width of the 95% Wilson score "
    "interval for the mean accuracy on n_test images"
)

Verdict = Literal["distinguishable", "not distinguishable", "not enough evidence"]


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float | None  # None when n < 2: one seed says nothing about spread
    high: float | None
    sd: float | None
    n: int
    clipped: bool = False  # the t-interval crossed 0 or 1 and was cut there


@dataclass(frozen=True)
class Paired:
    n: int  # shared seeds
    p_value: float | None
    mean_diff: float | None  # a - b over the shared seeds
    verdict: Verdict

    reason: str = ""  # why there is not enough evidence

    def evidence(self) -> str:
        if self.verdict == "not enough evidence":
            return self.reason
        return f"paired t-test, n={self.n}, {format_p(self.p_value)}"

    def describe(self) -> str:
        if self.verdict == "not enough evidence":
            return f"not enough evidence ({self.reason})"
        return f"{self.verdict} ({self.evidence()})"


def format_p(p: float | None) -> str:
    """'p=0.012'; never 'p=0': below 0.001 it reads 'p<0.001'."""
    if p is None:
        return "p –"
    return "p<0.001" if p < 0.001 else f"p={p:.2g}"


def t_interval(
    values: Sequence[float],
    confidence: float = CONFIDENCE,
    bounds: tuple[float, float] | None = (0.0, 1.0),
) -> Interval:
    """Mean and two-sided Student-t confidence interval of ``values``, clipped to ``bounds``
    (accuracies by default; None for an unbounded quantity)."""
    n = len(values)
    if n == 0:
        raise ValueError("t_interval of no values")
    mean = math.fsum(values) / n
    if n < 2:
        return Interval(mean, None, None, None, n)
    sd = statistics.stdev(values)
    half = _t_quantile((1 + confidence) / 2, n - 1) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    if bounds is None or (bounds[0] <= low and high <= bounds[1]):
        return Interval(mean, low, high, sd, n)
    return Interval(mean, max(low, bounds[0]), min(high, bounds[1]), sd, n, clipped=True)


def wilson_interval(p: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``p`` observed on ``n`` trials."""
    if n <= 0:
        raise ValueError("wilson_interval needs n > 0")
    from statistics import NormalDist

    z = NormalDist().inv_cdf((1 + confidence) / 2)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@functools.lru_cache(maxsize=64)
def _t_quantile(q: float, df: int) -> float:
    # scipy's ppf costs ~1 ms a call; a study has hundreds of groups but few distinct n.
    from scipy.stats import t

    return float(t.ppf(q, df))


def paired_test(a: Mapping[int, float], b: Mapping[int, float], alpha: float = ALPHA) -> Paired:
    """Is ``a`` different from ``b`` over the seeds both have? (two-sided paired t-test)

    No verdict where the data cannot carry one: under ``MIN_SEEDS`` shared seeds, or when every
    seed shows the same difference (zero variance, up to float noise: the t statistic is then
    0/0 or infinite and scipy answers p=0 or 2e-16)."""
    seeds = sorted(set(a) & set(b))
    n = len(seeds)
    diffs = [a[s] - b[s] for s in seeds]
    mean_diff = math.fsum(diffs) / n if n else None
    if n < MIN_SEEDS:
        why = f"{n} shared seed{'s' if n != 1 else ''}; a verdict needs {MIN_SEEDS}"
        return Paired(n, None, mean_diff, "not enough evidence", why)
    if max(diffs) - min(diffs) <= 1e-9:
        why = f"n={n}, the same difference on every seed: no spread to test against"
        return Paired(n, None, mean_diff, "not enough evidence", why)
    from scipy.stats import ttest_rel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue)
    if math.isnan(p):
        p = 1.0
    verdict: Verdict = "distinguishable" if p < alpha else "not distinguishable"
    return Paired(n, p, mean_diff, verdict)


def ranks(means: Mapping[str, float]) -> dict[str, float]:
    """1 for the highest mean; tied means share the average of their ranks."""
    order = sorted(means, key=lambda k: -means[k])
    out: dict[str, float] = {}
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and means[order[j + 1]] == means[order[i]]:
            j += 1
        for k in order[i : j + 1]:
            out[k] = (i + j) / 2 + 1
        i = j + 1
    return out


def mean_ranks(per_dataset: Sequence[Mapping[str, float]]) -> dict[str, tuple[float, int]]:
    """Backbone -> (mean rank, number of datasets it was ranked on)."""
    acc: dict[str, list[float]] = {}
    for table in per_dataset:
        for name, r in table.items():
            acc.setdefault(name, []).append(r)
    return {name: (math.fsum(rs) / len(rs), len(rs)) for name, rs in acc.items()}
