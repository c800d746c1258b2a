"""DeRa with decoder-only models (Llama, Mistral, Qwen2): the authors' transformers
approach, endpoints, sweeps, the shared prompt cache and input errors."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import hf_factories  # tests/ is on sys.path (pytest's rootdir conftest)
from bench.common import RealignLogitsProcessor  # the authors' DeRa processor
from dera_t5x import checkpoints
from dera_t5x import models
from dera_t5x import realign

VOCAB = 96
MAX_POSITIONS = 64
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
            rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
# model_type -> config overrides: a sliding window shorter than the longest
# prompt; one kv head (multi-query) with a wider head; q / k / v biases
# (untied: a random tied head mostly repeats its input token).
FAMILIES = {
    "mistral": dict(sliding_window=6),
    "llama": dict(num_key_value_heads=1, head_dim=16),
    "qwen2": dict(tie_word_embeddings=False),
}
# Right-padded prompts of different lengths (junk in the padding).
PROMPT_LENGTHS = np.array([7, 3, 12, 5, 9, 10])
MAX_NEW = 10

# Per-row lambdas of the batched comparison: 0, 1, between, and beyond 1.
LAMS = np.array([3.0, 0.0, 1 / 6, 2 / 3, 1.0, 0.4], np.float32)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models: one thread (a thread pool on shared, busy cores is 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_FAMILIES: dict = {}


def _family(model_type: str, tmp_path_factory) -> dict:
    """A random (reference, aligned) pair of `model_type`, in transformers and
    loaded, with the authors' greedy DeRa outputs of `_prompts()` at `LAMS`;
    the model's EOS is one the pair emits. Built once per session.

    Keys: torch_ref, torch_aligned, model (EOS set), params_ref,
    params_aligned, eos, no_eos (the authors' rows without an EOS), want
    (with it: the new tokens through the EOS).
    """
    if model_type not in _FAMILIES:
        directory = tmp_path_factory.mktemp(f"dera_{model_type}")
        (torch_ref, torch_aligned), paths = hf_factories.write_random_pair(
            directory, model_type, seeds=(3, 4), **{**BASE, **FAMILIES[model_type]})
        config, params_ref = checkpoints.load_hf(paths[0])
        config_aligned, params_aligned = checkpoints.load_hf(paths[1])
        assert config == config_aligned
        prompts = _prompts()
        rows = [prompts[b, :n] for b, n in enumerate(PROMPT_LENGTHS)]
        no_eos = [_authors_generate(torch_ref, torch_aligned, row, float(lam), None)
                  for row, lam in zip(rows, LAMS)]
        eos = _common_eos(no_eos)
        want = [_authors_generate(torch_ref, torch_aligned, row, float(lam), eos)
                for row, lam in zip(rows, LAMS)]
        _FAMILIES[model_type] = dict(
            torch_ref=torch_ref, torch_aligned=torch_aligned, eos=eos, no_eos=no_eos,
            want=want, params_ref=params_ref, params_aligned=params_aligned,
            model=models.for_config(dataclasses.replace(config, eos_token_ids=(eos,))))
    return _FAMILIES[model_type]


def _prompts(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(
        3, VOCAB, (len(PROMPT_LENGTHS), PROMPT_LENGTHS.max())).astype(np.int32)


@torch.no_grad()
def _authors_generate(torch_ref, torch_aligned, prompt: np.ndarray, lam: float,
                      eos: int | None) -> np.ndarray:
    """One prompt, greedy: the new tokens (through the EOS when one ends it)."""
    torch_aligned.generation_config.eos_token_id = None  # only `eos` ends a row
    prompt = torch.as_tensor(prompt[None], dtype=torch.long)
    out = torch_aligned.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=MAX_NEW,
        do_sample=False, eos_token_id=eos, pad_token_id=0,
        logits_processor=transformers.LogitsProcessorList(
            [RealignLogitsProcessor(torch_ref, lam)]))
    return out[0, prompt.shape[1]:].numpy()


def _common_eos(rows: list[np.ndarray]) -> int:
    """The token that occurs before the last two steps in the most rows
    (then the earliest, then the lowest id)."""
    first: dict[int, list[int]] = {}
    for row in rows:
        for token in set(row[:-2].tolist()):
            first.setdefault(token, []).append(row.tolist().index(token))
    return min(first, key=lambda c: (-len(first[c]), sum(first[c]), c))


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_batched_dera_matches_the_authors_logits_processor(model_type, tmp_path_factory):
    """One batched call, rows of different prompt lengths and lambdas, against
    one `generate` call per row with the authors' logits processor."""
    f = _family(model_type, tmp_path_factory)
    no_eos, want, eos = f["no_eos"], f["want"], f["eos"]
    assert all(len(r) == MAX_NEW for r in no_eos)
    out = realign.dera_decode(f["model"], f["params_ref"], f["params_aligned"], _prompts(), LAMS,
                              prompt_lengths=PROMPT_LENGTHS, max_decode_len=MAX_NEW,
                              rng=jax.random.PRNGKey(0), temperature=0.0)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    assert tokens.shape == (len(LAMS), MAX_NEW)
    for b, expected in enumerate(want):
        assert lengths[b] == len(expected), (model_type, b, tokens[b], expected)
        np.testing.assert_array_equal(tokens[b, :lengths[b]], expected,
                                      err_msg=f"{model_type}, row {b}, lam {LAMS[b]}")
        assert np.all(tokens[b, lengths[b]:] == 0)
    ended = [b for b, expected in enumerate(want) if len(expected) < MAX_NEW]
    assert len(ended) >= 2 and all(want[b][-1] == eos for b in ended), want
    assert len({tuple(r) for r in no_eos}) == len(LAMS), no_eos  # the rows really differ


def _decode(model, params_ref, params_aligned, lam, **kwargs):
    return realign.dera_decode(model, params_ref, params_aligned, _prompts(), lam,
                               prompt_lengths=PROMPT_LENGTHS, max_decode_len=MAX_NEW,
                               rng=jax.random.PRNGKey(0), **kwargs)


def _mistral(tmp_path_factory):
    f = _family("mistral", tmp_path_factory)
    return f["model"], f["params_ref"], f["params_aligned"]


def test_endpoints_equal_greedy_predict(tmp_path_factory):
    model, params_ref, params_aligned = _mistral(tmp_path_factory)
    predict = jax.jit(model.predict, static_argnames="max_decode_len")
    batch = len(PROMPT_LENGTHS)
    alone = {}
    for lam, params in ((0.0, params_ref), (1.0, params_aligned)):
        out = _decode(model, params_ref, params_aligned, np.full(batch, lam), temperature=0.0)
        alone[lam] = predict(params, _prompts(), jax.random.PRNGKey(0),
                             prompt_lengths=PROMPT_LENGTHS, max_decode_len=MAX_NEW)
        np.testing.assert_array_equal(out.tokens, alone[lam].tokens)
        np.testing.assert_array_equal(out.lengths, alone[lam].lengths)
        np.testing.assert_allclose(out.log_probs, alone[lam].log_probs, atol=1e-5)
    assert not np.array_equal(alone[0.0].tokens, alone[1.0].tokens)


def test_sweep_equals_separate_calls_and_lambdas_do_not_recompile(tmp_path_factory):
    model, params_ref, params_aligned = _mistral(tmp_path_factory)
    lambdas = np.array([0.0, 0.5, 1.0, 3.0], np.float32)
    sweep = realign.dera_sweep(model, params_ref, params_aligned, _prompts(), lambdas,
                               prompt_lengths=PROMPT_LENGTHS, max_decode_len=MAX_NEW,
                               rng=jax.random.PRNGKey(0), temperature=0.0)
    assert sweep.tokens.shape == (4, len(PROMPT_LENGTHS), MAX_NEW)
    decodes = None
    for k, lam in enumerate(lambdas):
        one = _decode(model, params_ref, params_aligned, lam, temperature=0.0)
        decodes = decodes or realign._decode._cache_size()  # after the first call
        np.testing.assert_array_equal(sweep.tokens[k], one.tokens)
        np.testing.assert_array_equal(sweep.lengths[k], one.lengths)
        for name in ("log_probs", "ref_log_probs", "aligned_log_probs", "mixed_log_probs"):
            np.testing.assert_allclose(getattr(sweep, name)[k], getattr(one, name), atol=1e-5,
                                       err_msg=f"{name}, lam {lam}")
    assert len({tuple(np.ravel(t)) for t in np.asarray(sweep.tokens)}) == 4
    # New lambdas (scalars above, per row here, and in a sweep) reuse the
    # compiled programs.
    _decode(model, params_ref, params_aligned, np.array([0.2, 7.0, -1.0, 0.0, 1.0, 0.3]),
            temperature=0.0)
    assert realign._decode._cache_size() == decodes
    sweeps = realign._sweep._cache_size()
    realign.dera_sweep(model, params_ref, params_aligned, _prompts(), [0.1, 0.2, 2.0, 9.0],
                       prompt_lengths=PROMPT_LENGTHS, max_decode_len=MAX_NEW,
                       rng=jax.random.PRNGKey(1), temperature=0.0)
    assert realign._sweep._cache_size() == sweeps


def _avals(jaxpr) -> list[tuple[int, ...]]:
    """Shapes of every value a jaxpr (and the jaxprs inside it) makes or carries."""
    shapes = [tuple(v.aval.shape) for v in jaxpr.invars + jaxpr.outvars
              if hasattr(v, "aval") and hasattr(v.aval, "shape")]
    for eqn in jaxpr.eqns:
        shapes += [tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")]
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    shapes += _avals(inner)
    return shapes


def test_sweep_shares_the_prompt_cache(tmp_path_factory):
    """In the sweep's program only the new tokens' keys / values get the [K]
    axis; the prompt's stay one [batch, kv_heads, P, head_dim] array."""
    model, params_ref, params_aligned = _mistral(tmp_path_factory)
    config = model.config
    prompts, k, new = _prompts(), 3, 5
    batch, prompt_len = prompts.shape
    traced = realign._sweep.trace(
        model, params_ref, params_aligned, jnp.asarray(prompts), jnp.asarray(PROMPT_LENGTHS),
        jnp.zeros(k), jax.random.PRNGKey(0), None, partitioner=None, max_decode_len=new,
        top_k=0, top_p=1.0, chunk_size=None, num_samples=1)
    shapes = {tuple(sorted(s)) for s in _avals(traced.jaxpr.jaxpr)}
    kv = (config.num_kv_heads, config.head_dim)
    assert len({batch, prompt_len, new, k, *kv}) == 6  # the sizes tell the axes apart
    # No [K] copy of the prompt's keys / values (alone, or with the new slots).
    assert tuple(sorted((k, batch, *kv, prompt_len))) not in shapes
    assert tuple(sorted((k, batch, *kv, prompt_len + new))) not in shapes
    assert tuple(sorted((batch, *kv, prompt_len))) in shapes
    assert tuple(sorted((k, batch, *kv, new))) in shapes  # the check can see a [K] buffer


class _Compiles:
    """The names of the functions XLA compiles while active (JAX's
    backend-compile event)."""

    def __enter__(self):
        self.names = []
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def _listen(self, event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.names.append(str(kwargs.get("fun_name")))

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)


def test_bad_input_fails_before_compiling(tmp_path_factory):
    f = _family("llama", tmp_path_factory)
    model, params_ref, params_aligned = f["model"], f["params_ref"], f["params_aligned"]
    config = model.config
    prompts = _prompts()
    kwargs = dict(max_decode_len=MAX_NEW, rng=jax.random.PRNGKey(0), temperature=0.0)

    def zero_params(other_config):
        shapes = jax.eval_shape(models.for_config(other_config).init, jax.random.PRNGKey(0))
        return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), shapes)

    wider = zero_params(dataclasses.replace(config, vocab_size=VOCAB + 4))
    deeper = zero_params(dataclasses.replace(config, num_layers=3))
    empty = PROMPT_LENGTHS.copy()
    empty[2] = 0
    with _Compiles() as compiles:
        with pytest.raises(ValueError, match="aligned parameter set.*(embed_tokens|lm_head).*"
                                             "vocabulary"):
            realign.dera_decode(model, params_ref, wider, prompts, 0.5,
                                prompt_lengths=PROMPT_LENGTHS, **kwargs)
        with pytest.raises(ValueError, match="reference parameter set does not match.*layers_2"):
            realign.dera_sweep(model, deeper, params_aligned, prompts, [0.0, 1.0],
                               prompt_lengths=PROMPT_LENGTHS, **kwargs)
        # A prompt of 12 slots + 53 new tokens > max_position_embeddings = 64.
        too_long = dict(kwargs, max_decode_len=MAX_POSITIONS - prompts.shape[1] + 1)
        with pytest.raises(ValueError, match="max_position_embeddings=64"):
            realign.dera_decode(model, params_ref, params_aligned, prompts, 0.5,
                                prompt_lengths=PROMPT_LENGTHS, **too_long)
        with pytest.raises(ValueError, match="max_position_embeddings=64"):
            realign.dera_sweep(model, params_ref, params_aligned, prompts, [0.0, 1.0],
                               prompt_lengths=PROMPT_LENGTHS, **too_long)
        with pytest.raises(ValueError, match="prompt_lengths must lie in"):
            realign.dera_decode(model, params_ref, params_aligned, prompts, 0.5,
                                prompt_lengths=empty, **kwargs)
        with pytest.raises(ValueError, match="non-empty"):
            realign.dera_decode(model, params_ref, params_aligned, prompts[:, :0], 0.5,
                                prompt_lengths=np.zeros(len(prompts), np.int32), **kwargs)
        for call, lam in ((realign.dera_decode, 0.5), (realign.dera_sweep, [0.5])):
            with pytest.raises(ValueError, match="prompt_lengths"):
                call(model, params_ref, params_aligned, prompts, lam, **kwargs)
    # At most the inputs' dtype conversions compile, never a decoding program.
    assert not [n for n in compiles.names if "decode" in n or "sweep" in n], compiles.names

    def _sweep_like(x):
        return x * 3 + 1

    with _Compiles() as compiles:  # the listener sees compilations, by name
        jax.jit(_sweep_like)(np.float32(2.0))
    assert compiles.names == ["jit(_sweep_like)"]
