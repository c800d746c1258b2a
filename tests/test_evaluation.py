"""Evaluation statistics and the length toy with a computable optimum."""

import numpy as np
import pytest

from dera_t5x import evaluation


def test_summary_statistics():
    tokens = np.array([[5, 6, 1, 0], [7, 1, 0, 0]])
    log_probs = np.array([[-1.0, -2.0, -0.5, 0.0], [-1.0, -1.0, 0.0, 0.0]])
    ref = np.array([[-1.5, -2.0, -1.0, 0.0], [-1.0, -2.0, 0.0, 0.0]])
    out = evaluation.summarize(tokens, np.array([2.0, 1.0]), log_probs, ref)
    assert out["mean_length"] == pytest.approx(1.5)
    assert out["mean_reward"] == pytest.approx(1.5)
    assert out["kl"] == pytest.approx((1.0 + 1.0) / 2)
    assert out["mean_length_sem"] == pytest.approx(0.5)
    assert evaluation.win_rate([1, 2, 3], [1, 1, 4]) == pytest.approx(0.5)
    assert evaluation.relative_gap(11.0, 10.0) == pytest.approx(0.1)


def test_length_toy_is_exact_at_lambda_one_and_approximate_elsewhere():
    dera, exact = evaluation.length_toy(0.05, 64, beta=15.0, lam=1.0)
    assert dera == pytest.approx(exact, rel=1e-9)
    sft_mean = evaluation.length_toy(0.05, 64, beta=1e9, lam=1.0)[1]
    assert sft_mean == pytest.approx(sum(0.95 ** t for t in range(64)), rel=1e-6)
    dera, exact = evaluation.length_toy(0.05, 64, beta=15.0, lam=0.5)
    assert sft_mean < exact < 46.0
    assert 0.01 < abs(dera - exact) / exact < 0.2


def test_the_toy_matched_to_a_measured_sft_length():
    p = evaluation.fit_stop_probability(sum(0.95 ** t for t in range(64)), 64)
    assert p == pytest.approx(0.05, rel=1e-6)
    dera, exact = evaluation.predicted_lengths(28.0, 64, beta=8.0, lam=1.0)
    assert dera == pytest.approx(exact)
    sft = evaluation.predicted_lengths(28.0, 64, beta=1e9, lam=1.0)[1]
    assert sft == pytest.approx(28.0, rel=1e-6)
    dera, exact = evaluation.predicted_lengths(28.0, 64, beta=8.0, lam=0.25)
    assert 28.0 < exact < dera  # below lambda 1 DeRa overshoots the exact optimum
    with pytest.raises(ValueError, match="must lie in"):
        evaluation.fit_stop_probability(70.0, 64)


def test_tilted_optimum_matches_the_toy_on_its_own_samples():
    rng = np.random.default_rng(0)
    p_stop, cap, beta = 0.1, 40, 12.0
    # n >= 1 tokens, geometric, capped: the toy's SFT policy.
    lengths = np.minimum(rng.geometric(p_stop, size=200_000), cap)
    out = evaluation.tilted_optimum(lengths, beta)
    assert out["mean_length"] == pytest.approx(evaluation.length_toy(p_stop, cap, beta, 1.0)[1],
                                               rel=0.01)
    # At beta -> inf the optimum is SFT itself, objective E[n].
    far = evaluation.tilted_optimum(lengths, 1e9)
    assert far["objective"] == pytest.approx(lengths.mean(), rel=1e-6)
    assert far["ess"] == pytest.approx(len(lengths), rel=1e-6)
    assert out["objective"] > lengths.mean() and out["ess"] < len(lengths)


def test_gold_comparison_allows_a_share_of_the_gain_or_two_standard_errors_near_zero():
    def row(lam, mean, sem):
        return {"lambda": lam, "rewards": {"gold": [mean, sem]}}

    retrained = [row(0.0, 0.30, 0.01), row(1.0, 0.50, 0.01), row(2.0, 0.31, 0.01),
                 row(4.0, 0.60, 0.01)]
    dera = [row(0.0, 0.30, 0.01), row(1.0, 0.50, 0.01), row(2.0, 0.33, 0.01),
            row(4.0, 0.56, 0.01), row(8.0, 0.9, 0.01)]
    rows = evaluation.gold_comparison(dera, retrained)
    assert [r["lambda"] for r in rows] == [0.0, 1.0, 2.0, 4.0]  # lambda 8: nothing retrained
    by = {r["lambda"]: r for r in rows}
    # lambda 2: gain 0.01 is within 2 se of zero, so 2 se of the difference (0.028) applies.
    assert by[2.0]["near_zero_gain"] and by[2.0]["tolerance"] == pytest.approx(0.02 * 2 ** 0.5)
    assert by[2.0]["within"]
    # lambda 4: gain 0.30, tolerance 15% of it (0.045); the gap 0.04 passes, 0.05 would not.
    assert by[4.0]["tolerance"] == pytest.approx(0.045) and by[4.0]["within"]
    assert not evaluation.gold_comparison([row(4.0, 0.65, 0.01)], retrained)[0]["within"]
    with pytest.raises(ValueError, match="lambda 0"):
        evaluation.gold_comparison(dera, retrained[1:])
