"""TrRa distillation: the loss at its endpoints, convergence to the mixture on a
one-step toy, what enters the loss, exact resume, the held-out KL, and errors."""

import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import t5_factories
from dera_t5x import checkpoints
from dera_t5x import gin_utils
from dera_t5x import models
from dera_t5x import realign
from dera_t5x.models.decoder_only import network as decoder_only_network
from dera_t5x.training import distill

EOS = 1


@pytest.fixture(scope="module")
def t5():
    """A tiny T5 pair over 32 tokens and right-padded targets of varied lengths."""
    model = models.EncoderDecoderModel(t5_factories.tiny_config(vocab_size=32))
    params_ref, params_aligned = (jax.jit(model.init)(jax.random.PRNGKey(seed)) for seed in (0, 1))
    rng = np.random.default_rng(0)
    inputs = rng.integers(2, 32, size=(8, 6)).astype(np.int32)
    targets = rng.integers(2, 32, size=(8, 7)).astype(np.int32)
    ends = np.array([0, 1, 2, 3, 4, 5, 6, 6])
    for row, end in enumerate(ends[:-1]):
        targets[row, end], targets[row, end + 1:] = EOS, 0  # the last row has no EOS
    return model, params_ref, params_aligned, {"inputs": inputs, "targets": targets}


@pytest.fixture(scope="module")
def decoder_only():
    """A tiny Llama-shaped pair (EOS 2, nothing banned) and right-padded prompts
    with junk in their padding."""
    config = decoder_only_network.DecoderOnlyConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
        num_kv_heads=1, head_dim=8, max_position_embeddings=32, eos_token_ids=(2,))
    model = models.for_config(config)
    params_ref, params_aligned = (jax.jit(model.init)(jax.random.PRNGKey(seed)) for seed in (2, 3))
    rng = np.random.default_rng(1)
    inputs = rng.integers(3, 40, size=(4, 6)).astype(np.int32)
    prompt_lengths = np.array([6, 2, 4, 3], np.int32)
    responses = rng.integers(3, 40, size=(4, 5)).astype(np.int32)
    responses[0, 1] = responses[2, 3] = 2
    return model, params_ref, params_aligned, {"inputs": inputs, "prompt_lengths": prompt_lengths,
                                               "responses": responses}


@functools.partial(jax.jit, static_argnums=0)
def _loss(model, params, params_ref, params_aligned, batch, lam):
    """(loss, num_tokens, gradient norm) of `distill.loss_fn`; lam traced (one compile)."""
    (loss, metrics), grads = jax.value_and_grad(
        lambda p: distill.loss_fn(model, p, params_ref, params_aligned, batch, lam),
        has_aux=True)(params)
    return loss, metrics["num_tokens"], optax.global_norm(grads)


def _batches(t5, decoder_only):
    model, params_ref, params_aligned, data = t5
    yield model, params_ref, params_aligned, {"inputs": data["inputs"],
                                              "responses": data["targets"]}
    yield decoder_only


def test_a_student_that_is_the_mixture_has_zero_loss(t5, decoder_only):
    for model, params_ref, params_aligned, batch in _batches(t5, decoder_only):
        for lam, student, other in ((1.0, params_aligned, params_ref),
                                    (0.0, params_ref, params_aligned)):
            loss, num_tokens, grad_norm = _loss(model, student, params_ref, params_aligned,
                                                batch, jnp.float32(lam))
            # Zero up to float32 rounding (the jitted student and teacher passes may
            # fuse differently); a student off the mixture is far above it (below).
            assert abs(float(loss)) < 1e-6 and float(grad_norm) < 1e-5, (loss, grad_norm)
            assert float(num_tokens) > 0
            # The other endpoint is not the mixture: the loss can be nonzero.
            assert float(_loss(model, other, params_ref, params_aligned, batch,
                               jnp.float32(lam))[0]) > 1e-3


def _tv(student_logits, mixture_logits):
    return 0.5 * float(jnp.abs(jax.nn.softmax(student_logits)
                               - jax.nn.softmax(mixture_logits)).sum(-1).max())


