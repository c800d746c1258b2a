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

import dataclasses
import hashlib
import json
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
from dera_t5x import models
from dera_t5x import network
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
        ids = ids[:inputs_length - 1] + [models.EOS_ID]
        tokens[row, :len(ids)] = ids
    return Inputs(tuple(texts), tokens, num_truncated)


def read_jsonl_inputs(path: str, vocabulary: seqio.Vocabulary, *, text_field: str,
                      prefix: str, inputs_length: int) -> Inputs:
    """Inputs from a JSON-lines file (blank lines skipped), `prefix` + `text_field`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Input file not found: {path}. Fix: pass the path of an "
                                "existing JSON-lines file as --input_file.")
    texts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {number} is not valid JSON ({e}).") from e
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                fields = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"{path}: line {number} has no string field {text_field!r} "
                                 f"(has {fields}). Fix: pass --text_field=<the field holding "
                                 "the input text>.")
            texts.append(prefix + record[text_field])
    if not texts:
        raise ValueError(f"{path}: the input file is empty. Fix: give one JSON object per line.")
    return _encode(vocabulary, texts, inputs_length)


def read_task_inputs(task_name: str, split: str, inputs_length: int) -> Inputs:
    """Inputs of a seqio task split (`pipeline.load_split`)."""
    # The targets length is irrelevant here; 2 is the smallest load_split accepts.
    data = pipeline.load_split(task_name, split, {"inputs": inputs_length, "targets": 2})
    return Inputs(data.texts["inputs"], np.asarray(data.features["encoder_input_tokens"]),
                  data.num_truncated["inputs"])


def _is_hf_dir(spec: str) -> bool:
    return not spec.startswith("gs://") and (pathlib.Path(spec) / "config.json").exists()


def _gin_model_config() -> network.T5Config | None:
    """The `MODEL_CONFIG` gin macro, if a model gin file bound it."""
    try:
        value = gin.query_parameter("%MODEL_CONFIG")
    except ValueError:
        return None
    if isinstance(value, gin.config.ConfigurableReference):
        value = value.scoped_configurable_fn()
    if not isinstance(value, network.T5Config):
        raise ValueError(f"The gin macro MODEL_CONFIG must be a network.T5Config, got {value!r}.")
    return value


def load_models(ref_checkpoint: str, aligned_checkpoint: str,
                model_config: network.T5Config | None) -> tuple[network.T5Config, Params, Params]:
    """(config, params_ref, params_aligned), checked compatible.

    The config is `model_config` if given, else gin's `MODEL_CONFIG`, else
    the `config.json` of whichever checkpoint is a Hugging Face directory.
    """
    config = model_config or _gin_model_config()
    loaded: dict[str, Params] = {}
    if config is None:
        hf = [spec for spec in (ref_checkpoint, aligned_checkpoint) if _is_hf_dir(spec)]
        if not hf:
            raise ValueError(
                "No model config: pass the model's gin file (e.g. --gin_file=gin/models/"
                "t5_tiny.gin, which binds MODEL_CONFIG), or use a Hugging Face T5 directory "
                "(with config.json) as a checkpoint.")
        config, loaded[hf[0]] = checkpoints.load_hf_t5(hf[0])
    params = [loaded[spec] if spec in loaded else checkpoints.load_params(spec, config)
              for spec in (ref_checkpoint, aligned_checkpoint)]
    realign.check_compatible(config, *params)
    return config, params[0], params[1]


def _checkpoint_id(spec: str) -> str:
    return spec if "://" in spec else os.path.abspath(spec)


def _record(index: int, text: str, lam: float, out: realign.DeraOutput, k: int, row: int,
            vocabulary: seqio.Vocabulary) -> dict[str, Any]:
    length = int(out.lengths[k, row])
    token_ids = [int(t) for t in out.tokens[k, row, :length]]
    record = {"index": index, "input": text, "lambda": lam,
              "text": vocabulary.decode(token_ids), "token_ids": token_ids, "length": length}
    for name in LOG_PROB_FIELDS:
        record[name] = [float(x) for x in getattr(out, name)[k, row, :length]]
    return record


class _OutputFile:
    """The append-only output file and its resume logic."""

    def __init__(self, path: str, header: dict[str, Any], lambdas: Sequence[float],
                 batch_size: int, num_inputs: int):
        self.path = path
        self.header = json.loads(json.dumps(header))  # as it reads back from the file
        self.lambdas = list(lambdas)
        self.batch_size = batch_size
        self.num_inputs = num_inputs

    def _foreign(self, what: str) -> ValueError:
        return ValueError(f"{self.path} {what}. Nothing was written. Fix: pass a new "
                          "--output_file, or delete this file to start over.")

    def completed_inputs(self) -> tuple[int, int]:
        """Checks an existing file against this job, without changing it.

        Returns:
          (inputs done, byte offset where they end); (0, -1) if there is no
          file yet (or it is empty).
        """
        if not os.path.exists(self.path) or os.path.getsize(self.path) == 0:
            return 0, -1
        with open(self.path, "rb") as f:
            lines = f.read().split(b"\n")
        complete = lines[:-1]  # the last piece is empty or a partial line
        try:
            header = json.loads(complete[0])["header"] if complete else None
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            header = None
        if not isinstance(header, dict):
            raise self._foreign("exists but is not the output of a decode job (no header line)")
        differing = sorted(k for k in set(header) | set(self.header)
                           if header.get(k) != self.header.get(k))
        if differing:
            details = "; ".join(f"{k}: {header.get(k)!r} in the file, {self.header.get(k)!r} now"
                                for k in differing)
            raise self._foreign(f"holds the output of a job with other settings ({details})")
        records = complete[1:]
        k = len(self.lambdas)
        if len(records) > self.num_inputs * k:
            raise self._foreign(f"has {len(records)} lines, more than this job writes "
                                f"({self.num_inputs} x {k})")
        for n, line in enumerate(records):
            try:
                record = json.loads(line)
                ok = (record["index"] == n // k and record["lambda"] == self.lambdas[n % k])
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                ok = False
            if not ok:
                raise self._foreign(f"line {n + 2} is not the expected line of this job "
                                    f"(input {n // k}, lambda {self.lambdas[n % k]})")
        if len(records) == self.num_inputs * k:
            done = self.num_inputs
        else:  # Only whole batches count: batch i's samples depend on its rows and i.
            done = len(records) // (k * self.batch_size) * self.batch_size
        offset = sum(len(line) + 1 for line in complete[:1 + done * k])
        return done, offset

    def open(self, offset: int):
        """Opens for appending after `offset` (writing the header if -1)."""
        if offset < 0:
            parent = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(parent, exist_ok=True)
            f = open(self.path, "w", encoding="utf-8")
            self.write(f, [json.dumps({"header": self.header}, ensure_ascii=False)])
            return f
        if offset < os.path.getsize(self.path):
            logging.info("Dropping %d bytes of an unfinished batch from %s.",
                         os.path.getsize(self.path) - offset, self.path)
            os.truncate(self.path, offset)
        return open(self.path, "a", encoding="utf-8")

    @staticmethod
    def write(f, lines: Sequence[str]) -> None:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())


@gin.configurable(denylist=["ref_checkpoint", "aligned_checkpoint", "output_file"])
def run(ref_checkpoint: str, aligned_checkpoint: str, output_file: str, *,
        lambdas: str | Sequence[float], input_file: str | None = None,
        task: str = "xsum_bundled", split: str | None = None, text_field: str = "document",
        add_prefix: bool = True, inputs_length: int = 512, batch_size: int = 16,
        max_decode_len: int = 64, temperature: float = 1.0, top_k: int = 0,
        top_p: float = 1.0, seed: int = 0,
        model_config: network.T5Config | None = None) -> Summary:
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

    Returns:
      The job's summary (printable).
    """
    start = time.perf_counter()
    lambdas = parse_lambdas(lambdas)
    _check_settings(batch_size, max_decode_len, inputs_length, seed, temperature, top_k, top_p)
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
    config, params_ref, params_aligned = load_models(ref_checkpoint, aligned_checkpoint,
                                                     model_config)
    vocabularies.check_vocab_fits(vocabulary, config.vocab_size)
    if vocabularies.model_vocab_size(vocabulary) != config.vocab_size:
        logging.warning("The vocabulary of task %s (%d pieces) looks too small for the model "
                        "(%d embeddings): is --task right (e.g. xsum_bundled_t5 for T5 "
                        "checkpoints)?", task, vocabulary.vocab_size, config.vocab_size)
    if top_k > config.vocab_size:
        raise ValueError(f"top_k={top_k} exceeds the vocabulary ({config.vocab_size}).")

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
    output = _OutputFile(output_file, header, lambdas, batch_size, num_inputs)
    done, offset = output.completed_inputs()
    summary = dict(output_file=output_file, num_inputs=num_inputs, num_lambdas=len(lambdas),
                   resumed_inputs=done, num_truncated=inputs.num_truncated,
                   inputs_length=inputs_length)
    if done == num_inputs:
        return Summary(**summary, seconds=time.perf_counter() - start)

    model = models.EncoderDecoderModel(config)
    params_ref, params_aligned = jax.device_put((params_ref, params_aligned))
    key = jax.random.PRNGKey(seed)
    first_batch = done // batch_size
    num_batches = -(-num_inputs // batch_size)
    lambdas_array = np.asarray(lambdas, np.float32)
    batches = pipeline.eval_batches({"encoder_input_tokens": inputs.tokens[done:]}, batch_size)
    with output.open(offset) as f, tqdm.tqdm(total=num_batches, initial=first_batch,
                                             unit="batch", desc="DeRa decoding") as progress:
        for i, (batch, mask) in enumerate(batches, start=first_batch):
            out = realign.dera_sweep(
                model, params_ref, params_aligned, batch["encoder_input_tokens"],
                lambdas_array, max_decode_len=max_decode_len, rng=jax.random.fold_in(key, i),
                temperature=temperature, top_k=top_k, top_p=top_p)
            out = jax.device_get(out)
            lines = []
            for row in np.flatnonzero(mask):
                index = i * batch_size + int(row)
                for k, lam in enumerate(lambdas):
                    record = _record(index, inputs.texts[index], lam, out, k, int(row),
                                     vocabulary)
                    lines.append(json.dumps(record, ensure_ascii=False))
            output.write(f, lines)
            progress.update(1)
    return Summary(**summary, seconds=time.perf_counter() - start)
