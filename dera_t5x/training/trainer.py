"""The generic training machinery shared by SFT, reward models and RL.

- `TrainState`: step, params, optimizer state and rng in one pytree.
- `make_schedule` / `make_optimizer` (gin): optax Adafactor with T5X's
  defaults or AdamW; constant, linear warm-up or rsqrt schedules; optional
  global-norm clipping.
- `make_train_step(loss_fn, optimizer, partitioner)`: one jitted,
  state-donating update for any `loss_fn(params, batch, rng) -> (loss, metrics)`.
- `Checkpointer`: orbax `CheckpointManager` over `TrainState` under
  `model_dir/checkpoints` (periodic, keep N, restore latest or a given step),
  each step with a manifest of per-array sha256 checksums verified on restore.
- `MetricsWriter`: `metrics.jsonl` and TensorBoard event files in model_dir.
- `train_loop`: resumes from the latest checkpoint in model_dir, steps with a
  tqdm bar (loss, tokens/s), evaluates, checkpoints, and stops on a
  non-finite loss with an error naming the step.

Exact resume: the rng lives in the state and the batch of step s comes from
`batches_from(s)`, so a run killed after a checkpoint (or while writing one:
orbax commits a step by renaming its folder) and restarted ends with params
bitwise equal to an uninterrupted run's, and `metrics.jsonl` holds each step
once (the lines after the restored step are dropped). A resume under other
settings (operative gin config, the caller's `settings`) is refused unless
`trainer.train_loop.allow_changed_settings = True`; every start that trains
appends its operative config to `config.gin`.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
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

from absl import logging

from dera_t5x import checkpoints
from dera_t5x import gin_utils
from dera_t5x import integrity
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
    """Orbax checkpoints of a `TrainState` under `model_dir/checkpoints`.

    Every step saved carries a manifest of per-array sha256 checksums,
    `checkpoints/<step>.dera_checksums.json`, written (atomically) before orbax
    starts the step, so a committed step always has one; `restore` verifies
    the arrays against it and names the checkpoint and array that differ.
    """

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

    def checksums_path(self, step: int) -> pathlib.Path:
        """The checksum manifest of `step` (beside its orbax folder)."""
        return self.directory / f"{step}.{checkpoints.CHECKSUMS_FILE}"

    def save(self, state: TrainState) -> None:
        """Saves (and waits for) the state's step unless it is already saved."""
        step = int(state.step)
        if step in self.manager.all_steps():
            return
        if jax.process_index() == 0:
            integrity.write_json_atomically(self.checksums_path(step),
                                            integrity.tree_checksums(state))
        self.manager.save(step, args=ocp.args.StandardSave(state))
        self.manager.wait_until_finished()
        if jax.process_index() == 0:  # Manifests of steps orbax has deleted.
            kept = set(self.manager.all_steps())
            for manifest in self.directory.glob(f"*.{checkpoints.CHECKSUMS_FILE}"):
                name = manifest.name.split(".", 1)[0]
                if name.isdigit() and int(name) not in kept and int(name) != step:
                    manifest.unlink(missing_ok=True)

    def restore(self, target: TrainState, step: int | None = None) -> TrainState:
        """Restores `step` (default: the latest) into the structure and shardings
        of `target`, verified against its checksums.

        Raises:
          FileNotFoundError: no checkpoint.
          checkpoints.CheckpointIntegrityError: a missing or damaged manifest,
            a damaged orbax file, or an array that differs from its checksum
            (named, with the step's folder).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        where = self.directory / str(step)
        manifest = integrity.read_checksums(self.checksums_path(step), where)
        integrity.check_orbax_metadata(where, where)
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        try:
            restored = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:  # noqa: BLE001  (orbax / tensorstore raise many kinds)
            raise integrity.orbax_error(where, e) from e
        integrity.verify_checksums(restored, manifest, where)
        return restored

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


def read_metrics(model_dir: str | pathlib.Path) -> list[dict[str, Any]]:
    """The records of model_dir/metrics.jsonl; a line cut short by a kill is skipped."""
    path = pathlib.Path(model_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def drop_metrics_after(model_dir: str | pathlib.Path, step: int) -> None:
    """Keeps the metrics.jsonl records of steps <= `step` (a resumed run logs the
    later steps again, each once). Process 0 only; rewritten atomically.
    TensorBoard event files are append-only and keep both (TensorBoard shows
    the later)."""
    path = pathlib.Path(model_dir) / "metrics.jsonl"
    if jax.process_index() != 0 or not path.exists():
        return
    records = read_metrics(model_dir)
    kept = [r for r in records if r["step"] <= step]
    if len(kept) == len(path.read_text().splitlines()):
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(path)


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; the message names the step."""


