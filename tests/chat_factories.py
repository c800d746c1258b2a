"""Tiny chat checkpoints for tests: a byte-level BPE tokenizer trained on a few
sentences, chat templates, and random Mistral pairs written as Hugging Face
directories with their tokenizer."""

from __future__ import annotations

import functools
import json
import pathlib

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
import torch

import hf_factories

# Zephyr's template (alignment-handbook): no BOS; a generation prompt "<|assistant|>\n".
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
    "{% endfor %}")
# An [INST]-style template that writes the BOS itself and refuses roles that do
# not alternate (written for these tests).
INST_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Roles must alternate user / assistant, starting with user.') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] | trim + eos_token }}{% endif %}"
    "{% endfor %}")
# A ChatML-like template with tojson (which must not escape HTML).
TOJSON_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' }}"
    "{{ message['content'] | tojson }}\n{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")

SENTENCES = [
    "The cat sat on the mat.", "What is the capital of France?",
    "Tell me a story about a dragon.", "You are a friendly assistant.",
    "<|system|>\nYou are helpful.</s>\n<|user|>\nHello there</s>\n<|assistant|>\nHi! How can I "
    "help?</s>", "[INST] Write a poem. [/INST] Roses are red.</s>",
]
SPECIAL = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in Mistral's vocabulary
VOCAB = 320  # the models' vocabulary; the tokenizers use at most 300 ids


@functools.lru_cache(maxsize=4)
def tokenizer_json(vocab_size: int = 300) -> str:
    """A byte-level BPE tokenizer (BOS added to raw text) as tokenizer.json text."""
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(SENTENCES * 3, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                             special_tokens=[("<s>", 1)])
    return tokenizer.to_str()


def write_tokenizer(directory: str | pathlib.Path, *, template: str | None = ZEPHYR_TEMPLATE,
                    vocab_size: int = 300, tokenizer_text: str | None = None,
                    **config) -> pathlib.Path:
    """tokenizer.json and tokenizer_config.json (special tokens, the chat
    template, `config` entries) into `directory`."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(tokenizer_text or tokenizer_json(vocab_size))
    settings = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                "tokenizer_class": "PreTrainedTokenizerFast", **config}
    if template is not None:
        settings["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
    return directory


MISTRAL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8,
               max_position_embeddings=96, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
               sliding_window=None)


def write_chat_model(directory: str | pathlib.Path, seed: int, **tokenizer_kwargs
                     ) -> pathlib.Path:
    """A random tiny Mistral whose EOS logit swings widely (so samples end at
    varied steps) with the tiny tokenizer, as a Hugging Face directory."""
    model = hf_factories.random_causal_lm("mistral", seed=seed, **MISTRAL)
    with torch.no_grad():
        model.lm_head.weight[2] *= 6.0
    hf_factories.write_hf_dir(directory, model)
    return write_tokenizer(directory, **tokenizer_kwargs)


def linked_copy(source: pathlib.Path, target: pathlib.Path, *, without: tuple[str, ...] = ()
                ) -> pathlib.Path:
    """`target` holding symlinks to the files of `source`, except `without`."""
    target.mkdir(parents=True)
    for file in source.iterdir():
        if file.name not in without:
            (target / file.name).symlink_to(file.resolve())
    return target
