"""Direct preference optimization (DPO, Rafailov et al. 2023) on the shared train loop.

DPO at beta fits the policy to preference pairs (prompt, chosen, rejected)
against a frozen reference without a reward model; for preferences drawn
from a Bradley-Terry model with reward r / tau it targets the same
KL-regularized optimum as RL, `pi_ref * exp(r / (tau * beta))`, so DeRa at
lambda emulates DPO retrained at beta / lambda.

With `delta = (log pi(chosen) - log pi_ref(chosen)) - (log pi(rejected) -
log pi_ref(rejected))`, the per-pair losses are (as TRL and Tunix define them):

    sigmoid: -(1 - eps) * log_sigmoid(beta * delta) - eps * log_sigmoid(-beta * delta)
    hinge:   relu(1 - beta * delta)
    ipo:     (delta - 1 / (2 * beta)) ** 2   (log-probs averaged per token)

`eps` (label smoothing) may be per pair: a soft label p = P(chosen is
preferred) is eps = 1 - p. Sequence log-probs include the EOS and follow the
model's banned-token rule (the distribution generation samples from).
Metrics carry TRL's names: rewards/chosen, rewards/rejected,
rewards/accuracies, rewards/margins, logps/chosen, logps/rejected.

Any model of the protocol: pairs for a decoder-only model hold right-padded
prompts as `inputs` and their `prompt_lengths` [num_pairs] (the optional
`PROMPT_FEATURE`, which T5 pairs do not have).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dera_t5x import batching
from dera_t5x import models
from dera_t5x import partitioning
from dera_t5x.models import protocol
from dera_t5x.training import trainer

Array = jax.Array
Params = Any
LOSS_TYPES = ("sigmoid", "hinge", "ipo")
# The arrays a DPO dataset holds, each [num_pairs, ...].
PAIR_FEATURES = ("inputs", "chosen", "rejected", "preference")
# A decoder-only model's pairs also hold each prompt's length, [num_pairs].
PROMPT_FEATURE = "prompt_lengths"


def dpo_loss(policy_chosen_logps: Array, policy_rejected_logps: Array,
             ref_chosen_logps: Array, ref_rejected_logps: Array, *, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float | Array = 0.0
             ) -> tuple[Array, Array, Array]:
    """Per-pair DPO losses and implicit rewards.

    Args:
      policy_chosen_logps, ...: [batch] sequence log-probs (per-token averages
        for 'ipo').
      beta: KL strength (> 0).
      loss_type: 'sigmoid', 'hinge' or 'ipo'.
      label_smoothing: eps, scalar or [batch] ('sigmoid' only).

    Returns:
      (losses, chosen_rewards, rejected_rewards), each [batch]; the rewards
      are beta * (policy - ref), without gradient.
    """
    check_settings(beta, loss_type)
    delta = ((policy_chosen_logps - ref_chosen_logps)
             - (policy_rejected_logps - ref_rejected_logps))
    if loss_type == "sigmoid":
        eps = jnp.asarray(label_smoothing, jnp.float32)
        losses = (-(1.0 - eps) * jax.nn.log_sigmoid(beta * delta)
                  - eps * jax.nn.log_sigmoid(-beta * delta))
    elif loss_type == "hinge":
        losses = jax.nn.relu(1.0 - beta * delta)
    else:
        losses = jnp.square(delta - 1.0 / (2.0 * beta))
    chosen_rewards = jax.lax.stop_gradient(beta * (policy_chosen_logps - ref_chosen_logps))
    rejected_rewards = jax.lax.stop_gradient(beta * (policy_rejected_logps - ref_rejected_logps))
    return losses, chosen_rewards, rejected_rewards


def check_settings(beta: float, loss_type: str) -> None:
    """Raises ValueError for beta <= 0 or an unknown loss type (before any work)."""
    if isinstance(beta, (int, float)) and not (np.isfinite(beta) and beta > 0):
        raise ValueError(f"DPO beta must be a finite number > 0, got {beta!r}.")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}.")


def sequence_logps(model: models.Model, params: Params, inputs: Array, responses: Array, *,
                   average: bool = False, prompt_lengths: Array | None = None) -> Array:
    """log pi(response | input) [batch], EOS included, banned ids excluded;
    the per-token mean when `average` (IPO). `prompt_lengths` [batch]: a
    decoder-only model's."""
    token_logps = model.token_log_probs(params, inputs, responses, exclude_banned=True,
                                        prompt_lengths=prompt_lengths)
    total = jnp.sum(token_logps, axis=-1)
    if not average:
        return total
    count = jnp.sum(protocol.response_mask(responses, model.eos_ids), axis=-1)
    return total / jnp.maximum(count, 1.0)