def test_the_student_converges_to_the_mixture_on_a_one_step_toy(tmp_path):
    """Responses are the EOS alone: the loss is the KL of the first token's
    distribution (16 tokens, padding banned) at lambda 2, extrapolated."""
    model = models.EncoderDecoderModel(t5_factories.tiny_config(vocab_size=16))
    params_ref, params_aligned = (model.init(jax.random.PRNGKey(seed)) for seed in (4, 5))
    inputs = np.random.default_rng(2).integers(2, 16, size=(4, 5)).astype(np.int32)
    data = {"inputs": inputs, "targets": np.ones((4, 1), np.int32)}

    def first_logits(params):
        logits, _ = model.prefill(params, inputs, 1)
        return logits

    mixture = realign.mixed_logits(model, first_logits(params_ref),
                                   first_logits(params_aligned), 2.0)
    student_logits = lambda p: models.exclude_padding(first_logits(p))  # noqa: E731
    assert _tv(student_logits(params_aligned), mixture) > 0.1  # far at the start
    student = distill.train_distill(
        str(tmp_path / "toy"), model=model, params_ref=params_ref,
        params_aligned=params_aligned, lam=2.0, data=data, data_source="dataset",
        batch_size=4, num_steps=80, checkpoint_every=80, optimizer=optax.adam(3e-2))
    assert _tv(student_logits(student), mixture) < 0.02


def test_padding_and_prompts_never_enter_the_loss(t5, decoder_only):
    t5_batch, decoder_only_batch = _batches(t5, decoder_only)
    model, params_ref, params_aligned, batch = t5_batch
    lam = jnp.float32(2.0)
    loss, num_tokens, _ = _loss(model, params_ref, params_ref, params_aligned, batch, lam)
    # Tokens through the first EOS; the row without one counts whole.
    assert float(num_tokens) == 1 + 2 + 3 + 4 + 5 + 6 + 7 + 7
    junk = np.where(batch["responses"] == 0, 5, batch["responses"])  # padding -> tokens
    loss_junk, num_junk, _ = _loss(model, params_ref, params_ref, params_aligned,
                                   dict(batch, responses=junk), lam)
    assert float(loss_junk) == pytest.approx(float(loss), rel=1e-6)
    assert float(num_junk) == float(num_tokens)

    # Decoder-only: the loss is the KL at the response positions of each row's
    # unpadded prompt + response, whatever sits in the prompt's padding.
    model, params_ref, params_aligned, batch = decoder_only_batch
    lam = 1.5
    loss = float(_loss(model, params_ref, params_ref, params_aligned, batch,
                       jnp.float32(lam))[0])
    junk_prompts = np.where(np.arange(6)[None] < batch["prompt_lengths"][:, None],
                            batch["inputs"], 7)
    assert float(_loss(model, params_ref, params_ref, params_aligned,
                       dict(batch, inputs=junk_prompts), jnp.float32(lam))[0]) == \
        pytest.approx(loss, rel=1e-5)
    # Each row's prompt (without its padding) and response, left-aligned; the
    # junk after them is never read by the positions before it (causal).
    sequences = np.full((4, 11), 7, np.int32)
    for row, length in enumerate(batch["prompt_lengths"]):
        sequences[row, :length + 5] = np.concatenate([batch["inputs"][row, :length],
                                                      batch["responses"][row]])
    logits = {name: model.logits(p, sequences)
              for name, p in (("ref", params_ref), ("aligned", params_aligned))}
    teacher = jax.nn.log_softmax(lam * logits["aligned"] + (1 - lam) * logits["ref"])
    kl = jnp.sum(jnp.exp(teacher) * (teacher - jax.nn.log_softmax(logits["ref"])), -1)
    total = count = 0.0
    for row, length in enumerate(batch["prompt_lengths"]):
        response = batch["responses"][row]
        end = int(np.argmax(response == 2)) + 1 if np.any(response == 2) else len(response)
        total += float(jnp.sum(kl[row, length - 1:length - 1 + end]))  # predicting the response
        count += end
    assert loss == pytest.approx(total / count, rel=1e-4)


