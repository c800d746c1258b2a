"""The decode job on decoder-only checkpoints: chat messages through the chat
template, raw prompts, a mesh of 8 simulated devices, the Zephyr recipe and
user errors (tiny random Mistral pairs with a tiny tokenizer)."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import types

from absl import flags
import gin
import jax
import numpy as np
import pytest
import transformers

import chat_factories
from dera_t5x import checkpoints
from dera_t5x import decode_job
from dera_t5x import gin_utils
from dera_t5x import models
from dera_t5x import realign

REPO = pathlib.Path(__file__).resolve().parents[1]
FIELDS = {"index", "input", "lambda", "text", "token_ids", "length", "log_probs",
          "ref_log_probs", "aligned_log_probs", "mixed_log_probs"}
INPUTS = [
    {"messages": [{"role": "user", "content": "Tell me a story about a dragon."}]},
    {"messages": [{"role": "system", "content": "You are a friendly assistant."},
                  {"role": "user", "content": "What is the capital of France?"}]},
    {"prompt": "The cat sat on the mat."},
    {"messages": [{"role": "user", "content": "Hello there"},
                  {"role": "assistant", "content": "Hi! How can I help?"},
                  {"role": "user", "content": "Write a poem."}]},
    {"messages": [{"role": "user", "content": "Hi"}], "prompt": "not read: messages win"},
]
# One set of shapes for the runs of this process: batches of 2, 8 new tokens.
SETTINGS = dict(batch_size=2, max_decode_len=8, text_field="prompt")
SAMPLING = dict(temperature=0.7, top_k=50, top_p=0.95)  # the authors' notebook
LAMBDAS = "0,0.5,1,2"


@pytest.fixture(autouse=True)
def clean_gin():
    yield
    gin.clear_config()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    ref = chat_factories.write_chat_model(root / "ref", seed=0)
    aligned = chat_factories.write_chat_model(root / "aligned", seed=1)
    inputs = root / "chats.jsonl"
    inputs.write_text("".join(json.dumps(line) + "\n" for line in INPUTS))
    return types.SimpleNamespace(root=root, ref=ref, aligned=aligned, inputs=inputs)


def _run(pair, output, **kwargs):
    kwargs = {"lambdas": LAMBDAS, "input_file": str(pair.inputs), **SETTINGS, **kwargs}
    return decode_job.run(str(pair.ref), str(pair.aligned), str(output), **kwargs)


def _read(path):
    header, *records = pathlib.Path(path).read_text(encoding="utf-8").splitlines()
    return json.loads(header)["header"], [json.loads(line) for line in records]


def _expected_prompts(directory):
    """Each input's prompt ids, from transformers' tokenizer of the checkpoint:
    the chat template's ids with the tokenizer's BOS in front (Zephyr's
    template writes none), the raw prompt with the tokenizer's BOS."""
    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    prompts = []
    for line in INPUTS:
        if "messages" in line:
            ids = hf.apply_chat_template(line["messages"], tokenize=True,
                                         add_generation_prompt=True,
                                         return_dict=True)["input_ids"]
            prompts.append([hf.bos_token_id] + list(ids))
        else:
            prompts.append(list(hf(line["prompt"])["input_ids"]))
    return hf, prompts


def test_chat_and_raw_prompts_decode_as_each_model_alone(tmp_path, pair):
    output = tmp_path / "greedy.jsonl"
    summary = _run(pair, output, temperature=0.0)
    header, records = _read(output)
    hf, prompts = _expected_prompts(pair.aligned)
    assert [(r["index"], r["lambda"]) for r in records] == [
        (i, lam) for i in range(len(INPUTS)) for lam in (0.0, 0.5, 1.0, 2.0)]
    assert header["messages_field"] == "messages" and header["chat_bos"] is True
    assert header["tokenizer"]["chat_template_sha256"] and header["prompt_limit"] == 96 - 8
    assert header["model_config"]["model_type"] == "mistral"
    assert "the longest has" in str(summary) and summary.num_truncated == 0
    for r in records:
        assert set(r) == FIELDS
        line = INPUTS[r["index"]]
        if "messages" in line:
            assert r["input"] == hf.apply_chat_template(line["messages"], tokenize=False,
                                                        add_generation_prompt=True)
        else:
            assert r["input"] == line["prompt"]
        n = r["length"]
        assert 1 <= n <= 8 and len(r["token_ids"]) == n
        assert all(len(r[name]) == n for name in decode_job.LOG_PROB_FIELDS)
        assert 2 not in r["token_ids"][:-1]
        body = r["token_ids"][:-1] if r["token_ids"][-1] == 2 else r["token_ids"]
        assert r["text"] == hf.decode(body) and "</s>" not in r["text"]
    ended = sum(r["token_ids"][-1] == 2 for r in records)
    assert 0 < ended < len(records), "EOS should end some but not all samples"

    # lambda 0 / 1 are the reference / aligned model alone on the prompts
    # transformers' tokenizer gives, in one batch padded to its longest prompt.
    width = max(map(len, prompts))
    tokens = np.zeros((len(prompts), width), np.int32)
    for row, ids in enumerate(prompts):
        tokens[row, :len(ids)] = ids
    lengths = np.asarray([len(ids) for ids in prompts], np.int32)
    for lam, path in ((0.0, pair.ref), (1.0, pair.aligned)):
        config, params = checkpoints.load_hf(path)
        model = models.for_config(config)
        alone = jax.jit(model.predict, static_argnames=("max_decode_len",))(
            params, tokens, jax.random.PRNGKey(0), prompt_lengths=lengths, max_decode_len=8)
        want = [list(map(int, row[:n])) for row, n in zip(alone.tokens, alone.lengths)]
        assert [r["token_ids"] for r in records if r["lambda"] == lam] == want
    assert ([r["token_ids"] for r in records if r["lambda"] == 0.0]
            != [r["token_ids"] for r in records if r["lambda"] == 1.0])


