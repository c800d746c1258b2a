"""Sequence rewards for RL: the length reward, a learned reward model, sums.

A reward is a pytree-friendly pair: `params` (arrays, passed into jitted code
as arguments, never baked in as constants) and a pure
`apply(params, encoder_input_tokens, response_tokens) -> [batch] float32`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import gin
import jax
import jax.numpy as jnp

from dera_t5x import models
from dera_t5x.models import protocol

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Reward:
    """A reward function with its parameters.

    Attributes:
      name: shown in metrics.
      apply: (params, encoder_input_tokens [batch / k, enc_len],
        response_tokens [batch, dec_len]) -> [batch] float32. Responses hold
        the sampled tokens, EOS included, 0 after the end; each input row is
        the input of k consecutive responses (`protocol.rows_per_input`; k is
        1 unless RL keeps one row per prompt, `RLConfig.encode_prompts_once`).
      params: any pytree (None for rewards without parameters).
      per_token: for a reward that is a sum over tokens, (params, inputs,
        responses, eos_ids) -> [batch, dec_len], the per-token terms, given
        the policy's end-of-response ids.
    """

    name: str
    apply: Callable[[Any, Array, Array], Array]
    params: Any = None
    per_token: Callable[[Any, Array, Array, Sequence[int]], Array] | None = None

    def __call__(self, encoder_input_tokens: Array, response_tokens: Array) -> Array:
        return self.apply(self.params, encoder_input_tokens, response_tokens)

    def token_rewards(self, params: Any, encoder_input_tokens: Array,
                      response_tokens: Array, eos_ids: Sequence[int] = (models.EOS_ID,)
                      ) -> Array:
        """Per-token rewards [batch, dec_len] summing to the sequence reward.

        A reward that is a sum over tokens (`per_token`) credits each token
        as it is generated, which lowers the variance of policy gradients
        without changing the objective; any other reward sits on the last
        response token (the first of `eos_ids`, the policy's, or the last
        token of a response cut at the decode limit).
        """
        if self.per_token is not None:
            return self.per_token(params, encoder_input_tokens, response_tokens, eos_ids)
        sequence = self.apply(params, encoder_input_tokens, response_tokens)
        return at_last_token(sequence.astype(jnp.float32),
                             protocol.response_mask(response_tokens, eos_ids))


def at_last_token(sequence_reward: Array, mask: Array) -> Array:
    """[batch] rewards placed on the last True position of mask [batch, len]."""
    last = jnp.maximum(jnp.sum(mask, axis=1).astype(jnp.int32) - 1, 0)
    rewards = jnp.zeros(mask.shape, jnp.float32)
    return rewards.at[jnp.arange(mask.shape[0]), last].add(sequence_reward)


def summary_tokens(response_tokens: Array, eos_ids: Sequence[int] = (models.EOS_ID,)
                   ) -> Array:
    """1.0 on each token that counts towards the length, else 0: [batch, dec_len].

    Counted are the tokens before the first EOS (`protocol.response_mask`),
    so a response "a b c EOS" has length 3; a response cut at the decode
    limit without EOS counts all its tokens.
    """
    return protocol.response_mask(response_tokens, eos_ids, include_eos=False)


def response_length(response_tokens: Array, eos_ids: Sequence[int] = (models.EOS_ID,)
                    ) -> Array:
    """Summary tokens before EOS: [batch, dec_len] -> [batch] float32."""
    return jnp.sum(summary_tokens(response_tokens, eos_ids), axis=-1)


@gin.configurable
def length_reward(scale: float = 1.0, eos_ids: Sequence[int] = (models.EOS_ID,)) -> Reward:
    """r(x, y) = scale * response_length(y); no cap beyond the decode length.

    `eos_ids` end a response for `apply` (evaluation); in RL the policy's own
    end-of-response ids do (`Reward.token_rewards`)."""

    def per_token(params, encoder_input_tokens, response_tokens, policy_eos_ids):
        del params, encoder_input_tokens
        return scale * summary_tokens(response_tokens, policy_eos_ids)

    return Reward(name="length",
                  apply=lambda params, x, y: jnp.sum(per_token(params, x, y, eos_ids), axis=-1),
                  per_token=per_token)


def sum_of_rewards(rewards: Sequence[Reward], weights: Sequence[float] | None = None) -> Reward:
    """r = sum_i w_i r_i, with each reward's parameters carried along."""
    rewards = tuple(rewards)
    weights = tuple(weights) if weights is not None else (1.0,) * len(rewards)
    if not rewards or len(weights) != len(rewards):
        raise ValueError(f"sum_of_rewards needs one weight per reward, got {len(rewards)} "
                         f"rewards and {len(weights)} weights.")

    def apply(params, encoder_input_tokens, response_tokens):
        return sum(w * r.apply(p, encoder_input_tokens, response_tokens)
                   for w, r, p in zip(weights, rewards, params))

    def per_token(params, encoder_input_tokens, response_tokens, eos_ids):
        return sum(w * r.token_rewards(p, encoder_input_tokens, response_tokens, eos_ids)
                   for w, r, p in zip(weights, rewards, params))

    return Reward(name="+".join(r.name for r in rewards), apply=apply,
                  params=tuple(r.params for r in rewards), per_token=per_token)
