"""Checkpoint tokenizers and chat templates (`dera_t5x.text`), checked against
transformers' tokenizer and `apply_chat_template` on the same files."""

import json

import numpy as np
import pytest
import transformers

import chat_factories
from dera_t5x import text

CHAT = [{"role": "system", "content": "You are a friendly assistant."},
        {"role": "user", "content": "Tell me a story about a dragon."}]
TURNS = [{"role": "user", "content": "Hello there"},
         {"role": "assistant", "content": "Hi! How can I help?"},
         {"role": "user", "content": "What is the capital of France?"}]
BOS = 1


def _both(directory):
    """(ours, transformers') tokenizers of one directory (offline)."""
    return text.load(directory), transformers.AutoTokenizer.from_pretrained(str(directory))


def _hf_chat_ids(hf, messages):
    return list(hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                       return_dict=True)["input_ids"])


@pytest.mark.parametrize("messages", [CHAT, TURNS])
def test_zephyr_template_renders_as_transformers_with_exactly_one_bos(tmp_path, messages):
    ours, hf = _both(chat_factories.write_tokenizer(tmp_path))
    rendered = ours.render_chat(messages, "test")
    assert rendered == hf.apply_chat_template(messages, tokenize=False,
                                              add_generation_prompt=True)
    assert rendered.endswith("</s>\n<|assistant|>\n")
    # The template writes no BOS; transformers tokenizes it without special tokens.
    hf_ids = _hf_chat_ids(hf, messages)
    assert BOS not in hf_ids
    text_out, ids = ours.encode_chat(messages, "test", add_bos=True)
    assert text_out == rendered and ids == [BOS] + hf_ids
    assert ours.encode_chat(messages, "test", add_bos=False)[1] == hf_ids


def test_a_template_that_writes_the_bos_gets_no_second_one(tmp_path):
    ours, hf = _both(chat_factories.write_tokenizer(
        tmp_path, template=chat_factories.INST_TEMPLATE))
    messages = TURNS[:2] + [TURNS[2]]
    rendered = ours.render_chat(messages, "test")
    assert rendered == hf.apply_chat_template(messages, tokenize=False,
                                              add_generation_prompt=True)
    assert rendered.startswith("<s>[INST] Hello there [/INST]")
    for add_bos in (True, False):
        _, ids = ours.encode_chat(messages, "test", add_bos=add_bos)
        assert ids == _hf_chat_ids(hf, messages)
        assert ids[0] == BOS and ids.count(BOS) == 1


def test_raw_prompts_get_the_special_tokens_transformers_adds(tmp_path):
    prompt = "The cat sat on the mat."
    ours, hf = _both(chat_factories.write_tokenizer(tmp_path / "default"))
    assert ours.encode_text(prompt) == hf(prompt)["input_ids"]
    assert ours.encode_text(prompt)[0] == BOS and ours.encode_text(prompt).count(BOS) == 1
    # As in transformers 5, tokenizer.json's post-processor decides, whatever
    # tokenizer_config.json's add_bos_token / add_eos_token say.
    ours, hf = _both(chat_factories.write_tokenizer(tmp_path / "flags", add_bos_token=False,
                                                    add_eos_token=True))
    assert ours.encode_text(prompt) == hf(prompt)["input_ids"]
    assert ours.adds_bos


def test_tojson_does_not_escape_html_and_added_token_objects_are_read(tmp_path):
    directory = chat_factories.write_tokenizer(
        tmp_path, template=chat_factories.TOJSON_TEMPLATE,
        bos_token={"__type": "AddedToken", "content": "<s>", "lstrip": False,
                   "normalized": False, "rstrip": False, "single_word": False, "special": True})
    ours, hf = _both(directory)
    messages = [{"role": "user", "content": "Is <b>bold</b> & \"quoted\" fine?"}]
    rendered = ours.render_chat(messages, "test")
    assert "<b>bold</b> &" in rendered
    assert rendered == hf.apply_chat_template(messages, tokenize=False,
                                              add_generation_prompt=True)
    assert ours.special_tokens["bos_token"] == "<s>" and ours.bos_id == BOS


def test_a_chat_template_jinja_file_wins_and_named_templates_pick_default(tmp_path):
    directory = chat_factories.write_tokenizer(
        tmp_path / "named", template=[{"name": "tool_use", "template": "TOOLS"},
                                      {"name": "default",
                                       "template": chat_factories.ZEPHYR_TEMPLATE}])
    assert text.load(directory).chat_template == chat_factories.ZEPHYR_TEMPLATE
    (directory / "chat_template.jinja").write_text(chat_factories.INST_TEMPLATE)
    assert text.load(directory).chat_template == chat_factories.INST_TEMPLATE


