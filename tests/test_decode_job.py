"""The batch DeRa decoding job: output format, exactness, resuming, user errors."""

import json
import pathlib
import types

from absl import flags
import gin
import jax
import numpy as np
import optax
import pytest

import t5_factories

from dera_t5x import checkpoints
from dera_t5x import decode_job
from dera_t5x import models
from dera_t5x.models.t5 import network
from dera_t5x import realign
from dera_t5x.data import bundled
from dera_t5x.data import tasks
from dera_t5x.training import distill

CONFIG = t5_factories.TINY
# One set of shapes for every run, so the process compiles the sweep once.
SETTINGS = dict(batch_size=2, max_decode_len=8, inputs_length=32)
LAMBDAS = (0.0, 0.5, 1.0, 2.0)
DOCS = ["The cat sat on the mat.", "Rain fell all day in Cardiff. " * 12,
        "A council voted to close the library.", "Ships left the harbour at dawn. " * 12,
        "Prices rose again."]
FIELDS = {"index", "input", "lambda", "text", "token_ids", "length", "log_probs",
          "ref_log_probs", "aligned_log_probs", "mixed_log_probs"}
VOCABULARY = tasks.get_task("xsum_bundled").output_features["inputs"].vocabulary


def _params(seed: int, config: network.T5Config = CONFIG):
    """Random params whose EOS logit swings widely, so sequences end at varied steps."""
    params = models.EncoderDecoderModel(config).init(jax.random.PRNGKey(seed))
    kernel = params["decoder"]["logits_dense"]["kernel"]
    params["decoder"]["logits_dense"]["kernel"] = kernel.at[:, models.EOS_ID].multiply(7.0)
    return params


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    deeper = network.T5Config(**{**CONFIG.__dict__, "num_decoder_layers": 2})
    made = {"ref": _params(1), "aligned": _params(2), "deeper": _params(3, deeper)}
    for name, params in made.items():
        checkpoints.save_params(root / name, params)
    return types.SimpleNamespace(root=root, **made)


@pytest.fixture(scope="module")
def input_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inputs") / "in.jsonl"
    path.write_text("".join(json.dumps({"document": d, "id": i}) + "\n"
                            for i, d in enumerate(DOCS)) + "\n")
    return path


@pytest.fixture(autouse=True)
def clean_gin():
    yield
    gin.clear_config()


def _run(models_dir, input_file, output, **kwargs):
    kwargs = {"lambdas": ",".join(map(str, LAMBDAS)), "input_file": str(input_file),
              "model_config": CONFIG, **SETTINGS, **kwargs}
    return decode_job.run(str(models_dir.root / "ref"), str(models_dir.root / "aligned"),
                          str(output), **kwargs)


def _read(path: pathlib.Path):
    header, *records = path.read_text(encoding="utf-8").splitlines()
    return json.loads(header)["header"], [json.loads(line) for line in records]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, models_dir, input_file):
    """An uninterrupted sampled run; records the batch shapes the sweep saw."""
    output = tmp_path_factory.mktemp("full") / "out.jsonl"
    shapes = []
    sweep = realign.dera_sweep

    def recording_sweep(model, ref, aligned, tokens, *args, **kwargs):
        shapes.append(np.shape(tokens))
        return sweep(model, ref, aligned, tokens, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(realign, "dera_sweep", recording_sweep)
        summary = _run(models_dir, input_file, output)
    return types.SimpleNamespace(output=output, summary=summary, shapes=shapes)


def test_writes_one_line_per_input_and_lambda_with_the_documented_fields(full_run):
    header, records = _read(full_run.output)
    assert header["lambdas"] == list(LAMBDAS) and header["num_inputs"] == len(DOCS)
    assert [(r["index"], r["lambda"]) for r in records] == [
        (i, lam) for i in range(len(DOCS)) for lam in LAMBDAS]
    ended = 0
    for r in records:
        assert set(r) == FIELDS
        assert r["input"] == tasks.PREFIX + DOCS[r["index"]]
        n = r["length"]
        assert 1 <= n <= SETTINGS["max_decode_len"] and len(r["token_ids"]) == n
        assert all(len(r[name]) == n for name in decode_job.LOG_PROB_FIELDS)
        assert models.EOS_ID not in r["token_ids"][:-1] and 0 not in r["token_ids"]
        ended += r["token_ids"][-1] == models.EOS_ID
        assert r["text"] == VOCABULARY.decode(r["token_ids"])
        # Temperature 1, no filters: sampled from the mixed distribution itself.
        np.testing.assert_allclose(r["log_probs"], r["mixed_log_probs"], atol=1e-4)
        if r["lambda"] == 0.0:
            np.testing.assert_allclose(r["mixed_log_probs"], r["ref_log_probs"], atol=1e-4)
        if r["lambda"] == 1.0:
            np.testing.assert_allclose(r["mixed_log_probs"], r["aligned_log_probs"], atol=1e-4)
    assert 0 < ended < len(records), "EOS should end some but not all samples"
    # The last batch (one input) was padded to the batch size: one compiled shape.
    assert full_run.shapes == [(2, 32)] * 3


def test_truncated_inputs_are_counted_and_reported(full_run):
    assert full_run.summary.num_truncated == 2  # the two repeated documents
    assert "truncated to 32 tokens: 2 of 5" in str(full_run.summary)


def test_jsonl_inputs_are_tokenized_like_the_task(tmp_path):
    records = bundled.xsum("validation")[:3]
    path = tmp_path / "val.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    ours = decode_job.read_jsonl_inputs(str(path), VOCABULARY, text_field="document",
                                        prefix=tasks.PREFIX, inputs_length=64)
    task = decode_job.read_task_inputs("xsum_bundled", "validation", 64)
    np.testing.assert_array_equal(ours.tokens, task.tokens[:3])
    assert ours.texts == task.texts[:3]
    assert ours.num_truncated == int(np.sum(task.tokens[:3, -1] != 0)) > 0


