"""Loading and saving parameters: our orbax checkpoints, Hugging Face T5
safetensors, and T5X checkpoints. Nothing here ever unpickles.

- `save_params(path, params)` / `restore_params(path, target=None)`: orbax.
- `load_hf_t5(path) -> (T5Config, params)`: a Hugging Face T5 directory
  (`config.json` + `model.safetensors` or a sharded safetensors index).
- `load_t5x_checkpoint(path, config) -> params`: a T5X checkpoint, local or
  `gs://`: the legacy msgpack `checkpoint` file whose large arrays live in
  tensorstore / zarr folders named by their dotted path; the orbax-era layout
  (msgpack with `PLACEHOLDER://` entries and zarr folders with `.zarray`); or
  T5X's standard orbax layout (`checkpoint_<step>/state/`, local only).
- `read_t5x_msgpack_tree(path)`: the whole T5X msgpack tree, arrays read.
- `load_params(spec, config)`: any of the above, told apart by what the path
  holds, checked against `config`.

Parameters come back as float32 numpy arrays in the tree of `network.py`.
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
_PLACEHOLDER = "PLACEHOLDER://"  # An array stored beside the msgpack (orbax-era T5X).
# Architecture fields compared when a Hugging Face directory is loaded for a config.
_ARCHITECTURE_FIELDS = ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim",
                        "num_encoder_layers", "num_decoder_layers", "mlp_activations",
                        "logits_via_embedding", "relative_attention_num_buckets",
                        "relative_attention_max_distance", "layer_norm_epsilon")
# Hugging Face activation names (after `gated-`) -> ours. HF's "gelu" is the
# exact erf GELU; "gated-gelu" is special-cased to the tanh form (gelu_new).
_HF_ACTIVATIONS = {"relu": "relu", "gelu": "gelu_exact", "gelu_new": "gelu",
                   "gelu_pytorch_tanh": "gelu", "silu": "silu", "swish": "silu"}
# Tensors that transformers itself ignores in T5 checkpoints.
_HF_IGNORED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)
# Other weight files that Hugging Face directories may hold, none of them read here.
_HF_OTHER_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5",
                     "flax_model.msgpack", "model.ckpt.index")


# ---------------------------------------------------------------------- orbax


def save_params(path: str | pathlib.Path, params: Params) -> None:
    """Writes params with orbax to `path` (replaced if it exists).

    Args:
      path: a directory; made absolute, as orbax requires.
      params: any pytree of arrays.
    """
    path = pathlib.Path(path).absolute()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, jax.device_get(params), force=True)


def _is_orbax_dir(path: pathlib.Path) -> bool:
    return (path / "_METADATA").exists() or (path / "_CHECKPOINT_METADATA").exists()


def restore_params(path: str | pathlib.Path, target: Params | None = None) -> Params:
    """Reads params written by `save_params`.

    Args:
      path: the directory given to `save_params`.
      target: optional pytree to restore into: jax arrays (the result is
        placed as they are) or `jax.ShapeDtypeStruct`s with shardings; None,
        numpy arrays or structs without sharding give numpy arrays.

    Raises:
      FileNotFoundError: nothing at `path`.
      ValueError: `path` is not an orbax checkpoint.
    """
    path = pathlib.Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"No checkpoint at {path}.")
    if not _is_orbax_dir(path):
        raise ValueError(f"{path} is not an orbax checkpoint written by save_params (no "
                         "_METADATA); for Hugging Face or T5X checkpoints use load_params.")
    with ocp.StandardCheckpointer() as checkpointer:
        if target is None:
            return checkpointer.restore(path)
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        return checkpointer.restore(path, abstract)


# --------------------------------------------------------------------- checks


@functools.lru_cache(maxsize=16)
def expected_shapes(config: network.T5Config) -> dict[str, tuple[int, ...]]:
    """'encoder/layers_0/attention/query/kernel' -> shape, for a config (cached)."""
    shapes = jax.eval_shape(models.EncoderDecoderModel(config).init, jax.random.PRNGKey(0))
    flat = flax.traverse_util.flatten_dict(shapes, sep="/")
    return {name: tuple(value.shape) for name, value in flat.items()}


def check_params(params: Params, config: network.T5Config, source: str) -> Params:
    """Checks names and shapes against the config; errors name the parameter.

    Returns:
      `params`, unchanged.
    """
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source} does not match the model config: missing parameters "
                         f"{missing[:5]}, unexpected parameters {unexpected[:5]}. Check that "
                         "the T5Config (gin) describes the checkpoint's architecture.")
    for name, shape in expected.items():
        if tuple(np.shape(flat[name])) != shape:
            raise ValueError(f"{source}: parameter {name} has shape {tuple(np.shape(flat[name]))}"
                             f" but the model config expects {shape}.")
    return params


def _float32(tree: Params) -> Params:
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), tree)


# --------------------------------------------------------------- Hugging Face


def _hf_config(config_json: dict[str, Any], path: pathlib.Path) -> network.T5Config:
    """Our T5Config from a Hugging Face T5 `config.json` dict."""
    where = path / "config.json"
    model_type = config_json.get("model_type")
    if model_type != "t5":
        raise ValueError(f"{where} describes model_type {model_type!r}, not a T5 model; "
                         "only T5 checkpoints (model_type 't5') can be loaded.")
    projection = config_json.get("feed_forward_proj", "relu")
    gated = projection.startswith("gated-")
    name = projection.removeprefix("gated-")
    activation = "gelu" if projection == "gated-gelu" else _HF_ACTIVATIONS.get(name)
    if activation is None:
        raise ValueError(f"{where}: feed_forward_proj {projection!r} is not supported; use "
                         f"one of {sorted(_HF_ACTIVATIONS)}, optionally with 'gated-'.")
    missing = [k for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers")
               if k not in config_json]
    if missing:
        raise ValueError(f"{where} lacks {missing}; a T5 config.json needs them.")
    num_layers = config_json["num_layers"]
    # transformers 5 writes tie_word_embeddings=True for every T5 and keeps the
    # output scaling (T5.1.0's tied, scaled logits) in scale_decoder_outputs.
    scaled = config_json.get("scale_decoder_outputs",
                             config_json.get("tie_word_embeddings", True) is not False)
    return network.T5Config(
        vocab_size=config_json["vocab_size"], emb_dim=config_json["d_model"],
        num_heads=config_json["num_heads"], head_dim=config_json["d_kv"],
        mlp_dim=config_json["d_ff"], num_encoder_layers=num_layers,
        num_decoder_layers=config_json.get("num_decoder_layers") or num_layers,
        mlp_activations=(activation, "linear") if gated else (activation,),
        logits_via_embedding=bool(scaled),
        dropout_rate=config_json.get("dropout_rate", 0.1),
        relative_attention_num_buckets=config_json.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=config_json.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=config_json.get("layer_norm_epsilon", 1e-6))


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    """All tensors of `model.safetensors` or of the shards its index lists."""
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.exists():
        return safetensors.numpy.load_file(str(single))
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors = {}
        for name in files:
            if not (path / name).exists():
                raise FileNotFoundError(f"{index} lists the shard {name}, which is missing.")
            tensors.update(safetensors.numpy.load_file(str(path / name)))
        return tensors
    others = [name for name in _HF_OTHER_WEIGHTS if (path / name).exists()]
    if others:
        raise ValueError(
            f"{path} holds only {', '.join(others)}, which would need unpickling or another "
            "framework. Convert it to safetensors first, e.g. with transformers: "
            "T5ForConditionalGeneration.from_pretrained(path).save_pretrained(new_path) "
            "(safetensors is its default).")
    raise FileNotFoundError(f"{path} has no model.safetensors or model.safetensors.index.json.")


def _hf_names(config: network.T5Config) -> dict[str, tuple[str, bool]]:
    """Our parameter name -> (Hugging Face tensor name, transpose?), without the
    embedding and the output layer (see `load_hf_t5`)."""
    names = {}
    attn = {"query": "q", "key": "k", "value": "v", "out": "o"}
    mlp = (["wi"] if len(config.mlp_activations) == 1
           else [f"wi_{i}" for i in range(len(config.mlp_activations))]) + ["wo"]
    for stack, num_layers in (("encoder", config.num_encoder_layers),
                              ("decoder", config.num_decoder_layers)):
        # [buckets, heads] in PyTorch, [heads, buckets] here.
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
                    # torch Linear weights are [out, in]; our kernels [in, out].
                    names[f"{prefix}/{ours}/{a}/kernel"] = (f"{hf}.{j}.{theirs}.{b}.weight", True)
            j = len(blocks)
            names[f"{prefix}/pre_mlp_layer_norm/scale"] = (f"{hf}.{j}.layer_norm.weight", False)
            for w in mlp:
                names[f"{prefix}/mlp/{w}/kernel"] = (f"{hf}.{j}.DenseReluDense.{w}.weight", True)
    return names


def _hf_embedding_name(tensors: dict[str, np.ndarray], config: network.T5Config,
                      path: pathlib.Path) -> str:
    """The tensor holding the one token embedding; all tensors tied to it must equal it."""
    tied = ["shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"]
    if config.logits_via_embedding:
        tied.append("lm_head.weight")
    present = [name for name in tied if name in tensors]
    if not present:
        raise ValueError(f"{path}: tensor shared.weight (for token_embedder/embedding) is "
                         f"missing, and so are {tied[1:]}.")
    embedding = tensors[present[0]]
    for name in present[1:]:
        if tensors[name].shape != embedding.shape or not np.array_equal(tensors[name],
                                                                        embedding):
            what = ("tied, scaled output logits (T5.1.0; config.json has tie_word_embeddings "
                    "true)" if name == "lm_head.weight" else "encoder and decoder inputs")
            raise ValueError(f"{path}: {name} differs from {present[0]}, but this network "
                             f"uses one token embedding for {what}; such a checkpoint is not "
                             "supported.")
    return present[0]


def _hf_tensor(tensors: dict[str, np.ndarray], theirs: str, ours: str, transpose: bool,
               expected: tuple[int, ...], path: pathlib.Path) -> np.ndarray:
    if theirs not in tensors:
        raise ValueError(f"{path}: tensor {theirs} (for {ours}) is missing.")
    value = np.asarray(tensors[theirs], np.float32)
    result = np.ascontiguousarray(value.T) if transpose else value
    if result.shape != expected:
        raise ValueError(f"{path}: tensor {theirs} has shape {value.shape}, so parameter "
                         f"{ours} has shape {result.shape} but the model config "
                         f"expects {expected}.")
    return result


def load_hf_t5(path: str | pathlib.Path) -> tuple[network.T5Config, Params]:
    """Reads a Hugging Face T5 directory into (config, params).

    The directory holds `config.json` and `model.safetensors` (or a sharded
    `model.safetensors.index.json`). T5.1.0 configs (`tie_word_embeddings`
    true, or transformers 5's `scale_decoder_outputs` true) give
    `logits_via_embedding=True`; a `lm_head.weight` in such a file must equal
    the embedding. Otherwise `lm_head.weight` becomes `decoder/logits_dense`;
    when the file has none, the embedding is used there, as transformers 5
    does (unscaled logits through the shared embedding).

    Args:
      path: the directory.

    Returns:
      (config, params): float32 numpy params in the tree of `network.py`.

    Raises:
      FileNotFoundError: no such directory, no config.json or no weights.
      ValueError: not a T5, weights only as pickles, or tensors missing,
        unexpected or of the wrong shape (named in the message).
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No checkpoint at {path}.")
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a Hugging Face T5 directory (no config.json).")
    config = _hf_config(json.loads((path / "config.json").read_text()), path)
    tensors = _read_safetensors(path)
    expected = expected_shapes(config)
    embedding = _hf_embedding_name(tensors, config, path)
    flat = {"token_embedder/embedding": _hf_tensor(
        tensors, embedding, "token_embedder/embedding", False,
        expected["token_embedder/embedding"], path)}
    used = {"shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
            *_HF_IGNORED}
    for ours, (theirs, transpose) in _hf_names(config).items():
        flat[ours] = _hf_tensor(tensors, theirs, ours, transpose, expected[ours], path)
        used.add(theirs)
    head = "lm_head.weight" if "lm_head.weight" in tensors else embedding
    used.add(head)
    if not config.logits_via_embedding:
        flat["decoder/logits_dense/kernel"] = _hf_tensor(
            tensors, head, "decoder/logits_dense/kernel", True,
            expected["decoder/logits_dense/kernel"], path)
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        raise ValueError(f"{path}: unexpected tensors {unexpected[:8]} (of {len(unexpected)}) "
                         "that the T5 described by config.json does not have; check "
                         "num_layers, num_decoder_layers and feed_forward_proj there.")
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


def _is_tensorstore_spec(node: Any) -> bool:
    return isinstance(node, dict) and "driver" in node and ("kvstore" in node or "path" in node)


def _read_tensorstore(spec: dict[str, Any], checkpoint_dir: str) -> np.ndarray:
    """Reads one array of a legacy T5X checkpoint from its tensorstore spec.

    T5X keeps the zarr metadata in the spec and writes the path relative to the
    checkpoint folder, in `kvstore.path` (tensorstore >= 0.1.14) or `path`.
    """
    spec = json.loads(json.dumps(spec))
    kvstore = spec.get("kvstore") or {}
    relative = (kvstore.get("path") or spec.get("path") or "").rstrip("/")
    if not relative:
        raise ValueError(f"{checkpoint_dir}: a tensorstore spec without a path: {spec}.")
    spec.pop("path", None)
    spec["kvstore"] = _kvstore(checkpoint_dir, relative + "/")
    if spec["kvstore"]["driver"] == "file" and not pathlib.Path(
            spec["kvstore"]["path"]).is_dir():
        # zarr would silently read a missing folder as zeros.
        raise FileNotFoundError(f"{checkpoint_dir}: the array folder {relative} is missing; "
                                "copy the whole checkpoint folder, not only its msgpack file.")
    try:
        store = ts.open(spec, open=True, assume_metadata=True).result()
    except ValueError:  # A spec without complete metadata: read the folder's .zarray.
        store = ts.open(spec, open=True).result()
    return store.read().result()


def _read_placeholder(name: str, checkpoint_dir: str) -> np.ndarray:
    """Reads one array of the orbax-era T5X layout: a zarr folder named `name`."""
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
    """The whole tree of a T5X msgpack checkpoint, with every array read.

    Inline arrays are decoded by flax's msgpack serialization; tensorstore
    specs (legacy layout) and `PLACEHOLDER://` entries (orbax-era layout) are
    replaced by the arrays they point to.

    Args:
      path: a `checkpoint_<step>` folder or the `checkpoint` file in it (local
        or gs://).

    Returns:
      A nested dict of numpy arrays and scalars, e.g.
      `tree['optimizer']['target']['encoder']['layers_0']...`.
    """
    path_str = str(path)
    if path_str.startswith("gs://"):
        if not path_str.rstrip("/").endswith("/checkpoint"):
            path_str = path_str.rstrip("/") + "/checkpoint"
        checkpoint_dir = path_str.rpartition("/")[0]
    else:
        local = pathlib.Path(path_str)
        if local.is_dir():
            local = local / "checkpoint"
        if not local.is_file():
            raise FileNotFoundError(f"No T5X checkpoint file at {local}.")
        path_str, checkpoint_dir = str(local), str(local.parent)
    tree = flax.serialization.msgpack_restore(_read_bytes(path_str))

    def resolve(node):
        if _is_tensorstore_spec(node):
            return _read_tensorstore(node, checkpoint_dir)
        if isinstance(node, dict):
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, str) and node.startswith(_PLACEHOLDER):
            return _read_placeholder(node[len(_PLACEHOLDER):], checkpoint_dir)
        return node

    return resolve(tree)


