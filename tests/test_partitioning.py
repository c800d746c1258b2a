"""Partitioning: logical rules, clear errors, and 8 simulated devices matching one."""

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from dera_t5x import models
from dera_t5x import partitioning
from dera_t5x.models.t5 import network

REPO = pathlib.Path(__file__).resolve().parents[1]
MODEL = models.EncoderDecoderModel(network.T5Config())


def test_logical_axes_of_t5_parameters():
    rules = {
        "encoder/layers_0/attention/query/kernel": (None, "model"),
        "decoder/layers_1/encoder_decoder_attention/value/kernel": (None, "model"),
        "decoder/layers_0/self_attention/out/kernel": ("model", None),
        "encoder/layers_0/mlp/wi/kernel": (None, "model"),
        "encoder/layers_0/mlp/wi_1/kernel": (None, "model"),
        "decoder/layers_0/mlp/wo/kernel": ("model", None),
        "token_embedder/embedding": ("model", None),
        "decoder/logits_dense/kernel": (None, "model"),
        "decoder/relpos_bias/rel_embedding": (None, None),
    }
    for path, expected in rules.items():
        logical = MODEL.param_axes(path, 2)
        assert partitioning.logical_to_mesh_axes(logical) == expected, path
    assert MODEL.param_axes("encoder/encoder_norm/scale", 1) == (None,)


def test_one_device_and_bad_shapes():
    partitioner = partitioning.Partitioner()
    assert partitioner.mesh.shape == {"data": jax.device_count(), "model": 1}
    with pytest.raises(ValueError, match="needs 6 devices"):
        partitioning.Partitioner((3, 2))
    with pytest.raises(ValueError, match=r"\(data, model\)"):
        partitioning.Partitioner((1,))
    batch = partitioner.shard_batch({"x": np.arange(6).reshape(3, 2), "flag": np.asarray(True)})
    np.testing.assert_array_equal(batch["x"], np.arange(6).reshape(3, 2))
    assert batch["flag"].shape == () and bool(batch["flag"])
    partitioning.initialize_distributed()  # Off unless configured: a no-op here.
    assert jax.process_count() == 1


def test_optimizer_state_follows_its_parameters():
    """Adam moments and unfactored Adafactor moments mirror their parameter's
    sharding; Adafactor's factored row / column moments and counts are replicated."""
    partitioner = partitioning.Partitioner((1, 1), MODEL.param_axes)  # Specs are visible on one device too.
    params = {"encoder": {"layers_0": {"mlp": {"wi": {"kernel": np.zeros((256, 512), np.float32)}},
                                       "attention": {"out": {"kernel": np.zeros((64, 32), np.float32)}}}}}
    wi_spec, out_spec = P(None, "model"), P("model", None)
    for name, optimizer in (("adamw", optax.adamw(1e-3)), ("adafactor", optax.adafactor(1e-3))):
        state = optimizer.init(params)
        shardings = partitioner.tree_shardings(state, params)
        specs = {"/".join(partitioning._path_names(path)): (np.shape(leaf), sharding.spec)
                 for (path, leaf), sharding in zip(
                     jax.tree_util.tree_flatten_with_path(state)[0],
                     jax.tree_util.tree_leaves(shardings))}
        for path, (shape, spec) in specs.items():
            if shape == (256, 512):
                assert spec == wi_spec, (name, path, spec)
            elif shape == (64, 32):
                assert spec == out_spec, (name, path, spec)
            else:
                assert spec == P(), (name, path, shape, spec)
        if name == "adafactor":  # wi is factored (both dims >= 128), out is not.
            vectors = sorted(shape for shape, _ in specs.values() if len(shape) == 1)
            assert [shape for shape in vectors if shape != (1,)] == [(256,), (512,)], vectors
            assert any(shape == (64, 32) for shape, _ in specs.values())


