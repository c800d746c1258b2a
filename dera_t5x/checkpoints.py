"""Loading and saving parameters: our orbax checkpoints, Hugging Face T5
safetensors, and T5X checkpoints. Nothing here ever unpickles.

- `save_params(path, params)` / `restore_params(path)`: orbax.
- `load_hf_t5(path) -> (T5Config, params)`: a Hugging Face T5 directory
  (`config.json` + `model.safetensors` or a sharded safetensors index).
- `load_t5x_checkpoint(path, config) -> params`: T5X's msgpack `checkpoint`
  file, with large arrays in tensorstore / zarr folders named by their dotted
  path (local or `gs://`).
- `load_params(spec, config)`: any of the three, told apart by what the
  path holds.
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any

import flax.serialization
import flax.traverse_util
import jax
import numpy as np
import orbax.checkpoint as ocp
import safetensors.numpy
import tensorstore as ts

from dera_t5x import models
from dera_t5x import network

Params = Any
_PLACEHOLDER = "PLACEHOLDER://"  # An array stored beside the msgpack (T5X + orbax).
# Architecture fields compared when a Hugging Face directory is loaded for a config.
_ARCHITECTURE_FIELDS = ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim",
                        "num_encoder_layers", "num_decoder_layers", "mlp_activations",
                        "logits_via_embedding", "relative_attention_num_buckets",
                        "relative_attention_max_distance", "layer_norm_epsilon")


def save_params(path: str | pathlib.Path, params: Params) -> None:
    """Writes params with orbax to `path` (replaced if it exists)."""
    path = pathlib.Path(path).absolute()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, jax.device_get(params), force=True)


def restore_params(path: str | pathlib.Path) -> Params:
    """Reads params written by `save_params`."""
    path = pathlib.Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"No checkpoint at {path}.")
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(path)


@functools.lru_cache(maxsize=16)
def expected_shapes(config: network.T5Config) -> dict[str, tuple[int, ...]]:
    """'encoder/layers_0/attention/query/kernel' -> shape, for a config (cached)."""
    shapes = jax.eval_shape(models.EncoderDecoderModel(config).init, jax.random.PRNGKey(0))
    flat = flax.traverse_util.flatten_dict(shapes, sep="/")
    return {name: tuple(value.shape) for name, value in flat.items()}


def check_params(params: Params, config: network.T5Config, source: str) -> Params:
    """Checks names and shapes against the config; errors name the parameter."""
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source} does not match the model config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}.")
    for name, shape in expected.items():
        if tuple(np.shape(flat[name])) != shape:
            raise ValueError(f"{source}: parameter {name} has shape {tuple(np.shape(flat[name]))}"
                             f" but the model config expects {shape}.")
    return params


# ---------------------------------------------------------------- Hugging Face


def _hf_config(config_json: dict[str, Any], path: pathlib.Path) -> network.T5Config:
    model_type = config_json.get("model_type")
    if model_type != "t5":
        raise ValueError(f"{path / 'config.json'} describes model_type {model_type!r}, not a "
                         "T5 model; only T5 checkpoints can be loaded.")
    projection = config_json.get("feed_forward_proj", "relu")
    activations = {"relu": ("relu",), "gated-gelu": ("gelu", "linear"),
                   "gated-relu": ("relu", "linear"), "gelu": ("gelu",)}.get(projection)
    if activations is None:
        raise ValueError(f"Unsupported feed_forward_proj {projection!r} in {path}.")
    num_layers = config_json["num_layers"]
    return network.T5Config(
        vocab_size=config_json["vocab_size"], emb_dim=config_json["d_model"],
        num_heads=config_json["num_heads"], head_dim=config_json["d_kv"],
        mlp_dim=config_json["d_ff"], num_encoder_layers=num_layers,
        num_decoder_layers=config_json.get("num_decoder_layers") or num_layers,
        mlp_activations=activations,
        # transformers 5 writes tie_word_embeddings=True for every T5 and keeps
        # the output scaling (T5.1.0's tied logits) in scale_decoder_outputs.
        logits_via_embedding=config_json.get("scale_decoder_outputs",
                                             config_json.get("tie_word_embeddings", True)),
        dropout_rate=config_json.get("dropout_rate", 0.1),
        relative_attention_num_buckets=config_json.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=config_json.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=config_json.get("layer_norm_epsilon", 1e-6))


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.exists():
        return safetensors.numpy.load_file(str(single))
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors = {}
        for name in files:
            tensors.update(safetensors.numpy.load_file(str(path / name)))
        return tensors
    if (path / "pytorch_model.bin").exists():
        raise ValueError(f"{path} holds only pytorch_model.bin, which would need unpickling. "
                         "Convert it to safetensors first, e.g. load it with transformers and "
                         "call save_pretrained(..., safe_serialization=True).")
    raise FileNotFoundError(f"{path} has no model.safetensors or model.safetensors.index.json.")


def _hf_names(config: network.T5Config) -> dict[str, tuple[str, bool]]:
    """Our parameter name -> (Hugging Face tensor name, transpose?)."""
    names = {"token_embedder/embedding": ("shared.weight", False)}
    attn = {"query": "q", "key": "k", "value": "v", "out": "o"}
    mlp = (["wi"] if len(config.mlp_activations) == 1
           else [f"wi_{i}" for i in range(len(config.mlp_activations))]) + ["wo"]
    for stack, num_layers in (("encoder", config.num_encoder_layers),
                              ("decoder", config.num_decoder_layers)):
        names[f"{stack}/relpos_bias/rel_embedding"] = (
            f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", True)
        final = "encoder_norm" if stack == "encoder" else "decoder_norm"
        names[f"{stack}/{final}/scale"] = (f"{stack}.final_layer_norm.weight", False)
        if stack == "encoder":
            blocks = [("attention", "pre_attention_layer_norm", "SelfAttention")]
        else:
            blocks = [("self_attention", "pre_self_attention_layer_norm", "SelfAttention"),
                      ("encoder_decoder_attention", "pre_cross_attention_layer_norm",
                       "EncDecAttention")]
        for i in range(num_layers):
            prefix, hf = f"{stack}/layers_{i}", f"{stack}.block.{i}.layer"
            for j, (ours, norm, theirs) in enumerate(blocks):
                names[f"{prefix}/{norm}/scale"] = (f"{hf}.{j}.layer_norm.weight", False)
                for a, b in attn.items():
                    names[f"{prefix}/{ours}/{a}/kernel"] = (f"{hf}.{j}.{theirs}.{b}.weight", True)
            j = len(blocks)
            names[f"{prefix}/pre_mlp_layer_norm/scale"] = (f"{hf}.{j}.layer_norm.weight", False)
            for w in mlp:
                names[f"{prefix}/mlp/{w}/kernel"] = (f"{hf}.{j}.DenseReluDense.{w}.weight", True)
    if not config.logits_via_embedding:
        names["decoder/logits_dense/kernel"] = ("lm_head.weight", True)
    return names


def load_hf_t5(path: str | pathlib.Path) -> tuple[network.T5Config, Params]:
    """Reads a Hugging Face T5 directory into (config, params)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No checkpoint at {path}.")
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a Hugging Face T5 directory (no config.json).")
    config = _hf_config(json.loads((path / "config.json").read_text()), path)
    tensors = _read_safetensors(path)
    expected = expected_shapes(config)
    flat = {}
    for ours, (theirs, transpose) in _hf_names(config).items():
        if theirs not in tensors:
            raise ValueError(f"{path}: tensor {theirs} (for {ours}) is missing.")
        value = np.asarray(tensors[theirs], np.float32)
        flat[ours] = value.T if transpose else value
        if flat[ours].shape != expected[ours]:
            raise ValueError(f"{path}: tensor {theirs} has shape {value.shape}, so parameter "
                             f"{ours} has shape {flat[ours].shape} but the model config "
                             f"expects {expected[ours]}.")
    params = flax.traverse_util.unflatten_dict(flat, sep="/")
    return config, check_params(params, config, str(path))


