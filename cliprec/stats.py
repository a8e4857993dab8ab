"""Uncertainty of retrieval metrics: bootstrap confidence intervals and paired comparisons over queries.

Every metric here is a mean over test queries of a per-query value (hit@k, 1/rank, 1/log2(rank + 1)),
so resampling queries is the natural bootstrap (Efron): a resample is a multinomial count vector, and
the resampled means of all metrics are one matrix product. Comparisons are paired, query by query
(the same test set scored by two models, e.g. LoRA and zero-shot):

- the difference's CI is the paired bootstrap percentile interval (the same resamples for both);
- its p-value comes from a sign-flip permutation test on the per-query differences: under the null
  that the two models are exchangeable on each query, each difference is as likely negated. For hit@k
  this is an exact-in-the-limit McNemar test. Two-sided for reports, one-sided for the CI gate.

All draws come from `numpy.random.default_rng([seed, salt])`, so a result is a pure function of the
ranks, the seed and the number of resamples.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np

SALT_BOOTSTRAP = 1  # different streams for the bootstrap and the permutation test
SALT_PERMUTE = 2
Z_POWER = 2.8  # z_{0.975} + z_{0.80}: a two-sided 5 % test with 80 % power


@dataclass(frozen=True)
class Comparison:
    """new - old over paired queries: mean, bootstrap CI, permutation p-values, query counts."""

    new_mean: float
    old_mean: float
    value: float
    ci_low: float
    ci_high: float
    p_value: float  # two-sided
    p_drop: float  # one-sided, H1: new < old
    p_gain: float  # one-sided, H1: new > old
    better: int  # queries where new > old
    worse: int  # queries where new < old
    queries: int
    min_detectable: float  # |difference| a test of this size finds with 80 % power at 5 % (from the
    # observed spread of the per-query differences)

    def as_dict(self) -> dict[str, float | int]:
        """JSON-ready, floats rounded to 6 decimals."""
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}


BLOCK_VALUES = 2**22  # resamples x queries drawn at a time (32 MB of float64): memory stays flat with n


def _block_rows(n: int, resamples: int) -> int:
    """Resamples per block: a multiple of 4 (so int8 draws never leave a buffered byte behind)."""
    return min(resamples, max(4, BLOCK_VALUES // max(n, 1) // 4 * 4))


def bootstrap_counts(n: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Blocks of the (resamples, n) multinomial counts: how often each query is drawn in each resample.

    One generator draws the blocks in turn, so the concatenated blocks equal one (resamples, n) draw.
    """
    rng = np.random.default_rng([seed, SALT_BOOTSTRAP])
    rows = _block_rows(n, resamples)
    for start in range(0, resamples, rows):
        yield rng.multinomial(n, np.full(n, 1.0 / n), size=min(rows, resamples - start)).astype(np.float64)