class ChangedSettingsError(ValueError):
    """A model_dir is resumed under other settings than it was trained with."""


# Settings that may change when a run resumes: how long it trains, where it
# runs, how often it saves and evaluates, and how it computes the same steps
# (RL's rollout early exit, response cut and prompts encoded once: equal up
# to float rounding, as another mesh is). A parameter of this name, in any configurable or nested
# in an argument (`config.chunk_size`), is not compared.
RESUMABLE_CHANGES = frozenset({"num_steps", "mesh_shape", "checkpoint_every", "keep_checkpoints",
                               "eval_every", "eval_batch_size", "rouge_batches", "eval_split",
                               "allow_changed_settings", "chunk_size", "response_bucket",
                               "encode_prompts_once"})
# Configurables that are not a training run's settings: the pipelines key their
# own stages (`reproduce`, `seeds`), placement (`partitioning`), the decode job.
_NOT_RUN_SETTINGS = ("dera_t5x.reproduce.", "dera_t5x.seeds.", "dera_t5x.partitioning.",
                     "dera_t5x.decode_job.")
_SETTINGS_FILE = "run_settings.json"
_START_MARK = "# ---- dera-t5x start"


def _gin_param(key: str) -> tuple[str, str]:
    """('module.fn', 'param') of a gin binding key 'scope/module.fn.param'; a macro
    ('NAME') gives ('', 'NAME')."""
    selector = key.rsplit("/", 1)[-1]
    configurable, _, param = selector.rpartition(".")
    return configurable, param


def _resumable_gin_keys(bindings: Mapping[str, str]) -> set[str]:
    """The binding keys in `RESUMABLE_CHANGES` or of `_NOT_RUN_SETTINGS`, and the
    macros that only such bindings use (e.g. a TRAIN_STEPS macro)."""
    def resumable(key):
        configurable, param = _gin_param(key)
        return bool(configurable) and (param in RESUMABLE_CHANGES
                                       or configurable.startswith(_NOT_RUN_SETTINGS))

    keys = {key for key in bindings if resumable(key)}
    for macro in (key for key in bindings if not _gin_param(key)[0]):
        users = [key for key, value in bindings.items()
                 if re.search(rf"%{re.escape(macro)}\b", value)]
        if all(user in keys for user in users):
            keys.add(macro)
    return keys


def _settings_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """'name: old -> new' for the gin bindings and arguments that differ.

    Gin bindings are compared where both starts have them: the operative
    config lists every parameter (defaults too) of each configurable called so
    far, so a configurable only one start called is another code path around
    the run (its own binding that chose it, e.g. `sft.train_sft.optimizer`,
    differs then), not a setting of it.
    """
    old_gin, new_gin = old.get("gin", {}), new.get("gin", {})
    skip = _resumable_gin_keys({**old_gin, **new_gin})
    lines = [f"{key}: {old_gin[key]} -> {new_gin[key]}"
             for key in sorted(set(old_gin) & set(new_gin))
             if key not in skip and old_gin[key] != new_gin[key]]
    lines += integrity.differences(
        old.get("args", {}), new.get("args", {}),
        lambda name: name.rsplit(".", 1)[-1] in RESUMABLE_CHANGES)
    return lines


