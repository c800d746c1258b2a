"""A decoder-only causal LM in Flax linen: Llama, Mistral and Qwen2.

One `DecoderOnlyConfig` covers the three: pre-norm blocks with RMSNorm,
rotary position embeddings (Hugging Face's rotate-half layout, optionally
Llama 3 frequency scaling), grouped-query attention (softmax scale
1/sqrt(head_dim)), a SwiGLU MLP and an untied or tied output layer. Mistral
adds a sliding attention window, Qwen2 biases on the query / key / value
projections. Parameters are float32 from `init` (a checkpoint may hold
bfloat16 ones); activations use `config.dtype`; norms, rotary embeddings,
softmax and logits are computed in float32.

Parameter tree (dense kernels 2-D [in, out]; names follow Hugging Face's):
  embed_tokens/embedding                                [vocab, hidden]
  layers_i/input_layernorm/scale                        [hidden]
  layers_i/self_attn/q_proj/kernel                      [hidden, heads*head_dim]
  layers_i/self_attn/{k_proj,v_proj}/kernel             [hidden, kv_heads*head_dim]
  layers_i/self_attn/{q_proj,k_proj,v_proj}/bias        [out] (attention_bias only)
  layers_i/self_attn/o_proj/kernel                      [heads*head_dim, hidden]
  layers_i/post_attention_layernorm/scale               [hidden]
  layers_i/mlp/{gate_proj,up_proj}/kernel               [hidden, intermediate]
  layers_i/mlp/down_proj/kernel                         [intermediate, hidden]
  norm/scale                                            [hidden]
  lm_head/kernel                                        [hidden, vocab] (untied only)

Positions and masks. Every forward pass takes the rotary position of each
token and which key slots may be attended to; a query at position i sees a
valid key at position j iff j <= i (and i - W < j with a sliding window W).
This lets one layout serve teacher forcing over unpadded or right-padded
sequences, a right-padded prompt followed by responses (padding in the
middle), and the decode cache.

Decode cache (`DecoderOnlyLM.prefill`, `DecoderOnlyLM.decode_step`):
  index           [] int32: new tokens written so far, the slot of the next
                  one in `new` (one scalar shared by every row)
  prompt_lengths  [batch] int32: real tokens of each right-padded prompt
  prompt          tuple of {key, value} [batch, kv_heads, P, head_dim]: the
                  prompt's keys / values, read-only after the prefill
  new             tuple of {key, value} [batch, kv_heads, max_decode_len,
                  head_dim]: slot t holds new token t
Positions are derived, not stored: prompt slot j is at position j (valid
below prompt_lengths), new slot t at prompt_lengths + t, and the next token
at prompt_lengths + index. A step attends to both buffers with the masks of
one sequence, and only ever writes `new`. So a lambda sweep, which vmaps the
decode loop over K lambdas with the prefill cache unbatched, copies only the
new tokens' buffer K times: the prompt's keys / values (the bulk of a long
prompt's cache) stay one shared, unbatched array.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from dera_t5x.models import layers

Array = jax.Array
NEG_INF = -1e10  # added to masked attention logits
MODEL_TYPES = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "llama3")
LLAMA3_ROPE_KEYS = ("factor", "high_freq_factor", "low_freq_factor",
                    "original_max_position_embeddings")
_DTYPES = ("float32", "bfloat16", "float16")


def _normalize_rope_scaling(value: Any) -> tuple[tuple[str, Any], ...] | None:
    """None, a dict or pairs -> None (default rotary) or sorted hashable items."""
    if value is None:
        return None
    items = dict(value.items() if isinstance(value, Mapping) else value)
    if "type" in items and "rope_type" not in items:  # older config.json files
        items["rope_type"] = items.pop("type")
    rope_type = items.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"DecoderOnlyConfig.rope_scaling has rope_type {rope_type!r}, which "
                         f"is not supported; supported rope types are {list(ROPE_TYPES)}.")
    if rope_type == "default":
        extra = sorted(set(items) - {"rope_type"})
        if extra:
            raise ValueError(f"DecoderOnlyConfig.rope_scaling: rope_type 'default' takes no "
                             f"parameters, got {extra}.")
        return None
    missing = [k for k in LLAMA3_ROPE_KEYS if k not in items]
    unknown = sorted(set(items) - set(LLAMA3_ROPE_KEYS) - {"rope_type"})
    if missing or unknown:
        raise ValueError(f"DecoderOnlyConfig.rope_scaling for rope_type 'llama3' needs exactly "
                         f"{list(LLAMA3_ROPE_KEYS)}; missing {missing}, unknown {unknown}.")
    normalized = {k: float(items[k]) for k in LLAMA3_ROPE_KEYS}
    normalized["original_max_position_embeddings"] = int(
        items["original_max_position_embeddings"])
    normalized["rope_type"] = "llama3"
    if normalized["high_freq_factor"] <= normalized["low_freq_factor"]:
        raise ValueError("DecoderOnlyConfig.rope_scaling: high_freq_factor must exceed "
                         "low_freq_factor.")
    return tuple(sorted(normalized.items()))


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DecoderOnlyConfig:
    """Architecture of a Llama, Mistral or Qwen2 model (defaults: a Llama 2 7B).

    rope_scaling: None, or Llama 3's scaling as hashable sorted items, e.g.
      (("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
      ("original_max_position_embeddings", 8192), ("rope_type", "llama3"));
      a dict is accepted and normalized. Other rope types are errors.
    sliding_window: None, or W: a query at position i sees keys at j > i - W.
    attention_bias: biases on q / k / v (Qwen2); o_proj never has one.
    tie_word_embeddings: logits through the token embedding (no lm_head).
    eos_token_ids: the ids that end a response; may be empty.
    dtype: the activation dtype.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 4096
    sliding_window: int | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    model_type: str = "llama"
    eos_token_ids: tuple[int, ...] = (2,)
    bos_token_id: int | None = 1
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "rope_scaling", _normalize_rope_scaling(self.rope_scaling))
        eos = self.eos_token_ids
        eos = () if eos is None else (eos,) if isinstance(eos, (int, np.integer)) else eos
        object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in eos))
        object.__setattr__(self, "rope_theta", float(self.rope_theta))
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"DecoderOnlyConfig.{name} must be >= 1, got "
                                 f"{getattr(self, name)}.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"DecoderOnlyConfig.num_heads ({self.num_heads}) must be a "
                             f"multiple of num_kv_heads ({self.num_kv_heads}).")
        if self.head_dim % 2:
            raise ValueError(f"DecoderOnlyConfig.head_dim must be even for rotary embeddings, "
                             f"got {self.head_dim}.")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"DecoderOnlyConfig.sliding_window must be None or >= 1, got "
                             f"{self.sliding_window}.")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"DecoderOnlyConfig.model_type {self.model_type!r} is not one of "
                             f"{list(MODEL_TYPES)}.")
        if self.dtype not in _DTYPES:
            raise ValueError(f"DecoderOnlyConfig.dtype {self.dtype!r} is not one of "
                             f"{list(_DTYPES)}.")
        if any(not 0 <= i < self.vocab_size for i in self.eos_token_ids):
            raise ValueError(f"DecoderOnlyConfig.eos_token_ids {self.eos_token_ids} must lie "
                             f"in [0, vocab_size={self.vocab_size}).")

    @property
    def activation_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def num_groups(self) -> int:
        """Query heads per key / value head."""
        return self.num_heads // self.num_kv_heads


