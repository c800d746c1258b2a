"""The batch DeRa decoding job: inputs -> one JSON line per (input, lambda).

`run` (gin-configurable; the entry point is `decode/dera.py`) reads the
inputs (a JSON-lines file or a seqio task split), loads the reference and the
aligned checkpoints, and decodes every batch for all lambdas in one
`realign.dera_sweep` call, so each input is encoded once per model. The T5
data layer (TensorFlow, seqio) is imported only for T5 inputs: decoder-only
jobs run on machines without TensorFlow.

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

Decoder-only checkpoints (Hugging Face Llama / Mistral / Qwen2 directories)
bring their config (`config.json`) and their tokenizer (`tokenizer.json`,
`tokenizer_config.json`; `dera_t5x.text`); the two checkpoints' tokenizers
must agree. Each line of `input_file` holds either chat messages
(`messages_field`, default "messages": `[{"role": "system" | "user" |
"assistant", "content": "..."}, ...]`, rendered with the checkpoint's chat
template and its generation prompt) or a raw prompt (`text_field`, tokenized
with the special tokens the tokenizer adds). Prompts are never truncated: one
longer than `inputs_length` or than the model's positions minus
`max_decode_len` is an error naming the input. Batches are right-padded to
the longest prompt of the file (rounded up to a multiple of 8) with
`prompt_lengths`, whatever the tokenizer's padding side. Records have the
same fields; `input` is the prompt text (the rendered template for a chat)
and `text` the decoded new tokens without EOS. The header also records the
tokenizer (`dera_t5x.text.CheckpointTokenizer.fingerprint`), the input
fields, `chat_bos`, `param_dtype` and the prompt limit.

All user errors (settings, inputs, checkpoints, tokenizers, a foreign output
file) are raised before the first compile and before anything is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

from absl import logging
import gin
import jax
import numpy as np
import tqdm

from dera_t5x import checkpoints
from dera_t5x import gin_utils
from dera_t5x import jsonl
from dera_t5x import models
from dera_t5x import partitioning
from dera_t5x import realign
from dera_t5x import text as text_lib
from dera_t5x.models.decoder_only import hf as decoder_only_hf
from dera_t5x.models.decoder_only import network as decoder_only_network

if TYPE_CHECKING:
    import seqio

Params = Any
FORMAT = "dera_t5x.decode_job/1"
LOG_PROB_FIELDS = ("log_probs", "ref_log_probs", "aligned_log_probs", "mixed_log_probs")
PARAM_DTYPES = (None, "float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Inputs:
    """Tokenized job inputs.

    Attributes:
      texts: the model's input text per example (prefix included; for a chat
        the rendered template).
      tokens: T5: [num_inputs, inputs_length] int32, EOS-terminated, 0-padded;
        decoder-only: [num_inputs, width] int32 right-padded prompts.
      num_truncated: inputs cut to fit `inputs_length` (decoder-only: 0).
      prompt_lengths: decoder-only: [num_inputs] int32 prompt lengths; T5: None.
    """

    texts: tuple[str, ...]
    tokens: np.ndarray
    num_truncated: int
    prompt_lengths: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class Summary:
    """What a `run` did."""

    output_file: str
    num_inputs: int
    num_lambdas: int
    resumed_inputs: int
    num_truncated: int
    inputs_length: int | None
    seconds: float
    longest_prompt: int | None = None  # decoder-only (prompts are never truncated)

    def __str__(self) -> str:
        done = self.num_inputs - self.resumed_inputs
        lines = [f"{self.output_file}: {self.num_inputs} inputs x {self.num_lambdas} lambdas; "
                 f"decoded {done} inputs ({done * self.num_lambdas} lines) in "
                 f"{self.seconds:.1f} s."]
        if self.resumed_inputs:
            lines.append(f"Resumed: {self.resumed_inputs} inputs were already in the file.")
        if self.longest_prompt is not None:
            lines.append(f"Prompts: the longest has {self.longest_prompt} tokens (limit "
                         f"{self.inputs_length}); none is truncated.")
        else:
            lines.append(f"Inputs truncated to {self.inputs_length} tokens: "
                         f"{self.num_truncated} of {self.num_inputs}.")
        return "\n".join(lines)


def parse_lambdas(lambdas: str | Sequence[float] | None) -> tuple[float, ...]:
    """"0,0.5,1,2" (or a sequence of numbers) -> distinct finite floats, in order."""
    if lambdas is None:
        raise ValueError("No lambdas given. Fix: pass e.g. --lambdas=0,0.5,1,2 (or bind "
                         "decode_job.run.lambdas in a gin file).")
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
        if name == "inputs_length" and value is None:
            continue  # decoder-only: the model's positions are the only limit
        if not isinstance(value, int) or value < low:
            problems.append(f"{name} must be an integer >= {low}, got {value!r}")
    if not (math.isfinite(temperature) and temperature >= 0):
        problems.append(f"temperature must be >= 0 (0 is greedy), got {temperature!r}")
    if not 0.0 < top_p <= 1.0:
        problems.append(f"top_p must be in (0, 1] (1 turns it off), got {top_p!r}")
    if problems:
        raise ValueError("Bad decoding settings: " + "; ".join(problems) + ".")


def _data_layer():
    """(pipeline, tasks, vocabularies): the T5 data layer, imported on first use.

    It needs TensorFlow and seqio, which the accelerator machines lack; the
    decoder-only path (checkpoint tokenizers) never imports it.
    """
    from dera_t5x.data import pipeline  # noqa: PLC0415
    from dera_t5x.data import tasks  # noqa: PLC0415  (registers the tasks)
    from dera_t5x.data import vocabularies  # noqa: PLC0415
    return pipeline, tasks, vocabularies


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
    pipeline, _, _ = _data_layer()
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


def _inputs_digest(inputs: Inputs) -> str:
    """The header's `inputs_sha256`: the token ids (and prompt lengths) decoded."""
    lengths = b"" if inputs.prompt_lengths is None else inputs.prompt_lengths.tobytes()
    return hashlib.sha256(inputs.tokens.tobytes() + lengths).hexdigest()