def test_on_policy_training_resumes_bit_exactly_and_moves_toward_the_mixture(t5, tmp_path):
    model, params_ref, params_aligned, data = t5
    eval_data = {"inputs": data["inputs"]}
    kwargs = dict(model=model, params_ref=params_ref, params_aligned=params_aligned, lam=2.0,
                  data=data, eval_data=eval_data, batch_size=4, max_decode_len=6,
                  checkpoint_every=2, eval_batch_size=8, optimizer=optax.adam(1e-2), seed=3)
    run = tmp_path / "run"
    whole = distill.train_distill(str(run), num_steps=4, **kwargs)
    # Killed after the step-2 checkpoint: the last one is gone; a restart resumes.
    shutil.rmtree(run / "checkpoints" / "4")
    (run / "checkpoints" / "4.dera_checksums.json").unlink()
    resumed = distill.train_distill(str(run), num_steps=4, **kwargs)
    jax.tree_util.tree_map(np.testing.assert_array_equal, whole, resumed)
    eval_fn = distill.make_eval_fn(model, params_ref, params_aligned, 2.0, eval_data,
                                   max_decode_len=6, batch_size=8, seed=3)
    before = eval_fn(params_aligned)["mixture_kl_per_token"]
    after = eval_fn(whole)["mixture_kl_per_token"]
    assert 0 < after < before
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 4]  # each step once, after the resume
    assert records[-1]["eval/mixture_kl_per_token"] == pytest.approx(after, rel=1e-5)
    assert 1 <= records[-2]["train/response_length"] <= 6  # sampled in the step


