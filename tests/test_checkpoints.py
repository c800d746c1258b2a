"""Checkpoint import against real T5X-written files, orbax round trips, bad input."""

import dataclasses
import gzip
import json
import pathlib

import flax.serialization
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy
import tensorstore as ts

from dera_t5x import checkpoints
from dera_t5x import models
from dera_t5x.models import protocol
from dera_t5x.models.t5 import network

# The whole tiny T5.1.1-style network in T5X's test checkpoint.
TINY_T5X = network.T5Config(vocab_size=32128, emb_dim=8, num_heads=4, head_dim=3, mlp_dim=16,
                            num_encoder_layers=2, num_decoder_layers=2,
                            mlp_activations=("gelu", "linear"), logits_via_embedding=False,
                            dropout_rate=0.0)


def _random_params(config: network.T5Config, seed: int):
    """Random float32 numpy params of the config's shapes (faster than compiling init)."""
    rng = np.random.default_rng(seed)
    flat = {name: rng.normal(size=shape).astype(np.float32)
            for name, shape in protocol.expected_shapes(models.for_config(config)).items()}
    return flax.traverse_util.unflatten_dict(flat, sep="/")


def _to_hf_state_dict(params, config):
    """Our T5X-named (gated, untied) tree as a transformers state dict of numpy arrays."""
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    t = lambda name: np.ascontiguousarray(np.asarray(flat[name], np.float32).T)
    same = lambda name: np.asarray(flat[name], np.float32).copy()
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


def test_real_t5x_checkpoint_matches_pytorch(t5x_fixtures, tmp_path):
    import torch  # noqa: PLC0415  (a test dependency: a missing torch fails)
    import transformers  # noqa: PLC0415
    from safetensors.torch import save_file

    path = t5x_fixtures / "test_t5_tiny.checkpoint_0"
    params = checkpoints.load_t5x_checkpoint(path, TINY_T5X)
    hf_config = transformers.T5Config(
        vocab_size=32128, d_model=8, d_kv=3, d_ff=16, num_layers=2, num_decoder_layers=2,
        num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        dropout_rate=0.0, decoder_start_token_id=0)
    # Through files, so that transformers keeps lm_head untied from the embedding.
    state = {k: torch.from_numpy(v) for k, v in _to_hf_state_dict(params, TINY_T5X).items()}
    save_file(state, str(tmp_path / "model.safetensors"))
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
    got = jax.jit(model.logits)(params, inputs, models.shift_right(jnp.asarray(targets)))
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(want).max() > 1e-3


def test_tensorstore_fixture_reads(t5x_fixtures):
    folder = t5x_fixtures / "tiny_t5" / "checkpoint_1"
    for path in (folder, folder / "checkpoint"):
        tree = checkpoints.read_t5x_msgpack_tree(path)
        states = tree["optimizer"]["state"]["param_states"]
        assert states["kernel"].shape == (10, 5) and states["kernel"].dtype == np.float64
        # Independently: the single zarr chunk is gzip'd little-endian C-order float64.
        chunk = gzip.decompress((folder / "state.param_states.kernel" / "0.0").read_bytes())
        np.testing.assert_array_equal(states["kernel"],
                                      np.frombuffer(chunk, "<f8").reshape(10, 5))
        np.testing.assert_array_equal(states["bias"], np.ones(5, np.float32))
        assert int(states["step"]) == 1 and int(tree["optimizer"]["state"]["step"]) == 1


