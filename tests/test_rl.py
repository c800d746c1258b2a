"""RL against known optima and its safeguards (small models, seconds)."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dera_t5x import models
from dera_t5x.models.t5 import network
from dera_t5x.training import reward_model
from dera_t5x.training import rewards
from dera_t5x.training import rl

CONFIG = network.T5Config(vocab_size=8, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                          num_encoder_layers=1, num_decoder_layers=1,
                          mlp_activations=("gelu", "linear"), logits_via_embedding=False,
                          dropout_rate=0.0)
TABLE = jnp.array([0.0, 1.0, -0.5, 2.0, 0.3, -1.0, 1.5, 0.0])
REPO = pathlib.Path(__file__).resolve().parents[1]
PROMPTS = jnp.tile(jnp.array([[3, 4, 5, 1]], jnp.int32), (256, 1))


def _table_reward():
    """A one-step problem: the reward of a response is TABLE[first token]."""
    return rewards.Reward("table", lambda table, x, y: table[y[:, 0]], TABLE)


def _first_token_distribution(model, params):
    logits = model.logits(params, PROMPTS[:1], jnp.zeros((1, 1), jnp.int32))[0, 0]
    return jax.nn.softmax(models.exclude_padding(logits))


@pytest.mark.parametrize("beta, policy_loss, normalize, kl_estimator", [
    (0.5, "reinforce", False, "k1"), (2.0, "reinforce", False, "k1"), (1.0, "ppo", False, "k1"),
    (0.5, "reinforce", True, "full")])
def test_one_step_rl_converges_to_the_kl_regularized_optimum(beta, policy_loss, normalize,
                                                              kl_estimator):
    """Normalized advantages (a batch baseline and scale) and the exact
    per-token KL with its direct loss term keep the optimum."""
    model = models.EncoderDecoderModel(CONFIG)
    ref = model.init(jax.random.PRNGKey(0))
    config = rl.RLConfig(beta=beta, max_decode_len=1, policy_loss=policy_loss, ppo_epochs=2,
                         normalize_advantages=normalize, kl_estimator=kl_estimator)
    optimizer = rl.make_optimizer(policy_learning_rate=3e-3, value_learning_rate=1e-2)
    reward = _table_reward()
    steps = rl.make_step_functions(model, config, optimizer, reward)
    params = rl.init_params(jax.tree_util.tree_map(jnp.copy, ref), CONFIG.emb_dim)
    opt_state = optimizer.init(params)
    for i in range(300):
        params, opt_state, metrics = rl.rl_step(steps, config, params, opt_state, ref,
                                                reward.params, PROMPTS, jax.random.PRNGKey(i))
    pi_sft = _first_token_distribution(model, ref)
    optimum = jax.nn.softmax(models.exclude_padding(jnp.log(pi_sft) + TABLE / beta))
    pi = _first_token_distribution(model, params["policy"])
    assert 0.5 * float(jnp.abs(pi_sft - optimum).sum()) > 0.1  # the start is far away
    assert 0.5 * float(jnp.abs(pi - optimum).sum()) < 0.05
    assert metrics["kl"] > 0
    assert metrics["objective"] == pytest.approx(metrics["reward"] - beta * metrics["kl"],
                                                 rel=1e-5, abs=1e-5)


def test_kl_is_zero_when_the_policy_is_the_reference():
    model = models.EncoderDecoderModel(CONFIG)
    ref = model.init(jax.random.PRNGKey(0))
    config = rl.RLConfig(beta=0.1, max_decode_len=6, kl_estimator="k3")
    steps = rl.make_step_functions(model, config, rl.make_optimizer(), rewards.length_reward())
    params = rl.init_params(ref, CONFIG.emb_dim)
    prompts, _, responses = steps.rollout(params, PROMPTS[:16], jax.random.PRNGKey(0))
    batch = steps.score(params, ref, None, prompts, responses)
    assert float(jnp.sum(batch["length"])) > 16
    np.testing.assert_array_equal(batch["kl"], 0.0)


def test_runs_at_two_betas_share_compiled_steps_and_score_with_their_own_beta():
    model = models.EncoderDecoderModel(CONFIG)
    ref, policy = model.init(jax.random.PRNGKey(0)), model.init(jax.random.PRNGKey(1))
    optimizer, reward = rl.make_optimizer(), rewards.length_reward()
    steps = [rl.make_step_functions(model, rl.RLConfig(beta=beta, max_decode_len=4), optimizer,
                                    reward) for beta in (0.1, 2.0)]
    assert steps[0].rollout is steps[1].rollout and steps[0].update is steps[1].update
    assert steps[0].score.func is steps[1].score.func
    params = rl.init_params(policy, CONFIG.emb_dim)
    prompts, _, responses = steps[0].rollout(params, PROMPTS[:8], jax.random.PRNGKey(0))
    for beta, fns in zip((0.1, 2.0), steps):
        batch = fns.score(params, ref, None, prompts, responses)
        assert np.all(np.asarray(batch["kl"]) != 0)
        np.testing.assert_allclose(batch["objective"], batch["reward"] - beta * batch["kl"],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kl_estimator", ["k1", "full"])
def test_early_exit_and_trimmed_responses_give_the_same_step(kl_estimator):
    """Rollout early exit samples the same responses; scoring and updating them
    cut to the longest (rounded up to the bucket) gives the same step up to
    float rounding: the positions cut are padding."""
    model = models.EncoderDecoderModel(CONFIG)
    ref, policy = model.init(jax.random.PRNGKey(0)), model.init(jax.random.PRNGKey(1))
    optimizer, reward = rl.make_optimizer(policy_learning_rate=1e-2), rewards.length_reward()
    plain = rl.RLConfig(beta=0.1, max_decode_len=32, normalize_advantages=True,
                        kl_estimator=kl_estimator)
    fast = rl.RLConfig(**{**plain.__dict__, "chunk_size": 3, "response_bucket": 4})
    results = []
    for config in (plain, fast):
        steps = rl.make_step_functions(model, config, optimizer, reward)
        params = rl.init_params(jax.tree_util.tree_map(jnp.copy, policy), CONFIG.emb_dim)
        _, _, responses = steps.rollout(params, PROMPTS[:8], jax.random.PRNGKey(2))
        results.append((responses, steps.trim(responses),
                        rl.rl_step(steps, config, params, optimizer.init(params), ref, None,
                                   PROMPTS[:8], jax.random.PRNGKey(2))))
    (full_responses, untrimmed, (params, _, metrics)), (responses, trimmed, (fast_params, _,
                                                                              fast_metrics)) = results
    np.testing.assert_array_equal(responses, full_responses)
    np.testing.assert_array_equal(untrimmed, full_responses)
    longest = int(jnp.max(jax.vmap(lambda r: jnp.sum(r != 0))(responses)))
    assert longest < 28 and trimmed.shape[1] == -(-longest // 4) * 4
    np.testing.assert_array_equal(trimmed, responses[:, :trimmed.shape[1]])
    assert fast_metrics.keys() == metrics.keys()
    for name in metrics:
        assert fast_metrics[name] == pytest.approx(metrics[name], rel=1e-4, abs=1e-5), name
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           fast_params, params)


@pytest.mark.parametrize("kl_estimator", ["k1", "full"])
def test_prompts_encoded_once_give_the_same_step(kl_estimator):
    """With `encode_prompts_once` the rollout batch keeps one row per prompt and
    the policy, the reference and a learned reward read each prompt once for its
    samples: the same responses and the same step up to float rounding."""
    model = models.EncoderDecoderModel(CONFIG)
    ref, policy = model.init(jax.random.PRNGKey(0)), model.init(jax.random.PRNGKey(1))
    head = {"kernel": jax.random.normal(jax.random.PRNGKey(3), (CONFIG.emb_dim,)),
            "bias": jnp.zeros(())}
    reward = rewards.sum_of_rewards([rewards.length_reward(), reward_model.as_reward(
        model, {"model": model.init(jax.random.PRNGKey(4)), "head": head})])
    optimizer = rl.make_optimizer(policy_learning_rate=1e-2)
    plain = rl.RLConfig(beta=0.1, max_decode_len=12, num_samples=3,
                        normalize_advantages=True, kl_estimator=kl_estimator)
    results = []
    for config in (plain, rl.RLConfig(**{**plain.__dict__, "encode_prompts_once": True})):
        steps = rl.make_step_functions(model, config, optimizer, reward)
        params = rl.init_params(jax.tree_util.tree_map(jnp.copy, policy), CONFIG.emb_dim)
        results.append((steps.rollout(params, PROMPTS[:4], jax.random.PRNGKey(2)),
                        rl.rl_step(steps, config, params, optimizer.init(params), ref,
                                   reward.params, PROMPTS[:4], jax.random.PRNGKey(2))))
    ((prompts, _, responses), (params, _, metrics)), ((one_row, _, once),
                                                      (once_params, _, once_metrics)) = results
    assert prompts.shape == (12, 4) and one_row.shape == (4, 4)
    np.testing.assert_array_equal(once, responses)
    assert abs(metrics["reward"]) > 0.1  # the learned reward is part of the step
    for name in metrics:
        assert once_metrics[name] == pytest.approx(metrics[name], rel=1e-4, abs=1e-5), name
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           once_params, params)


def test_bad_rollout_cut_settings_are_refused():
    for name in ("chunk_size", "response_bucket"):
        for value in (0, 2.5):
            with pytest.raises(ValueError, match=f"RLConfig.{name} must be an integer >= 1"):
                rl.RLConfig(**{name: value})
    with pytest.raises(ValueError, match="RLConfig.encode_prompts_once must be True or False"):
        rl.RLConfig(encode_prompts_once="yes")


def test_value_loss_falls_on_a_fixed_batch():
    model = models.EncoderDecoderModel(CONFIG)
    ref = model.init(jax.random.PRNGKey(0))
    config = rl.RLConfig(beta=0.1, max_decode_len=6)
    optimizer = rl.make_optimizer(policy_learning_rate=0.0, value_learning_rate=1e-2)
    steps = rl.make_step_functions(model, config, optimizer, rewards.length_reward())
    params = rl.init_params(ref, CONFIG.emb_dim)
    opt_state = optimizer.init(params)
    prompts, _, responses = steps.rollout(params, PROMPTS[:32], jax.random.PRNGKey(0))
    batch = steps.score(params, ref, None, prompts, responses)
    losses = []
    for _ in range(50):
        params, opt_state, metrics = steps.update(params, opt_state, batch)
        losses.append(float(metrics["value_loss"]))
    assert losses[-1] < 0.5 * losses[0]


def test_a_nan_reward_skips_the_batch():
    model = models.EncoderDecoderModel(CONFIG)
    ref = model.init(jax.random.PRNGKey(0))
    config = rl.RLConfig(beta=0.1, max_decode_len=3)
    nan_reward = rewards.Reward("nan", lambda p, x, y: jnp.full(y.shape[:1], jnp.nan))
    optimizer = rl.make_optimizer(policy_learning_rate=1e-2)
    steps = rl.make_step_functions(model, config, optimizer, nan_reward)
    params = rl.init_params(jax.tree_util.tree_map(jnp.copy, ref), CONFIG.emb_dim)
    opt_state = optimizer.init(params)
    new_params, _, metrics = rl.rl_step(steps, config, params, opt_state, ref, None,
                                        PROMPTS[:8], jax.random.PRNGKey(0))
    assert metrics is None
    jax.tree_util.tree_map(np.testing.assert_array_equal, new_params, params)


def test_the_skipped_batch_counter_survives_a_resume(tmp_path):
    """Two runs of the same model_dir (the second resumes at step 2): the count of
    batches skipped for a non-finite reward goes on from the checkpoint."""
    model = models.EncoderDecoderModel(network.T5Config(**{**CONFIG.__dict__,
                                                           "vocab_size": 4096}))
    ref = model.init(jax.random.PRNGKey(0))
    nan_reward = rewards.Reward("nan", lambda p, x, y: jnp.full(y.shape[:1], jnp.nan))
    for num_steps in (2, 4):
        rl.train_rl(str(tmp_path), model=model, params_ref=ref, reward=nan_reward,
                    config=rl.RLConfig(beta=0.1, max_decode_len=3), task_name="xsum_bundled",
                    feature_lengths={"inputs": 16, "targets": 8}, batch_size=2,
                    num_steps=num_steps, checkpoint_every=1)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    skipped = {line["step"]: line["train/skipped_batches"] for line in lines}
    assert skipped[2] == 2.0 and skipped[4] == 4.0


def test_a_reference_of_another_architecture_is_refused(tmp_path):
    model = models.EncoderDecoderModel(CONFIG)
    other = models.EncoderDecoderModel(network.T5Config(**{**CONFIG.__dict__, "emb_dim": 24}))
    with pytest.raises(ValueError, match="differ in"):
        rl.train_rl(str(tmp_path), model=model, params_ref=other.init(jax.random.PRNGKey(0)),
                    reward=rewards.length_reward(), config=rl.RLConfig(beta=0.1),
                    task_name="xsum_bundled",
                    feature_lengths={"inputs": 16, "targets": 8}, num_steps=1)
    assert not (tmp_path / "checkpoints").exists()
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        rl.train_rl(str(tmp_path), model=model, params_ref=model.init(jax.random.PRNGKey(0)),
                    reward=rewards.length_reward(), config=rl.RLConfig(beta=0.0),
                    task_name="xsum_bundled",
                    feature_lengths={"inputs": 16, "targets": 8}, num_steps=1)


_EIGHT_DEVICES = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from dera_t5x import models, partitioning
    from dera_t5x.models.t5 import network
    from dera_t5x.training import rewards, rl

    assert jax.device_count() == 8
    config = network.T5Config(vocab_size=64, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64,
                              num_encoder_layers=1, num_decoder_layers=1,
                              mlp_activations=("gelu", "linear"), logits_via_embedding=False,
                              dropout_rate=0.0)
    model = models.EncoderDecoderModel(config)
    ref = model.init(jax.random.PRNGKey(0))
    prompts = np.random.default_rng(0).integers(2, 64, (8, 10)).astype(np.int32)
    rl_config = rl.RLConfig(beta=0.1, max_decode_len=6, num_samples=2)
    optimizer = rl.make_optimizer(policy_learning_rate=1e-2, value_learning_rate=1e-2)
    steps = rl.make_step_functions(model, rl_config, optimizer, rewards.length_reward())

    def run(partitioner):
        params = rl.init_params(jax.tree_util.tree_map(jnp.copy, ref), config.emb_dim)
        opt_state = optimizer.init(params)
        ref_params, batch = ref, prompts
        if partitioner is not None:
            params = partitioner.shard_params(params)
            opt_state = jax.device_put(opt_state, partitioner.tree_shardings(opt_state, params))
            ref_params = partitioner.shard_params(ref)
            batch = partitioner.shard_batch({"x": prompts})["x"]
        history = []
        for i in range(3):
            params, opt_state, metrics = rl.rl_step(steps, rl_config, params, opt_state,
                                                    ref_params, None, batch,
                                                    jax.random.PRNGKey(i))
            history.append((metrics["reward"], metrics["kl"], metrics["value_loss"]))
        return params, history

    reference, ref_history = run(None)
    assert ref_history[-1][1] != 0.0  # the policy has moved off the reference
    for shape in ((2, 4), (4, 2)):
        params, history = run(partitioning.Partitioner(shape, model.param_axes))
        q = params["policy"]["encoder"]["layers_0"]["attention"]["query"]["kernel"]
        assert q.sharding.spec == P(None, "model"), q.sharding.spec
        np.testing.assert_allclose(history, ref_history, rtol=1e-4, atol=1e-5)
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                    rtol=1e-4, atol=1e-5), params, reference)
        print(shape, "ok", history[-1])
    # Prompts encoded once for their samples, on the mesh: the same steps.
    rl_config = rl.RLConfig(beta=0.1, max_decode_len=6, num_samples=2, encode_prompts_once=True)
    steps = rl.make_step_functions(model, rl_config, optimizer, rewards.length_reward())
    params, history = run(partitioning.Partitioner((4, 2), model.param_axes))
    np.testing.assert_allclose(history, ref_history, rtol=1e-4, atol=1e-5)
    print("encoded once", "ok", history[-1])
    # A decoder-only policy on right-padded prompts with prompt_lengths (split over
    # 'data' with them), through train_rl: the same params.
    import tempfile
    from dera_t5x.models.decoder_only import network as decoder_only
    model = models.for_config(decoder_only.DecoderOnlyConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
        num_kv_heads=2, head_dim=8, max_position_embeddings=32, eos_token_ids=(2,)))
    ref = model.init(jax.random.PRNGKey(0))
    rng = np.random.default_rng(1)
    arrays = {"inputs": rng.integers(3, 40, (16, 6)).astype(np.int32),
              "prompt_lengths": rng.integers(1, 7, 16).astype(np.int32)}
    trained = []
    for mesh_shape in (None, (2, 4)):
        with tempfile.TemporaryDirectory() as model_dir:
            trained.append(rl.train_rl(
                model_dir, model=model, params_ref=ref, prompts=arrays,
                reward=rewards.length_reward(eos_ids=model.eos_ids), batch_size=8,
                num_steps=3, checkpoint_every=3, mesh_shape=mesh_shape,
                config=rl.RLConfig(beta=0.1, max_decode_len=6), optimizer=optimizer))
    assert not np.allclose(trained[0]["lm_head"]["kernel"], ref["lm_head"]["kernel"])
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
        np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5), trained[1], trained[0])
    print("decoder-only", "ok")
""")


@pytest.mark.slow
def test_rl_steps_on_eight_devices_match_one():
    """Policy, value head, optimizer state and reference on a (data, model)
    mesh, prompts split over 'data': the same rollouts, metrics and params,
    also with the prompts encoded once for their samples, and for a
    decoder-only policy trained on prompt arrays."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(" ok ") == 3 and "decoder-only ok" in result.stdout, result.stdout
