"""The decoder-only family (Llama, Mistral, Qwen2): parity with transformers,
the decode cache, greedy decoding, Hugging Face loading and the protocol."""

from __future__ import annotations

import dataclasses
import functools
import json

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_factories  # tests/ is on sys.path (pytest's rootdir conftest)
from dera_t5x import checkpoints
from dera_t5x import models
from dera_t5x.models import protocol
from dera_t5x.models.decoder_only import hf as decoder_only_hf
from dera_t5x.models.decoder_only import model as decoder_only_model
from dera_t5x.models.decoder_only import network

VOCAB = 96
MAX_POSITIONS = 64
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
            rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
# name -> (model_type, config overrides, file dtype, load dtype, shards)
CASES = {
    "mistral_window_gqa": ("mistral", dict(sliding_window=8), torch.float32, None, 1),
    "llama3_rope_eos_list": ("llama", dict(rope_parameters=LLAMA3_ROPE, num_key_value_heads=1,
                                           head_dim=16, eos_token_id=[2, 7]),
                             torch.float32, None, 1),
    "qwen2_bias_tied": ("qwen2", dict(tie_word_embeddings=True, num_key_value_heads=4),
                        torch.float32, None, 1),
    "llama_bfloat16_file": ("llama", {}, torch.bfloat16, None, 1),
    "mistral_bfloat16_sharded": ("mistral", dict(sliding_window=None), torch.bfloat16,
                                 "bfloat16", 3),
}
# The cache tests: a sliding window with GQA; biases with a tied head (the
# rotary code is shared, so Llama 3 scaling is covered by parity).
CACHE_CASES = ["mistral_window_gqa", "qwen2_bias_tied"]


_LOADED: dict = {}


def _loaded(name: str, tmp_path_factory):
    """(torch model, config, params) of a case, written and loaded once per session."""
    if name not in _LOADED:
        _LOADED[name] = _write_and_load(name, str(tmp_path_factory.mktemp(name)))
    return _LOADED[name]


def _write_and_load(name: str, directory: str):
    model_type, overrides, file_dtype, load_dtype, shards = CASES[name]
    torch_model = hf_factories.random_causal_lm(model_type, seed=len(name),
                                                **{**BASE, **overrides})
    hf_factories.write_hf_dir(directory, torch_model, dtype=file_dtype, num_shards=shards)
    if file_dtype != torch.float32:  # the reference: the same rounded weights in float32
        hf_factories.round_to(torch_model, file_dtype)
    config, params = checkpoints.load_hf(directory, dtype=load_dtype)
    return torch_model, config, params


@pytest.fixture(params=list(CASES))
def case(request, tmp_path_factory):
    return (request.param,) + _loaded(request.param, tmp_path_factory)


@pytest.fixture(params=CACHE_CASES)
def cache_case(request, tmp_path_factory):
    return (request.param,) + _loaded(request.param, tmp_path_factory)


def _torch_log_probs(torch_model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        logits = torch_model(torch.as_tensor(tokens, dtype=torch.long)).logits
    return torch.log_softmax(logits.float(), -1).numpy()


def test_parity_with_transformers(case):
    name, torch_model, config, params = case
    model_type, overrides, _, load_dtype, _ = CASES[name]
    assert isinstance(config, network.DecoderOnlyConfig)
    assert config.model_type == model_type
    assert config.sliding_window == overrides.get("sliding_window",
                                                  4096 if model_type == "mistral" else None)
    assert config.tie_word_embeddings == (model_type == "qwen2")
    assert config.attention_bias == (model_type == "qwen2")
    assert config.eos_token_ids == tuple(np.atleast_1d(overrides.get("eos_token_id", 2)))
    expected_dtype = jnp.dtype(load_dtype or "float32")
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {expected_dtype}
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 24))
    model = models.for_config(config)
    ours = jax.nn.log_softmax(jax.jit(model.logits)(params, jnp.asarray(tokens)), axis=-1)
    np.testing.assert_allclose(np.asarray(ours), _torch_log_probs(torch_model, tokens),
                               atol=1e-4, rtol=0)


def _joint_case(seed: int = 1):
    """Right-padded prompts (junk in the padding) and responses, one with an EOS."""
    rng = np.random.default_rng(seed)
    lengths = np.array([5, 9, 3])
    prompts = rng.integers(3, VOCAB, (3, 9))  # padding is junk, never attended to
    responses = rng.integers(3, VOCAB, (3, 12))
    return prompts, lengths, responses