def _checkpoint_id(spec: str) -> str:
    return spec if "://" in spec else os.path.abspath(spec)


def _record(index: int, text: str, lam: float, out: realign.DeraOutput, k: int, row: int,
            detokenize: Callable[[list[int]], str]) -> dict[str, Any]:
    length = int(out.lengths[k, row])
    token_ids = [int(t) for t in out.tokens[k, row, :length]]
    record = {"index": index, "input": text, "lambda": lam, "text": detokenize(token_ids),
              "token_ids": token_ids, "length": length}
    for name in LOG_PROB_FIELDS:
        record[name] = [float(x) for x in getattr(out, name)[k, row, :length]]
    return record


# ------------------------------------------------------------- decoder-only


def _hf_model_type(spec: str) -> str | None:
    """config.json's model_type of a Hugging Face directory; None for anything else."""
    if not _is_hf_dir(spec):
        return None
    try:
        return json.loads((pathlib.Path(spec) / "config.json").read_text()).get("model_type")
    except (json.JSONDecodeError, OSError, AttributeError):
        return None


def _is_decoder_only(ref_checkpoint: str, aligned_checkpoint: str, config: Any | None) -> bool:
    if config is not None:
        return isinstance(config, decoder_only_network.DecoderOnlyConfig)
    return any(_hf_model_type(spec) in decoder_only_hf.MODEL_TYPES
               for spec in (ref_checkpoint, aligned_checkpoint))


def _decoder_only_config(ref_checkpoint: str, aligned_checkpoint: str, model_config: Any | None
                         ) -> decoder_only_network.DecoderOnlyConfig:
    """The config.json of both checkpoints (cheap: no weights read), checked equal."""
    configs = []
    for what, spec in (("reference", ref_checkpoint), ("aligned", aligned_checkpoint)):
        if not _is_hf_dir(spec):
            raise FileNotFoundError(
                f"The {what} checkpoint {spec} is not a Hugging Face model directory (no "
                "config.json). Decoder-only checkpoints are read from Hugging Face directories "
                "(config.json, safetensors, tokenizer.json). Fix: pass such a directory (the "
                "recipes name them with the REF_CHECKPOINT / ALIGNED_CHECKPOINT gin macros).")
        path = pathlib.Path(spec)
        config_json = json.loads((path / "config.json").read_text())
        if config_json.get("model_type") not in decoder_only_hf.MODEL_TYPES:
            raise ValueError(f"The {what} checkpoint {spec} holds a "
                             f"{config_json.get('model_type')!r} model, the other a decoder-only "
                             "one: DeRa mixes two models of one architecture.")
        configs.append(decoder_only_hf.config_from_hf(config_json, path))
    named = [("the reference checkpoint", configs[0]), ("the aligned checkpoint", configs[1])]
    if model_config is not None:
        named.insert(0, ("the gin MODEL_CONFIG", model_config))
    first_name, first = named[0][0], dataclasses.asdict(named[0][1])
    for name, config in named[1:]:
        other = dataclasses.asdict(config)
        # dtype is the activations' dtype, a setting of the job (activation_dtype).
        differing = [f"{k}={other[k]!r} ({first_name}: {first[k]!r})" for k in first
                     if k != "dtype" and first[k] != other[k]]
        if differing:
            raise ValueError(f"The two models must share one architecture and vocabulary, but "
                             f"{name}'s config differs from {first_name}'s: "
                             f"{', '.join(differing)}.")
    return dataclasses.replace(configs[1], dtype=named[0][1].dtype)