# ------------------------------------------------------------------------ T5X


def _kvstore(checkpoint_dir: str, relative: str) -> dict[str, str]:
    """A tensorstore kvstore spec for `relative` inside a local or gs:// folder."""
    if checkpoint_dir.startswith("gs://"):
        bucket, _, prefix = checkpoint_dir[len("gs://"):].partition("/")
        return {"driver": "gcs", "bucket": bucket,
                "path": f"{prefix.strip('/')}/{relative}".lstrip("/")}
    return {"driver": "file", "path": f"{pathlib.Path(checkpoint_dir).resolve()}/{relative}"}


def _read_tensorstore(spec: dict[str, Any], checkpoint_dir: str) -> np.ndarray:
    """Reads one T5X array, whose spec carries the zarr metadata inline."""
    spec = json.loads(json.dumps(spec))
    spec["kvstore"] = _kvstore(checkpoint_dir, spec["kvstore"].get("path", "").rstrip("/") + "/")
    # T5X keeps the zarr metadata in the spec; the folders hold only chunks.
    return ts.open(spec, open=True, assume_metadata=True).result().read().result()


def _read_placeholder(name: str, checkpoint_dir: str) -> np.ndarray:
    """Reads one array of T5X's orbax-era layout: a zarr folder named `name`."""
    kvstore = _kvstore(checkpoint_dir, name + "/")
    if not ts.KvStore.open(kvstore).result().read(".zarray").result().value:
        raise NotImplementedError(
            f"{checkpoint_dir}: array {name} of this orbax-era T5X checkpoint has no zarr "
            "metadata (.zarray) beside its chunks; this layout is not supported. Restore it "
            "with T5X and re-save it as a legacy (msgpack + tensorstore) checkpoint.")
    return ts.open({"driver": "zarr", "kvstore": kvstore}, open=True).result().read().result()