def test_cache_and_joint_scoring_match_teacher_forcing(cache_case):
    name, _, config, params = cache_case
    model = models.for_config(config)
    prompts, lengths, responses = _joint_case()
    eos = config.eos_token_ids[-1]
    responses[1, 6] = eos
    # Reference: each row's prompt + responses as one right-padded sequence.
    full = np.random.default_rng(2).integers(3, VOCAB, (3, 9 + 12))
    for b, n in enumerate(lengths):
        full[b, :n + 12] = np.concatenate([prompts[b, :n], responses[b]])

    @jax.jit  # one compilation for all the full-sequence paths
    def run(params, full, prompts, responses, lengths):
        kwargs = dict(prompt_lengths=lengths)
        return (model.logits(params, full),
                model.response_states(params, prompts, responses, **kwargs),
                model.token_log_probs(params, prompts, responses, **kwargs),
                model.score(params, prompts, responses, **kwargs),
                model.prefill(params, prompts, 12, **kwargs))

    full_logits, (hidden, logits), log_probs, scores, (first, cache) = run(
        params, full, prompts, responses, lengths)
    full_logits = np.asarray(full_logits)
    expected = np.stack([full_logits[b, n - 1:n + 12] for b, n in enumerate(lengths)])
    assert hidden.shape == (3, 13, config.hidden_size) and logits.shape == (3, 13, VOCAB)
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)
    reference = np.take_along_axis(np.asarray(jax.nn.log_softmax(expected[:, :12])),
                                   responses[..., None], -1)[..., 0]
    reference[1, 7:] = 0.0  # after the first EOS
    np.testing.assert_allclose(np.asarray(log_probs), reference, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(scores), reference.sum(-1), atol=1e-3, rtol=0)
    # The prompt's keys / values (read-only) and a buffer for the 12 new tokens.
    assert cache["prompt"][0]["key"].shape == (3, config.num_kv_heads, 9, config.head_dim)
    assert cache["new"][0]["key"].shape == (3, config.num_kv_heads, 12, config.head_dim)
    np.testing.assert_allclose(np.asarray(first), expected[:, 0], atol=1e-4, rtol=0)
    step = jax.jit(model.decode_step)
    for t in range(12):
        logits_t, cache = step(params, cache, jnp.asarray(responses[:, t]))
        np.testing.assert_allclose(np.asarray(logits_t), expected[:, t + 1], atol=1e-4, rtol=0,
                                   err_msg=f"{name}, decode step {t}")
    axes, treedef = jax.tree_util.tree_flatten(model.cache_axes(cache),
                                               is_leaf=protocol.is_axes)
    assert treedef == jax.tree_util.tree_structure(cache)
    assert [len(a) for a in axes] == [np.ndim(v) for v in jax.tree_util.tree_leaves(cache)]


def test_greedy_predict_matches_transformers_generate(tmp_path_factory):
    torch_model, config, params = _loaded("mistral_window_gqa", tmp_path_factory)
    lengths = [4, 7, 10]
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, VOCAB, n) for n in lengths]
    max_new = 10

    def generate(prompt, eos):
        with torch.no_grad():
            out = torch_model.generate(
                torch.as_tensor(prompt[None], dtype=torch.long),
                attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
                max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=0)
        return out[0, len(prompt):].numpy()

    # An EOS that row 0 emits at its 5th new token (or earlier).
    eos = int(generate(prompts[0], None)[4])
    eos_ids = [eos, VOCAB - 1]
    model = models.for_config(dataclasses.replace(config, eos_token_ids=tuple(eos_ids)))
    inputs = np.zeros((3, max(lengths)), np.int32)
    for b, prompt in enumerate(prompts):
        inputs[b, :len(prompt)] = prompt
    predict = jax.jit(model.predict, static_argnames="max_decode_len")
    out = predict(params, jnp.asarray(inputs), jax.random.PRNGKey(0),
                  prompt_lengths=jnp.asarray(lengths), max_decode_len=max_new)
    tokens, out_lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for b, prompt in enumerate(prompts):
        expected = generate(prompt, eos_ids)
        assert out_lengths[b] == len(expected), b
        np.testing.assert_array_equal(tokens[b, :out_lengths[b]], expected)
        assert np.all(tokens[b, out_lengths[b]:] == 0)
    assert out_lengths[0] <= 5 and tokens[0, out_lengths[0] - 1] == eos


def _write_tiny(directory, model_type="llama", **overrides):
    torch_model = hf_factories.random_causal_lm(model_type, **{**BASE, "num_hidden_layers": 1,
                                                               **overrides})
    return hf_factories.write_hf_dir(directory, torch_model)


