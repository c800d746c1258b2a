"""The RL estimator pieces: KL estimators, per-token rewards, GAE, config checks."""

import jax.numpy as jnp
import numpy as np
import pytest

from dera_t5x.training import rewards
from dera_t5x.training import rl


def test_kl_estimators_vanish_when_policy_equals_reference():
    lp = jnp.asarray(np.log(np.random.default_rng(0).uniform(0.1, 1.0, size=(3, 5))))
    for estimator in ("k1", "k3"):
        np.testing.assert_array_equal(rl.kl_per_token(lp, lp, estimator), 0.0)
    k3 = rl.kl_per_token(lp, lp - 0.3, "k3")
    assert np.all(np.asarray(k3) > 0)  # k3 is non-negative, k1 here is +0.3
    np.testing.assert_allclose(rl.kl_per_token(lp, lp - 0.3, "k1"), 0.3, rtol=1e-6)


def test_token_rewards_subtract_the_kl_penalty_on_response_tokens():
    mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0]], jnp.float32)
    task = rewards.at_last_token(jnp.array([10.0, 5.0]), mask > 0)
    out = rl.token_rewards(task, jnp.ones((2, 4)), mask, beta=0.5)
    np.testing.assert_allclose(out, [[-0.5, -0.5, 9.5, 0.0], [4.5, 0.0, 0.0, 0.0]])


def test_length_reward_counts_tokens_before_eos_and_credits_each():
    responses = jnp.array([[5, 6, 7, 1, 0], [5, 1, 0, 0, 0], [4, 4, 4, 4, 4]])
    reward = rewards.length_reward(scale=0.5)
    np.testing.assert_allclose(reward(None, responses), [1.5, 0.5, 2.5])
    per_token = reward.token_rewards(None, None, responses)
    np.testing.assert_allclose(per_token[0], [0.5, 0.5, 0.5, 0.0, 0.0])
    np.testing.assert_allclose(jnp.sum(per_token, 1), reward(None, responses))


def test_gae_with_lambda_one_is_return_to_go_minus_value():
    rng = np.random.default_rng(0)
    rewards = jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)
    values = jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)
    mask = jnp.array([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], jnp.float32)
    advantages, returns = rl.gae(rewards * mask, values, mask, 1.0)
    return_to_go = np.cumsum((rewards * mask)[:, ::-1], axis=1)[:, ::-1] * mask
    np.testing.assert_allclose(returns, return_to_go, atol=1e-5)
    np.testing.assert_allclose(advantages, (return_to_go - values) * mask, atol=1e-5)
    # lambda 0: the one-step TD error.
    advantages0, _ = rl.gae(rewards * mask, values, mask, 0.0)
    v = np.asarray(values * mask)
    td = (np.asarray(rewards * mask) + np.concatenate([v[:, 1:], np.zeros((2, 1))], 1) - v)
    np.testing.assert_allclose(advantages0, td * np.asarray(mask), atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    ({"beta": 0.0}, "beta must be a finite number > 0"),
    ({"beta": -1.0}, "beta must be a finite number > 0"),
    ({"beta": float("nan")}, "beta must be a finite number > 0"),
    ({"kl_estimator": "k2"}, "kl_estimator"),
    ({"policy_loss": "a2c"}, "policy_loss"),
    ({"gae_lambda": 1.5}, "gae_lambda"),
    ({"num_samples": 0}, "num_samples"),
])
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rl.RLConfig(**kwargs)