def _read_t5x_tree(path: str | pathlib.Path) -> dict[str, Any]:
    """The T5X state tree of any supported layout."""
    local = pathlib.Path(path) if not str(path).startswith("gs://") else None
    if local is not None and (local / "state").is_dir():  # T5X's standard orbax layout.
        state = local / "state"
        if (state / "checkpoint").is_file():
            return read_t5x_msgpack_tree(state)
        if not _is_orbax_dir(state):
            raise ValueError(f"{state} is neither a msgpack nor an orbax T5X state.")
        with ocp.PyTreeCheckpointer() as checkpointer:
            return checkpointer.restore(state.absolute())
    if local is not None and local.is_dir() and _is_orbax_dir(local) and local.name == "state":
        with ocp.PyTreeCheckpointer() as checkpointer:
            return checkpointer.restore(local.absolute())
    return read_t5x_msgpack_tree(path)


def load_t5x_checkpoint(path: str | pathlib.Path, config: network.T5Config) -> Params:
    """The params (`optimizer/target`) of a T5X checkpoint, checked against config.

    Args:
      path: a `checkpoint_<step>` folder, its msgpack `checkpoint` file, or its
        `state` folder (standard orbax layout); local or gs:// (msgpack only).
      config: the architecture the params must have.

    Returns:
      float32 numpy params in the tree of `network.py`.

    Raises:
      FileNotFoundError: no checkpoint there.
      ValueError: no params tree, or parameters missing, unexpected or of the
        wrong shape (named in the message).
    """
    tree = _read_t5x_tree(path)
    target = None
    if isinstance(tree, dict):
        # Legacy checkpoints say `optimizer`, orbax-era ones `_optimizer`; the
        # standard orbax layout keeps `target` at the top.
        for key in ("optimizer", "_optimizer"):
            if isinstance(tree.get(key), dict) and "target" in tree[key]:
                target = tree[key]["target"]
        if target is None and "target" in tree:
            target = tree["target"]
    if not target:
        keys = sorted(tree)[:5] if isinstance(tree, dict) else type(tree).__name__
        raise ValueError(f"{path} is not a T5X checkpoint of a model: no optimizer/target "
                         f"params (top-level keys {keys}).")
    return check_params(_float32(target), config, str(path))


