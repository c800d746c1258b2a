"""TrRa: distilling the DeRa mixture at one lambda into a single model.

Flexible Realignment (Zhu et al., 2025) bakes a chosen lambda into one model,
so that serving pays for one model instead of DeRa's two. The teacher is the
distribution DeRa samples from (`realign.mixed_logits`: the frozen reference
and aligned models' logits mixed at lambda, banned ids excluded after
mixing); the student follows the same banned-token rule. The loss is the
per-token KL(teacher || student) over the whole vocabulary, averaged over
response tokens (through the first EOS): prompts and the padding after a
response never enter it, and it is 0 wherever student and teacher agree.

The responses the KL is taken on come from one of three sources (gin:
`distill.train_distill.data_source`):

- 'dataset': teacher-forced targets of a dataset (the SFT data as a
  calibration set);
- 'dera_samples': on-policy samples of the mixture itself, drawn in every
  step (`realign.dera_decode` at temperature 1 inside the jitted step, with
  the step's rng, so a resumed run draws the same samples);
- 'decoded': the mixture's samples at lambda written by the batch decoding
  job (`decoded_data`), teacher-forced like a dataset: drawn once, by a job
  that may run elsewhere (on a mesh, resumably), and reused across runs.

The student starts from the aligned model (default) or the reference.
Training runs on the shared loop (`trainer.train_loop`: mesh, orbax
checkpoints, exact resume, metrics.jsonl, settings checks).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
import time
from typing import Any, Callable, Mapping, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dera_t5x import batching
from dera_t5x import integrity
from dera_t5x import models
from dera_t5x import partitioning
from dera_t5x import realign
from dera_t5x.models import protocol
from dera_t5x.training import trainer

Array = jax.Array
Params = Any
DATA_SOURCES = ("dataset", "dera_samples", "decoded")
TEACHER_FORCED = ("dataset", "decoded")  # the sources whose responses are `targets`
DEFAULT_DATA_SOURCE = "dera_samples"
INITS = ("aligned", "reference")
# Config fields a decode job and a distillation of the same model may differ in
# (training dropout, the activations' dtype).
_NOT_ARCHITECTURE = ("dropout_rate", "dtype")


def check_lambda(lam: Any) -> float:
    """lam as a float; a ValueError for anything but a finite number >= 0."""
    if isinstance(lam, bool) or not isinstance(lam, (int, float, np.integer, np.floating)) \
            or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"The distillation lambda must be a finite number >= 0 (0 is the "
                         f"reference model, 1 the aligned one, > 1 extrapolates), got {lam!r}.")
    return float(lam)


def check_settings(lam: Any, data_source: str, init: str) -> float:
    """Validates the run's choices before anything loads; returns lam as a float."""
    if data_source not in DATA_SOURCES:
        raise ValueError(f"distill data_source must be one of {DATA_SOURCES}, got "
                         f"{data_source!r}.")
    if init not in INITS:
        raise ValueError(f"distill init must be one of {INITS}, got {init!r}.")
    return check_lambda(lam)


def check_data(data: Mapping[str, Any], model: models.Model, data_source: str,
               what: str = "distillation data") -> None:
    """Refuses data the chosen source cannot use, naming what to fix.

    Args:
      data: `inputs` [n, in_len] (T5's encoder input; a decoder-only model's
        right-padded prompts, with `prompt_lengths` [n]); for 'dataset' and
        'decoded' also `targets` [n, len] (responses through their EOS, then
        padding).
    """
    need = ("inputs", "targets") if data_source in TEACHER_FORCED else ("inputs",)
    missing = [name for name in need if name not in data]
    if missing:
        raise ValueError(f"{what} lacks {missing}; data_source={data_source!r} needs {need}.")
    rows = {name: len(data[name]) for name in (*need, "prompt_lengths") if name in data}
    if len(set(rows.values())) != 1 or not rows["inputs"]:
        raise ValueError(f"{what} must be non-empty with one row per example, got {rows}.")
    for name in need:
        protocol.check_token_ids(data[name], model.config.vocab_size, f"{what}[{name!r}]")
    if data.get("prompt_lengths") is not None:
        protocol.check_prompt_lengths(data["prompt_lengths"], data["inputs"],
                                      f"{what}['prompt_lengths']")
    if data_source in TEACHER_FORCED:
        targets = np.asarray(data["targets"])
        empty = np.isin(targets[:, 0], model.banned_ids)
        if np.any(empty):
            raise ValueError(f"{what}: target {int(np.argmax(empty))} starts with padding (no "
                             f"response token; {int(empty.sum())} such rows); drop them.")


