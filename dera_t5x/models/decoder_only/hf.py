"""Hugging Face Llama, Mistral and Qwen2 checkpoints: config.json fields and
tensor names -> ours (see `network` for our parameter tree)."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import flax.traverse_util
import jax.numpy as jnp
import numpy as np

from dera_t5x.models import protocol
from dera_t5x.models.decoder_only import model as decoder_only_model
from dera_t5x.models.decoder_only import network

Params = Any
MODEL_TYPES = network.MODEL_TYPES
# transformers' defaults where config.json may leave a field out.
_DEFAULT_MAX_POSITIONS = {"llama": 2048, "mistral": 4096 * 32, "qwen2": 32768}
# Tensors some converted checkpoints carry that transformers recomputes.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
_PARAM_DTYPES = ("float32", "bfloat16", "float16")
_FILE_DTYPES = tuple(jnp.dtype(d) for d in ("float32", "bfloat16", "float16", "float64"))


def _eos_ids(config_json: dict[str, Any], path: pathlib.Path) -> tuple[int, ...]:
    """eos_token_id of generation_config.json when it names one, else config.json's."""
    value = None
    generation = path / "generation_config.json"
    if generation.exists():
        value = json.loads(generation.read_text()).get("eos_token_id")
    if value is None:
        value = config_json.get("eos_token_id")
    if value is None:
        return ()
    values = value if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{path}: eos_token_id {value!r} is not an int or a list of ints.")
    return tuple(values)


def _rope(config_json: dict[str, Any], where: pathlib.Path) -> tuple[float, dict | None]:
    """(rope_theta, rope scaling dict or None) from either config.json layout:
    transformers 5's `rope_parameters` or the older `rope_theta` + `rope_scaling`."""
    parameters = config_json.get("rope_parameters")
    if parameters is not None:
        if not isinstance(parameters, dict):
            raise ValueError(f"{where}: rope_parameters {parameters!r} is not a dict.")
        scaling = dict(parameters)
        theta = scaling.pop("rope_theta", config_json.get("rope_theta", 10000.0))
    else:
        theta = config_json.get("rope_theta", 10000.0)
        scaling = dict(config_json.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    rope_type = scaling.get("rope_type", "default")
    if rope_type not in network.ROPE_TYPES:
        raise ValueError(f"{where}: rope_type {rope_type!r} is not supported; supported rope "
                         f"types are {list(network.ROPE_TYPES)}.")
    partial = scaling.pop("partial_rotary_factor",
                          config_json.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor {partial} is not supported (only "
                         "rotary embeddings over the whole head).")
    if rope_type == "default":
        return float(theta), None
    return float(theta), scaling


def _sliding_window(config_json: dict[str, Any], model_type: str, num_layers: int,
                    where: pathlib.Path) -> int | None:
    window = config_json.get("sliding_window")
    if model_type == "llama" or window is None:
        return None
    if model_type == "mistral":
        return int(window)
    # Qwen2: a window only with use_sliding_window, and only on the layers
    # layer_types names (by default those from max_window_layers on).
    if not config_json.get("use_sliding_window", False):
        return None
    layer_types = config_json.get("layer_types")
    if layer_types is None:
        first = config_json.get("max_window_layers", 28)
        layer_types = ["sliding_attention" if i >= first else "full_attention"
                       for i in range(num_layers)]
    sliding = [t == "sliding_attention" for t in layer_types]
    if all(sliding):
        return int(window)
    if not any(sliding):
        return None
    raise ValueError(f"{where}: this Qwen2 slides its attention window on some layers only "
                     f"(layer_types {layer_types}); one window for all layers or none is "
                     "supported.")


def config_from_hf(config_json: dict[str, Any], path: pathlib.Path
                   ) -> network.DecoderOnlyConfig:
    """Our DecoderOnlyConfig from a Llama, Mistral or Qwen2 `config.json` dict.

    `path` is the checkpoint directory: its generation_config.json, when it
    names an eos_token_id, takes precedence over config.json's.
    """
    path = pathlib.Path(path)
    where = path / "config.json"
    model_type = config_json.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{where} describes model_type {model_type!r}; this family reads "
                         f"{list(MODEL_TYPES)}.")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                           "num_hidden_layers", "num_attention_heads") if k not in config_json]
    if missing:
        raise ValueError(f"{where} lacks {missing}; a {model_type} config.json needs them.")
    activation = config_json.get("hidden_act", "silu")
    if activation not in ("silu", "swish"):
        raise ValueError(f"{where}: hidden_act {activation!r} is not supported (only silu).")
    if model_type == "llama":
        for flag in ("attention_bias", "mlp_bias"):
            if config_json.get(flag, False):
                raise ValueError(f"{where}: a Llama with {flag} true is not supported.")
    heads = config_json["num_attention_heads"]
    num_layers = config_json["num_hidden_layers"]
    theta, scaling = _rope(config_json, where)
    try:
        return network.DecoderOnlyConfig(
            vocab_size=config_json["vocab_size"],
            hidden_size=config_json["hidden_size"],
            intermediate_size=config_json["intermediate_size"],
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=config_json.get("num_key_value_heads") or heads,
            head_dim=config_json.get("head_dim") or config_json["hidden_size"] // heads,
            rms_norm_eps=config_json.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=config_json.get("max_position_embeddings",
                                                    _DEFAULT_MAX_POSITIONS[model_type]),
            sliding_window=_sliding_window(config_json, model_type, num_layers, where),
            attention_bias=model_type == "qwen2",
            tie_word_embeddings=bool(config_json.get("tie_word_embeddings", False)),
            model_type=model_type,
            eos_token_ids=_eos_ids(config_json, path),
            bos_token_id=config_json.get("bos_token_id"),
        )
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from error