def load_tokenizer(ref_checkpoint: str, aligned_checkpoint: str, tokenizer_dir: str | None, *,
                   chat: bool) -> text_lib.CheckpointTokenizer:
    """The job's tokenizer: `tokenizer_dir`'s, else the checkpoints' own, which
    must agree (the chat template too, when `chat`)."""
    if tokenizer_dir is not None:
        return text_lib.load(tokenizer_dir)
    ref, aligned = text_lib.load(ref_checkpoint), text_lib.load(aligned_checkpoint)
    differing = text_lib.differences(ref, aligned, chat=chat)
    if differing:
        raise ValueError(
            f"The tokenizers of {ref_checkpoint} and {aligned_checkpoint} differ in "
            f"{'; '.join(differing)}. DeRa mixes the two models' logits token by token, so "
            "both must read the same ids. Fix: give both checkpoints the same tokenizer files, "
            "or name one directory for both with decode_job.run.tokenizer_dir.")
    return aligned


def _prompt_limit(config: decoder_only_network.DecoderOnlyConfig, max_decode_len: int,
                  inputs_length: int | None) -> tuple[int, str]:
    """(the longest prompt allowed, why)."""
    positions = config.max_position_embeddings
    limit, reason = positions - max_decode_len, (
        f"the model's max_position_embeddings {positions} minus max_decode_len "
        f"{max_decode_len}")
    if limit < 1:
        raise ValueError(f"max_decode_len={max_decode_len} leaves no room for a prompt in the "
                         f"model's {positions} positions. Fix: lower max_decode_len.")
    if inputs_length is not None and inputs_length < limit:
        limit, reason = inputs_length, f"inputs_length {inputs_length}"
    return limit, reason


def load_decoder_only_models(ref_checkpoint: str, aligned_checkpoint: str,
                             config: decoder_only_network.DecoderOnlyConfig,
                             param_dtype: str | None) -> tuple[models.Model, Params, Params]:
    """(model, params_ref, params_aligned) of two Hugging Face directories."""
    params = []
    for spec in (ref_checkpoint, aligned_checkpoint):
        _, loaded = checkpoints.load_hf(spec, dtype=param_dtype)
        params.append(loaded)
    model = models.for_config(config)
    realign.check_compatible(model, *params)
    return model, params[0], params[1]


