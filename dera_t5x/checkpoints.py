"""Loading and saving parameters: our orbax checkpoints, Hugging Face T5
safetensors, and T5X checkpoints. Nothing here ever unpickles.

- `save_params(path, params)` / `restore_params(path, target=None)`: orbax.
- `load_hf(path) -> (config, params)`: a Hugging Face directory
  (`config.json` + `model.safetensors` or a sharded safetensors index) of
  any family; `load_hf_t5(path)` the same for T5 only.
- `load_t5x_checkpoint(path, config) -> params`: a T5X checkpoint, local or
  `gs://`: the legacy msgpack `checkpoint` file whose large arrays live in
  tensorstore / zarr folders named by their dotted path; the orbax-era layout
  (msgpack with `PLACEHOLDER://` entries and zarr folders with `.zarray`); or
  T5X's standard orbax layout (`checkpoint_<step>/state/`, local only).
- `read_t5x_msgpack_tree(path)`: the whole T5X msgpack tree, arrays read.
- `load_params(spec, config)`: any of the above, told apart by what the path
  holds, checked against `config`.

Parameters come back as float32 numpy arrays in the family's tree.

Integrity: nothing damaged loads silently. `save_params` (and the trainer's
checkpoints) record a sha256 per array (`tree_checksums`), verified on every
restore; the error names the checkpoint and the array. Checkpoints others
wrote carry no checksums of ours: every parameter is checked finite (file and
tensor named), a missing zarr chunk of a T5X checkpoint is an error (never
zeros), and truncated files (`model.safetensors`, orbax `_METADATA`, a T5X
msgpack) are errors naming the file. All are `CheckpointIntegrityError`, a
`ValueError`.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any

import flax.serialization
import flax.traverse_util
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import safetensors.numpy
import tensorstore as ts

from dera_t5x import integrity
from dera_t5x import models
from dera_t5x.models.decoder_only import hf as decoder_only_hf
from dera_t5x.models.t5 import hf as t5_hf
from dera_t5x.models.t5 import network

Params = Any
_PLACEHOLDER = "PLACEHOLDER://"  # An array stored beside the msgpack (orbax-era T5X).
# Architecture fields compared when a Hugging Face directory is loaded for a config.
_ARCHITECTURE_FIELDS = ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim",
                        "num_encoder_layers", "num_decoder_layers", "mlp_activations",
                        "logits_via_embedding", "relative_attention_num_buckets",
                        "relative_attention_max_distance", "layer_norm_epsilon")
# model_type in config.json -> the family module that reads its tensors.
_HF_FAMILIES = {"t5": t5_hf, "llama": decoder_only_hf, "mistral": decoder_only_hf,
                "qwen2": decoder_only_hf}
# Other weight files that Hugging Face directories may hold, none of them read here.
_HF_OTHER_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5",
                     "flax_model.msgpack", "model.ckpt.index")


# Re-exported: the errors and checks callers of this module meet.
CheckpointIntegrityError = integrity.CheckpointIntegrityError
check_finite = integrity.check_finite
CHECKSUMS_FILE = "dera_checksums.json"  # inside a save_params directory


# ---------------------------------------------------------------------- orbax


def save_params(path: str | pathlib.Path, params: Params) -> None:
    """Writes params with orbax to `path` (replaced if it exists), with a
    manifest of per-array sha256 checksums (`dera_checksums.json` inside).

    The checkpoint is written to a sibling `.<name>.saving` folder and renamed
    into place with its manifest, so `path` never holds a checkpoint without
    checksums.

    Args:
      path: a directory; made absolute, as orbax requires.
      params: any pytree of arrays.
    """
    path = pathlib.Path(path).absolute()
    host = jax.device_get(params)
    saving = path.with_name(f".{path.name}.saving")
    old = path.with_name(f".{path.name}.old")
    lead = jax.process_index() == 0
    if lead:
        for leftover in (saving, old):
            if leftover.exists():
                shutil.rmtree(leftover)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(saving, host, force=True)
    if lead:
        integrity.write_json_atomically(saving / CHECKSUMS_FILE, integrity.tree_checksums(host))
        if path.exists():
            path.rename(old)
        saving.rename(path)
        if old.exists():
            shutil.rmtree(old)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"save_params {path}")


def _is_orbax_dir(path: pathlib.Path) -> bool:
    return (path / "_METADATA").exists() or (path / "_CHECKPOINT_METADATA").exists()


def restore_params(path: str | pathlib.Path, target: Params | None = None) -> Params:
    """Reads params written by `save_params`, verified against their checksums.

    Args:
      path: the directory given to `save_params`.
      target: optional pytree to restore into: jax arrays (the result is
        placed as they are) or `jax.ShapeDtypeStruct`s with shardings; None,
        numpy arrays or structs without sharding give numpy arrays. A target
        dtype other than the saved one is read as saved, verified, then cast.

    Raises:
      FileNotFoundError: nothing at `path`.
      ValueError: `path` is not an orbax checkpoint.
      CheckpointIntegrityError (a ValueError): no checksum manifest (see
        `integrity.UNVERIFIED_ENV`), an array that differs from its checksum, a damaged
        `_METADATA`, or a parameter holding NaN / inf; the message names it.
    """
    path = pathlib.Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"No checkpoint at {path}.")
    if not _is_orbax_dir(path):
        raise ValueError(f"{path} is not an orbax checkpoint written by save_params (no "
                         "_METADATA); for Hugging Face or T5X checkpoints use load_params.")
    manifest = integrity.read_checksums(path / CHECKSUMS_FILE, path)
    integrity.check_orbax_metadata(path, path)
    abstract = None
    if target is not None:
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        if manifest is not None:  # Read as saved; cast after verifying.
            recorded = manifest["arrays"]
            abstract = jax.tree_util.tree_map_with_path(
                lambda p, s: s.update(dtype=np.dtype(recorded[integrity.key_name(p)]["dtype"]))
                if integrity.key_name(p) in recorded else s, abstract)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(path, abstract)
    except CheckpointIntegrityError:
        raise
    except Exception as e:  # noqa: BLE001  (orbax / tensorstore raise many kinds)
        raise integrity.orbax_error(path, e) from e
    integrity.verify_checksums(restored, manifest, path)
    if target is not None:
        restored = jax.tree_util.tree_map(
            lambda x, t: x if x.dtype == t.dtype else x.astype(t.dtype), restored, target)
    return check_finite(restored, path)


# --------------------------------------------------------------------- checks


def check_params(params: Params, config: Any, source: str) -> Params:
    """`models.for_config(config).check_params`: names and shapes; returns params."""
    return models.for_config(config).check_params(params, source)


def _float32(tree: Params) -> Params:
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), tree)


# --------------------------------------------------------------- Hugging Face


def _load_safetensors_file(file: pathlib.Path) -> dict[str, np.ndarray]:
    """The tensors of one safetensors file, each checked finite; a truncated or
    damaged file is an error naming it (the library's own message says neither)."""
    try:
        tensors = safetensors.numpy.load_file(str(file))
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
        raise CheckpointIntegrityError(
            f"{file} cannot be read as safetensors ({type(e).__name__}: {e}); the file is "
            "truncated or damaged. Download or copy it again.") from e
    for name, value in tensors.items():
        if jnp.issubdtype(value.dtype, jnp.inexact) and not np.all(np.isfinite(value)):
            raise CheckpointIntegrityError(
                f"{file}: tensor {name} holds non-finite values (NaN or inf); the checkpoint "
                "is damaged or was saved from a diverged run.")
    return tensors


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    """All tensors of `model.safetensors` or of the shards its index lists."""
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.exists():
        return _load_safetensors_file(single)
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointIntegrityError(
                f"{index} is not a valid safetensors index (a JSON object with a "
                f"'weight_map'): {type(e).__name__}: {e}. Download or copy it again.") from e
        tensors = {}
        for name in files:
            if not (path / name).exists():
                raise FileNotFoundError(f"{index} lists the shard {name}, which is missing.")
            tensors.update(_load_safetensors_file(path / name))
        return tensors
    others = [name for name in _HF_OTHER_WEIGHTS if (path / name).exists()]
    if others:
        raise ValueError(
            f"{path} holds only {', '.join(others)}, which would need unpickling or another "
            "framework. Convert it to safetensors first, e.g. with transformers: "
            "T5ForConditionalGeneration.from_pretrained(path).save_pretrained(new_path) "
            "(safetensors is its default).")
    raise FileNotFoundError(f"{path} has no model.safetensors or model.safetensors.index.json.")


def load_hf(path: str | pathlib.Path, dtype: str | None = None) -> tuple[Any, Params]:
    """Reads a Hugging Face directory into (config, params) for its `model_type`.

    The directory holds `config.json` and `model.safetensors` (or a sharded
    `model.safetensors.index.json`); each family maps the tensor names
    (`models/<family>/hf.py`). `dtype` (decoder-only families only): the
    parameters' dtype, e.g. "bfloat16"; None gives float32.

    Raises:
      FileNotFoundError: no such directory, no config.json or no weights.
      ValueError: an unknown model_type, weights only as pickles, or tensors
        missing, unexpected or of the wrong shape (named in the message).
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No checkpoint at {path}.")
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json).")
    config_json = json.loads((path / "config.json").read_text())
    model_type = config_json.get("model_type")
    family = _HF_FAMILIES.get(model_type)
    if family is None:
        raise ValueError(f"{path / 'config.json'} describes model_type {model_type!r}, not a "
                         f"T5 or another supported family; the supported model types are "
                         f"{sorted(_HF_FAMILIES)}.")
    config = family.config_from_hf(config_json, path)
    # dtype: the parameters' dtype where the family supports one (None: float32).
    kwargs = {} if dtype is None else {"dtype": dtype}
    return config, family.params_from_hf(_read_safetensors(path), config, path, **kwargs)


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
    config, params = load_hf(path)
    if not isinstance(config, network.T5Config):
        raise ValueError(f"{path} holds a {type(config).__name__} model, not a T5; use "
                         "checkpoints.load_hf for any family.")
    return config, params


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
        ts.open(spec, open=True, assume_metadata=True).result()
        options = {"assume_metadata": True}
    except ValueError:  # A spec without complete metadata: read the folder's .zarray.
        options = {}
    return _read_zarr(spec, options, checkpoint_dir, relative)


def _read_zarr(spec: dict[str, Any], options: dict[str, Any], checkpoint_dir: str,
               name: str) -> np.ndarray:
    """Reads a zarr array; a chunk missing from its folder is an error.

    zarr reads a missing chunk as the fill value (zeros when the metadata has
    none, as T5X writes it), so a damaged copy would load silently. Unless the
    metadata declares a fill value (then a missing chunk legitimately holds
    it), missing chunks are refused, naming the array.
    """
    try:
        store = ts.open(spec, open=True, **options).result()
        if store.fill_value is None:
            store = ts.open(dict(spec, fill_missing_data_reads=False), open=True,
                            **options).result()
        return store.read().result()
    except ValueError as e:
        if "NOT_FOUND" in str(e) or "missing" in str(e):
            raise CheckpointIntegrityError(
                f"{checkpoint_dir}: array {name} is incomplete: {e}. The checkpoint was "
                "copied or written partially; copy the whole checkpoint folder again.") from e
        raise CheckpointIntegrityError(
            f"{checkpoint_dir}: array {name} cannot be read ({e}); its files are damaged.") from e


def _read_placeholder(name: str, checkpoint_dir: str) -> np.ndarray:
    """Reads one array of the orbax-era T5X layout: a zarr folder named `name`."""
    kvstore = _kvstore(checkpoint_dir, name + "/")
    if not ts.KvStore.open(kvstore).result().read(".zarray").result().value:
        raise NotImplementedError(
            f"{checkpoint_dir}: array {name} of this orbax-era T5X checkpoint has no zarr "
            "metadata (.zarray) beside its chunks; this layout is not supported. Restore it "
            "with T5X and re-save it as a legacy (msgpack + tensorstore) checkpoint.")
    return _read_zarr({"driver": "zarr", "kvstore": kvstore}, {}, checkpoint_dir, name)


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
    data = _read_bytes(path_str)
    try:
        tree = flax.serialization.msgpack_restore(data)
    except Exception as e:  # noqa: BLE001  (msgpack raises several kinds)
        raise CheckpointIntegrityError(
            f"{path_str} cannot be read as a T5X msgpack checkpoint ({type(e).__name__}: "
            f"{e}); the file is truncated or damaged. Copy it again.") from e

    def resolve(node):
        if _is_tensorstore_spec(node):
            return _read_tensorstore(node, checkpoint_dir)
        if isinstance(node, dict):
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, str) and node.startswith(_PLACEHOLDER):
            return _read_placeholder(node[len(_PLACEHOLDER):], checkpoint_dir)
        return node

    return resolve(tree)


def _restore_t5x_orbax(state: pathlib.Path) -> Any:
    """T5X's standard orbax `state` folder (no checksums of ours: T5X wrote it)."""
    integrity.check_orbax_metadata(state, state)
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            return checkpointer.restore(state.absolute())
    except Exception as e:  # noqa: BLE001  (orbax / tensorstore raise many kinds)
        raise integrity.orbax_error(state, e) from e


def _read_t5x_tree(path: str | pathlib.Path) -> dict[str, Any]:
    """The T5X state tree of any supported layout."""
    local = pathlib.Path(path) if not str(path).startswith("gs://") else None
    if local is not None and (local / "state").is_dir():  # T5X's standard orbax layout.
        state = local / "state"
        if (state / "checkpoint").is_file():
            return read_t5x_msgpack_tree(state)
        if not _is_orbax_dir(state):
            raise ValueError(f"{state} is neither a msgpack nor an orbax T5X state.")
        return _restore_t5x_orbax(state)
    if local is not None and local.is_dir() and _is_orbax_dir(local) and local.name == "state":
        return _restore_t5x_orbax(local)
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
    return check_params(check_finite(_float32(target), path), config, str(path))


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
