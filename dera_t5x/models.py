"""`EncoderDecoderModel`: init, loss, teacher-forced log-probs, decode steps.

All methods are pure functions of `params` and can be jitted by callers.
Token conventions follow T5: padding 0, EOS 1, decoder start 0.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from dera_t5x import decoding
from dera_t5x import network

Array = jax.Array
Params = Any
PAD_ID = 0
EOS_ID = 1
DECODER_START_ID = 0
EXCLUDED_LOGIT = -1e9


def exclude_padding(logits: Array) -> Array:
    """Logits [..., vocab] with the padding id made impossible (a large negative
    logit, finite so that mixing and masking never produce NaN).

    Generated text never contains padding: every sampling path, and every
    log-prob of generated text used by RL and DeRa, uses the model's
    distribution restricted to the other tokens.
    """
    return logits.at[..., PAD_ID].set(EXCLUDED_LOGIT)


def first_argmax(x: Array) -> Array:
    """`jnp.argmax(x, axis=-1)`, the first index of the max (rows holding NaN
    give x.shape[-1]), as two plain reduces: XLA:CPU runs argmax's variadic
    reduce several times slower. Float indices are exact below 2**24."""
    is_max = x == jnp.max(x, axis=-1, keepdims=True)
    index = jnp.arange(x.shape[-1], dtype=jnp.float32)
    return jnp.min(jnp.where(is_max, index, x.shape[-1]), axis=-1).astype(jnp.int32)


def shift_right(targets: Array, start_id: int = DECODER_START_ID) -> Array:
    """Decoder inputs from targets: [batch, len] -> [batch, len], start id first."""
    shifted = jnp.roll(targets, 1, axis=-1).at[:, 0].set(start_id)
    return shifted


class EncoderDecoderModel:
    """A T5 model with the operations training and decoding need."""

    def __init__(self, config: network.T5Config):
        self.config = config
        self.module = network.Transformer(config)

    def init(self, rng: Array, encoder_len: int = 4, decoder_len: int = 4) -> Params:
        """Random float32 parameters (the shapes do not depend on the lengths)."""
        enc = jnp.ones((1, encoder_len), jnp.int32)
        dec = jnp.ones((1, decoder_len), jnp.int32)
        return self.module.init(rng, enc, dec)["params"]

    def encode(self, params: Params, encoder_input_tokens: Array) -> Array:
        """[batch, enc_len] -> [batch, enc_len, emb]."""
        return self.module.apply({"params": params}, encoder_input_tokens,
                                 method=network.Transformer.encode)

    def logits(self, params: Params, encoder_input_tokens: Array,
               decoder_input_tokens: Array, dropout_rng: Array | None = None) -> Array:
        """Teacher-forced logits [batch, dec_len, vocab] float32; dropout iff a rng is given."""
        rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
        return self.module.apply({"params": params}, encoder_input_tokens,
                                 decoder_input_tokens, deterministic=dropout_rng is None,
                                 rngs=rngs)

    def hidden_and_logits(self, params: Params, encoder_input_tokens: Array,
                          decoder_input_tokens: Array, dropout_rng: Array | None = None
                          ) -> tuple[Array, Array]:
        """Final decoder hidden states [batch, dec_len, emb] and logits [batch, dec_len, vocab]."""
        rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
        return self.module.apply({"params": params}, encoder_input_tokens,
                                 decoder_input_tokens, deterministic=dropout_rng is None,
                                 rngs=rngs, method=network.Transformer.hidden_and_logits)

    def loss(self, params: Params, batch: Mapping[str, Array],
             dropout_rng: Array | None = None, *, z_loss: float = 0.0,
             label_smoothing: float = 0.0) -> tuple[Array, dict[str, Array]]:
        """Weighted cross-entropy, summed over tokens and divided by the weight sum.

        Args:
          batch: `encoder_input_tokens`, `decoder_input_tokens`,
            `decoder_target_tokens` [batch, len] int32 and optionally
            `decoder_loss_weights` [batch, len] (default: targets > 0).
        Returns:
          (loss, metrics) with metrics `loss`, `z_loss`, `accuracy`,
          `num_tokens` (all scalars).
        """
        targets = batch["decoder_target_tokens"]
        weights = batch.get("decoder_loss_weights")
        weights = (targets > 0) if weights is None else weights
        weights = weights.astype(jnp.float32)
        logits = self.logits(params, batch["encoder_input_tokens"],
                             batch["decoder_input_tokens"], dropout_rng)
        vocab = logits.shape[-1]
        log_z = jax.nn.logsumexp(logits, axis=-1)
        confidence = 1.0 - label_smoothing
        off = label_smoothing / (vocab - 1) if vocab > 1 else 0.0
        target_lp = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - log_z
        cross_entropy = -confidence * target_lp
        if label_smoothing:
            log_probs = logits - log_z[..., None]
            cross_entropy = cross_entropy - off * (jnp.sum(log_probs, -1) - target_lp)
            # Subtract the entropy of the smoothed target so the minimum is 0 (as T5X).
            normalizer = -(confidence * jnp.log(confidence)
                           + (vocab - 1) * off * jnp.log(off + 1e-20))
            cross_entropy = cross_entropy - normalizer
        z_term = z_loss * jnp.square(log_z)
        num_tokens = jnp.maximum(jnp.sum(weights), 1.0)
        total = jnp.sum((cross_entropy + z_term) * weights) / num_tokens
        correct = (first_argmax(logits) == targets).astype(jnp.float32)
        metrics = {
            "loss": total,
            "z_loss": jnp.sum(z_term * weights) / num_tokens,
            "accuracy": jnp.sum(correct * weights) / num_tokens,
            "num_tokens": jnp.sum(weights),
        }
        return total, metrics

    def token_log_probs(self, params: Params, encoder_input_tokens: Array,
                        decoder_target_tokens: Array, dropout_rng: Array | None = None,
                        *, exclude_pad: bool = False) -> Array:
        """log p(target_t | input, target_<t): [batch, dec_len] float32, 0 on padding.

        With `exclude_pad`, p is the distribution generation samples from
        (see `exclude_padding`); without it, the network's full softmax.
        """
        logits = self.logits(params, encoder_input_tokens,
                             shift_right(decoder_target_tokens), dropout_rng)
        if exclude_pad:
            logits = exclude_padding(logits)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        chosen = jnp.take_along_axis(log_probs, decoder_target_tokens[..., None], -1)[..., 0]
        return jnp.where(decoder_target_tokens > 0, chosen, 0.0)

    def score(self, params: Params, encoder_input_tokens: Array,
              decoder_target_tokens: Array) -> Array:
        """Sequence log-likelihood [batch] float32."""
        return jnp.sum(self.token_log_probs(params, encoder_input_tokens,
                                            decoder_target_tokens), axis=-1)

    def init_decode_cache(self, params: Params, encoder_input_tokens: Array,
                          max_decode_len: int) -> dict:
        """Encodes the input once and builds the decode cache (cross K/V included)."""
        encoded = self.encode(params, encoder_input_tokens)
        return self.module.apply({"params": params}, encoded, encoder_input_tokens,
                                 max_decode_len, method=network.Transformer.init_cache)

    def decode_step(self, params: Params, cache: dict, tokens: Array) -> tuple[Array, dict]:
        """tokens [batch] -> next-token logits [batch, vocab] float32, new cache."""
        return self.module.apply({"params": params}, cache, tokens,
                                 method=network.Transformer.decode_step)

    def predict(self, params: Params, encoder_input_tokens: Array, rng: Array, *,
                max_decode_len: int, temperature: float | Array = 0.0, top_k: int = 0,
                top_p: float = 1.0) -> decoding.DecodeOutput:
        """Samples (greedy by default) with the cached loop; call under `jax.jit`.

        Padding is never generated (see `exclude_padding`).
        """
        cache = self.init_decode_cache(params, encoder_input_tokens, max_decode_len)

        def tokens_to_logits(tokens, cache):
            logits, cache = self.decode_step(params, cache, tokens)
            return exclude_padding(logits), cache, {}

        return decoding.sample(tokens_to_logits, cache, rng,
                               batch_size=encoder_input_tokens.shape[0],
                               max_decode_len=max_decode_len, eos_id=EOS_ID,
                               start_id=DECODER_START_ID, temperature=temperature,
                               top_k=top_k, top_p=top_p)
