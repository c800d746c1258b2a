"""The "align at beta" steps the reproduction pipelines choose by gin
(`reproduce.run.aligner`): KL-regularized RL, or DPO on preference pairs.

An aligner is called as aligner(model_dir, model=, params_ref=, reward=,
beta=, task_name=, feature_lengths=, max_decode_len=, seed=) and returns the
aligned params; the pipeline calls it for the base beta and for every
beta / lambda it retrains at, so whatever the aligner caches (the DPO pairs)
is shared by all of them.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import gin

from dera_t5x import models
from dera_t5x.data import pipeline
from dera_t5x.data import tasks
from dera_t5x.data import vocabularies
from dera_t5x.training import dpo
from dera_t5x.training import preference_pairs
from dera_t5x.training import rewards
from dera_t5x.training import rl

Params = Any
PAIRS_FILE = "preference_pairs.jsonl"


@gin.configurable
def rl_aligner(model_dir: str, *, model: models.Model, params_ref: Params,
               reward: rewards.Reward, beta: float, task_name: str,
               feature_lengths: dict[str, int], max_decode_len: int, seed: int) -> Params:
    """Aligns at `beta` with KL-regularized RL (`rl.train_rl`, gin-configured)."""
    return rl.train_rl(model_dir, model=model, params_ref=params_ref, reward=reward,
                       config=dataclasses.replace(rl.RLConfig(), beta=beta),
                       task_name=task_name, feature_lengths=feature_lengths,
                       max_decode_len=max_decode_len, seed=seed)


@gin.configurable(denylist=["model_dir", "model", "params_ref", "reward", "beta"])
def dpo_aligner(model_dir: str, *, model: models.Model, params_ref: Params,
                reward: rewards.Reward, beta: float, task_name: str,
                feature_lengths: dict[str, int], max_decode_len: int, seed: int,
                tau: float = gin.REQUIRED, labels: str = "sampled", flip_rate: float = 0.0,
                held_out_fraction: float = 0.1, max_prompts: int | None = None,
                pairs_per_prompt: int = 1, step_size_beta: float | None = None) -> Params:
    """Aligns at `beta` with DPO on pairs of the reference model's samples
    labelled by `reward` through Bradley-Terry at `tau` (`preference_pairs`).

    The pairs are built once, from the train split's prompts, into
    `<model_dir>/../preference_pairs.jsonl` (rebuilt only if their settings
    change); a `held_out_fraction` of them measures the implicit reward's
    preference accuracy (`eval/rewards/accuracies` in the metrics). DPO at
    beta on them targets the RL optimum for the reward at tau * beta.

    `step_size_beta` scales the optimizer's updates by step_size_beta / beta.
    DPO's loss depends on beta * (log-ratio margin) and its optimum's margin is
    (reward difference) / (tau * beta): under Adam, whose steps do not shrink
    with the gradient, a run at beta / 4 must move the log-probs 4 times as far
    in the same number of steps. The scale makes every beta cover the same
    distance in implicit-reward units per step (unscaled at beta = step_size_beta).
    """
    path = pathlib.Path(model_dir).parent / PAIRS_FILE
    pairs = build_pairs(path, model=model, params_ref=params_ref, reward=reward,
                        task_name=task_name, feature_lengths=feature_lengths,
                        max_decode_len=max_decode_len, seed=seed, tau=tau, labels=labels,
                        flip_rate=flip_rate, max_prompts=max_prompts,
                        pairs_per_prompt=pairs_per_prompt)
    train, held_out = preference_pairs.split(pairs, held_out_fraction, seed)
    return dpo.train_dpo(model_dir, model=model, params_ref=params_ref, pairs=train,
                         eval_pairs=held_out, beta=beta, seed=seed,
                         update_scale=1.0 if step_size_beta is None else step_size_beta / beta)


def build_pairs(path: pathlib.Path, *, model: models.Model, params_ref: Params,
                reward: rewards.Reward, task_name: str, feature_lengths: dict[str, int],
                max_decode_len: int, seed: int, tau: float, labels: str, flip_rate: float,
                max_prompts: int | None, pairs_per_prompt: int = 1) -> dict:
    """The pipeline's cached pairs (see `dpo_aligner`)."""
    prompts = pipeline.load_split(task_name, "train", feature_lengths).features[
        "encoder_input_tokens"][:max_prompts]
    vocabulary = tasks.get_task(task_name).output_features["targets"].vocabulary
    settings = {"task": task_name, "feature_lengths": feature_lengths, "reward": reward.name,
                "tau": tau, "labels": labels, "flip_rate": flip_rate, "seed": seed,
                "max_decode_len": max_decode_len, "num_prompts": len(prompts),
                "pairs_per_prompt": pairs_per_prompt,
                "model_config": dataclasses.asdict(model.config)}
    return preference_pairs.cached(
        path, settings,
        lambda: preference_pairs.build(model, params_ref, prompts, reward, tau=tau,
                                       labels=labels, flip_rate=flip_rate,
                                       max_decode_len=max_decode_len,
                                       pairs_per_prompt=pairs_per_prompt, seed=seed),
        texts=lambda rows: vocabularies.detokenize(vocabulary, rows))
