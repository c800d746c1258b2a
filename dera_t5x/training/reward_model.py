"""Bradley-Terry reward models on (prompt, chosen, rejected) triples.

The reward model is any model of the protocol with a scalar head
(`scalar_head`): the model reads the prompt and the response teacher-forced
(`Model.response_states`), and the head on the final state after the
response's last token gives the score. Trained with
-log sigmoid(r(chosen) - r(rejected)). Parameters: {'model': the model's
params (from an SFT or pre-trained checkpoint), 'head': the scalar head}.
It trains on a preference task or on pairs (`check_pairs`); `train_proxy`
trains a proxy on samples labelled by a computable (gold) reward.
"""

from __future__ import annotations

import functools
import pathlib
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
from dera_t5x.training import preference_pairs
from dera_t5x.training import rewards
from dera_t5x.training import scalar_head
from dera_t5x.training import trainer

Array = jax.Array
Params = Any
# Lengths that cut nothing of the human-labelled factual_pairs (either vocabulary).
HUMAN_PAIR_LENGTHS = {"inputs": 128, "targets": 64}


def init_params(model_params: Params, hidden_size: int) -> Params:
    """Reward model params from a model's params; the head starts at zero (score 0)."""
    return {"model": model_params, "head": scalar_head.init(hidden_size)}


def score(model: models.Model, params: Params, inputs: Array, response_tokens: Array,
          dropout_rng: Array | None = None) -> Array:
    """Scalar rewards [batch] for responses [batch, len] (EOS included, then
    padding) to inputs [batch / k, in_len], each the input of k consecutive
    responses (`protocol.rows_per_input`)."""
    hidden, _ = model.response_states(params["model"], inputs, response_tokens,
                                      dropout_rng=dropout_rng,
                                      repeats=protocol.rows_per_input(inputs, response_tokens))
    # Position n has read all n response tokens.
    last = protocol.response_lengths(response_tokens, model.eos_ids)
    return scalar_head.apply(params["head"],
                             jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0])


def pairwise_loss(model: models.Model, params: Params,
                  batch: Mapping[str, Array], dropout_rng: Array | None = None
                  ) -> tuple[Array, dict[str, Array]]:
    """Bradley-Terry loss on `inputs`, `chosen`, `rejected` [batch, len] int32.

    With `preference` [batch] (P(chosen is preferred): soft labels) the loss
    is the cross-entropy -p log sigmoid(m) - (1 - p) log sigmoid(-m) of the
    margin m; without it p = 1.

    Returns (loss, metrics) with `loss`, `accuracy` (chosen scored higher) and
    `margin` (mean score difference).
    """
    inputs = batch["inputs"]
    _check_same_length(batch["chosen"], batch["rejected"])
    both = jnp.concatenate([batch["chosen"], batch["rejected"]], 0)
    scores = score(model, params, jnp.concatenate([inputs, inputs], 0), both, dropout_rng)
    chosen, rejected = jnp.split(scores, 2)
    margin = chosen - rejected
    losses = -jax.nn.log_sigmoid(margin)
    if "preference" in batch:
        p = batch["preference"]
        losses = -p * jax.nn.log_sigmoid(margin) - (1.0 - p) * jax.nn.log_sigmoid(-margin)
    loss = jnp.mean(losses)
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


def check_pairs(pairs: Mapping[str, np.ndarray], name: str = "pairs") -> None:
    """Raises ValueError unless `pairs` are trainable preference pairs.

    `inputs` [n, in_len], `chosen`, `rejected` [n, len] integers, no pair
    with identical responses (it carries no preference), and an optional
    `preference` [n] of finite probabilities.
    """
    missing = {"inputs", "chosen", "rejected"} - set(pairs)
    if missing:
        raise ValueError(f"{name} lack {sorted(missing)}; preference pairs need inputs, "
                         "chosen and rejected token arrays.")
    arrays = {key: np.asarray(pairs[key]) for key in ("inputs", "chosen", "rejected")}
    if not all(a.ndim == 2 and np.issubdtype(a.dtype, np.integer) for a in arrays.values()):
        raise ValueError(f"{name}: inputs, chosen and rejected must be 2-D integer token "
                         f"arrays, got {[(a.shape, a.dtype) for a in arrays.values()]}.")
    _check_same_length(arrays["chosen"], arrays["rejected"])
    if len(arrays["inputs"]) != len(arrays["chosen"]) or not len(arrays["inputs"]):
        raise ValueError(f"{name} need one input per pair and at least one pair, got "
                         f"{len(arrays['inputs'])} inputs and {len(arrays['chosen'])} pairs.")
    identical = int(np.sum(np.all(arrays["chosen"] == arrays["rejected"], axis=1)))
    if identical:
        raise ValueError(f"{identical} of {name} have identical chosen and rejected responses "
                         "and carry no preference; drop them (preference_pairs.build does).")
    if "preference" in pairs:
        preference = np.asarray(pairs["preference"], np.float64)
        if preference.shape != (len(arrays["inputs"]),) or not np.all(
                np.isfinite(preference) & (preference >= 0) & (preference <= 1)):
            raise ValueError(f"{name}: preference must hold one probability in [0, 1] per "
                             "pair (no NaN); fix the labels.")


