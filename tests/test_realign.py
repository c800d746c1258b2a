"""DeRa decoding: exact endpoints, per-example lambda, sweeps, theory, PyTorch parity."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import t5_factories

from dera_t5x import checkpoints
from dera_t5x import models
from dera_t5x.models.t5 import network
from dera_t5x import realign

CONFIG = network.T5Config(vocab_size=40, emb_dim=16, num_heads=3, head_dim=8, mlp_dim=24,
                          num_encoder_layers=2, num_decoder_layers=1,
                          mlp_activations=("gelu", "linear"), logits_via_embedding=False,
                          dropout_rate=0.0)
MAX_LEN = 12


@pytest.fixture(scope="module")
def setup():
    model = models.EncoderDecoderModel(CONFIG)
    params_ref = model.init(jax.random.PRNGKey(1))
    params_aligned = model.init(jax.random.PRNGKey(2))
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, CONFIG.vocab_size, size=(4, 9)).astype(np.int32)
    tokens[1, 6:] = 0
    tokens[3, 3:] = 0
    return model, params_ref, params_aligned, jnp.asarray(tokens)


def _predict(model, params, tokens, rng, temperature):
    fn = jax.jit(model.predict, static_argnames=("max_decode_len", "top_k", "top_p"))
    return fn(params, tokens, rng, max_decode_len=MAX_LEN, temperature=temperature)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_endpoints_equal_single_models(setup, temperature):
    model, params_ref, params_aligned, tokens = setup
    rng = jax.random.PRNGKey(7)
    batch = tokens.shape[0]
    for lam, params in ((0.0, params_ref), (1.0, params_aligned)):
        out = realign.dera_decode(model, params_ref, params_aligned, tokens,
                                  jnp.full((batch,), lam), max_decode_len=MAX_LEN, rng=rng,
                                  temperature=temperature)
        alone = _predict(model, params, tokens, rng, temperature)
        np.testing.assert_array_equal(out.tokens, alone.tokens)
        np.testing.assert_array_equal(out.lengths, alone.lengths)
    # The two models really decode differently, so the check above can fail.
    ref = _predict(model, params_ref, tokens, rng, temperature)
    aligned = _predict(model, params_aligned, tokens, rng, temperature)
    assert not np.array_equal(ref.tokens, aligned.tokens)


def test_log_probs_of_the_three_distributions(setup):
    model, params_ref, params_aligned, tokens = setup
    out = realign.dera_decode(model, params_ref, params_aligned, tokens, 0.5,
                              max_decode_len=MAX_LEN, rng=jax.random.PRNGKey(3))
    # Teacher-forced scores of the sampled tokens under each model agree.
    for params, got in ((params_ref, out.ref_log_probs), (params_aligned, out.aligned_log_probs)):
        want = model.token_log_probs(params, tokens, out.tokens, exclude_banned=True)
        np.testing.assert_allclose(got, want, atol=1e-5)
    # At temperature 1 without filtering, the sampling distribution is the mixture.
    np.testing.assert_allclose(out.log_probs, out.mixed_log_probs, atol=1e-6)
    assert np.all(np.asarray(out.mixed_log_probs)[np.asarray(out.tokens) == 0] == 0)


def test_per_example_lambda_equals_rows_decoded_alone(setup):
    model, params_ref, params_aligned, tokens = setup
    lams = np.array([0.0, 0.4, 1.0, 2.5], np.float32)
    rng = jax.random.PRNGKey(11)
    mixed = realign.dera_decode(model, params_ref, params_aligned, tokens, lams,
                                max_decode_len=MAX_LEN, rng=rng, temperature=0.0)
    for i, lam in enumerate(lams):
        alone = realign.dera_decode(model, params_ref, params_aligned, tokens,
                                    np.full(4, lam), max_decode_len=MAX_LEN, rng=rng,
                                    temperature=0.0)
        np.testing.assert_array_equal(mixed.tokens[i], alone.tokens[i])
    assert len({tuple(np.asarray(mixed.tokens[i])) for i in range(4)}) > 1


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sweep_equals_separate_calls(setup, temperature):
    model, params_ref, params_aligned, tokens = setup
    lambdas = np.array([0.0, 0.5, 1.0, 3.0], np.float32)
    rng = jax.random.PRNGKey(5)
    sweep = realign.dera_sweep(model, params_ref, params_aligned, tokens, lambdas,
                               max_decode_len=MAX_LEN, rng=rng, temperature=temperature)
    assert sweep.tokens.shape == (4, tokens.shape[0], MAX_LEN)
    for k, lam in enumerate(lambdas):
        one = realign.dera_decode(model, params_ref, params_aligned, tokens, lam,
                                  max_decode_len=MAX_LEN, rng=rng, temperature=temperature)
        np.testing.assert_array_equal(sweep.tokens[k], one.tokens)
        np.testing.assert_allclose(sweep.mixed_log_probs[k], one.mixed_log_probs, atol=1e-5)


def test_new_lambdas_do_not_recompile(setup):
    model, params_ref, params_aligned, tokens = setup
    rng = jax.random.PRNGKey(0)
    realign.dera_decode(model, params_ref, params_aligned, tokens, 0.1,
                        max_decode_len=MAX_LEN, rng=rng)
    before = realign._decode._cache_size()
    for lam in ([0.2, 0.3, 0.4, 0.5], [3.0, -1.0, 0.0, 1.0]):
        realign.dera_decode(model, params_ref, params_aligned, tokens, np.array(lam),
                            max_decode_len=MAX_LEN, rng=rng, temperature=0.7)
    assert realign._decode._cache_size() == before
    realign.dera_sweep(model, params_ref, params_aligned, tokens, [0.0, 1.0],
                       max_decode_len=MAX_LEN, rng=rng)
    sweeps = realign._sweep._cache_size()
    realign.dera_sweep(model, params_ref, params_aligned, tokens, [2.0, 5.0],
                       max_decode_len=MAX_LEN, rng=rng)
    assert realign._sweep._cache_size() == sweeps


@pytest.mark.parametrize("beta", [0.5, 2.0])
@pytest.mark.parametrize("lam", [0.25, 0.5, 2.0, 4.0])
def test_dera_is_exact_for_one_step(beta, lam):
    """One step over a small vocabulary: DeRa at lam is the optimum at beta / lam."""
    rng = np.random.default_rng(0)
    log_pi_sft = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(3, 11)), jnp.float32))
    reward = jnp.asarray(rng.normal(size=(3, 11)) * 2.0, jnp.float32)
    aligned_logits = realign.kl_regularized_optimum(log_pi_sft, reward, beta)
    # Logits are only defined up to a constant: shift them to show it does not matter.
    mixed = realign.mix_logits(log_pi_sft + 3.0, aligned_logits - 1.0, jnp.full((3,), lam))
    want = jnp.exp(realign.kl_regularized_optimum(log_pi_sft, reward, beta / lam))
    np.testing.assert_allclose(jax.nn.softmax(mixed), want, atol=1e-6)


def test_mix_logits_broadcasts_per_example():
    ref = jnp.zeros((2, 3, 5))
    aligned = jnp.ones((2, 3, 5))
    out = realign.mix_logits(ref, aligned, jnp.array([0.25, 2.0]))
    np.testing.assert_allclose(out[0], 0.25)
    np.testing.assert_allclose(out[1], 2.0)
    assert out.dtype == jnp.float32


def test_several_samples_per_input_read_each_input_once(setup):
    """num_samples = 2: the rows of repeated inputs (same rng), each input
    encoded once per parameter set; a per-row lambda covers every sample."""
    model, params_ref, params_aligned, tokens = setup
    kwargs = dict(max_decode_len=MAX_LEN, rng=jax.random.PRNGKey(9))
    repeated = jnp.repeat(tokens, 2, axis=0)
    sweep = realign.dera_sweep(model, params_ref, params_aligned, tokens, [0.0, 2.0],
                               num_samples=2, **kwargs)
    expected = realign.dera_sweep(model, params_ref, params_aligned, repeated, [0.0, 2.0],
                                  **kwargs)
    assert sweep.tokens.shape == (2, 8, MAX_LEN)
    np.testing.assert_array_equal(sweep.tokens, expected.tokens)
    np.testing.assert_allclose(sweep.mixed_log_probs, expected.mixed_log_probs, atol=1e-5)
    assert not np.array_equal(sweep.tokens[1, 0], sweep.tokens[1, 1])  # two samples
    lams = np.tile(np.array([0.0, 3.0], np.float32), 4)
    one = realign.dera_decode(model, params_ref, params_aligned, tokens, lams, num_samples=2,
                              **kwargs)
    np.testing.assert_array_equal(one.tokens, realign.dera_decode(
        model, params_ref, params_aligned, repeated, lams, **kwargs).tokens)
    with pytest.raises(ValueError, match=r"lam must have shape \(8,\)"):
        realign.dera_decode(model, params_ref, params_aligned, tokens, np.ones(4),
                            num_samples=2, **kwargs)
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
        realign.dera_sweep(model, params_ref, params_aligned, tokens, [1.0], num_samples=0,
                           **kwargs)


def test_bad_input(setup):
    model, params_ref, params_aligned, tokens = setup
    kwargs = dict(max_decode_len=MAX_LEN, rng=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="finite"):
        realign.dera_decode(model, params_ref, params_aligned, tokens,
                            np.array([0.5, np.nan, 1, 1]), **kwargs)
    with pytest.raises(ValueError, match=r"lam must have shape \(4,\)"):
        realign.dera_decode(model, params_ref, params_aligned, tokens, np.ones(3), **kwargs)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        realign.dera_sweep(model, params_ref, params_aligned, tokens, np.ones((2, 2)), **kwargs)
    with pytest.raises(ValueError, match="non-empty"):
        realign.dera_decode(model, params_ref, params_aligned, tokens[:0], 0.5, **kwargs)
    for temperature in (-1.0, np.array([1.0, np.nan, 1.0, 1.0])):
        with pytest.raises(ValueError, match="temperature must be >= 0"):
            realign.dera_sweep(model, params_ref, params_aligned, tokens, np.ones(2),
                               temperature=temperature, **kwargs)
    other = models.EncoderDecoderModel(network.T5Config(**{**CONFIG.__dict__, "vocab_size": 48}))
    with pytest.raises(ValueError, match=r"aligned parameter .*logits_dense.*vocabulary"):
        realign.dera_decode(model, params_ref, other.init(jax.random.PRNGKey(0)), tokens, 0.5,
                            **kwargs)
    deeper = models.EncoderDecoderModel(
        network.T5Config(**{**CONFIG.__dict__, "num_decoder_layers": 2}))
    with pytest.raises(ValueError, match="reference parameter set does not match"):
        realign.dera_decode(model, deeper.init(jax.random.PRNGKey(0)), params_aligned, tokens,
                            0.5, **kwargs)


@pytest.mark.parametrize("lam", [0.3, 1.5])
def test_greedy_dera_matches_a_pytorch_mixing_loop(tmp_path_factory, lam):
    import torch  # noqa: PLC0415  (a test dependency: a missing torch fails)
    import transformers  # noqa: PLC0415
    root = tmp_path_factory.mktemp(f"hf_{lam}")
    hf_ref = t5_factories.write_hf_t5(root / "ref", t5_factories.hf_t5_config(CONFIG), seed=0)
    hf_aligned = t5_factories.write_hf_t5(root / "aligned", t5_factories.hf_t5_config(CONFIG),
                                          seed=1)
    config, params_ref = checkpoints.load_hf_t5(root / "ref")
    _, params_aligned = checkpoints.load_hf_t5(root / "aligned")
    model = models.EncoderDecoderModel(config)

    rng = np.random.default_rng(1)
    inputs = rng.integers(2, CONFIG.vocab_size, size=(3, 10))
    inputs[2, 5:] = 0
    steps = 16
    with torch.no_grad():
        enc = torch.tensor(inputs)
        mask = enc > 0
        prefix = torch.zeros((3, 1), dtype=torch.long)
        for _ in range(steps):
            ref_logits = hf_ref(input_ids=enc, attention_mask=mask,
                                decoder_input_ids=prefix).logits[:, -1]
            aligned_logits = hf_aligned(input_ids=enc, attention_mask=mask,
                                        decoder_input_ids=prefix).logits[:, -1]
            mixed = lam * aligned_logits + (1 - lam) * ref_logits
            mixed[:, 0] = -float("inf")  # padding is never generated
            prefix = torch.cat([prefix, mixed.argmax(-1, keepdim=True)], dim=1)
    want = prefix[:, 1:].numpy()

    out = realign.dera_decode(model, params_ref, params_aligned, jnp.asarray(inputs, jnp.int32),
                              np.full(3, lam), max_decode_len=steps, rng=jax.random.PRNGKey(0),
                              temperature=0.0)
    got = np.asarray(out.tokens)
    for row in range(3):
        # After EOS our rows are padded with 0; PyTorch's loop keeps going.
        n = int(out.lengths[row])
        np.testing.assert_array_equal(got[row, :n], want[row, :n])
        assert np.all(got[row, n:] == 0)
    assert int(out.lengths.min()) >= 4, "too short to be a meaningful comparison"


def test_early_exit_gives_identical_decodes(setup):
    model, params_ref, params_aligned, tokens = setup
    kwargs = dict(max_decode_len=MAX_LEN, rng=jax.random.PRNGKey(9), temperature=1.0)
    plain = realign.dera_sweep(model, params_ref, params_aligned, tokens, [0.0, 2.0], **kwargs)
    early = realign.dera_sweep(model, params_ref, params_aligned, tokens, [0.0, 2.0],
                               chunk_size=4, **kwargs)
    for a, b in zip(plain, early):
        np.testing.assert_array_equal(a, b)
    assert int(plain.lengths.min()) < MAX_LEN  # some rows end, so chunks can be skipped