_EIGHT_DEVICES = textwrap.dedent("""
    import jax, numpy as np, optax
    from jax.sharding import PartitionSpec as P
    from dera_t5x import models, partitioning
    from dera_t5x.models.t5 import network
    from dera_t5x.training import trainer

    assert jax.device_count() == 8
    config = network.T5Config(vocab_size=256, emb_dim=32, num_heads=4, head_dim=8,
                              mlp_dim=64, num_encoder_layers=1, num_decoder_layers=1,
                              mlp_activations=("gelu", "linear"), logits_via_embedding=False,
                              dropout_rate=0.1)
    model = models.EncoderDecoderModel(config)
    rng = np.random.default_rng(0)
    batch = {"encoder_input_tokens": rng.integers(1, 256, (8, 12)).astype(np.int32),
             "decoder_input_tokens": rng.integers(1, 256, (8, 6)).astype(np.int32),
             "decoder_target_tokens": rng.integers(1, 256, (8, 6)).astype(np.int32),
             "decoder_loss_weights": np.ones((8, 6), np.int32)}
    loss_fn = lambda p, b, r: model.loss(p, b, r)

    def run(name, partitioner):
        optimizer = trainer.make_optimizer(name, trainer.make_schedule("constant", 1e-2))
        state = trainer.TrainState.create(model.init(jax.random.PRNGKey(0)), optimizer, 0)
        step = trainer.make_train_step(loss_fn, optimizer, partitioner)
        if partitioner is not None:
            state = partitioner.shard_state(state)
        losses = []
        for _ in range(2):
            b = partitioner.shard_batch(batch) if partitioner else batch
            state, metrics = step(state, b)
            losses.append(float(metrics["loss"]))
        return state, losses

    for name in ("adamw", "adafactor"):
        reference, ref_losses = run(name, None)
        for shape in ((2, 4), (4, 2)):
            partitioner = partitioning.Partitioner(shape, model.param_axes)
            state, losses = run(name, partitioner)
            q = state.params["encoder"]["layers_0"]["attention"]["query"]["kernel"]
            assert q.sharding.spec == P(None, "model"), q.sharding.spec
            emb = state.params["token_embedder"]["embedding"]
            assert emb.sharding.spec == P("model", None), emb.sharding.spec
            np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-5)
            jax.tree_util.tree_map(
                lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                        rtol=1e-5, atol=1e-5),
                state.params, reference.params)
            print(name, shape, "ok", losses)
    from dera_t5x.training import reward_model
    responses = rng.integers(2, 256, (16, 6)).astype(np.int32)
    responses[:, 4], responses[:, 5] = 1, 0  # EOS, then padding
    responses[::2, 3], responses[::2, 4] = 1, 0  # some end earlier
    pairs = {"inputs": batch["encoder_input_tokens"], "chosen": responses[:8],
             "rejected": responses[8:]}
    rm_loss = lambda p, b, r: reward_model.pairwise_loss(model, p, b)

    def run_reward_model(partitioner):
        # Plain SGD: Adam would turn the reduction-order noise of a zero gradient
        # (the head's bias cancels in r(chosen) - r(rejected)) into a full step.
        optimizer = optax.sgd(0.1)
        params = reward_model.init_params(model.init(jax.random.PRNGKey(0)), model.hidden_size)
        state = trainer.TrainState.create(params, optimizer, 0)
        step = trainer.make_train_step(rm_loss, optimizer, partitioner)
        if partitioner is not None:
            state = partitioner.shard_state(state)
        for _ in range(3):
            state, metrics = step(state, partitioner.shard_batch(pairs) if partitioner else pairs)
        return state, float(metrics["loss"])

    reference, ref_loss = run_reward_model(None)
    for shape in ((2, 4), (4, 2)):
        state, loss = run_reward_model(partitioning.Partitioner(shape, model.param_axes))
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                    rtol=1e-5, atol=1e-5),
            state.params, reference.params)
        print("reward model", shape, "ok")
    try:
        partitioning.Partitioner((4, 2)).shard_batch({"x": np.zeros((6, 3))})
    except ValueError as e:
        assert "not divisible by the 4 devices" in str(e), e
        print("batch error ok")
""")


@pytest.mark.slow
def test_eight_devices_match_one():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(" ok ") == 4 and "batch error ok" in result.stdout, result.stdout
    assert result.stdout.count("reward model") == 2, result.stdout