def test_orbax_era_t5x_layout(t5x_fixtures, tmp_path):
    # The fixture's zarr folders carry no metadata: a clear refusal.
    with pytest.raises(NotImplementedError, match=r"param_states\.bias .*no zarr metadata"):
        checkpoints.read_t5x_msgpack_tree(t5x_fixtures / "tiny_orbax" / "1")
    # The same layout with .zarray files beside the chunks reads.
    directory = tmp_path / "1"
    directory.mkdir()
    want = {"kernel": np.arange(6.0).reshape(2, 3), "bias": np.ones(3, np.float32)}
    for name, value in want.items():
        ts.open({"driver": "zarr", "kvstore": {"driver": "file",
                                               "path": str(directory / f"_optimizer.{name}")},
                 "metadata": {"shape": list(value.shape), "chunks": list(value.shape),
                              "dtype": value.dtype.str}},
                create=True).result().write(value).result()
    (directory / "checkpoint").write_bytes(flax.serialization.msgpack_serialize(
        {"_optimizer": {"target": {k: f"PLACEHOLDER://_optimizer.{k}" for k in want}}}))
    tree = checkpoints.read_t5x_msgpack_tree(directory)
    jax.tree_util.tree_map(np.testing.assert_array_equal, tree["_optimizer"]["target"], want)


def _write_t5x(directory: pathlib.Path, params) -> None:
    """A legacy T5X checkpoint: msgpack with tensorstore specs + zarr folders.

    The specs use the three spellings T5X has written: a `file` kvstore with the
    relative path, a `gcs` kvstore with T5X's dummy bucket (written on GCS), and
    the path outside the kvstore (tensorstore < 0.1.14).
    """
    directory.mkdir(parents=True)
    flat = flax.traverse_util.flatten_dict(jax.device_get(params), sep=".")
    specs = {}
    for i, (name, value) in enumerate(sorted(flat.items())):
        folder = f"target.{name}"
        spec = {"driver": "zarr", "dtype": "float32",
                "kvstore": {"driver": "file", "path": str(directory / folder)},
                "metadata": {"chunks": list(value.shape), "compressor": {"id": "gzip", "level": 1},
                             "shape": list(value.shape)}}
        ts.open(spec, create=True).result().write(np.asarray(value)).result()
        spec["kvstore"] = [{"driver": "file", "path": f"{folder}/"},
                           {"driver": "gcs", "bucket": "t5x-dummy-bucket", "path": folder},
                           {"driver": "gcs", "bucket": "t5x-dummy-bucket"}][i % 3]
        if i % 3 == 2:
            spec["path"] = folder
        specs[tuple(name.split("."))] = spec
    target = flax.traverse_util.unflatten_dict(specs)
    (directory / "checkpoint").write_bytes(flax.serialization.msgpack_serialize(
        {"version": 3, "optimizer": {"target": target, "state": {"step": 7}}}))


def test_written_t5x_checkpoint_and_orbax_round_trip(tmp_path):
    config = network.T5Config(vocab_size=50, emb_dim=12, num_heads=2, head_dim=4, mlp_dim=20,
                              num_encoder_layers=2, num_decoder_layers=1)
    params = _random_params(config, 0)
    _write_t5x(tmp_path / "checkpoint_7", params)
    for spec in (tmp_path / "checkpoint_7", tmp_path / "checkpoint_7" / "checkpoint"):
        loaded = checkpoints.load_params(str(spec), config)
        jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)
    # T5X's standard orbax layout: checkpoint_<step>/state/ (an orbax PyTree).
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "checkpoint_8" / "state",
                          {"target": jax.device_get(params), "state": {"step": np.int32(8)}})
    for spec in (tmp_path / "checkpoint_8", tmp_path / "checkpoint_8" / "state"):
        loaded = checkpoints.load_t5x_checkpoint(spec, config)
        jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)
    # Orbax: exact, and saving over an existing checkpoint replaces it.
    checkpoints.save_params(tmp_path / "ours", jax.tree_util.tree_map(jnp.zeros_like, params))
    checkpoints.save_params(tmp_path / "ours", params)
    restored = checkpoints.load_params(str(tmp_path / "ours"), config)
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored, params)
    # Into a target of jax arrays: jax arrays placed as the target's are.
    into_target = checkpoints.restore_params(tmp_path / "ours",
                                             target=jax.tree_util.tree_map(jnp.asarray, params))
    jax.tree_util.tree_map(np.testing.assert_array_equal, into_target, params)
    assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(into_target))