def _position_logits(model: models.Model, params: Params, batch: Mapping[str, Array]
                     ) -> Array:
    """Logits [batch, len, vocab] of every response position (position t reads
    the inputs and response_<t; a decoder-only prompt's own positions are not
    among them)."""
    _, logits = model.response_states(params, batch["inputs"], batch["responses"],
                                      prompt_lengths=batch.get("prompt_lengths"))
    return logits[:, :-1]


def mixture_log_probs(model: models.Model, params_ref: Params, params_aligned: Params,
                      batch: Mapping[str, Array], lam: float | Array) -> Array:
    """The teacher: log softmax of DeRa's mixed logits at lam, [batch, len, vocab].

    Args:
      batch: `inputs` [batch, in_len], `responses` [batch, len] and, for a
        decoder-only model, `prompt_lengths` [batch].
    """
    return jax.nn.log_softmax(realign.mixed_logits(
        model, _position_logits(model, params_ref, batch),
        _position_logits(model, params_aligned, batch), lam), axis=-1)


def student_log_probs(model: models.Model, params: Params, batch: Mapping[str, Array]
                      ) -> Array:
    """The student's log-probs [batch, len, vocab] under the model's banned-token
    rule (as the teacher's and as generation's)."""
    return jax.nn.log_softmax(protocol.ban_tokens(_position_logits(model, params, batch),
                                                  model.banned_ids), axis=-1)


def loss_mask(model: models.Model, responses: Array) -> Array:
    """1.0 on the response tokens the loss counts: through the first EOS, never
    a banned id (T5's padding); [batch, len]."""
    mask = protocol.response_mask(responses, model.eos_ids)
    if not model.banned_ids:
        return mask
    return mask * ~jnp.isin(responses, jnp.asarray(model.banned_ids, responses.dtype))


def token_kl(model: models.Model, params: Params, params_ref: Params, params_aligned: Params,
             batch: Mapping[str, Array], lam: float | Array) -> tuple[Array, Array]:
    """(KL(teacher || student) at each position [batch, len], loss_mask [batch, len]).

    The teacher is frozen (no gradient reaches params_ref or params_aligned).
    Banned ids have probability 0 under both, so they add exactly 0.
    """
    teacher = jax.lax.stop_gradient(
        mixture_log_probs(model, params_ref, params_aligned, batch, lam))
    student = student_log_probs(model, params, batch)
    kl = jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)
    return kl, loss_mask(model, batch["responses"])


def loss_fn(model: models.Model, params: Params, params_ref: Params, params_aligned: Params,
            batch: Mapping[str, Array], lam: float | Array) -> tuple[Array, dict[str, Array]]:
    """The mean per-token KL over the batch's response tokens, and metrics
    `loss`, `num_tokens`, `response_length` (mean tokens per response)."""
    kl, mask = token_kl(model, params, params_ref, params_aligned, batch, lam)
    num_tokens = jnp.sum(mask)
    loss = jnp.sum(kl * mask) / jnp.maximum(num_tokens, 1.0)
    return loss, {"loss": loss, "num_tokens": num_tokens,
                  "response_length": num_tokens / mask.shape[0]}


