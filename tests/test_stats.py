"""cliprec.stats against brute-force references (plain loops, exhaustive sign flips) on seeded data."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from cliprec import stats
from cliprec.stats import (
    bootstrap_ci,
    bootstrap_counts,
    holm,
    paired_comparisons,
    sign_flips,
    student_t_quantile,
)


def test_bootstrap_ci_is_the_percentile_interval_of_resampled_means():
    rng = np.random.default_rng(3)
    values = np.stack([rng.random(40) < 0.3, rng.random(40)]).astype(float)  # a hit@k and an MRR-like row
    counts = np.concatenate(list(bootstrap_counts(40, 500, seed=7)))
    for row, (low, high) in zip(values, zip(*bootstrap_ci(values, 500, 0.9, seed=7), strict=True)):
        means = []
        for draw in counts:  # the reference: one resample at a time, by hand
            total = 0.0
            for i, c in enumerate(draw):
                total += c * row[i]
            means.append(total / 40)
        assert (low, high) == pytest.approx(tuple(np.quantile(means, [0.05, 0.95])), abs=1e-12)
    assert counts.sum(axis=1).tolist() == [40] * 500  # every resample draws n queries


def test_bootstrap_ci_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    covered = 0
    for trial in range(60):
        hits = (rng.random(200) < 0.3).astype(float)
        low, high = bootstrap_ci(hits, 2000, 0.95, seed=trial)
        covered += bool(low[0] <= 0.3 <= high[0])
    assert 51 <= covered <= 60  # 57 expected; binomial(60, 0.95) is inside this range with p > 0.99


def test_permutation_p_value_matches_the_exhaustive_sign_flip_distribution():
    rng = np.random.default_rng(1)
    new, old = rng.random(10), rng.random(10) * 0.8
    diff = new - old
    exact = [np.mean(np.array(signs) * diff) for signs in itertools.product((-1, 1), repeat=10)]
    observed = diff.mean()
    want_two = np.mean(np.abs(exact) >= abs(observed) - 1e-12)
    want_drop = np.mean(np.array(exact) <= observed + 1e-12)
    got = paired_comparisons(new, old, resamples=20_000, seed=0)[0]
    assert got.p_value == pytest.approx(want_two, abs=0.01)  # Monte Carlo error at 20k draws: ~0.002
    assert got.p_drop == pytest.approx(want_drop, abs=0.01)
    assert got.value == pytest.approx(observed) and got.queries == 10


def test_paired_comparison_of_hits_behaves_like_mcnemar():
    n = 300
    old = np.zeros(n)
    old[:60] = 1
    new = old.copy()
    new[60:100] = 1  # 40 queries won, 5 lost
    new[:5] = 0
    c = paired_comparisons(new, old, resamples=10_000, seed=0)[0]
    assert (c.better, c.worse, c.queries) == (40, 5, n)
    assert c.value == pytest.approx(35 / n) and c.ci_low > 0 and c.p_value < 0.001 and c.p_gain < 0.001
    assert c.p_drop > 0.99
    assert c.new_mean == pytest.approx(95 / n) and c.old_mean == pytest.approx(60 / n)


def test_identical_systems_are_not_significant():
    values = np.random.default_rng(2).random((3, 50))
    for c in paired_comparisons(values, values.copy(), resamples=2000, seed=0):
        assert c.value == 0 and c.ci_low == 0 and c.ci_high == 0 and c.p_value == 1.0
        assert c.better == c.worse == 0 and c.min_detectable == 0


def test_min_detectable_difference_is_the_80_percent_power_bound():
    diff = np.array([1.0, -1.0, 0.0, 0.0] * 25)
    c = paired_comparisons(diff, np.zeros(100), resamples=1000, seed=0)[0]
    assert c.min_detectable == pytest.approx(2.8 * np.std(diff, ddof=1) / 10)


def test_results_are_a_function_of_the_seed():
    a, b = np.random.default_rng(4).random((2, 2, 80))
    one, two, other = (paired_comparisons(a, b, 5000, seed=s) for s in (0, 0, 1))
    assert one == two and one != other
    assert set(np.unique(np.concatenate(list(sign_flips(50, 100, 0))))) == {-1.0, 1.0}


@pytest.mark.parametrize("n", [3, 37, 250])
def test_draws_in_blocks_equal_one_draw_so_memory_stays_flat(n, monkeypatch):
    # a big test set must not hold resamples x queries at once (1.2 GB at 15,000 queries); drawing in
    # blocks from one generator must give exactly the numbers of one big draw
    whole_counts = np.concatenate(list(bootstrap_counts(n, 1000, seed=5)))
    whole_flips = np.concatenate(list(sign_flips(n, 1000, seed=5)))
    a, b = np.random.default_rng(n).random((2, 3, n))
    whole = paired_comparisons(a, b, 1000, seed=5)
    monkeypatch.setattr(stats, "BLOCK_VALUES", 8 * n)  # blocks of 8 resamples
    blocks = list(bootstrap_counts(n, 1000, seed=5))
    assert max(len(block) for block in blocks) == 8 and len(blocks) == 125
    assert np.array_equal(np.concatenate(blocks), whole_counts)
    assert np.array_equal(np.concatenate(list(sign_flips(n, 1000, seed=5))), whole_flips)
    blocked = paired_comparisons(a, b, 1000, seed=5)
    for one, other in zip(blocked, whole, strict=True):  # BLAS may sum a block's products in another order
        assert one.__dict__ == pytest.approx(other.__dict__, rel=1e-12, abs=1e-15)


def test_holm_matches_a_hand_computed_example():
    # sorted 0.01, 0.02, 0.03, 0.04 times 4, 3, 2, 1 = 0.04, 0.06, 0.06, 0.04, then the running maximum
    adjusted = holm([0.03, 0.01, 0.04, 0.02])
    assert np.allclose(adjusted, [0.06, 0.04, 0.06, 0.06])
    assert holm([]).shape == (0,)
    assert np.all(holm([0.5, 0.9]) <= 1.0)


def test_holm_is_monotone_and_never_below_raw():
    rng = np.random.default_rng(3)
    p = rng.uniform(size=50) ** 3
    adjusted = holm(p)
    assert np.all(adjusted >= p - 1e-15)
    order = np.argsort(p)
    assert np.all(np.diff(adjusted[order]) >= -1e-15)


@pytest.mark.parametrize(
    ("q", "df", "table"),
    [(0.975, 4, 2.776445), (0.995, 4, 4.604095), (0.999, 4, 7.173182), (0.975, 30, 2.042272),
     (0.975, 1, 12.706205), (0.95, 2, 2.919986), (0.9975, 4, 5.597568)],
)  # fmt: skip
def test_student_t_quantile_matches_the_tables(q, df, table):
    assert student_t_quantile(q, df) == pytest.approx(table, rel=1e-5)


def test_student_t_quantile_refuses_what_it_cannot_give():
    with pytest.raises(ValueError, match="0.5 <= q < 1"):
        student_t_quantile(0.2, 4)
