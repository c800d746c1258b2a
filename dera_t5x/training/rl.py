"""KL-regularized RL of a policy (any model of the protocol) against a frozen reference.

Maximizes E[r(x, y)] - beta * KL(pi || pi_ref) with a policy gradient and a
learned value baseline, one RL step being:

1. rollout: sample `num_samples` responses per input from the policy with
   `decoding.sample` (through `models.predict`), temperature 1 by default;
2. scoring: teacher-forced per-token log-probs of the responses under the
   policy and the reference, per-token rewards `-beta * kl_t` plus the task
   reward (on the last token, or credited token by token for rewards that
   are sums over tokens such as the length reward; see `rewards.Reward`), value
   estimates, and GAE advantages (gamma 1, `gae_lambda` 1.0 by default, which
   makes the advantage the return-to-go minus the value), optionally
   normalized over the batch's response tokens (`normalize_advantages`);
3. update: REINFORCE with the value baseline (default) or PPO with clipping
   (`ppo_epochs` updates on the same batch), plus the value regression.

The value function is a linear head (`scalar_head`) on the policy's final
hidden states, read through `stop_gradient`: the value loss trains only the
head, the policy loss only the policy, and each has its own learning rate.
Params are `{'policy': the model's params, 'value_head': a scalar head}`.

The KL per token uses `log_ratio = log pi(y_t) - log pi_ref(y_t)` on samples
from pi: k1 = log_ratio (default, unbiased), k3 = exp(-log_ratio) - 1 +
log_ratio (non-negative, lower variance). The sequence KL is their sum.
"full" uses the exact KL of the two next-token distributions at each sampled
prefix instead (a sum over the vocabulary): in the per-token rewards, where
its mean given the prefix equals k1's, and, differentiated directly, as a
loss term (`kl_loss`), the part of the KL's gradient that a score-function
estimate carries only through noisy samples. Together they are the exact
gradient of E[r] - beta * KL; the direct term pulls every visited
next-token distribution back towards the reference, where k1 lets the
probabilities of tokens the reward does not care about drift and spend KL
(measured on the length reward: 2-3x the KL a length shift needs).

Normalization acts on the advantages, after the KL penalty entered the
per-token rewards and GAE summed them: (A - mean) / std over the batch's
response tokens. Subtracting a constant from every token's advantage is a
constant baseline (no bias: each token's score function has mean 0 given
its prefix) and dividing by a positive scalar rescales the step, so the
optimum stays where it was. Shifting the per-token rewards instead would
not be harmless: with per-token credit (the length reward) a shift of c per
token adds -c * length to the return, a length penalty that moves the
optimum.

Each step logs `objective`, the batch mean of r(x, y) - beta * KL (the
quantity RL maximizes), and `train_rl` logs its mean, sd and count over the
last `trainer.LOG_EVERY` steps (`objective_mean`, ...; a log line every that
many steps), whose plateau is the convergence check
(`dera_t5x.seeds.objective_plateau`). The optimum
at a small beta lies far from the reference and takes longer to reach:
`train_rl(num_steps_reference_beta=...)` scales the number of steps with
1 / beta below that beta, up to `max_num_steps`. At a large beta it lies
close, and Adam's steps of about one learning rate in every coordinate,
signal or noise, spend KL on drift that costs beta per nat:
`train_rl(learning_rate_reference_beta=...)` scales the policy's learning
rate by that beta / beta above it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from absl import logging
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

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


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RLConfig:
    """What the RL objective and its estimator are.

    Attributes:
      beta: KL strength (> 0).
      kl_estimator: "k1", "k3" or "full" (see the module docstring).
      policy_loss: "reinforce" (value baseline) or "ppo" (clipped ratio).
      gae_lambda: GAE lambda in [0, 1]; gamma is 1.
      ppo_epochs: updates per rollout batch with "ppo".
      ppo_clip: ratio clip epsilon with "ppo".
      num_samples: responses sampled per input.
      max_decode_len: rollout length limit.
      temperature, top_k, top_p: rollout sampling (the KL-regularized optimum
        assumes plain sampling: temperature 1, no filtering).
      normalize_advantages: whiten the advantages over the response tokens
        of each rollout batch (see the module docstring; off by default).
      chunk_size: rollout early exit (`decoding.sample`): decode in chunks of
        this many steps and stop once every response has ended; the samples
        are the same as without it. None decodes all max_decode_len steps.
      response_bucket: score and update the responses cut to the batch's
        longest, rounded up to a multiple of this many tokens (`trim`; one
        compile of the stages per width). The positions cut are padding: the
        result is the same up to float rounding. None keeps max_decode_len.
      encode_prompts_once: read each prompt once for its num_samples
        responses (the models' `repeats`: T5 encodes it once in the rollout,
        the scoring and the update; the rollout batch keeps one row per
        prompt). The same step up to float rounding, with the encoder's work
        divided by num_samples.
    """

    beta: float = 0.05
    kl_estimator: str = "k1"
    policy_loss: str = "reinforce"
    gae_lambda: float = 1.0
    ppo_epochs: int = 4
    ppo_clip: float = 0.2
    num_samples: int = 1
    max_decode_len: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    normalize_advantages: bool = False
    chunk_size: int | None = None
    response_bucket: int | None = None
    encode_prompts_once: bool = False

    def __post_init__(self):
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta)
                and self.beta > 0):
            raise ValueError(f"RLConfig.beta must be a finite number > 0, got {self.beta!r}; "
                             "beta = 0 is unregularized RL, which DeRa cannot rescale.")
        if self.kl_estimator not in ("k1", "k3", "full"):
            raise ValueError(f"RLConfig.kl_estimator must be 'k1', 'k3' or 'full', got "
                             f"{self.kl_estimator!r}.")
        if self.policy_loss not in ("reinforce", "ppo"):
            raise ValueError(f"RLConfig.policy_loss must be 'reinforce' or 'ppo', got "
                             f"{self.policy_loss!r}.")
        if not 0.0 <= self.gae_lambda <= 1.0:
            raise ValueError(f"RLConfig.gae_lambda must be in [0, 1], got {self.gae_lambda}.")
        for name in ("ppo_epochs", "num_samples", "max_decode_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"RLConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if not isinstance(self.encode_prompts_once, bool):
            raise ValueError(f"RLConfig.encode_prompts_once must be True or False, got "
                             f"{self.encode_prompts_once!r}.")
        for name, unset in (("chunk_size", "no early exit"),
                            ("response_bucket", "no trimming")):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise ValueError(f"RLConfig.{name} must be an integer >= 1, or None "
                                 f"({unset}), got {value!r}.")

    @property
    def updates_per_rollout(self) -> int:
        return self.ppo_epochs if self.policy_loss == "ppo" else 1


def init_params(policy_params: Params, hidden_size: int) -> Params:
    """RL params: the policy (from the SFT model) and a zero value head."""
    return {"policy": policy_params, "value_head": scalar_head.init(hidden_size)}


def kl_per_token(log_probs: Array, ref_log_probs: Array, estimator: str) -> Array:
    """Per-token KL estimates [batch, len] from the log-probs of sampled tokens."""
    log_ratio = log_probs - ref_log_probs
    if estimator == "k1":
        return log_ratio
    return jnp.exp(-log_ratio) - 1.0 + log_ratio


def token_kl(log_softmax: Array, ref_log_softmax: Array) -> Array:
    """KL(pi(.|prefix) || pi_ref(.|prefix)) per position: [batch, len, vocab] -> [batch, len]."""
    return jnp.sum(jnp.exp(log_softmax) * (log_softmax - ref_log_softmax), axis=-1)


def kl_loss(log_softmax: Array, ref_log_softmax: Array, mask: Array, kl_coef: Array) -> Array:
    """kl_coef * the summed `token_kl` of the response positions, averaged over
    sequences (the "full" estimator's direct term; the prefixes are held fixed).

    Args:
      log_softmax: [batch, len, vocab] under the params being differentiated;
        ref_log_softmax: the reference's; mask: [batch, len].
      kl_coef: beta times the scale applied to the advantages, so that both
        parts of the gradient keep their ratio under normalization.
    """
    return kl_coef * jnp.sum(token_kl(log_softmax, ref_log_softmax) * mask) / mask.shape[0]


def token_rewards(task_rewards: Array, kl: Array, mask: Array, beta: float) -> Array:
    """The task's per-token rewards minus beta * kl_t on every response token.

    Args:
      task_rewards, kl, mask: [batch, len] (mask 1 on response tokens);
        see `rewards.Reward.token_rewards`.
    """
    return (task_rewards - beta * kl) * mask


def gae(rewards: Array, values: Array, mask: Array, gae_lambda: float
        ) -> tuple[Array, Array]:
    """Generalized advantage estimates with gamma = 1.

    Args:
      rewards, values, mask: [batch, len]; the value after the last token is 0.
    Returns:
      (advantages, returns), each [batch, len], 0 off the mask.
    """
    values = values * mask
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas = (rewards + next_values - values) * mask

    def backward(carry, delta_and_mask):
        delta, m = delta_and_mask
        advantage = (delta + gae_lambda * carry) * m
        return advantage, advantage

    _, advantages = jax.lax.scan(backward, jnp.zeros_like(rewards[:, 0]),
                                 (deltas.T, mask.T), reverse=True)
    advantages = advantages.T
    return advantages, (advantages + values) * mask


def _masked_mean_and_scale(advantages: Array, mask: Array, eps: float = 1e-6
                           ) -> tuple[Array, Array]:
    """(mean, 1 / std) of the masked entries of [batch, len]."""
    count = jnp.maximum(jnp.sum(mask), 1.0)
    mean = jnp.sum(advantages * mask) / count
    var = jnp.sum(jnp.square(advantages - mean) * mask) / count
    return mean, jax.lax.rsqrt(var + eps)


def normalize(advantages: Array, mask: Array) -> Array:
    """(A - mean) / std over the masked tokens of the batch; [batch, len], 0 off the mask."""
    mean, scale = _masked_mean_and_scale(advantages, mask)
    return (advantages - mean) * scale * mask


def advantages_and_returns(config: RLConfig, task_rewards: Array, kl: Array, values: Array,
                           mask: Array, beta: float | Array | None = None
                           ) -> tuple[Array, Array, Array]:
    """GAE on the KL-penalized per-token rewards, then (if configured) normalized.

    Args:
      task_rewards, kl, values, mask: [batch, len].
      beta: the KL strength (default config.beta; a traced scalar in `score`).
    Returns:
      (advantages, returns, scale): [batch, len], [batch, len] and the factor
      the advantages were multiplied by (1 without normalization); the
      returns (the value targets) are never normalized.
    """
    beta = config.beta if beta is None else beta
    advantages, returns = gae(token_rewards(task_rewards, kl, mask, beta), values, mask,
                              config.gae_lambda)
    if not config.normalize_advantages:
        return advantages, returns, jnp.ones((), jnp.float32)
    mean, scale = _masked_mean_and_scale(advantages, mask)
    return (advantages - mean) * scale * mask, returns, scale


def next_token_log_softmax(model: models.Model, params: Params, prompts: Array,
                           responses: Array, prompt_lengths: Array | None = None
                           ) -> tuple[Array, Array]:
    """(hidden states [batch, len, emb], log-probs [batch, len, vocab]) of the
    positions that predict each response token, banned ids excluded.

    Prompts [batch / k, in_len] (with `prompt_lengths` [batch / k] for a
    decoder-only model) serve k consecutive responses each
    (`protocol.rows_per_input`; k = 1 when they are repeated already)."""
    hidden, logits = model.response_states(params, prompts, responses,
                                           prompt_lengths=prompt_lengths,
                                           repeats=protocol.rows_per_input(prompts, responses))
    hidden, logits = hidden[:, :-1], logits[:, :-1]  # the states that predict a response token
    return hidden, jax.nn.log_softmax(protocol.ban_tokens(logits, model.banned_ids), axis=-1)


def policy_outputs(model: models.Model, params: Params, prompts: Array, responses: Array,
                   prompt_lengths: Array | None = None) -> tuple[Array, Array, Array, Array]:
    """Teacher-forced log-probs of the responses, values and entropies, [batch, len]
    each, and the next-token log-probs [batch, len, vocab].

    Values are V(x, y_<t), predicted before token t is chosen. Log-probs and
    entropies are those of the sampling distribution (banned ids excluded).
    """
    hidden, log_softmax = next_token_log_softmax(model, params["policy"], prompts, responses,
                                                 prompt_lengths)
    mask = protocol.response_mask(responses, model.eos_ids)
    log_probs = jnp.take_along_axis(log_softmax, responses[..., None], -1)[..., 0] * mask
    entropy = -jnp.sum(jnp.exp(log_softmax) * log_softmax, axis=-1) * mask
    values = scalar_head.apply(params["value_head"], jax.lax.stop_gradient(hidden)) * mask
    return log_probs, values, entropy, log_softmax


def score_rollouts(model: models.Model, config: RLConfig, params: Params,
                   params_ref: Params, task_rewards: Array,
                   encoder_input_tokens: Array, responses: Array,
                   beta: float | Array | None = None,
                   prompt_lengths: Array | None = None) -> dict[str, Array]:
    """Everything the update needs, computed once per rollout batch.

    Args:
      task_rewards: [batch, len] per-token rewards summing to r(x, y).
      encoder_input_tokens: [batch / k, in_len], each row the prompt of k
        consecutive responses [batch, len] (`protocol.rows_per_input`).
      beta: the KL strength (default config.beta).
      prompt_lengths: [batch / k], a decoder-only model's (None for T5).
    Returns:
      a batch dict with the inputs (and `prompt_lengths` when given),
      `old_log_probs`, `advantages`, `returns`
      ([batch, len]) and per-sequence `reward`, `kl`, `objective`
      (reward - beta * kl), `length`, `entropy`; with the "full" estimator
      also `ref_log_softmax` [batch, len, vocab] and `kl_coef` (`kl_loss`).
    """
    log_probs, values, entropy, log_softmax = policy_outputs(model, params, encoder_input_tokens,
                                                             responses, prompt_lengths)
    mask = protocol.response_mask(responses, model.eos_ids)
    extra = {} if prompt_lengths is None else {"prompt_lengths": prompt_lengths}
    if config.kl_estimator == "full":
        _, extra["ref_log_softmax"] = next_token_log_softmax(model, params_ref,
                                                            encoder_input_tokens, responses,
                                                            prompt_lengths)
        kl = token_kl(log_softmax, extra["ref_log_softmax"]) * mask
    else:
        ref_log_probs = model.token_log_probs(
            params_ref, encoder_input_tokens, responses, exclude_banned=True,
            prompt_lengths=prompt_lengths,
            repeats=protocol.rows_per_input(encoder_input_tokens, responses))
        kl = kl_per_token(log_probs, ref_log_probs, config.kl_estimator) * mask
    beta = config.beta if beta is None else beta
    advantages, returns, scale = advantages_and_returns(config, task_rewards, kl, values, mask,
                                                        beta)
    if config.kl_estimator == "full":
        extra["kl_coef"] = beta * scale
    reward, sequence_kl = jnp.sum(task_rewards * mask, axis=1), jnp.sum(kl, axis=1)
    return {
        **extra,
        "encoder_input_tokens": encoder_input_tokens,
        "responses": responses,
        "old_log_probs": log_probs,
        "advantages": advantages,
        "returns": returns,
        "reward": reward,
        "kl": sequence_kl,
        "objective": reward - beta * sequence_kl,
        "length": jnp.sum(mask, axis=1),
        "entropy": jnp.sum(entropy, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0),
    }


def policy_loss(config: RLConfig, log_probs: Array, old_log_probs: Array,
                advantages: Array, mask: Array) -> tuple[Array, Array]:
    """The policy-gradient surrogate, summed over tokens and averaged over sequences.

    Args:
      log_probs: [batch, len] under the params being differentiated;
        old_log_probs, advantages, mask: [batch, len] from the rollout.
    Returns:
      (loss, clip_fraction); clip_fraction is 0 for "reinforce".
    """
    num_tokens = jnp.maximum(jnp.sum(mask), 1.0)
    if config.policy_loss == "reinforce":
        surrogate = log_probs * advantages
        clip_fraction = jnp.zeros(())
    else:
        ratio = jnp.exp(log_probs - old_log_probs)
        clipped = jnp.clip(ratio, 1.0 - config.ppo_clip, 1.0 + config.ppo_clip)
        surrogate = jnp.minimum(ratio * advantages, clipped * advantages)
        clip_fraction = jnp.sum((jnp.abs(ratio - 1.0) > config.ppo_clip) * mask) / num_tokens
    return -jnp.sum(surrogate * mask) / mask.shape[0], clip_fraction


def loss(model: models.Model, config: RLConfig, params: Params,
         batch: Mapping[str, Array]) -> tuple[Array, dict[str, Array]]:
    """Policy-gradient loss (per sequence) plus the value regression (per token).

    Returns (loss, metrics) with `policy_loss`, `value_loss`, `clip_fraction`
    and the rollout statistics `reward`, `kl`, `objective`, `length`, `entropy`
    (with the "full" estimator, `kl_loss` is part of `policy_loss`).
    """
    log_probs, values, _, log_softmax = policy_outputs(model, params,
                                                       batch["encoder_input_tokens"],
                                                       batch["responses"],
                                                       batch.get("prompt_lengths"))
    mask = protocol.response_mask(batch["responses"], model.eos_ids)
    num_tokens = jnp.maximum(jnp.sum(mask), 1.0)
    pg_loss, clip_fraction = policy_loss(config, log_probs, batch["old_log_probs"],
                                         batch["advantages"], mask)
    if config.kl_estimator == "full":
        pg_loss += kl_loss(log_softmax, batch["ref_log_softmax"], mask, batch["kl_coef"])
    value_loss = 0.5 * jnp.sum(jnp.square(values - batch["returns"]) * mask) / num_tokens
    total = pg_loss + value_loss
    metrics = {"loss": total, "policy_loss": pg_loss, "value_loss": value_loss,
               "clip_fraction": clip_fraction}
    for name in ("reward", "kl", "objective", "length", "entropy"):
        metrics[name] = jnp.mean(batch[name])
    return total, metrics


@gin.configurable
@functools.lru_cache(maxsize=None)
def make_optimizer(policy_learning_rate: float = 5e-6, value_learning_rate: float = 1e-5,
                   max_grad_norm: float | None = 1.0) -> optax.GradientTransformation:
    """Adam for the policy and for the value head, each with its own learning rate
    (the paper's 5e-6 and 1e-5 by default), after global-norm clipping.

    One object per setting (the transformation is pure), so that the RL runs
    of a pipeline share their compiled steps (`make_step_functions`)."""
    labels = {"policy": "policy", "value_head": "value_head"}
    optimizer = optax.multi_transform({"policy": optax.adam(policy_learning_rate),
                                       "value_head": optax.adam(value_learning_rate)},
                                      lambda params: {k: labels[k] for k in params})
    if max_grad_norm is None:
        return optimizer
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), optimizer)


class StepFunctions(NamedTuple):
    """The three jitted stages of an RL step (timed separately by bench/train.py)
    and the cut between the first two.

    rollout(params, prompts [batch, in_len], rng, prompt_lengths [batch] or
      None (T5)) -> (prompts [batch * n, in_len], each repeated num_samples =
      n times, or [batch, in_len] with `encode_prompts_once`; their
      prompt_lengths likewise, or None; responses [batch * n, len], n per
      prompt in a row).
    score(params, params_ref, reward_params, prompts, responses,
      prompt_lengths=None) -> batch dict.
    update(params, opt_state, batch) -> (params, opt_state, metrics).
    trim(responses) -> responses [batch * n, width <= len], on the host
      (`RLConfig.response_bucket`), between rollout and score.
    """

    rollout: Callable
    score: Callable
    update: Callable
    trim: Callable


def make_step_functions(model: models.Model, config: RLConfig,
                        optimizer: optax.GradientTransformation,
                        reward: rewards.Reward) -> StepFunctions:
    """The jitted rollout, scoring and update functions.

    beta enters the scoring as an argument, so the functions (and what XLA
    compiled for them) are shared in a process by every call with the same
    model, optimizer, reward functions and config up to beta: a pipeline's RL
    runs at different betas compile once.
    """
    key = (model, dataclasses.replace(config, beta=1.0), optimizer, reward.name, reward.apply,
           reward.per_token)
    if key not in _STEP_FUNCTIONS:
        _STEP_FUNCTIONS[key] = _jitted_steps(model, key[1], optimizer,
                                             dataclasses.replace(reward, params=None))
    steps = _STEP_FUNCTIONS[key]
    return steps._replace(score=functools.partial(steps.score,
                                                  beta=jnp.float32(config.beta)))


_STEP_FUNCTIONS: dict[tuple, StepFunctions] = {}


def _jitted_steps(model: models.Model, config: RLConfig,
                  optimizer: optax.GradientTransformation,
                  reward: rewards.Reward) -> StepFunctions:
    """`make_step_functions` with `score` taking beta (config.beta is not read)."""

    repeats = config.num_samples if config.encode_prompts_once else 1

    @jax.jit
    def rollout(params, prompts, rng, prompt_lengths=None):
        prompts, prompt_lengths = (protocol.repeat_rows(x, config.num_samples // repeats)
                                   for x in (prompts, prompt_lengths))
        out = model.predict(params["policy"], prompts, rng, prompt_lengths=prompt_lengths,
                            max_decode_len=config.max_decode_len,
                            temperature=config.temperature, top_k=config.top_k,
                            top_p=config.top_p, chunk_size=config.chunk_size,
                            repeats=repeats)
        return prompts, prompt_lengths, out.tokens

    @jax.jit
    def score(params, params_ref, reward_params, prompts, responses, beta,
              prompt_lengths=None):
        task_rewards = reward.token_rewards(reward_params, prompts, responses, model.eos_ids)
        return score_rollouts(model, config, params, params_ref, task_rewards, prompts,
                              responses, beta, prompt_lengths)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def update(params, opt_state, batch):
        grads, metrics = jax.grad(lambda p: loss(model, config, p, batch), has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        metrics["grad_norm"] = optax.global_norm(grads)
        return optax.apply_updates(params, updates), opt_state, metrics

    def trim(responses):
        if config.response_bucket is None:
            return responses
        longest = int(jnp.max(protocol.response_lengths(responses, model.eos_ids)))
        width = -(-longest // config.response_bucket) * config.response_bucket
        return responses[:, :min(width, responses.shape[1])]

    return StepFunctions(rollout, score, update, trim)


def rl_step(steps: StepFunctions, config: RLConfig, params: Params, opt_state: Any,
            params_ref: Params, reward_params: Any, prompts: Array, rng: Array,
            prompt_lengths: Array | None = None
            ) -> tuple[Params, Any, dict[str, float] | None]:
    """One rollout, its cut (`trim`), scoring and `updates_per_rollout` updates
    (prompts [batch, in_len]; a decoder-only model's `prompt_lengths` [batch]).

    Returns (params, opt_state, metrics), with metrics None and nothing applied
    when the reward was not finite for some response (the caller counts the skip).
    """
    prompts, prompt_lengths, responses = steps.rollout(params, prompts, rng, prompt_lengths)
    batch = steps.score(params, params_ref, reward_params, prompts, steps.trim(responses),
                        prompt_lengths=prompt_lengths)
    if not bool(jnp.all(jnp.isfinite(batch["reward"]))):  # a replicated scalar on a mesh
        return params, opt_state, None
    for _ in range(config.updates_per_rollout):
        params, opt_state, metrics = steps.update(params, opt_state, batch)
    return params, opt_state, {k: float(v) for k, v in metrics.items()}


def _prompt_arrays(task_name: str | None, feature_lengths: dict[str, int] | None,
                   prompts: Mapping[str, np.ndarray] | None, vocab_size: int
                   ) -> dict[str, np.ndarray]:
    """RL's prompts as batchable arrays ('encoder_input_tokens' and, when
    given, 'prompt_lengths'), from the task or from `prompts`.

    Raises:
      ValueError: both or neither source, or prompts that are not a 2-D array
        of ids in [0, vocab_size) with valid `prompt_lengths`.
    """
    sources = ("rl.train_rl reads prompts from one source: task_name and feature_lengths (a "
               "T5 task) or prompts={'inputs': ..., 'prompt_lengths': ...} (arrays)")
    if prompts is not None and (task_name is not None or feature_lengths is not None):
        raise ValueError(f"{sources}; got both. Fix: unset task_name and feature_lengths.")
    if prompts is None and (task_name is None or feature_lengths is None):
        raise ValueError(f"{sources}; got task_name={task_name!r}, "
                         f"feature_lengths={feature_lengths!r} and no prompts.")
    if prompts is None:
        from dera_t5x.data import pipeline  # noqa: PLC0415  (TensorFlow: the driver only)
        return {"encoder_input_tokens": pipeline.load_split(
            task_name, "train", feature_lengths).features["encoder_input_tokens"]}
    if sorted(set(prompts) - {"prompt_lengths"}) != ["inputs"] or not len(prompts["inputs"]):
        raise ValueError("RL prompts must be {'inputs': [n, in_len] token ids, n >= 1, "
                         f"optional 'prompt_lengths': [n]}}; got keys {sorted(prompts)}.")
    inputs = protocol.check_token_ids(prompts["inputs"], vocab_size, "RL prompts['inputs']")
    arrays = {"encoder_input_tokens": inputs.astype(np.int32)}
    if prompts.get("prompt_lengths") is not None:
        protocol.check_prompt_lengths(prompts["prompt_lengths"], inputs, "RL prompt_lengths")
        arrays["prompt_lengths"] = np.asarray(prompts["prompt_lengths"], np.int32)
    return arrays


def steps_for_beta(num_steps: int, beta: float, reference_beta: float | None,
                   max_num_steps: int | None) -> int:
    """`num_steps`, scaled by reference_beta / beta when beta is below reference_beta
    (rounded up), at most `max_num_steps`; `num_steps` itself when reference_beta is None."""
    if reference_beta is None or beta >= reference_beta:
        return num_steps
    steps = math.ceil(num_steps * reference_beta / beta)
    return steps if max_num_steps is None else min(steps, max_num_steps)


def policy_learning_rate_scale(beta: float, reference_beta: float | None) -> float:
    """reference_beta / beta above reference_beta, else 1 (also when it is None)."""
    return 1.0 if reference_beta is None or beta <= reference_beta else reference_beta / beta


def scale_policy_updates(optimizer: optax.GradientTransformation, scale: float
                         ) -> optax.GradientTransformation:
    """`optimizer` with the policy's updates (not the value head's) times `scale`
    (for Adam: its learning rate times scale)."""
    if scale == 1.0:
        return optimizer
    return optax.chain(optimizer, optax.masked(optax.scale(scale),
                                               lambda params: {k: k == "policy" for k in params}))


@gin.configurable(denylist=["model_dir", "model", "params_ref", "reward", "prompts"])
def train_rl(model_dir: str, *, model: models.Model, params_ref: Params,
             reward: rewards.Reward, task_name: str | None = None,
             feature_lengths: dict[str, int] | None = None,
             prompts: Mapping[str, np.ndarray] | None = None, max_decode_len: int | None = None,
             batch_size: int = 16, num_steps: int = 100, config: RLConfig | None = None,
             optimizer: optax.GradientTransformation | None = None, seed: int = 0,
             checkpoint_every: int = 50, mesh_shape: Sequence[int] | None = None,
             num_steps_reference_beta: float | None = None,
             max_num_steps: int | None = None,
             learning_rate_reference_beta: float | None = None) -> Params:
    """RL from `params_ref` (the frozen SFT model) at KL strength `config.beta`.

    Runs `num_steps` steps, or with `num_steps_reference_beta` set and
    config.beta below it, num_steps * num_steps_reference_beta / config.beta
    steps, at most `max_num_steps` (`steps_for_beta`): the optimum at a small
    beta lies farther from the reference and takes longer to reach. With
    `learning_rate_reference_beta` set and config.beta above it, the policy's
    learning rate is scaled by learning_rate_reference_beta / config.beta
    (`policy_learning_rate_scale`): the optimum is closer and the drift of
    a full-size step costs more.

    Prompts are the train-split inputs of `task_name` (at `feature_lengths`)
    or, instead, `prompts`: arrays a caller builds, `inputs` [n, in_len] and,
    for a decoder-only model, right-padded with `prompt_lengths` [n]
    (`protocol`); rewards read the padded prompts and the responses, and
    per-token rewards end each response at the policy's EOS ids
    (`rewards.Reward.token_rewards`). Each RL step is `rl_step`. A
    model_dir holding the final step returns its policy at once (resume and
    caching come from `trainer.train_loop`). Batches whose reward is not
    finite are skipped, logged and counted (`skipped_batches` in the metrics).

    With more than one device (or a `mesh_shape` (data, model)), the policy,
    value head, optimizer state, reference and reward params are placed by
    `partitioning.Partitioner`'s rules and each prompt batch is split over
    'data'; the jitted stages follow those shardings (XLA inserts the
    collectives), as SFT does.

    Returns:
      the policy params (same tree as `params_ref`).
    """
    trainer.check_run_arguments("rl.train_rl", batch_size=batch_size, num_steps=num_steps,
                                checkpoint_every=checkpoint_every)
    if max_num_steps is not None and (not isinstance(max_num_steps, int)
                                      or max_num_steps < num_steps):
        raise ValueError(f"rl.train_rl.max_num_steps must be an integer >= num_steps "
                         f"({num_steps}) or None (no cap), got {max_num_steps!r}.")
    for name, value in (("num_steps_reference_beta", num_steps_reference_beta),
                        ("learning_rate_reference_beta", learning_rate_reference_beta)):
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)
                                      and value > 0):
            raise ValueError(f"rl.train_rl.{name} must be a finite number > 0 or None (no "
                             f"scaling), got {value!r}.")
    if max_decode_len is not None and (not isinstance(max_decode_len, int)
                                       or max_decode_len < 1):
        raise ValueError(f"rl.train_rl.max_decode_len must be an integer >= 1 or None (then "
                         f"RLConfig.max_decode_len), got {max_decode_len!r}.")
    config = config or RLConfig()
    config = dataclasses.replace(config, max_decode_len=max_decode_len or config.max_decode_len)
    num_steps = steps_for_beta(num_steps, config.beta, num_steps_reference_beta, max_num_steps)
    model.check_params(params_ref, "The reference parameter set")
    arrays = _prompt_arrays(task_name, feature_lengths, prompts, model.config.vocab_size)
    # Traced, not compiled: a missing or unexpected prompt_lengths, or prompts
    # too long for the model's positions, fail here with the model's message.
    lengths = arrays.get("prompt_lengths")
    jax.eval_shape(lambda p, x, n: model.prefill(p, x, config.max_decode_len, prompt_lengths=n),
                   params_ref, arrays["encoder_input_tokens"][:1],
                   None if lengths is None else lengths[:1])
    source = ({"task_name": task_name, "feature_lengths": feature_lengths} if prompts is None
              else {"prompts": integrity.fingerprint(integrity.tree_checksums(arrays))})
    settings = {"model_config": model.config, **source, "batch_size": batch_size, "seed": seed,
                "config": config, "reward": reward.name,
                "reward_params": integrity.params_fingerprint(reward.params),
                "reference": integrity.params_fingerprint(params_ref)}
    partitioner = partitioning.partitioner_for(mesh_shape, model.param_axes)
    reward_params = reward.params
    if partitioner is not None:
        partitioner.check_batch_size(batch_size)
        params_ref = partitioner.shard_params(params_ref)
        reward_params = partitioner.shard_params(reward_params)
    optimizer = scale_policy_updates(
        optimizer if optimizer is not None else make_optimizer(),
        policy_learning_rate_scale(config.beta, learning_rate_reference_beta))
    steps = make_step_functions(model, config, optimizer, reward)
    params = init_params(jax.tree_util.tree_map(jnp.copy, params_ref), model.hidden_size)
    # The objective of the last LOG_EVERY steps (fewer after a start): each
    # logged line holds their mean and sd, the convergence check's data.
    recent = collections.deque(maxlen=trainer.LOG_EVERY)

    def step(state: trainer.TrainState, batch) -> tuple[trainer.TrainState, dict]:
        rng, rollout_rng = jax.random.split(state.rng)
        params, opt_state, metrics = rl_step(steps, config, state.params, state.opt_state,
                                             params_ref, reward_params,
                                             batch["encoder_input_tokens"], rollout_rng,
                                             batch.get("prompt_lengths"))
        skipped = state.skipped_batches + (metrics is None)
        if metrics is None:
            logging.warning("RL step %d: non-finite reward, batch skipped (%d so far).",
                            int(state.step) + 1, int(skipped))
            metrics = {"loss": 0.0}
        else:
            recent.append(metrics["objective"])
            metrics["objective_mean"] = float(np.mean(recent))
            metrics["objective_sd"] = float(np.std(recent, ddof=1)) if len(recent) > 1 else 0.0
            metrics["objective_steps"] = float(len(recent))
        metrics["skipped_batches"] = float(skipped)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng,
                             skipped_batches=skipped), metrics

    state = trainer.train_loop(
        trainer.TrainState.create(params, optimizer, seed), step,
        lambda start: batching.train_batches(arrays, batch_size, seed, start),
        num_steps=num_steps, model_dir=model_dir, checkpoint_every=checkpoint_every,
        description=f"rl beta={config.beta:g}", partitioner=partitioner, settings=settings)
    return state.params["policy"]
