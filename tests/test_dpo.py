"""DPO: the losses against their formulas, the optimum they reach, the trainer, the pairs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import t5_factories
from dera_t5x import models
from dera_t5x.models.decoder_only import network as decoder_only_network
from dera_t5x.training import dpo
from dera_t5x.training import preference_pairs
from dera_t5x.training import rewards

LOGPS = (np.array([-3.0, -5.0, -2.5, -4.0]), np.array([-4.0, -4.5, -6.0, -1.0]),
         np.array([-3.5, -5.5, -3.0, -3.0]), np.array([-3.8, -4.0, -5.0, -2.0]))


def _log_sigmoid(x):
    return -np.log1p(np.exp(-x))


@pytest.mark.parametrize("loss_type", dpo.LOSS_TYPES)
def test_losses_and_rewards_equal_their_formulas(loss_type):
    beta, eps = 0.3, 0.1
    pc, pr, rc, rr = LOGPS
    delta = (pc - rc) - (pr - rr)
    want = {"sigmoid": -(1 - eps) * _log_sigmoid(beta * delta) - eps * _log_sigmoid(-beta * delta),
            "hinge": np.maximum(0.0, 1 - beta * delta),
            "ipo": (delta - 1 / (2 * beta)) ** 2}[loss_type]
    losses, chosen, rejected = dpo.dpo_loss(*map(jnp.asarray, LOGPS), beta=beta,
                                            loss_type=loss_type, label_smoothing=eps)
    np.testing.assert_allclose(losses, want, rtol=1e-5)
    np.testing.assert_allclose(chosen, beta * (pc - rc), rtol=1e-5)
    np.testing.assert_allclose(rejected, beta * (pr - rr), rtol=1e-5)


@pytest.mark.parametrize("loss_type", dpo.LOSS_TYPES)
def test_the_gradient_equals_finite_differences(loss_type):
    with jax.enable_x64():
        args = [jnp.asarray(x, jnp.float64) for x in LOGPS]

        def total(pc, pr):
            return jnp.sum(dpo.dpo_loss(pc, pr, args[2], args[3], beta=0.7,
                                        loss_type=loss_type, label_smoothing=0.2)[0])

        grads = jax.grad(total, argnums=(0, 1))(args[0], args[1])
        h = 1e-6
        for which, grad in enumerate(grads):
            for i in range(4):
                step = jnp.zeros(4, jnp.float64).at[i].set(h)
                plus = [args[0], args[1]]
                minus = [args[0], args[1]]
                plus[which] = plus[which] + step
                minus[which] = minus[which] - step
                numeric = (total(*plus) - total(*minus)) / (2 * h)
                np.testing.assert_allclose(grad[i], numeric, rtol=1e-5, atol=1e-8)


def test_dpo_reaches_the_kl_regularized_optimum_on_a_one_step_problem():
    """Responses are single tokens of a 6-token vocabulary, pairs are drawn from
    pi_ref and labelled by Bradley-Terry at tau; the exact expected loss over all
    ordered pairs, minimized, gives softmax(log pi_ref + r / (tau * beta))."""
    log_ref = jax.nn.log_softmax(jnp.array([0.5, -0.3, 1.2, 0.0, -1.0, 0.4]))
    reward = jnp.array([1.0, 3.0, 0.0, 2.0, 4.0, 1.5])
    tau, beta = 2.0, 0.5
    optimum = jax.nn.softmax(log_ref + reward / (tau * beta))
    i, j = np.meshgrid(np.arange(6), np.arange(6), indexing="ij")
    i, j = i.ravel(), j.ravel()
    weight = jnp.exp(log_ref[i] + log_ref[j])
    preference = jax.nn.sigmoid((reward[i] - reward[j]) / tau)  # P(i preferred to j)

    def expected_loss(logits):
        log_pi = jax.nn.log_softmax(logits)
        losses, _, _ = dpo.dpo_loss(log_pi[i], log_pi[j], log_ref[i], log_ref[j], beta=beta,
                                    label_smoothing=1.0 - preference)
        return jnp.sum(weight * losses)

    logits = log_ref
    optimizer = optax.adam(0.05)
    state = optimizer.init(logits)
    step = jax.jit(lambda lg, st: optimizer.update(jax.grad(expected_loss)(lg), st, lg))
    for _ in range(3000):
        updates, state = step(logits, state)
        logits = optax.apply_updates(logits, updates)
    pi = jax.nn.softmax(logits)
    assert 0.5 * float(jnp.abs(jnp.exp(log_ref) - optimum).sum()) > 0.2  # far at the start
    assert 0.5 * float(jnp.abs(pi - optimum).sum()) < 0.05


@pytest.fixture(scope="module")
def micro():
    config = t5_factories.tiny_config(vocab_size=32)
    model = models.EncoderDecoderModel(config)
    params = model.init(jax.random.PRNGKey(0))
    prompts = np.random.default_rng(0).integers(2, 32, size=(24, 6)).astype(np.int32)
    prompts[:, -1] = 1
    pairs, dropped = preference_pairs.build(model, params, prompts, rewards.length_reward(),
                                            tau=2.0, max_decode_len=6, batch_size=8, seed=0)
    return model, params, pairs, dropped


def test_pairs_are_labelled_by_their_rewards(micro):
    model, params, pairs, dropped = micro
    assert len(pairs["inputs"]) + dropped == 24 and len(pairs["inputs"]) >= 16
    assert not np.any(np.all(pairs["chosen"] == pairs["rejected"], axis=1))
    # Bradley-Terry draws: the longer response wins more often than not, not always.
    wins = pairs["chosen_reward"] > pairs["rejected_reward"]
    ties = pairs["chosen_reward"] == pairs["rejected_reward"]
    assert wins.sum() > (~wins & ~ties).sum()
    np.testing.assert_allclose(pairs["chosen_reward"],
                               rewards.response_length(pairs["chosen"]), rtol=0)
    soft, _ = preference_pairs.build(model, params, pairs["inputs"][:8], rewards.length_reward(),
                                     tau=2.0, labels="soft", max_decode_len=6, seed=1)
    want = 1 / (1 + np.exp(-(soft["chosen_reward"] - soft["rejected_reward"]) / 2.0))
    np.testing.assert_allclose(soft["preference"], want, rtol=1e-5)
    assert np.all(soft["preference"] >= 0.5)


def test_several_pairs_per_prompt_are_held_out_together(micro):
    model, params, _, _ = micro
    prompts = np.random.default_rng(1).integers(2, 32, size=(10, 6)).astype(np.int32)
    pairs, dropped = preference_pairs.build(model, params, prompts, rewards.length_reward(),
                                            tau=2.0, max_decode_len=6, pairs_per_prompt=3,
                                            seed=0)
    assert len(pairs["inputs"]) + dropped == 30
    # Independent draws: the pairs of one prompt are not copies of each other.
    first = pairs["inputs"][0]
    same_prompt = np.all(pairs["inputs"] == first, axis=1)
    assert len({pairs["chosen"][i].tobytes() for i in np.flatnonzero(same_prompt)}) > 1
    train, held_out = preference_pairs.split(pairs, 0.3, seed=0)
    assert len(train["inputs"]) + len(held_out["inputs"]) == len(pairs["inputs"])
    train_prompts = {row.tobytes() for row in train["inputs"]}
    assert held_out["inputs"].shape[0] > 0
    assert not any(row.tobytes() in train_prompts for row in held_out["inputs"])
    with pytest.raises(ValueError, match="pairs_per_prompt"):
        preference_pairs.build(model, params, prompts, rewards.length_reward(), tau=2.0,
                               max_decode_len=6, pairs_per_prompt=0)


def test_pairs_are_cached_by_their_settings(micro, tmp_path):
    _, _, pairs, _ = micro
    path = tmp_path / "pairs.jsonl"
    calls = []

    def compute():
        calls.append(1)
        return pairs, 0

    first = preference_pairs.cached(path, {"tau": 2.0}, compute,
                                    texts=lambda rows: [str(len(r)) for r in rows])
    again = preference_pairs.cached(path, {"tau": 2.0}, compute)
    assert len(calls) == 1
    for name in dpo.PAIR_FEATURES:
        np.testing.assert_array_equal(first[name], again[name])
    record = json.loads(path.read_text().splitlines()[1])
    assert {"prompt", "chosen_text", "rejected_text"} <= set(record)
    preference_pairs.cached(path, {"tau": 1.0}, compute)
    assert len(calls) == 2


def test_training_resumes_bit_exactly_and_learns_the_preferences(micro, tmp_path):
    model, params, pairs, _ = micro
    kwargs = dict(model=model, params_ref=params, pairs=pairs, beta=0.5, batch_size=8, seed=0,
                  optimizer=optax.adam(1e-2), checkpoint_every=2)
    whole = dpo.train_dpo(str(tmp_path / "whole"), num_steps=6, **kwargs)
    dpo.train_dpo(str(tmp_path / "parts"), num_steps=2, **kwargs)
    parts = dpo.train_dpo(str(tmp_path / "parts"), num_steps=6, **kwargs)
    jax.tree_util.tree_map(np.testing.assert_array_equal, whole, parts)
    before = dpo.preference_accuracy(model, params, params, pairs, beta=0.5)
    after = dpo.preference_accuracy(model, whole, params, pairs, beta=0.5)
    assert before == pytest.approx(0.0) and after > 0.7  # a fresh policy ties every pair
    lines = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text()
             .splitlines()]
    assert {"train/rewards/chosen", "train/rewards/rejected", "train/rewards/accuracies",
            "train/rewards/margins", "train/logps/chosen", "train/logps/rejected"} <= set(lines[-1])


def test_reference_per_step_gives_the_same_training(micro, tmp_path):
    model, params, pairs, _ = micro
    kwargs = dict(model=model, params_ref=params, pairs=pairs, beta=0.5, batch_size=8, seed=0,
                  optimizer=optax.adam(1e-2), num_steps=3)
    cached = dpo.train_dpo(str(tmp_path / "cached"), **kwargs)
    per_step = dpo.train_dpo(str(tmp_path / "per_step"), reference_per_step=True, **kwargs)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                           cached, per_step)


def test_update_scale_is_a_learning_rate_scale(micro, tmp_path):
    model, params, pairs, _ = micro
    kwargs = dict(model=model, params_ref=params, pairs=pairs, beta=0.5, batch_size=8, seed=0,
                  num_steps=2)
    scaled = dpo.train_dpo(str(tmp_path / "scaled"), optimizer=optax.adam(1e-2),
                           update_scale=2.0, **kwargs)
    doubled = dpo.train_dpo(str(tmp_path / "doubled"), optimizer=optax.adam(2e-2), **kwargs)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                           scaled, doubled)


@pytest.mark.parametrize("change, message", [
    ({"beta": 0.0}, "beta must be a finite number > 0"),
    ({"update_scale": -1.0}, "update_scale must be a finite number > 0"),
    ({"loss_type": "kto"}, "loss_type must be one of"),
    ({"same": True}, "identical chosen and rejected"),
    ({"empty": True}, "empty chosen response"),
    ({"preference": 1.5}, "probabilities in"),
])
def test_bad_pairs_and_settings_are_refused_before_anything_is_written(micro, tmp_path, change,
                                                                       message):
    model, params, pairs, _ = micro
    pairs = {k: np.array(v) for k, v in pairs.items()}
    if change.pop("same", False):
        pairs["rejected"][3] = pairs["chosen"][3]
    if change.pop("empty", False):
        pairs["chosen"][2] = 0  # padding only: no token at all
    if "preference" in change:
        pairs["preference"][0] = change.pop("preference")
    with pytest.raises(ValueError, match=message):
        dpo.train_dpo(str(tmp_path / "run"), model=model, params_ref=params, pairs=pairs,
                      **{"beta": 0.5, **change}, num_steps=1)
    assert not (tmp_path / "run").exists()


def _decoder_only():
    """A tiny random Llama-shaped model (EOS 2) and its params."""
    config = decoder_only_network.DecoderOnlyConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
        num_kv_heads=1, head_dim=8, max_position_embeddings=16, eos_token_ids=(2,))
    model = models.for_config(config)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32),
                                    jax.eval_shape(model.init, jax.random.PRNGKey(0)))
    return model, params


def test_pairs_of_a_decoder_only_model_carry_prompt_lengths(tmp_path):
    """`build` with `prompt_lengths`: the padding is never read, each pair keeps
    its prompt's length through a file, and DPO trains on what it read."""
    model, params = _decoder_only()
    rng = np.random.default_rng(2)
    lengths = rng.integers(1, 7, 12).astype(np.int32)
    inputs = rng.integers(3, 40, (12, 6)).astype(np.int32)
    junk = np.where(np.arange(6) < lengths[:, None], inputs, 0).astype(np.int32)
    reward = rewards.length_reward(eos_ids=model.eos_ids)
    built = [preference_pairs.build(model, params, x, reward, tau=0.5, max_decode_len=5,
                                    pairs_per_prompt=2, prompt_lengths=lengths, seed=3)
             for x in (inputs, junk)]
    (pairs, dropped), (pairs_junk, _) = built
    assert len(pairs["inputs"]) + dropped == 24 and len(pairs["inputs"]) >= 20
    for name in ("chosen", "rejected", "prompt_lengths"):
        np.testing.assert_array_equal(pairs[name], pairs_junk[name])
    row_of = {row.tobytes(): n for row, n in zip(inputs, lengths)}
    assert [row_of[row.tobytes()] for row in pairs["inputs"]] == pairs["prompt_lengths"].tolist()
    np.testing.assert_array_equal(pairs["chosen_reward"],
                                  rewards.response_length(pairs["chosen"], model.eos_ids))
    assert len(set(pairs["chosen_reward"].tolist())) > 1  # some responses end at the EOS
    preference_pairs.write(tmp_path / "pairs.jsonl", pairs, {})
    _, read = preference_pairs.read(tmp_path / "pairs.jsonl")
    np.testing.assert_array_equal(read["prompt_lengths"], pairs["prompt_lengths"])
    dpo.train_dpo(str(tmp_path / "run"), model=model, params_ref=params, pairs=read, beta=0.5,
                  batch_size=4, num_steps=2, checkpoint_every=2)
    with pytest.raises(ValueError, match=r"prompt_lengths must lie in \[1, 6\]"):
        preference_pairs.build(model, params, inputs, reward, tau=0.5, max_decode_len=5,
                               prompt_lengths=lengths + 6)


