"""The generic training machinery shared by SFT, reward models and RL.

- `TrainState`: step, params, optimizer state and rng in one pytree.
- `make_schedule` / `make_optimizer` (gin): optax Adafactor with T5X's
  defaults or AdamW; constant, linear warm-up or rsqrt schedules; optional
  global-norm clipping.
- `make_train_step(loss_fn, optimizer, partitioner)`: one jitted,
  state-donating update for any `loss_fn(params, batch, rng) -> (loss, metrics)`.
- `Checkpointer`: orbax `CheckpointManager` over `TrainState` under
  `model_dir/checkpoints` (periodic, keep N, restore latest or a given step).
- `MetricsWriter`: `metrics.jsonl` and TensorBoard event files in model_dir.
- `train_loop`: resumes from the latest checkpoint in model_dir, steps with a
  tqdm bar (loss, tokens/s), evaluates, checkpoints, and stops on a
  non-finite loss with an error naming the step.

Exact resume: the rng lives in the state and the batch of step s comes from
`batches_from(s)`, so a run killed after a checkpoint and restarted ends with
params bitwise equal to an uninterrupted run's.
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

from dera_t5x import partitioning

Params = Any
Batch = Mapping[str, Any]
Metrics = Mapping[str, Any]
LossFn = Callable[[Params, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
TrainStep = Callable[["TrainState", Batch], tuple["TrainState", Metrics]]
LOG_EVERY = 10


class TrainState(flax.struct.PyTreeNode):
    """Everything a step reads and writes; checkpointed as one pytree.

    Attributes:
      step: int32 [] number of updates applied.
      params: the model parameters.
      opt_state: the optimizer state for `params`.
      rng: the PRNG key of the next step (split once per step).
      skipped_batches: int32 [] batches a step skipped (e.g. RL's non-finite
        rewards); checkpointed, so the count survives a resume.
    """

    step: jax.Array
    params: Params
    opt_state: Any
    rng: jax.Array
    skipped_batches: jax.Array

    @classmethod
    def create(cls, params: Params, optimizer: optax.GradientTransformation,
               seed: int) -> "TrainState":
        """Step 0 with `optimizer.init(params)` and `PRNGKey(seed)`."""
        return cls(step=jnp.zeros((), jnp.int32), params=params,
                   opt_state=optimizer.init(params), rng=jax.random.PRNGKey(seed),
                   skipped_batches=jnp.zeros((), jnp.int32))


@gin.configurable
def make_schedule(kind: str = "constant", learning_rate: float = 1e-3,
                  warmup_steps: int = 0) -> optax.Schedule:
    """A learning-rate schedule.

    Args:
      kind: 'constant'; 'linear_warmup' (0 -> learning_rate over warmup_steps,
        then constant; T5X's 'constant * linear_warmup'); or 'rsqrt' (T5X's
        'constant * rsqrt_decay': constant during the warm-up, then decaying as
        1 / sqrt(step); normalized here so that learning_rate is the peak:
        learning_rate * sqrt(warmup) / sqrt(max(step, warmup)), i.e. T5X's
        base_learning_rate = learning_rate * sqrt(warmup_steps)).
      learning_rate: the base (peak) rate.
      warmup_steps: warm-up length for 'linear_warmup' and 'rsqrt' (0: none).

    Returns:
      step (int32 []) -> learning rate (float32 []).
    """
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}.")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}.")
    if kind == "constant" or (kind == "linear_warmup" and warmup_steps == 0):
        return optax.constant_schedule(learning_rate)
    if kind == "linear_warmup":
        return optax.linear_schedule(0.0, learning_rate, warmup_steps)
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
    """Adafactor as T5X fine-tunes T5, or AdamW.

    Adafactor follows T5X's `adafactor.Adafactor` defaults, which
    `optax.adafactor` shares: second moments factored over the two largest
    dims when both are >= 128 (`min_dim_size_to_factor`), decay rate 0.8
    (beta2 = 1 - (step + 1)^-0.8), epsilon 1e-30 on squared gradients,
    update clipping at block RMS 1.0, updates scaled by the parameter's RMS
    floored at 1e-3 (`multiply_by_parameter_scale`), no momentum. One
    difference: optax scales weight decay by the learning rate, T5X does not
    (T5X's fine-tuning uses none). AdamW is optax's (b1 0.9, b2 0.999,
    eps 1e-8), decoupled weight decay scaled by the learning rate.

    Args:
      name: 'adafactor' or 'adamw'.
      schedule: learning rate schedule (default: constant 1e-3).
      weight_decay: weight decay rate (0 disables it).
      max_grad_norm: clip gradients to this global norm first (None disables).

    Returns:
      the optax transformation.
    """
    schedule = schedule if schedule is not None else make_schedule()
    if name == "adafactor":
        optimizer = optax.adafactor(schedule, decay_rate=0.8, clipping_threshold=1.0,
                                    multiply_by_parameter_scale=True,
                                    weight_decay_rate=weight_decay or None)
    elif name == "adamw":
        optimizer = optax.adamw(schedule, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer name must be 'adafactor' or 'adamw', got {name!r}.")
    if max_grad_norm:
        optimizer = optax.chain(optax.clip_by_global_norm(max_grad_norm), optimizer)
    return optimizer


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    partitioner: partitioning.Partitioner | None = None) -> TrainStep:
    """A jitted `(state, batch) -> (state, metrics)` that donates the old state.

    Each step splits `state.rng` into the next state's rng and the rng handed
    to `loss_fn` (dropout), so a step is a pure function of (state, batch).

    Args:
      loss_fn: `(params, batch, rng) -> (loss [], metrics {name: []})`.
      optimizer: the optax transformation whose state is `state.opt_state`.
      partitioner: with one, the state keeps the partitioner's shardings (pass
        it through `partitioner.shard_state` once) and batches are sharded
        over 'data' (`partitioner.shard_batch`); XLA inserts the collectives.

    Returns:
      the step; its metrics are `loss_fn`'s plus `grad_norm`.
    """

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        rng, step_rng = jax.random.split(state.rng)
        grads, metrics = jax.grad(lambda p: loss_fn(p, batch, step_rng), has_aux=True)(
            state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        metrics = dict(metrics, grad_norm=optax.global_norm(grads))
        return state.replace(step=state.step + 1,
                             params=optax.apply_updates(state.params, updates),
                             opt_state=opt_state, rng=rng), metrics

    if partitioner is None:
        return jax.jit(step, donate_argnums=(0,))
    compiled = {}

    def sharded_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        if "fn" not in compiled:
            shardings = partitioner.state_shardings(state)
            compiled["fn"] = jax.jit(
                step, donate_argnums=(0,),
                in_shardings=(shardings, jax.tree_util.tree_map(
                    lambda x: partitioner.batch_sharding(np.ndim(x)), batch)),
                out_shardings=(shardings, partitioner.replicated()))
        return compiled["fn"](state, batch)

    return sharded_step


class Checkpointer:
    """Orbax checkpoints of a `TrainState` under `model_dir/checkpoints`."""

    def __init__(self, model_dir: str | pathlib.Path, keep: int = 2):
        self.directory = pathlib.Path(model_dir).absolute() / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def latest_step(self) -> int | None:
        """The newest saved step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """The saved steps, ascending."""
        return sorted(self.manager.all_steps())

    def save(self, state: TrainState) -> None:
        """Saves (and waits for) the state's step unless it is already saved."""
        step = int(state.step)
        if step not in self.manager.all_steps():
            self.manager.save(step, args=ocp.args.StandardSave(state))
            self.manager.wait_until_finished()

    def restore(self, target: TrainState, step: int | None = None) -> TrainState:
        """Restores `step` (default: the latest) into the structure and shardings of `target`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        self.manager.close()


class MetricsWriter:
    """Appends metrics to `metrics.jsonl` and TensorBoard event files in model_dir.

    Only process 0 writes (multi-host jobs share one model_dir).
    """

    def __init__(self, model_dir: str | pathlib.Path):
        self.model_dir = pathlib.Path(model_dir)
        self._writer = None
        if jax.process_index() == 0:
            import tensorflow as tf  # Deferred: TensorFlow is slow to import.

            self.model_dir.mkdir(parents=True, exist_ok=True)
            self._tf = tf
            self._writer = tf.summary.create_file_writer(str(self.model_dir / "tensorboard"))

    def write(self, step: int, metrics: Metrics, prefix: str = "train") -> None:
        """Writes `{prefix}/{name}` scalars of `metrics` at `step`."""
        values = {f"{prefix}/{k}": float(v) for k, v in metrics.items()}
        if self._writer is None:
            return
        with open(self.model_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        with self._writer.as_default(step=step):
            for name, value in values.items():
                self._tf.summary.scalar(name, value)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; the message names the step."""


