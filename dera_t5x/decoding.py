"""The generic cached sampling loop (greedy, temperature, top-k, top-p).

`sample` runs `tokens_to_logits` once per decode step inside `lax.scan`
(optionally a `lax.while_loop` over chunks of scan that stops once every row
has ended), with fixed shapes and no host round trip. It knows nothing about
models: plain decoding, RL rollouts and DeRa differ only in the
`tokens_to_logits` they pass. Call it under `jax.jit` with the parameters as
arguments of the jitted function.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
TokensToLogits = Callable[[Array, Any], tuple[Array, Any, dict[str, Array]]]


class DecodeOutput(NamedTuple):
    """tokens: [batch, max_decode_len] int32, 0 after the first EOS.
    lengths: [batch] int32, generated tokens including EOS (max_decode_len without EOS).
    log_probs: [batch, max_decode_len] float32, each chosen token under the
      distribution it was sampled from (temperature, top-k / top-p applied and
      renormalized; log_softmax(logits) for greedy rows); 0 after the end.
    aux_log_probs: name -> [batch, max_decode_len] float32, each auxiliary
      distribution of `tokens_to_logits` at the chosen token; 0 after the end.
    """

    tokens: Array
    lengths: Array
    log_probs: Array
    aux_log_probs: dict[str, Array]


def filter_logits(logits: Array, top_k: int = 0, top_p: float = 1.0) -> Array:
    """Masks all but the top-k and the top-p nucleus of logits [batch, vocab].

    top-k keeps every token whose logit ties the k-th largest; top-p keeps
    the smallest prefix of tokens sorted by probability whose mass reaches
    top_p (the most likely token is always kept). Masked logits are -inf.
    """
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Mass strictly before each sorted position; keep while it is < top_p.
        before = cumulative - jax.nn.softmax(sorted_logits, axis=-1)
        keep = before < top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def _check_static(batch_size: int, max_decode_len: int, top_k: int, top_p: float,
                  chunk_size: int | None) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if max_decode_len < 1:
        raise ValueError(f"max_decode_len must be >= 1, got {max_decode_len}.")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 turns it off), got {top_k}.")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 turns it off), got {top_p}.")
    if chunk_size is not None and not 1 <= chunk_size:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}.")


def sample(tokens_to_logits: TokensToLogits, init_cache: Any, rng: Array, *,
           batch_size: int, max_decode_len: int, eos_id: int = 1, start_id: int = 0,
           temperature: float | Array = 1.0, top_k: int = 0, top_p: float = 1.0,
           chunk_size: int | None = None) -> DecodeOutput:
    """Samples up to `max_decode_len` tokens per row.

    Args:
      tokens_to_logits: (previous tokens [batch] int32, cache) -> (logits
        [batch, vocab] float32, new cache, aux log-probs {name: [batch, vocab]}).
        Rows that have ended are fed 0 and their outputs are ignored.
      init_cache: any pytree.
      rng: the step-t key is `fold_in(rng, t)`, so equal logits give equal
        samples whatever produced them.
      temperature: scalar or [batch]; 0 means greedy for that row.
      top_k, top_p: static filters (0 and 1.0 turn them off).
      chunk_size: None runs all steps in one scan; an int runs a while loop of
        scans of that many steps and stops once every row has ended (the
        result is identical).
    """
    _check_static(batch_size, max_decode_len, top_k, top_p, chunk_size)
    temperature = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (batch_size,))
    greedy = temperature <= 0.0
    safe_temperature = jnp.where(greedy, 1.0, temperature)[:, None]

    def step(carry, t):
        tokens, cache, ended = carry
        logits, cache, aux = tokens_to_logits(tokens, cache)
        logits = logits.astype(jnp.float32)
        filtered = filter_logits(logits / safe_temperature, top_k, top_p)
        sampled = jax.random.categorical(jax.random.fold_in(rng, t), filtered, axis=-1)
        chosen = jnp.where(greedy, jnp.argmax(logits, axis=-1), sampled).astype(jnp.int32)
        sample_log_probs = jnp.where(greedy[:, None], jax.nn.log_softmax(logits),
                                     jax.nn.log_softmax(filtered))
        chosen = jnp.where(ended, 0, chosen)

        def gather(log_probs):
            value = jnp.take_along_axis(log_probs, chosen[:, None], axis=-1)[:, 0]
            return jnp.where(ended, 0.0, value)

        outputs = (chosen, gather(sample_log_probs),
                   {name: gather(lp.astype(jnp.float32)) for name, lp in aux.items()})
        ended = ended | (chosen == eos_id)
        return (chosen, cache, ended), outputs

    carry = (jnp.full((batch_size,), start_id, jnp.int32), init_cache,
             jnp.zeros((batch_size,), bool))
    if chunk_size is None:
        carry, (tokens, log_probs, aux) = jax.lax.scan(step, carry, jnp.arange(max_decode_len))
    else:
        carry, (tokens, log_probs, aux) = _chunked_scan(step, carry, max_decode_len, chunk_size)
    tokens, log_probs = tokens.T, log_probs.T
    aux = {name: value.T for name, value in aux.items()}
    ended_at = jnp.argmax(tokens == eos_id, axis=1) + 1
    lengths = jnp.where(jnp.any(tokens == eos_id, axis=1), ended_at, max_decode_len)
    return DecodeOutput(tokens, lengths.astype(jnp.int32), log_probs, aux)


def _chunked_scan(step, carry, max_decode_len: int, chunk_size: int):
    """`lax.scan(step, carry, arange(max_decode_len))`, stopping between chunks
    once every row has ended; outputs after the stop stay 0, as the scan
    would have produced them."""
    num_chunks = -(-max_decode_len // chunk_size)
    padded_len = num_chunks * chunk_size
    out_shapes = jax.eval_shape(lambda c: step(c, jnp.int32(0))[1], carry)
    buffers = jax.tree_util.tree_map(lambda s: jnp.zeros((padded_len,) + s.shape, s.dtype),
                                     out_shapes)

    def cond(state):
        chunk, (_, _, ended), _ = state
        return (chunk < num_chunks) & ~jnp.all(ended)

    def body(state):
        chunk, carry, buffers = state
        start = chunk * chunk_size
        carry, outputs = jax.lax.scan(step, carry, start + jnp.arange(chunk_size))
        buffers = jax.tree_util.tree_map(
            lambda buf, out: jax.lax.dynamic_update_slice_in_dim(buf, out, start, axis=0),
            buffers, outputs)
        return chunk + 1, carry, buffers

    _, carry, buffers = jax.lax.while_loop(cond, body, (jnp.int32(0), carry, buffers))
    return carry, jax.tree_util.tree_map(lambda b: b[:max_decode_len], buffers)
