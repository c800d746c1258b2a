"""The generic training machinery shared by SFT, reward models and RL.

- `TrainState`: step, params, optimizer state and rng in one pytree.
- `make_optimizer`: optax Adafactor (T5X's fine-tuning defaults) or AdamW with
  constant, linear warm-up or rsqrt schedules and global-norm clipping.
- `make_train_step(loss_fn, optimizer)`: one jitted, state-donating update for
  any `loss_fn(params, batch, rng) -> (loss, metrics)`.
- `Checkpointer`: orbax `CheckpointManager` over `TrainState` (periodic, keep
  N, restore latest).
- `MetricsWriter`: `metrics.jsonl` and TensorBoard event files in the model dir.
- `train_loop`: resumes from the latest checkpoint, steps with a progress
  bar, evaluates, checkpoints, stops on a non-finite loss naming the step.

Exact resume: the rng lives in the state and the batch of step s comes from
`batches_from(s)`, so a run killed after a checkpoint and restarted ends with
the same params as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Any, Callable, Iterator, Mapping

import flax.struct
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

Params = Any
Batch = Mapping[str, Any]
LossFn = Callable[[Params, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Params
    opt_state: Any
    rng: jax.Array

    @classmethod
    def create(cls, params: Params, optimizer: optax.GradientTransformation,
               seed: int) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params,
                   opt_state=optimizer.init(params), rng=jax.random.PRNGKey(seed))


@gin.configurable
def make_schedule(kind: str = "constant", learning_rate: float = 1e-3, warmup_steps: int = 0,
                  ) -> optax.Schedule:
    """`constant`, `linear_warmup` (0 -> lr over warmup_steps, then constant) or
    `rsqrt` (T5X: lr * rsqrt(max(step, warmup_steps)) * sqrt(warmup_steps))."""
    if kind == "constant":
        return optax.constant_schedule(learning_rate)
    if kind == "linear_warmup":
        return optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1))
    if kind == "rsqrt":
        warmup = max(warmup_steps, 1)
        return lambda step: learning_rate * jnp.sqrt(warmup) * jax.lax.rsqrt(
            jnp.maximum(step, warmup).astype(jnp.float32))
    raise ValueError(f"schedule kind must be 'constant', 'linear_warmup' or 'rsqrt', "
                     f"got {kind!r}.")


@gin.configurable
def make_optimizer(name: str = "adafactor", schedule: optax.Schedule | None = None,
                   weight_decay: float = 0.0, max_grad_norm: float | None = None
                   ) -> optax.GradientTransformation:
    """Adafactor as T5X fine-tunes T5 (factored second moments, decay 0.8,
    update clipping 1.0, relative step off, no momentum) or AdamW."""
    schedule = schedule if schedule is not None else make_schedule()
    if name == "adafactor":
        optimizer = optax.adafactor(schedule, decay_rate=0.8, clipping_threshold=1.0,
                                    multiply_by_parameter_scale=False,
                                    weight_decay_rate=weight_decay or None)
    elif name == "adamw":
        optimizer = optax.adamw(schedule, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer name must be 'adafactor' or 'adamw', got {name!r}.")
    if max_grad_norm:
        optimizer = optax.chain(optax.clip_by_global_norm(max_grad_norm), optimizer)
    return optimizer


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """A jitted `(state, batch) -> (state, metrics)` that donates the old state."""

    def step(state: TrainState, batch: Batch):
        rng, step_rng = jax.random.split(state.rng)
        grads, metrics = jax.grad(lambda p: loss_fn(p, batch, step_rng), has_aux=True)(
            state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        metrics = dict(metrics, grad_norm=optax.global_norm(grads))
        return TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                          opt_state=opt_state, rng=rng), metrics

    return jax.jit(step, donate_argnums=(0,))


class Checkpointer:
    """Orbax checkpoints of a `TrainState` under `model_dir/checkpoints`."""

    def __init__(self, model_dir: str | pathlib.Path, keep: int = 2):
        self.directory = pathlib.Path(model_dir).absolute() / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState) -> None:
        step = int(state.step)
        if step not in self.manager.all_steps():
            self.manager.save(step, args=ocp.args.StandardSave(state))
            self.manager.wait_until_finished()

    def restore(self, target: TrainState, step: int | None = None) -> TrainState:
        """Restores `step` (default: the latest) into the structure of `target`."""
        step = self.latest_step() if step is None else step
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        self.manager.close()


class MetricsWriter:
    """Appends metrics to `metrics.jsonl` and TensorBoard event files."""

    def __init__(self, model_dir: str | pathlib.Path):
        import tensorflow as tf  # Deferred: TensorFlow is slow to import.

        self.model_dir = pathlib.Path(model_dir)
        self.model_dir.mkdir(parents=True, exist_ok=True)
        self._tf = tf
        self._writer = tf.summary.create_file_writer(str(self.model_dir / "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, float], prefix: str = "train") -> None:
        values = {f"{prefix}/{k}": float(v) for k, v in metrics.items()}
        with open(self.model_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        with self._writer.as_default(step=step):
            for name, value in values.items():
                self._tf.summary.scalar(name, value)
        self._writer.flush()


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; the message names the step."""