def test_load_errors_name_the_tensor(tmp_path):
    directory = _write_tiny(tmp_path / "llama")
    config, _ = checkpoints.load_hf(directory)
    tensors = checkpoints._read_safetensors(directory)

    def load(changed):
        return decoder_only_hf.params_from_hf(changed, config, directory)

    name = "model.layers.0.mlp.up_proj.weight"
    with pytest.raises(ValueError, match=f"{name}.*missing"):
        load({k: v for k, v in tensors.items() if k != name})
    with pytest.raises(ValueError, match="unexpected tensors.*model.layers.1.mlp.up_proj"):
        load({**tensors, "model.layers.1.mlp.up_proj.weight": tensors[name]})
    with pytest.raises(ValueError, match=f"{name} has shape"):
        load({**tensors, name: tensors[name][:-1]})
    broken = tensors[name].copy()
    broken[0, 0] = np.nan
    with pytest.raises(ValueError, match=f"{name} holds non-finite"):
        load({**tensors, name: broken})
    with pytest.raises(ValueError, match="lm_head.weight.*missing"):
        load({k: v for k, v in tensors.items() if k != "lm_head.weight"})
    tied = dataclasses.replace(config, tie_word_embeddings=True)
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        decoder_only_hf.params_from_hf(tensors, tied, directory)
    with pytest.raises(ValueError, match="dtype"):
        checkpoints.load_hf(directory, dtype="int8")


def test_unknown_model_type_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"\['llama', 'mistral', 'qwen2', 't5'\]"):
        checkpoints.load_hf(tmp_path)


def _config_json(**overrides):
    return {"model_type": "llama", "vocab_size": 100, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 8,
            "rms_norm_eps": 1e-5, "eos_token_id": 2, "bos_token_id": 1, **overrides}


def test_config_from_hf_layouts(tmp_path):
    read = lambda **kw: decoder_only_hf.config_from_hf(_config_json(**kw), tmp_path)
    # Zephyr-style Mistral: rope_theta at the top, no head_dim, no kv heads.
    zephyr = read(model_type="mistral", rope_theta=10000.0, sliding_window=4096)
    assert (zephyr.head_dim, zephyr.num_kv_heads, zephyr.sliding_window) == (8, 8, 4096)
    assert zephyr.rope_scaling is None and zephyr.eos_token_ids == (2,)
    assert read(model_type="mistral", sliding_window=None).sliding_window is None
    # Llama 3: older rope_theta + rope_scaling, and transformers 5's rope_parameters.
    scaling = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    old = read(rope_theta=500000.0, rope_scaling=scaling, num_key_value_heads=2,
               eos_token_id=[5, 6])
    new = read(rope_parameters=LLAMA3_ROPE, num_key_value_heads=2, eos_token_id=[5, 6])
    assert old == new and hash(old) == hash(new)
    assert new.rope_theta == 500000.0 and dict(new.rope_scaling)["factor"] == 8.0
    assert new.eos_token_ids == (5, 6) and new.num_kv_heads == 2
    assert read(rope_parameters={"rope_type": "default", "rope_theta": 1e6}).rope_theta == 1e6
    # Qwen2: biases implied; use_sliding_window false means no window.
    qwen = read(model_type="qwen2", sliding_window=4096, use_sliding_window=False,
                tie_word_embeddings=True, eos_token_id=None)
    assert qwen.attention_bias and qwen.sliding_window is None and qwen.tie_word_embeddings
    assert qwen.eos_token_ids == ()
    # generation_config.json's eos_token_id wins over config.json's.
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 8]}))
    assert read().eos_token_ids == (7, 8)


def test_unknown_rope_type_raises(tmp_path):
    with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
        decoder_only_hf.config_from_hf(
            _config_json(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4,
                                          "factor": 4.0}), tmp_path)
    with pytest.raises(ValueError, match="rope_type 'linear' is not supported"):
        decoder_only_hf.config_from_hf(
            _config_json(rope_scaling={"type": "linear", "factor": 2.0}), tmp_path)
    with pytest.raises(ValueError, match="rope_type 'dynamic'"):
        network.DecoderOnlyConfig(rope_scaling={"rope_type": "dynamic", "factor": 2.0})


def _tiny_config(**overrides) -> network.DecoderOnlyConfig:
    return network.DecoderOnlyConfig(**{
        "vocab_size": 40, "hidden_size": 16, "intermediate_size": 32, "num_layers": 1,
        "num_heads": 2, "num_kv_heads": 1, "head_dim": 8, "max_position_embeddings": 16,
        "eos_token_ids": (2,), **overrides})