def _decoder_only_job(ref_checkpoint: str, aligned_checkpoint: str, *, input_file: str | None,
                      split: str | None, text_field: str, messages_field: str,
                      inputs_length: int | None, max_decode_len: int, top_k: int,
                      model_config: Any | None, param_dtype: str | None,
                      activation_dtype: str | None, tokenizer_dir: str | None, chat_bos: bool
                      ) -> tuple[models.Model, Params, Params, Inputs, dict[str, Any],
                                 Callable[[list[int]], str], int]:
    """Checks, tokenizer, prompts (all cheap, all errors first), then weights.

    Returns:
      (model, params_ref, params_aligned, inputs, header fields, detokenize,
      the prompt limit).
    """
    if split is not None or input_file is None:
        raise ValueError("Decoder-only checkpoints read prompts or chat messages from a "
                         "JSON-lines file: pass --input_file=<file.jsonl> (not --split).")
    for name, value in (("param_dtype", param_dtype), ("activation_dtype", activation_dtype)):
        if value not in PARAM_DTYPES:
            raise ValueError(f"{name} must be one of {list(PARAM_DTYPES)}, got {value!r}.")
    config = _decoder_only_config(ref_checkpoint, aligned_checkpoint, model_config)
    if activation_dtype is not None:
        config = dataclasses.replace(config, dtype=activation_dtype)
    if top_k > config.vocab_size:
        raise ValueError(f"top_k={top_k} exceeds the vocabulary ({config.vocab_size}).")
    limit, reason = _prompt_limit(config, max_decode_len, inputs_length)
    records = text_lib.read_jsonl(input_file)
    chat = bool(messages_field) and any(messages_field in record for _, record in records)
    tokenizer = load_tokenizer(ref_checkpoint, aligned_checkpoint, tokenizer_dir, chat=chat)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"The tokenizer of {tokenizer.path} has ids up to "
                         f"{tokenizer.vocab_size - 1}, beyond the model's vocab_size "
                         f"{config.vocab_size}: it is not this model's tokenizer.")
    prompts = text_lib.encode_prompts(
        input_file, records, tokenizer, text_field=text_field, messages_field=messages_field,
        chat_bos=chat_bos, limit=limit, limit_reason=reason)
    inputs = Inputs(prompts.texts, prompts.tokens, 0, prompts.lengths)
    model, params_ref, params_aligned = load_decoder_only_models(
        ref_checkpoint, aligned_checkpoint, config, param_dtype)
    eos_ids = set(model.eos_ids)

    def detokenize(token_ids: list[int]) -> str:
        if token_ids and token_ids[-1] in eos_ids:
            token_ids = token_ids[:-1]
        return tokenizer.decode(token_ids)

    header = {"input_file": os.path.abspath(input_file), "text_field": text_field,
              "messages_field": messages_field, "chat_bos": bool(chat_bos),
              "tokenizer": {"dir": os.path.abspath(tokenizer.path), **tokenizer.fingerprint()},
              "param_dtype": param_dtype, "prompt_limit": limit}
    return model, params_ref, params_aligned, inputs, header, detokenize, limit


# ------------------------------------------------------------------- the job


