"""The generic trainer: schedules, optimizers, exact resume, NaN handling, outputs;
the gin flags and the SFT entry point."""

import json
import os
import pathlib
import subprocess
import sys

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dera_t5x import checkpoints
from dera_t5x import gin_utils
from dera_t5x.models.t5 import network
from dera_t5x.training import sft
from dera_t5x.training import trainer


def _toy(seed: int = 0):
    """A noisy regression whose updates depend on the state's rng (like dropout)."""
    params = {"w": jnp.zeros((4,)), "b": jnp.zeros(())}
    optimizer = trainer.make_optimizer(
        "adamw", trainer.make_schedule("linear_warmup", 0.1, warmup_steps=3))

    def loss_fn(p, batch, rng):
        noise = 0.1 * jax.random.normal(rng, batch["y"].shape)
        pred = batch["x"] @ p["w"] + p["b"] + noise
        loss = jnp.mean(jnp.square(pred - batch["y"]))
        return loss, {"loss": loss}

    def batches_from(start):
        step = start
        while True:
            rng = np.random.default_rng(step)
            x = rng.normal(size=(8, 4)).astype(np.float32)
            y = x @ np.arange(1.0, 5.0, dtype=np.float32) + 0.5
            yield {"x": x, "y": y, "poison": np.asarray(False)}
            step += 1

    state = trainer.TrainState.create(params, optimizer, seed)
    return state, trainer.make_train_step(loss_fn, optimizer), batches_from


def test_schedules_and_optimizer_names():
    warm = trainer.make_schedule("linear_warmup", 1.0, warmup_steps=10)
    assert float(warm(0)) == 0.0 and float(warm(5)) == pytest.approx(0.5)
    assert float(warm(100)) == pytest.approx(1.0)
    rsqrt = trainer.make_schedule("rsqrt", 1.0, warmup_steps=100)
    assert float(rsqrt(10)) == pytest.approx(1.0) and float(rsqrt(400)) == pytest.approx(0.5)
    assert float(trainer.make_schedule("linear_warmup", 1.0)(0)) == 1.0  # No warm-up.
    with pytest.raises(ValueError, match="schedule kind"):
        trainer.make_schedule("cosine")
    with pytest.raises(ValueError, match="optimizer name"):
        trainer.make_optimizer("sgd")


@pytest.mark.parametrize("name", ["adafactor", "adamw"])
def test_optimizers_reduce_a_quadratic(name):
    optimizer = trainer.make_optimizer(name, trainer.make_schedule("constant", 0.05),
                                       max_grad_norm=1.0)
    target = jnp.linspace(-1.0, 1.0, 256).reshape(2, 128)
    params = {"kernel": jnp.zeros((2, 128)) + 0.1}

    def loss_fn(p, batch, rng):
        loss = jnp.mean(jnp.square(p["kernel"] - target))
        return loss, {"loss": loss}

    step = trainer.make_train_step(loss_fn, optimizer)
    state = trainer.TrainState.create(params, optimizer, 0)
    first = None
    for _ in range(50):
        state, metrics = step(state, {})
        first = float(metrics["loss"]) if first is None else first
    assert float(metrics["loss"]) < 0.3 * first


def test_resume_after_a_kill_is_bitwise_exact(tmp_path):
    state, step, batches = _toy()
    full = trainer.train_loop(state, step, batches, num_steps=25, model_dir=tmp_path / "a",
                              checkpoint_every=10)
    state, step, batches = _toy()
    part = trainer.train_loop(state, step, batches, num_steps=10, model_dir=tmp_path / "b",
                              checkpoint_every=10)
    assert int(part.step) == 10
    state, step, batches = _toy()  # A fresh process would start from scratch like this.
    resumed = trainer.train_loop(state, step, batches, num_steps=25, model_dir=tmp_path / "b",
                                 checkpoint_every=10)
    assert int(resumed.step) == 25
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed.params, full.params)
    np.testing.assert_array_equal(resumed.rng, full.rng)
    # The noise matters: another seed ends elsewhere, so equality above is not trivial.
    state, step, batches = _toy(seed=1)
    other = trainer.train_loop(state, step, batches, num_steps=25, model_dir=tmp_path / "c",
                               checkpoint_every=10)
    assert not np.array_equal(other.params["w"], full.params["w"])


def test_outputs_metrics_tensorboard_and_operative_config(tmp_path):
    gin.clear_config()
    gin.parse_config("trainer.make_schedule.warmup_steps = 3")
    try:
        trainer.make_schedule("linear_warmup", 0.1)
        state, step, batches = _toy()
        trainer.train_loop(state, step, batches, num_steps=20, model_dir=tmp_path,
                           checkpoint_every=10, eval_fn=lambda p: {"norm": jnp.sum(p["w"])},
                           eval_every=10)
    finally:
        gin.clear_config()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [line for line in lines if "train/loss" in line]
    assert [line["step"] for line in train] == [10, 20]
    assert train[-1]["train/loss"] < train[0]["train/loss"]
    assert [line["step"] for line in lines if "eval/norm" in line] == [10, 20]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert "warmup_steps = 3" in (tmp_path / "config.gin").read_text()
    assert sorted(trainer.Checkpointer(tmp_path).all_steps()) == [10, 20]