def bootstrap_ci(
    values: np.ndarray, resamples: int = 10_000, confidence: float = 0.95, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile CI of the mean of each row of `values` (m metrics x n queries): (low, high), each (m,)."""
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    n = values.shape[1]
    if n == 0:
        nan = np.full(len(values), np.nan)
        return nan, nan
    means = np.concatenate([c @ values.T / n for c in bootstrap_counts(n, resamples, seed)])  # (resamples, m)
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail], axis=0)
    return low, high


def sign_flips(n: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Blocks of (resamples, n) random signs +-1 for the permutation test (one generator, as above)."""
    rng = np.random.default_rng([seed, SALT_PERMUTE])
    rows = _block_rows(n, resamples)
    for start in range(0, resamples, rows):
        size = (min(rows, resamples - start), n)
        yield rng.integers(0, 2, size=size, dtype=np.int8).astype(np.float64) * 2.0 - 1.0


def paired_comparisons(
    new: np.ndarray, old: np.ndarray, resamples: int = 10_000, confidence: float = 0.95, seed: int = 0
) -> list[Comparison]:
    """Comparison of each metric row of `new` against the same row of `old` (both m x n, paired by column)."""
    new = np.atleast_2d(np.asarray(new, dtype=np.float64))
    old = np.atleast_2d(np.asarray(old, dtype=np.float64))
    if new.shape != old.shape:
        raise ValueError(f"paired values need the same shape, got {new.shape} and {old.shape}")
    diff = new - old
    m, n = diff.shape
    if n == 0:
        return [Comparison(*(np.nan,) * 8, 0, 0, 0, np.nan) for _ in range(m)]
    observed = diff.mean(axis=1)
    low, high = bootstrap_ci(diff, resamples, confidence, seed)
    flipped = np.concatenate([f @ diff.T / n for f in sign_flips(n, resamples, seed)])  # means under H0
    eps = 1e-12 * np.maximum(1.0, np.abs(observed))  # an observed mean is among the flips it equals
    extreme = (np.abs(flipped) >= np.abs(observed) - eps).sum(axis=0)
    as_low = (flipped <= observed + eps).sum(axis=0)
    as_high = (flipped >= observed - eps).sum(axis=0)
    sd = diff.std(axis=1, ddof=1) if n > 1 else np.zeros(m)
    out = []
    for i in range(m):
        out.append(
            Comparison(
                new_mean=float(new[i].mean()),
                old_mean=float(old[i].mean()),
                value=float(observed[i]),
                ci_low=float(low[i]),
                ci_high=float(high[i]),
                p_value=float((1 + extreme[i]) / (1 + resamples)),
                p_drop=float((1 + as_low[i]) / (1 + resamples)),
                p_gain=float((1 + as_high[i]) / (1 + resamples)),
                better=int((diff[i] > 0).sum()),
                worse=int((diff[i] < 0).sum()),
                queries=n,
                min_detectable=float(Z_POWER * sd[i] / np.sqrt(n)),
            )
        )
    return out


def holm(p_values: list[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values: reject where adjusted < alpha keeps the family-wise error <= alpha.

    Holm controls the chance of any false discovery among all m tests, under any dependence between them
    (the metrics of one run are strongly correlated), and is uniformly more powerful than Bonferroni.
    """
    p = np.asarray(p_values, dtype=np.float64)
    m = len(p)
    if m == 0:
        return p
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out = np.empty(m)
    out[order] = np.minimum(stepped, 1.0)
    return out


def student_t_quantile(q: float, df: int) -> float:
    """The q-quantile (q >= 0.5) of Student's t with `df` degrees of freedom, by bisection on its CDF.

    The CDF is integrated numerically (Simpson's rule on the density, exact to ~1e-9 here), so that the
    gate needs no SciPy for the one quantile a handful of training seeds call for.
    """
    if not 0.5 <= q < 1 or df < 1:
        raise ValueError(f"need 0.5 <= q < 1 and df >= 1, got q={q}, df={df}")
    if df == 1:  # Cauchy: in closed form (its density's u^(-1/2) would defeat Simpson's rule below)
        return math.tan(math.pi * (q - 0.5))
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def upper_tail(x: float) -> float:  # P(T > x) for x >= 0: integrate the density over [x, inf) as
        # u = 1 / (1 + t^2/df), which maps it to (0, u(x)] where the integrand is smooth
        u = np.linspace(0.0, df / (df + x * x), 20_001)
        # with t = sqrt(df (1 - u) / u): density dt = 0.5 sqrt(df) u^(df/2 - 1) (1 - u)^(-1/2) du
        with np.errstate(divide="ignore", invalid="ignore"):
            f = 0.5 * math.sqrt(df) * np.exp(log_norm) * u ** (df / 2 - 1) * (1 - u) ** -0.5
        f[~np.isfinite(f)] = 0.0
        h = u[1] - u[0]
        return float(h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum()))

    low, high = 0.0, 1.0
    while upper_tail(high) > 1 - q:
        high *= 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if upper_tail(mid) > 1 - q else (low, mid)
    return (low + high) / 2
