"""What the benchmarks share: the model shapes, random Hugging Face T5s and
decoder-only LMs that both sides load, the authors' DeRa logits processor,
median wall-clock times taken in turns, and this machine's memory bandwidth."""

from __future__ import annotations

import json
import pathlib
import statistics
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import torch
import transformers
from safetensors.torch import save_file

# Hugging Face T5Config fields of the two benchmarked shapes.
SHAPES = {
    "tiny": dict(vocab_size=4096, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4,
                 feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "t5_small": dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6,
                     num_heads=8, feed_forward_proj="relu", tie_word_embeddings=True),
}


def random_hf_t5(shape: str, directory: pathlib.Path, seed: int = 0
                 ) -> transformers.T5ForConditionalGeneration:
    """A random-weight PyTorch T5 of `shape`, also written to `directory` as
    `config.json` + `model.safetensors` (for `checkpoints.load_hf_t5`)."""
    torch.manual_seed(seed)
    config = transformers.T5Config(**SHAPES[shape], dropout_rate=0.0, decoder_start_token_id=0,
                                   pad_token_id=0, eos_token_id=1)
    model = transformers.T5ForConditionalGeneration(config)
    tied = SHAPES[shape]["tie_word_embeddings"]
    if not tied:
        # transformers 5 always ties lm_head to the embedding (an untied config only
        # turns off output scaling); untie it as T5.1.1 checkpoints are.
        with torch.no_grad():
            model.lm_head.weight = torch.nn.Parameter(
                torch.randn_like(model.shared.weight) * config.d_model ** -0.5)
    directory.mkdir(parents=True, exist_ok=True)
    skip = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
               if not k.endswith(skip)}, str(directory / "model.safetensors"))
    # transformers 5 writes tie_word_embeddings=True for every T5; state the truth.
    (directory / "config.json").write_text(json.dumps(
        dict(config.to_dict(), tie_word_embeddings=tied)))
    return model


# Hugging Face config fields of the benchmarked decoder-only shapes. No EOS:
# every side decodes the full length.
DECODER_ONLY_SHAPES = {
    "mistral_small": dict(model_type="mistral", vocab_size=32000, hidden_size=256,
                          intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                          num_key_value_heads=4, max_position_embeddings=4096,
                          sliding_window=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                          tie_word_embeddings=False, bos_token_id=1, eos_token_id=None),
}
_CAUSAL_LM_CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
}


def random_hf_causal_lm(shape: str, directory: pathlib.Path, seed: int = 0
                        ) -> transformers.PreTrainedModel:
    """A random-weight float32 PyTorch causal LM of `shape` (eval mode), also
    written to `directory` as `config.json` + `model.safetensors` (for
    `checkpoints.load_hf`)."""
    fields = dict(DECODER_ONLY_SHAPES[shape])
    config_class, model_class = _CAUSAL_LM_CLASSES[fields.pop("model_type")]
    torch.manual_seed(seed)
    model = model_class(config_class(**fields)).eval()
    model.generation_config.eos_token_id = None
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(model.config.to_dict()))
    return model


class RealignLogitsProcessor(transformers.LogitsProcessor):
    """The DeRa authors' approach: a logits processor inside transformers
    `generate` (which runs the aligned model) that runs the reference model on
    the same prefix with its own KV cache, and returns
    lam * (aligned_scores - ref_scores) + ref_scores. Its first call reads
    the whole prefix; later ones only the tokens added since."""

    def __init__(self, ref_model: torch.nn.Module, lam: float):
        self.ref_model = ref_model
        self.lam = lam
        self.past = None
        self.seen = 0

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor
                 ) -> torch.FloatTensor:
        new = input_ids if self.past is None else input_ids[:, self.seen:]
        out = self.ref_model(input_ids=new, past_key_values=self.past, use_cache=True)
        self.past, self.seen = out.past_key_values, input_ids.shape[1]
        ref_scores = out.logits[:, -1].float()
        return self.lam * (scores - ref_scores) + ref_scores


def median_times(fns: Sequence[Callable[[], object]], reps: int, warmup: int = 1
                 ) -> list[float]:
    """Median seconds of each fn over `reps` calls, after `warmup` calls each.

    The fns are called in turns (A B A B ...), so load changes on a shared
    machine hit every side alike. Each fn must block until its work is done.
    """
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, record in zip(fns, times):
            start = time.perf_counter()
            fn()
            record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]


def memory_bandwidth(megabytes: int = 512, reps: int = 5) -> float:
    """Read bandwidth in bytes/s of the default device: a jitted sum of the rows
    of a float32 array of `megabytes`, which reads it once (median of reps).
    Reads, as a decode step's weights are; a pass that also writes a fresh
    array measures page faults as much as memory."""
    x = jnp.ones((megabytes * 2 ** 20 // 4 // 4096, 4096), jnp.float32)
    row_sums = jax.jit(lambda a: jnp.sum(a, axis=1))
    seconds, = median_times([lambda: row_sums(x).block_until_ready()], reps)
    return x.nbytes / seconds
