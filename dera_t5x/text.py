"""Tokenizers and chat templates of Hugging Face checkpoints, read offline.

A decoder-only checkpoint directory brings its own tokenizer:

* `tokenizer.json`: the fast tokenizer, read with the `tokenizers` library
  (its stored truncation and padding are switched off: the decode job pads
  its batches itself and never truncates a prompt);
* `tokenizer_config.json`: the special tokens (`bos_token`, `eos_token`, ...,
  as strings or as AddedToken objects) and the chat template; a
  `chat_template.jinja` file beside it, which transformers 5 writes, takes
  precedence over the config's template.

Raw prompts are tokenized with the special tokens the tokenizer adds: those
of `tokenizer.json`'s post-processor, as transformers 5 does (it, too, leaves
the post-processor alone whatever `add_bos_token` / `add_eos_token` say).

Chat conversations `[{"role": ..., "content": ...}, ...]` are rendered with
the checkpoint's chat template the way transformers' `apply_chat_template`
renders it (jinja2's immutable sandbox, `trim_blocks` and `lstrip_blocks`,
the `loopcontrols` extension, a `tojson` filter that does not escape HTML,
`raise_exception`, the special tokens as variables, `add_generation_prompt`
true) and tokenized *without* adding special tokens: a template that writes
`{{ bos_token }}` gets no second BOS. Zephyr's template writes none, while its
models were trained on chats the tokenizer had prefixed with BOS; `add_bos`
(the decode job's `chat_bos`, on by default) prepends the tokenizer's BOS
to a rendered chat that does not already start with it, and only when the
tokenizer adds a BOS to raw text. `strftime_now` is deliberately absent, so
templates fall back to their fixed date and a prompt never depends on the
day a job runs (a resumed job re-tokenizes its inputs and must get the same
ids).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np
import tokenizers

from dera_t5x import jsonl

ROLES = ("system", "user", "assistant")
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token",
                       "cls_token", "mask_token")
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
# Fields of tokenizer.json that only set up batching; they do not change ids.
_BATCHING_FIELDS = ("truncation", "padding")
# Prompt batches are padded to the longest prompt rounded up to this.
PAD_MULTIPLE = 8


def _token_string(value: Any, where: str, name: str) -> str | None:
    """A special token of tokenizer_config.json: a string, an AddedToken dict or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{where}: {name} is {value!r}, not a string or an AddedToken object "
                     "with a 'content' string.")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def compile_template(source: str) -> jinja2.Template:
    """A chat template compiled in jinja2's immutable sandbox with the
    settings and helpers transformers gives templates (see the module docstring)."""
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    return environment.from_string(source)


def _pick_template(value: Any, where: str) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of named
    templates (the one named 'default' is the chat template)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {item.get("name"): item.get("template") for item in value
                 if isinstance(item, Mapping)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ValueError(f"{where}: chat_template lists templates {sorted(map(str, named))} "
                         "but none named 'default'.")
    raise ValueError(f"{where}: chat_template is {type(value).__name__}, not a string or a "
                     "list of named templates.")


def check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """A chat conversation, checked: a non-empty list of {"role", "content"}
    objects, roles system / user / assistant, string contents, not all empty.

    Args:
      where: names the input in errors, e.g. "in.jsonl line 3".

    Returns:
      The messages as plain dicts holding only role and content.
    """
    fix = ("Fix: give a list of {\"role\": \"system\" | \"user\" | \"assistant\", "
           "\"content\": \"...\"} objects.")
    if not isinstance(messages, list):
        raise ValueError(f"{where}: the messages are {type(messages).__name__}, not a list. "
                         + fix)
    if not messages:
        raise ValueError(f"{where}: the conversation is empty (no messages), an empty prompt. "
                         + fix)
    checked = []
    for number, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"{where}: message {number} is not an object. " + fix)
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"{where}: message {number} has the unknown role {role!r}; the "
                             f"roles are {', '.join(ROLES)}. " + fix)
        if not isinstance(content, str):
            raise ValueError(f"{where}: message {number} ({role}) has no string 'content'. "
                             + fix)
        checked.append({"role": role, "content": content})
    if not any(m["content"].strip() for m in checked):
        raise ValueError(f"{where}: every message is empty, an empty prompt. " + fix)
    return checked