def test_nan_between_loss_reads_names_its_step_and_is_never_saved(tmp_path):
    state, step, batches = _toy()

    def poisoned(start):
        for i, batch in enumerate(batches(start), start):
            batch["y"] = batch["y"] * (np.nan if i >= 12 else 1.0)
            yield batch

    with pytest.raises(trainer.NonFiniteLossError, match="at step 13;.*step 10"):
        trainer.train_loop(state, step, poisoned, num_steps=30, model_dir=tmp_path,
                           checkpoint_every=5)
    checkpointer = trainer.Checkpointer(tmp_path)
    assert checkpointer.all_steps() == [5, 10]
    restored = checkpointer.restore(_toy()[0])
    assert int(restored.step) == 10
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(restored))


def test_a_dir_past_num_steps(tmp_path):
    state, step, batches = _toy()
    full = trainer.train_loop(state, step, batches, num_steps=20, model_dir=tmp_path,
                              checkpoint_every=10, keep_checkpoints=3)
    state, step, batches = _toy()
    earlier = trainer.train_loop(state, step, batches, num_steps=10, model_dir=tmp_path,
                                 checkpoint_every=10)
    assert int(earlier.step) == 10
    assert not np.array_equal(earlier.params["w"], full.params["w"])
    state, step, batches = _toy()
    with pytest.raises(ValueError, match="past num_steps=15"):
        trainer.train_loop(state, step, batches, num_steps=15, model_dir=tmp_path,
                           checkpoint_every=10)


@pytest.mark.slow
def test_sft_reports_rouge_of_greedy_decodes(tmp_path):
    config = network.T5Config(vocab_size=4096, emb_dim=32, num_heads=2, head_dim=16,
                              mlp_dim=64, num_encoder_layers=1, num_decoder_layers=1,
                              mlp_activations=("gelu", "linear"), logits_via_embedding=False,
                              dropout_rate=0.0)
    sft.train_sft(str(tmp_path), model_config=config, task_name="xsum_bundled",
                  feature_lengths={"inputs": 64, "targets": 16}, batch_size=8, num_steps=2,
                  optimizer=trainer.make_optimizer("adamw"), checkpoint_every=2,
                  eval_batch_size=8, rouge_batches=1)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    final = [line for line in lines if "eval/rouge1" in line]
    assert [line["step"] for line in final] == [2]
    assert 0.0 <= final[0]["eval/rouge1"] <= 100.0 and "eval/loss" in final[0]


def test_gin_flags_are_rewritten_to_bindings():
    files, bindings, rest = gin_utils.split_gin_args([
        "prog", "--gin_file=a.gin", "--gin_file", "b.gin", "--gin.TRAIN_STEPS=100",
        "--gin.sft.train_sft.feature_lengths={'inputs': 8, 'targets': 4}", "--model_dir=x"])
    assert files == ["a.gin", "b.gin"]
    assert bindings == ["TRAIN_STEPS = 100",
                        "sft.train_sft.feature_lengths = {'inputs': 8, 'targets': 4}"]
    assert rest == ["prog", "--model_dir=x"]
    with pytest.raises(FileNotFoundError, match="no_such.gin"):
        gin_utils.parse(["gin/runs/no_such.gin"], [])


@pytest.mark.slow
def test_sft_entry_point_with_gin_flags(tmp_path):
    """`python -m train.sft` end to end: gin files, --gin.X=V overrides, outputs."""
    repo = pathlib.Path(__file__).resolve().parents[1]
    flags = ["--gin_file=gin/runs/sft_tiny.gin", f"--model_dir={tmp_path}",
             "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}",
             "--gin.network.T5Config.emb_dim=32", "--gin.network.T5Config.mlp_dim=64",
             "--gin.network.T5Config.num_encoder_layers=1",
             "--gin.network.T5Config.num_decoder_layers=1",
             "--gin.sft.train_sft.num_steps=3", "--gin.sft.train_sft.batch_size=4",
             "--gin.sft.train_sft.eval_split=None"]
    result = subprocess.run([sys.executable, "-m", "train.sft", *flags], cwd=repo,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    config = (tmp_path / "config.gin").read_text()
    assert "num_steps = 3" in config and "emb_dim = 32" in config
    assert trainer.Checkpointer(tmp_path).all_steps() == [3]
    params = checkpoints.restore_params(tmp_path / "params")
    assert params["token_embedder"]["embedding"].shape == (4096, 32)