def test_stored_truncation_and_padding_never_cut_or_pad_a_prompt(tmp_path):
    settings = json.loads(chat_factories.tokenizer_json())
    settings["truncation"] = {"direction": "Left", "max_length": 4, "strategy": "LongestFirst",
                              "stride": 0}
    settings["padding"] = {"strategy": {"Fixed": 64}, "direction": "Left",
                           "pad_to_multiple_of": None, "pad_id": 2, "pad_type_id": 0,
                           "pad_token": "</s>"}
    padded = text.load(chat_factories.write_tokenizer(tmp_path / "padded",
                                                      tokenizer_text=json.dumps(settings)))
    plain = text.load(chat_factories.write_tokenizer(tmp_path / "plain"))
    prompt = "Tell me a story about a dragon."
    assert padded.encode_text(prompt) == plain.encode_text(prompt)
    assert len(plain.encode_text(prompt)) > 4
    assert padded.encode_chat(CHAT, "t")[1] == plain.encode_chat(CHAT, "t")[1]
    # Batching settings do not make two tokenizers differ.
    assert text.differences(padded, plain, chat=True) == []


def test_differences_name_the_vocabulary_and_the_template(tmp_path):
    base = text.load(chat_factories.write_tokenizer(tmp_path / "a"))
    other_vocab = text.load(chat_factories.write_tokenizer(tmp_path / "b", vocab_size=290))
    other_template = text.load(chat_factories.write_tokenizer(
        tmp_path / "c", template=chat_factories.INST_TEMPLATE))
    assert [d.split(" ")[0] for d in text.differences(base, other_vocab, chat=False)] == [
        "tokenizer.json"]
    assert text.differences(base, other_template, chat=True) == ["chat template"]
    assert text.differences(base, other_template, chat=False) == []


@pytest.mark.parametrize("messages, message", [
    ([{"role": "tool", "content": "42"}], "unknown role 'tool'"),
    ([{"role": "User", "content": "hi"}], "unknown role 'User'"),
    ([], "conversation is empty"),
    ([{"role": "system", "content": ""}, {"role": "user", "content": "  "}], "every message is "
                                                                             "empty"),
    ([{"role": "user"}], "no string 'content'"),
    ([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "no string 'content'"),
    ("hello", "not a list"),
])
def test_bad_conversations_are_errors_naming_the_input(messages, message):
    with pytest.raises(ValueError, match=message) as error:
        text.check_messages(messages, "Input 3 (in.jsonl line 5)")
    assert "Input 3 (in.jsonl line 5)" in str(error.value)


def test_a_template_refusing_the_conversation_names_the_input(tmp_path):
    ours = text.load(chat_factories.write_tokenizer(tmp_path,
                                                    template=chat_factories.INST_TEMPLATE))
    with pytest.raises(ValueError, match=r"Input 2 .*refused this conversation: Roles must "
                                         r"alternate"):
        ours.encode_chat([{"role": "assistant", "content": "Hi"}], "Input 2 (x line 3)")


def test_chat_without_a_template_and_a_missing_tokenizer_are_clear_errors(tmp_path):
    ours = text.load(chat_factories.write_tokenizer(tmp_path / "plain", template=None))
    with pytest.raises(ValueError, match="need a chat template"):
        ours.encode_chat(CHAT, "Input 0")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        text.load(tmp_path / "empty")


def test_prompts_are_right_padded_to_a_multiple_of_8_and_never_truncated(tmp_path):
    tokenizer = text.load(chat_factories.write_tokenizer(tmp_path / "tok"))
    path = tmp_path / "in.jsonl"
    lines = [{"messages": CHAT}, {"prompt": "Hi"}, {"messages": TURNS, "prompt": "ignored"}]
    path.write_text("".join(json.dumps(line) + "\n\n" for line in lines))
    prompts = text.read_prompts(str(path), tokenizer, text_field="prompt",
                                messages_field="messages", chat_bos=True, limit=100)
    want = [tokenizer.encode_chat(CHAT, "")[1], tokenizer.encode_text("Hi"),
            tokenizer.encode_chat(TURNS, "")[1]]
    assert prompts.lengths.tolist() == [len(ids) for ids in want]
    assert prompts.tokens.shape == (3, -(-max(map(len, want)) // 8) * 8)
    for row, ids in zip(prompts.tokens, want):
        assert row[:len(ids)].tolist() == ids and not np.any(row[len(ids):])
    assert prompts.texts[1] == "Hi" and prompts.texts[2].startswith("<|user|>\nHello there")
    # The rounded width never passes the limit; a longer prompt is an error.
    longest = max(map(len, want))
    capped = text.read_prompts(str(path), tokenizer, text_field="prompt",
                               messages_field="messages", chat_bos=True, limit=longest)
    assert capped.tokens.shape == (3, longest)
    with pytest.raises(ValueError, match=rf"Input 2 \({path} line 5\) is {longest} tokens long, "
                                         rf"over the limit of {longest - 1} \(why\)"):
        text.read_prompts(str(path), tokenizer, text_field="prompt", messages_field="messages",
                          chat_bos=True, limit=longest - 1, limit_reason="why")
    # messages_field '' reads raw prompts only: the first line has none.
    with pytest.raises(ValueError, match=r"Input 0 .* line 1\) has neither a string 'prompt'"):
        text.read_prompts(str(path), tokenizer, text_field="prompt", messages_field="",
                          chat_bos=True, limit=100)
