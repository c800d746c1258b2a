"""The generic sampling loop on a toy bigram model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dera_t5x import decoding

VOCAB = 7
TABLE = jnp.asarray(np.random.default_rng(0).normal(size=(VOCAB, VOCAB)) * 2, jnp.float32)
TABLE = TABLE.at[6, 1].set(10.0)  # greedy from 3 runs 3 -> 0 -> 6 -> EOS


def bigram(tokens, cache):
    """Logits from the previous token; the cache counts steps."""
    logits = TABLE[tokens]
    return logits, cache + 1, {"uniform": jnp.full(logits.shape, -jnp.log(VOCAB))}


def _sample(batch=4, steps=10, **kwargs):
    return decoding.sample(bigram, jnp.zeros((), jnp.int32), jax.random.PRNGKey(0),
                           batch_size=batch, max_decode_len=steps, **kwargs)


def test_greedy_equals_a_numpy_loop_with_eos_handling():
    out = _sample(temperature=0.0, start_id=3)
    table = np.asarray(TABLE)
    token, ended, want = 3, False, []
    for _ in range(10):
        token = 0 if ended else int(np.argmax(table[token]))
        want.append(token)
        ended = ended or token == 1
    for row in np.asarray(out.tokens):
        np.testing.assert_array_equal(row, want)
    assert 1 in want
    n = want.index(1) + 1
    assert np.all(np.asarray(out.lengths) == n)
    assert np.all(np.asarray(out.log_probs)[:, n:] == 0)
    assert np.all(np.asarray(out.aux_log_probs["uniform"])[:, :n] == pytest.approx(-np.log(7)))
    assert np.all(np.asarray(out.aux_log_probs["uniform"])[:, n:] == 0)


def test_sampling_is_reproducible_and_follows_the_distribution():
    a = _sample(batch=4000, steps=1, temperature=0.5)
    b = _sample(batch=4000, steps=1, temperature=0.5)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    counts = np.bincount(np.asarray(a.tokens)[:, 0], minlength=VOCAB) / 4000
    want = np.asarray(jax.nn.softmax(TABLE[0] / 0.5))
    np.testing.assert_allclose(counts, want, atol=0.03)
    np.testing.assert_allclose(a.log_probs[:, 0], np.log(want)[np.asarray(a.tokens)[:, 0]],
                               atol=1e-5)


def test_per_row_temperature_zero_rows_are_greedy():
    temps = jnp.array([0.0, 1.0, 0.0, 2.0])
    out = _sample(batch=4, steps=6, temperature=temps)
    greedy = _sample(batch=4, steps=6, temperature=0.0)
    np.testing.assert_array_equal(out.tokens[0], greedy.tokens[0])
    np.testing.assert_array_equal(out.tokens[2], greedy.tokens[2])


def test_top_k_and_top_p_restrict_the_support():
    logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    assert np.isfinite(np.asarray(decoding.filter_logits(logits, top_k=2))).sum() == 2
    # Smallest prefix reaching 0.8: 0.5 + 0.2 + 0.15.
    kept = np.isfinite(np.asarray(decoding.filter_logits(logits, top_p=0.8)))
    np.testing.assert_array_equal(kept[0], [True, True, True, False, False])
    assert np.isfinite(np.asarray(decoding.filter_logits(logits, top_p=0.1))).sum() == 1
    top1 = _sample(batch=16, steps=8, temperature=1.0, top_k=1)
    np.testing.assert_array_equal(top1.tokens, _sample(batch=16, steps=8, temperature=0.0).tokens)
    out = _sample(batch=500, steps=1, temperature=1.0, top_k=3)
    allowed = set(np.argsort(-np.asarray(TABLE[0]))[:3].tolist())
    assert set(np.asarray(out.tokens)[:, 0].tolist()) <= allowed
    # Log-probs are those of the renormalized filtered distribution.
    filtered = jax.nn.log_softmax(decoding.filter_logits(TABLE[0][None], top_k=3))[0]
    np.testing.assert_allclose(out.log_probs[:, 0], filtered[np.asarray(out.tokens)[:, 0]],
                               atol=1e-5)
    assert float(jnp.sum(jnp.exp(filtered))) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 3, 10])
def test_early_exit_gives_identical_outputs(chunk_size):
    plain = _sample(batch=8, steps=10, temperature=1.0)
    early = _sample(batch=8, steps=10, temperature=1.0, chunk_size=chunk_size)
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(early)):
        np.testing.assert_array_equal(a, b)


def test_new_temperatures_do_not_recompile():
    fn = jax.jit(lambda t: _sample(batch=4, steps=5, temperature=t).tokens)
    fn(jnp.ones(4))
    fn(jnp.array([0.0, 0.5, 2.0, 1.0]))
    assert fn._cache_size() == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"top_k": -1}, "top_k"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"steps": 0}, "max_decode_len"), ({"chunk_size": 0}, "chunk_size"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _sample(**kwargs)
