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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dera_t5x import checkpoints
from dera_t5x import decoding
from dera_t5x import models
from dera_t5x import network

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


def tokens_to_logits(model: models.EncoderDecoderModel, params_ref: Params,
                     params_aligned: Params, lam: Array):
    """The two-model step for `decoding.sample`; its cache is {'ref', 'aligned'}.

    Returns a function (tokens [batch], cache) -> (mixed logits [batch, vocab],
    cache, aux logits {'ref', 'aligned', 'mixed'} [batch, vocab], whose
    log-probs at the chosen tokens `decoding.sample` reports).
    """

    def step(tokens: Array, cache: dict) -> tuple[Array, dict, dict[str, Array]]:
        ref_logits, ref_cache = model.decode_step(params_ref, cache["ref"], tokens)
        aligned_logits, aligned_cache = model.decode_step(params_aligned, cache["aligned"], tokens)
        # Padding is excluded after mixing: lam > 1 would turn a masked logit
        # in both models into a large positive one.
        mixed = models.exclude_padding(mix_logits(ref_logits, aligned_logits, lam))
        aux = {"ref": models.exclude_padding(ref_logits),
               "aligned": models.exclude_padding(aligned_logits), "mixed": mixed}
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


def _init_caches(model, params_ref, params_aligned, encoder_input_tokens, max_decode_len):
    return {"ref": model.init_decode_cache(params_ref, encoder_input_tokens, max_decode_len),
            "aligned": model.init_decode_cache(params_aligned, encoder_input_tokens,
                                               max_decode_len)}


def _sample(model, params_ref, params_aligned, cache, lam, rng, temperature, *, max_decode_len,
            top_k, top_p, chunk_size) -> DeraOutput:
    """`decoding.sample` of the two-model step; temperature None is greedy."""
    out = decoding.sample(
        tokens_to_logits(model, params_ref, params_aligned, lam), cache, rng,
        batch_size=lam.shape[0], max_decode_len=max_decode_len, eos_id=models.EOS_ID,
        start_id=models.DECODER_START_ID,
        temperature=0.0 if temperature is None else temperature, top_k=top_k, top_p=top_p,
        chunk_size=chunk_size)
    return _as_output(out)


_STATIC = ("config", "max_decode_len", "top_k", "top_p", "chunk_size")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _decode(config, params_ref, params_aligned, encoder_input_tokens, lam, rng, temperature,
            **static):
    model = models.EncoderDecoderModel(config)
    cache = _init_caches(model, params_ref, params_aligned, encoder_input_tokens,
                         static["max_decode_len"])
    return _sample(model, params_ref, params_aligned, cache, lam, rng, temperature, **static)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _sweep(config, params_ref, params_aligned, encoder_input_tokens, lambdas, rng, temperature,
           **static):
    model = models.EncoderDecoderModel(config)
    # Encoder passes and cross-attention keys / values: once per parameter set.
    cache = _init_caches(model, params_ref, params_aligned, encoder_input_tokens,
                         static["max_decode_len"])
    batch = encoder_input_tokens.shape[0]

    def decode_one(lam_value):
        lam = jnp.full((batch,), lam_value, jnp.float32)
        return _sample(model, params_ref, params_aligned, cache, lam, rng, temperature, **static)

    # The shared cache enters unbatched: only the growing self-attention K/V
    # and the per-step activations get the [K] axis.
    return jax.vmap(decode_one)(lambdas)


def check_compatible(config: network.T5Config, params_ref: Params, params_aligned: Params
                     ) -> None:
    """Raises ValueError naming the first parameter where the two sets (or the
    config) disagree in presence or shape."""
    expected = checkpoints.expected_shapes(config)
    for name, params in (("reference", params_ref), ("aligned", params_aligned)):
        flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.shape(v)
                for path, v in jax.tree_util.tree_leaves_with_path(params)}
        missing = sorted(set(expected) - set(flat))
        extra = sorted(set(flat) - set(expected))
        if missing or extra:
            raise ValueError(
                f"The {name} parameters do not match the model config: missing {missing[:3]}, "
                f"unexpected {extra[:3]}. Both models must share one architecture.")
        for key, shape in expected.items():
            if tuple(flat[key]) != tuple(shape):
                what = "vocabulary" if "embedding" in key or "logits_dense" in key else "architecture"
                raise ValueError(
                    f"The {name} parameter {key} has shape {tuple(flat[key])} but the model "
                    f"config expects {tuple(shape)}: the two models differ in {what}. DeRa "
                    "mixes the logits of two models with the same architecture and vocabulary.")


