"""One linear scalar head on a model's final states: the RL value function and
the reward model's score. Params: {'kernel': [hidden], 'bias': []}, zero at init."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def init(hidden_size: int) -> dict[str, Array]:
    """A zero head (every score 0)."""
    return {"kernel": jnp.zeros((hidden_size,), jnp.float32),
            "bias": jnp.zeros((), jnp.float32)}


def apply(head: dict[str, Array], states: Array) -> Array:
    """states [..., hidden] -> float32 scalars [...]."""
    return states.astype(jnp.float32) @ head["kernel"] + head["bias"]