# ------------------------------------------------------------------- dispatch


def load_params(spec: str, config: network.T5Config) -> Params:
    """Params from our orbax dir, a Hugging Face T5 dir or a T5X checkpoint.

    Args:
      spec: a path. `gs://...` is a T5X checkpoint; a directory with
        `config.json` is Hugging Face (its architecture must equal `config`'s);
        a `checkpoint` file, or a directory holding one or a `state` folder, is
        T5X; any other directory is an orbax checkpoint of `save_params`.
      config: the architecture the params must have.

    Returns:
      The params, checked against `config` (names and shapes).

    Raises:
      FileNotFoundError: nothing at `spec`.
      ValueError: the checkpoint does not fit `config` (differences named).
    """
    spec = str(spec)
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
                                         f"{getattr(config, f)})" for f in differing)
                             + ". Bind the checkpoint's values in the gin config.")
        return params
    if path.name == "checkpoint" or (path / "checkpoint").is_file() or (
            path / "state").is_dir():
        return load_t5x_checkpoint(path, config)
    if not _is_orbax_dir(path):
        raise ValueError(f"{spec} is not a checkpoint: expected an orbax directory written by "
                         "save_params, a Hugging Face T5 directory (config.json + "
                         "model.safetensors) or a T5X checkpoint_<step> folder.")
    return check_params(restore_params(path), config, spec)