def dera_samples(model: models.Model, params_ref: Params, params_aligned: Params,
                 batch: Mapping[str, Array], lam: float, rng: Array, max_decode_len: int
                 ) -> Array:
    """Responses [batch, max_decode_len] sampled from the mixture at lam
    (temperature 1, no filtering); callable inside a jit."""
    return realign.dera_decode(model, params_ref, params_aligned, batch["inputs"],
                               jnp.full((batch["inputs"].shape[0],), lam, jnp.float32),
                               max_decode_len=max_decode_len, rng=rng, temperature=1.0,
                               prompt_lengths=batch.get("prompt_lengths")).tokens


@functools.partial(jax.jit, static_argnums=0)
def _kl_sums(model: models.Model, params: Params, params_ref: Params, params_aligned: Params,
             batch: Mapping[str, Array], lam: Array, rows: Array) -> tuple[Array, Array]:
    """(summed per-token KL, token count) over the rows marked 1.0 in `rows` [batch]."""
    kl, mask = token_kl(model, params, params_ref, params_aligned, batch, lam)
    weights = mask * rows[:, None]
    return jnp.sum(kl * weights), jnp.sum(weights)


def make_eval_fn(model: models.Model, params_ref: Params, params_aligned: Params, lam: float,
                 data: Mapping[str, np.ndarray], *, max_decode_len: int, batch_size: int,
                 seed: int, partitioner: partitioning.Partitioner | None = None
                 ) -> Callable[[Params], dict[str, float]]:
    """params -> {'mixture_kl_per_token'}: the mean per-token KL(mixture || params)
    over DeRa samples of `data['inputs']` at lam (temperature 1, drawn once, as
    `realign.sweep_batches` draws them with `seed`), token-weighted.

    Args:
      data: `inputs` [n, in_len] (and `prompt_lengths` [n] for decoder-only).
    """
    lam = check_lambda(lam)
    samples = []

    def draw() -> None:
        for i, rows, out in realign.sweep_batches(
                model, params_ref, params_aligned, np.asarray(data["inputs"]), [lam],
                batch_size=batch_size, seed=seed, prompt_lengths=data.get("prompt_lengths"),
                partitioner=partitioner, max_decode_len=max_decode_len, temperature=1.0):
            take = np.concatenate([i * batch_size + rows,
                                   np.full(batch_size - len(rows), i * batch_size)])
            batch = {"inputs": np.asarray(data["inputs"])[take], "responses": out.tokens[0]}
            if data.get("prompt_lengths") is not None:
                batch["prompt_lengths"] = np.asarray(data["prompt_lengths"])[take]
            samples.append((batch, (np.arange(batch_size) < len(rows)).astype(np.float32)))

    def eval_fn(params: Params) -> dict[str, float]:
        if not samples:
            draw()
        total = count = 0.0
        for batch, rows in samples:
            kl, n = _kl_sums(model, params, params_ref, params_aligned, batch,
                             jnp.float32(lam), rows)
            total, count = total + float(kl), count + float(n)
        return {"mixture_kl_per_token": total / max(count, 1.0)}

    return eval_fn


def decode_times(model: models.Model, params: Params, params_ref: Params,
                 params_aligned: Params, inputs: np.ndarray, lam: float, *,
                 max_decode_len: int, seed: int, reps: int = 3,
                 prompt_lengths: np.ndarray | None = None) -> dict[str, float]:
    """Median seconds of one model's decode call (`model.predict`, jitted) against
    DeRa's two-model call (`realign.dera_decode`) on the same batch, both
    sampling at temperature 1 for all `max_decode_len` steps, timed in turns
    after a warm-up (compiling) call each.

    Returns:
      {'student_s', 'dera_s', 'student_over_dera', 'batch_size'}.
    """
    rng = jax.random.PRNGKey(seed)
    extra = {} if prompt_lengths is None else {"prompt_lengths": prompt_lengths}
    predict = jax.jit(functools.partial(model.predict, max_decode_len=max_decode_len,
                                        temperature=1.0, **extra))
    lam_rows = np.full((len(inputs),), lam, np.float32)
    calls = {
        "student_s": lambda: predict(params, inputs, rng).tokens,
        "dera_s": lambda: realign.dera_decode(model, params_ref, params_aligned, inputs,
                                              lam_rows, max_decode_len=max_decode_len, rng=rng,
                                              temperature=1.0, **extra).tokens,
    }
    seconds = {name: [] for name in calls}
    for rep in range(reps + 1):
        for name, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            if rep:  # the first round compiles
                seconds[name].append(time.perf_counter() - start)
    out = {name: statistics.median(values) for name, values in seconds.items()}
    out["student_over_dera"] = out["student_s"] / out["dera_s"]
    out["batch_size"] = int(len(inputs))
    return out