@gin.configurable(denylist=["output_file"])
def run(ref_checkpoint: str | None = None, aligned_checkpoint: str | None = None,
        output_file: str | None = None, *, lambdas: str | Sequence[float] | None = None,
        input_file: str | None = None, task: str = "xsum_bundled", split: str | None = None,
        text_field: str = "document", messages_field: str = "messages",
        add_prefix: bool = True, inputs_length: int | None = 512, batch_size: int = 16,
        max_decode_len: int = 64, temperature: float = 1.0, top_k: int = 0,
        top_p: float = 1.0, seed: int = 0, model_config: Any | None = None,
        mesh_shape: Sequence[int] | None = None, param_dtype: str | None = None,
        activation_dtype: str | None = None, tokenizer_dir: str | None = None,
        chat_bos: bool = True) -> Summary:
    """Decodes every input for every lambda into `output_file` (resumable).

    Args:
      ref_checkpoint, aligned_checkpoint: our orbax params dir, a Hugging Face
        directory (T5, or a decoder-only Llama / Mistral / Qwen2 with its
        tokenizer) or a T5X checkpoint (`checkpoints.load_params`). Gin may
        bind them (the recipes use macros the user overrides).
      output_file: the JSON-lines output (see the module docstring); an
        existing file of the same job is resumed.
      lambdas: "0,0.5,1,2" or a sequence; distinct finite values.
      input_file: a JSON-lines file; or None to read `split` of `task` (T5).
      task: T5: the seqio task whose vocabulary tokenizes and detokenizes (and
        whose split is read when `split` is given). Decoder-only models use
        their checkpoint's tokenizer instead.
      split: the task split to decode (instead of `input_file`; T5 only).
      text_field: the field of `input_file` with the text (T5) or the raw
        prompt (decoder-only).
      messages_field: decoder-only: the field with chat messages; a record
        holding it is a chat, rendered with the chat template ('' reads only
        raw prompts).
      add_prefix: T5: prepend `tasks.PREFIX` ("summarize: ") to file inputs,
        as the tasks do.
      inputs_length: T5: the encoder length; longer inputs are truncated and
        counted. Decoder-only: the longest prompt allowed (None: the model's
        positions minus max_decode_len, which also always applies); a longer
        one is an error, never truncated.
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
      param_dtype: decoder-only: the parameters' dtype ('bfloat16' fits a 7B
        pair on one accelerator); None keeps float32.
      activation_dtype: decoder-only: the activations' and decode caches'
        dtype (`DecoderOnlyConfig.dtype`; 'bfloat16' on accelerators); None
        keeps float32. Logits are mixed in float32 either way.
      tokenizer_dir: decoder-only: a directory whose tokenizer both models
        use; None reads each checkpoint's own (they must agree).
      chat_bos: decoder-only: prepend the tokenizer's BOS to a rendered chat
        that does not start with it (Zephyr's template writes none); never a
        second BOS.

    Returns:
      The job's summary (printable).
    """
    start = time.perf_counter()
    if not ref_checkpoint or not aligned_checkpoint or not output_file:
        raise ValueError("Pass --ref_checkpoint, --aligned_checkpoint and --output_file (or "
                         "bind the checkpoints in gin: the recipes take them from the "
                         "REF_CHECKPOINT and ALIGNED_CHECKPOINT macros).")
    lambdas = parse_lambdas(lambdas)
    _check_settings(batch_size, max_decode_len, inputs_length, seed, temperature, top_k, top_p)
    partitioner = _partitioner(mesh_shape, batch_size)
    config = model_config or gin_utils.model_config(required=False)
    header = {"format": FORMAT, "ref_checkpoint": _checkpoint_id(ref_checkpoint),
              "aligned_checkpoint": _checkpoint_id(aligned_checkpoint)}
    if _is_decoder_only(ref_checkpoint, aligned_checkpoint, config):
        model, params_ref, params_aligned, inputs, source, detokenize, limit = \
            _decoder_only_job(ref_checkpoint, aligned_checkpoint, input_file=input_file,
                              split=split, text_field=text_field, messages_field=messages_field,
                              inputs_length=inputs_length, max_decode_len=max_decode_len,
                              top_k=top_k, model_config=config, param_dtype=param_dtype,
                              activation_dtype=activation_dtype, tokenizer_dir=tokenizer_dir,
                              chat_bos=chat_bos)
        extra = {}
        summary_extra = {"inputs_length": limit,
                         "longest_prompt": int(np.max(inputs.prompt_lengths))}
    else:
        model, params_ref, params_aligned, inputs, source, detokenize = _t5_job(
            ref_checkpoint, aligned_checkpoint, input_file=input_file, task=task, split=split,
            text_field=text_field, add_prefix=add_prefix, inputs_length=inputs_length,
            top_k=top_k, model_config=model_config,
            dtypes={"param_dtype": param_dtype, "activation_dtype": activation_dtype})
        extra = {"task": task}
        summary_extra = {"inputs_length": inputs_length}
    if partitioner is not None:
        partitioner = partitioning.Partitioner(mesh_shape, model.param_axes)

    num_inputs = len(inputs.texts)
    header.update({
        "model_config": dataclasses.asdict(model.config), "lambdas": list(lambdas),
        "seed": seed, "temperature": float(temperature), "top_k": top_k,
        "top_p": float(top_p), "max_decode_len": max_decode_len, "batch_size": batch_size,
        **extra, **source, "inputs_length": inputs_length, "num_inputs": num_inputs,
        "inputs_sha256": _inputs_digest(inputs),
    })
    output = jsonl.ResumableOutput(output_file, header, lambdas, batch_size, num_inputs)
    done, offset = output.completed_inputs()
    summary = dict(output_file=output_file, num_inputs=num_inputs, num_lambdas=len(lambdas),
                   resumed_inputs=done, num_truncated=inputs.num_truncated, **summary_extra)
    if done == num_inputs:
        return Summary(**summary, seconds=time.perf_counter() - start)

    first_batch = done // batch_size
    num_batches = -(-num_inputs // batch_size)
    writer = jax.process_index() == 0
    sweeps = realign.sweep_batches(
        model, params_ref, params_aligned, inputs.tokens, lambdas, batch_size=batch_size,
        seed=seed, first_batch=first_batch, prompt_lengths=inputs.prompt_lengths,
        partitioner=partitioner, max_decode_len=max_decode_len, temperature=temperature,
        top_k=top_k, top_p=top_p)
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
                        _record(index, inputs.texts[index], lam, out, k, int(row), detokenize),
                        ref_checkpoint, aligned_checkpoint, i))
            if writer:
                output.write(f, lines)
            progress.update(1)
    return Summary(**summary, seconds=time.perf_counter() - start)


