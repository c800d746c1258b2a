"""Bradley-Terry reward models on (prompt, chosen, rejected) triples.

The reward model is a T5 encoder-decoder with a scalar head: the encoder
reads the prompt, the decoder reads `[start] + response` teacher-forced, and
a linear head on the final decoder hidden state after the response's last
token gives the score. Trained with -log sigmoid(r(chosen) - r(rejected)).
Parameters: {'t5': T5 params (from an SFT or T5 checkpoint), 'head':
{'kernel': [emb], 'bias': []}}.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from dera_t5x import models
from dera_t5x.training import rewards

Array = jax.Array
Params = Any


def init_params(t5_params: Params, emb_dim: int) -> Params:
    """Reward model params from T5 params; the head starts at zero (score 0)."""
    return {"t5": t5_params,
            "head": {"kernel": jnp.zeros((emb_dim,), jnp.float32),
                     "bias": jnp.zeros((), jnp.float32)}}


def score(model: models.EncoderDecoderModel, params: Params, encoder_input_tokens: Array,
          response_tokens: Array, dropout_rng: Array | None = None) -> Array:
    """Scalar rewards [batch] for responses [batch, dec_len] (0-padded, EOS included)."""
    batch = response_tokens.shape[0]
    start = jnp.full((batch, 1), models.DECODER_START_ID, response_tokens.dtype)
    decoder_inputs = jnp.concatenate([start, response_tokens], axis=1)
    hidden, _ = model.hidden_and_logits(params["t5"], encoder_input_tokens, decoder_inputs,
                                        dropout_rng)
    # Position n has read the start token and all n response tokens.
    last = jnp.sum(response_tokens != 0, axis=1)
    features = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    features = features.astype(jnp.float32)
    return features @ params["head"]["kernel"] + params["head"]["bias"]


def pairwise_loss(model: models.EncoderDecoderModel, params: Params,
                  batch: Mapping[str, Array], dropout_rng: Array | None = None
                  ) -> tuple[Array, dict[str, Array]]:
    """Bradley-Terry loss on `inputs`, `chosen`, `rejected` [batch, len] int32.

    Returns (loss, metrics) with `loss`, `accuracy` (chosen scored higher) and
    `margin` (mean score difference).
    """
    inputs = batch["inputs"]
    _check_same_length(batch["chosen"], batch["rejected"])
    both = jnp.concatenate([batch["chosen"], batch["rejected"]], 0)
    scores = score(model, params, jnp.concatenate([inputs, inputs], 0), both, dropout_rng)
    chosen, rejected = jnp.split(scores, 2)
    margin = chosen - rejected
    loss = -jnp.mean(jax.nn.log_sigmoid(margin))
    return loss, {"loss": loss, "accuracy": jnp.mean((margin > 0).astype(jnp.float32)),
                  "margin": jnp.mean(margin)}


def _check_same_length(chosen: Array, rejected: Array) -> None:
    if chosen.shape != rejected.shape:
        raise ValueError(f"chosen and rejected responses must have one shape, got "
                         f"{chosen.shape} and {rejected.shape}.")


def as_reward(model: models.EncoderDecoderModel, params: Params) -> rewards.Reward:
    """The trained reward model as an RL reward (its params travel as arguments)."""

    def apply(reward_params, encoder_input_tokens, response_tokens):
        return score(model, reward_params, encoder_input_tokens, response_tokens)

    return rewards.Reward(name="reward_model", apply=apply, params=params)