def rotary_inverse_frequencies(config: DecoderOnlyConfig) -> np.ndarray:
    """[head_dim // 2] float32: theta^(-2i/d), with Llama 3's scaling if configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if config.rope_scaling is not None:  # rope_type 'llama3'
        s = dict(config.rope_scaling)
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def rotary_tables(config: DecoderOnlyConfig, positions: Array) -> tuple[Array, Array]:
    """positions [batch, len] -> cos, sin [batch, len, head_dim] float32."""
    freqs = positions.astype(jnp.float32)[..., None] * rotary_inverse_frequencies(config)
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """x [batch, len, heads, head_dim] rotated (rotate-half layout), in float32."""
    x = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def attention_bias(query_positions: Array, key_positions: Array, key_valid: Array,
                   sliding_window: int | None) -> Array:
    """Additive mask [batch, 1, 1, q_len, k_len] float32 (0 or NEG_INF).

    A query at position i sees a key at position j iff the key is valid and
    j <= i, and with a sliding window W also i - W < j.
    """
    q = query_positions[:, :, None]
    k = key_positions[:, None, :]
    ok = key_valid[:, None, :] & (k <= q)
    if sliding_window is not None:
        ok = ok & (k > q - sliding_window)
    return jnp.where(ok, 0.0, NEG_INF).astype(jnp.float32)[:, None, None]


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings."""

    config: DecoderOnlyConfig

    def setup(self):
        cfg = self.config
        dtype = cfg.activation_dtype
        self.q_proj = layers.Dense(cfg.num_heads * cfg.head_dim, dtype,
                                   use_bias=cfg.attention_bias)
        self.k_proj = layers.Dense(cfg.num_kv_heads * cfg.head_dim, dtype,
                                   use_bias=cfg.attention_bias)
        self.v_proj = layers.Dense(cfg.num_kv_heads * cfg.head_dim, dtype,
                                   use_bias=cfg.attention_bias)
        self.o_proj = layers.Dense(cfg.hidden_size, dtype)

    def project(self, x: Array, cos: Array, sin: Array) -> tuple[Array, Array, Array]:
        """x [batch, len, hidden] -> query [batch, len, heads, head_dim] and keys,
        values [batch, kv_heads, len, head_dim], rotary applied to query and keys."""
        cfg = self.config
        dtype = cfg.activation_dtype
        batch, length = x.shape[:2]
        query = self.q_proj(x).reshape(batch, length, cfg.num_heads, cfg.head_dim)
        key = self.k_proj(x).reshape(batch, length, cfg.num_kv_heads, cfg.head_dim)
        value = self.v_proj(x).reshape(batch, length, cfg.num_kv_heads, cfg.head_dim)
        query = apply_rotary(query, cos, sin).astype(dtype)
        key = apply_rotary(key, cos, sin).astype(dtype)
        return query, jnp.swapaxes(key, 1, 2), jnp.swapaxes(value, 1, 2)

    def attend(self, query: Array, segments: tuple[tuple[Array, Array], ...], bias: Array
               ) -> Array:
        """Output [batch, q_len, hidden]: one softmax over the keys of all segments.

        Args:
          query: [batch, q_len, heads, head_dim]; head h reads kv head
            h // num_groups (Hugging Face's `repeat_kv`).
          segments: (key, value) pairs, each [batch, kv_heads, k_len_i,
            head_dim], attended to as if concatenated along k_len (the decode
            cache's read-only prompt and its new tokens; one pair otherwise).
          bias: [batch, 1, 1, q_len, sum of k_len_i] float32 (`attention_bias`).
        """
        cfg = self.config
        batch, q_len = query.shape[:2]
        query = query.reshape(batch, q_len, cfg.num_kv_heads, cfg.num_groups, cfg.head_dim)
        logits = [jnp.einsum("bqhgd,bhkd->bhgqk", query, key.astype(query.dtype),
                             preferred_element_type=jnp.float32) for key, _ in segments]
        logits = logits[0] if len(logits) == 1 else jnp.concatenate(logits, axis=-1)
        weights = jax.nn.softmax(logits * (1.0 / math.sqrt(cfg.head_dim)) + bias, axis=-1)
        out, start = 0.0, 0
        for key, value in segments:
            part = jax.lax.slice_in_dim(weights, start, start + key.shape[2], axis=-1)
            out = out + jnp.einsum("bhgqk,bhkd->bqhgd", part.astype(value.dtype), value)
            start += key.shape[2]
        return self.o_proj(out.reshape(batch, q_len, cfg.num_heads * cfg.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    config: DecoderOnlyConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        dtype = cfg.activation_dtype
        gate = layers.Dense(cfg.intermediate_size, dtype, name="gate_proj")(x)
        up = layers.Dense(cfg.intermediate_size, dtype, name="up_proj")(x)
        return layers.Dense(cfg.hidden_size, dtype, name="down_proj")(jax.nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    config: DecoderOnlyConfig

    def setup(self):
        cfg = self.config
        self.input_layernorm = layers.RMSNorm(cfg.rms_norm_eps, cfg.activation_dtype)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = layers.RMSNorm(cfg.rms_norm_eps, cfg.activation_dtype)
        self.mlp = MLP(cfg)

    def __call__(self, x: Array, cos: Array, sin: Array, bias: Array,
                 layer_cache: tuple[dict, dict] | None = None, index: Array | None = None
                 ) -> tuple[Array, dict]:
        """x [batch, len, hidden] -> (x, {key, value}).

        Without a cache the keys / values are those of x (returned); with one,
        (prompt {key, value}, new {key, value}), those of x are written into
        `new` at slot `index`, both buffers are attended to (the bias covers
        the prompt's slots, then the new ones) and the updated `new` is returned.
        """
        query, key, value = self.self_attn.project(self.input_layernorm(x), cos, sin)
        if layer_cache is None:
            segments = ((key, value),)
            out = {"key": key, "value": value}
        else:
            prompt, new = layer_cache
            out = {name: jax.lax.dynamic_update_slice_in_dim(
                       new[name], written.astype(new[name].dtype), index, axis=2)
                   for name, written in (("key", key), ("value", value))}
            segments = ((prompt["key"], prompt["value"]), (out["key"], out["value"]))
        x = x + self.self_attn.attend(query, segments, bias)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, out


def decode_key_layout(prompt_lengths: Array, prompt_len: int, extra: int
                      ) -> tuple[Array, Array]:
    """Positions and validity of `prompt_len + extra` slots: a right-padded prompt
    (slots < prompt_len, valid below prompt_lengths) followed by `extra`
    slots at positions prompt_lengths + (slot - prompt_len).

    Returns:
      key_positions [batch, slots] int32, key_valid [batch, slots] bool.
    """
    slots = jnp.arange(prompt_len + extra, dtype=jnp.int32)[None, :]
    lengths = prompt_lengths.astype(jnp.int32)[:, None]
    in_prompt = slots < prompt_len
    positions = jnp.where(in_prompt, slots, lengths + slots - prompt_len)
    valid = jnp.where(in_prompt, slots < lengths, True)
    return positions, valid


class DecoderOnlyLM(nn.Module):
    """The causal LM. Methods are called through `apply(..., method=...)`."""

    config: DecoderOnlyConfig

    def setup(self):
        cfg = self.config
        self.embed_tokens = layers.Embed(cfg.vocab_size, cfg.hidden_size, cfg.activation_dtype)
        self.layers = [DecoderLayer(cfg) for _ in range(cfg.num_layers)]
        self.norm = layers.RMSNorm(cfg.rms_norm_eps, cfg.activation_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = layers.Dense(cfg.vocab_size, cfg.activation_dtype)

    def logits_of(self, hidden: Array) -> Array:
        """Final-norm hidden states [..., hidden] -> float32 logits [..., vocab]."""
        if self.config.tie_word_embeddings:
            return self.embed_tokens.attend(hidden)
        return self.lm_head(hidden).astype(jnp.float32)

    def hidden_states(self, tokens: Array, positions: Array, key_valid: Array
                      ) -> tuple[Array, tuple[dict, ...]]:
        """Final-norm states [batch, len, hidden] and each layer's keys / values.

        Args:
          tokens: [batch, len] int32.
          positions: [batch, len] int32 rotary positions.
          key_valid: [batch, len] bool; invalid slots are never attended to.
        """
        cos, sin = rotary_tables(self.config, positions)
        bias = attention_bias(positions, positions, key_valid, self.config.sliding_window)
        x = self.embed_tokens(tokens)
        kv = []
        for layer in self.layers:
            x, layer_kv = layer(x, cos, sin, bias)
            kv.append(layer_kv)
        return self.norm(x), tuple(kv)

    def __call__(self, tokens: Array, positions: Array | None = None,
                 key_valid: Array | None = None) -> tuple[Array, Array]:
        """Teacher-forced (logits [batch, len, vocab] float32, final states
        [batch, len, hidden]); by default positions 0.. and every slot valid
        (unpadded or right-padded sequences)."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32),
                                         tokens.shape)
        if key_valid is None:
            key_valid = jnp.ones(tokens.shape, bool)
        hidden, _ = self.hidden_states(tokens, positions, key_valid)
        return self.logits_of(hidden), hidden

    def prefill(self, tokens: Array, prompt_lengths: Array, max_decode_len: int
                ) -> tuple[Array, dict]:
        """Runs right-padded prompts [batch, P]: (logits at prompt_lengths - 1
        [batch, vocab] float32, the decode cache: the prompt's keys / values
        and an empty buffer of max_decode_len slots for the new tokens')."""
        cfg = self.config
        batch, prompt_len = tokens.shape
        prompt_lengths = prompt_lengths.astype(jnp.int32)
        key_positions, key_valid = decode_key_layout(prompt_lengths, prompt_len, 0)
        hidden, kv = self.hidden_states(tokens, key_positions, key_valid)
        last = jnp.clip(prompt_lengths - 1, 0, prompt_len - 1)
        last_hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
        dtype = cfg.activation_dtype
        shape = (batch, cfg.num_kv_heads, max_decode_len, cfg.head_dim)
        cache = {"index": jnp.zeros((), jnp.int32), "prompt_lengths": prompt_lengths,
                 "prompt": tuple({name: value.astype(dtype) for name, value in layer.items()}
                                 for layer in kv),
                 "new": tuple({"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}
                              for _ in kv)}
        return self.logits_of(last_hidden), cache

    def decode_step(self, cache: dict, tokens: Array) -> tuple[Array, dict]:
        """tokens [batch] at slot cache['index'] of the new tokens, positions
        prompt_lengths + index -> (logits [batch, vocab] float32, the cache one
        step on: only `index` and `new` change)."""
        index, lengths = cache["index"], cache["prompt_lengths"]
        prompt_len = cache["prompt"][0]["key"].shape[2]
        new_len = cache["new"][0]["key"].shape[2]
        # The keys as one sequence: the right-padded prompt, then the new slots
        # (written through `index`; the causal mask also hides later ones).
        key_positions, key_valid = decode_key_layout(lengths, prompt_len, new_len)
        key_valid = key_valid & (jnp.arange(prompt_len + new_len) < prompt_len + index + 1)
        query_positions = (lengths + index)[:, None]
        cos, sin = rotary_tables(self.config, query_positions)
        bias = attention_bias(query_positions, key_positions, key_valid,
                              self.config.sliding_window)
        x = self.embed_tokens(tokens[:, None])
        new = []
        for layer, prompt, layer_new in zip(self.layers, cache["prompt"], cache["new"]):
            x, layer_new = layer(x, cos, sin, bias, (prompt, layer_new), index)
            new.append(layer_new)
        logits = self.logits_of(self.norm(x))[:, 0]
        return logits, dict(cache, index=index + 1, new=tuple(new))
