"""`DecoderOnlyModel`: Llama, Mistral and Qwen2 behind the model protocol.

All methods are pure functions of `params` and can be jitted by callers; the
model object is a frozen dataclass of its config (hashable, a static jit
argument). A decoder-only vocabulary has no reserved padding id: no token is
banned, responses are padded with 0 after their first EOS, and their end is
found from the EOS (`protocol.response_mask`), never from the padding.

Inputs are right-padded prompts [batch, in_len] with `prompt_lengths`
[batch] (required, >= 1). A prompt and its response are run as one
sequence: the response's tokens sit after the prompt's padded slots, at
rotary positions prompt_length + t, and the padding is never attended to,
so no re-packing of rows is needed (see `network.decode_key_layout`).
With `repeats` (see `protocol`), `prefill` runs each prompt once and
repeats its cache; the teacher-forced passes repeat the prompts.

These models have no dropout: `dropout_rng` is accepted and ignored.
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
from dera_t5x.models.decoder_only import network

Array = jax.Array
Params = Any
PAD_ID = 0

# Regex over the '/'-joined parameter path -> logical axes of a 2-D kernel.
PARAM_AXES: tuple[tuple[str, tuple[str, str]], ...] = (
    (r"self_attn/(q_proj|k_proj|v_proj)/kernel$", ("embed", "heads")),
    (r"self_attn/o_proj/kernel$", ("heads", "embed")),
    (r"mlp/(gate_proj|up_proj)/kernel$", ("embed", "mlp")),
    (r"mlp/down_proj/kernel$", ("mlp", "embed")),
    (r"embed_tokens/embedding$", ("vocab", "embed")),
    (r"lm_head/kernel$", ("embed", "vocab")),
)


@functools.lru_cache(maxsize=32)
def _expected_shapes(model: "DecoderOnlyModel") -> dict[str, tuple[int, ...]]:
    return protocol.expected_shapes(model)


def _require_prompt_lengths(prompt_lengths: Array | None, method: str) -> Array:
    if prompt_lengths is None:
        raise ValueError(f"DecoderOnlyModel.{method} needs prompt_lengths [batch] (the "
                         "number of real tokens of each right-padded prompt); a decoder-only "
                         "model cannot tell padding from tokens.")
    return jnp.asarray(prompt_lengths, jnp.int32)


@dataclasses.dataclass(frozen=True)
class DecoderOnlyModel:
    """A Llama / Mistral / Qwen2 model with the operations training and decoding
    need (`protocol.Model`)."""

    config: network.DecoderOnlyConfig
    banned_ids = ()
    pad_id = PAD_ID

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self.config.eos_token_ids

    @property
    def hidden_size(self) -> int:
        """The width of `response_states`."""
        return self.config.hidden_size

    @property
    def module(self) -> network.DecoderOnlyLM:
        return network.DecoderOnlyLM(self.config)

    def _check_length(self, length: int, what: str) -> None:
        limit = self.config.max_position_embeddings
        if length > limit:
            raise ValueError(f"{what} is {length} tokens long, beyond the model's "
                             f"max_position_embeddings={limit}; shorten the inputs or "
                             "max_decode_len.")

    def init(self, rng: Array) -> Params:
        """Random float32 parameters."""
        return self.module.init(rng, jnp.ones((1, 4), jnp.int32))["params"]

    def logits(self, params: Params, tokens: Array) -> Array:
        """Causal LM logits [batch, len, vocab] float32 of unpadded (or
        right-padded) sequences [batch, len]."""
        self._check_length(tokens.shape[1], "The sequence")
        logits, _ = self.module.apply({"params": params}, tokens)
        return logits

    def loss(self, params: Params, batch: Mapping[str, Array],
             dropout_rng: Array | None = None, *, z_loss: float = 0.0,
             label_smoothing: float = 0.0) -> tuple[Array, dict[str, Array]]:
        """Teacher-forced cross-entropy, as T5X's DecoderOnlyModel (no packing).

        Args:
          batch: `decoder_input_tokens` (the targets shifted right),
            `decoder_target_tokens` and `decoder_loss_weights` [batch, len],
            right-padded; the weights are required, since 0 is a real token
            in these vocabularies. Packed (`decoder_segment_ids`,
            `decoder_positions`) and prefix-LM (`decoder_causal_attention`)
            batches are refused.
          dropout_rng: ignored (no dropout).
        Returns:
          (loss, metrics) with metrics `loss`, `z_loss`, `accuracy`,
          `num_tokens` (all scalars).
        """
        del dropout_rng
        unsupported = sorted({"decoder_segment_ids", "decoder_positions",
                              "decoder_causal_attention"} & set(batch))
        if unsupported:
            raise ValueError(f"DecoderOnlyModel.loss does not support packed or prefix-LM "
                             f"batches (features {unsupported}); use unpacked, "
                             "right-padded sequences with a causal mask.")
        if "decoder_loss_weights" not in batch:
            raise ValueError("DecoderOnlyModel.loss needs batch['decoder_loss_weights']: a "
                             "decoder-only vocabulary has no padding id to infer them from.")
        logits = self.logits(params, batch["decoder_input_tokens"])
        return protocol.cross_entropy_metrics(logits, batch["decoder_target_tokens"],
                                     batch["decoder_loss_weights"], z_loss=z_loss,
                                     label_smoothing=label_smoothing)

    def _joint_states(self, params: Params, inputs: Array, responses: Array,
                      prompt_lengths: Array) -> Array:
        """Final states [batch, len + 1, hidden] of prompt + responses: position t
        is sequence position prompt_length - 1 + t (it predicts response_t)."""
        prompt_len, length = inputs.shape[1], responses.shape[1]
        self._check_length(prompt_len + length, "The prompt plus the responses")
        positions, valid = network.decode_key_layout(prompt_lengths, prompt_len, length)
        tokens = jnp.concatenate([inputs.astype(jnp.int32), responses.astype(jnp.int32)], 1)
        hidden, _ = self.module.apply({"params": params}, tokens, positions, valid,
                                      method=network.DecoderOnlyLM.hidden_states)
        last = jnp.clip(prompt_lengths - 1, 0, prompt_len - 1)
        first = jnp.take_along_axis(hidden, last[:, None, None], axis=1)
        return jnp.concatenate([first, hidden[:, prompt_len:]], axis=1)

    def _logits_of(self, params: Params, hidden: Array) -> Array:
        return self.module.apply({"params": params}, hidden,
                                 method=network.DecoderOnlyLM.logits_of)

    def _repeated_prompts(self, inputs: Array, responses: Array, prompt_lengths: Array | None,
                          repeats: int, method: str) -> tuple[Array, Array]:
        """(inputs, prompt_lengths) with a row per response row."""
        prompt_lengths = _require_prompt_lengths(prompt_lengths, method)
        protocol.check_repeats(inputs, responses, repeats)
        return protocol.repeat_rows(inputs, repeats), protocol.repeat_rows(prompt_lengths, repeats)

    def response_states(self, params: Params, inputs: Array, responses: Array, *,
                        prompt_lengths: Array | None = None, dropout_rng: Array | None = None,
                        repeats: int = 1) -> tuple[Array, Array]:
        """(final-norm states [batch, len + 1, hidden], logits [batch, len + 1,
        vocab] float32); position t has read the prompt and response_<t."""
        inputs, prompt_lengths = self._repeated_prompts(inputs, responses, prompt_lengths,
                                                        repeats, "response_states")
        hidden = self._joint_states(params, inputs, responses, prompt_lengths)
        return hidden, self._logits_of(params, hidden)

    def token_log_probs(self, params: Params, inputs: Array, responses: Array, *,
                        prompt_lengths: Array | None = None, dropout_rng: Array | None = None,
                        exclude_banned: bool = False, repeats: int = 1) -> Array:
        """log p(response_t | prompt, response_<t): [batch, len] float32, 0 after
        the first EOS (`protocol.response_mask`).

        Args:
          inputs: right-padded prompts [batch / repeats, in_len].
          responses: [batch, len]; anything may follow the first EOS.
          prompt_lengths: [batch / repeats], required.
          exclude_banned: a no-op (no token is banned), kept for the protocol.
        """
        inputs, prompt_lengths = self._repeated_prompts(inputs, responses, prompt_lengths,
                                                        repeats, "token_log_probs")
        hidden = self._joint_states(params, inputs, responses, prompt_lengths)
        logits = self._logits_of(params, hidden[:, :-1])
        if exclude_banned:
            logits = protocol.ban_tokens(logits, self.banned_ids)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        chosen = jnp.take_along_axis(log_probs, responses[..., None].astype(jnp.int32),
                                     -1)[..., 0]
        return chosen * protocol.response_mask(responses, self.eos_ids)

    def score(self, params: Params, inputs: Array, responses: Array, *,
              prompt_lengths: Array | None = None, repeats: int = 1) -> Array:
        """Sequence log-likelihood [batch] float32 (through the first EOS)."""
        return jnp.sum(self.token_log_probs(params, inputs, responses,
                                            prompt_lengths=prompt_lengths, repeats=repeats),
                       axis=-1)

    def prefill(self, params: Params, inputs: Array, max_decode_len: int, *,
                prompt_lengths: Array | None = None, repeats: int = 1) -> tuple[Array, dict]:
        """Runs the right-padded prompts once: (logits of the first new token
        [batch * repeats, vocab] float32, cache: the prompt's keys / values,
        read-only from here on, and a buffer of max_decode_len slots for the
        new tokens'; see `network`), each prompt's rows `repeats` times."""
        prompt_lengths = _require_prompt_lengths(prompt_lengths, "prefill")
        protocol.check_repeats(inputs, None, repeats)
        self._check_length(inputs.shape[1] + max_decode_len,
                           "The prompt plus max_decode_len")
        return protocol.repeat_prefill(self, *self.module.apply(
            {"params": params}, inputs.astype(jnp.int32), prompt_lengths, max_decode_len,
            method=network.DecoderOnlyLM.prefill), repeats)

    def decode_step(self, params: Params, cache: dict, tokens: Array) -> tuple[Array, dict]:
        """tokens [batch] -> (next-token logits [batch, vocab] float32, cache).
        At most max_decode_len steps fit the cache of `prefill`."""
        return self.module.apply({"params": params}, cache, tokens.astype(jnp.int32),
                                 method=network.DecoderOnlyLM.decode_step)

    def predict(self, params: Params, inputs: Array, rng: Array, *,
                prompt_lengths: Array, max_decode_len: int,
                temperature: float | Array = 0.0, top_k: int = 0,
                top_p: float = 1.0, chunk_size: int | None = None,
                repeats: int = 1) -> decoding.DecodeOutput:
        """Samples (greedy by default) continuations of right-padded prompts with
        the cached loop; call under `jax.jit` (max_decode_len, top_k, top_p,
        chunk_size, repeats static; `decoding.sample`). `repeats` samples per
        prompt, consecutive rows."""
        logits, cache = self.prefill(params, inputs, max_decode_len,
                                     prompt_lengths=prompt_lengths, repeats=repeats)

        def tokens_to_logits(tokens, cache):
            logits, cache = self.decode_step(params, cache, tokens)
            return protocol.ban_tokens(logits, self.banned_ids), cache, {}

        return decoding.sample(tokens_to_logits, cache, rng,
                               batch_size=inputs.shape[0] * repeats,
                               max_decode_len=max_decode_len, eos_id=self.eos_ids or -1,
                               initial=(protocol.ban_tokens(logits, self.banned_ids), {}),
                               temperature=temperature, top_k=top_k, top_p=top_p,
                               chunk_size=chunk_size)

    def check_params(self, params: Params, source: str = "The parameter set") -> Params:
        """Names and shapes against the config; errors name the parameter."""
        return protocol.check_param_shapes(params, _expected_shapes(self), source)

    def param_axes(self, path: str, ndim: int) -> tuple[str | None, ...]:
        """Logical axes of a parameter (`PARAM_AXES`; biases, norms replicated).
        Key / value kernels use 'heads' too (their kv_heads * head_dim columns;
        `partitioning` replicates a dimension the mesh does not divide)."""
        if ndim == 2:
            for pattern, axes in PARAM_AXES:
                if re.search(pattern, path):
                    return axes
        return (None,) * ndim

    def cache_axes(self, cache: dict) -> dict:
        """Rows over 'batch', keys / values (the prompt's and the new tokens')
        over 'heads' (the kv heads); the step index replicated."""
        def layer_axes(layers):
            return tuple({name: ("batch", "heads", None, None) for name in layer}
                         for layer in layers)

        return {"index": (), "prompt_lengths": ("batch",),
                "prompt": layer_axes(cache["prompt"]), "new": layer_axes(cache["new"])}