class CheckpointTokenizer:
    """The tokenizer, special tokens and chat template of one checkpoint directory.

    Attributes:
      path: the checkpoint (or tokenizer) directory.
      tokenizer: the `tokenizers.Tokenizer` (no truncation, no padding).
      special_tokens: {"bos_token": "<s>", ...}, the named special tokens
        tokenizer_config.json sets (the chat template's variables).
      chat_template: the template source, or None.
    """

    def __init__(self, path: str | pathlib.Path):
        path = pathlib.Path(path)
        file = path / TOKENIZER_FILE
        if not file.is_file():
            raise FileNotFoundError(
                f"{path} has no {TOKENIZER_FILE}: a decoder-only checkpoint must bring its "
                "tokenizer (the fast tokenizer that transformers saves). Fix: save it beside the "
                "weights, e.g. transformers.AutoTokenizer.from_pretrained(<model id or dir>)"
                f".save_pretrained('{path}'), or point the job at a directory holding it "
                "(decode_job.run.tokenizer_dir).")
        self.path = path
        self._tokenizer_json = file.read_bytes()
        try:
            self.tokenizer = tokenizers.Tokenizer.from_str(self._tokenizer_json.decode("utf-8"))
        except Exception as error:  # the library raises plain Exceptions for bad files
            raise ValueError(f"{file} is not a tokenizer the `tokenizers` library reads: "
                             f"{error}") from None
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        config_file = path / CONFIG_FILE
        config = {}
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as error:
                raise ValueError(f"{config_file} is not valid JSON ({error}).") from None
            if not isinstance(config, dict):
                raise ValueError(f"{config_file} does not hold a JSON object.")
        where = str(config_file)
        self.special_tokens = {}
        for name in SPECIAL_TOKEN_NAMES:
            value = _token_string(config.get(name), where, name)
            if value is not None:
                self.special_tokens[name] = value
        template_file = path / TEMPLATE_FILE
        if template_file.is_file():
            self.chat_template = template_file.read_text(encoding="utf-8")
            self._template_source = str(template_file)
        else:
            self.chat_template = _pick_template(config.get("chat_template"), where)
            self._template_source = where
        self._compiled = None
        for name in ("bos_token", "eos_token"):
            token = self.special_tokens.get(name)
            if token is not None and self.tokenizer.token_to_id(token) is None:
                raise ValueError(f"{where}: {name} {token!r} is not in {file}'s vocabulary.")
        self.bos_id = self._id("bos_token")
        self.eos_id = self._id("eos_token")

    def _id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        """One more than the largest id the tokenizer can produce (added tokens included)."""
        return max(self.tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    def encode_text(self, text: str) -> list[int]:
        """A raw prompt's ids, with the special tokens the tokenizer adds."""
        return list(self.tokenizer.encode(text, add_special_tokens=True).ids)

    @property
    def adds_bos(self) -> bool:
        """Whether raw text gets a BOS from this tokenizer."""
        if self.bos_id is None:
            return False
        ids = self.tokenizer.encode("a", add_special_tokens=True).ids
        return bool(ids) and ids[0] == self.bos_id

    def render_chat(self, messages: Sequence[Mapping[str, str]], where: str) -> str:
        """The chat template's text for `messages` with the generation prompt.

        Raises:
          ValueError: no chat template, or the template refused the
            conversation (`raise_exception`, e.g. roles that do not alternate).
        """
        if self.chat_template is None:
            raise ValueError(
                f"{where}: chat messages need a chat template, and {self.path} has none (no "
                f"{TEMPLATE_FILE} and no chat_template in {CONFIG_FILE}). Fix: add the "
                "model's template, or give raw prompts (decode_job.run.text_field, with "
                "messages_field='').")
        if self._compiled is None:
            try:
                self._compiled = compile_template(self.chat_template)
            except jinja2.TemplateSyntaxError as error:
                raise ValueError(f"The chat template of {self._template_source} does not "
                                 f"compile: {error}") from None
        try:
            return self._compiled.render(messages=list(messages), add_generation_prompt=True,
                                         tools=None, documents=None, **self.special_tokens)
        except jinja2.TemplateError as error:
            raise ValueError(f"{where}: the chat template of {self._template_source} refused "
                             f"this conversation: {error}") from None

    def encode_chat(self, messages: Sequence[Mapping[str, str]], where: str, *,
                    add_bos: bool = True) -> tuple[str, list[int]]:
        """(rendered text, ids) of a chat: the template's text tokenized without
        adding special tokens, with the tokenizer's BOS in front when `add_bos`,
        the tokenizer adds one to raw text and the template did not write it."""
        text = self.render_chat(messages, where)
        ids = list(self.tokenizer.encode(text, add_special_tokens=False).ids)
        if add_bos and self.adds_bos and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return text, ids

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids` (special tokens kept: the caller drops the EOS)."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def fingerprint(self) -> dict[str, Any]:
        """What determines the ids of a prompt and the text of ids: for job
        headers and for comparing two checkpoints' tokenizers."""
        tokenizer_json = json.loads(self._tokenizer_json)
        for field in _BATCHING_FIELDS:
            tokenizer_json.pop(field, None)
        canonical = json.dumps(tokenizer_json, sort_keys=True, ensure_ascii=False)
        template = self.chat_template
        return {
            "tokenizer_json_sha256": hashlib.sha256(canonical.encode("utf-8")).hexdigest(),
            "special_tokens": dict(sorted(self.special_tokens.items())),
            "chat_template_sha256": (None if template is None else
                                     hashlib.sha256(template.encode("utf-8")).hexdigest()),
        }


def load(path: str | pathlib.Path) -> CheckpointTokenizer:
    """The tokenizer of a checkpoint directory (see `CheckpointTokenizer`)."""
    return CheckpointTokenizer(path)


def differences(a: CheckpointTokenizer, b: CheckpointTokenizer, *,
                chat: bool) -> list[str]:
    """What differs between two tokenizers (the chat template only if `chat`)."""
    fa, fb = a.fingerprint(), b.fingerprint()
    names = {"tokenizer_json_sha256": f"{TOKENIZER_FILE} (vocabulary, merges, normalizer, "
                                      "pre-tokenizer or added tokens)",
             "special_tokens": "special tokens", "chat_template_sha256": "chat template"}
    found = []
    for key, what in names.items():
        if key == "chat_template_sha256" and not chat:
            continue
        if fa[key] != fb[key]:
            detail = "" if key.endswith("sha256") else f" ({fa[key]!r} vs {fb[key]!r})"
            found.append(what + detail)
    return found


# ------------------------------------------------------------------ prompts


@dataclasses.dataclass(frozen=True)
class Prompts:
    """Tokenized prompts of a decoder-only job.

    Attributes:
      texts: the prompt text per input (a chat's rendered template).
      tokens: [num_inputs, width] int32 right-padded prompts (0 after the end).
      lengths: [num_inputs] int32 prompt lengths (>= 1).
    """

    texts: tuple[str, ...]
    tokens: np.ndarray
    lengths: np.ndarray


def read_jsonl(path: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, JSON object) of every non-blank line of `path`.

    Raises:
      FileNotFoundError: no such file. ValueError: a line that is not a JSON
        object, or no records at all.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Input file not found: {path}. Fix: pass the path of an "
                                "existing JSON-lines file.")
    with open(path, encoding="utf-8") as f:
        records = [(number, jsonl.parse_line(path, number, line, ()))
                   for number, line in enumerate(f, start=1) if line.strip()]
    if not records:
        raise ValueError(f"{path}: the file is empty (no input records). Fix: give a JSON-lines "
                         "file with one object per line.")
    return records


def encode_prompts(path: str, records: Sequence[tuple[int, Mapping[str, Any]]],
                   tokenizer: CheckpointTokenizer, *, text_field: str, messages_field: str,
                   chat_bos: bool, limit: int, limit_reason: str = "the limit") -> Prompts:
    """Right-padded prompts of `read_jsonl` records.

    A record holding `messages_field` (unless that is '') is a chat, rendered
    with the chat template (`CheckpointTokenizer.encode_chat`); any other
    needs a raw prompt in `text_field` (`encode_text`). The width is the
    longest prompt rounded up to a multiple of `PAD_MULTIPLE`, at most
    `limit`; padding is 0 (never read: `lengths` marks the real tokens).

    Raises:
      ValueError: an unknown chat role, an empty prompt, a template error or a
        prompt over `limit` tokens (never truncated), each naming the input.
    """
    texts, rows = [], []
    for index, (line, record) in enumerate(records):
        where = f"Input {index} ({path} line {line})"
        if messages_field and messages_field in record:
            messages = check_messages(record[messages_field], where)
            text, ids = tokenizer.encode_chat(messages, where, add_bos=chat_bos)
        elif isinstance(record.get(text_field), str):
            text = record[text_field]
            if not text.strip():
                raise ValueError(f"{where}: the prompt ({text_field!r}) is empty. Fix: remove "
                                 "the line or give it text.")
            ids = tokenizer.encode_text(text)
        else:
            chat = f"a {messages_field!r} list of chat messages nor " if messages_field else ""
            raise ValueError(f"{where} has neither {chat}a string {text_field!r} (fields: "
                             f"{sorted(record)}). Fix: set --messages_field / --text_field to "
                             "the input's field.")
        if not ids:
            raise ValueError(f"{where}: the prompt has no tokens. Fix: give it text.")
        if len(ids) > limit:
            raise ValueError(
                f"{where} is {len(ids)} tokens long, over the limit of {limit} "
                f"({limit_reason}). Prompts are never truncated (that would cut the end of a "
                "conversation, where the assistant's turn begins). Fix: shorten or remove it, "
                "or lower max_decode_len / raise inputs_length within the model's positions.")
        texts.append(text)
        rows.append(ids)
    longest = max(len(ids) for ids in rows)
    width = min(limit, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)
    tokens = np.zeros((len(rows), width), np.int32)
    for row, ids in enumerate(rows):
        tokens[row, :len(ids)] = ids
    return Prompts(tuple(texts), tokens, np.asarray([len(ids) for ids in rows], np.int32))


def read_prompts(path: str, tokenizer: CheckpointTokenizer, **kwargs) -> Prompts:
    """`encode_prompts` of the records of a JSON-lines file (kwargs as there)."""
    return encode_prompts(path, read_jsonl(path), tokenizer, **kwargs)