def test_a_decoder_only_model_learns_preferences_with_prompt_lengths(tmp_path):
    """Pairs of right-padded prompts with `prompt_lengths`: the padding is never
    read, DPO learns the preference, and pairs without lengths or with lengths
    outside the inputs are refused before anything is written."""
    model, params = _decoder_only()
    rng = np.random.default_rng(1)
    lengths = rng.integers(2, 7, 16).astype(np.int32)
    pairs = {"inputs": rng.integers(3, 40, (16, 6)).astype(np.int32),
             "prompt_lengths": lengths,
             "chosen": np.tile(np.array([[5, 9, 2, 0]], np.int32), (16, 1)),
             "rejected": np.tile(np.array([[7, 2, 0, 0]], np.int32), (16, 1)),
             "preference": np.ones(16, np.float32)}
    junk = dict(pairs, inputs=np.where(np.arange(6) < lengths[:, None], pairs["inputs"],
                                       rng.integers(3, 40, (16, 6))).astype(np.int32))
    logps = jax.jit(lambda p, b: dpo.pair_logps(model, p, b))
    np.testing.assert_array_equal(logps(params, pairs), logps(params, junk))
    # Sequence log-probs through the first EOS: the chosen rows' first three tokens.
    full = [model.logits(params, jnp.asarray(np.concatenate(
        [pairs["inputs"][b, :lengths[b]], pairs["chosen"][b, :3]]))[None])[0] for b in (0, 1)]
    for b, logits in enumerate(full):
        start = lengths[b] - 1
        log_probs = jax.nn.log_softmax(logits[start:start + 3])
        expected = float(jnp.sum(log_probs[jnp.arange(3), pairs["chosen"][b, :3]]))
        assert float(logps(params, pairs)[0][b]) == pytest.approx(expected, abs=1e-4)
    assert dpo.preference_accuracy(model, params, params, pairs, beta=0.5) == 0.0
    trained = dpo.train_dpo(str(tmp_path / "run"), model=model, params_ref=params,
                            pairs=pairs, beta=0.5, batch_size=8, num_steps=20,
                            checkpoint_every=20, optimizer=optax.adam(1e-2))
    assert dpo.preference_accuracy(model, trained, params, pairs, beta=0.5) == 1.0
    without = {k: v for k, v in pairs.items() if k != "prompt_lengths"}
    for bad, message in ((without, "needs prompt_lengths"),
                         (dict(pairs, prompt_lengths=np.where(lengths > 3, 0, lengths)),
                          r"prompt_lengths must lie in \[1, 6\]")):
        with pytest.raises(ValueError, match=message):
            dpo.train_dpo(str(tmp_path / "bad"), model=model, params_ref=params, pairs=bad,
                          beta=0.5, num_steps=1)
        assert not (tmp_path / "bad").exists()