_ON_A_MESH = textwrap.dedent("""
    import json, sys
    # As on the accelerator machines: no TensorFlow, no seqio.
    for name in ("tensorflow", "seqio", "tensorflow_datasets", "tensorflow_text"):
        sys.modules[name] = None  # any import of them now raises ImportError
    import jax
    from dera_t5x import decode_job

    assert jax.device_count() == 8
    root, settings = sys.argv[1], json.loads(sys.argv[2])
    decode_job.run(f"{root}/ref", f"{root}/aligned", f"{root}/mesh.jsonl",
                   input_file=f"{root}/chats.jsonl", mesh_shape=(2, 4), **settings)
""")


@pytest.mark.slow
def test_chat_decoding_on_a_2x4_mesh_writes_what_one_device_writes(tmp_path, pair):
    """Data and model parallel (parameters over 'model'), in a process that
    cannot import TensorFlow or seqio; sampled with the notebook's settings."""
    settings = dict(SETTINGS, lambdas=LAMBDAS, **SAMPLING)
    _run(pair, pair.root / "one.jsonl", **SAMPLING)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", _ON_A_MESH, str(pair.root),
                             json.dumps(settings)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    one_header, one = _read(pair.root / "one.jsonl")
    mesh_header, meshed = _read(pair.root / "mesh.jsonl")
    assert one_header == mesh_header  # the mesh is not a setting of the output
    assert len(one) == len(INPUTS) * 4
    assert len({tuple(r["token_ids"]) for r in one}) > len(INPUTS)  # sampled, varied
    for a, b in zip(one, meshed):
        assert (a["index"], a["lambda"], a["token_ids"], a["text"]) == (
            b["index"], b["lambda"], b["token_ids"], b["text"])
        assert b["mixed_log_probs"] == pytest.approx(a["mixed_log_probs"], abs=1e-4)


def test_an_interrupted_chat_job_resumes_to_the_uninterrupted_output(tmp_path, pair):
    full = tmp_path / "full.jsonl"
    _run(pair, full, **SAMPLING)
    data = full.read_bytes()
    cut = tmp_path / "cut.jsonl"
    end = 0
    for _ in range(1 + 4 * 2 + 3):  # the header, the first batch and 3 lines more
        end = data.index(b"\n", end) + 1
    cut.write_bytes(data[:end + 11])
    summary = _run(pair, cut, **SAMPLING)
    assert summary.resumed_inputs == 2 and cut.read_bytes() == data
    with pytest.raises(ValueError, match=r"other settings \(chat_bos"):
        _run(pair, cut, chat_bos=False, **SAMPLING)