def pair_logps(model: models.Model, params: Params, batch: Mapping[str, Array], *,
               average: bool = False) -> tuple[Array, Array]:
    """(chosen, rejected) sequence log-probs [batch] in one forward pass over both."""
    inputs = jnp.concatenate([batch["inputs"], batch["inputs"]], axis=0)
    responses = jnp.concatenate([batch["chosen"], batch["rejected"]], axis=0)
    lengths = batch.get(PROMPT_FEATURE)
    lengths = None if lengths is None else jnp.concatenate([lengths, lengths], axis=0)
    return jnp.split(sequence_logps(model, params, inputs, responses, average=average,
                                    prompt_lengths=lengths), 2)


def loss_fn(model: models.Model, params: Params, batch: Mapping[str, Array], *, beta: float,
            loss_type: str = "sigmoid") -> tuple[Array, dict[str, Array]]:
    """The mean DPO loss of a batch and TRL-named metrics.

    Args:
      batch: `inputs`, `chosen`, `rejected` [batch, len]; `preference` [batch]
        (the probability that chosen is preferred: 1 for hard labels);
        `ref_chosen_logps`, `ref_rejected_logps` [batch]; for a decoder-only
        model `prompt_lengths` [batch].
    """
    chosen, rejected = pair_logps(model, params, batch, average=loss_type == "ipo")
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        chosen, rejected, batch["ref_chosen_logps"], batch["ref_rejected_logps"], beta=beta,
        loss_type=loss_type, label_smoothing=1.0 - batch["preference"])
    loss = jnp.mean(losses)
    metrics = {
        "loss": loss,
        "rewards/chosen": jnp.mean(chosen_rewards),
        "rewards/rejected": jnp.mean(rejected_rewards),
        "rewards/accuracies": jnp.mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
        "rewards/margins": jnp.mean(chosen_rewards - rejected_rewards),
        "logps/chosen": jnp.mean(chosen),
        "logps/rejected": jnp.mean(rejected),
    }
    return loss, metrics


def check_pairs(pairs: Mapping[str, np.ndarray], model: models.Model) -> None:
    """Refuses data DPO cannot learn from, naming the first bad pair.

    Raises:
      ValueError: missing features, different row counts, a preference
        outside [0, 1], prompt lengths outside [1, inputs width], an empty
        response (a row that starts with padding,
        a banned id: no token at all; the EOS alone is a valid response),
        or a pair whose
        chosen and rejected responses are identical (its gradient is zero and,
        with a hard label, it says nothing).
    """
    missing = [name for name in PAIR_FEATURES if name not in pairs]
    if missing:
        raise ValueError(f"DPO pairs lack {missing}; they need {PAIR_FEATURES}.")
    rows = {name: len(pairs[name]) for name in (*PAIR_FEATURES, PROMPT_FEATURE)
            if name in pairs}
    if len(set(rows.values())) != 1 or not rows["inputs"]:
        raise ValueError(f"DPO pairs must be non-empty with one row per pair, got {rows}.")
    if PROMPT_FEATURE in pairs:
        protocol.check_prompt_lengths(pairs[PROMPT_FEATURE], pairs["inputs"],
                                      "DPO prompt_lengths")
    preference = np.asarray(pairs["preference"], np.float64)
    bad = ~((preference >= 0) & (preference <= 1))
    if np.any(bad):
        raise ValueError(f"DPO preferences must be probabilities in [0, 1]; pair "
                         f"{int(np.argmax(bad))} has {preference[np.argmax(bad)]}.")
    for name in ("chosen", "rejected"):
        # A response of the EOS alone is a response (the model may say nothing);
        # a row that starts with padding (a banned id) holds none at all.
        empty = np.isin(np.asarray(pairs[name])[:, 0], model.banned_ids)
        if np.any(empty):
            raise ValueError(f"DPO pair {int(np.argmax(empty))} has an empty {name} "
                             "response; drop it before training.")
    same = np.all(np.asarray(pairs["chosen"]) == np.asarray(pairs["rejected"]), axis=1)
    if np.any(same):
        raise ValueError(f"DPO pair {int(np.argmax(same))} has identical chosen and rejected "
                         f"responses ({int(same.sum())} such pairs); drop them before training.")


def reference_logps(model: models.Model, params_ref: Params, pairs: Mapping[str, np.ndarray],
                    *, average: bool, batch_size: int = 64) -> dict[str, np.ndarray]:
    """The reference's chosen / rejected log-probs of every pair, computed once."""
    fn = jax.jit(lambda p, b: pair_logps(model, p, b, average=average))
    chosen, rejected = [], []
    for batch, mask in batching.eval_batches(
            {k: pairs[k] for k in ("inputs", "chosen", "rejected", PROMPT_FEATURE)
             if k in pairs}, batch_size):
        c, r = fn(params_ref, batch)
        chosen.append(np.asarray(c)[mask])
        rejected.append(np.asarray(r)[mask])
    return {"ref_chosen_logps": np.concatenate(chosen),
            "ref_rejected_logps": np.concatenate(rejected)}