def _current_settings(settings: Mapping[str, Any] | None) -> dict[str, Any]:
    return {"gin": gin_utils.operative_bindings(),
            "args": integrity.canonical(dict(settings or {}))}


def check_settings(model_dir: str | pathlib.Path, settings: Mapping[str, Any] | None,
                   allow_changed_settings: bool, trained_steps: int | None) -> dict[str, Any]:
    """Compares this start's settings with those the model_dir was trained under.

    Args:
      settings: the caller's resolved arguments (batch size, seed, ...), compared
        with the operative gin config; `RESUMABLE_CHANGES` are not compared.
      trained_steps: the checkpoint being resumed (None: nothing trained yet,
        nothing to compare).

    Returns:
      this start's settings (written by `record_start`).

    Raises:
      ChangedSettingsError: naming every differing setting, unless allowed.
    """
    current = _current_settings(settings)
    path = pathlib.Path(model_dir) / _SETTINGS_FILE
    if trained_steps is None:
        return current
    if not path.exists():
        logging.warning("%s has checkpoints but no %s (written by an older dera-t5x): the "
                        "settings it was trained with cannot be compared.", model_dir,
                        _SETTINGS_FILE)
        return current
    try:
        previous = json.loads(path.read_text())
    except ValueError as e:
        raise ChangedSettingsError(f"{path} is damaged ({e}); cannot tell the settings this "
                                   "model_dir was trained with.") from e
    changed = _settings_differences(previous, current)
    if not changed:
        return current
    if allow_changed_settings:
        logging.warning("%s: resuming at step %d under changed settings (allowed): %s",
                        model_dir, trained_steps, "; ".join(changed))
        return current
    raise ChangedSettingsError(
        f"{model_dir} holds a run trained to step {trained_steps} under other settings; "
        f"changed: {'; '.join(changed)}. Use a new model_dir, restore the settings, or "
        "resume anyway with --gin.trainer.train_loop.allow_changed_settings=True.")


def record_start(model_dir: str | pathlib.Path, settings: dict[str, Any], step: int) -> None:
    """Appends this start's operative gin config to model_dir/config.gin under a
    separator line (start number, UTC time, step), and records the settings
    compared at the next start. Process 0 only."""
    if jax.process_index() != 0:
        return
    path = pathlib.Path(model_dir)
    path.mkdir(parents=True, exist_ok=True)
    config = path / "config.gin"
    previous = config.read_text() if config.exists() else ""
    number = previous.count(_START_MARK) + 1
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    section = (f"{_START_MARK} {number}, {stamp}, from step {step} ----\n"
               f"{gin.operative_config_str()}\n")
    with open(config, "a") as f:
        f.write(("\n" if previous and not previous.endswith("\n\n") else "") + section)
    integrity.write_json_atomically(path / _SETTINGS_FILE, settings)


def write_gin_config(model_dir: str | pathlib.Path) -> None:
    """Appends the operative gin config (what the run actually used) to
    model_dir/config.gin, under a separator line. Process 0 only."""
    record_start(model_dir, _current_settings(None), 0)


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


def _has_eval_at(model_dir: str | pathlib.Path, step: int) -> bool:
    return any(r["step"] == step and any(k.startswith("eval/") for k in r)
               for r in read_metrics(model_dir))


