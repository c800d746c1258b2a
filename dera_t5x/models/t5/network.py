"""The T5 encoder-decoder in Flax linen, with T5X's parameter names.

One `T5Config` covers T5.1.0 (ReLU MLP, logits through the shared embedding
scaled by d_model^-0.5) and T5.1.1 (gated-GELU MLP, separate `logits_dense`).
Parameters are float32; activations use `config.dtype`. Layer norms, softmax
and logits are computed in float32.

Parameter tree (dense kernels stored 2-D, as in T5X):
  token_embedder/embedding                                  [vocab, emb]
  encoder/relpos_bias/rel_embedding                         [heads, buckets]
  encoder/layers_i/pre_attention_layer_norm/scale           [emb]
  encoder/layers_i/attention/{query,key,value}/kernel       [emb, heads*head_dim]
  encoder/layers_i/attention/out/kernel                     [heads*head_dim, emb]
  encoder/layers_i/pre_mlp_layer_norm/scale                 [emb]
  encoder/layers_i/mlp/{wi | wi_0, wi_1}/kernel             [emb, mlp]
  encoder/layers_i/mlp/wo/kernel                            [mlp, emb]
  encoder/encoder_norm/scale                                [emb]
  decoder/relpos_bias/rel_embedding, decoder/layers_i/{pre_self_attention_layer_norm,
  self_attention, pre_cross_attention_layer_norm, encoder_decoder_attention,
  pre_mlp_layer_norm, mlp}, decoder/decoder_norm/scale,
  decoder/logits_dense/kernel (T5.1.1 only)                 [emb, vocab]

Decoding uses an explicit cache (see `Transformer.init_cache`): self-attention
keys / values grow one step at a time, cross-attention keys / values are
computed once per input.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from dera_t5x.models import layers

Array = jax.Array
NEG_INF = -1e10  # added to masked attention logits (as in T5X)

_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),  # T5's gelu_new
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
    "linear": lambda x: x,
}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class T5Config:
    """Architecture of a T5 model.

    `mlp_activations=("relu",)` gives T5.1.0's MLP (`wi`, `wo`);
    `("gelu", "linear")` gives T5.1.1's gated MLP (`wi_0`, `wi_1`, `wo`).
    `logits_via_embedding=True` ties the output layer to the embedding and
    scales the decoder output by emb_dim^-0.5 (T5.1.0).
    """

    vocab_size: int = 32128
    emb_dim: int = 512
    num_heads: int = 8
    head_dim: int = 64
    mlp_dim: int = 2048
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    mlp_activations: tuple[str, ...] = ("relu",)
    logits_via_embedding: bool = True
    dropout_rate: float = 0.1
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "mlp_activations", tuple(self.mlp_activations))
        unknown = [a for a in self.mlp_activations if a not in _ACTIVATIONS]
        if unknown:
            raise ValueError(
                f"T5Config.mlp_activations has unknown {unknown}; "
                f"choose from {sorted(_ACTIVATIONS)}."
            )
        for name in ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim",
                     "num_encoder_layers", "num_decoder_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"T5Config.{name} must be >= 1, got {getattr(self, name)}.")

    @property
    def activation_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)


def relative_position_bucket(relative_position: Array, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> Array:
    """T5's bucketing of `key_position - query_position` (int32 array, any shape)."""
    ret = 0
    n = -relative_position
    if bidirectional:
        num_buckets //= 2
        ret = (n < 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    val_if_large = max_exact + (
        jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).astype(jnp.int32)
    val_if_large = jnp.minimum(val_if_large, num_buckets - 1)
    return ret + jnp.where(is_small, n, val_if_large)


@jax.custom_jvp
def softmax(x: Array) -> Array:
    """Softmax over the last axis, as `jax.nn.softmax`, differentiated as
    y * (dx - sum(y * dx)): the backward pass needs only the output y
    (differentiating through the normalization keeps and broadcasts more)."""
    unnormalized = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
    return unnormalized / jnp.sum(unnormalized, axis=-1, keepdims=True)


@softmax.defjvp
def _softmax_jvp(primals, tangents):
    (x,), (x_dot,) = primals, tangents
    y = softmax(x)
    return y, y * (x_dot - jnp.sum(y * x_dot, axis=-1, keepdims=True))


def repeat_over_batch(bias: Array, batch: int) -> Array:
    """[1, ...] -> [batch, ...], written as a product with ones so that its
    gradient (the sum over the batch) is a matmul: XLA:CPU sums over a
    leading axis many times slower."""
    return jnp.einsum("b,...->b...", jnp.ones((batch,), bias.dtype), bias[0])


class RelativePositionBias(nn.Module):
    """One learned bias per (head, bucket), shared by all layers of a stack."""

    num_heads: int
    num_buckets: int
    max_distance: int
    bidirectional: bool

    @nn.compact
    def __call__(self, query_positions: Array, key_positions: Array) -> Array:
        """Returns the bias [1, heads, q_len, k_len] in float32."""
        table = self.param(
            "rel_embedding",
            nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
            (self.num_heads, self.num_buckets),
        )
        buckets = relative_position_bucket(
            key_positions[None, :] - query_positions[:, None],
            self.bidirectional, self.num_buckets, self.max_distance)
        return jnp.take(table, buckets, axis=1)[None]  # [1, H, q, k]


class Attention(nn.Module):
    """Multi-head dot-product attention without 1/sqrt(d) scaling (T5)."""

    config: T5Config

    def setup(self):
        cfg = self.config
        inner = cfg.num_heads * cfg.head_dim
        dtype = cfg.activation_dtype
        # T5 folds the 1/sqrt(head_dim) of attention into the query init.
        self.query = layers.Dense(inner, dtype, layers.init_scaled_normal(1.0 / cfg.head_dim))
        self.key = layers.Dense(inner, dtype)
        self.value = layers.Dense(inner, dtype)
        self.out = layers.Dense(cfg.emb_dim, dtype)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def _split_heads(self, x: Array) -> Array:
        return x.reshape(x.shape[:-1] + (self.config.num_heads, self.config.head_dim))

    def project_query(self, x: Array) -> Array:
        """[batch, len, emb] -> [batch, len, heads, head_dim]."""
        return self._split_heads(self.query(x))

    def project_key_value(self, x: Array) -> tuple[Array, Array]:
        """[batch, len, emb] -> keys, values [batch, heads, len, head_dim]."""
        def heads_first(y):
            return jnp.swapaxes(self._split_heads(y), 1, 2)
        return heads_first(self.key(x)), heads_first(self.value(x))

    def attend(self, query: Array, key: Array, value: Array, bias: Array,
               deterministic: bool) -> Array:
        """Attention output [batch, q_len, emb] given projected heads.

        Args:
          query: [batch, q_len, heads, head_dim]
          key, value: [batch, heads, k_len, head_dim] (the layout the
            attention products read without a transpose: decode caches
            keep it, so no step copies them)
          bias: broadcastable to [batch, heads, q_len, k_len], float32; holds
            relative position biases and NEG_INF where attention is masked.
        """
        logits = jnp.einsum("bqhd,bhkd->bhqk", query, key,
                            preferred_element_type=jnp.float32)
        weights = softmax(logits + bias)
        weights = self.dropout(weights, deterministic=deterministic)
        out = jnp.einsum("bhqk,bhkd->bqhd", weights.astype(value.dtype), value)
        return self.out(out.reshape(out.shape[:2] + (-1,)))

    def __call__(self, inputs_q: Array, inputs_kv: Array, bias: Array,
                 deterministic: bool) -> Array:
        key, value = self.project_key_value(inputs_kv)
        return self.attend(self.project_query(inputs_q), key, value, bias, deterministic)


class MLP(nn.Module):
    """T5 feed-forward block: `wi` (one activation) or gated `wi_0`, `wi_1`, ..."""

    config: T5Config

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        cfg = self.config
        dtype = cfg.activation_dtype
        acts = cfg.mlp_activations
        hidden = None
        for i, act in enumerate(acts):
            name = "wi" if len(acts) == 1 else f"wi_{i}"
            h = _ACTIVATIONS[act](layers.Dense(cfg.mlp_dim, dtype, name=name)(x))
            hidden = h if hidden is None else hidden * h
        hidden = nn.Dropout(cfg.dropout_rate)(hidden, deterministic=deterministic)
        return layers.Dense(cfg.emb_dim, dtype, name="wo")(hidden)


class EncoderLayer(nn.Module):
    config: T5Config

    @nn.compact
    def __call__(self, x: Array, bias: Array, deterministic: bool) -> Array:
        cfg = self.config
        def norm(name):
            return layers.RMSNorm(cfg.layer_norm_epsilon, cfg.activation_dtype, name=name)
        drop = nn.Dropout(cfg.dropout_rate)
        h = norm("pre_attention_layer_norm")(x)
        h = Attention(cfg, name="attention")(h, h, bias, deterministic)
        x = x + drop(h, deterministic=deterministic)
        h = norm("pre_mlp_layer_norm")(x)
        h = MLP(cfg, name="mlp")(h, deterministic)
        return x + drop(h, deterministic=deterministic)


class DecoderLayer(nn.Module):
    """Decoder block; full-sequence (`__call__`) and one-step (`step`) paths."""

    config: T5Config

    def setup(self):
        cfg = self.config
        dtype = cfg.activation_dtype
        self.pre_self_attention_layer_norm = layers.RMSNorm(cfg.layer_norm_epsilon, dtype)
        self.self_attention = Attention(cfg)
        self.pre_cross_attention_layer_norm = layers.RMSNorm(cfg.layer_norm_epsilon, dtype)
        self.encoder_decoder_attention = Attention(cfg)
        self.pre_mlp_layer_norm = layers.RMSNorm(cfg.layer_norm_epsilon, dtype)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def _cross_and_mlp(self, x, cross_key, cross_value, cross_bias, deterministic):
        h = self.pre_cross_attention_layer_norm(x)
        h = self.encoder_decoder_attention.attend(
            self.encoder_decoder_attention.project_query(h), cross_key, cross_value,
            cross_bias, deterministic)
        x = x + self.dropout(h, deterministic=deterministic)
        h = self.mlp(self.pre_mlp_layer_norm(x), deterministic)
        return x + self.dropout(h, deterministic=deterministic)

    def cross_key_value(self, encoded: Array) -> tuple[Array, Array]:
        """Cross-attention keys, values [batch, heads, enc_len, head_dim]."""
        return self.encoder_decoder_attention.project_key_value(encoded)

    def __call__(self, x: Array, encoded: Array, self_bias: Array, cross_bias: Array,
                 deterministic: bool) -> Array:
        h = self.pre_self_attention_layer_norm(x)
        h = self.self_attention(h, h, self_bias, deterministic)
        x = x + self.dropout(h, deterministic=deterministic)
        cross_key, cross_value = self.cross_key_value(encoded)
        return self._cross_and_mlp(x, cross_key, cross_value, cross_bias, deterministic)

    def step(self, x: Array, layer_cache: dict, index: Array, self_bias: Array,
             cross_bias: Array) -> tuple[Array, dict]:
        """One decode step: x [batch, 1, emb] at position `index` (traced scalar)."""
        h = self.pre_self_attention_layer_norm(x)
        query = self.self_attention.project_query(h)
        key, value = self.self_attention.project_key_value(h)
        cached_key = jax.lax.dynamic_update_slice_in_dim(
            layer_cache["self_key"], key.astype(layer_cache["self_key"].dtype), index, axis=2)
        cached_value = jax.lax.dynamic_update_slice_in_dim(
            layer_cache["self_value"], value.astype(layer_cache["self_value"].dtype), index, axis=2)
        h = self.self_attention.attend(query, cached_key, cached_value, self_bias, True)
        x = x + h
        x = self._cross_and_mlp(x, layer_cache["cross_key"], layer_cache["cross_value"],
                                cross_bias, True)
        return x, dict(layer_cache, self_key=cached_key, self_value=cached_value)


def _padding_bias(key_mask: Array) -> Array:
    """[batch, k_len] bool -> additive bias [batch, 1, 1, k_len] float32."""
    return jnp.where(key_mask, 0.0, NEG_INF)[:, None, None, :].astype(jnp.float32)


class Encoder(nn.Module):
    config: T5Config
    shared_embedding: nn.Module

    @nn.compact
    def __call__(self, tokens: Array, deterministic: bool) -> Array:
        """tokens [batch, len] -> encoded [batch, len, emb]."""
        cfg = self.config
        positions = jnp.arange(tokens.shape[1])
        bias = RelativePositionBias(
            cfg.num_heads, cfg.relative_attention_num_buckets,
            cfg.relative_attention_max_distance, True, name="relpos_bias")(positions, positions)
        bias = repeat_over_batch(bias, tokens.shape[0]) + _padding_bias(tokens > 0)
        x = nn.Dropout(cfg.dropout_rate)(self.shared_embedding(tokens), deterministic=deterministic)
        for i in range(cfg.num_encoder_layers):
            x = EncoderLayer(cfg, name=f"layers_{i}")(x, bias, deterministic)
        x = layers.RMSNorm(cfg.layer_norm_epsilon, cfg.activation_dtype, name="encoder_norm")(x)
        return nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


class Decoder(nn.Module):
    config: T5Config
    shared_embedding: nn.Module

    def setup(self):
        cfg = self.config
        self.relpos_bias = RelativePositionBias(
            cfg.num_heads, cfg.relative_attention_num_buckets,
            cfg.relative_attention_max_distance, False)
        self.layers = [DecoderLayer(cfg) for _ in range(cfg.num_decoder_layers)]
        self.decoder_norm = layers.RMSNorm(cfg.layer_norm_epsilon, cfg.activation_dtype)
        self.dropout = nn.Dropout(cfg.dropout_rate)
        if not cfg.logits_via_embedding:
            self.logits_dense = layers.Dense(cfg.vocab_size, cfg.activation_dtype)

    def _final(self, x: Array, deterministic: bool) -> Array:
        """The final norm (and dropout): [batch, len, emb] -> hidden states."""
        return self.dropout(self.decoder_norm(x), deterministic=deterministic)

    def logits(self, hidden: Array) -> Array:
        """Output layer: hidden [batch, len, emb] -> float32 logits [batch, len, vocab]."""
        if self.config.logits_via_embedding:
            return self.shared_embedding.attend(hidden) / math.sqrt(self.config.emb_dim)
        return self.logits_dense(hidden).astype(jnp.float32)

    def __call__(self, encoded: Array, encoder_mask: Array, decoder_input_tokens: Array,
                 deterministic: bool) -> Array:
        """Teacher-forced final hidden states [batch, dec_len, emb]."""
        length = decoder_input_tokens.shape[1]
        positions = jnp.arange(length)
        causal = positions[None, :] <= positions[:, None]
        self_bias = self.relpos_bias(positions, positions) + jnp.where(causal, 0.0, NEG_INF)
        self_bias = repeat_over_batch(self_bias, decoder_input_tokens.shape[0])
        cross_bias = _padding_bias(encoder_mask)
        x = self.dropout(self.shared_embedding(decoder_input_tokens), deterministic=deterministic)
        for layer in self.layers:
            x = layer(x, encoded, self_bias, cross_bias, deterministic)
        return self._final(x, deterministic)

    def init_cache(self, encoded: Array, encoder_mask: Array, max_decode_len: int) -> dict:
        cfg = self.config
        batch = encoded.shape[0]
        shape = (batch, cfg.num_heads, max_decode_len, cfg.head_dim)
        layer_caches = []
        for layer in self.layers:
            cross_key, cross_value = layer.cross_key_value(encoded)
            layer_caches.append(dict(cross_key=cross_key, cross_value=cross_value,
                                     self_key=jnp.zeros(shape, cfg.activation_dtype),
                                     self_value=jnp.zeros(shape, cfg.activation_dtype)))
        return dict(index=jnp.zeros((), jnp.int32), cross_bias=_padding_bias(encoder_mask),
                    layers=tuple(layer_caches))

    def step(self, cache: dict, tokens: Array) -> tuple[Array, dict]:
        index = cache["index"]
        max_len = cache["layers"][0]["self_key"].shape[2]
        key_positions = jnp.arange(max_len)
        self_bias = self.relpos_bias(index[None], key_positions)
        self_bias = self_bias + jnp.where(key_positions <= index, 0.0, NEG_INF)
        x = self.shared_embedding(tokens[:, None])
        new_layers = []
        for layer, layer_cache in zip(self.layers, cache["layers"]):
            x, layer_cache = layer.step(x, layer_cache, index, self_bias, cache["cross_bias"])
            new_layers.append(layer_cache)
        logits = self.logits(self._final(x, True))[:, 0]
        return logits, dict(cache, index=index + 1, layers=tuple(new_layers))


class Transformer(nn.Module):
    """T5 encoder-decoder. Methods are called through `apply(..., method=...)`."""

    config: T5Config

    def setup(self):
        cfg = self.config
        self.token_embedder = layers.Embed(cfg.vocab_size, cfg.emb_dim, cfg.activation_dtype)
        self.encoder = Encoder(cfg, self.token_embedder)
        self.decoder = Decoder(cfg, self.token_embedder)

    def encode(self, encoder_input_tokens: Array, deterministic: bool = True) -> Array:
        """[batch, enc_len] int32 -> [batch, enc_len, emb]."""
        return self.encoder(encoder_input_tokens, deterministic)

    def decode(self, encoded: Array, encoder_input_tokens: Array,
               decoder_input_tokens: Array, deterministic: bool = True) -> Array:
        """Teacher-forced logits [batch, dec_len, vocab] float32."""
        return self.decoder.logits(self.decoder(encoded, encoder_input_tokens > 0,
                                                decoder_input_tokens, deterministic))

    def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
                 deterministic: bool = True) -> Array:
        encoded = self.encode(encoder_input_tokens, deterministic)
        return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, deterministic)

    def hidden_and_logits(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
                          deterministic: bool = True, repeats: int = 1
                          ) -> tuple[Array, Array]:
        """Final decoder hidden states [batch, dec_len, emb] and their float32 logits;
        encoder inputs [batch / repeats, enc_len], each encoded once for `repeats`
        consecutive decoder rows."""
        encoded = self.encode(encoder_input_tokens, deterministic)
        encoder_mask = encoder_input_tokens > 0
        if repeats > 1:
            encoded = jnp.repeat(encoded, repeats, axis=0)
            encoder_mask = jnp.repeat(encoder_mask, repeats, axis=0)
        hidden = self.decoder(encoded, encoder_mask, decoder_input_tokens, deterministic)
        return hidden, self.decoder.logits(hidden)

    def init_cache(self, encoded: Array, encoder_input_tokens: Array,
                   max_decode_len: int) -> dict:
        """Decode cache: per-layer self K/V [batch, heads, max_decode_len, head_dim]
        (zeros), cross K/V [batch, heads, enc_len, head_dim], the cross-attention
        padding bias and the step index."""
        return self.decoder.init_cache(encoded, encoder_input_tokens > 0, max_decode_len)

    def decode_step(self, cache: dict, tokens: Array) -> tuple[Array, dict]:
        """tokens [batch] at step cache['index'] -> logits [batch, vocab] float32, cache."""
        return self.decoder.step(cache, tokens)