def _check_tokens(encoder_input_tokens) -> Array:
    shape = np.shape(encoder_input_tokens)
    if len(shape) != 2 or shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"encoder_input_tokens must be a non-empty [batch, length] array, "
                         f"got shape {shape}.")
    return jnp.asarray(encoder_input_tokens, jnp.int32)


def _check_lambda(lam, shape: tuple[int, ...], what: str) -> Array:
    """Validates concrete values; traced values (inside a jit) pass through."""
    if isinstance(lam, jax.core.Tracer):
        return lam
    lam = np.asarray(lam, np.float32)
    if lam.ndim == 0 and what == "lam":
        lam = np.full(shape, lam, np.float32)
    if lam.shape != shape:
        raise ValueError(f"{what} must have shape {shape}, got {lam.shape}.")
    if not np.all(np.isfinite(lam)):
        raise ValueError(f"{what} must be finite, got {lam.tolist()}.")
    return jnp.asarray(lam)


def dera_decode(model: models.EncoderDecoderModel, params_ref: Params, params_aligned: Params,
                encoder_input_tokens: Array, lam: Array | float, *, max_decode_len: int,
                rng: Array, temperature: float | Array = 1.0, top_k: int = 0,
                top_p: float = 1.0, chunk_size: int | None = None) -> DeraOutput:
    """DeRa sampling with a per-example lambda, in one compiled call.

    Args:
      model: the architecture shared by both parameter sets.
      params_ref: the reference (SFT) parameters.
      params_aligned: the aligned (RL) parameters.
      encoder_input_tokens: [batch, enc_len] int32, 0 is padding.
      lam: [batch] float (a scalar is broadcast); finite.
      temperature: scalar or [batch]; 0 is greedy.
      chunk_size: None decodes all steps; an int stops between chunks of that
        many steps once every row has ended (identical results, see
        `decoding.sample`).
    """
    tokens = _check_tokens(encoder_input_tokens)
    lam = _check_lambda(lam, (tokens.shape[0],), "lam")
    check_compatible(model.config, params_ref, params_aligned)
    return _decode(model.config, params_ref, params_aligned, tokens, lam, rng,
                   _temperature_argument(temperature), max_decode_len=max_decode_len,
                   top_k=top_k, top_p=top_p, chunk_size=chunk_size)


def dera_sweep(model: models.EncoderDecoderModel, params_ref: Params, params_aligned: Params,
               encoder_input_tokens: Array, lambdas: Array, *, max_decode_len: int, rng: Array,
               temperature: float | Array = 1.0, top_k: int = 0,
               top_p: float = 1.0, chunk_size: int | None = None) -> DeraOutput:
    """DeRa for K lambda values in one compiled call; outputs get a leading [K] axis.

    Each input is encoded once per parameter set and its cross-attention keys /
    values are shared by all K decodes. Row k equals
    `dera_decode(..., lam=lambdas[k], rng=rng)`.

    Args:
      lambdas: [K] finite floats.
    """
    tokens = _check_tokens(encoder_input_tokens)
    lambdas_shape = np.shape(lambdas)
    if len(lambdas_shape) != 1 or lambdas_shape[0] == 0:
        raise ValueError(f"lambdas must be a non-empty 1-D array [K], got shape {lambdas_shape}.")
    lambdas = _check_lambda(lambdas, lambdas_shape, "lambdas")
    check_compatible(model.config, params_ref, params_aligned)
    return _sweep(model.config, params_ref, params_aligned, tokens, lambdas, rng,
                  _temperature_argument(temperature), max_decode_len=max_decode_len,
                  top_k=top_k, top_p=top_p, chunk_size=chunk_size)


def geometric_mixture(log_probs_ref: Array, log_probs_aligned: Array, lam: float) -> Array:
    """Normalized log of pi_ref^(1 - lam) * pi_aligned^lam over the last axis.

    The closed form DeRa approximates per token; used by tests and evaluation.
    """
    return jax.nn.log_softmax(lam * log_probs_aligned + (1.0 - lam) * log_probs_ref, axis=-1)


def kl_regularized_optimum(log_probs_ref: Array, reward: Array, beta: float) -> Array:
    """log pi*_beta = log softmax(log pi_ref + r / beta) over the last axis."""
    return jax.nn.log_softmax(log_probs_ref + reward / beta, axis=-1)
