"""Layers the model families share: a 2-D dense layer, RMS norm, the token embedding.

Kernels are stored 2-D [in, out] and applied as one 2-D matmul over the
flattened leading dims, so that their gradients are plain 2-D matmuls too (no
layout copies). Norms are computed in float32.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def init_scaled_normal(scale: float = 1.0):
    """Normal init with stddev sqrt(scale / fan_in) for a 2-D kernel."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.normal(key, shape, dtype) * math.sqrt(scale / shape[0])

    return init


class Dense(nn.Module):
    """A dense layer with a 2-D kernel [in, out] and an optional bias [out]:
    [..., in] -> [..., out]."""

    features: int
    dtype: Any = jnp.float32
    kernel_init: Any = init_scaled_normal(1.0)
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        y = jnp.dot(x.reshape(-1, x.shape[-1]).astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,))
            y = y + bias.astype(self.dtype)
        return y.reshape(x.shape[:-1] + (self.features,))


class RMSNorm(nn.Module):
    """x / rms(x) * scale: no mean subtraction, no bias (T5's layer norm and
    Hugging Face's LlamaRMSNorm), computed in float32."""

    epsilon: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
        return (x * scale.astype(jnp.float32)).astype(self.dtype)


class Embed(nn.Module):
    """The token embedding [vocab, features]; `attend` gives tied logits."""

    num_embeddings: int
    features: int
    dtype: Any = jnp.float32

    def setup(self):
        self.embedding = self.param("embedding", nn.initializers.normal(stddev=1.0),
                                    (self.num_embeddings, self.features))

    def __call__(self, tokens: Array) -> Array:
        return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

    def attend(self, x: Array) -> Array:
        """[..., features] -> float32 [..., vocab], as one 2-D matmul."""
        logits = jnp.dot(x.reshape(-1, x.shape[-1]).astype(self.dtype),
                         self.embedding.T.astype(self.dtype), preferred_element_type=jnp.float32)
        return logits.reshape(x.shape[:-1] + (self.num_embeddings,))
