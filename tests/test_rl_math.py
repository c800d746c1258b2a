"""The RL estimator pieces: KL estimators, per-token rewards, GAE, advantage
normalization on the length toy (a multi-step problem with an exact optimum),
config checks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dera_t5x import evaluation
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


def test_normalize_whitens_the_masked_tokens_and_zeroes_the_rest():
    rng = np.random.default_rng(0)
    advantages = jnp.asarray(rng.normal(3.0, 5.0, size=(3, 6)), jnp.float32)
    mask = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], jnp.float32)
    out = np.asarray(rl.normalize(advantages, mask))
    on = np.asarray(mask) > 0
    assert abs(out[on].mean()) < 1e-5 and abs(out[on].std() - 1.0) < 1e-3
    np.testing.assert_array_equal(out[~on], 0.0)
    # Order within the batch is kept (an affine map with a positive scale).
    assert np.all(np.diff(out[on][np.argsort(np.asarray(advantages)[on])]) > 0)


def _exact_mean_length(stop_logits):
    """Mean words of the tabular policy that ends at position t with
    probability sigmoid(stop_logits[t]) (always at the cap)."""
    survival = jnp.cumprod(jax.nn.sigmoid(-stop_logits))
    return float(jnp.sum(survival))


def _length_toy_rl(beta, p_stop, cap, *, normalize, estimator="k1", shift_rewards=False,
                   steps=250, batch=256):
    """REINFORCE through rl's estimator on the length toy: at each position t < cap
    a tabular policy ends the response (EOS) with probability sigmoid(theta_t),
    else emits a word; the reward is the number of words, credited per word,
    with the KL penalty to the reference (theta = logit(p_stop)) per token
    (k1, or "full": the exact KL of the stop decision, in the rewards and as
    `rl.kl_loss`). `shift_rewards` subtracts the batch's mean per-token reward
    before GAE (the wrong normalization). Returns the final policy's exact
    mean length."""
    config = rl.RLConfig(beta=beta, normalize_advantages=normalize, kl_estimator=estimator)
    theta_ref = jnp.full(cap, np.log(p_stop / (1 - p_stop)), jnp.float32)
    positions = jnp.arange(cap)
    optimizer = optax.adam(optax.linear_schedule(0.1, 0.0, steps))

    def log_probs(theta, words, mask):
        return jnp.where(words, jax.nn.log_sigmoid(-theta), jax.nn.log_sigmoid(theta)) * mask

    def log_softmax(theta):  # [1, cap, 2]: (stop, word) at each position
        return jnp.stack([jax.nn.log_sigmoid(theta), jax.nn.log_sigmoid(-theta)], -1)[None]

    @jax.jit
    def step(theta, opt_state, key):
        stop = jax.random.uniform(key, (batch, cap)) < jax.nn.sigmoid(theta)
        length = jnp.where(stop.any(1), jnp.argmax(stop, 1), cap)
        mask = (positions <= length[:, None]).astype(jnp.float32)  # the words and the EOS
        words = positions < length[:, None]
        old = log_probs(theta, words, mask)
        if estimator == "full":
            kl = rl.token_kl(log_softmax(theta), log_softmax(theta_ref)) * mask
        else:
            kl = rl.kl_per_token(old, log_probs(theta_ref, words, mask), estimator) * mask
        task = words.astype(jnp.float32)
        if shift_rewards:
            task = (task - jnp.sum(task * mask) / jnp.sum(mask)) * mask
        advantages, _, scale = rl.advantages_and_returns(config, task, kl,
                                                         jnp.zeros_like(mask), mask)

        def loss(th):
            out = rl.policy_loss(config, log_probs(th, words, mask), old, advantages, mask)[0]
            if estimator == "full":
                out += rl.kl_loss(log_softmax(th), log_softmax(theta_ref), mask, beta * scale)
            return out

        grads = jax.grad(loss)(theta)
        updates, opt_state = optimizer.update(grads, opt_state, theta)
        return optax.apply_updates(theta, updates), opt_state

    theta, opt_state = theta_ref, optimizer.init(theta_ref)
    for i in range(steps):
        theta, opt_state = step(theta, opt_state, jax.random.PRNGKey(i))
    return _exact_mean_length(theta)


@pytest.mark.parametrize("cap, beta", [(1, 0.5), (8, 2.0)])
def test_normalized_advantages_reach_the_exact_optimum_of_the_length_toy(cap, beta):
    """One step (cap 1) and many steps (cap 8), k1 and the "full" estimator:
    normalized advantages leave the optimum P*(n) ∝ P_sft(n) exp(n / beta)
    where it is; shifting the per-token rewards instead is a length penalty
    and lands far short of it."""
    p_stop = 0.25
    # evaluation.length_toy counts the stop as one more token (n >= 1).
    optimum = evaluation.length_toy(p_stop, cap + 1, beta, 1.0)[1] - 1
    sft = _exact_mean_length(jnp.full(cap, np.log(p_stop / (1 - p_stop))))
    assert optimum - sft > 0.1 * cap  # the start is far away
    for estimator in ("k1", "full"):
        for normalize in (False, True):
            reached = _length_toy_rl(beta, p_stop, cap, normalize=normalize, estimator=estimator)
            assert abs(reached - optimum) < 0.01 * cap, (estimator, normalize, reached, optimum)
    if cap > 1:
        shifted = _length_toy_rl(beta, p_stop, cap, normalize=True, shift_rewards=True)
        assert optimum - shifted > 0.2 * cap, (shifted, optimum)


def test_steps_for_beta_scales_below_the_reference_and_caps():
    assert rl.steps_for_beta(80, 2.0, None, None) == 80
    assert rl.steps_for_beta(80, 16.0, 8.0, 200) == 80
    assert rl.steps_for_beta(80, 4.0, 8.0, 200) == 160
    assert rl.steps_for_beta(80, 3.0, 8.0, None) == 214
    assert rl.steps_for_beta(80, 2.0, 8.0, 200) == 200


def test_the_policy_learning_rate_scales_down_above_the_reference_beta():
    assert rl.policy_learning_rate_scale(32.0, 8.0) == 0.25
    assert rl.policy_learning_rate_scale(4.0, 8.0) == 1.0
    assert rl.policy_learning_rate_scale(32.0, None) == 1.0
    params = {"policy": {"w": jnp.ones(2)}, "value_head": {"b": jnp.ones(())}}
    optimizer = rl.scale_policy_updates(optax.adam(1e-2), 0.25)
    updates, _ = optimizer.update(params, optimizer.init(params), params)
    np.testing.assert_allclose(updates["policy"]["w"], -0.25e-2, rtol=1e-4)
    np.testing.assert_allclose(updates["value_head"]["b"], -1e-2, rtol=1e-4)
