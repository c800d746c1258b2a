"""The batch DeRa decoding job: inputs -> one JSON line per (input, lambda).

`run` (gin-configurable; the entry point is `decode/dera.py`) reads the
inputs (a JSON-lines file or a seqio task split), loads the reference and the
aligned checkpoints, and decodes every batch for all lambdas in one
`realign.dera_sweep` call, so each input is encoded once per model.

Output file (JSON lines, UTF-8):

* line 1, the header: `{"header": {...}}` with the job's settings
  (checkpoints, model config, lambdas, sampling flags, seed, batch size,
  input source and a SHA-256 of the tokenized inputs);
* then one line per (input, lambda), input-major, lambdas in the given
  order: `index` (position of the input, 0-based), `input` (the text the model
  read, prefix included), `lambda`, `text` (decoded, without EOS),
  `token_ids`, `length` (tokens including EOS; `max_decode_len` if none),
  and per token, up to and including EOS: `log_probs` (under the
  distribution sampled from: temperature and top-k / top-p applied),
  `ref_log_probs`, `aligned_log_probs`, `mixed_log_probs` (under the
  reference, aligned and untempered DeRa distributions).

Resuming: batches are appended whole (all lambdas of a batch in one write,
then flush and fsync), and batch `i` samples with `fold_in(PRNGKey(seed), i)`.
A restarted job with the same output file checks the header against its own
settings (a mismatch is an error: nothing is overwritten), drops a trailing
partial line and the lines of an unfinished batch, and continues with the
next batch; the file then equals the one an uninterrupted job writes.

All user errors (settings, inputs, checkpoints, a foreign output file) are
raised before the first compile and before anything is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import pathlib
import time
from typing import Any, Sequence

from absl import logging
import gin
import jax
import numpy as np
import seqio
import tqdm

from dera_t5x import checkpoints
from dera_t5x import gin_utils
from dera_t5x import jsonl
from dera_t5x import models
from dera_t5x import partitioning
from dera_t5x import realign
from dera_t5x.data import pipeline
from dera_t5x.data import tasks
from dera_t5x.data import vocabularies

Params = Any
FORMAT = "dera_t5x.decode_job/1"
LOG_PROB_FIELDS = ("log_probs", "ref_log_probs", "aligned_log_probs", "mixed_log_probs")


@dataclasses.dataclass(frozen=True)
class Inputs:
    """Tokenized job inputs.

    Attributes:
      texts: the model's input text per example (prefix included).
      tokens: [num_inputs, inputs_length] int32, EOS-terminated, 0-padded.
      num_truncated: inputs cut to fit `inputs_length`.
    """

    texts: tuple[str, ...]
    tokens: np.ndarray
    num_truncated: int


@dataclasses.dataclass(frozen=True)
class Summary:
    """What a `run` did."""

    output_file: str
    num_inputs: int
    num_lambdas: int
    resumed_inputs: int
    num_truncated: int
    inputs_length: int
    seconds: float

    def __str__(self) -> str:
        done = self.num_inputs - self.resumed_inputs
        lines = [f"{self.output_file}: {self.num_inputs} inputs x {self.num_lambdas} lambdas; "
                 f"decoded {done} inputs ({done * self.num_lambdas} lines) in "
                 f"{self.seconds:.1f} s."]
        if self.resumed_inputs:
            lines.append(f"Resumed: {self.resumed_inputs} inputs were already in the file.")
        lines.append(f"Inputs truncated to {self.inputs_length} tokens: {self.num_truncated} "
                     f"of {self.num_inputs}.")
        return "\n".join(lines)


def parse_lambdas(lambdas: str | Sequence[float]) -> tuple[float, ...]:
    """"0,0.5,1,2" (or a sequence of numbers) -> distinct finite floats, in order."""
    items = lambdas.split(",") if isinstance(lambdas, str) else list(lambdas)
    values = []
    for item in items:
        try:
            value = float(item.strip() if isinstance(item, str) else item)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise ValueError(f"Bad lambdas {lambdas!r}: {item!r} is not a finite number. Fix: "
                             "pass comma-separated numbers, e.g. --lambdas=0,0.5,1,2.")
        values.append(value)
    if not values:
        raise ValueError("No lambdas given. Fix: pass e.g. --lambdas=0,0.5,1,2.")
    if len(set(values)) != len(values):
        raise ValueError(f"Bad lambdas {lambdas!r}: a value repeats. Fix: list each lambda once.")
    return tuple(values)


def _check_settings(batch_size: int, max_decode_len: int, inputs_length: int, seed: int,
                    temperature: float, top_k: int, top_p: float) -> None:
    problems = []
    for name, value, low in (("batch_size", batch_size, 1), ("max_decode_len", max_decode_len, 1),
                             ("inputs_length", inputs_length, 2), ("seed", seed, 0),
                             ("top_k", top_k, 0)):
        if not isinstance(value, int) or value < low:
            problems.append(f"{name} must be an integer >= {low}, got {value!r}")
    if not (math.isfinite(temperature) and temperature >= 0):
        problems.append(f"temperature must be >= 0 (0 is greedy), got {temperature!r}")
    if not 0.0 < top_p <= 1.0:
        problems.append(f"top_p must be in (0, 1] (1 turns it off), got {top_p!r}")
    if problems:
        raise ValueError("Bad decoding settings: " + "; ".join(problems) + ".")


def _encode(vocabulary: seqio.Vocabulary, texts: Sequence[str], inputs_length: int) -> Inputs:
    """Tokenizes as the tasks do: trim to inputs_length - 1, append EOS, pad with 0."""
    tokens = np.zeros((len(texts), inputs_length), np.int32)
    num_truncated = 0
    for row, text in enumerate(texts):
        ids = list(vocabulary.encode(text))
        num_truncated += len(ids) + 1 > inputs_length
        ids = ids[:inputs_length - 1] + [vocabulary.eos_id]
        tokens[row, :len(ids)] = ids
    return Inputs(tuple(texts), tokens, num_truncated)


def read_jsonl_inputs(path: str, vocabulary: seqio.Vocabulary, *, text_field: str,
                      prefix: str, inputs_length: int) -> Inputs:
    """Inputs from a JSON-lines file (blank lines skipped), `prefix` + `text_field`."""
    try:
        records = jsonl.read_records(path, (text_field,), kind="input")
    except ValueError as e:
        raise ValueError(f"{e} (--input_file; the text is read from --text_field="
                         f"{text_field}.)") from None
    return _encode(vocabulary, [prefix + record[text_field] for record in records],
                   inputs_length)


def read_task_inputs(task_name: str, split: str, inputs_length: int) -> Inputs:
    """Inputs of a seqio task split (`pipeline.load_split`)."""
    # The targets length is irrelevant here; 2 is the smallest load_split accepts.
    data = pipeline.load_split(task_name, split, {"inputs": inputs_length, "targets": 2})
    return Inputs(data.texts["inputs"], np.asarray(data.features["encoder_input_tokens"]),
                  data.num_truncated["inputs"])


def _is_hf_dir(spec: str) -> bool:
    return not spec.startswith("gs://") and (pathlib.Path(spec) / "config.json").exists()


def load_models(ref_checkpoint: str, aligned_checkpoint: str, model_config: Any | None
                ) -> tuple[models.Model, Params, Params]:
    """(model, params_ref, params_aligned), checked compatible.

    The config is `model_config` if given, else gin's `MODEL_CONFIG`, else
    the `config.json` of whichever checkpoint is a Hugging Face directory.
    """
    config = model_config or gin_utils.model_config(required=False)
    loaded: dict[str, Params] = {}
    if config is None:
        hf = [spec for spec in (ref_checkpoint, aligned_checkpoint) if _is_hf_dir(spec)]
        if not hf:
            raise ValueError(
                "No model config: pass the model's gin file (e.g. --gin_file=gin/models/"
                "t5_tiny.gin, which binds MODEL_CONFIG), or use a Hugging Face model "
                "directory (with config.json) as a checkpoint.")
        config, loaded[hf[0]] = checkpoints.load_hf(hf[0])
    params = [loaded[spec] if spec in loaded else checkpoints.load_params(spec, config)
              for spec in (ref_checkpoint, aligned_checkpoint)]
    model = models.for_config(config)
    realign.check_compatible(model, *params)
    return model, params[0], params[1]


def _checkpoint_id(spec: str) -> str:
    return spec if "://" in spec else os.path.abspath(spec)


def _record(index: int, text: str, lam: float, out: realign.DeraOutput, k: int, row: int,
            vocabulary: seqio.Vocabulary) -> dict[str, Any]:
    length = int(out.lengths[k, row])
    token_ids = [int(t) for t in out.tokens[k, row, :length]]
    record = {"index": index, "input": text, "lambda": lam,
              "text": vocabularies.detokenize(vocabulary, [token_ids])[0],
              "token_ids": token_ids, "length": length}
    for name in LOG_PROB_FIELDS:
        record[name] = [float(x) for x in getattr(out, name)[k, row, :length]]
    return record


@gin.configurable(denylist=["ref_checkpoint", "aligned_checkpoint", "output_file"])
def run(ref_checkpoint: str, aligned_checkpoint: str, output_file: str, *,
        lambdas: str | Sequence[float], input_file: str | None = None,
        task: str = "xsum_bundled", split: str | None = None, text_field: str = "document",
        add_prefix: bool = True, inputs_length: int = 512, batch_size: int = 16,
        max_decode_len: int = 64, temperature: float = 1.0, top_k: int = 0,
        top_p: float = 1.0, seed: int = 0, model_config: Any | None = None,
        mesh_shape: Sequence[int] | None = None) -> Summary:
    """Decodes every input for every lambda into `output_file` (resumable).

    Args:
      ref_checkpoint, aligned_checkpoint: our orbax params dir, a Hugging Face
        T5 directory or a T5X checkpoint (`checkpoints.load_params`).
      output_file: the JSON-lines output (see the module docstring); an
        existing file of the same job is resumed.
      lambdas: "0,0.5,1,2" or a sequence; distinct finite values.
      input_file: a JSON-lines file with the text in `text_field`; or None to
        read `split` of `task`.
      task: the seqio task whose vocabulary tokenizes and detokenizes (and
        whose split is read when `split` is given).
      split: the task split to decode (instead of `input_file`).
      add_prefix: prepend `tasks.PREFIX` ("summarize: ") to file inputs, as
        the tasks do.
      inputs_length: encoder length; longer inputs are truncated and counted.
      batch_size: inputs per batch; the last batch is padded to it.
      max_decode_len: generated tokens at most, EOS included.
      temperature, top_k, top_p: sampling (0 is greedy; 0 and 1.0 turn the
        filters off).
      seed: batch i samples with `fold_in(PRNGKey(seed), i)`.
      model_config: the architecture; None takes gin's `MODEL_CONFIG`, else a
        Hugging Face checkpoint's config.json.
      mesh_shape: (data, model): inputs over 'data', parameters and caches
        over 'model' (`partitioning`); None uses every device on 'data' when
        there are several. batch_size must divide over 'data'. Multi-host:
        every host runs the job with the same flags and an output path all
        can read (a shared file system); each decodes its rows, process 0
        writes every record.

    Returns:
      The job's summary (printable).
    """
    start = time.perf_counter()
    lambdas = parse_lambdas(lambdas)
    _check_settings(batch_size, max_decode_len, inputs_length, seed, temperature, top_k, top_p)
    partitioner = _partitioner(mesh_shape, batch_size)
    if (input_file is None) == (split is None):
        raise ValueError("Pass exactly one input: --input_file=<file.jsonl> or --split=<split "
                         f"of --task={task}>.")
    vocabulary = tasks.get_task(task).output_features["inputs"].vocabulary
    if input_file is not None:
        prefix = tasks.PREFIX if add_prefix else ""
        inputs = read_jsonl_inputs(input_file, vocabulary, text_field=text_field,
                                   prefix=prefix, inputs_length=inputs_length)
        source = {"input_file": os.path.abspath(input_file), "text_field": text_field,
                  "prefix": prefix}
    else:
        inputs = read_task_inputs(task, split, inputs_length)
        source = {"split": split}
    model, params_ref, params_aligned = load_models(ref_checkpoint, aligned_checkpoint,
                                                    model_config)
    config = model.config
    vocabularies.check_vocab_fits(vocabulary, config.vocab_size)
    if vocabularies.model_vocab_size(vocabulary) != config.vocab_size:
        logging.warning("The vocabulary of task %s (%d pieces) looks too small for the model "
                        "(%d embeddings): is --task right (e.g. xsum_bundled_t5 for T5 "
                        "checkpoints)?", task, vocabulary.vocab_size, config.vocab_size)
    if top_k > config.vocab_size:
        raise ValueError(f"top_k={top_k} exceeds the vocabulary ({config.vocab_size}).")
    if partitioner is not None:
        partitioner = partitioning.Partitioner(mesh_shape, model.param_axes)

    num_inputs = len(inputs.texts)
    header = {
        "format": FORMAT, "ref_checkpoint": _checkpoint_id(ref_checkpoint),
        "aligned_checkpoint": _checkpoint_id(aligned_checkpoint),
        "model_config": dataclasses.asdict(config), "lambdas": list(lambdas), "seed": seed,
        "temperature": float(temperature), "top_k": top_k, "top_p": float(top_p),
        "max_decode_len": max_decode_len, "batch_size": batch_size, "task": task, **source,
        "inputs_length": inputs_length, "num_inputs": num_inputs,
        "inputs_sha256": hashlib.sha256(inputs.tokens.tobytes()).hexdigest(),
    }
    output = jsonl.ResumableOutput(output_file, header, lambdas, batch_size, num_inputs)
    done, offset = output.completed_inputs()
    summary = dict(output_file=output_file, num_inputs=num_inputs, num_lambdas=len(lambdas),
                   resumed_inputs=done, num_truncated=inputs.num_truncated,
                   inputs_length=inputs_length)
    if done == num_inputs:
        return Summary(**summary, seconds=time.perf_counter() - start)

    first_batch = done // batch_size
    num_batches = -(-num_inputs // batch_size)
    writer = jax.process_index() == 0
    sweeps = realign.sweep_batches(
        model, params_ref, params_aligned, inputs.tokens, lambdas, batch_size=batch_size,
        seed=seed, first_batch=first_batch, partitioner=partitioner,
        max_decode_len=max_decode_len, temperature=temperature, top_k=top_k, top_p=top_p)
    with contextlib.ExitStack() as stack:
        f = stack.enter_context(output.open(offset)) if writer else None
        progress = stack.enter_context(tqdm.tqdm(
            total=num_batches, initial=first_batch, unit="batch", desc="DeRa decoding",
            disable=not writer))
        for i, rows, out in sweeps:
            lines = []
            for row in rows:
                index = i * batch_size + int(row)
                for k, lam in enumerate(lambdas):
                    lines.append(_strict_line(
                        _record(index, inputs.texts[index], lam, out, k, int(row), vocabulary),
                        ref_checkpoint, aligned_checkpoint, i))
            if writer:
                output.write(f, lines)
            progress.update(1)
    return Summary(**summary, seconds=time.perf_counter() - start)


def _partitioner(mesh_shape: Sequence[int] | None, batch_size: int
                 ) -> partitioning.Partitioner | None:
    """Checks the mesh and the batch size against it (before any loading);
    the model's parameter rules are added once the model is known."""
    partitioner = partitioning.partitioner_for(mesh_shape)
    if partitioner is not None:
        partitioner.check_batch_size(batch_size)
    return partitioner


def _strict_line(record: dict[str, Any], ref_checkpoint: str, aligned_checkpoint: str,
                 batch: int) -> str:
    """The record as strict JSON; a non-finite log-prob stops the job (what was
    written so far stays)."""
    try:
        return jsonl.dumps(record)
    except ValueError:
        raise FloatingPointError(
            f"Non-finite log-probs in batch {batch} (input {record['index']}, lambda "
            f"{record['lambda']}): the checkpoints {ref_checkpoint} and {aligned_checkpoint} "
            "give NaN or infinite logits. The records of earlier batches are intact; check "
            "the checkpoints.") from None
