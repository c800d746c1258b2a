"""The multi-seed statistics: objectives, tolerances, the objective check, plateaus."""

import json

import pytest

from dera_t5x import evaluation
from dera_t5x import seeds


def _row(lam, length, length_sd, objective, objective_se):
    return {"lambda": lam, "mean_length": length, "mean_length_sd": length_sd,
            "objective": objective, "objective_se": objective_se}


def test_objective_is_reward_minus_the_kl_at_beta_over_lambda_and_reward_at_zero():
    row = {"mean_reward": 40.0, "kl": 2.0}
    assert seeds.objective(row, 8.0, 2.0) == pytest.approx(40.0 - 4.0 * 2.0)
    assert seeds.objective(row, 8.0, 0.5) == pytest.approx(40.0 - 16.0 * 2.0)
    assert seeds.objective({"mean_reward": 28.0, "kl": 0.0}, 8.0, 0.0) == 28.0
    mean, sd, se = seeds.seed_statistics([1.0, 2.0, 3.0])
    assert (mean, sd, se) == pytest.approx((2.0, 1.0, 1.0 / 3 ** 0.5))


def test_compare_picks_the_larger_tolerance_and_flags_a_low_objective():
    dera = [_row(0.0, 30.0, 0.5, 30.0, 0.2), _row(2.0, 52.0, 1.0, 40.0, 0.5),
            _row(4.0, 60.0, 1.0, 30.0, 0.5)]
    retrained = [_row(0.0, 30.0, 0.5, 30.0, 0.2), _row(2.0, 50.0, 0.5, 45.0, 0.5),
                 _row(4.0, 55.0, 3.0, 27.0, 0.5)]
    rows = seeds.compare(dera, retrained, beta=8.0, max_decode_len=64)
    assert rows[0]["gap"] == 0 and rows[0]["within_tolerance"]
    assert "predicted_relative_gap" not in rows[0]  # lambda 0: the SFT model on both sides
    # lambda 2: 5% of 50 (2.5) beats 2 sd (1.0); the gap of 2 is within it.
    assert rows[1]["tolerance"] == pytest.approx(2.5)
    assert rows[1]["tolerance_rule"] == "5% of the retrained length"
    assert rows[1]["within_tolerance"] and not rows[1]["retrained_below_dera"]
    # lambda 4: 2 sd (6.0) beats 5% (2.75); the gap of 5 is within it; the
    # retrained objective is 3 below DeRa's, more than 2 se (2 * 0.71).
    assert rows[2]["tolerance"] == pytest.approx(6.0)
    assert rows[2]["tolerance_rule"] == "2 sd across the retrained seeds"
    assert rows[2]["within_tolerance"] and rows[2]["retrained_below_dera"]
    assert rows[2]["measured_direction"] == "DeRa longer"
    toy = evaluation.predicted_lengths(30.0, 64, 8.0, 4.0)
    assert rows[2]["predicted_relative_gap"] == pytest.approx((toy[0] - toy[1]) / toy[1])


def test_objective_plateau_tells_a_rising_run_from_a_flat_one(tmp_path):
    def write(name, means):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "metrics.jsonl").write_text("\n".join(json.dumps(
            {"step": 10 * (i + 1), "train/objective_mean": m, "train/objective_sd": 3.0,
             "train/objective_steps": 10.0}) for i, m in enumerate(means)))
        return seeds.objective_plateau(folder)

    # Per-step sd 3 over 10-step chunks: a window of 4 chunks has se 3 / sqrt(40).
    flat = write("flat", [40.0, 40.3, 39.8, 40.1] * 4)
    rising = write("rising", [20.0 + i for i in range(16)])
    assert flat["plateau"] and flat["steps"] == 160 and flat["logged"] == 16
    assert flat["final_objective"] == pytest.approx(40.05)
    assert not rising["plateau"] and rising["change"] == pytest.approx(4.0)
    assert rising["change_se"] > 3.0 * (2 / 40) ** 0.5  # chunk means spread adds to it
    assert write("short", [1.0, 2.0, 3.0])["plateau"] is None


def test_bad_seeds_are_refused_before_anything_runs(tmp_path):
    for bad in ((0,), (1, 1), (0, -1)):
        with pytest.raises(ValueError, match="at least two distinct integers"):
            seeds.run_seeds(str(tmp_path), seeds=bad, model_config=None,
                            task_name="xsum_bundled", feature_lengths={})
    assert not any(tmp_path.iterdir())
