"""The generic sampling loop on a toy bigram model (logits from the previous token).

Compiling a sampling loop takes about a second on CPU, so the tests share a few
configurations: temperature is always a traced [batch] array, the toy models
are module-level functions (a static argument of the jitted `sample`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dera_t5x import decoding

VOCAB = 7
EOS = 1
BATCH = 32
STEPS = 10
START = 3
_TABLE = np.random.default_rng(0).normal(size=(VOCAB, VOCAB)).astype(np.float32) * 2
_TABLE[6, EOS] = 10.0  # greedy from START = 3 emits 0, 6, EOS
TABLE = jnp.asarray(_TABLE)
GREEDY_LENGTH = 3
NO_EOS_TABLE = TABLE.at[:, EOS].set(-30.0)
AUX_TABLE = 0.3 * TABLE[::-1] + 5.0  # the unnormalized logits of some other distribution


def bigram(tokens, cache):
    """tokens_to_logits: the row of TABLE of the previous token; the cache counts steps."""
    return TABLE[tokens], cache + 1, {"other": AUX_TABLE[tokens]}


def bigram_no_eos(tokens, cache):
    return NO_EOS_TABLE[tokens], cache + 1, {"other": AUX_TABLE[tokens]}


_FED = []  # the tokens fed at each executed step of `recording_bigram`


def recording_bigram(tokens, cache):
    """bigram, also appending the fed tokens [batch] to _FED at every executed step."""
    jax.debug.callback(lambda t: _FED.append(np.asarray(t)), tokens, ordered=True)
    return bigram(tokens, cache)


_jitted_sample = jax.jit(decoding.sample, static_argnums=0, static_argnames=(
    "batch_size", "max_decode_len", "eos_id", "start_id", "top_k", "top_p", "chunk_size"))
_filter_logits = jax.jit(decoding.filter_logits, static_argnames=("top_k", "top_p"))


def _sample(tokens_to_logits=bigram, *, temperature, batch=BATCH, steps=STEPS, start=START,
            rng=0, **kwargs):
    """decoding.sample on a toy model, compiled as one function."""
    temperature = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (batch,))
    return _jitted_sample(tokens_to_logits, jnp.zeros((), jnp.int32), jax.random.PRNGKey(rng),
                          batch_size=batch, max_decode_len=steps, eos_id=EOS, start_id=start,
                          temperature=temperature, **kwargs)


def _greedy_reference(table):
    """A plain numpy greedy loop from START: tokens and log-probs of one row."""
    log_probs = np.asarray(jax.nn.log_softmax(table, axis=-1))
    fed, tokens, scores, ended = START, [], [], False
    for _ in range(STEPS):
        token = 0 if ended else int(np.argmax(log_probs[fed]))
        tokens.append(token)
        scores.append(0.0 if ended else log_probs[fed, token])
        ended = ended or token == EOS
        fed = 0 if ended else token
    return np.array(tokens), np.array(scores, np.float32)


def _previous(tokens):
    """The token each step conditions on: START, then the outputs ([batch, len])."""
    return np.concatenate([np.full((tokens.shape[0], 1), START), tokens[:, :-1]], axis=1)


@pytest.mark.parametrize("model, table, length", [
    (bigram, TABLE, GREEDY_LENGTH), (bigram_no_eos, NO_EOS_TABLE, STEPS)])
def test_greedy_equals_a_numpy_loop_with_eos_handling(model, table, length):
    out = _sample(model, temperature=0.0)
    want_tokens, want_scores = _greedy_reference(table)
    assert (EOS in want_tokens) == (length < STEPS)
    np.testing.assert_array_equal(out.tokens, np.tile(want_tokens, (BATCH, 1)))
    np.testing.assert_allclose(out.log_probs, np.tile(want_scores, (BATCH, 1)), rtol=1e-6)
    np.testing.assert_array_equal(out.lengths, np.full(BATCH, length))
    assert out.tokens.dtype == jnp.int32 and out.lengths.dtype == jnp.int32
    assert np.all(np.asarray(out.log_probs)[:, :length] < 0)
    assert np.all(np.asarray(out.tokens)[:, length:] == 0)
    assert np.all(np.asarray(out.log_probs)[:, length:] == 0)
    assert np.all(np.asarray(out.aux_log_probs["other"])[:, length:] == 0)


def test_sampling_is_reproducible_and_follows_the_distribution():
    a = _sample(temperature=2.0, batch=4000, steps=1, start=0)
    b = _sample(temperature=2.0, batch=4000, steps=1, start=0)
    c = _sample(temperature=2.0, batch=4000, steps=1, start=0, rng=1)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert np.mean(np.asarray(a.tokens) != np.asarray(c.tokens)) > 0.5
    tokens = np.asarray(a.tokens)[:, 0]
    want = np.asarray(jax.nn.softmax(TABLE[0] / 2.0))
    np.testing.assert_allclose(np.bincount(tokens, minlength=VOCAB) / 4000, want, atol=0.03)
    np.testing.assert_allclose(a.log_probs[:, 0], np.log(want)[tokens], atol=1e-5)


def test_each_draw_is_jax_random_categorical_of_the_step():
    """The loop's Gumbel-max draw (with its own argmax) picks, at every step t,
    what `jax.random.categorical(fold_in(rng, t), logits / temperature)` picks."""
    out = _sample(bigram_no_eos, temperature=1.7, batch=64, rng=5)
    fed = _previous(np.asarray(out.tokens))
    for t in range(STEPS):
        want = jax.random.categorical(jax.random.fold_in(jax.random.PRNGKey(5), t),
                                      NO_EOS_TABLE[fed[:, t]] / jnp.float32(1.7), axis=-1)
        np.testing.assert_array_equal(out.tokens[:, t], want)


def test_same_rng_and_logits_give_the_same_samples_whatever_the_model():
    def one_hot_model(tokens, cache):  # the same logits by a matmul, another cache
        logits = jax.nn.one_hot(tokens, VOCAB) @ TABLE
        return logits, {"t": cache["t"] + 1, "seen": cache["seen"] + tokens}, {}

    a = _sample(temperature=1.3)
    b = jax.jit(lambda rng, temperature: decoding.sample(
        one_hot_model, {"t": jnp.int32(0), "seen": jnp.zeros(BATCH, jnp.int32)}, rng,
        batch_size=BATCH, max_decode_len=STEPS, eos_id=EOS, start_id=START,
        temperature=temperature))(jax.random.PRNGKey(0), 1.3)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.log_probs, b.log_probs, atol=1e-6)
    assert b.aux_log_probs == {}


def test_per_row_temperature_zero_rows_are_greedy_and_others_sample():
    mixed = _sample(temperature=jnp.tile(jnp.array([0.0, 1.5]), BATCH // 2))
    greedy = _sample(temperature=0.0)
    hot = _sample(temperature=1.5)
    np.testing.assert_array_equal(mixed.tokens[0::2], greedy.tokens[0::2])
    np.testing.assert_array_equal(mixed.log_probs[0::2], greedy.log_probs[0::2])
    # Sampled rows see the same per-row noise as an all-sampled run.
    np.testing.assert_array_equal(mixed.tokens[1::2], hot.tokens[1::2])
    np.testing.assert_array_equal(mixed.log_probs[1::2], hot.log_probs[1::2])
    assert np.any(np.asarray(mixed.tokens[1::2]) != np.asarray(greedy.tokens[1::2]))


def test_filter_logits_top_k_keeps_exactly_k_with_ties_to_the_lower_id():
    logits = jnp.array([[1.0, 3.0, 3.0, 2.0, 3.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    kept = np.isfinite(np.asarray(_filter_logits(logits, top_k=2)))
    np.testing.assert_array_equal(kept, [[0, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(_filter_logits(logits, top_k=2)[1, :2], [5.0, 4.0])
    np.testing.assert_array_equal(_filter_logits(logits, top_k=9), logits)
    np.testing.assert_array_equal(_filter_logits(logits[None], top_k=1)[0],
                                  _filter_logits(logits, top_k=1))


def test_filter_logits_top_p_keeps_the_shortest_prefix_reaching_p():
    logits = jnp.log(jnp.array([[0.05, 0.5, 0.1, 0.2, 0.15]]))

    def kept(**kwargs):
        return np.flatnonzero(np.isfinite(np.asarray(_filter_logits(logits, **kwargs))))

    np.testing.assert_array_equal(kept(top_p=0.8), [1, 3, 4])  # 0.5 + 0.2 + 0.15
    np.testing.assert_array_equal(kept(top_p=0.69), [1, 3])  # 0.5 + 0.2
    np.testing.assert_array_equal(kept(top_p=0.01), [1])  # the argmax always stays
    np.testing.assert_array_equal(kept(top_p=1.0), [0, 1, 2, 3, 4])
    # top-k first, then the nucleus of the renormalized top-k: (0.5, 0.2) / 0.7.
    np.testing.assert_array_equal(kept(top_k=2, top_p=0.75), [1, 3])
    np.testing.assert_array_equal(kept(top_k=2, top_p=0.7), [1])
    ties = jnp.log(jnp.array([[0.2, 0.4, 0.2, 0.2]]))
    np.testing.assert_array_equal(
        np.isfinite(np.asarray(_filter_logits(ties, top_p=0.5))), [[1, 1, 0, 0]])


def test_top_k_one_is_greedy_with_log_prob_zero():
    top1 = _sample(temperature=1.0, top_k=1)
    greedy = _sample(temperature=0.0)
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)
    alive = np.arange(STEPS) < GREEDY_LENGTH
    np.testing.assert_array_equal(top1.log_probs, 0.0)  # a point mass after filtering
    assert np.all(np.asarray(greedy.log_probs)[:, alive] < 0)


@pytest.mark.parametrize("kwargs, support_size", [({"top_k": 3}, 3), ({"top_p": 0.9}, None)])
def test_filters_restrict_the_support_and_renormalize(kwargs, support_size):
    temperature = 1.2
    out = _sample(temperature=temperature, batch=4000, steps=1, start=0, **kwargs)
    probs = np.asarray(jax.nn.softmax(TABLE[0] / temperature), np.float64)
    order = np.argsort(-probs, kind="stable")
    if support_size is None:  # the shortest prefix with mass >= top_p
        support_size = int(np.searchsorted(np.cumsum(probs[order]), kwargs["top_p"]) + 1)
    assert 2 < support_size < VOCAB
    support = order[:support_size]
    tokens = np.asarray(out.tokens)[:, 0]
    assert set(tokens.tolist()) == set(support.tolist())
    renormalized = np.zeros(VOCAB)
    renormalized[support] = probs[support] / probs[support].sum()
    np.testing.assert_allclose(out.log_probs[:, 0], np.log(renormalized[tokens]), atol=1e-5)
    np.testing.assert_allclose(np.bincount(tokens, minlength=VOCAB) / 4000, renormalized,
                               atol=0.03)
    # Over the support, the exponentiated log-probs sum to 1.
    seen = dict(zip(tokens.tolist(), np.asarray(out.log_probs[:, 0]).tolist()))
    assert np.sum(np.exp(list(seen.values()))) == pytest.approx(1.0, abs=1e-5)


def test_aux_log_probs_are_gathered_at_the_chosen_tokens():
    out = _sample(temperature=1.0)
    tokens = np.asarray(out.tokens)
    want = np.asarray(jax.nn.log_softmax(AUX_TABLE, axis=-1))[_previous(tokens), tokens]
    alive = np.arange(STEPS)[None, :] < np.asarray(out.lengths)[:, None]
    assert 0 < alive.sum() < alive.size  # some rows end early
    np.testing.assert_allclose(out.aux_log_probs["other"], np.where(alive, want, 0.0),
                               rtol=1e-6)


def _run_recorded(**kwargs):
    """Samples with recording_bigram: the output and the fed tokens [batch, steps run]."""
    _FED.clear()
    out = jax.block_until_ready(_sample(recording_bigram, **kwargs))
    jax.effects_barrier()
    return out, np.stack(_FED, axis=1)


@pytest.mark.parametrize("chunk_size, greedy_steps", [(1, 3), (3, 4), (4, 6), (25, 10)])
def test_early_exit_is_identical_and_stops_at_the_first_chunk_where_all_ended(
        chunk_size, greedy_steps):
    # Greedy rows all end after GREEDY_LENGTH steps: the chunked loop stops at the
    # first chunk boundary after that (chunks of 3 over 10 steps: 1, then 3, 3, 3).
    plain, fed_plain = _run_recorded(temperature=0.0)
    early, fed_early = _run_recorded(temperature=0.0, chunk_size=chunk_size)
    assert fed_plain.shape[1] == STEPS and fed_early.shape[1] == greedy_steps
    np.testing.assert_array_equal(fed_early, fed_plain[:, :greedy_steps])
    # Rows are fed START, then their tokens, then 0 once they have ended.
    want_fed = _previous(np.asarray(plain.tokens))
    np.testing.assert_array_equal(fed_plain, np.where(want_fed == EOS, 0, want_fed))
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(early)):
        np.testing.assert_array_equal(a, b)
    # Sampled rows end at different steps, some never: all steps run, same outputs.
    temperature = jnp.linspace(0.0, 2.0, BATCH)
    plain, _ = _run_recorded(temperature=temperature)
    early, fed_early = _run_recorded(temperature=temperature, chunk_size=chunk_size)
    assert len(set(np.asarray(plain.lengths).tolist())) > 2 and np.max(plain.lengths) == STEPS
    assert fed_early.shape[1] == STEPS
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(early)):
        np.testing.assert_array_equal(a, b)


def test_new_temperatures_and_params_do_not_recompile_an_outer_jit():
    traces = []

    @jax.jit
    def decode(table, temperature):
        traces.append(1)
        model = lambda tokens, cache: (table[tokens], cache, {})  # noqa: E731
        return decoding.sample(model, jnp.zeros(()), jax.random.PRNGKey(0), batch_size=BATCH,
                               max_decode_len=STEPS, eos_id=EOS, start_id=START,
                               temperature=temperature).tokens

    hot = decode(TABLE, jnp.full(BATCH, 5.0, jnp.float32))
    greedy = decode(TABLE, jnp.zeros(BATCH))
    decode(TABLE, jnp.linspace(0.0, 2.0, BATCH))
    no_eos = decode(NO_EOS_TABLE, jnp.zeros(BATCH))  # new params, same shapes
    assert len(traces) == 1 and decode._cache_size() == 1
    np.testing.assert_array_equal(greedy, _sample(temperature=0.0).tokens)
    np.testing.assert_array_equal(no_eos, _sample(bigram_no_eos, temperature=0.0).tokens)
    assert np.any(np.asarray(hot) != np.asarray(greedy))


def test_a_concrete_zero_temperature_is_the_traced_greedy_path_without_the_draw():
    @jax.jit
    def decode(table):
        model = lambda tokens, cache: (table[tokens], cache, {})  # noqa: E731
        return decoding.sample(model, jnp.zeros(()), jax.random.PRNGKey(0), batch_size=BATCH,
                               max_decode_len=STEPS, eos_id=EOS, start_id=START,
                               temperature=0.0)

    static = decode(TABLE)
    traced = _sample(temperature=0.0)  # temperature is a traced argument there
    np.testing.assert_array_equal(static.tokens, traced.tokens)
    np.testing.assert_array_equal(static.log_probs, traced.log_probs)
    assert "random_bits" not in str(jax.make_jaxpr(decode)(TABLE))
    assert "random_bits" in str(jax.make_jaxpr(
        lambda t: decoding.sample(lambda tokens, cache: (t[tokens], cache, {}), jnp.zeros(()),
                                  jax.random.PRNGKey(0), batch_size=BATCH,
                                  max_decode_len=STEPS, temperature=jnp.zeros(BATCH)))(TABLE))


def _wrong_logits(tokens, cache):
    return TABLE[tokens][:, None], cache, {}


def _wrong_aux(tokens, cache):
    return TABLE[tokens], cache, {"other": TABLE[tokens][:, :3]}


@pytest.mark.parametrize("kwargs, message", [
    ({"top_k": -1}, "top_k"), ({"top_k": 2.5}, "top_k"), ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"max_decode_len": 0}, "max_decode_len"),
    ({"batch_size": 0}, "batch_size"), ({"chunk_size": 0}, "chunk_size"),
    ({"temperature": -1.0}, "temperature must be >= 0"),
    ({"temperature": np.array([1.0, np.nan, 1.0, 1.0])}, "temperature must be >= 0"),
    ({"temperature": jnp.ones(3)}, r"shape \[batch_size\]"),
    ({"tokens_to_logits": _wrong_logits}, r"logits \[batch_size=4, vocab\]"),
    ({"tokens_to_logits": _wrong_aux}, "'other' must have the logits' shape"),
])
def test_bad_arguments_raise_clear_errors(kwargs, message):
    arguments = {"tokens_to_logits": bigram, "init_cache": jnp.zeros(()),
                 "rng": jax.random.PRNGKey(0), "batch_size": 4, "max_decode_len": 5,
                 **kwargs}
    with pytest.raises(ValueError, match=message):
        decoding.sample(**arguments)
