"""Bradley-Terry reward models on (prompt, chosen, rejected) triples.

The reward model is any model of the protocol with a scalar head
(`scalar_head`): the model reads the prompt and the response teacher-forced
(`Model.response_states`), and the head on the final state after the
response's last token gives the score. Trained with
-log sigmoid(r(chosen) - r(rejected)). Parameters: {'model': the model's
params (from an SFT or pre-trained checkpoint), 'head': the scalar head}.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from dera_t5x import batching
from dera_t5x import integrity
from dera_t5x import models
from dera_t5x import partitioning
from dera_t5x.models import protocol
from dera_t5x.training import rewards
from dera_t5x.training import scalar_head
from dera_t5x.training import trainer

Array = jax.Array
Params = Any


def init_params(model_params: Params, hidden_size: int) -> Params:
    """Reward model params from a model's params; the head starts at zero (score 0)."""
    return {"model": model_params, "head": scalar_head.init(hidden_size)}


def score(model: models.Model, params: Params, inputs: Array, response_tokens: Array,
          dropout_rng: Array | None = None) -> Array:
    """Scalar rewards [batch] for responses [batch, len] (EOS included, then padding)."""
    hidden, _ = model.response_states(params["model"], inputs, response_tokens,
                                      dropout_rng=dropout_rng)
    # Position n has read all n response tokens.
    last = protocol.response_lengths(response_tokens, model.eos_ids)
    return scalar_head.apply(params["head"],
                             jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0])


def pairwise_loss(model: models.Model, params: Params,
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


def as_reward(model: models.Model, params: Params) -> rewards.Reward:
    """The trained reward model as an RL reward (its params travel as arguments)."""

    def apply(reward_params, encoder_input_tokens, response_tokens):
        return score(model, reward_params, encoder_input_tokens, response_tokens)

    return rewards.Reward(name="reward_model", apply=apply, params=params)


def _preference_arrays(task_name: str, split: str, feature_lengths: dict[str, int]
                       ) -> dict[str, np.ndarray]:
    from dera_t5x.data import pipeline  # noqa: PLC0415  (TensorFlow: the driver only)
    features = pipeline.load_split(task_name, split, feature_lengths).features
    if "chosen_decoder_target_tokens" not in features:
        raise ValueError(f"Task {task_name!r} is not a preference task (prompt, chosen, "
                         "rejected); use factual_pairs or register_jsonl_preference_task.")
    return {"inputs": features["encoder_input_tokens"],
            "chosen": features["chosen_decoder_target_tokens"],
            "rejected": features["rejected_decoder_target_tokens"]}


def pairwise_accuracy(model: models.Model, params: Params,
                      arrays: Mapping[str, np.ndarray], batch_size: int = 64) -> float:
    """Fraction of held-out pairs where the chosen response scores higher."""
    metrics_fn = jax.jit(lambda p, b: pairwise_loss(model, p, b)[1]["accuracy"])
    correct = total = 0.0
    for batch, mask in batching.eval_batches(dict(arrays), batch_size):
        n = float(np.sum(mask))
        # Padding rows have equal (empty) responses, so they never count as correct.
        correct += float(metrics_fn(params, batch)) * len(mask)
        total += n
    return correct / max(total, 1.0)


@gin.configurable(denylist=["model_dir", "model", "model_params"])
def train_reward_model(model_dir: str, *, model: models.Model, model_params: Params,
                       task_name: str = "factual_pairs",
                       feature_lengths: dict[str, int] = gin.REQUIRED, batch_size: int = 16,
                       num_steps: int = 200, optimizer=None, seed: int = 0,
                       checkpoint_every: int = 100, eval_split: str = "validation",
                       mesh_shape: Sequence[int] | None = None) -> Params:
    """Trains a Bradley-Terry reward model from a model's params (e.g. the SFT model's).

    Held-out pairwise accuracy is written to the metrics as `eval/accuracy`.
    With several devices (or a `mesh_shape` (data, model)) the state is placed
    by the model's partitioning rules and each batch split over 'data', as SFT.
    """
    trainer.check_run_arguments("reward_model.train_reward_model", batch_size=batch_size,
                                num_steps=num_steps, checkpoint_every=checkpoint_every)
    partitioner = partitioning.partitioner_for(mesh_shape, model.param_axes)
    if partitioner is not None:
        partitioner.check_batch_size(batch_size)
    settings = {"model_config": model.config, "task_name": task_name,
                "feature_lengths": feature_lengths, "batch_size": batch_size, "seed": seed,
                "init": integrity.params_fingerprint(model_params)}
    train = _preference_arrays(task_name, "train", feature_lengths)
    held_out = _preference_arrays(task_name, eval_split, feature_lengths)
    optimizer = optimizer if optimizer is not None else trainer.make_optimizer(name="adamw")
    # A copy: the train step donates its state, and model_params stays in use.
    model_params = jax.tree_util.tree_map(jnp.copy, model_params)
    state = trainer.TrainState.create(init_params(model_params, model.hidden_size),
                                      optimizer, seed)
    step = trainer.make_train_step(lambda p, batch, rng: pairwise_loss(model, p, batch),
                                   optimizer, partitioner)
    state = trainer.train_loop(
        state, step, lambda start: batching.train_batches(train, batch_size, seed, start),
        num_steps=num_steps, model_dir=model_dir, checkpoint_every=checkpoint_every,
        eval_fn=lambda p: {"accuracy": pairwise_accuracy(model, p, held_out)},
        description="reward model", partitioner=partitioner, settings=settings)
    return state.params
