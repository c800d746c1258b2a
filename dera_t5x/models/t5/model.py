"""`EncoderDecoderModel`: the T5 family behind the model protocol.

All methods are pure functions of `params` and can be jitted by callers; the
model object is a frozen dataclass of its config (hashable, a static jit
argument). Token conventions follow T5: padding 0, EOS 1, decoder start 0;
padding is never generated (`banned_ids`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from dera_t5x import decoding
from dera_t5x.models import protocol
from dera_t5x.models.t5 import network

Array = jax.Array
Params = Any
PAD_ID = 0
EOS_ID = 1
DECODER_START_ID = 0

# Regex over the '/'-joined parameter path -> logical axes of a 2-D kernel.
PARAM_AXES: tuple[tuple[str, tuple[str, str]], ...] = (
    (r"(attention|self_attention|encoder_decoder_attention)/(query|key|value)/kernel$",
     ("embed", "heads")),
    (r"(attention|self_attention|encoder_decoder_attention)/out/kernel$", ("heads", "embed")),
    (r"mlp/wi(_\d+)?/kernel$", ("embed", "mlp")),
    (r"mlp/wo/kernel$", ("mlp", "embed")),
    (r"token_embedder/embedding$", ("vocab", "embed")),
    (r"logits_dense/kernel$", ("embed", "vocab")),
)


def exclude_padding(logits: Array) -> Array:
    """Logits [..., vocab] with the padding id made impossible (see `protocol.ban_tokens`)."""
    return protocol.ban_tokens(logits, (PAD_ID,))


def shift_right(targets: Array, start_id: int = DECODER_START_ID) -> Array:
    """Decoder inputs from targets: [batch, len] -> [batch, len], start id first."""
    shifted = jnp.roll(targets, 1, axis=-1).at[:, 0].set(start_id)
    return shifted


@functools.lru_cache(maxsize=32)
def _expected_shapes(model: "EncoderDecoderModel") -> dict[str, tuple[int, ...]]:
    return protocol.expected_shapes(model)


def _no_prompt_lengths(prompt_lengths: Array | None) -> None:
    if prompt_lengths is not None:
        raise ValueError("prompt_lengths is for decoder-only models; a T5 model reads its "
                         "whole encoder input (0 is padding). Pass prompt_lengths=None.")


@dataclasses.dataclass(frozen=True)
class EncoderDecoderModel:
    """A T5 model with the operations training and decoding need (`protocol.Model`)."""

    config: network.T5Config
    eos_ids = (EOS_ID,)
    banned_ids = (PAD_ID,)
    pad_id = PAD_ID

    @property
    def hidden_size(self) -> int:
        return self.config.emb_dim

    @property
    def module(self) -> network.Transformer:
        return network.Transformer(self.config)

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

    def response_states(self, params: Params, inputs: Array, responses: Array, *,
                        prompt_lengths: Array | None = None, dropout_rng: Array | None = None,
                        repeats: int = 1) -> tuple[Array, Array]:
        """Final decoder states [batch, len + 1, emb] and logits [batch, len + 1, vocab]
        of `[start] + responses`: position t has read response_<t. Each input row is
        encoded once for its `repeats` response rows (one dropout draw for them)."""
        _no_prompt_lengths(prompt_lengths)
        protocol.check_repeats(inputs, responses, repeats)
        start = jnp.full((responses.shape[0], 1), DECODER_START_ID, responses.dtype)
        rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
        return self.module.apply({"params": params}, inputs,
                                 jnp.concatenate([start, responses], axis=1),
                                 deterministic=dropout_rng is None, repeats=repeats, rngs=rngs,
                                 method=network.Transformer.hidden_and_logits)

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
        logits = self.logits(params, batch["encoder_input_tokens"],
                             batch["decoder_input_tokens"], dropout_rng)
        return protocol.cross_entropy_metrics(logits, targets, weights, z_loss=z_loss,
                                              label_smoothing=label_smoothing)

    def token_log_probs(self, params: Params, inputs: Array, responses: Array, *,
                        prompt_lengths: Array | None = None, dropout_rng: Array | None = None,
                        exclude_banned: bool = False, repeats: int = 1) -> Array:
        """log p(target_t | input, target_<t): [batch, dec_len] float32, 0 on padding.

        Args:
          inputs: encoder input tokens [batch / repeats, enc_len].
          responses: decoder targets [batch, dec_len], 0-padded.
          exclude_banned: p is the distribution generation samples from
            (padding excluded); without it, the network's full softmax.
        """
        # Through response_states, as the RL policy reads its log-probs: the
        # same computation, so a policy equal to its reference has KL 0 exactly.
        _, logits = self.response_states(params, inputs, responses,
                                         prompt_lengths=prompt_lengths, dropout_rng=dropout_rng,
                                         repeats=repeats)
        logits = logits[:, :-1]
        if exclude_banned:
            logits = exclude_padding(logits)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        chosen = jnp.take_along_axis(log_probs, responses[..., None], -1)[..., 0]
        return jnp.where(responses > 0, chosen, 0.0)

    def score(self, params: Params, inputs: Array, responses: Array, *,
              prompt_lengths: Array | None = None, repeats: int = 1) -> Array:
        """Sequence log-likelihood [batch] float32."""
        return jnp.sum(self.token_log_probs(params, inputs, responses,
                                            prompt_lengths=prompt_lengths, repeats=repeats),
                       axis=-1)

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

    def prefill(self, params: Params, inputs: Array, max_decode_len: int, *,
                prompt_lengths: Array | None = None, repeats: int = 1) -> tuple[Array, dict]:
        """The encoder pass and the first decoder step (the start token), once
        per input row: (logits [batch * repeats, vocab] float32, cache)."""
        _no_prompt_lengths(prompt_lengths)
        protocol.check_repeats(inputs, None, repeats)
        cache = self.init_decode_cache(params, inputs, max_decode_len)
        start = jnp.full((inputs.shape[0],), DECODER_START_ID, jnp.int32)
        return protocol.repeat_prefill(self, *self.decode_step(params, cache, start), repeats)

    def predict(self, params: Params, encoder_input_tokens: Array, rng: Array, *,
                max_decode_len: int, temperature: float | Array = 0.0, top_k: int = 0,
                top_p: float = 1.0, chunk_size: int | None = None, repeats: int = 1,
                partitioner: Any = None, prompt_lengths: Array | None = None
                ) -> decoding.DecodeOutput:
        """Samples (greedy by default) with the cached loop; call under `jax.jit`
        (max_decode_len, top_k, top_p, chunk_size, repeats static;
        `decoding.sample`). `repeats` samples per input row, consecutive rows.

        Padding is never generated (see `exclude_padding`). With a
        `partitioning.Partitioner` the decode cache follows `cache_axes` (rows
        over 'data', heads over 'model'); placing params and inputs is the
        caller's (`partitioner.shard_params`, `shard_batch`).
        """
        logits, cache = self.prefill(params, encoder_input_tokens, max_decode_len,
                                     prompt_lengths=prompt_lengths, repeats=repeats)
        if partitioner is not None:
            cache = partitioner.constrain(cache, self.cache_axes(cache))

        def tokens_to_logits(tokens, cache):
            logits, cache = self.decode_step(params, cache, tokens)
            return exclude_padding(logits), cache, {}

        return decoding.sample(tokens_to_logits, cache, rng,
                               batch_size=encoder_input_tokens.shape[0] * repeats,
                               max_decode_len=max_decode_len, eos_id=EOS_ID,
                               initial=(exclude_padding(logits), {}), temperature=temperature,
                               top_k=top_k, top_p=top_p, chunk_size=chunk_size)

    def check_params(self, params: Params, source: str = "The parameter set") -> Params:
        """Names and shapes against the config; errors name the parameter."""
        return protocol.check_param_shapes(params, _expected_shapes(self), source)

    def param_axes(self, path: str, ndim: int) -> tuple[str | None, ...]:
        """Logical axes of a parameter (`PARAM_AXES`; others replicated)."""
        if ndim == 2:
            for pattern, axes in PARAM_AXES:
                if re.search(pattern, path):
                    return axes
        return (None,) * ndim

    def cache_axes(self, cache: dict) -> dict:
        """Rows over 'batch', keys / values over 'heads'; the step index replicated."""
        def layer_axes(layer):
            return {name: ("batch", "heads", None, None) for name in layer}
        return {"index": (), "cross_bias": ("batch", None, None, None),
                "layers": tuple(layer_axes(layer) for layer in cache["layers"])}
