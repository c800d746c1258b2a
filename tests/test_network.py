"""Exactness of the Flax T5 against transformers' PyTorch T5 on the same weights."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import t5_factories

from dera_t5x import checkpoints
from dera_t5x import models
from dera_t5x.models.t5 import network

import torch  # noqa: E402  (a test dependency: a missing torch fails, never skips)
import transformers  # noqa: E402

# Non-square attention (heads * d_kv != d_model), more encoder than decoder
# layers, few buckets and a short max distance so that long offsets share buckets.
COMMON = dict(vocab_size=61, d_model=24, d_kv=10, d_ff=40, num_layers=3, num_decoder_layers=2,
              num_heads=3, relative_attention_num_buckets=8,
              relative_attention_max_distance=20, dropout_rate=0.0, decoder_start_token_id=0,
              pad_token_id=0, eos_token_id=1)
VARIANTS = {
    "t5.1.0": dict(COMMON, feed_forward_proj="relu", tie_word_embeddings=True),
    "t5.1.1": dict(COMMON, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}
EMBED_COPIES = t5_factories.EMBED_COPIES


def _write_hf(directory, variant, *, with_lm_head=True, seed=0, drop=EMBED_COPIES, **overrides):
    """A random transformers T5 of `variant` as a Hugging Face directory."""
    return t5_factories.write_hf_t5(directory, transformers.T5Config(
        **dict(VARIANTS[variant], **overrides)), seed=seed, with_lm_head=with_lm_head, drop=drop)


def _padded_batch():
    """Inputs [3, 26] and targets [3, 24] with padding of different lengths."""
    rng = np.random.default_rng(0)
    inputs = rng.integers(2, COMMON["vocab_size"], size=(3, 26))
    inputs[1, 17:] = 0
    inputs[2, 5:] = 0
    targets = rng.integers(2, COMMON["vocab_size"], size=(3, 24))
    targets[0, 23] = 1
    targets[1, 9] = 1
    targets[1, 10:] = 0
    targets[2, 3:] = 0
    return inputs, targets


def _torch_logits(hf_model, inputs, decoder_inputs):
    with torch.no_grad():
        return hf_model(input_ids=torch.tensor(inputs), attention_mask=torch.tensor(inputs > 0),
                        decoder_input_ids=torch.tensor(np.asarray(decoder_inputs))).logits.numpy()


@pytest.mark.parametrize("bidirectional,num_buckets,max_distance",
                         [(True, 8, 20), (False, 8, 20), (True, 32, 128), (False, 32, 128),
                          (True, 12, 50), (False, 6, 7)])
def test_relative_position_buckets_match_pytorch(bidirectional, num_buckets, max_distance):
    # Offsets far past max_distance, including the exact log-bucket boundaries.
    offsets = np.arange(-400, 401)
    want = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        torch.tensor(offsets), bidirectional=bidirectional, num_buckets=num_buckets,
        max_distance=max_distance).numpy()
    got = network.relative_position_bucket(jnp.asarray(offsets), bidirectional, num_buckets,
                                           max_distance)
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(want)) >= num_buckets - 1  # the log-spaced buckets are all hit


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_token_log_probs_match_pytorch(tmp_path, variant):
    hf_model = _write_hf(tmp_path / "hf", variant)
    config, params = checkpoints.load_hf_t5(tmp_path / "hf")
    assert config.logits_via_embedding == VARIANTS[variant]["tie_word_embeddings"]
    assert ("logits_dense" in params["decoder"]) != config.logits_via_embedding
    model = models.EncoderDecoderModel(config)
    inputs, targets = _padded_batch()
    with torch.no_grad():
        logits = hf_model(input_ids=torch.tensor(inputs), attention_mask=torch.tensor(inputs > 0),
                          labels=torch.tensor(np.where(targets > 0, targets, -100))).logits
        want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(targets)[..., None])[..., 0]
    want = np.where(targets > 0, want.numpy(), 0.0)
    got = np.asarray(jax.jit(model.token_log_probs)(params, inputs, targets))
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(want).max() > 1.0  # a real comparison, not of zeros


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_decoding_matches_generate(tmp_path, variant):
    hf_model = _write_hf(tmp_path / "hf", variant, seed=2)  # a seed whose rows run >= 16 steps
    config, params = checkpoints.load_hf_t5(tmp_path / "hf")
    model = models.EncoderDecoderModel(config)
    inputs, _ = _padded_batch()
    steps = 20
    with torch.no_grad():
        # We never generate padding; PyTorch is told the same.
        want = hf_model.generate(input_ids=torch.tensor(inputs),
                                 attention_mask=torch.tensor(inputs > 0), do_sample=False,
                                 max_new_tokens=steps, suppress_tokens=[0]).numpy()[:, 1:]
    predict = jax.jit(model.predict, static_argnames=("max_decode_len", "top_k", "top_p"))
    out = predict(params, jnp.asarray(inputs), jax.random.PRNGKey(0), max_decode_len=steps)
    got = np.asarray(out.tokens)
    # Up to and including our EOS; PyTorch pads finished rows afterwards, as we do.
    for row in range(len(inputs)):
        n = int(out.lengths[row])
        np.testing.assert_array_equal(got[row, :n], want[row, :n])
    assert int(out.lengths.min()) >= 16


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_decoding_equals_the_full_sequence(tmp_path, variant):
    _write_hf(tmp_path / "hf", variant, seed=3)
    config, params = checkpoints.load_hf_t5(tmp_path / "hf")
    model = models.EncoderDecoderModel(config)
    inputs, targets = _padded_batch()
    decoder_inputs = models.shift_right(jnp.asarray(targets))
    full = jax.jit(model.logits)(params, inputs, decoder_inputs)
    # A cache longer than the sequence: unused positions must stay masked.
    cache = model.init_decode_cache(params, jnp.asarray(inputs), targets.shape[1] + 5)
    step = jax.jit(model.decode_step)
    for t in range(targets.shape[1]):
        step_logits, cache = step(params, cache, decoder_inputs[:, t])
        np.testing.assert_allclose(step_logits, full[:, t], atol=1e-5)
    assert int(cache["index"]) == targets.shape[1]


@pytest.mark.parametrize("projection", ["gelu", "gated-silu"])
def test_other_feed_forward_projections_match_pytorch(tmp_path, projection):
    # Hugging Face's plain "gelu" is the exact erf GELU, unlike "gated-gelu".
    hf_model = _write_hf(tmp_path / "hf", "t5.1.1", feed_forward_proj=projection)
    config, params = checkpoints.load_hf_t5(tmp_path / "hf")
    assert config.mlp_activations == {"gelu": ("gelu_exact",),
                                      "gated-silu": ("silu", "linear")}[projection]
    inputs, targets = _padded_batch()
    decoder_inputs = models.shift_right(jnp.asarray(targets))
    got = jax.jit(models.EncoderDecoderModel(config).logits)(params, inputs, decoder_inputs)
    np.testing.assert_allclose(got, _torch_logits(hf_model, inputs, decoder_inputs), atol=1e-4)


def test_checkpoints_with_and_without_lm_head_load(tmp_path):
    # T5.1.0: lm_head is the embedding; with it, without it, or with only the
    # encoder / decoder copies of the embedding (no shared.weight), all alike.
    _write_hf(tmp_path / "tied", "t5.1.0", with_lm_head=False)
    _write_hf(tmp_path / "tied_with_head", "t5.1.0", with_lm_head=True)
    _write_hf(tmp_path / "tied_copies", "t5.1.0", drop=("shared.weight",))
    a = checkpoints.load_hf_t5(tmp_path / "tied")[1]
    for other in ("tied_with_head", "tied_copies"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, a,
                               checkpoints.load_hf_t5(tmp_path / other)[1])
    assert "logits_dense" not in a["decoder"]
    # T5.1.1 without lm_head.weight: transformers 5 uses the embedding there
    # (unscaled); so do we, through logits_dense.
    hf_model = _write_hf(tmp_path / "untied_no_head", "t5.1.1", with_lm_head=False)
    config, params = checkpoints.load_hf_t5(tmp_path / "untied_no_head")
    assert not config.logits_via_embedding
    np.testing.assert_array_equal(params["decoder"]["logits_dense"]["kernel"],
                                  params["token_embedder"]["embedding"].T)
    del hf_model
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(
        tmp_path / "untied_no_head").eval()
    inputs, targets = _padded_batch()
    decoder_inputs = models.shift_right(jnp.asarray(targets))
    got = jax.jit(models.EncoderDecoderModel(config).logits)(params, inputs, decoder_inputs)
    np.testing.assert_allclose(got, _torch_logits(reloaded, inputs, decoder_inputs), atol=1e-4)