def task_data(task_name: str, split: str, feature_lengths: Mapping[str, int],
              max_examples: int | None = None) -> dict[str, np.ndarray]:
    """{'inputs', 'targets'} of a seqio task's split (T5 features), e.g. the SFT
    data as the calibration set."""
    from dera_t5x.data import pipeline  # noqa: PLC0415  (TensorFlow: the drivers only)

    features = pipeline.load_split(task_name, split, feature_lengths).features
    return {"inputs": features["encoder_input_tokens"][:max_examples],
            "targets": features["decoder_target_tokens"][:max_examples]}


def decoded_data(output_file: str, lam: float, model: models.Model
                 ) -> dict[str, np.ndarray]:
    """The mixture's samples at `lam` from a finished decode job's output file,
    as data for the 'decoded' source (`decode_job.read_output`).

    The inputs are read again from the job's source and checked against the
    file's hash (`decode_job.job_inputs`); the samples must have been drawn
    from the mixture itself (temperature 1, no top-k / top-p) by this model.

    Returns:
      {'inputs' [n, in_len], 'targets' [n, max_decode_len] (each sample through
      its EOS, then 0)} and, for a decoder-only job, 'prompt_lengths' [n].
    """
    from dera_t5x import decode_job  # noqa: PLC0415  (the job's readers: drivers only)

    lam = check_lambda(lam)
    header, records = decode_job.read_output(output_file)
    if lam not in header["lambdas"]:
        raise ValueError(f"{output_file} holds lambdas {header['lambdas']}, not {lam:g}. Fix: "
                         f"distil at one of them, or decode with --lambdas including {lam:g}.")
    sampling = {name: header[name] for name in ("temperature", "top_k", "top_p")}
    if sampling != {"temperature": 1.0, "top_k": 0, "top_p": 1.0}:
        raise ValueError(f"{output_file} was sampled with {sampling}: its samples are not the "
                         "mixture's own. Fix: decode with --temperature=1 --top_k=0 --top_p=1.")
    differing = integrity.differences(header["model_config"], dataclasses.asdict(model.config),
                                      lambda name: name in _NOT_ARCHITECTURE)
    if differing:
        raise ValueError(f"{output_file} was decoded by another model (the file's config -> "
                         f"this model's: {'; '.join(differing)}). Fix: distil the model the "
                         "job decoded.")
    inputs = decode_job.job_inputs(header)
    rows = [record for record in records if record["lambda"] == lam]
    targets = np.zeros((len(rows), header["max_decode_len"]), np.int32)
    for row, record in enumerate(rows):
        targets[row, :len(record["token_ids"])] = record["token_ids"]
    index = np.array([record["index"] for record in rows])
    data = {"inputs": np.asarray(inputs.tokens)[index], "targets": targets}
    if inputs.prompt_lengths is not None:
        data["prompt_lengths"] = np.asarray(inputs.prompt_lengths)[index]
    return data


@gin.configurable(denylist=["model_dir", "model", "params_ref", "params_aligned", "lam", "data",
                            "eval_data"])