def test_protocol_surface():
    config = _tiny_config(attention_bias=True)
    model = models.for_config(config)
    assert isinstance(model, decoder_only_model.DecoderOnlyModel)
    assert model.eos_ids == (2,) and model.banned_ids == () and model.pad_id == 0
    assert model.hidden_size == 16
    # init traced only (compiling its random draws takes seconds on CPU).
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(shapes)} == {jnp.dtype("float32")}
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32), shapes)
    model.check_params(params)
    flat = {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(params).items()}
    assert set(flat) == {
        "embed_tokens/embedding", "norm/scale", "lm_head/kernel",
        "layers_0/input_layernorm/scale", "layers_0/post_attention_layernorm/scale",
        *(f"layers_0/self_attn/{p}/kernel" for p in ("q_proj", "k_proj", "v_proj", "o_proj")),
        *(f"layers_0/self_attn/{p}/bias" for p in ("q_proj", "k_proj", "v_proj")),
        *(f"layers_0/mlp/{p}/kernel" for p in ("gate_proj", "up_proj", "down_proj"))}
    assert flat["layers_0/self_attn/k_proj/kernel"].shape == (16, 8)
    axes = {path: model.param_axes(path, v.ndim) for path, v in flat.items()}
    assert axes["layers_0/self_attn/v_proj/kernel"] == ("embed", "heads")
    assert axes["layers_0/self_attn/o_proj/kernel"] == ("heads", "embed")
    assert axes["layers_0/mlp/up_proj/kernel"] == ("embed", "mlp")
    assert axes["layers_0/mlp/down_proj/kernel"] == ("mlp", "embed")
    assert axes["embed_tokens/embedding"] == ("vocab", "embed")
    assert axes["lm_head/kernel"] == ("embed", "vocab")
    assert axes["layers_0/self_attn/q_proj/bias"] == (None,)
    assert axes["norm/scale"] == (None,)
    with pytest.raises(ValueError, match="lm_head/kernel"):
        models.for_config(_tiny_config(attention_bias=True, tie_word_embeddings=True)
                          ).check_params(params)

    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 40, (2, 16)))
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        model.logits(params, jnp.zeros((1, 17), jnp.int32))
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        model.prefill(params, tokens[:, :8], 9, prompt_lengths=jnp.array([8, 3]))
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        model.token_log_probs(params, tokens[:, :8], tokens[:, :9],
                              prompt_lengths=jnp.array([8, 3]))
    with pytest.raises(ValueError, match="prompt_lengths"):
        model.token_log_probs(params, tokens[:, :4], tokens[:, 4:])

    # loss: T5X-style features; equals the cross-entropy of the logits.
    weights = jnp.asarray(np.random.default_rng(1).integers(0, 2, (2, 15)), jnp.float32)
    batch = {"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:],
             "decoder_loss_weights": weights}
    loss, metrics = jax.jit(functools.partial(model.loss, z_loss=1e-4))(params, batch)
    assert set(metrics) == {"loss", "z_loss", "accuracy", "num_tokens"}
    log_probs = jax.nn.log_softmax(jax.jit(model.logits)(params, tokens[:, :-1]))
    nll = -jnp.take_along_axis(log_probs, tokens[:, 1:, None], -1)[..., 0]
    manual = jnp.sum(nll * weights) / jnp.sum(weights) + metrics["z_loss"]
    np.testing.assert_allclose(float(loss), float(manual), rtol=1e-5)
    assert float(metrics["num_tokens"]) == float(jnp.sum(weights))
    with pytest.raises(ValueError, match="decoder_segment_ids"):
        model.loss(params, {**batch, "decoder_segment_ids": jnp.ones_like(weights)})
    with pytest.raises(ValueError, match="decoder_loss_weights"):
        model.loss(params, {k: v for k, v in batch.items() if k != "decoder_loss_weights"})


def test_config_validation_and_hashing():
    scaling = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    config = _tiny_config(rope_scaling=scaling, eos_token_ids=[2, 3])
    assert isinstance(config.rope_scaling, tuple) and config.eos_token_ids == (2, 3)
    assert hash(decoder_only_model.DecoderOnlyModel(config)) == hash(
        decoder_only_model.DecoderOnlyModel(_tiny_config(
            rope_scaling=config.rope_scaling, eos_token_ids=(2, 3))))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        _tiny_config(num_heads=3, num_kv_heads=2)
    with pytest.raises(ValueError, match="model_type"):
        _tiny_config(model_type="gpt2")
    # An empty EOS set: nothing ends a response; predict passes -1 to the sampler.
    assert protocol.response_mask(jnp.array([[2, 3, 4]]), ()).tolist() == [[1.0, 1.0, 1.0]]