def _write_hf_dir(directory: pathlib.Path, params, config, *, shards: int = 1,
                  dtype=np.float32) -> dict:
    """config.json + (sharded) safetensors for a gated, untied config; returns the tensors."""
    directory.mkdir(parents=True)
    state = {k: v.astype(dtype) for k, v in _to_hf_state_dict(params, config).items()}
    (directory / "config.json").write_text(json.dumps({
        "model_type": "t5", "vocab_size": config.vocab_size, "d_model": config.emb_dim,
        "d_kv": config.head_dim, "d_ff": config.mlp_dim, "num_heads": config.num_heads,
        "num_layers": config.num_encoder_layers,
        "num_decoder_layers": config.num_decoder_layers, "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance}))
    if shards == 1:
        safetensors.numpy.save_file(state, str(directory / "model.safetensors"))
        return state
    names = sorted(state)
    weight_map = {}
    for shard in range(shards):
        file = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n] for n in names[shard::shards]}
        safetensors.numpy.save_file(part, str(directory / file))
        weight_map.update({n: file for n in part})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return state


def test_hf_directories_load_and_are_checked_against_the_config(tmp_path):
    config = dataclasses.replace(TINY_T5X, vocab_size=40, num_encoder_layers=3)
    params = _random_params(config, 1)
    _write_hf_dir(tmp_path / "single", params, config)
    _write_hf_dir(tmp_path / "sharded", params, config, shards=3)
    _write_hf_dir(tmp_path / "bfloat16", params, config, dtype=jnp.bfloat16)
    for name in ("single", "sharded", "bfloat16"):
        loaded_config, loaded = checkpoints.load_hf_t5(tmp_path / name)
        assert loaded_config == dataclasses.replace(config, dropout_rate=0.1)
        want = params if name != "bfloat16" else jax.tree_util.tree_map(
            lambda x: np.asarray(x, jnp.bfloat16).astype(np.float32), params)
        jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, want)
        assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(loaded))
        if name == "bfloat16":
            continue
        jax.tree_util.tree_map(np.testing.assert_array_equal,
                               checkpoints.load_params(str(tmp_path / name), config), params)
    other = dataclasses.replace(config, num_heads=2, head_dim=6, mlp_activations=("relu",))
    with pytest.raises(ValueError, match=r"num_heads=4 \(config 2\).*head_dim=3 \(config 6\)"):
        checkpoints.load_params(str(tmp_path / "single"), other)


def test_bad_input(t5x_fixtures, tmp_path):
    config = network.T5Config(vocab_size=50, emb_dim=12, num_heads=2, head_dim=4, mlp_dim=20,
                              num_encoder_layers=1, num_decoder_layers=1)
    for load in (lambda p: checkpoints.load_params(str(p), config), checkpoints.load_hf_t5,
                 checkpoints.restore_params):
        with pytest.raises(FileNotFoundError, match="No checkpoint at .*nowhere"):
            load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="No T5X checkpoint file"):
        checkpoints.load_t5x_checkpoint(tmp_path / "nowhere", config)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is not a checkpoint: expected an orbax directory"):
        checkpoints.load_params(str(tmp_path / "empty"), config)
    with pytest.raises(ValueError, match="not an orbax checkpoint written by save_params"):
        checkpoints.restore_params(tmp_path / "empty")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert', not a T5"):
        checkpoints.load_hf_t5(bert)
    with pytest.raises(ValueError, match="model_type 'bert', not a T5"):
        checkpoints.load_params(str(bert), config)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    t5_json = {"model_type": "t5", "vocab_size": 50, "d_model": 12, "d_kv": 4, "d_ff": 20,
               "num_layers": 1, "num_heads": 2}
    (pickled / "config.json").write_text(json.dumps(t5_json))
    (pickled / "pytorch_model.bin").write_bytes(b"never read")
    with pytest.raises(ValueError, match="only pytorch_model.bin.*Convert it to safetensors"):
        checkpoints.load_hf_t5(pickled)
    (pickled / "config.json").write_text(json.dumps(dict(t5_json, feed_forward_proj="gated-tanh")))
    with pytest.raises(ValueError, match="feed_forward_proj 'gated-tanh' is not supported"):
        checkpoints.load_hf_t5(pickled)
    # T5X: a parameter of the wrong shape, a missing zarr folder, no params at all.
    params = _random_params(config, 0)
    params["encoder"]["layers_0"]["mlp"]["wo"]["kernel"] = np.zeros((21, 12), np.float32)
    _write_t5x(tmp_path / "bad", params)
    with pytest.raises(ValueError, match=r"encoder/layers_0/mlp/wo/kernel has shape \(21, 12\)"
                                         r" but the model config expects \(20, 12\)"):
        checkpoints.load_t5x_checkpoint(tmp_path / "bad", config)
    for folder in (tmp_path / "bad").glob("target.decoder.decoder_norm.scale"):
        for chunk in folder.iterdir():
            chunk.unlink()
        folder.rmdir()
    with pytest.raises(FileNotFoundError, match="folder target.decoder.decoder_norm.scale is "
                                                "missing"):
        checkpoints.load_t5x_checkpoint(tmp_path / "bad", config)
    with pytest.raises(ValueError, match="no optimizer/target params"):
        checkpoints.load_t5x_checkpoint(t5x_fixtures / "tiny_t5" / "checkpoint_1", config)
    with pytest.raises(ValueError,
                       match=r"missing parameters \['decoder/layers_0/mlp/wi/kernel'"):
        checkpoints.load_t5x_checkpoint(t5x_fixtures / "test_t5_tiny.checkpoint_0", config)