def by_reward(pairs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The pairs a noiseless annotator of their reward would label: chosen is the
    response with the larger `chosen_reward` / `rejected_reward`, ties dropped.

    Accuracy on them (`pairwise_accuracy`) is a reward model's agreement with
    that reward (e.g. a proxy's with the gold reward).
    """
    chosen_reward = np.asarray(pairs["chosen_reward"], np.float64)
    rejected_reward = np.asarray(pairs["rejected_reward"], np.float64)
    if not (np.all(np.isfinite(chosen_reward)) and np.all(np.isfinite(rejected_reward))):
        raise ValueError("The pairs' rewards are not all finite; fix the reward that "
                         "labelled them.")
    swap = chosen_reward < rejected_reward
    keep = chosen_reward != rejected_reward
    return {"inputs": np.asarray(pairs["inputs"])[keep],
            "chosen": np.where(swap[:, None], pairs["rejected"], pairs["chosen"])[keep],
            "rejected": np.where(swap[:, None], pairs["chosen"], pairs["rejected"])[keep]}


def preference_arrays(task_name: str, split: str, feature_lengths: dict[str, int]
                      ) -> dict[str, np.ndarray]:
    """A preference task's split as pairs: `inputs`, `chosen`, `rejected` (reads seqio)."""
    from dera_t5x.data import pipeline  # noqa: PLC0415  (TensorFlow: the driver only)
    features = pipeline.load_split(task_name, split, feature_lengths).features
    if "chosen_decoder_target_tokens" not in features:
        raise ValueError(f"Task {task_name!r} is not a preference task (prompt, chosen, "
                         "rejected); use factual_pairs or register_jsonl_preference_task.")
    return {"inputs": features["encoder_input_tokens"],
            "chosen": features["chosen_decoder_target_tokens"],
            "rejected": features["rejected_decoder_target_tokens"]}


@functools.lru_cache(maxsize=8)
def _accuracy_fn(model: models.Model):
    """The jitted batch accuracy of a model's reward model (one compile per model)."""
    return jax.jit(lambda params, batch: pairwise_loss(model, params, batch)[1]["accuracy"])


def pairwise_accuracy(model: models.Model, params: Params,
                      arrays: Mapping[str, np.ndarray], batch_size: int = 64) -> float:
    """Fraction of held-out pairs where the chosen response scores higher."""
    metrics_fn = _accuracy_fn(model)
    correct = total = 0.0
    for batch, mask in batching.eval_batches(dict(arrays), batch_size):
        n = float(np.sum(mask))
        # Padding rows have equal (empty) responses, so they never count as correct.
        correct += float(metrics_fn(params, batch)) * len(mask)
        total += n
    return correct / max(total, 1.0)


@gin.configurable(denylist=["model_dir", "model", "model_params", "pairs", "eval_pairs"])
def train_reward_model(model_dir: str, *, model: models.Model, model_params: Params,
                       task_name: str = "factual_pairs",
                       feature_lengths: dict[str, int] = gin.REQUIRED, batch_size: int = 16,
                       num_steps: int = 200, optimizer=None, seed: int = 0,
                       checkpoint_every: int = 100, eval_split: str = "validation",
                       mesh_shape: Sequence[int] | None = None,
                       pairs: Mapping[str, np.ndarray] | None = None,
                       eval_pairs: Mapping[str, Mapping[str, np.ndarray]] | None = None
                       ) -> Params:
    """Trains a Bradley-Terry reward model from a model's params (e.g. the SFT model's).

    It trains on the preference task's train split and writes the held-out
    (`eval_split`) pairwise accuracy to the metrics as `eval/accuracy`; or on
    `pairs` (arrays as `check_pairs` wants, e.g. `preference_pairs.build`'s)
    and writes the accuracy on each of `eval_pairs` ({name: pairs}) as
    `eval/<name>`. With several devices (or a `mesh_shape` (data, model)) the
    state is placed by the model's partitioning rules and each batch split
    over 'data', as SFT.
    """
    trainer.check_run_arguments("reward_model.train_reward_model", batch_size=batch_size,
                                num_steps=num_steps, checkpoint_every=checkpoint_every)
    if pairs is not None:
        check_pairs(pairs)
        for name, held_out in (eval_pairs or {}).items():
            check_pairs(held_out, f"eval_pairs[{name!r}]")
    partitioner = partitioning.partitioner_for(mesh_shape, model.param_axes)
    if partitioner is not None:
        partitioner.check_batch_size(batch_size)
    settings = {"model_config": model.config, "task_name": task_name,
                "feature_lengths": feature_lengths, "batch_size": batch_size, "seed": seed,
                "init": integrity.params_fingerprint(model_params)}
    if pairs is None:
        train = preference_arrays(task_name, "train", feature_lengths)
        eval_sets = {"accuracy": preference_arrays(task_name, eval_split, feature_lengths)}
    else:
        train = {key: np.asarray(value) for key, value in pairs.items()
                 if key in ("inputs", "chosen", "rejected", "preference")}
        eval_sets = dict(eval_pairs or {})
        settings.update(task_name=None, pairs=integrity.params_fingerprint(train))
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
        eval_fn=(lambda p: {name: pairwise_accuracy(model, p, arrays)
                            for name, arrays in eval_sets.items()}) if eval_sets else None,
        description="reward model", partitioner=partitioner, settings=settings)
    return state.params


@gin.configurable(denylist=["model_dir", "model", "params_ref", "reward"])
def train_proxy(model_dir: str, *, model: models.Model, params_ref: Params,
                reward: rewards.Reward, task_name: str, feature_lengths: dict[str, int],
                max_decode_len: int, seed: int, tau: float = gin.REQUIRED,
                flip_rate: float = 0.0, pairs_per_prompt: int = 1,
                held_out_fraction: float = 0.1, max_prompts: int | None = None,
                human_task: str | None = None, mesh_shape: Sequence[int] | None = None
                ) -> Params:
    """A proxy reward model: Bradley-Terry on pairs of the reference model's
    samples labelled by `reward` (the gold reward), as Gao et al. 2022.

    The pairs (`preference_pairs.build` on the task's train prompts, labels
    drawn at `tau`, flipped with `flip_rate`) are cached in
    `<model_dir>/pairs.jsonl`; a `held_out_fraction` of the prompts is held
    out. Training pairs that `reward` ties carry no preference of it and are
    dropped. Metrics: `eval/gold_agreement` (accuracy on the held-out pairs
    ordered by `reward`, ties dropped: agreement with it) and, with a
    `human_task` (e.g. 'factual_pairs'), `eval/human_accuracy` on its test split
    (read at `HUMAN_PAIR_LENGTHS`).
    """
    from dera_t5x import aligners  # noqa: PLC0415  (TensorFlow: the drivers only)
    pairs = aligners.build_pairs(
        pathlib.Path(model_dir) / "pairs.jsonl", model=model, params_ref=params_ref,
        reward=reward, task_name=task_name, feature_lengths=feature_lengths,
        max_decode_len=max_decode_len, seed=seed, tau=tau, labels="sampled",
        flip_rate=flip_rate, max_prompts=max_prompts, pairs_per_prompt=pairs_per_prompt)
    train, held_out = preference_pairs.split(pairs, held_out_fraction, seed)
    untied = train["chosen_reward"] != train["rejected_reward"]
    eval_pairs = {"gold_agreement": by_reward(held_out)}
    if human_task is not None:
        eval_pairs["human_accuracy"] = preference_arrays(human_task, "test", HUMAN_PAIR_LENGTHS)
    return train_reward_model(model_dir, model=model, model_params=params_ref,
                              feature_lengths=feature_lengths, seed=seed, mesh_shape=mesh_shape,
                              pairs={k: v[untied] for k, v in train.items()},
                              eval_pairs=eval_pairs)
