"""The generic cached sampling loop (greedy, temperature, top-k, top-p).

`sample` runs `tokens_to_logits` once per decode step inside `lax.scan`
(optionally a `lax.while_loop` over chunks of scan that stops once every row
has ended), with fixed shapes and no host round trip per step. It knows
nothing about models: plain decoding, RL rollouts and DeRa differ only in the
`tokens_to_logits` they pass. Call it under `jax.jit` with the parameters as
arguments of the jitted function.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
# (previous tokens [batch], cache) -> (logits [batch, vocab], cache,
#                                      {name: auxiliary logits [batch, vocab]}).
TokensToLogits = Callable[[Array, Any], tuple[Array, Any, dict[str, Array]]]


class DecodeOutput(NamedTuple):
    """The sampled sequences and their per-token log-probs.

    Attributes:
      tokens: [batch, max_decode_len] int32; 0 after the first EOS.
      lengths: [batch] int32; generated tokens including the EOS, or
        max_decode_len for a row without EOS.
      log_probs: [batch, max_decode_len] float32; each chosen token under the
        distribution it was sampled from (temperature, then top-k / top-p,
        renormalized); under log_softmax(logits) for greedy rows; 0 after the end.
      aux_log_probs: name -> [batch, max_decode_len] float32; each chosen
        token under the softmax of that auxiliary logits of `tokens_to_logits`;
        0 after the end.
    """

    tokens: Array
    lengths: Array
    log_probs: Array
    aux_log_probs: dict[str, Array]


def first_argmax(x: Array) -> Array:
    """`jnp.argmax(x, axis=-1)`, the first index of the max (rows holding NaN
    give x.shape[-1]), as two plain reduces: XLA:CPU runs argmax's variadic
    reduce several times slower. Float indices are exact below 2**24."""
    is_max = x == jnp.max(x, axis=-1, keepdims=True)
    index = jnp.arange(x.shape[-1], dtype=jnp.float32)
    return jnp.min(jnp.where(is_max, index, x.shape[-1]), axis=-1).astype(jnp.int32)


def filter_logits(logits: Array, top_k: int = 0, top_p: float = 1.0) -> Array:
    """Keeps the top-k tokens, then the top-p nucleus of what is left.

    Both filters rank tokens by logit with ties broken towards the lower token
    id (as `lax.top_k` and `argmax` do), so top-k keeps exactly
    min(top_k, vocab) tokens and top_k=1 is greedy. top-p keeps the shortest
    prefix of that ranking whose probability (softmax of the logits after
    top-k, summed in float32) reaches top_p; the most likely token is always
    kept. Filters at 0 / 1.0 are off.

    Args:
      logits: [..., vocab] float.
      top_k: static; 0 = off.
      top_p: static, in (0, 1]; 1.0 = off.

    Returns:
      [..., vocab]: the kept logits unchanged, the others -inf.
    """
    _check_filters(top_k, top_p)
    vocab = logits.shape[-1]
    if top_k >= vocab:
        top_k = 0
    if not top_k and top_p >= 1.0:
        return logits
    values, ids = jax.lax.top_k(logits, top_k or vocab)  # [..., k], descending
    if top_p < 1.0:
        probs = jax.nn.softmax(values.astype(jnp.float32), axis=-1)
        cumulative = jnp.cumsum(probs, axis=-1)
        mass_before = jnp.concatenate(
            [jnp.zeros_like(cumulative[..., :1]), cumulative[..., :-1]], axis=-1)
        values = jnp.where(mass_before < top_p, values, -jnp.inf)
    masked = jnp.full_like(logits, -jnp.inf)
    return jnp.put_along_axis(masked, ids, values, axis=-1, inplace=False)


def sample(tokens_to_logits: TokensToLogits, init_cache: Any, rng: Array, *,
           batch_size: int, max_decode_len: int, eos_id: int | Sequence[int] = 1,
           start_id: int | Array = 0, initial: tuple[Array, dict[str, Array]] | None = None,
           temperature: float | Array = 1.0, top_k: int = 0, top_p: float = 1.0,
           chunk_size: int | None = None) -> DecodeOutput:
    """Samples up to `max_decode_len` tokens per row.

    Step t samples from filter_logits(logits_t / temperature) with key
    `fold_in(rng, t)`, forces the output of ended rows to 0, then feeds the
    chosen tokens (0 for a row that has ended, by emitting an EOS) to get
    logits_{t+1}. logits_0 are `initial` (a model's prefill) or come from
    feeding `start_id`. A result therefore depends only on rng and the
    logits, not on how `tokens_to_logits` computes them.

    Args:
      tokens_to_logits: (tokens [batch] int32, cache) -> (logits [batch,
        vocab], new cache, aux {name: [batch, vocab] logits of another
        distribution, normalized here}); aux may be empty.
      init_cache: any pytree; where each row is (its position) lives there.
      rng: a PRNG key.
      batch_size: static.
      max_decode_len: static, >= 1.
      eos_id: the token, or tokens, that end a row.
      start_id: the token fed at step 0 (scalar or [batch]) when `initial`
        is None.
      initial: (logits [batch, vocab], aux) of step 0, e.g. from a prefill.
      temperature: scalar or [batch], may be traced; finite and >= 0 (checked
        when concrete). 0, or anything up to `GREEDY_TEMPERATURE` (1e-4, as in
        T5X), means greedy (argmax, lowest id on ties) for that row and
        ignores top-k / top-p. A batch that is all greedy draws no random
        numbers.
      top_k: static; 0 = off. See `filter_logits`.
      top_p: static; 1.0 = off. See `filter_logits`.
      chunk_size: static. None runs one scan of max_decode_len steps; an int
        runs a `while_loop` of scans of chunk_size steps that stops at the first
        chunk boundary where every row has ended (identical results, fewer
        steps). Step 0 runs before the loop; of the others, the first
        (max_decode_len - 1) % chunk_size run as their own scan, which
        compiles the step a second time: a divisor of max_decode_len - 1
        avoids that.

    Returns:
      A `DecodeOutput`.

    Raises:
      ValueError: for bad static arguments or temperature, before tracing.
    """
    _check_arguments(batch_size, max_decode_len, top_k, top_p, chunk_size, temperature)
    eos_ids = jnp.asarray(np.atleast_1d(np.asarray(eos_id, np.int32)))
    static_greedy = is_greedy(temperature)  # else a traced choice per call (lax.cond below)
    temperature = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (batch_size,))
    greedy = ~(temperature > GREEDY_TEMPERATURE)  # [batch]; also NaN (traced) rows
    all_greedy = jnp.all(greedy)
    safe_temperature = jnp.where(greedy, 1.0, temperature)[:, None]  # [batch, 1]
    filtering = bool(top_k) or top_p < 1.0

    def choose(logits, aux, ended, t):
        """Samples step t: (tokens fed next [batch], outputs, ended)."""
        _check_step_shapes(logits, aux, batch_size)
        scaled = logits.astype(jnp.float32) / safe_temperature  # [batch, vocab]
        filtered = scaled
        if filtering:
            filtered = jnp.where(greedy[:, None], scaled, filter_logits(scaled, top_k, top_p))
        best = first_argmax(scaled)

        def draw():
            # jax.random.categorical's Gumbel-max draw (the same noise, the same
            # tokens), with its argmax as `first_argmax`.
            noise = jax.random.gumbel(jax.random.fold_in(rng, t), filtered.shape, filtered.dtype)
            return jnp.where(greedy, best, first_argmax(noise + filtered))

        # An all-greedy batch skips the draw (its noise would be thrown away).
        chosen = best if static_greedy else jax.lax.cond(all_greedy, lambda: best, draw)
        chosen = jnp.where(ended, 0, chosen).astype(jnp.int32)  # [batch]

        def log_prob(logits):  # log_softmax(logits) at chosen: [batch, vocab] -> [batch]
            log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            value = jnp.take_along_axis(log_probs, chosen[:, None], axis=-1)[:, 0]
            return jnp.where(ended, 0.0, value)

        outputs = (chosen, log_prob(filtered),
                   {name: log_prob(value) for name, value in aux.items()})
        ended = ended | jnp.isin(chosen, eos_ids)
        return jnp.where(ended, 0, chosen), outputs, ended

    def step(carry, t):
        tokens, cache, ended = carry
        logits, cache, aux = tokens_to_logits(tokens, cache)
        tokens, outputs, ended = choose(logits, aux, ended, t)
        return (tokens, cache, ended), outputs

    if initial is None:
        start = jnp.broadcast_to(jnp.asarray(start_id, jnp.int32), (batch_size,))
        logits, init_cache, aux = tokens_to_logits(start, init_cache)
    else:
        logits, aux = initial
    # Step 0 samples from the first logits; steps 1 .. max_decode_len - 1 feed, then sample.
    tokens, first, ended = choose(logits, aux, jnp.zeros((batch_size,), bool), 0)
    carry = (tokens, init_cache, ended)
    steps = jnp.arange(1, max_decode_len)
    if chunk_size is None or max_decode_len == 1:
        _, outputs = jax.lax.scan(step, carry, steps)
    else:
        outputs = _scan_with_early_exit(step, carry, steps, min(chunk_size, max_decode_len - 1))
    outputs = jax.tree_util.tree_map(lambda x0, xs: jnp.concatenate([x0[None], xs], axis=0),
                                     first, outputs)
    tokens, log_probs, aux = jax.tree_util.tree_map(lambda x: x.T, outputs)
    is_eos = jnp.isin(tokens, eos_ids)  # [batch, max_decode_len]
    lengths = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1) + 1,
                        max_decode_len).astype(jnp.int32)
    return DecodeOutput(tokens, lengths, log_probs, aux)


def _scan_with_early_exit(step: Callable, carry: Any, steps: Array, chunk_size: int) -> Any:
    """The outputs of `lax.scan(step, carry, steps)`, stacked on axis 0,
    skipping whole chunks once every row has ended (carry[-1] all true).

    Skipped steps are left 0, which is what the scan would output for rows
    that have ended. `step` never runs past the last of `steps`.
    """
    length = steps.shape[0]
    head = length % chunk_size
    num_chunks = length // chunk_size
    head_outputs = None
    if head:
        carry, head_outputs = jax.lax.scan(step, carry, steps[:head])
    out_shapes = jax.eval_shape(lambda c: step(c, jnp.int32(0))[1], carry)
    buffers = jax.tree_util.tree_map(
        lambda s: jnp.zeros((num_chunks * chunk_size,) + s.shape, s.dtype), out_shapes)

    def cond(state):
        chunk, carry, _ = state
        return (chunk < num_chunks) & ~jnp.all(carry[-1])

    def body(state):
        chunk, carry, buffers = state
        offset = chunk * chunk_size
        carry, outputs = jax.lax.scan(
            step, carry, jax.lax.dynamic_slice_in_dim(steps, head + offset, chunk_size))
        buffers = jax.tree_util.tree_map(
            lambda buf, out: jax.lax.dynamic_update_slice_in_dim(buf, out, offset, axis=0),
            buffers, outputs)
        return chunk + 1, carry, buffers

    _, _, buffers = jax.lax.while_loop(cond, body, (jnp.int32(0), carry, buffers))
    if head_outputs is None:
        return buffers
    return jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b], axis=0),
                                  head_outputs, buffers)


# Temperatures up to this are greedy (as in T5X): dividing logits by them
# would overflow to inf and sample NaN.
GREEDY_TEMPERATURE = 1e-4


def check_temperature(temperature: float | Array) -> None:
    """Raises ValueError for a concrete temperature that is not a finite number
    >= 0 (NaN, inf, negative); traced ones pass."""
    if isinstance(temperature, jax.core.Tracer):
        return
    try:
        values = np.asarray(temperature, np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"temperature must be a number or an array of numbers, got "
                         f"{temperature!r}.") from e
    if not (np.all(np.isfinite(values)) and np.all(values >= 0.0)):
        raise ValueError(f"temperature must be >= 0 and finite (0, or anything up to "
                         f"{GREEDY_TEMPERATURE:g}, is greedy), got {temperature}.")


def is_greedy(temperature: float | Array) -> bool:
    """Whether `temperature` is concrete and at most `GREEDY_TEMPERATURE` for
    every row: `sample` then compiles plain argmax decoding, with no random draw."""
    return (not isinstance(temperature, jax.core.Tracer)
            and bool(np.all(np.asarray(temperature, np.float32) <= GREEDY_TEMPERATURE)))


def check_lengths(max_decode_len: int) -> None:
    """Raises ValueError unless max_decode_len is an int >= 1."""
    if not isinstance(max_decode_len, (int, np.integer)) or max_decode_len < 1:
        raise ValueError(f"max_decode_len must be an integer >= 1, got {max_decode_len!r}.")


def _check_filters(top_k: int, top_p: float) -> None:
    if not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 turns it off), got {top_k!r}.")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1.0 turns it off), got {top_p!r}.")


def _check_arguments(batch_size: int, max_decode_len: int, top_k: int, top_p: float,
                     chunk_size: int | None, temperature: float | Array) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    check_lengths(max_decode_len)
    _check_filters(top_k, top_p)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, or None for no early exit; got {chunk_size}.")
    if jnp.shape(temperature) not in ((), (batch_size,)):
        raise ValueError(f"temperature must be a scalar or have shape [batch_size] = "
                         f"({batch_size},), got shape {jnp.shape(temperature)}.")
    check_temperature(temperature)


def _check_step_shapes(logits: Array, aux: dict[str, Array], batch_size: int) -> None:
    """Checks what tokens_to_logits returned (shapes are static, so at trace time)."""
    if logits.ndim != 2 or logits.shape[0] != batch_size:
        raise ValueError(f"tokens_to_logits must return logits [batch_size={batch_size}, "
                         f"vocab], got shape {logits.shape}.")
    for name, value in aux.items():
        if value.shape != logits.shape:
            raise ValueError(f"aux logits {name!r} must have the logits' shape "
                             f"{logits.shape}, got {value.shape}.")