def hf_names(config: network.DecoderOnlyConfig) -> dict[str, tuple[str, bool]]:
    """Our parameter name -> (Hugging Face tensor name, transpose?), without the
    output layer."""
    names = {"embed_tokens/embedding": ("model.embed_tokens.weight", False),
             "norm/scale": ("model.norm.weight", False)}
    for i in range(config.num_layers):
        ours, theirs = f"layers_{i}", f"model.layers.{i}"
        names[f"{ours}/input_layernorm/scale"] = (f"{theirs}.input_layernorm.weight", False)
        names[f"{ours}/post_attention_layernorm/scale"] = (
            f"{theirs}.post_attention_layernorm.weight", False)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            # torch Linear weights are [out, in]; our kernels [in, out].
            names[f"{ours}/self_attn/{proj}/kernel"] = (f"{theirs}.self_attn.{proj}.weight", True)
            if config.attention_bias and proj != "o_proj":
                names[f"{ours}/self_attn/{proj}/bias"] = (f"{theirs}.self_attn.{proj}.bias",
                                                         False)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names[f"{ours}/mlp/{proj}/kernel"] = (f"{theirs}.mlp.{proj}.weight", True)
    return names


def _tensor(tensors: dict[str, np.ndarray], theirs: str, ours: str, transpose: bool,
            expected: tuple[int, ...], dtype: np.dtype, path: pathlib.Path) -> np.ndarray:
    if theirs not in tensors:
        raise ValueError(f"{path}: tensor {theirs} (for {ours}) is missing.")
    value = np.asarray(tensors[theirs])
    if value.dtype not in _FILE_DTYPES:
        raise ValueError(f"{path}: tensor {theirs} has dtype {value.dtype}, not a float.")
    result = value.T if transpose else value
    if result.shape != tuple(expected):
        raise ValueError(f"{path}: tensor {theirs} has shape {value.shape}, so parameter "
                         f"{ours} has shape {result.shape} but the model config "
                         f"expects {tuple(expected)}.")
    as_float32 = np.ascontiguousarray(result, dtype=np.float32)
    if not np.all(np.isfinite(as_float32)):
        raise ValueError(f"{path}: tensor {theirs} holds non-finite values (inf or NaN).")
    return as_float32.astype(dtype, copy=False)


def params_from_hf(tensors: dict[str, np.ndarray], config: network.DecoderOnlyConfig,
                   path: pathlib.Path, dtype: str | None = None) -> Params:
    """Our parameter tree from a Llama / Mistral / Qwen2 checkpoint's tensors.

    Args:
      tensors: Hugging Face name -> array (float32, float16 or bfloat16).
      config: the architecture (`config_from_hf`).
      path: named in errors.
      dtype: the parameters' dtype: None or "float32" (default), "bfloat16"
        (e.g. to fit a 7B policy and its reference on one accelerator) or
        "float16".

    Returns:
      numpy params in the tree of `network`. With tied embeddings
      `lm_head.weight` may be absent or must equal the embedding; untied, it
      becomes `lm_head/kernel`.

    Raises:
      ValueError: a tensor missing, unexpected, of the wrong shape or not
        finite (named, with `path`), or an unknown dtype.
    """
    try:
        dtype_name = "float32" if dtype is None else str(jnp.dtype(dtype))
    except TypeError:
        dtype_name = repr(dtype)
    if dtype_name not in _PARAM_DTYPES:
        raise ValueError(f"params_from_hf: dtype {dtype!r} is not one of {list(_PARAM_DTYPES)}.")
    target = jnp.dtype(dtype_name)
    model = decoder_only_model.DecoderOnlyModel(config)
    expected = protocol.expected_shapes(model)
    flat, used = {}, set()
    for ours, (theirs, transpose) in hf_names(config).items():
        flat[ours] = _tensor(tensors, theirs, ours, transpose, expected[ours], target, path)
        used.add(theirs)
    head = "lm_head.weight"
    if config.tie_word_embeddings:
        if head in tensors:
            embedding = tensors["model.embed_tokens.weight"]
            if tensors[head].shape != embedding.shape or not np.array_equal(
                    np.asarray(tensors[head], np.float32), np.asarray(embedding, np.float32)):
                raise ValueError(f"{path}: tensor {head} differs from model.embed_tokens.weight, "
                                 "but config.json has tie_word_embeddings true.")
            used.add(head)
    else:
        if head not in tensors:
            raise ValueError(f"{path}: tensor {head} (for lm_head/kernel) is missing; if the "
                             "output layer is the embedding, config.json should say "
                             "tie_word_embeddings true.")
        flat["lm_head/kernel"] = _tensor(tensors, head, "lm_head/kernel", True,
                                         expected["lm_head/kernel"], target, path)
        used.add(head)
    unexpected = sorted(name for name in set(tensors) - used
                        if not name.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        raise ValueError(f"{path}: unexpected tensors {unexpected[:8]} (of {len(unexpected)}) "
                         f"that the {config.model_type} described by config.json does not "
                         "have; check num_hidden_layers, tie_word_embeddings and the "
                         "attention biases there.")
    params = flax.traverse_util.unflatten_dict(flat, sep="/")
    return model.check_params(params, str(path))
