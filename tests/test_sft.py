"""SFT through the generic trainer: learning, exact resume, and bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dera_t5x import models
from dera_t5x.models.t5 import network
from dera_t5x.data import pipeline
from dera_t5x.training import sft
from dera_t5x.training import trainer

CONFIG = network.T5Config(vocab_size=4096, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                          num_encoder_layers=1, num_decoder_layers=1,
                          mlp_activations=("gelu", "linear"), logits_via_embedding=False,
                          dropout_rate=0.1)
LENGTHS = {"inputs": 48, "targets": 16}


def _train(model_dir, num_steps, **kwargs):
    optimizer = trainer.make_optimizer(
        "adamw", trainer.make_schedule("linear_warmup", 3e-3, warmup_steps=5))
    return sft.train_sft(str(model_dir), model_config=CONFIG, task_name="xsum_bundled",
                         feature_lengths=LENGTHS, batch_size=16, num_steps=num_steps,
                         optimizer=optimizer, seed=3, checkpoint_every=kwargs.pop("every", 10),
                         eval_every=0, **kwargs)


def _eval_losses(model_dir):
    lines = [json.loads(l) for l in (model_dir / "metrics.jsonl").read_text().splitlines()]
    return [l["eval/loss"] for l in lines if "eval/loss" in l]


@pytest.mark.slow
def test_sft_learns_and_resumes_exactly(tmp_path):
    uninterrupted = _train(tmp_path / "a", 40)
    model = models.EncoderDecoderModel(CONFIG)
    validation = pipeline.load_split("xsum_bundled", "validation", LENGTHS).features
    eval_fn = sft.make_eval_fn(model, {k: validation[k] for k in sft.FEATURES}, 64)
    initial_eval = eval_fn(model.init(jax.random.PRNGKey(3)))["loss"]
    final_eval = _eval_losses(tmp_path / "a")[-1]
    assert final_eval < initial_eval - 1.0, (initial_eval, final_eval)
    assert (tmp_path / "a" / "checkpoints" / "40").exists()
    assert (tmp_path / "a" / "config.gin").exists()

    # "Killed" after the checkpoint at step 20, then restarted to step 40.
    _train(tmp_path / "b", 20)
    resumed = _train(tmp_path / "b", 40)
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed, uninterrupted)
    # A finished model dir returns its params without training.
    again = _train(tmp_path / "b", 40)
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, uninterrupted)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    params = {"w": jnp.ones(())}
    optimizer = trainer.make_optimizer("adamw")
    state = trainer.TrainState.create(params, optimizer, 0)

    def loss_fn(p, batch, rng):
        loss = jnp.where(batch["poison"], jnp.nan, jnp.square(p["w"]))
        return loss, {"loss": loss}

    step = trainer.make_train_step(loss_fn, optimizer)
    batches = lambda start: ({"poison": jnp.asarray(i >= 7)} for i in range(start, 100))
    with pytest.raises(trainer.NonFiniteLossError, match="at step 8"):
        trainer.train_loop(state, step, batches, num_steps=20, model_dir=tmp_path,
                           checkpoint_every=5)
    checkpointer = trainer.Checkpointer(tmp_path)
    assert checkpointer.latest_step() == 5
    restored = checkpointer.restore(trainer.TrainState.create(params, optimizer, 0))
    assert int(restored.step) == 5 and np.isfinite(float(restored.params["w"]))


def test_bad_input_is_reported_before_training(tmp_path):
    with pytest.raises(ValueError, match="no_such_task"):
        sft.train_sft(str(tmp_path), model_config=CONFIG, task_name="no_such_task",
                      feature_lengths=LENGTHS, num_steps=1)
    small = network.T5Config(**{**CONFIG.__dict__, "vocab_size": 1000})
    with pytest.raises(ValueError, match="vocabulary"):
        sft.train_sft(str(tmp_path), model_config=small, task_name="xsum_bundled",
                      feature_lengths=LENGTHS, num_steps=1)
    assert not (tmp_path / "checkpoints").exists()
