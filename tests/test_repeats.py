"""`repeats` in the model protocol: k responses (or samples) per input row read
the input once, with the same result as repeated inputs up to float rounding,
for both families."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dera_t5x import models
from dera_t5x.models import protocol
from dera_t5x.models.decoder_only import network as decoder_only_network
from dera_t5x.models.t5 import network as t5_network

T5 = t5_network.T5Config(vocab_size=40, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                         num_encoder_layers=1, num_decoder_layers=2,
                         mlp_activations=("gelu", "linear"), logits_via_embedding=False,
                         dropout_rate=0.0)
DECODER_ONLY = decoder_only_network.DecoderOnlyConfig(
    vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
    num_kv_heads=1, head_dim=8, max_position_embeddings=32, eos_token_ids=(2,))


def _case(config):
    """(model, params, prompts [3, 6], prompt_lengths or None, responses [6, 5])."""
    model = models.for_config(config)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: rng.normal(0, 0.5, s.shape).astype(np.float32),
                                    shapes)
    prompts = rng.integers(3, 40, (3, 6)).astype(np.int32)
    responses = rng.integers(3, 40, (6, 5)).astype(np.int32)
    responses[1, 2] = model.eos_ids[0]
    if config is T5:
        prompts[0, 4:] = 0  # padding
        return model, params, prompts, None, responses
    return model, params, prompts, np.array([6, 2, 4], np.int32), responses


@pytest.mark.parametrize("config", [T5, DECODER_ONLY], ids=["t5", "decoder_only"])
def test_repeats_equal_repeated_inputs(config):
    model, params, prompts, lengths, responses = _case(config)
    repeated = np.repeat(prompts, 2, axis=0)
    repeated_lengths = None if lengths is None else np.repeat(lengths, 2)

    @functools.partial(jax.jit, static_argnums=3)
    def teacher_forced(params, prompts, lengths, repeats):
        kwargs = {} if lengths is None else {"prompt_lengths": lengths}
        return (model.response_states(params, prompts, responses, repeats=repeats, **kwargs),
                model.token_log_probs(params, prompts, responses, repeats=repeats, **kwargs),
                model.score(params, prompts, responses, repeats=repeats, **kwargs))

    once = teacher_forced(params, prompts, lengths, 2)
    each = teacher_forced(params, repeated, repeated_lengths, 1)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0),
                           once, each)

    kwargs = {} if lengths is None else {"prompt_lengths": lengths}
    repeated_kwargs = {} if lengths is None else {"prompt_lengths": repeated_lengths}
    logits, cache = model.prefill(params, prompts, 5, repeats=2, **kwargs)
    expected_logits, expected_cache = model.prefill(params, repeated, 5, **repeated_kwargs)
    assert jax.tree_util.tree_structure(cache) == jax.tree_util.tree_structure(expected_cache)
    np.testing.assert_allclose(logits, expected_logits, atol=1e-5, rtol=0)
    for t in range(3):
        logits, cache = model.decode_step(params, cache, jnp.asarray(responses[:, t]))
        expected_logits, expected_cache = model.decode_step(params, expected_cache,
                                                            jnp.asarray(responses[:, t]))
        np.testing.assert_allclose(logits, expected_logits, atol=1e-5, rtol=0)

    predict = jax.jit(model.predict, static_argnames=("max_decode_len", "repeats"))
    greedy = predict(params, prompts, jax.random.PRNGKey(0), max_decode_len=6, repeats=2,
                     **kwargs)
    expected = predict(params, repeated, jax.random.PRNGKey(0), max_decode_len=6,
                       **repeated_kwargs)
    assert greedy.tokens.shape == (6, 6)
    np.testing.assert_array_equal(greedy.tokens, expected.tokens)


def test_bad_repeats_are_refused():
    model, params, prompts, _, responses = _case(T5)
    with pytest.raises(ValueError, match="6 response rows for 3 input rows and repeats=3"):
        model.token_log_probs(params, prompts, responses, repeats=3)
    with pytest.raises(ValueError, match="repeats must be an integer >= 1"):
        model.prefill(params, prompts, 4, repeats=0)
    with pytest.raises(ValueError, match="do not split evenly over 4 input rows"):
        protocol.rows_per_input(np.zeros((4, 2)), np.zeros((6, 3)))