def test_lambda_0_and_1_greedy_equal_each_model_decoding_alone(tmp_path, models_dir,
                                                              input_file):
    output = tmp_path / "greedy.jsonl"
    _run(models_dir, input_file, output, temperature=0.0)
    _, records = _read(output)
    tokens = decode_job.read_jsonl_inputs(str(input_file), VOCABULARY, text_field="document",
                                          prefix=tasks.PREFIX,
                                          inputs_length=SETTINGS["inputs_length"]).tokens
    predict = jax.jit(models.EncoderDecoderModel(CONFIG).predict,
                      static_argnames=("max_decode_len",))
    for lam, params in ((0.0, models_dir.ref), (1.0, models_dir.aligned)):
        alone = predict(params, tokens, jax.random.PRNGKey(0),
                        max_decode_len=SETTINGS["max_decode_len"], temperature=0.0)
        got = [r["token_ids"] for r in records if r["lambda"] == lam]
        want = [list(map(int, row[:n])) for row, n in zip(alone.tokens, alone.lengths)]
        assert got == want
    assert ([r["token_ids"] for r in records if r["lambda"] == 0.0]
            != [r["token_ids"] for r in records if r["lambda"] == 1.0])


def _cut_after(data: bytes, lines: int, extra: int) -> bytes:
    """The first `lines` lines (header included) plus `extra` bytes of the next."""
    end = 0
    for _ in range(lines):
        end = data.index(b"\n", end) + 1
    return data[:end + extra]


@pytest.mark.parametrize("lines, extra, resumed", [
    (1, 30, 0),    # header, then a partial line
    (9, 0, 2),     # header and the whole first batch (2 inputs x 4 lambdas)
    (12, 17, 2),   # the first batch, 3 lines of the second and a partial line
    (21, 0, 5),    # finished
])
def test_an_interrupted_job_resumes_to_the_uninterrupted_output(tmp_path, models_dir,
                                                               input_file, full_run, lines,
                                                               extra, resumed):
    full = full_run.output.read_bytes()
    output = tmp_path / "out.jsonl"
    output.write_bytes(_cut_after(full, lines, extra))
    summary = _run(models_dir, input_file, output)
    assert output.read_bytes() == full
    assert summary.resumed_inputs == resumed


@pytest.mark.parametrize("change, message", [
    ({"seed": 1}, "seed"),
    ({"lambdas": "0,1"}, "lambdas"),
    ({"top_p": 0.9}, "top_p"),
    ({"batch_size": 4}, "batch_size"),
])
def test_a_restart_with_other_settings_is_an_error(tmp_path, models_dir, input_file,
                                                   full_run, change, message):
    output = tmp_path / "out.jsonl"
    output.write_bytes(_cut_after(full_run.output.read_bytes(), 9, 0))
    before = output.read_bytes()
    with pytest.raises(ValueError, match=rf"other settings \({message}: .*new --output_file"):
        _run(models_dir, input_file, output, **change)
    assert output.read_bytes() == before