def preference_accuracy(model: models.Model, params: Params, params_ref: Params,
                        pairs: Mapping[str, np.ndarray], *, beta: float,
                        loss_type: str = "sigmoid", batch_size: int = 64) -> float:
    """How often the implicit reward beta * log(pi / pi_ref) ranks the preferred
    response first (pairs weighted by their preference: a soft label of 0.7
    counts 0.7 right and 0.3 wrong)."""
    arrays = dict(pairs, **reference_logps(model, params_ref, pairs,
                                           average=loss_type == "ipo", batch_size=batch_size))
    fn = jax.jit(lambda p, b: pair_logps(model, p, b, average=loss_type == "ipo"))
    right = total = 0.0
    for batch, mask in batching.eval_batches(arrays, batch_size):
        chosen, rejected = fn(params, batch)
        margin = ((np.asarray(chosen) - batch["ref_chosen_logps"])
                  - (np.asarray(rejected) - batch["ref_rejected_logps"]))[mask]
        p = batch["preference"][mask]
        right += float(np.sum(np.where(margin > 0, p, 1.0 - p)))
        total += float(len(p))
    return right / total


@gin.configurable(denylist=["model_dir", "model", "params_ref", "pairs", "eval_pairs"])
def train_dpo(model_dir: str, *, model: models.Model, params_ref: Params,
              pairs: Mapping[str, np.ndarray], beta: float,
              eval_pairs: Mapping[str, np.ndarray] | None = None, loss_type: str = "sigmoid",
              batch_size: int = 16, num_steps: int = 100, optimizer=None, seed: int = 0,
              checkpoint_every: int = 50, reference_per_step: bool = False,
              update_scale: float = 1.0, mesh_shape: Sequence[int] | None = None) -> Params:
    """DPO from `params_ref` (also the initial policy) at strength `beta`.

    Args:
      pairs: the training pairs (`PAIR_FEATURES`, e.g. from
        `preference_pairs.build` or `preference_pairs.read`).
      eval_pairs: held-out pairs; their implicit-reward accuracy is written to
        the metrics as `eval/rewards/accuracies`.
      reference_per_step: recompute the reference log-probs in every step
        instead of once per dataset (the same numbers, more compute; for data
        too large to hold them).
      update_scale: multiplies the optimizer's updates (its learning rate);
        `aligners.dpo_aligner` scales it as 1 / beta.
      mesh_shape: (data, model), as SFT and RL.

    Returns:
      the policy params. Resume, metrics and checkpoints come from
      `trainer.train_loop` (exact resume).
    """
    check_settings(beta, loss_type)
    check_pairs(pairs, model)
    model.check_params(params_ref, "The reference parameter set")
    partitioner = partitioning.partitioner_for(mesh_shape, model.param_axes)
    if partitioner is not None:
        partitioner.check_batch_size(batch_size)
    average = loss_type == "ipo"
    arrays = {name: np.asarray(pairs[name]) for name in (*PAIR_FEATURES, PROMPT_FEATURE)
              if name in pairs}
    arrays["preference"] = arrays["preference"].astype(np.float32)
    if reference_per_step:
        def batch_loss(params, batch, rng):
            del rng
            ref_chosen, ref_rejected = pair_logps(model, params_ref, batch, average=average)
            batch = dict(batch, ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected)
            return loss_fn(model, params, batch, beta=beta, loss_type=loss_type)
    else:
        arrays.update(reference_logps(model, params_ref, arrays, average=average))

        def batch_loss(params, batch, rng):
            del rng
            return loss_fn(model, params, batch, beta=beta, loss_type=loss_type)

    if not (np.isfinite(update_scale) and update_scale > 0):
        raise ValueError(f"update_scale must be a finite number > 0, got {update_scale!r}.")
    optimizer = optimizer if optimizer is not None else trainer.make_optimizer(name="adamw")
    if update_scale != 1.0:
        optimizer = optax.chain(optimizer, optax.scale(update_scale))
    state = trainer.TrainState.create(jax.tree_util.tree_map(jnp.copy, params_ref), optimizer,
                                      seed)
    eval_fn = None
    if eval_pairs is not None:
        def eval_fn(params):
            return {"rewards/accuracies": preference_accuracy(
                model, params, params_ref, eval_pairs, beta=beta, loss_type=loss_type)}
    state = trainer.train_loop(
        state, trainer.make_train_step(batch_loss, optimizer, partitioner),
        lambda start: batching.train_batches(arrays, batch_size, seed, start),
        num_steps=num_steps, model_dir=model_dir, checkpoint_every=checkpoint_every,
        eval_fn=eval_fn, description=f"dpo beta={beta:g}", partitioner=partitioner)
    return state.params
