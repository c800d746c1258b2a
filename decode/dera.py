r"""Batch DeRa decoding: every input for every lambda, one JSON line each.

    python -m decode.dera --gin_file=gin/models/t5_tiny.gin \
        --gin_file=gin/runs/decode.gin \
        --ref_checkpoint=runs/sft_tiny/params --aligned_checkpoint=runs/rl_beta_8/params \
        --lambdas=0,0.5,1,2 --task=xsum_bundled --split=validation \
        --output_file=decoded.jsonl [--input_file=in.jsonl --text_field=document]

Decoder-only chat models (Hugging Face Llama / Mistral / Qwen2 directories
with their tokenizer), e.g. the paper's Zephyr pair (gin/runs/decode_zephyr.gin
names the checkpoints and the settings):

    python -m decode.dera --gin_file=gin/runs/decode_zephyr.gin \
        --gin.REF_CHECKPOINT="'/models/mistral-7b-sft-beta'" \
        --gin.ALIGNED_CHECKPOINT="'/models/zephyr-7b-beta'" \
        --input_file=chats.jsonl --output_file=decoded.jsonl

`--lambdas` with several values is the lambda sweep: all lambdas of a batch
share one encoder pass (T5) or prompt prefill (decoder-only). Checkpoints may
be our params dirs, Hugging Face directories (their config.json gives the
model; no model gin file needed) or T5X checkpoints. Flags left out take their
gin bindings (`decode_job.run.*`, defaults in gin/runs/decode.gin). Restarting
with the same --output_file resumes; see `dera_t5x.decode_job` for the input
and output formats.
"""

from typing import Sequence

from absl import flags

from dera_t5x import decode_job
from dera_t5x import gin_utils

_OUTPUT = flags.DEFINE_string("output_file", None, "JSON-lines output; resumed if it exists.",
                              required=True)
# Optional flags: when left out, gin (or decode_job.run's default) decides.
_OPTIONAL = {
    "ref_checkpoint": flags.DEFINE_string("ref_checkpoint", None,
                                          "The reference (SFT) model (or gin's binding)."),
    "aligned_checkpoint": flags.DEFINE_string("aligned_checkpoint", None,
                                              "The aligned (RL / DPO) model (or gin's)."),
    "lambdas": flags.DEFINE_string("lambdas", None, "Comma-separated lambdas, e.g. 0,0.5,1,2."),
    "input_file": flags.DEFINE_string("input_file", None, "JSON-lines input file."),
    "text_field": flags.DEFINE_string("text_field", None,
                                      "Field of --input_file with the text (raw prompt)."),
    "messages_field": flags.DEFINE_string(
        "messages_field", None, "Decoder-only: field of --input_file with chat messages."),
    "tokenizer_dir": flags.DEFINE_string(
        "tokenizer_dir", None, "Decoder-only: one tokenizer directory for both models."),
    "add_prefix": flags.DEFINE_boolean("add_prefix", None,
                                       "Prepend 'summarize: ' to --input_file texts."),
    "task": flags.DEFINE_string("task", None, "seqio task: vocabulary, and --split's data."),
    "split": flags.DEFINE_string("split", None, "Split of --task to decode."),
    "inputs_length": flags.DEFINE_integer(
        "inputs_length", None, "T5: encoder length (truncates); decoder-only: longest prompt."),
    "batch_size": flags.DEFINE_integer("batch_size", None, "Inputs per batch."),
    "max_decode_len": flags.DEFINE_integer("max_decode_len", None, "Max tokens, EOS included."),
    "temperature": flags.DEFINE_float("temperature", None, "Sampling temperature; 0 is greedy."),
    "top_k": flags.DEFINE_integer("top_k", None, "Top-k filter; 0 is off."),
    "top_p": flags.DEFINE_float("top_p", None, "Nucleus filter; 1.0 is off."),
    "seed": flags.DEFINE_integer("seed", None, "Sampling seed."),
}


def main(argv: Sequence[str]) -> None:
    del argv
    overrides = {name: flag.value for name, flag in _OPTIONAL.items() if flag.value is not None}
    summary = decode_job.run(output_file=_OUTPUT.value, **overrides)
    print(summary)


if __name__ == "__main__":
    gin_utils.run(main)