def train_distill(model_dir: str, *, model: models.Model, params_ref: Params,
                  params_aligned: Params, lam: float, data: Mapping[str, np.ndarray],
                  eval_data: Mapping[str, np.ndarray] | None = None,
                  data_source: str = DEFAULT_DATA_SOURCE, init: str = "aligned",
                  batch_size: int = 16, num_steps: int = 100, max_decode_len: int = 64,
                  optimizer: optax.GradientTransformation | None = None, seed: int = 0,
                  checkpoint_every: int = 50, eval_every: int = 0, eval_batch_size: int = 64,
                  mesh_shape: Sequence[int] | None = None) -> Params:
    """Distils DeRa(params_ref, params_aligned) at `lam` into one parameter set.

    Args:
      data: the examples the responses are taken on (`check_data`).
      eval_data: held-out `inputs` (and `prompt_lengths`); their
        `make_eval_fn` metric `eval/mixture_kl_per_token` is written every
        `eval_every` steps and at the end.
      data_source: 'dataset' (teacher-forced `targets`), 'dera_samples'
        (fresh mixture samples every step, `max_decode_len` tokens) or
        'decoded' (teacher-forced `targets` from `decoded_data`).
      init: the student's start, 'aligned' or 'reference'.
      optimizer: default AdamW at a constant 1e-3 (gin:
        `@distill/trainer.make_optimizer()`, scoped so SFT keeps its own).
      mesh_shape: (data, model), as the other trainers.

    Returns:
      the student's params (the tree of params_ref).
    """
    trainer.check_run_arguments("distill.train_distill", batch_size=batch_size,
                                num_steps=num_steps, checkpoint_every=checkpoint_every,
                                eval_every=eval_every, eval_batch_size=eval_batch_size)
    if isinstance(max_decode_len, bool) or not isinstance(max_decode_len, int) \
            or max_decode_len < 1:
        raise ValueError(f"distill.train_distill.max_decode_len must be an integer >= 1, got "
                         f"{max_decode_len!r}.")
    lam = check_settings(lam, data_source, init)
    realign.check_compatible(model, params_ref, params_aligned)
    check_data(data, model, data_source)
    if eval_data is not None:
        check_data(eval_data, model, "dera_samples", "distillation eval_data")
    partitioner = partitioning.partitioner_for(mesh_shape, model.param_axes)
    if partitioner is not None:
        partitioner.check_batch_size(batch_size)
        params_ref = partitioner.shard_params(params_ref)
        params_aligned = partitioner.shard_params(params_aligned)
    arrays = {name: np.asarray(data[name])
              for name in ("inputs", "prompt_lengths") if data.get(name) is not None}
    if data_source in TEACHER_FORCED:
        arrays["responses"] = np.asarray(data["targets"])

    def batch_loss(params, batch, rng):
        if data_source == "dera_samples":
            batch = dict(batch, responses=dera_samples(model, params_ref, params_aligned, batch,
                                                       lam, rng, max_decode_len))
        return loss_fn(model, params, params_ref, params_aligned, batch, lam)

    optimizer = optimizer if optimizer is not None else trainer.make_optimizer(name="adamw")
    start = params_aligned if init == "aligned" else params_ref
    state = trainer.TrainState.create(jax.tree_util.tree_map(jnp.copy, start), optimizer, seed)
    eval_fn = None if eval_data is None else make_eval_fn(
        model, params_ref, params_aligned, lam, eval_data, max_decode_len=max_decode_len,
        batch_size=eval_batch_size, seed=seed, partitioner=partitioner)
    settings = {"model_config": model.config, "lam": lam, "data_source": data_source,
                "init": init, "batch_size": batch_size, "seed": seed,
                "max_decode_len": max_decode_len if data_source == "dera_samples" else None,
                "reference": integrity.params_fingerprint(params_ref),
                "aligned": integrity.params_fingerprint(params_aligned),
                "data": integrity.params_fingerprint(arrays)}
    state = trainer.train_loop(
        state, trainer.make_train_step(batch_loss, optimizer, partitioner),
        lambda first: batching.train_batches(arrays, batch_size, seed, first),
        num_steps=num_steps, model_dir=model_dir, checkpoint_every=checkpoint_every,
        eval_fn=eval_fn, eval_every=eval_every, description=f"distill lambda={lam:g}",
        partitioner=partitioner, settings=settings)
    return state.params
