"""Supervised fine-tuning of a T5 model on a seqio task (gin-configured).

`train_sft(model_dir, ...)` checks the task and vocabulary before compiling,
trains with `trainer.train_loop` (resuming from model_dir), and returns the
params; a model_dir that already holds the final step returns at once, which
is how pipelines cache the stage.
"""

from __future__ import annotations

from typing import Any

import gin
import jax
import numpy as np

from dera_t5x import checkpoints
from dera_t5x import models
from dera_t5x import network
from dera_t5x.data import pipeline
from dera_t5x.data import tasks
from dera_t5x.data import vocabularies
from dera_t5x.training import trainer

Params = Any
FEATURES = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
            "decoder_loss_weights")


def check_task_and_vocabulary(task_name: str, config: network.T5Config) -> None:
    """Raises a clear error for an unknown task or a vocabulary too big for the model."""
    task = tasks.get_task(task_name)
    for feature in task.output_features.values():
        vocabularies.check_vocab_fits(feature.vocabulary, config.vocab_size)


def make_eval_fn(model: models.EncoderDecoderModel, arrays: dict[str, np.ndarray],
                 batch_size: int):
    """params -> {'loss', 'accuracy'} over a split, padding rows ignored."""
    metrics_fn = jax.jit(lambda params, batch: model.loss(params, batch)[1])

    def eval_fn(params):
        total_loss = total_correct = total_tokens = 0.0
        for batch, mask in pipeline.eval_batches(arrays, batch_size):
            weights = batch["decoder_loss_weights"] * np.asarray(mask)[:, None]
            m = metrics_fn(params, dict(batch, decoder_loss_weights=weights))
            n = float(m["num_tokens"])
            total_loss += float(m["loss"]) * n
            total_correct += float(m["accuracy"]) * n
            total_tokens += n
        return {"loss": total_loss / max(total_tokens, 1.0),
                "accuracy": total_correct / max(total_tokens, 1.0)}

    return eval_fn


@gin.configurable(denylist=["model_dir"])
def train_sft(model_dir: str, *, model_config: network.T5Config = gin.REQUIRED,
              task_name: str = gin.REQUIRED, feature_lengths: dict[str, int] = gin.REQUIRED,
              batch_size: int = 32, num_steps: int = 1000, init_checkpoint: str | None = None,
              optimizer=None, seed: int = 0, checkpoint_every: int = 500,
              eval_every: int = 0, eval_split: str | None = "validation",
              eval_batch_size: int = 64) -> Params:
    """Fine-tunes on `task_name`'s train split; returns the final params.

    Args:
      init_checkpoint: our orbax params, a Hugging Face T5 directory or a T5X
        checkpoint (`checkpoints.load_params`); None starts from random params.
      optimizer: an optax transformation (gin: `@trainer.make_optimizer()`).
    """
    check_task_and_vocabulary(task_name, model_config)
    model = models.EncoderDecoderModel(model_config)
    train = pipeline.load_split(task_name, "train", feature_lengths)
    arrays = {k: train.features[k] for k in FEATURES}
    if init_checkpoint:
        params = checkpoints.load_params(init_checkpoint, model_config)
    else:
        params = model.init(jax.random.PRNGKey(seed))
    optimizer = optimizer if optimizer is not None else trainer.make_optimizer()
    state = trainer.TrainState.create(params, optimizer, seed)
    eval_fn = None
    if eval_split:
        split = pipeline.load_split(task_name, eval_split, feature_lengths)
        eval_fn = make_eval_fn(model, {k: split.features[k] for k in FEATURES},
                               eval_batch_size)
    step = trainer.make_train_step(
        lambda p, batch, rng: model.loss(p, batch, rng if model_config.dropout_rate else None),
        optimizer)
    state = trainer.train_loop(
        state, step, lambda start: pipeline.train_batches(arrays, batch_size, seed, start),
        num_steps=num_steps, model_dir=model_dir, checkpoint_every=checkpoint_every,
        eval_fn=eval_fn, eval_every=eval_every, description="sft",
        tokens_per_batch=lambda b: int(np.sum(b["decoder_loss_weights"])))
    return state.params