def _read_bytes(path: str) -> bytes:
    """The bytes of a local or gs:// file."""
    if path.startswith("gs://"):
        directory, _, name = path.rpartition("/")
        result = ts.KvStore.open(_kvstore(directory, "")).result().read(name).result()
        if result.state != "value":
            raise FileNotFoundError(f"No T5X checkpoint file at {path}.")
        return result.value
    return pathlib.Path(path).read_bytes()


def read_t5x_msgpack_tree(path: str | pathlib.Path) -> dict[str, Any]:
    """The whole T5X checkpoint tree, tensorstore / zarr arrays read into numpy.

    Args:
      path: a `checkpoint_<step>` folder or the `checkpoint` file in it (local or gs://).
    """
    path_str = str(path)
    if path_str.startswith("gs://"):
        if not path_str.endswith("/checkpoint"):
            path_str = path_str.rstrip("/") + "/checkpoint"
    else:
        local = pathlib.Path(path_str)
        if local.is_dir():
            local = local / "checkpoint"
        if not local.exists():
            raise FileNotFoundError(f"No T5X checkpoint file at {local}.")
        path_str = str(local)
    checkpoint_dir = path_str.rpartition("/")[0] if path_str.startswith("gs://") else str(
        pathlib.Path(path_str).parent)
    tree = flax.serialization.msgpack_restore(_read_bytes(path_str))

    def resolve(node):
        if isinstance(node, dict) and node.get("driver") in ("zarr", "zarr3"):
            return _read_tensorstore(node, checkpoint_dir)
        if isinstance(node, dict):
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, str) and node.startswith(_PLACEHOLDER):
            return _read_placeholder(node[len(_PLACEHOLDER):], checkpoint_dir)
        return node

    return resolve(tree)


def load_t5x_checkpoint(path: str | pathlib.Path, config: network.T5Config) -> Params:
    """The `optimizer/target` params of a T5X checkpoint, checked against config."""
    tree = read_t5x_msgpack_tree(path)
    try:
        # Legacy checkpoints say `optimizer`, orbax-era ones `_optimizer`.
        target = tree["optimizer" if "optimizer" in tree else "_optimizer"]["target"]
    except (KeyError, TypeError):
        raise ValueError(f"{path} is not a T5X checkpoint: no optimizer/target tree "
                         f"(top-level keys {sorted(tree)[:5]}).") from None
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), target)
    return check_params(params, config, str(path))


# -------------------------------------------------------------------- dispatch


def load_params(spec: str, config: network.T5Config) -> Params:
    """Params from our orbax dir, a Hugging Face T5 dir or a T5X checkpoint."""
    if spec.startswith("gs://"):
        return load_t5x_checkpoint(spec, config)
    path = pathlib.Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"No checkpoint at {spec}.")
    if (path / "config.json").exists():
        hf_config, params = load_hf_t5(path)
        differing = [f for f in _ARCHITECTURE_FIELDS
                     if getattr(hf_config, f) != getattr(config, f)]
        if differing:
            raise ValueError(f"{spec} has a different architecture than the model config: "
                             + ", ".join(f"{f}={getattr(hf_config, f)} (config "
                                         f"{getattr(config, f)})" for f in differing))
        return params
    if (path / "checkpoint").exists() or path.name == "checkpoint":
        return load_t5x_checkpoint(path, config)
    return check_params(restore_params(path), config, spec)