def test_the_zephyr_recipe_runs_with_only_paths_and_lengths_overridden(tmp_path, pair,
                                                                      capsys):
    from decode import dera  # noqa: PLC0415  (defines the flags)

    gin_utils.parse(["gin/runs/decode_zephyr.gin"], [
        f"REF_CHECKPOINT = '{pair.ref}'", f"ALIGNED_CHECKPOINT = '{pair.aligned}'",
        "decode_job.run.max_decode_len = 8", "decode_job.run.inputs_length = 64"])
    output = tmp_path / "zephyr.jsonl"
    flags.FLAGS(["dera", f"--input_file={pair.inputs}", f"--output_file={output}",
                 "--text_field=prompt"])
    try:
        dera.main([])
    finally:
        flags.FLAGS.unparse_flags()
    header, records = _read(output)
    lambdas = header["lambdas"]
    assert {0.0, 1.0, 3.0, 5.0} <= set(lambdas) and len(lambdas) == 10
    assert lambdas[1] == pytest.approx(1 / 6) and 2 / 3 in [pytest.approx(x) for x in lambdas]
    assert (header["temperature"], header["top_k"], header["top_p"]) == (0.7, 50, 0.95)
    assert header["param_dtype"] == "bfloat16" and header["model_config"]["dtype"] == "bfloat16"
    assert header["ref_checkpoint"] == str(pair.ref) and header["prompt_limit"] == 64
    assert header["batch_size"] == 4 and header["chat_bos"] is True
    assert len(records) == len(INPUTS) * 10
    for r in records:
        assert r["length"] == len(r["token_ids"]) >= 1
        if r["lambda"] == 0.0:
            np.testing.assert_allclose(r["mixed_log_probs"], r["ref_log_probs"], atol=1e-5)
        if r["lambda"] == 1.0:
            np.testing.assert_allclose(r["mixed_log_probs"], r["aligned_log_probs"], atol=1e-5)
    assert f"{len(INPUTS)} inputs x 10 lambdas" in capsys.readouterr().out


def _bad_dirs(pair):
    """Checkpoint variants sharing the pair's weights (symlinks)."""
    root = pair.root / "bad"
    if not root.exists():
        chat_factories.linked_copy(pair.aligned, root / "no_tokenizer",
                                   without=("tokenizer.json",))
        for name, kwargs in (("other_template", {"template": chat_factories.INST_TEMPLATE}),
                             ("other_vocab", {"vocab_size": 290})):
            directory = chat_factories.linked_copy(
                pair.aligned, root / name, without=("tokenizer.json", "tokenizer_config.json"))
            chat_factories.write_tokenizer(directory, **kwargs)
    return root


LONG = "The cat sat on the mat. " * 20


@pytest.mark.parametrize("lines, aligned, kwargs, error, message", [
    (INPUTS, "no_tokenizer", {}, FileNotFoundError, r"no_tokenizer has no tokenizer.json"),
    (INPUTS, "other_template", {}, ValueError, r"tokenizers of .* differ in chat template"),
    (INPUTS, "other_vocab", {}, ValueError, r"differ in tokenizer.json \(vocabulary"),
    (INPUTS[:2] + [{"prompt": LONG}], None, {}, ValueError,
     r"Input 2 \(.*chats.jsonl line 3\) is \d+ tokens long, over the limit of 88 \(the model's "
     r"max_position_embeddings 96 minus max_decode_len 8\). Prompts are never truncated"),
    (INPUTS[:1] * 2, None, {"inputs_length": 10}, ValueError,
     r"Input 0 .* over the limit of 10 \(inputs_length 10\)"),
    ([{"messages": [{"role": "tool", "content": "42"}]}], None, {}, ValueError,
     r"Input 0 \(.*line 1\): message 0 has the unknown role 'tool'"),
    (INPUTS[:1] + [{"prompt": "  "}], None, {}, ValueError,
     r"Input 1 .*line 2\): the prompt \('prompt'\) is empty"),
    ([{"messages": []}], None, {}, ValueError, r"the conversation is empty"),
    (INPUTS, None, {"split": "validation"}, ValueError, r"pass --input_file"),
    (INPUTS, None, {"param_dtype": "int8"}, ValueError, r"param_dtype must be one of"),
    (INPUTS, None, {"max_decode_len": 96}, ValueError, r"leaves no room for a prompt"),
])
def test_bad_inputs_are_errors_before_compiling_and_writing(tmp_path, pair, lines, aligned,
                                                            kwargs, error, message):
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    aligned_dir = pair.aligned if aligned is None else _bad_dirs(pair) / aligned
    output = tmp_path / "out.jsonl"

    def never(*args, **kwargs):
        raise AssertionError("decoding started")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(realign, "sweep_batches", never)
        patch.setattr(checkpoints, "load_hf", never)  # errors come before the weights
        with pytest.raises(error, match=message):
            decode_job.run(str(pair.ref), str(aligned_dir), str(output),
                           **{"lambdas": LAMBDAS, "input_file": str(path), **SETTINGS,
                              **kwargs})
    assert not output.exists()


def test_a_shared_tokenizer_dir_lets_differing_checkpoint_tokenizers_through(tmp_path, pair):
    output = tmp_path / "out.jsonl"
    aligned = _bad_dirs(pair) / "other_template"
    decode_job.run(str(pair.ref), str(aligned), str(output), lambdas=LAMBDAS,
                   input_file=str(pair.inputs), temperature=0.0, tokenizer_dir=str(pair.ref),
                   **SETTINGS)
    header, records = _read(output)
    assert header["tokenizer"]["dir"] == str(pair.ref) and len(records) == 4 * len(INPUTS)
