"""RL of a decoder-only policy: right-padded prompts of different lengths
through rollout, scoring and `train_rl`, checked against transformers."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_factories  # tests/ is on sys.path (pytest's rootdir conftest)
from dera_t5x import checkpoints
from dera_t5x import models
from dera_t5x.models import protocol
from dera_t5x.models.t5 import network as t5_network
from dera_t5x.training import rewards
from dera_t5x.training import rl

LLAMA = dict(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
             rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
LENGTHS = np.array([3, 8, 5, 1], np.int32)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """((torch ref, torch policy), model, params_ref, params_policy)."""
    torch_models, paths = hf_factories.write_random_pair(
        tmp_path_factory.mktemp("rl_llama"), "llama", seeds=(5, 6), **LLAMA)
    (config, params_ref), (_, params_policy) = (checkpoints.load_hf(p) for p in paths)
    # The EOS: a token the policy samples often in `_prompts()`' rollouts, so that
    # responses end at different steps.
    model = models.for_config(config)
    tokens = model.predict(params_policy, _prompts()["inputs"], jax.random.PRNGKey(0),
                           prompt_lengths=LENGTHS, max_decode_len=6, temperature=1.0,
                           repeats=2).tokens
    eos = int(np.bincount(np.asarray(tokens[:, 1:]).ravel()).argmax())
    model = models.for_config(dataclasses.replace(config, eos_token_ids=(eos,)))
    return torch_models, model, params_ref, params_policy


def _prompts(lengths: np.ndarray = LENGTHS, seed: int = 0) -> dict[str, np.ndarray]:
    """Right-padded prompts [n, 8] (junk after each length, never read)."""
    tokens = np.random.default_rng(seed).integers(3, LLAMA["vocab_size"], (len(lengths), 8))
    return {"inputs": tokens.astype(np.int32), "prompt_lengths": lengths}


def _torch_log_probs(torch_model, prompt: np.ndarray, response: np.ndarray) -> np.ndarray:
    """log p(response_t | prompt, response_<t) of one unpadded row."""
    sequence = torch.as_tensor(np.concatenate([prompt, response]))[None]
    with torch.no_grad():
        logits = torch_model(sequence).logits[0, len(prompt) - 1:-1]
    chosen = torch.log_softmax(logits.double(), -1)[torch.arange(len(response)),
                                                     torch.as_tensor(response)]
    return chosen.numpy()


@pytest.mark.parametrize("encode_prompts_once", [False, True])
def test_scores_of_ragged_prompts_match_transformers(llama, encode_prompts_once):
    """Two samples per prompt: the policy's log-probs, the KL to the reference and
    the length reward of every response equal transformers' on the unpadded
    prompt followed by the response, whatever the padding holds."""
    (torch_ref, torch_policy), model, params_ref, policy = llama
    config = rl.RLConfig(beta=0.1, max_decode_len=6, num_samples=2,
                         encode_prompts_once=encode_prompts_once)
    steps = rl.make_step_functions(model, config, rl.make_optimizer(),
                                   rewards.length_reward(eos_ids=model.eos_ids))
    params = rl.init_params(policy, model.hidden_size)
    data = _prompts()
    prompts, lengths, responses = steps.rollout(params, data["inputs"], jax.random.PRNGKey(0),
                                                data["prompt_lengths"])
    assert prompts.shape[0] == lengths.shape[0] == (4 if encode_prompts_once else 8)
    batch = steps.score(params, params_ref, None, prompts, steps.trim(responses),
                        prompt_lengths=lengths)
    ends = np.asarray(protocol.response_lengths(responses, model.eos_ids))
    assert 0 < np.sum(ends < 6) < 8  # some responses end at the EOS, some at the limit
    for row in range(8):
        prompt = data["inputs"][row // 2, :LENGTHS[row // 2]]
        response = np.asarray(responses[row, :ends[row]])
        want = _torch_log_probs(torch_policy, prompt, response)
        np.testing.assert_allclose(batch["old_log_probs"][row, :ends[row]], want, atol=1e-4)
        want_kl = np.sum(want - _torch_log_probs(torch_ref, prompt, response))
        assert float(batch["kl"][row]) == pytest.approx(want_kl, abs=1e-3)
        assert float(batch["reward"][row]) == ends[row] - (response[-1] in model.eos_ids)


def test_train_rl_on_prompt_arrays_learns_and_resumes_exactly(llama, tmp_path):
    """A length penalty teaches the policy to end early; a run stopped at step
    10 and resumed ends with the same params as one run straight through."""
    _, model, params_ref, _ = llama
    kwargs = dict(model=model, params_ref=params_ref,
                  reward=rewards.length_reward(scale=-1.0, eos_ids=model.eos_ids),
                  prompts=_prompts(np.random.default_rng(1).integers(1, 9, 32).astype(np.int32)),
                  batch_size=8, config=rl.RLConfig(beta=0.01, max_decode_len=8),
                  optimizer=rl.make_optimizer(policy_learning_rate=1e-2), checkpoint_every=10)
    straight = rl.train_rl(str(tmp_path / "straight"), num_steps=30, **kwargs)
    rl.train_rl(str(tmp_path / "resumed"), num_steps=10, **kwargs)
    resumed = rl.train_rl(str(tmp_path / "resumed"), num_steps=30, **kwargs)
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed, straight)
    prompts = kwargs["prompts"]

    @jax.jit
    def mean_length(params):
        tokens = model.predict(params, prompts["inputs"], jax.random.PRNGKey(7),
                               prompt_lengths=prompts["prompt_lengths"], max_decode_len=8,
                               temperature=1.0, repeats=4).tokens
        return jnp.mean(protocol.response_lengths(tokens, model.eos_ids))

    before, after = float(mean_length(params_ref)), float(mean_length(straight))
    assert after < before - 2, (before, after)


@pytest.mark.parametrize("case, message", [
    ("no lengths", "prompt_lengths"),
    ("lengths out of range", r"RL prompt_lengths must lie in \[1, 8\]"),
    ("ids outside the vocabulary", r"RL prompts\['inputs'\] holds ids from .* outside"),
    ("two sources", "one source"),
    ("t5 with lengths", "prompt_lengths is for decoder-only models"),
])
def test_bad_prompts_are_refused_before_anything_is_written(llama, tmp_path, case, message):
    _, model, params_ref, _ = llama
    prompts = _prompts()
    kwargs = {}
    if case == "no lengths":
        prompts.pop("prompt_lengths")
    elif case == "lengths out of range":
        prompts["prompt_lengths"] = np.array([3, 9, 5, 1], np.int32)
    elif case == "ids outside the vocabulary":
        prompts["inputs"][2, 0] = LLAMA["vocab_size"]
    elif case == "two sources":
        kwargs = dict(task_name="xsum_bundled", feature_lengths={"inputs": 8, "targets": 8})
    else:
        model = models.for_config(t5_network.T5Config(
            vocab_size=48, emb_dim=8, num_heads=1, head_dim=8, mlp_dim=8,
            num_encoder_layers=1, num_decoder_layers=1))
        params_ref = model.init(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=message):
        rl.train_rl(str(tmp_path / "run"), model=model, params_ref=params_ref,
                    reward=rewards.length_reward(), prompts=prompts, num_steps=1, **kwargs)
    assert not (tmp_path / "run").exists()
