"""The paper's pipelines end to end: SFT, RL, DeRa sweeps, retraining, report.

    python -m dera_t5x.reproduce --gin_file=gin/reproduce/length_reward_tiny.gin \\
        --output_dir=runs/length_reward_tiny

Stages, each cached in the output directory (a rerun skips finished stages;
training stages resume from their last checkpoint). Every stage is keyed by
the settings that produced it (`stage_settings`: a hash of its resolved
arguments, the gin settings of its trainer or aligner, and the keys of the
stages it reads; placement such as `mesh_shape` and checkpoint / eval
frequencies left out). A rerun with a changed setting recomputes exactly the
stages that depend on it: a stale JSON stage is rewritten, a stale training
folder is moved aside to `<name>.stale-<old key>` (never deleted) and trained
afresh; the log names the settings that changed. `timings.json` accumulates
the time spent in each stage over all runs of the folder (`timings_s` in the
report; `timings_this_run_s` is this run's).

1. SFT of the model on the task (`sft/`);
2. for the gold / proxy pipeline, a proxy Bradley-Terry reward model on
   gold-labelled pairs of SFT samples (`proxy_reward_model/`) and an oracle RL
   run on the gold reward itself (`oracle_rl_beta_<oracle_beta>/`, `oracle_<split>.json`);
3. alignment from the SFT model at the base beta with the gin-chosen aligner
   (RL or DPO: `rl_beta_<beta>/`, `dpo_beta_<beta>/`);
4. DeRa on the evaluation split for the whole lambda grid, one `dera_sweep`
   call per batch (`dera_<split>.json`);
5. the model retrained at beta / lambda for every lambda not in {0, 1}; lambda = 0
   is the SFT model and lambda = 1 the base model, so those rows are exact by
   construction (`retrained_<split>.json`);
6. the choice of lambda on the validation split (largest mean reward whose
   ROUGE-L stays within `rouge_margin` of the SFT model's) and its test-split
   result against the base model and SFT (`selection.json`);
7. `report.json`, `report.md` and plots (`dera_t5x.report`).

Every trained model (SFT, each aligned model, the oracle, the distilled
student) is also written to `<its folder>/params`, which the decode job,
chat and the trainers read as a checkpoint (`checkpoints.load_params`).

Every model is evaluated the same way: `num_eval_samples` samples per input
at temperature 1 from `realign.dera_sweep(sft, aligned, lambdas)` (a
retrained model is the aligned model at lambda = 1), so KL to SFT is always
the sum over tokens of log pi - log pi_sft of the sampled tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import time
from typing import Any, Callable, Sequence

from absl import flags
from absl import logging
import gin
import jax
from jax.experimental import multihost_utils
import numpy as np

from dera_t5x import aligners
from dera_t5x import checkpoints
from dera_t5x import evaluation
from dera_t5x import gin_utils
from dera_t5x import integrity
from dera_t5x import models
from dera_t5x import partitioning
from dera_t5x.models.t5 import network
from dera_t5x import realign
from dera_t5x import report
from dera_t5x.data import metrics
from dera_t5x.data import pipeline
from dera_t5x.data import tasks
from dera_t5x.data import vocabularies
from dera_t5x.training import distill
from dera_t5x.training import gold_reward
from dera_t5x.training import reward_model
from dera_t5x.training import rewards
from dera_t5x.training import rl
from dera_t5x.training import sft
from dera_t5x.training import trainer

Params = Any
# The pipelines' rewards: the length reward, or the gold faithfulness reward
# with a proxy reward model trained on gold-labelled pairs of SFT samples (RL
# aligns with the proxy; an oracle RL run aligns with gold itself).
REWARD_KINDS = ("length", "gold_proxy")


# Parameters of the trainers that do not change what a stage computes
# (placement, how often it saves or evaluates, RL's rollout early exit,
# response cut and prompts encoded once), and those the pipeline passes itself (so their gin bindings
# are overridden).
_NOT_STAGE_SETTINGS = frozenset({
    "mesh_shape", "checkpoint_every", "keep_checkpoints", "eval_every", "eval_batch_size",
    "rouge_batches", "eval_split", "chunk_size", "response_bucket", "encode_prompts_once",
    "model_config", "task_name", "feature_lengths", "seed",
    "max_decode_len", "beta", "config", "model", "model_params", "params_ref", "reward"})


def _gin_settings(*selectors: str) -> dict[str, Any]:
    """The gin bindings of `selectors` that shape a stage (references resolved)."""
    return {selector: {name: value for name, value in gin_utils.bindings_of(selector).items()
                       if name not in _NOT_STAGE_SETTINGS}
            for selector in selectors}


def _write_json(path: pathlib.Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2))
    tmp.replace(path)


def _cached_json(path: pathlib.Path, settings: dict[str, Any], compute: Callable[[], Any]
                 ) -> Any:
    """The value cached at `path` for these settings; computed and written
    (atomically, with its key and settings) when absent or stale."""
    key = integrity.fingerprint(settings)
    if path.exists():
        try:
            cached = json.loads(path.read_text())
        except ValueError:
            cached = None
        if isinstance(cached, dict) and cached.get("stage_key") == key:
            return cached["value"]
        logging.warning("%s is stale; recomputing. %s", path.name, _what_changed(cached, settings))
    value = compute()
    _write_json(path, {"stage_key": key, "settings": integrity.canonical(settings),
                       "value": value})
    return value


def _what_changed(cached: Any, settings: dict[str, Any]) -> str:
    if not isinstance(cached, dict) or "settings" not in cached:
        return "It holds no settings (written by an older dera-t5x, or damaged)."
    changed = integrity.differences(cached["settings"], settings)
    return "Changed: " + "; ".join(changed[:10]) + ("" if len(changed) <= 10 else "; ...")


def _stage_dir(path: pathlib.Path, settings: dict[str, Any]) -> str:
    """`path` for a training stage with these settings (its checkpoints resume).

    A folder trained under other settings (or with no record of them) is moved
    aside to `<name>.stale-<its key>` and the stage starts afresh.
    """
    key = integrity.fingerprint(settings)
    marker = path / "stage.json"
    if jax.process_index() == 0:
        if path.exists():
            try:
                recorded = json.loads(marker.read_text())
            except (OSError, ValueError):
                recorded = None
            if not (isinstance(recorded, dict) and recorded.get("stage_key") == key):
                old_key = recorded.get("stage_key", "unkeyed") if isinstance(
                    recorded, dict) else "unkeyed"
                stale = path.with_name(f"{path.name}.stale-{old_key[:8]}")
                number = 1
                while stale.exists():
                    number += 1
                    stale = path.with_name(f"{path.name}.stale-{old_key[:8]}-{number}")
                logging.warning("%s was trained under other settings; moved to %s and "
                                "trained again. %s", path, stale.name,
                                _what_changed(recorded, settings))
                path.rename(stale)
        if not path.exists():
            path.mkdir(parents=True)
            integrity.write_json_atomically(marker, {"stage_key": key,
                                                     "settings": integrity.canonical(settings)})
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"stage {path}")
    return str(path)


def _exported(model_dir: str, params: Params) -> Params:
    """params, also written to `<model_dir>/params` (once) for the decode job,
    chat and the trainers (`checkpoints.load_params`)."""
    path = pathlib.Path(model_dir) / "params"
    if not path.exists():
        checkpoints.save_params(path, params)
    return params


def _check_lambdas(lambdas: Sequence[float]) -> tuple[float, ...]:
    lambdas = tuple(float(lam) for lam in lambdas)
    if not lambdas or not all(np.isfinite(lambdas)) or min(lambdas) < 0:
        raise ValueError(f"lambdas must be a non-empty list of finite values >= 0, got {lambdas}.")
    if 1.0 not in lambdas:
        raise ValueError(f"lambdas must include 1 (the base aligned model), got {lambdas}.")
    return lambdas


def _fmt_beta(beta: float) -> str:
    return f"{beta:.6g}"


class Evaluator:
    """Samples DeRa / model outputs on a split and summarizes them per lambda.

    Every row carries each named reward of `rewards` (the first is the one
    the models were aligned with, reported as `mean_reward`).
    """

    def __init__(self, model: models.Model, task_name: str, feature_lengths: dict[str, int],
                 rewards_by_name: dict[str, rewards.Reward], batch_size: int, num_samples: int,
                 max_decode_len: int, seed: int, max_examples: int | None = None,
                 partitioner: partitioning.Partitioner | None = None):
        self.model = model
        self.partitioner = partitioner
        self.task_name = task_name
        self.feature_lengths = feature_lengths
        self.rewards = dict(rewards_by_name)
        self.batch_size = batch_size
        self.num_samples = num_samples
        self.max_decode_len = max_decode_len
        self.seed = seed
        self.max_examples = max_examples
        self._reward_fns = {name: jax.jit(jax.vmap(reward.apply, in_axes=(None, None, 0)))
                            for name, reward in self.rewards.items()}
        self.vocabulary = tasks.get_task(task_name).output_features["targets"].vocabulary

    def inputs(self, split: str) -> np.ndarray:
        """The evaluated inputs of a split, each repeated num_samples times: [n, in_len]."""
        data = pipeline.load_split(self.task_name, split, self.feature_lengths)
        return np.repeat(data.features["encoder_input_tokens"][:self.max_examples],
                         self.num_samples, axis=0)

    def _decode_split(self, split: str, params_ref: Params, params_aligned: Params,
                      lambdas: Sequence[float]) -> tuple[dict[str, np.ndarray], Any]:
        data = pipeline.load_split(self.task_name, split, self.feature_lengths)
        inputs = self.inputs(split)
        columns = {"tokens": [], "ref_log_probs": [], "mixed_log_probs": [],
                   **{name: [] for name in self.rewards}}
        for i, rows, out in realign.sweep_batches(
                self.model, params_ref, params_aligned, inputs, lambdas,
                batch_size=self.batch_size, seed=self.seed, partitioner=self.partitioner,
                max_decode_len=self.max_decode_len, temperature=1.0):
            batch = inputs[i * self.batch_size + rows]
            tokens = out.tokens[:, rows]
            for name in ("tokens", "ref_log_probs", "mixed_log_probs"):
                columns[name].append(getattr(out, name)[:, rows])
            for name, reward in self.rewards.items():
                columns[name].append(np.asarray(self._reward_fns[name](reward.params, batch,
                                                                       tokens)))
        return {k: np.concatenate(v, axis=1) for k, v in columns.items()}, data

    def evaluate(self, split: str, params_ref: Params, params_aligned: Params,
                 lambdas: Sequence[float]) -> list[evaluation.EvalRow]:
        """One row per lambda: length, rewards, KL to params_ref, ROUGE, examples."""
        decoded, data = self._decode_split(split, params_ref, params_aligned, lambdas)
        references = [t for t in data.texts["targets"][:self.max_examples]
                      for _ in range(self.num_samples)]
        aligned_with = next(iter(self.rewards))
        rows = []
        for k, lam in enumerate(lambdas):
            texts = vocabularies.detokenize(self.vocabulary, decoded["tokens"][k])
            stats = evaluation.summarize(decoded["tokens"][k], decoded[aligned_with][k],
                                         decoded["mixed_log_probs"][k],
                                         decoded["ref_log_probs"][k])
            named = {name: list(evaluation.mean_and_sem(decoded[name][k]))
                     for name in self.rewards}
            rows.append(evaluation.EvalRow(
                lam=float(lam), **stats, rewards=named,
                rouge=metrics.rouge(texts, references),
                samples=texts[:3 * self.num_samples:self.num_samples]))
        return rows


@gin.configurable
def run(output_dir: str, *, pipeline_name: str = gin.REQUIRED,
        model_config: network.T5Config = gin.REQUIRED, task_name: str = gin.REQUIRED,
        feature_lengths: dict[str, int] = gin.REQUIRED, reward_kind: str = "length",
        beta: float = gin.REQUIRED, lambdas: Sequence[float] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0),
        eval_split: str = "validation", test_split: str = "test", num_eval_samples: int = 2,
        eval_batch_size: int = 50, max_eval_examples: int | None = None,
        max_decode_len: int = 64, rouge_margin: float = 2.0,
        gap_tolerance: float = 0.15, seed: int = 0, sft_seed: int | None = None,
        sft_dir: str | None = None,
        aligner: Callable[..., Params] = aligners.rl_aligner,
        rl_beta_same_optimum: float | None = None,
        distill_lambda: float | str | None = "chosen",
        human_task: str | None = None, oracle_beta: float | None = None,
        mesh_shape: Sequence[int] | None = None) -> dict[str, Any]:
    """Runs (or resumes) a whole pipeline and writes its report; returns report.json.

    `aligner` is the "align at beta" step (gin: `reproduce.run.aligner`),
    called as aligner(model_dir, model=, params_ref=, reward=, beta=,
    task_name=, feature_lengths=, max_decode_len=, seed=) for the base model
    and for every model retrained at beta / lambda (`aligners.rl_aligner`,
    `aligners.dpo_aligner`); each aligned model's folder is
    `<aligner>_beta_<beta>` and the last `eval/*` metrics of its training (DPO:
    held-out preference accuracy) go to the report's `aligner_eval`.
    `rl_beta_same_optimum` also trains RL at that beta and reports it as
    `rl_same_optimum` (for DPO on labels drawn at tau: tau * beta, the RL model
    that aims at the same optimum as the base DPO model). `distill_lambda`
    ('chosen': the lambda chosen on validation; a number; None: no distillation)
    distils DeRa at that lambda into one model (`distill.train_distill`, its
    folder `distill_lambda_<lambda>`) and reports it as `distilled`, beside DeRa
    at that lambda (`_distilled`). `mesh_shape` places the
    evaluation decodes and the reward model on a (data, model) mesh (RL and
    SFT take theirs through gin: `rl.train_rl.mesh_shape`, ...).

    `seed` seeds every stage; `sft_seed` (default: `seed`) the SFT stage, which
    goes to `sft_dir` (default `<output_dir>/sft`), so runs over several seeds
    can share one SFT model (`dera_t5x.seeds`).

    `reward_kind` (`REWARD_KINDS`): 'gold_proxy' trains a proxy reward model on
    gold-labelled pairs of SFT samples (`reward_model.train_proxy`, folder
    `proxy_reward_model`), aligns with the proxy, evaluates every row with the
    proxy (`reward_model`), the gold reward (`gold`) and its support
    (`gold_support`), chooses lambda by the gold reward, and reports the
    agreements of both with `human_task`'s human labels
    (`_gold_proxy_results`). Its oracle RL run aligns with the gold reward
    itself at `oracle_beta` (default: `beta`; gold's scale is not the proxy's,
    so the same beta is not the same trade-off), under the gin scope 'oracle'
    (`oracle/rl.train_rl.max_num_steps = ...` binds its run alone).
    """
    lambdas = _check_lambdas(lambdas)
    if distill_lambda not in (None, "chosen"):
        distill.check_lambda(distill_lambda)
    if reward_kind not in REWARD_KINDS:
        raise ValueError(f"reward_kind must be one of {REWARD_KINDS}, got {reward_kind!r}.")
    rl.RLConfig(beta=beta)  # validates beta before any training
    oracle_beta = beta if oracle_beta is None else oracle_beta
    rl.RLConfig(beta=oracle_beta)
    for name, value, low in (("num_eval_samples", num_eval_samples, 1),
                             ("eval_batch_size", eval_batch_size, 1),
                             ("max_decode_len", max_decode_len, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"reproduce.run.{name} must be an integer >= {low}, got {value!r}.")
    tasks.get_task(task_name)
    # The trainers' counts, checked before the output folder is touched.
    for selector in ("sft.train_sft", "rl.train_rl", "reward_model.train_reward_model",
                     "dpo.train_dpo", "distill.train_distill"):
        counts = {name: value for name, value in gin_utils.bindings_of(selector).items()
                  if name in ("batch_size", "num_steps", "checkpoint_every", "eval_every",
                              "eval_batch_size")}
        trainer.check_run_arguments(selector, **counts)
    out = pathlib.Path(output_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    model = models.for_config(model_config)
    partitioner = partitioning.partitioner_for(mesh_shape, model.param_axes)
    if partitioner is not None:
        partitioner.check_batch_size(eval_batch_size)
    timings_path = out / "timings.json"
    try:  # Seconds spent per stage over every run of this folder.
        totals = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    except ValueError:
        logging.warning("%s is damaged; the accumulated timings restart from 0.", timings_path)
        totals = {}
    timings = {}

    def timed(name, fn):
        start = time.perf_counter()
        try:
            return fn()
        finally:
            spent = time.perf_counter() - start
            timings[name] = timings.get(name, 0.0) + spent
            totals[name] = totals.get(name, 0.0) + spent
            if jax.process_index() == 0:
                _write_json(timings_path, totals)

    # What every stage depends on.
    common = {"model_config": model_config, "task_name": task_name,
              "feature_lengths": feature_lengths, "seed": seed,
              "vocabulary": _gin_settings("vocabularies.t5_vocabulary_file",
                                          "vocabularies.bundled_vocabulary_file")}
    sft_seed = seed if sft_seed is None else sft_seed
    sft_settings = {"stage": "sft", **common, "seed": sft_seed,
                    "gin": _gin_settings("sft.train_sft", "trainer.make_optimizer",
                                         "trainer.make_schedule")}
    sft_key = integrity.fingerprint(sft_settings)
    sft_path = pathlib.Path(sft_dir).absolute() if sft_dir else out / "sft"
    sft_model_dir = _stage_dir(sft_path, sft_settings)
    params_ref = timed("sft", lambda: _exported(sft_model_dir, sft.train_sft(
        sft_model_dir, model_config=model_config, task_name=task_name,
        feature_lengths=feature_lengths, seed=sft_seed)))
    named_rewards = {}  # evaluated beside the reward the models are aligned with
    select_by = "gold" if reward_kind == "gold_proxy" else None  # None: the aligned-with one
    if reward_kind == "length":
        reward = rewards.length_reward()
        reward_settings = {"kind": "length", **_gin_settings("rewards.length_reward")}
    elif reward_kind == "gold_proxy":
        gold_tables = gold_reward.tables_for_task(task_name, model_config.vocab_size)
        named_rewards = {"gold": gold_reward.faithfulness_reward(gold_tables),
                         "gold_support": gold_reward.faithfulness_reward(gold_tables,
                                                                         length_guard=False)}
        rm_settings = {"stage": "proxy_reward_model", **common, "sft": sft_key,
                       "max_decode_len": max_decode_len, "human_task": human_task,
                       "gin": _gin_settings("reward_model.train_proxy",
                                            "reward_model.train_reward_model",
                                            "gold_reward.faithfulness_reward",
                                            "trainer.make_optimizer", "trainer.make_schedule")}
        rm_dir = _stage_dir(out / "proxy_reward_model", rm_settings)
        rm_params = timed("reward_model", lambda: reward_model.train_proxy(
            rm_dir, model=model, params_ref=params_ref, reward=named_rewards["gold"],
            task_name=task_name, feature_lengths=feature_lengths,
            max_decode_len=max_decode_len, seed=seed, human_task=human_task,
            mesh_shape=mesh_shape))
        reward = reward_model.as_reward(model, rm_params)
        reward_settings = {"kind": "gold_proxy", "key": integrity.fingerprint(rm_settings)}
    def aligner_settings(chosen, scope=""):
        selectors = ("rl.train_rl", "rl.RLConfig", "rl.make_optimizer", "dpo.train_dpo",
                     "aligners.dpo_aligner")
        return {"aligner": getattr(chosen, "__name__", repr(chosen)),
                **_gin_settings(*(f"{scope}/{s}" if scope else s for s in selectors))}

    def rl_settings(beta_value, chosen=aligner, with_settings=None, scope=""):
        return {"stage": "align", **common, "beta": beta_value, "max_decode_len": max_decode_len,
                "sft": sft_key, "reward": with_settings or reward_settings,
                "gin": aligner_settings(chosen, scope)}

    def stage_name(beta_value, chosen=aligner):
        prefix = getattr(chosen, "__name__", "aligner").removesuffix("_aligner")
        return f"{prefix}_beta_{_fmt_beta(beta_value)}"

    def align(beta_value, chosen=aligner, with_reward=None, with_settings=None, scope=""):
        """Aligns at beta_value; a gin `scope` (e.g. 'oracle') names the folder
        (`oracle_rl_beta_...`) and its scoped bindings apply (`oracle/rl.train_rl...`)."""
        name = stage_name(beta_value, chosen)
        model_dir = _stage_dir(out / (f"{scope}_{name}" if scope else name),
                               rl_settings(beta_value, chosen, with_settings, scope))
        with gin.config_scope(scope) if scope else contextlib.nullcontext():
            return _exported(model_dir, chosen(
                model_dir, model=model, params_ref=params_ref, reward=with_reward or reward,
                beta=beta_value, task_name=task_name, feature_lengths=feature_lengths,
                max_decode_len=max_decode_len, seed=seed))

    base_key = integrity.fingerprint(rl_settings(beta))
    base_params = timed("rl_base", lambda: align(beta))
    evaluator = Evaluator(model, task_name, feature_lengths,
                          {reward.name: reward, **named_rewards},
                          eval_batch_size, num_eval_samples, max_decode_len, seed,
                          max_eval_examples, partitioner)
    eval_settings = {**common, "reward": reward_settings, "eval_split": eval_split,
                     "num_eval_samples": num_eval_samples, "eval_batch_size": eval_batch_size,
                     "max_eval_examples": max_eval_examples, "max_decode_len": max_decode_len}

    dera_settings = {"stage": "dera", **eval_settings, "sft": sft_key, "aligned": base_key,
                     "lambdas": lambdas}
    dera = timed("dera_sweep", lambda: _cached_json(
        out / f"dera_{eval_split}.json", dera_settings,
        lambda: [row.to_json() for row in evaluator.evaluate(eval_split, params_ref,
                                                             base_params, lambdas)]))

    def retrained_row(lam):
        if lam == 0.0:
            params, beta_value = params_ref, None
        elif lam == 1.0:
            params, beta_value = base_params, beta
        else:
            params, beta_value = align(beta / lam), beta / lam
        row = evaluator.evaluate(eval_split, params_ref, params, [1.0])[0]
        return dataclasses.replace(row, lam=lam, beta=beta_value).to_json()

    def retrained_settings(lam):
        model_key = (sft_key if lam == 0.0 else base_key if lam == 1.0
                     else integrity.fingerprint(rl_settings(beta / lam)))
        return {"stage": "retrained", **eval_settings, "sft": sft_key, "model": model_key,
                "lambda": lam}

    retrained = [_cached_json(out / f"retrained_{eval_split}_lambda_{lam:g}.json",
                              retrained_settings(lam),
                              lambda lam=lam: timed("retrained", lambda: retrained_row(lam)))
                 for lam in lambdas]

    same_optimum = None
    if rl_beta_same_optimum is not None:
        rl_key = integrity.fingerprint(rl_settings(rl_beta_same_optimum, aligners.rl_aligner))
        same_optimum = _cached_json(
            out / f"rl_same_optimum_{eval_split}.json",
            {"stage": "rl_same_optimum", **eval_settings, "sft": sft_key, "model": rl_key},
            lambda: timed("rl_same_optimum", lambda: dataclasses.replace(
                evaluator.evaluate(eval_split, params_ref,
                                   align(rl_beta_same_optimum, aligners.rl_aligner), [1.0])[0],
                beta=rl_beta_same_optimum).to_json()))

    oracle = None
    if reward_kind == "gold_proxy":  # RL on the gold reward itself, at oracle_beta
        gold_settings = {"kind": "gold",
                         **_gin_settings("gold_reward.faithfulness_reward")}
        oracle_key = integrity.fingerprint(
            rl_settings(oracle_beta, aligners.rl_aligner, gold_settings, "oracle"))
        oracle = _cached_json(
            out / f"oracle_{eval_split}.json",
            {"stage": "oracle", **eval_settings, "sft": sft_key, "model": oracle_key},
            lambda: timed("oracle_rl", lambda: dataclasses.replace(
                evaluator.evaluate(eval_split, params_ref, align(
                    oracle_beta, aligners.rl_aligner, named_rewards["gold"], gold_settings,
                    "oracle"), [1.0])[0], beta=oracle_beta).to_json()))

    selection_settings = {"stage": "selection", **eval_settings, "sft": sft_key,
                          "aligned": base_key, "dera": integrity.fingerprint(dera_settings),
                          "lambdas": lambdas, "rouge_margin": rouge_margin,
                          "test_split": test_split,
                          **({"select_by": select_by} if select_by else {})}
    selection = _cached_json(out / "selection.json", selection_settings,
                             lambda: timed("selection", lambda: _select(
                                 evaluator, dera, params_ref, base_params, lambdas,
                                 rouge_margin, eval_split, test_split, select_by)))

    distilled = None
    if distill_lambda is not None:
        lam_d = selection["chosen_lambda"] if distill_lambda == "chosen" else float(distill_lambda)
        distill_settings = {"stage": "distill", **common, "lambda": lam_d,
                            "max_decode_len": max_decode_len, "sft": sft_key,
                            "aligned": base_key, "gin": _gin_settings("distill.train_distill")}

        def train_student():
            model_dir = _stage_dir(out / f"distill_lambda_{lam_d:g}", distill_settings)
            return _exported(model_dir, distill.train_distill(
                model_dir, model=model, params_ref=params_ref, params_aligned=base_params,
                lam=lam_d, data=distill.task_data(task_name, "train", feature_lengths),
                max_decode_len=max_decode_len, seed=seed))

        distilled = _cached_json(
            out / f"distilled_{eval_split}.json",
            {"stage": "distilled", **eval_settings, "sft": sft_key, "aligned": base_key,
             "model": integrity.fingerprint(distill_settings), "lambda": lam_d},
            lambda: _distilled(evaluator, dera, params_ref, base_params, lam_d, eval_split, timed,
                               train_student))

    results = {
        "pipeline": pipeline_name, "reward": reward.name, "seed": seed, "beta": beta,
        "lambdas": list(lambdas), "eval_split": eval_split, "test_split": test_split,
        "max_decode_len": max_decode_len,
        "num_eval": len(pipeline.load_split(task_name, eval_split, feature_lengths).texts[
            "targets"][:max_eval_examples]) * num_eval_samples,
        "gap_tolerance": gap_tolerance, "chosen_lambda": selection["chosen_lambda"],
        "dera": dera, "retrained": retrained, "selection": selection,
        "examples": _examples(dera, pipeline.load_split(task_name, eval_split, feature_lengths)),
        "timings_s": dict(totals), "timings_this_run_s": timings,
        "aligner": getattr(aligner, "__name__", repr(aligner)),
        "aligner_eval": {stage_name(beta / lam): _last_eval(out / stage_name(beta / lam))
                         for lam in lambdas if lam > 0},
    }
    if same_optimum is not None:
        results["rl_same_optimum"] = same_optimum
    if distilled is not None:
        results["distilled"] = distilled
    if reward_kind == "gold_proxy":
        results.update(_gold_proxy_results(results, rm_dir, named_rewards["gold"], human_task,
                                           oracle))
    return report.write_report(out, results)


def _last_eval(model_dir: str) -> dict[str, float]:
    """The last `eval/*` metrics a training run wrote to its metrics.jsonl ({} if none)."""
    path = pathlib.Path(model_dir) / "metrics.jsonl"
    last = {}
    if path.exists():
        for line in path.read_text().splitlines():
            last.update({k: v for k, v in json.loads(line).items() if k.startswith("eval/")})
    return last


def _select(evaluator: Evaluator, dera: list[dict[str, Any]], params_ref: Params,
            base_params: Params, lambdas: Sequence[float], rouge_margin: float,
            eval_split: str, test_split: str, by: str | None = None) -> dict[str, Any]:
    """Picks lambda on validation data and evaluates it on the test split.

    The criterion is the mean of the reward named `by` (e.g. the gold reward
    of a gold / proxy pipeline), by default the one the models were aligned with.
    """
    sft_rouge = next(row["rougeL"] for row in dera if row["lambda"] == 0.0) if 0.0 in lambdas \
        else evaluator.evaluate(eval_split, params_ref, base_params, [0.0])[0].rouge["rougeL"]
    criterion = by or "mean_reward"
    table = [{"lambda": row["lambda"], "mean_reward": row["mean_reward"],
              criterion: row["rewards"][by][0] if by else row["mean_reward"],
              "rougeL": row["rougeL"], "eligible": row["rougeL"] >= sft_rouge - rouge_margin}
             for row in dera]
    eligible = [row for row in table if row["eligible"]] or table
    chosen = max(eligible, key=lambda row: row[criterion])["lambda"]
    test_lambdas = [chosen, 1.0, 0.0]
    test_rows = evaluator.evaluate(test_split, params_ref, base_params, test_lambdas)
    return {
        "objective": (f"Largest mean {by or 'reward'} on the {eval_split} split among the "
                      "lambdas whose "
                      f"ROUGE-L is at least the SFT model's minus {rouge_margin:g} "
                      f"(SFT ROUGE-L {sft_rouge:.2f})."),
        "validation": table, "chosen_lambda": chosen,
        "test": {name: _strip(row.to_json())
                 for name, row in zip(("chosen", "base", "sft"), test_rows)},
    }


def _gold_proxy_results(results: dict[str, Any], proxy_dir: str, gold: rewards.Reward,
                        human_task: str | None, oracle: dict[str, Any] | None
                        ) -> dict[str, Any]:
    """A gold / proxy pipeline's report fields: the proxy's agreement with gold
    on held-out pairs and its accuracy on the human pairs, the gold reward's
    agreement with the human labels, every row's `gold_reward` and
    `proxy_reward` (and the `oracle` RL model's), per comparator the lambda
    past which gold falls while the proxy still rises (`gold_proxy_part_at`;
    None if they never part), and DeRa's gold reward against the retrained
    models' (`gold_comparison_rows`, `evaluation.gold_comparison`)."""
    proxy = _last_eval(proxy_dir)
    out = {"proxy_gold_agreement": proxy.get("eval/gold_agreement"),
           "proxy_human_accuracy": proxy.get("eval/human_accuracy"), "gold_proxy_part_at": {}}
    if oracle is not None:
        out["oracle"] = dict(oracle, gold_reward=oracle["rewards"]["gold"][0],
                             proxy_reward=oracle["rewards"]["reward_model"][0])
    if human_task is not None:
        out["gold_human_agreement"] = {
            split: gold_reward.human_agreement(
                gold, reward_model.preference_arrays(human_task, split,
                                                     reward_model.HUMAN_PAIR_LENGTHS))
            for split in ("validation", "test")}
    for key in ("dera", "retrained"):
        out[key] = [dict(row, gold_reward=row["rewards"]["gold"][0],
                         proxy_reward=row["rewards"]["reward_model"][0]) for row in results[key]]
        rows = sorted(out[key], key=lambda row: row["lambda"])
        out["gold_proxy_part_at"][key] = next(
            (a["lambda"] for a, b in zip(rows, rows[1:])
             if b["gold_reward"] < a["gold_reward"] and b["proxy_reward"] > a["proxy_reward"]),
            None)
    out["gold_comparison_rows"] = evaluation.gold_comparison(out["dera"], out["retrained"])
    return out


def _distilled(evaluator: Evaluator, dera: list[dict[str, Any]], params_ref: Params,
               base_params: Params, lam: float, split: str, timed: Callable,
               train: Callable[[], Params]) -> dict[str, Any]:
    """The distilled model (`train()`) evaluated like every model (the aligned
    model at lambda 1: length, rewards, KL to SFT, ROUGE), with `lambda` the
    one it was distilled at, `dera` (DeRa at that lambda), `length_gap`,
    `mixture_kl_per_token` (mean KL(DeRa mixture || student) per token on DeRa
    samples of the split) and `decode` (`distill.decode_times` at the
    evaluation batch size)."""
    student = timed("distill", train)

    def evaluate():
        row = _strip(evaluator.evaluate(split, params_ref, student, [1.0])[0].to_json())
        dera_row = next((r for r in dera if r["lambda"] == lam), None) or \
            evaluator.evaluate(split, params_ref, base_params, [lam])[0].to_json()
        inputs = evaluator.inputs(split)
        mixture_kl = distill.make_eval_fn(
            evaluator.model, params_ref, base_params, lam, {"inputs": inputs},
            max_decode_len=evaluator.max_decode_len, batch_size=evaluator.batch_size,
            seed=evaluator.seed, partitioner=evaluator.partitioner)(student)
        times = distill.decode_times(evaluator.model, student, params_ref, base_params,
                                     inputs[:evaluator.batch_size], lam,
                                     max_decode_len=evaluator.max_decode_len,
                                     seed=evaluator.seed)
        source = gin_utils.bindings_of("distill.train_distill").get(
            "data_source", distill.DEFAULT_DATA_SOURCE)
        return {**row, "lambda": lam, "data_source": source, **mixture_kl, "decode": times,
                "dera": _strip(dera_row),
                "length_gap": evaluation.relative_gap(row["mean_length"],
                                                      dera_row["mean_length"])}

    return timed("distilled_eval", evaluate)


def _strip(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "samples"}


def _examples(dera: list[dict[str, Any]], data: pipeline.Split) -> list[dict[str, Any]]:
    num = min(len(row["samples"]) for row in dera)
    return [{"input": data.texts["inputs"][i],
             "reference": data.texts["targets"][i],
             "summaries": [(row["lambda"], row["samples"][i]) for row in dera]}
            for i in range(num)]


def main(argv: Sequence[str]) -> None:
    del argv
    output_dir = flags.FLAGS.output_dir
    content = run(output_dir)
    print(pathlib.Path(output_dir) / "report.md")
    print("\n".join(f"lambda {row['lambda']:g}: DeRa length {row['dera_length']:.1f}, "
                    f"retrained {row['retrained_length']:.1f}, gap {100 * row['length_gap']:.1f}%"
                    for row in content["comparison"]))


if __name__ == "__main__":
    # Run the importable module, not __main__, so gin binds one `reproduce.run`.
    from dera_t5x import reproduce

    flags.DEFINE_string("output_dir", None, "Where the stages and the report go.", required=True)
    gin_utils.run(reproduce.main)