def test_a_foreign_output_file_is_never_overwritten(models_dir, input_file):
    before = input_file.read_bytes()
    with pytest.raises(ValueError, match="not the output of a decode job"):
        _run(models_dir, input_file, input_file)
    assert input_file.read_bytes() == before


@pytest.mark.parametrize("content, kwargs, error, message", [
    (None, {}, FileNotFoundError, "Input file not found"),
    ("\n\n", {}, ValueError, "the file is empty"),
    ('{"document": "a"}\n{"text": "b"}\n', {}, ValueError, "line 2 has no string field"),
    ('{"document": "a"}\n', {"lambdas": "a,b"}, ValueError, "'a' is not a finite number"),
    ('{"document": "a"}\n', {"lambdas": "0,nan"}, ValueError, "'nan' is not a finite"),
    ('{"document": "a"}\n', {"lambdas": "0,1,1"}, ValueError, "a value repeats"),
    ('{"document": "a"}\n', {"top_p": 0.0}, ValueError, "top_p must be in"),
    ('{"document": "a"}\n', {"split": "validation"}, ValueError, "exactly one input"),
    ('{"document": "a"}\n', {"model_config": None}, ValueError, "No model config"),
])
def test_user_errors_come_before_any_output(tmp_path, models_dir, content, kwargs, error,
                                            message):
    path = tmp_path / "in.jsonl"
    if content is not None:
        path.write_text(content)
    output = tmp_path / "out.jsonl"
    with pytest.raises(error, match=message):
        _run(models_dir, path, output, **kwargs)
    assert not output.exists()


def test_mismatched_models_are_an_error_before_any_output(tmp_path, models_dir, input_file):
    output = tmp_path / "out.jsonl"
    with pytest.raises(ValueError, match=r"deeper does not match the model config"):
        decode_job.run(str(models_dir.root / "ref"), str(models_dir.root / "deeper"),
                       str(output), lambdas="0,1", input_file=str(input_file),
                       model_config=CONFIG, **SETTINGS)
    assert not output.exists()


def test_entry_point_takes_the_model_from_gin_and_flags_win_over_gin(tmp_path, models_dir,
                                                                     input_file, capsys):
    from decode import dera  # noqa: PLC0415  (defines the flags)
    from dera_t5x import gin_utils  # noqa: PLC0415

    model_bindings = ["MODEL_CONFIG = @network.T5Config()"] + [
        f"network.T5Config.{k} = {v!r}" for k, v in CONFIG.__dict__.items()]
    gin_utils.parse(["gin/runs/decode.gin"],
                    model_bindings + ["decode_job.run.temperature = 0.0",
                                      "decode_job.run.seed = 5"])
    output = tmp_path / "out.jsonl"
    argv = ["dera", f"--ref_checkpoint={models_dir.root / 'ref'}",
            f"--aligned_checkpoint={models_dir.root / 'aligned'}", f"--output_file={output}",
            "--lambdas=0,1", f"--input_file={input_file}", "--seed=3", "--batch_size=2",
            "--max_decode_len=8", "--inputs_length=32"]
    flags.FLAGS(argv)
    try:
        dera.main([])
    finally:
        flags.FLAGS.unparse_flags()
    header, records = _read(output)
    assert header["seed"] == 3  # the flag, not gin's 5
    assert header["temperature"] == 0.0 and header["top_p"] == 1.0  # gin
    assert header["model_config"]["num_decoder_layers"] == 1 and len(records) == 2 * len(DOCS)
    assert "5 inputs x 2 lambdas" in capsys.readouterr().out


def test_hugging_face_checkpoints_bring_their_own_config(tmp_path, input_file):
    for name, seed in (("ref", 0), ("aligned", 1)):
        t5_factories.write_hf_t5(tmp_path / name, t5_factories.hf_t5_config(CONFIG), seed=seed)
    output = tmp_path / "out.jsonl"
    decode_job.run(str(tmp_path / "ref"), str(tmp_path / "aligned"), str(output),
                   lambdas="0,1", input_file=str(input_file), temperature=0.0, **SETTINGS)
    header, records = _read(output)
    assert network.T5Config(**header["model_config"]) == CONFIG
    assert len(records) == 2 * len(DOCS)
    # The reference weights were read from the HF dir: lambda 0 decodes as they do alone.
    _, params_ref = checkpoints.load_hf_t5(tmp_path / "ref")
    tokens = decode_job.read_jsonl_inputs(str(input_file), VOCABULARY, text_field="document",
                                          prefix=tasks.PREFIX, inputs_length=32).tokens
    alone = jax.jit(models.EncoderDecoderModel(CONFIG).predict,
                    static_argnames=("max_decode_len",))(
        params_ref, tokens, jax.random.PRNGKey(0), max_decode_len=8, temperature=0.0)
    assert [r["token_ids"] for r in records if r["lambda"] == 0.0] == [
        list(map(int, row[:n])) for row, n in zip(alone.tokens, alone.lengths)]


