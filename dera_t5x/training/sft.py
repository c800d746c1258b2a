"""Supervised fine-tuning of a T5 model on a seqio task (gin-configured).

`train_sft(model_dir, ...)` checks the task, vocabulary and batch size before
compiling, trains with `trainer.train_loop` (resuming from model_dir), and
returns the params; a model_dir that already holds the final step returns
them at once, which is how pipelines cache the stage. Evaluation is the
validation loss / token accuracy, plus ROUGE of greedy decodes on the first
`rouge_batches` validation batches when asked.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import gin
import jax
import numpy as np
import optax

from dera_t5x import batching
from dera_t5x import checkpoints
from dera_t5x import models
from dera_t5x.models.t5 import network
from dera_t5x import partitioning
from dera_t5x.data import metrics as text_metrics
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


def make_eval_fn(model: models.Model, arrays: dict[str, np.ndarray],
                 batch_size: int) -> Callable[[Params], dict[str, float]]:
    """params -> {'loss', 'accuracy'} over a split (token-weighted; padding rows ignored).

    Args:
      arrays: the `FEATURES`, each [num_examples, length].
    """
    metrics_fn = jax.jit(lambda params, batch: model.loss(params, batch)[1])

    def eval_fn(params: Params) -> dict[str, float]:
        total_loss = total_correct = total_tokens = 0.0
        for batch, mask in batching.eval_batches(arrays, batch_size):
            weights = batch["decoder_loss_weights"] * np.asarray(mask)[:, None]
            m = metrics_fn(params, dict(batch, decoder_loss_weights=weights))
            n = float(m["num_tokens"])
            total_loss += float(m["loss"]) * n
            total_correct += float(m["accuracy"]) * n
            total_tokens += n
        return {"loss": total_loss / max(total_tokens, 1.0),
                "accuracy": total_correct / max(total_tokens, 1.0)}

    return eval_fn


def make_rouge_fn(model: models.Model, encoder_input_tokens: np.ndarray,
                  references: Sequence[str], vocabulary: Any, batch_size: int,
                  max_decode_len: int) -> Callable[[Params], dict[str, float]]:
    """params -> ROUGE-1/2/L of greedy decodes of `encoder_input_tokens` [n, length]."""
    predict = jax.jit(lambda params, tokens: model.predict(
        params, tokens, jax.random.PRNGKey(0), max_decode_len=max_decode_len))

    def rouge_fn(params: Params) -> dict[str, float]:
        predictions = []
        for batch, mask in batching.eval_batches(
                {"encoder_input_tokens": encoder_input_tokens}, batch_size):
            out = predict(params, batch["encoder_input_tokens"])
            predictions += vocabularies.detokenize(vocabulary, np.asarray(out.tokens)[mask])
        return text_metrics.rouge(predictions, list(references))

    return rouge_fn


@gin.configurable(denylist=["model_dir"])
def train_sft(model_dir: str, *, model_config: network.T5Config = gin.REQUIRED,
              task_name: str = gin.REQUIRED, feature_lengths: dict[str, int] = gin.REQUIRED,
              batch_size: int = 32, num_steps: int = 1000, init_checkpoint: str | None = None,
              optimizer: optax.GradientTransformation | None = None, seed: int = 0,
              checkpoint_every: int = 500, eval_every: int = 0,
              eval_split: str | None = "validation", eval_batch_size: int = 64,
              rouge_batches: int = 0, mesh_shape: Sequence[int] | None = None) -> Params:
    """Fine-tunes on `task_name`'s train split; returns the final params.

    Args:
      model_dir: checkpoints, metrics.jsonl, TensorBoard events and config.gin.
      model_config: the network; its vocab_size must hold the task's vocabulary.
      feature_lengths: {'inputs': ..., 'targets': ...} in tokens.
      init_checkpoint: our orbax params, a Hugging Face T5 directory or a T5X
        checkpoint (`checkpoints.load_params`); None starts from random params.
      optimizer: an optax transformation (gin: `@trainer.make_optimizer()`);
        default Adafactor at a constant 1e-3.
      eval_split: split for the validation loss / accuracy; None disables eval.
      rouge_batches: also report ROUGE of greedy decodes on this many eval batches.
      mesh_shape: (data, model) device mesh; None puts every device on 'data'.
    """
    trainer.check_run_arguments("sft.train_sft", batch_size=batch_size, num_steps=num_steps,
                                checkpoint_every=checkpoint_every, eval_every=eval_every,
                                eval_batch_size=eval_batch_size, rouge_batches=rouge_batches)
    check_task_and_vocabulary(task_name, model_config)
    model = models.for_config(model_config)
    partitioner = partitioning.partitioner_for(mesh_shape, model.param_axes)
    if partitioner is not None:
        partitioner.check_batch_size(batch_size)
    train = pipeline.load_split(task_name, "train", feature_lengths)
    arrays = {k: train.features[k] for k in FEATURES}
    eval_fn = None
    if eval_split:
        split = pipeline.load_split(task_name, eval_split, feature_lengths)
        loss_fn = make_eval_fn(model, {k: split.features[k] for k in FEATURES}, eval_batch_size)
        eval_fn = loss_fn
        if rouge_batches:
            count = min(rouge_batches * eval_batch_size, split.num_examples)
            rouge_fn = make_rouge_fn(
                model, split.features["encoder_input_tokens"][:count],
                split.texts["targets"][:count],
                tasks.get_task(task_name).output_features["targets"].vocabulary,
                eval_batch_size, feature_lengths["targets"])
            eval_fn = lambda params: {**loss_fn(params), **rouge_fn(params)}
    if init_checkpoint:
        params = checkpoints.load_params(init_checkpoint, model_config)
    else:
        params = model.init(jax.random.PRNGKey(seed))
    optimizer = optimizer if optimizer is not None else trainer.make_optimizer()
    state = trainer.TrainState.create(params, optimizer, seed)
    step = trainer.make_train_step(
        lambda p, batch, rng: model.loss(p, batch, rng if model_config.dropout_rate else None),
        optimizer, partitioner)
    state = trainer.train_loop(
        state, step, lambda start: batching.train_batches(arrays, batch_size, seed, start),
        num_steps=num_steps, model_dir=model_dir, checkpoint_every=checkpoint_every,
        eval_fn=eval_fn, eval_every=eval_every, description="sft",
        tokens_per_batch=lambda b: int(np.sum(b["decoder_loss_weights"])),
        partitioner=partitioner,
        settings={"model_config": model_config, "task_name": task_name,
                  "feature_lengths": feature_lengths, "batch_size": batch_size, "seed": seed,
                  "init_checkpoint": init_checkpoint})
    return state.params
