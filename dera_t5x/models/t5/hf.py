"""Hugging Face T5 checkpoints: config.json fields and tensor names -> ours."""

from __future__ import annotations

import pathlib
from typing import Any

import flax.traverse_util
import numpy as np

from dera_t5x.models import protocol
from dera_t5x.models.t5 import model as t5_model
from dera_t5x.models.t5 import network

Params = Any
# Hugging Face activation names (after `gated-`) -> ours. HF's "gelu" is the
# exact erf GELU; "gated-gelu" is special-cased to the tanh form (gelu_new).
_HF_ACTIVATIONS = {"relu": "relu", "gelu": "gelu_exact", "gelu_new": "gelu",
                   "gelu_pytorch_tanh": "gelu", "silu": "silu", "swish": "silu"}
# Tensors that transformers itself ignores in T5 checkpoints.
_HF_IGNORED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


def config_from_hf(config_json: dict[str, Any], path: pathlib.Path) -> network.T5Config:
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


def params_from_hf(tensors: dict[str, np.ndarray], config: network.T5Config,
                   path: pathlib.Path) -> Params:
    """Our float32 parameter tree from a T5 checkpoint's tensors (by HF name).

    T5.1.0 configs (`logits_via_embedding`) read the one embedding, and a
    `lm_head.weight` must equal it. Otherwise `lm_head.weight` becomes
    `decoder/logits_dense`; when the file has none, the embedding is used
    there, as transformers 5 does (unscaled logits through the shared
    embedding). Errors name the tensor and `path`.
    """
    model = t5_model.EncoderDecoderModel(config)
    expected = protocol.expected_shapes(model)
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
    return model.check_params(params, str(path))
