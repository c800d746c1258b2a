"""Checkpoint import against real T5X-written files, orbax round trips, bad input."""

import json
import pathlib

import flax.serialization
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts

from dera_t5x import checkpoints
from dera_t5x import models
from dera_t5x import network

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "t5x"
# The whole tiny T5.1.1-style network in T5X's test checkpoint.
TINY_T5X = network.T5Config(vocab_size=32128, emb_dim=8, num_heads=4, head_dim=3, mlp_dim=16,
                            num_encoder_layers=2, num_decoder_layers=2,
                            mlp_activations=("gelu", "linear"), logits_via_embedding=False,
                            dropout_rate=0.0)


@pytest.fixture(scope="module")
def fixtures():
    assert FIXTURES.is_dir(), (f"The T5X fixtures are missing: expected {FIXTURES} "
                               "(../shared/fixtures/t5x beside the checkout).")
    return FIXTURES


def _to_hf_state_dict(params, config):
    """Our T5X-named tree as a transformers state dict, mapped by hand."""
    import torch

    flat = flax.traverse_util.flatten_dict(params, sep="/")
    t = lambda name: torch.tensor(np.asarray(flat[name]).T.copy())
    same = lambda name: torch.tensor(np.asarray(flat[name]).copy())
    state = {"shared.weight": same("token_embedder/embedding"),
             "lm_head.weight": t("decoder/logits_dense/kernel"),
             "encoder.final_layer_norm.weight": same("encoder/encoder_norm/scale"),
             "decoder.final_layer_norm.weight": same("decoder/decoder_norm/scale")}
    for stack in ("encoder", "decoder"):
        state[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = t(
            f"{stack}/relpos_bias/rel_embedding")
    for i in range(config.num_encoder_layers):
        p, h = f"encoder/layers_{i}", f"encoder.block.{i}.layer"
        state[f"{h}.0.layer_norm.weight"] = same(f"{p}/pre_attention_layer_norm/scale")
        for a, b in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o")):
            state[f"{h}.0.SelfAttention.{b}.weight"] = t(f"{p}/attention/{a}/kernel")
        state[f"{h}.1.layer_norm.weight"] = same(f"{p}/pre_mlp_layer_norm/scale")
        for w in ("wi_0", "wi_1", "wo"):
            state[f"{h}.1.DenseReluDense.{w}.weight"] = t(f"{p}/mlp/{w}/kernel")
    for i in range(config.num_decoder_layers):
        p, h = f"decoder/layers_{i}", f"decoder.block.{i}.layer"
        state[f"{h}.0.layer_norm.weight"] = same(f"{p}/pre_self_attention_layer_norm/scale")
        state[f"{h}.1.layer_norm.weight"] = same(f"{p}/pre_cross_attention_layer_norm/scale")
        for a, b in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o")):
            state[f"{h}.0.SelfAttention.{b}.weight"] = t(f"{p}/self_attention/{a}/kernel")
            state[f"{h}.1.EncDecAttention.{b}.weight"] = t(
                f"{p}/encoder_decoder_attention/{a}/kernel")
        state[f"{h}.2.layer_norm.weight"] = same(f"{p}/pre_mlp_layer_norm/scale")
        for w in ("wi_0", "wi_1", "wo"):
            state[f"{h}.2.DenseReluDense.{w}.weight"] = t(f"{p}/mlp/{w}/kernel")
    return state


def test_real_t5x_checkpoint_matches_pytorch(fixtures, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    params = checkpoints.load_t5x_checkpoint(fixtures / "test_t5_tiny.checkpoint_0", TINY_T5X)
    hf_config = transformers.T5Config(
        vocab_size=32128, d_model=8, d_kv=3, d_ff=16, num_layers=2, num_decoder_layers=2,
        num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        dropout_rate=0.0, decoder_start_token_id=0)
    # Through files, so that transformers keeps lm_head untied from the embedding.
    save_file(_to_hf_state_dict(params, TINY_T5X), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(dict(hf_config.to_dict(),
                                                          tie_word_embeddings=False)))
    hf_model = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    inputs = np.array([[12, 345, 6789, 22, 1, 0], [5, 9000, 1, 0, 0, 0]])
    targets = np.array([[7, 8, 99, 1], [31000, 1, 0, 0]])
    with torch.no_grad():
        want = hf_model(input_ids=torch.tensor(inputs), attention_mask=torch.tensor(inputs > 0),
                        decoder_input_ids=torch.tensor(np.asarray(
                            models.shift_right(jnp.asarray(targets))))).logits.numpy()
    model = models.EncoderDecoderModel(TINY_T5X)
    got = model.logits(params, jnp.asarray(inputs), models.shift_right(jnp.asarray(targets)))
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(want).max() > 1e-3


def test_tensorstore_fixture_reads(fixtures):
    tree = checkpoints.read_t5x_msgpack_tree(fixtures / "tiny_t5" / "checkpoint_1")
    states = tree["optimizer"]["state"]["param_states"]
    assert states["kernel"].shape == (10, 5) and states["kernel"].dtype == np.float64
    assert states["bias"].shape == (5,)
    assert np.all(np.isfinite(states["kernel"])) and np.any(states["kernel"] != 0)


def _write_t5x(directory: pathlib.Path, params) -> None:
    """A T5X-layout checkpoint: msgpack with tensorstore specs + zarr folders."""
    directory.mkdir(parents=True)
    flat = flax.traverse_util.flatten_dict(jax.device_get(params), sep=".")
    specs = {}
    for name, value in flat.items():
        folder = f"target.{name}"
        spec = {"driver": "zarr", "dtype": "float32",
                "kvstore": {"driver": "file", "path": str(directory / folder)},
                "metadata": {"chunks": list(value.shape), "compressor": {"id": "gzip", "level": 1},
                             "shape": list(value.shape)}}
        ts.open(spec, create=True).result().write(np.asarray(value)).result()
        spec["kvstore"] = {"driver": "gfile", "path": f"{folder}/"}
        specs[tuple(name.split("."))] = spec
    target = flax.traverse_util.unflatten_dict(specs)
    (directory / "checkpoint").write_bytes(flax.serialization.msgpack_serialize(
        {"version": 3, "optimizer": {"target": target, "state": {"step": 7}}}))


def test_written_t5x_checkpoint_and_orbax_round_trip(tmp_path):
    config = network.T5Config(vocab_size=50, emb_dim=12, num_heads=2, head_dim=4, mlp_dim=20,
                              num_encoder_layers=2, num_decoder_layers=1)
    params = models.EncoderDecoderModel(config).init(jax.random.PRNGKey(0))
    _write_t5x(tmp_path / "checkpoint_7", params)
    for spec in (tmp_path / "checkpoint_7", tmp_path / "checkpoint_7" / "checkpoint"):
        loaded = checkpoints.load_params(str(spec), config)
        jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)
    checkpoints.save_params(tmp_path / "ours", params)
    restored = checkpoints.load_params(str(tmp_path / "ours"), config)
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored, params)


def test_bad_input(tmp_path):
    config = network.T5Config(vocab_size=50, emb_dim=12, num_heads=2, head_dim=4, mlp_dim=20,
                              num_encoder_layers=1, num_decoder_layers=1)
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        checkpoints.load_params(str(tmp_path / "nowhere"), config)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert', not a T5"):
        checkpoints.load_hf_t5(bert)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({
        "model_type": "t5", "vocab_size": 50, "d_model": 12, "d_kv": 4, "d_ff": 20,
        "num_layers": 1, "num_heads": 2}))
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="Convert it to safetensors"):
        checkpoints.load_hf_t5(pickled)
    params = models.EncoderDecoderModel(config).init(jax.random.PRNGKey(0))
    params["encoder"]["layers_0"]["mlp"]["wo"]["kernel"] = jnp.zeros((21, 12))
    _write_t5x(tmp_path / "bad", params)
    with pytest.raises(ValueError, match=r"encoder/layers_0/mlp/wo/kernel has shape \(21, 12\)"):
        checkpoints.load_t5x_checkpoint(tmp_path / "bad", config)