@gin.configurable(allowlist=["allow_changed_settings"])
def train_loop(state: TrainState, train_step: TrainStep,
               batches_from: Callable[[int], Iterator[Batch]], *, num_steps: int,
               model_dir: str | pathlib.Path, checkpoint_every: int = 100,
               eval_fn: Callable[[Params], Metrics] | None = None, eval_every: int = 0,
               keep_checkpoints: int = 2, description: str = "train",
               tokens_per_batch: Callable[[Batch], int] | None = None,
               partitioner: partitioning.Partitioner | None = None,
               settings: Mapping[str, Any] | None = None,
               allow_changed_settings: bool = False) -> TrainState:
    """Trains `state` to `num_steps`, resuming from the latest checkpoint in model_dir.

    The loss is read back only every `LOG_EVERY` steps and before each
    checkpoint or evaluation, so the host does not stall the device; a
    non-finite loss is still reported at the first step it occurred, and a
    state after it is never saved.

    Resuming: the checkpoint is verified against its checksums; metrics.jsonl
    lines after it are dropped (each step is logged once, in order); the
    settings are compared with those the dir was trained under (the operative
    gin config and `settings`, less `RESUMABLE_CHANGES`) and a difference is
    an error naming each setting unless `allow_changed_settings` (gin:
    `trainer.train_loop.allow_changed_settings = True`). Every start that
    trains appends its operative gin config to config.gin. A finished dir
    returns its state at once (after the same comparison), writing the final
    evaluation if a kill came between the last checkpoint and it.

    Args:
      state: the initial state (its structure and shardings are the restore target).
      train_step: `(state, batch) -> (state, metrics)`; metrics hold 'loss'.
      batches_from: step -> iterator over the batches of steps step, step + 1, ...
      num_steps: the total number of steps (a finished model_dir trains no more).
      model_dir: checkpoints/, metrics.jsonl, tensorboard/, config.gin and
        run_settings.json go here.
      checkpoint_every: save every this many steps (and always at num_steps).
      eval_fn: params -> metrics, run every `eval_every` steps and at the end
        (after the final checkpoint).
      tokens_per_batch: host batch -> token count, for the tokens/s figure
        (not shown without it).
      partitioner: places the state and shards each batch over 'data'.
      settings: the caller's resolved arguments that shape the run (batch
        size, seed, task, model config, ...), compared on resume.
      allow_changed_settings: resume even when settings changed (logged).
    Returns:
      the state at num_steps.
    Raises:
      NonFiniteLossError: on a NaN / inf loss; the last saved checkpoint (from
        before that step) stays restorable.
      ChangedSettingsError: resuming under changed settings (not allowed).
      checkpoints.CheckpointIntegrityError: a damaged checkpoint.
    """
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}.")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}.")
    if keep_checkpoints < 1:
        raise ValueError(f"keep_checkpoints must be >= 1, got {keep_checkpoints}.")
    checkpointer = Checkpointer(model_dir, keep_checkpoints)
    try:
        latest = checkpointer.latest_step()
        current = check_settings(model_dir, settings, allow_changed_settings, latest)
        if partitioner is not None:
            state = partitioner.shard_state(state)
        state = _restore_for(checkpointer, state, num_steps)
        start = int(state.step)
        if start >= num_steps and num_steps > 0:
            if eval_fn and latest == num_steps and not _has_eval_at(model_dir, num_steps):
                # Killed between the final checkpoint and the final evaluation.
                writer = MetricsWriter(model_dir)
                writer.write(num_steps, eval_fn(state.params), prefix="eval")
                writer.close()
            checkpointer.close()
            return state
        drop_metrics_after(model_dir, start)
        record_start(model_dir, current, start)
    except BaseException:
        checkpointer.close()
        raise
    writer = MetricsWriter(model_dir)
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


def check_run_arguments(where: str, **counts: Any) -> None:
    """Raises ValueError naming the gin binding (`where.NAME`) of a bad count:
    batch sizes and checkpoint_every >= 1, the others (num_steps, eval_every,
    ...) >= 0. The trainers call it before anything is loaded, compiled or
    written."""
    for name, value in counts.items():
        low = 1 if name.endswith("batch_size") or name == "checkpoint_every" else 0
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{where}.{name} must be an integer >= {low}, got {value!r}; set "
                             f"it with --gin.{where}.{name}=N.")