def write_gin_config(model_dir: str | pathlib.Path) -> None:
    """The operative gin config next to the checkpoints, as T5X does."""
    path = pathlib.Path(model_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.gin").write_text(gin.config_str())


def train_loop(state: TrainState, train_step: Callable, batches_from: Callable[[int], Iterator],
               *, num_steps: int, model_dir: str | pathlib.Path, checkpoint_every: int = 100,
               eval_fn: Callable[[Params], dict[str, float]] | None = None,
               eval_every: int = 0, keep_checkpoints: int = 2, description: str = "train",
               tokens_per_batch: Callable[[Batch], int] | None = None) -> TrainState:
    """Trains `state` to `num_steps`, resuming from the latest checkpoint in model_dir.

    Args:
      batches_from: step -> iterator over the batches of steps step, step + 1, ...
      eval_fn: params -> metrics, run every `eval_every` steps and at the end.
    Raises:
      NonFiniteLossError: on a NaN / inf loss; the last saved checkpoint (from
        before that step) stays restorable.
    """
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}.")
    checkpointer = Checkpointer(model_dir, keep_checkpoints)
    writer = MetricsWriter(model_dir)
    write_gin_config(model_dir)
    if checkpointer.latest_step() is not None:
        state = checkpointer.restore(state)
    start = int(state.step)
    batches = batches_from(start)
    progress = tqdm.tqdm(total=num_steps, initial=start, desc=description, dynamic_ncols=True,
                         mininterval=2.0)
    last_time, tokens = time.perf_counter(), 0
    try:
        for step in range(start, num_steps):
            batch = next(batches)
            new_state, metrics = train_step(state, batch)
            loss = float(metrics["loss"])
            if not math.isfinite(loss):
                raise NonFiniteLossError(
                    f"{description}: the loss is {loss} at step {step + 1}; stopped without "
                    f"saving. The last good checkpoint is step {checkpointer.latest_step()} in "
                    f"{checkpointer.directory}. Lower the learning rate or check the data.")
            state = new_state
            tokens += tokens_per_batch(batch) if tokens_per_batch else 0
            done = step + 1
            if done % 10 == 0 or done == num_steps:
                now = time.perf_counter()
                rate = tokens / max(now - last_time, 1e-9)
                last_time, tokens = now, 0
                writer.write(done, {k: float(v) for k, v in metrics.items()})
                progress.set_postfix(loss=f"{loss:.3f}", tokens_per_s=f"{rate:.0f}")
            progress.update(1)
            if eval_fn and eval_every and done % eval_every == 0 and done != num_steps:
                writer.write(done, eval_fn(state.params), prefix="eval")
            if done % checkpoint_every == 0 or done == num_steps:
                checkpointer.save(state)
        if eval_fn and start < num_steps:
            writer.write(num_steps, eval_fn(state.params), prefix="eval")
        if start == num_steps == 0:
            checkpointer.save(state)
    finally:
        progress.close()
        checkpointer.close()
    return state