def write_gin_config(model_dir: str | pathlib.Path) -> None:
    """The operative gin config (what the run actually used) as model_dir/config.gin.

    Written by process 0 only.
    """
    if jax.process_index() != 0:
        return
    path = pathlib.Path(model_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.gin").write_text(gin.operative_config_str())


def _restore_for(checkpointer: Checkpointer, state: TrainState, num_steps: int) -> TrainState:
    """The latest checkpoint, or the one at num_steps when the dir went further."""
    latest = checkpointer.latest_step()
    if latest is None:
        return state
    if latest <= num_steps:
        return checkpointer.restore(state, latest)
    if num_steps in checkpointer.all_steps():
        return checkpointer.restore(state, num_steps)
    raise ValueError(f"{checkpointer.directory} already holds step {latest}, past num_steps="
                     f"{num_steps}, and no checkpoint at {num_steps}; use a new model_dir or "
                     f"num_steps >= {latest}.")


def train_loop(state: TrainState, train_step: TrainStep,
               batches_from: Callable[[int], Iterator[Batch]], *, num_steps: int,
               model_dir: str | pathlib.Path, checkpoint_every: int = 100,
               eval_fn: Callable[[Params], Metrics] | None = None, eval_every: int = 0,
               keep_checkpoints: int = 2, description: str = "train",
               tokens_per_batch: Callable[[Batch], int] | None = None,
               partitioner: partitioning.Partitioner | None = None) -> TrainState:
    """Trains `state` to `num_steps`, resuming from the latest checkpoint in model_dir.

    The loss is read back only every `LOG_EVERY` steps and before each
    checkpoint or evaluation, so the host does not stall the device; a
    non-finite loss is still reported at the first step it occurred, and a
    state after it is never saved.

    Args:
      state: the initial state (its structure and shardings are the restore target).
      train_step: `(state, batch) -> (state, metrics)`; metrics hold 'loss'.
      batches_from: step -> iterator over the batches of steps step, step + 1, ...
      num_steps: the total number of steps (a finished model_dir trains no more).
      model_dir: checkpoints/, metrics.jsonl, tensorboard/ and config.gin go here.
      checkpoint_every: save every this many steps (and always at num_steps).
      eval_fn: params -> metrics, run every `eval_every` steps and at the end.
      tokens_per_batch: host batch -> token count, for the tokens/s figure
        (not shown without it).
      partitioner: places the state and shards each batch over 'data'.
    Returns:
      the state at num_steps.
    Raises:
      NonFiniteLossError: on a NaN / inf loss; the last saved checkpoint (from
        before that step) stays restorable.
    """
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}.")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}.")
    checkpointer = Checkpointer(model_dir, keep_checkpoints)
    if partitioner is not None:
        state = partitioner.shard_state(state)
    state = _restore_for(checkpointer, state, num_steps)
    start = int(state.step)
    if start >= num_steps and num_steps > 0:
        checkpointer.close()
        return state
    writer = MetricsWriter(model_dir)
    write_gin_config(model_dir)
    batches = batches_from(start)
    progress = tqdm.tqdm(total=num_steps, initial=start, desc=description, dynamic_ncols=True,
                         mininterval=2.0, disable=jax.process_index() != 0)
    pending: list[tuple[int, Any]] = []  # (step, loss) not yet checked on the host

    def check_pending() -> None:
        for pending_step, loss in pending:
            if not math.isfinite(float(loss)):
                raise NonFiniteLossError(
                    f"{description}: the loss is {float(loss)} at step {pending_step}; stopped "
                    f"without saving. The last good checkpoint is step "
                    f"{checkpointer.latest_step()} in {checkpointer.directory}. Lower the "
                    f"learning rate or check the data.")
        pending.clear()

    last_time, tokens = time.perf_counter(), 0
    try:
        for step in range(start, num_steps):
            batch = next(batches)
            tokens += tokens_per_batch(batch) if tokens_per_batch else 0
            if partitioner is not None:
                batch = partitioner.shard_batch(batch)
            state, metrics = train_step(state, batch)
            done = step + 1
            pending.append((done, metrics["loss"]))
            progress.update(1)
            evaluate = bool(eval_fn and eval_every and done % eval_every == 0
                            and done != num_steps)
            save = done % checkpoint_every == 0 or done == num_steps
            if done % LOG_EVERY == 0 or done == num_steps or evaluate or save:
                check_pending()
                now = time.perf_counter()
                rate = tokens / max(now - last_time, 1e-9)
                last_time, tokens = now, 0
                writer.write(done, metrics)
                postfix = {"loss": f"{float(metrics['loss']):.3f}"}
                if tokens_per_batch:
                    postfix["tokens_per_s"] = f"{rate:.0f}"
                progress.set_postfix(postfix)
            if evaluate:
                writer.write(done, eval_fn(state.params), prefix="eval")
            if save:
                checkpointer.save(state)
        if eval_fn and num_steps > start:
            writer.write(num_steps, eval_fn(state.params), prefix="eval")
        if num_steps == 0:
            checkpointer.save(state)
    finally:
        progress.close()
        writer.close()
        checkpointer.close()
    return state