def test_a_finished_job_is_distillation_data_for_the_decoded_source(tmp_path, models_dir,
                                                                    input_file, full_run):
    """`distill.decoded_data`: the job's inputs read again (checked against the
    header's hash) and its samples at lambda, padded; a one-step run on them."""
    model = models.EncoderDecoderModel(CONFIG)
    data = distill.decoded_data(str(full_run.output), 2.0, model)
    _, records = _read(full_run.output)
    samples = [r["token_ids"] for r in records if r["lambda"] == 2.0]
    expected = decode_job.read_jsonl_inputs(str(input_file), VOCABULARY, text_field="document",
                                            prefix=tasks.PREFIX, inputs_length=32).tokens
    np.testing.assert_array_equal(data["inputs"], expected)
    training = models.EncoderDecoderModel(network.T5Config(**{**CONFIG.__dict__,
                                                              "dropout_rate": 0.1}))
    np.testing.assert_array_equal(  # dropout is a training setting, not the architecture
        distill.decoded_data(str(full_run.output), 2.0, training)["targets"], data["targets"])
    assert data["targets"].shape == (len(DOCS), SETTINGS["max_decode_len"])
    for row, ids in zip(data["targets"], samples):
        assert list(row[:len(ids)]) == ids and not row[len(ids):].any()
    student = distill.train_distill(
        str(tmp_path / "student"), model=model, params_ref=models_dir.ref,
        params_aligned=models_dir.aligned, lam=2.0, data=data, data_source="decoded",
        batch_size=2, num_steps=1, checkpoint_every=1, optimizer=optax.adam(1e-3))
    assert not np.array_equal(student["decoder"]["logits_dense"]["kernel"],
                              models_dir.aligned["decoder"]["logits_dense"]["kernel"])


def _edited_copy(tmp_path, output, **header_changes):
    header, *lines = output.read_text(encoding="utf-8").splitlines()
    header = json.loads(header)
    header["header"].update(header_changes)
    copy = tmp_path / "edited.jsonl"
    copy.write_text("\n".join([json.dumps(header), *lines]) + "\n", encoding="utf-8")
    return copy


def test_decoded_data_refuses_what_is_not_the_mixtures_samples(tmp_path, full_run):
    model = models.EncoderDecoderModel(CONFIG)
    output = full_run.output
    with pytest.raises(ValueError, match=r"holds lambdas \[0.0, 0.5, 1.0, 2.0\], not 3"):
        distill.decoded_data(str(output), 3.0, model)
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(_cut_after(output.read_bytes(), 9, 0))
    with pytest.raises(ValueError, match="unfinished: 2 of 5 inputs.*rerun the decode job"):
        distill.decoded_data(str(cut), 2.0, model)
    with pytest.raises(ValueError, match="sampled with .*'temperature': 0.7.*not the mixture"):
        distill.decoded_data(str(_edited_copy(tmp_path, output, temperature=0.7)), 2.0, model)
    changed = tmp_path / "changed.jsonl"
    changed.write_text("".join(json.dumps({"document": d + (" Changed." if i == 2 else "")})
                               + "\n" for i, d in enumerate(DOCS)))
    with pytest.raises(ValueError, match="differ from those the job decoded"):
        distill.decoded_data(str(_edited_copy(tmp_path, output, input_file=str(changed))), 2.0,
                             model)
    deeper = models.EncoderDecoderModel(network.T5Config(**{**CONFIG.__dict__,
                                                            "num_decoder_layers": 2}))
    with pytest.raises(ValueError, match=r"another model \(the file's config -> this "
                                         r"model's: num_decoder_layers: 1 -> 2\)"):
        distill.decoded_data(str(output), 2.0, deeper)
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"document": "not a decode output"}\n')
    with pytest.raises(ValueError, match="not the output of a decode job"):
        distill.decoded_data(str(foreign), 2.0, model)