@pytest.mark.parametrize("change, message", [
    ({"lam": -0.5}, "finite number >= 0"),
    ({"lam": float("nan")}, "finite number >= 0"),
    ({"lam": "2"}, "finite number >= 0"),
    ({"data_source": "decode_file"}, "data_source must be one of"),
    ({"init": "sft"}, "init must be one of"),
    ({"mismatched": True}, "has shape"),
    ({"data": {"inputs": np.ones((3, 4), np.int32)}}, "lacks \\['targets'\\]"),
    ({"empty_target": True}, "starts with padding"),
    ({"out_of_vocab": True}, "outside the model's vocabulary"),
    ({"max_decode_len": 0}, "max_decode_len must be an integer >= 1"),
])
def test_bad_input_is_refused_before_anything_is_written(t5, tmp_path, change, message):
    model, params_ref, params_aligned, data = t5
    data = {name: np.array(value) for name, value in data.items()}
    if change.pop("mismatched", False):
        other = models.EncoderDecoderModel(t5_factories.tiny_config(vocab_size=48))
        params_aligned = jax.eval_shape(other.init, jax.random.PRNGKey(0))  # shapes suffice
    if change.pop("empty_target", False):
        data["targets"][2] = 0
    if change.pop("out_of_vocab", False):
        data["inputs"][1, 0] = 32
    kwargs = {"lam": 2.0, "data": data, "data_source": "dataset", **change}
    with pytest.raises(ValueError, match=message):
        distill.train_distill(str(tmp_path / "run"), model=model, params_ref=params_ref,
                              params_aligned=params_aligned, num_steps=1, **kwargs)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_distill_entry_point_writes_a_student_and_its_held_out_kl(tmp_path):
    """`python -m train.distill` end to end on micro SFT / aligned checkpoints, and a
    bad lambda refused in one line before anything loads."""
    from dera_t5x.data import pipeline  # noqa: F401, PLC0415  (the gin files' configurables)

    repo = pathlib.Path(__file__).resolve().parents[1]
    gin_files = ["gin/runs/sft_tiny.gin", "gin/runs/distill_tiny.gin"]
    bindings = ["TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': 8}",
                "network.T5Config.dropout_rate = 0.0", "network.T5Config.emb_dim = 32",
                "network.T5Config.num_heads = 2", "network.T5Config.head_dim = 16",
                "network.T5Config.mlp_dim = 64", "network.T5Config.num_encoder_layers = 1",
                "network.T5Config.num_decoder_layers = 1",
                "distill.train_distill.num_steps = 2", "distill.train_distill.batch_size = 4",
                "distill.train_distill.checkpoint_every = 2"]
    gin.clear_config()
    try:  # The checkpoints hold the model the entry point's gin files build.
        gin_utils.parse(gin_files, bindings)
        model = models.for_config(gin_utils.model_config())
    finally:
        gin.clear_config()
    for name, seed in (("ref", 0), ("aligned", 1)):
        checkpoints.save_params(str(tmp_path / name), jax.jit(model.init)(
            jax.random.PRNGKey(seed)))
    out = tmp_path / "student"
    flags = [*(f"--gin_file={path}" for path in gin_files),
             f"--ref_checkpoint={tmp_path / 'ref'}",
             f"--aligned_checkpoint={tmp_path / 'aligned'}", f"--model_dir={out}",
             "--eval_examples=2", *("--gin." + binding.replace(" = ", "=", 1)
                                    for binding in bindings)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    run = functools.partial(subprocess.run, cwd=repo, env=env, capture_output=True, text=True,
                            timeout=600)
    result = run([sys.executable, "-m", "train.distill", *flags, "--lam=2"])
    assert result.returncode == 0, result.stderr[-3000:]
    student = checkpoints.restore_params(out / "params")
    assert student["token_embedder"]["embedding"].shape == (4096, 32)
    # Initialized from the aligned model ('aligned' in distill_tiny.gin) and trained.
    aligned = checkpoints.restore_params(tmp_path / "aligned")
    assert not np.array_equal(student["token_embedder"]["embedding"],
                              aligned["token_embedder"]["embedding"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kl = [m["eval/mixture_kl_per_token"] for m in metrics if "eval/mixture_kl_per_token" in m]
    assert kl and np.isfinite(kl[-1]) and kl[-1] >= 0.0
    bad = run([sys.executable, "-m", "train.distill", *flags[:4],
               f"--model_dir={tmp_path / 'bad'}", "--lam=-1"])
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert bad.returncode == 1 and len(errors) == 1 and "lambda" in errors[0], bad.stderr[-2000:]
    assert not (tmp_path / "bad").exists()
    # The 'decoded' source: a decode job's samples of two documents at lambda 2.
    from dera_t5x import decode_job  # noqa: PLC0415
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"document": text}) + "\n" for text in (
        "The council voted to close the library.", "Ships left the harbour at dawn.")))
    decoded = tmp_path / "decoded.jsonl"
    decode_job.run(str(tmp_path / "ref"), str(tmp_path / "aligned"), str(decoded), lambdas="2",
                   input_file=str(docs), model_config=model.config, batch_size=2,
                   max_decode_len=8, inputs_length=32)
    from_decoded = run([sys.executable, "-m", "train.distill", *flags, "--lam=2",
                        f"--decoded_file={decoded}", "--eval_examples=0",
                        f"--model_dir={tmp_path / 'from_decoded'}"])
    assert from_decoded.returncode == 0, from_decoded.stderr[-3000:]
    settings = json.loads((tmp_path / "from_decoded" / "run_settings.json").read_text())
    assert settings["args"]["data_source"] == "decoded" and settings["args"]["max_decode_len"] \
        is None
    assert checkpoints.restore_params(tmp_path / "from_decoded" / "params")
    unpaired = run([sys.executable, "-m", "train.distill", *flags[:4], "--lam=2",
                    "--gin.distill.train_distill.data_source='decoded'",
                    f"--model_dir={tmp_path / 'unpaired'}"])
    errors = [line for line in unpaired.stderr.splitlines() if line.startswith("error:")]
    assert unpaired.returncode == 1 and len(errors) == 1 and "--decoded_file" in errors[0]