def test_bad_hugging_face_tensors_are_named(tmp_path):
    params = _random_params(TINY_T5X, 0)
    state = _write_hf_dir(tmp_path / "hf", params, TINY_T5X)
    path = str(tmp_path / "hf" / "model.safetensors")
    name = "decoder.block.1.layer.1.EncDecAttention.k.weight"
    safetensors.numpy.save_file(dict(state, **{name: np.zeros((12, 9), np.float32)}), path)
    with pytest.raises(ValueError, match=r"EncDecAttention\.k\.weight has shape \(12, 9\), "
                                         r"so parameter decoder/layers_1/"
                                         r"encoder_decoder_attention/key/kernel has shape "
                                         r"\(9, 12\) but .* expects \(8, 12\)"):
        checkpoints.load_hf_t5(tmp_path / "hf")
    extra = "encoder.block.2.layer.0.SelfAttention.q.weight"
    safetensors.numpy.save_file(dict(state, **{extra: np.zeros((12, 8), np.float32)}), path)
    with pytest.raises(ValueError, match=r"unexpected tensors \['encoder\.block\.2\.layer\.0"
                                         r"\.SelfAttention\.q\.weight'\]"):
        checkpoints.load_hf_t5(tmp_path / "hf")
    # Copies of the embedding must be copies: this network has one embedding.
    other = dict(state, **{"decoder.embed_tokens.weight": state["shared.weight"] + 1})
    safetensors.numpy.save_file(other, path)
    with pytest.raises(ValueError, match="decoder.embed_tokens.weight differs from shared.weight"):
        checkpoints.load_hf_t5(tmp_path / "hf")
    # T5.1.0 (tied, scaled logits) with an lm_head of its own cannot be represented.
    config_json = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps(dict(config_json,
                                                                 tie_word_embeddings=True)))
    safetensors.numpy.save_file(state, path)
    with pytest.raises(ValueError, match="lm_head.weight differs from shared.weight.*tied, "
                                         "scaled output logits"):
        checkpoints.load_hf_t5(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config_json))
    del state["encoder.block.1.layer.1.DenseReluDense.wi_1.weight"]
    safetensors.numpy.save_file(state, path)
    with pytest.raises(ValueError, match=r"encoder\.block\.1\.layer\.1\.DenseReluDense\.wi_1"
                                         r"\.weight \(for encoder/layers_1/mlp/wi_1/kernel\) "
                                         "is missing"):
        checkpoints.load_hf_t5(tmp_path / "hf")
