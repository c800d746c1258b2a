"""Decoding-time realignment (DeRa; Liu et al., ICML 2024, Algorithm 1).

At every decode step both parameter sets run on the same prefix, each with
its own cache, and the next token is sampled from

    softmax(lam * h_aligned + (1 - lam) * h_ref)

with raw logits mixed in float32. lam = 0 is the reference (SFT) model,
lam = 1 the aligned model, lam > 1 extrapolates (the model aligned at
beta / lam, which regularizes less than training did). `lam` is a traced
array of shape [batch], so new values never recompile.

DeRa is only a `tokens_to_logits` combinator: the sampling loop is
`decoding.sample`, shared with plain decoding and RL rollouts.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np

from dera_t5x import decoding
from dera_t5x import models
from dera_t5x import partitioning
from dera_t5x.models import protocol

Array = jax.Array
Params = Any


class DeraOutput(NamedTuple):
    """Result of DeRa decoding; a leading [K] axis is added by `dera_sweep`.

    tokens: [batch, max_decode_len] int32, 0 after the first EOS.
    lengths: [batch] int32, generated tokens including EOS.
    log_probs: [batch, max_decode_len] float32, each chosen token under the
      distribution it was sampled from (temperature, top-k / top-p applied).
    ref_log_probs, aligned_log_probs, mixed_log_probs: [batch, max_decode_len]
      float32, each chosen token under the reference, the aligned and the
      mixed (untempered, unfiltered) next-token distribution; 0 after the end.
    """

    tokens: Array
    lengths: Array
    log_probs: Array
    ref_log_probs: Array
    aligned_log_probs: Array
    mixed_log_probs: Array


def mix_logits(ref_logits: Array, aligned_logits: Array, lam: Array) -> Array:
    """lam * aligned + (1 - lam) * ref in float32.

    Args:
      ref_logits, aligned_logits: [batch, ..., vocab].
      lam: [batch] (or a scalar), broadcast over the remaining axes.
    """
    ref_logits = ref_logits.astype(jnp.float32)
    aligned_logits = aligned_logits.astype(jnp.float32)
    lam = jnp.asarray(lam, jnp.float32)
    lam = lam.reshape(lam.shape + (1,) * (ref_logits.ndim - lam.ndim))
    return lam * aligned_logits + (1.0 - lam) * ref_logits


def mixed_logits(model: models.Model, ref_logits: Array, aligned_logits: Array, lam: Array
                 ) -> Array:
    """The logits DeRa samples from: `mix_logits` with the model's banned ids
    excluded after mixing (lam > 1 would turn a logit masked in both models
    into a large positive one). [batch, ..., vocab]; lam [batch] or a scalar.
    Distillation (`training/distill.py`) takes its teacher from here."""
    return protocol.ban_tokens(mix_logits(ref_logits, aligned_logits, lam), model.banned_ids)


def _mix(model: models.Model, ref_logits: Array, aligned_logits: Array, lam: Array
         ) -> tuple[Array, dict[str, Array]]:
    """(mixed logits, aux {'ref', 'aligned', 'mixed'}) [batch, vocab], banned ids excluded."""
    mixed = mixed_logits(model, ref_logits, aligned_logits, lam)
    aux = {"ref": protocol.ban_tokens(ref_logits, model.banned_ids),
           "aligned": protocol.ban_tokens(aligned_logits, model.banned_ids), "mixed": mixed}
    return mixed, aux


def tokens_to_logits(model: models.Model, params_ref: Params, params_aligned: Params,
                     lam: Array):
    """The two-model step for `decoding.sample`; its cache is {'ref', 'aligned'}.

    Returns a function (tokens [batch], cache) -> (mixed logits [batch, vocab],
    cache, aux logits {'ref', 'aligned', 'mixed'} [batch, vocab], whose
    log-probs at the chosen tokens `decoding.sample` reports).
    """

    def step(tokens: Array, cache: dict) -> tuple[Array, dict, dict[str, Array]]:
        ref_logits, ref_cache = model.decode_step(params_ref, cache["ref"], tokens)
        aligned_logits, aligned_cache = model.decode_step(params_aligned, cache["aligned"], tokens)
        mixed, aux = _mix(model, ref_logits, aligned_logits, lam)
        return mixed, {"ref": ref_cache, "aligned": aligned_cache}, aux

    return step


def _as_output(out: decoding.DecodeOutput) -> DeraOutput:
    aux = out.aux_log_probs
    return DeraOutput(out.tokens, out.lengths, out.log_probs, aux["ref"], aux["aligned"],
                      aux["mixed"])


def _temperature_argument(temperature: float | Array) -> Array | None:
    """None for a greedy temperature (`decoding.is_greedy`), which keeps it
    static through the jit below so no random draw is compiled (a separate
    compile from sampling); anything else float32 and traced, so new
    temperatures do not recompile."""
    decoding.check_temperature(temperature)
    return None if decoding.is_greedy(temperature) else jnp.asarray(temperature, jnp.float32)


def _prefill(model: models.Model, params_ref: Params, params_aligned: Params, inputs: Array,
             prompt_lengths: Array | None, max_decode_len: int, num_samples: int,
             partitioner: partitioning.Partitioner | None) -> tuple[dict, dict]:
    """Both models' first logits and caches: ({'ref', 'aligned'} logits, caches),
    num_samples rows per input."""
    logits, caches = {}, {}
    for name, params in (("ref", params_ref), ("aligned", params_aligned)):
        logits[name], cache = model.prefill(params, inputs, max_decode_len,
                                            prompt_lengths=prompt_lengths, repeats=num_samples)
        if partitioner is not None:
            cache = partitioner.constrain(cache, model.cache_axes(cache))
        caches[name] = cache
    return logits, caches


def _sample(model, params_ref, params_aligned, first_logits, cache, lam, rng, temperature, *,
            max_decode_len, top_k, top_p, chunk_size) -> DeraOutput:
    """`decoding.sample` of the two-model step; temperature None is greedy."""
    initial = _mix(model, first_logits["ref"], first_logits["aligned"], lam)
    out = decoding.sample(
        tokens_to_logits(model, params_ref, params_aligned, lam), cache, rng,
        batch_size=lam.shape[0], max_decode_len=max_decode_len, eos_id=model.eos_ids,
        initial=initial, temperature=0.0 if temperature is None else temperature,
        top_k=top_k, top_p=top_p, chunk_size=chunk_size)
    return _as_output(out)


_STATIC = ("model", "max_decode_len", "top_k", "top_p", "chunk_size", "num_samples",
           "partitioner")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _decode(model, params_ref, params_aligned, inputs, prompt_lengths, lam, rng, temperature, *,
            num_samples, partitioner, **static):
    first_logits, cache = _prefill(model, params_ref, params_aligned, inputs, prompt_lengths,
                                   static["max_decode_len"], num_samples, partitioner)
    return _sample(model, params_ref, params_aligned, first_logits, cache, lam, rng, temperature,
                   **static)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _sweep(model, params_ref, params_aligned, inputs, prompt_lengths, lambdas, rng, temperature,
           *, num_samples, partitioner, **static):
    # The inputs' pass (encoder or prompt prefill): once per parameter set.
    first_logits, cache = _prefill(model, params_ref, params_aligned, inputs, prompt_lengths,
                                   static["max_decode_len"], num_samples, partitioner)
    batch = inputs.shape[0] * num_samples

    def decode_one(lam_value):
        lam = jnp.full((batch,), lam_value, jnp.float32)
        return _sample(model, params_ref, params_aligned, first_logits, cache, lam, rng,
                       temperature, **static)

    # The shared cache enters unbatched: only the growing self-attention K/V
    # and the per-step activations get the [K] axis.
    return jax.vmap(decode_one)(lambdas)


def check_compatible(model: models.Model, params_ref: Params, params_aligned: Params) -> None:
    """Raises ValueError naming the first parameter where either set disagrees
    with the model (in presence or shape): DeRa mixes the logits of two models
    with one architecture and vocabulary."""
    model.check_params(params_ref, "The reference parameter set")
    model.check_params(params_aligned, "The aligned parameter set")


def _check_tokens(inputs, model: models.Model, prompt_lengths) -> tuple[Array, Array | None]:
    """(inputs as int32, prompt_lengths as int32 or None), checked.

    Token ids must be integers in [0, model.config.vocab_size): a float or
    negative array, or an id past the vocabulary (which XLA's gather would
    clamp silently), is a ValueError. Concrete values are checked (numpy at no
    cost; a jax array with one small reduction); traced ones pass.
    """
    shape = np.shape(inputs)
    if len(shape) != 2 or shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"The inputs must be a non-empty [batch, length] array, got shape "
                         f"{shape}.")
    dtype = inputs.dtype if hasattr(inputs, "dtype") else np.asarray(inputs).dtype
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"The inputs must be integer token ids, got dtype {dtype}; tokenize "
                         "the text (or cast ids that are whole numbers with .astype(int32)).")
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(inputs, jax.core.Tracer):
        if isinstance(inputs, jax.Array):
            low, high = np.asarray(jax.device_get(jnp.stack([jnp.min(inputs),
                                                             jnp.max(inputs)])))
        else:
            values = np.asarray(inputs)
            low, high = values.min(), values.max()
        if low < 0 or (vocab_size is not None and high >= vocab_size):
            raise ValueError(f"The inputs must be token ids in [0, {vocab_size}) (the model's "
                             f"vocab_size), got ids from {int(low)} to {int(high)}.")
    if prompt_lengths is not None:
        if not isinstance(prompt_lengths, jax.core.Tracer):
            protocol.check_prompt_lengths(prompt_lengths, inputs, "prompt_lengths")
        elif np.shape(prompt_lengths) != (shape[0],):
            raise ValueError(f"prompt_lengths must have shape ({shape[0]},), got "
                             f"{np.shape(prompt_lengths)}.")
        prompt_lengths = jnp.asarray(prompt_lengths, jnp.int32)
    return jnp.asarray(inputs, jnp.int32), prompt_lengths


def _check_lambda(lam, shape: tuple[int, ...], what: str) -> Array:
    """Validates concrete values; traced values (inside a jit) pass through."""
    if isinstance(lam, jax.core.Tracer):
        return lam
    try:
        lam = np.asarray(lam, np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be a number or an array of numbers, got {lam!r}.") from e
    if lam.ndim == 0 and what == "lam":
        lam = np.full(shape, lam, np.float32)
    if lam.shape != shape:
        raise ValueError(f"{what} must have shape {shape}, got {lam.shape}.")
    if not np.all(np.isfinite(lam)):
        raise ValueError(f"{what} must be finite, got {lam.tolist()}.")
    return jnp.asarray(lam)


def _place(partitioner: partitioning.Partitioner | None, params_ref: Params,
           params_aligned: Params, rows: dict[str, Any], shared: dict[str, Any]
           ) -> tuple[Params, Params, dict, dict]:
    """On the partitioner's mesh: parameters over 'model', `rows` ([batch, ...])
    over 'data', `shared` (rng, lambdas, temperature) replicated; as given
    without a partitioner. Every host passes the same values."""
    if partitioner is None:
        return params_ref, params_aligned, rows, shared
    present = {name: value for name, value in rows.items() if value is not None}
    placed = partitioner.shard_batch(present)
    shared = {name: None if value is None else partitioner.replicate(value)
              for name, value in shared.items()}
    return (partitioner.shard_params(params_ref), partitioner.shard_params(params_aligned),
            {name: placed.get(name) for name in rows}, shared)


def dera_decode(model: models.Model, params_ref: Params, params_aligned: Params,
                inputs: Array, lam: Array | float, *, max_decode_len: int,
                rng: Array, temperature: float | Array = 1.0, top_k: int = 0,
                top_p: float = 1.0, chunk_size: int | None = None,
                prompt_lengths: Array | None = None, num_samples: int = 1,
                partitioner: partitioning.Partitioner | None = None) -> DeraOutput:
    """DeRa sampling with a per-example lambda, in one compiled call.

    Args:
      model: the architecture shared by both parameter sets (`models.for_config`).
      params_ref: the reference (SFT) parameters.
      params_aligned: the aligned (RL / DPO) parameters.
      inputs: [batch, in_len] int32: T5's encoder input (0 is padding), or a
        decoder-only model's right-padded prompts.
      lam: [batch * num_samples] float (a scalar is broadcast); finite.
      temperature: scalar or [batch * num_samples]; 0 is greedy.
      chunk_size: None decodes all steps; an int stops between chunks of that
        many steps once every row has ended (identical results, see
        `decoding.sample`).
      prompt_lengths: [batch] prompt lengths for a decoder-only model; None for T5.
      num_samples: samples per input, consecutive output rows ([batch *
        num_samples]); each input is read once for them (the models'
        `repeats`).
      partitioner: a `partitioning.Partitioner`: rows over 'data', parameters
        and caches over 'model'; None runs on the default device.
    """
    inputs, prompt_lengths = _check_tokens(inputs, model, prompt_lengths)
    protocol.check_repeats(inputs, None, num_samples, "num_samples")
    lam = _check_lambda(lam, (inputs.shape[0] * num_samples,), "lam")
    check_compatible(model, params_ref, params_aligned)
    decoding.check_lengths(max_decode_len)
    params_ref, params_aligned, rows, shared = _place(
        partitioner, params_ref, params_aligned,
        {"inputs": inputs, "prompt_lengths": prompt_lengths, "lam": lam},
        {"rng": rng, "temperature": _temperature_argument(temperature)})
    return _decode(model, params_ref, params_aligned, rows["inputs"], rows["prompt_lengths"],
                   rows["lam"], shared["rng"], shared["temperature"],
                   max_decode_len=max_decode_len, top_k=top_k, top_p=top_p,
                   chunk_size=chunk_size, num_samples=num_samples, partitioner=partitioner)


def dera_sweep(model: models.Model, params_ref: Params, params_aligned: Params,
               inputs: Array, lambdas: Array, *, max_decode_len: int, rng: Array,
               temperature: float | Array = 1.0, top_k: int = 0,
               top_p: float = 1.0, chunk_size: int | None = None,
               prompt_lengths: Array | None = None, num_samples: int = 1,
               partitioner: partitioning.Partitioner | None = None) -> DeraOutput:
    """DeRa for K lambda values in one compiled call; outputs get a leading [K] axis.

    Each input is read once per parameter set (T5's encoder and cross-attention
    keys / values; a decoder-only prompt's prefill) and shared by all K
    decodes. Row k equals `dera_decode(..., lam=lambdas[k], rng=rng)`.

    Args:
      lambdas: [K] finite floats.
      (the others as `dera_decode`)
    """
    inputs, prompt_lengths = _check_tokens(inputs, model, prompt_lengths)
    protocol.check_repeats(inputs, None, num_samples, "num_samples")
    lambdas_shape = np.shape(lambdas)
    if len(lambdas_shape) != 1 or lambdas_shape[0] == 0:
        raise ValueError(f"lambdas must be a non-empty 1-D array [K], got shape {lambdas_shape}.")
    lambdas = _check_lambda(lambdas, lambdas_shape, "lambdas")
    check_compatible(model, params_ref, params_aligned)
    decoding.check_lengths(max_decode_len)
    params_ref, params_aligned, rows, shared = _place(
        partitioner, params_ref, params_aligned,
        {"inputs": inputs, "prompt_lengths": prompt_lengths},
        {"lambdas": lambdas, "rng": rng, "temperature": _temperature_argument(temperature)})
    return _sweep(model, params_ref, params_aligned, rows["inputs"], rows["prompt_lengths"],
                  shared["lambdas"], shared["rng"], shared["temperature"],
                  max_decode_len=max_decode_len, top_k=top_k, top_p=top_p,
                  chunk_size=chunk_size, num_samples=num_samples, partitioner=partitioner)


def sweep_batches(model: models.Model, params_ref: Params, params_aligned: Params,
                  inputs: np.ndarray, lambdas: Sequence[float], *, batch_size: int, seed: int,
                  first_batch: int = 0, prompt_lengths: np.ndarray | None = None,
                  partitioner: partitioning.Partitioner | None = None, **sampling
                  ) -> Iterator[tuple[int, np.ndarray, DeraOutput]]:
    """`dera_sweep` over all inputs in batches: the decode job's and the
    pipelines' evaluation loop.

    Batch i holds inputs [i * batch_size, (i + 1) * batch_size) (the last one
    padded with copies of row 0, which are not reported) and samples with
    `fold_in(PRNGKey(seed), i)`, so a batch's result does not depend on where
    a run started.

    Args:
      inputs: [n, in_len] int32; prompt_lengths: [n] for decoder-only models.
      lambdas: the K values of every sweep.
      first_batch: the batch to start from (a resumed job).
      sampling: `max_decode_len`, `temperature`, `top_k`, `top_p`, `chunk_size`.

    Yields:
      (i, the batch's real rows [m] int, the sweep's output as numpy arrays
      with the [K] axis first), the same on every host.
    """
    key = jax.random.PRNGKey(seed)
    lambdas = np.asarray(lambdas, np.float32)
    num = inputs.shape[0]
    for i in range(first_batch, -(-num // batch_size)):
        rows = np.arange(i * batch_size, min((i + 1) * batch_size, num))
        take = np.concatenate([rows, np.full(batch_size - len(rows), rows[0])])
        lengths = None if prompt_lengths is None else prompt_lengths[take]
        out = dera_sweep(model, params_ref, params_aligned, inputs[take], lambdas,
                         rng=jax.random.fold_in(key, i), prompt_lengths=lengths,
                         partitioner=partitioner, **sampling)
        yield i, rows - i * batch_size, jax.tree_util.tree_map(_to_host, out)


def _to_host(x: Array) -> np.ndarray:
    """A (possibly multi-host) array as numpy on every host."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def geometric_mixture(log_probs_ref: Array, log_probs_aligned: Array, lam: float) -> Array:
    """Normalized log of pi_ref^(1 - lam) * pi_aligned^lam over the last axis.

    The closed form DeRa approximates per token; used by tests and evaluation.
    """
    return jax.nn.log_softmax(lam * log_probs_aligned + (1.0 - lam) * log_probs_ref, axis=-1)


def kl_regularized_optimum(log_probs_ref: Array, reward: Array, beta: float) -> Array:
    """log pi*_beta = log softmax(log pi_ref + r / beta) over the last axis."""
    return jax.nn.log_softmax(log_probs_ref + reward / beta, axis=-1)