def _t5_job(ref_checkpoint: str, aligned_checkpoint: str, *, input_file: str | None, task: str,
            split: str | None, text_field: str, add_prefix: bool, inputs_length: int | None,
            top_k: int, model_config: Any | None, dtypes: dict[str, str | None]
            ) -> tuple[models.Model, Params, Params, Inputs, dict[str, Any],
                       Callable[[list[int]], str]]:
    """T5 inputs through the task's vocabulary, then the checkpoints."""
    if (input_file is None) == (split is None):
        raise ValueError("Pass exactly one input: --input_file=<file.jsonl> or --split=<split "
                         f"of --task={task}>.")
    for name, value in dtypes.items():
        if value is not None:
            raise ValueError(f"{name}={value!r} applies to decoder-only Hugging Face "
                             "checkpoints; T5 runs in float32. Fix: leave it unset.")
    if inputs_length is None:
        raise ValueError("T5 inputs need an encoder length: set inputs_length (e.g. 512).")
    _, tasks, vocabularies = _data_layer()
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

    def detokenize(token_ids: list[int]) -> str:
        return vocabularies.detokenize(vocabulary, [token_ids])[0]

    return model, params_ref, params_aligned, inputs, source, detokenize


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


# ------------------------------------------------------- reading an output


def read_output(output_file: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(header, records) of a finished job's output file, records in file order.

    Raises:
      FileNotFoundError: no such file.
      ValueError: not a decode job's output, a damaged line, or an unfinished
        job (the message says how far it got and how to finish it).
    """
    if not os.path.isfile(output_file):
        raise FileNotFoundError(f"No decode job output at {output_file}. Fix: run the decode "
                                "job (python -m decode.dera ... --output_file=...) first.")
    with open(output_file, encoding="utf-8") as f:
        first = f.readline()
    try:
        header = json.loads(first)["header"]
        grid = (header["lambdas"], header["batch_size"], header["num_inputs"])
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"{output_file} is not the output of a decode job (no header "
                         "line).") from None
    if header.get("format") != FORMAT:
        raise ValueError(f"{output_file} has format {header.get('format')!r}; this version "
                         f"reads {FORMAT!r}. Fix: decode again with this version.")
    output = jsonl.ResumableOutput(output_file, header, *grid)
    done, offset = output.completed_inputs()  # checks every line's place in the grid
    if done < header["num_inputs"]:
        raise ValueError(f"{output_file} is unfinished: {done} of {header['num_inputs']} "
                         "inputs were decoded. Fix: rerun the decode job with the same flags; "
                         "it resumes and finishes the file.")
    with open(output_file, "rb") as f:
        lines = f.read()[:offset].decode("utf-8").splitlines()
    return header, [json.loads(line) for line in lines[1:]]


def job_inputs(header: dict[str, Any]) -> Inputs:
    """The inputs a job decoded, read again from its header's source (input file
    or task split, tokenizer, lengths) and checked against `inputs_sha256`.

    Raises:
      ValueError: the inputs read now differ from those decoded (the input
        file or the tokenizer changed since).
    """
    if "tokenizer" in header:  # decoder-only
        tokenizer = text_lib.load(header["tokenizer"]["dir"])
        records = text_lib.read_jsonl(header["input_file"])
        prompts = text_lib.encode_prompts(
            header["input_file"], records, tokenizer, text_field=header["text_field"],
            messages_field=header["messages_field"], chat_bos=header["chat_bos"],
            limit=header["prompt_limit"])
        inputs = Inputs(prompts.texts, prompts.tokens, 0, prompts.lengths)
    elif "split" in header:
        inputs = read_task_inputs(header["task"], header["split"], header["inputs_length"])
    else:
        _, tasks, _ = _data_layer()
        vocabulary = tasks.get_task(header["task"]).output_features["inputs"].vocabulary
        inputs = read_jsonl_inputs(header["input_file"], vocabulary,
                                   text_field=header["text_field"], prefix=header["prefix"],
                                   inputs_length=header["inputs_length"])
    if _inputs_digest(inputs) != header["inputs_sha256"]:
        source = header.get("input_file") or f"{header['task']} {header['split']}"
        raise ValueError(f"The inputs read now from {source} differ from those the job decoded "
                         "(their SHA-256 is not the header's): the file or the tokenizer "
                         "changed since. Fix: decode again, or restore the inputs it read.")
    return inputs
