r"""DeRa decoding speed: our compiled scans vs transformers' PyTorch T5 and
decoder-only (Mistral-shaped) models.

    python bench/decode.py [--families=t5,decoder_only]
                           [--shapes=tiny,t5_small] [--batches=tiny:16,t5_small:16+64]
                           [--reps=3] [--steps=32] [--inputs=128]
                           [--prompts=8] [--prompt_len=48] [--new_tokens=48]
                           [--torch_threads=0]

T5 rows (--families=t5):

Both sides load the same random weights (two transformers T5s saved as
safetensors and read with `checkpoints.load_hf_t5`), take --inputs random
input tokens and decode greedily for exactly --steps new tokens: ours runs
every step of its scan whatever the tokens, and PyTorch `generate` is held
to full length with `min_new_tokens`. Padding is never generated on either
side. Rows, each timed in turns with the others after a warm-up call:

  ours_single      `model.predict` (one parameter set), jitted
  ours_dera        `realign.dera_decode`, one lambda
  ours_sweep8      `realign.dera_sweep` over 8 lambdas, against 8 separate
                   `dera_decode` calls (8 x ours_dera) and 8 PyTorch loops
  torch_generate   transformers `generate(do_sample=False)`, one model
  torch_two_model  the authors' approach: two T5s with their own KV caches,
                   last-step logits mixed per step in eager PyTorch

One more row, sampled at temperature 1 as a served model samples: a model
distilled at lambda (TrRa, `training/distill.py`) decodes with one parameter
set, so `distill.decode_times` (the call the reproduction report times) runs
`model.predict` against `realign.dera_decode` at the same batch for all
--steps steps, in turns after a warm-up call; `distilled_over_dera` is their
ratio (target <= 0.55).

Every row also runs for a single step, which splits its time into the
encoder pass with the first step, and the cost of each later step:
(all steps - one step) / (steps - 1). Printed per row: seconds, generated
tokens/s (batch x steps, x 8 for the sweep), that split, compile seconds
(first call minus a warm call) for ours, and the decoder-weight bytes a
later step reads (every decoder parameter and the output projection, once
per parameter set; caches and activations not counted) over its time, as a
fraction of this machine's memory bandwidth measured in the same run (a
model small enough to stay in cache can exceed 100%). The script checks the tokens agree (ours vs
PyTorch up to our first EOS, the sweep's lambda=0.5 row vs `dera_decode`),
prints the issue's targets as met / MISSED, then one JSON line with every
figure (`{shape}_b{batch}_{row}_...`, and the target keys). Not a test:
timings are noisy.

It also shows what the loop's early exit (`chunk_size`) buys when outputs
end before `max_decode_len`: our DeRa step (`realign.tokens_to_logits`) in
`decoding.sample`, sampled at temperature 1 with the EOS logit set so that
every step ends a row with probability --eos_prob (geometric lengths, mean
1 / eos_prob), run for all --exit_steps steps and with chunks of --chunk
steps (the same tokens, checked).

Decoder-only rows (--families=decoder_only): a random Mistral-shaped pair
(`common.DECODER_ONLY_SHAPES`: hidden 256, 4 layers, 8 heads, 4 KV heads, MLP
704, vocab 32000, no EOS) written as safetensors and read with
`checkpoints.load_hf`, so both sides hold the same weights; --prompts prompts
of --prompt_len random tokens, --new_tokens greedy new tokens, float32,
lambda 0.5. Timed in turns after a warm-up call:

  do_ours_dera     one batched `realign.dera_decode` call (jitted; its compile
                   is the first call minus a warm one, reported apart)
  do_authors       the authors' approach: transformers `generate` on the
                   aligned model with their logits processor
                   (`common.RealignLogitsProcessor`, which runs the reference
                   model with its own KV cache), one prompt a call
  do_torch_loop    a batched PyTorch two-model loop: both models prefill the
                   batch, then each step feeds the chosen tokens to both with
                   their `past_key_values`, mixes the last logits and argmaxes
  do_ours_sweep8   `realign.dera_sweep` over 8 lambdas, against 8 separate
                   `dera_decode` calls (8 x do_ours_dera)

The three DeRa sides must give the same tokens (checked per row), and the
sweep's lambda = 0.5 row must equal `dera_decode`. Targets: ours at least 5x
the authors' approach and at least 1.0x the batched loop. --torch_threads
sets PyTorch's intra-op threads (0: its default).
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402
from dera_t5x import checkpoints  # noqa: E402
from dera_t5x import decoding  # noqa: E402
from dera_t5x import models  # noqa: E402
from dera_t5x import realign  # noqa: E402
from dera_t5x.training import distill  # noqa: E402

LAMBDA = 0.5
SWEEP = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0)  # K = 8, holds LAMBDA


def _model_pair(shape: str):
    """Two random T5s of `shape` on both sides: (torch ref, torch aligned), and
    (config, params_ref, params_aligned) read back from their safetensors."""
    torch_models, params = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed, name in ((0, "ref"), (1, "aligned")):
            directory = pathlib.Path(tmp) / name
            torch_models.append(common.random_hf_t5(shape, directory, seed).eval())
            config, loaded = checkpoints.load_hf_t5(directory)
            params.append(loaded)
    return tuple(torch_models), (config, *params)


def _decoder_bytes(params) -> int:
    """Parameter bytes one decode step reads: the decoder, and the embedding
    when it is also the output projection (T5.1.0)."""
    tree = {"decoder": params["decoder"]}
    if "logits_dense" not in params["decoder"]:
        tree["embedding"] = params["token_embedder"]
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))


@torch.no_grad()
def _torch_dera(ref, aligned, enc: torch.Tensor, lam: float, steps: int) -> np.ndarray:
    """Greedy DeRa in eager PyTorch with a KV cache per model: [batch, steps]."""
    mask = enc > 0
    ref_enc = ref.encoder(input_ids=enc, attention_mask=mask)
    aligned_enc = aligned.encoder(input_ids=enc, attention_mask=mask)
    tokens = torch.zeros((enc.shape[0], 1), dtype=torch.long, device=enc.device)
    ref_past = aligned_past = None
    out = []
    for _ in range(steps):
        r = ref(encoder_outputs=ref_enc, attention_mask=mask, decoder_input_ids=tokens,
                past_key_values=ref_past, use_cache=True)
        a = aligned(encoder_outputs=aligned_enc, attention_mask=mask, decoder_input_ids=tokens,
                    past_key_values=aligned_past, use_cache=True)
        ref_past, aligned_past = r.past_key_values, a.past_key_values
        mixed = lam * a.logits[:, -1] + (1 - lam) * r.logits[:, -1]
        mixed[:, 0] = -float("inf")
        tokens = mixed.argmax(-1, keepdim=True)
        out.append(tokens)
    return torch.cat(out, 1).cpu().numpy()


@torch.no_grad()
def _torch_generate(model, enc: torch.Tensor, steps: int) -> np.ndarray:
    """Greedy `generate` of exactly `steps` new tokens, padding suppressed."""
    out = model.generate(input_ids=enc, attention_mask=enc > 0, do_sample=False, num_beams=1,
                         max_new_tokens=steps, min_new_tokens=steps, suppress_tokens=[0])
    return out[:, 1:].cpu().numpy()


def _agree(ours, peer) -> float:
    """Share of rows where the peer's tokens equal ours up to our first EOS."""
    ours, peer = np.asarray(ours), np.asarray(peer)
    rows = []
    for mine, theirs in zip(ours, peer):
        end = int(np.argmax(mine == models.EOS_ID)) if np.any(mine == models.EOS_ID) \
            else len(mine)
        rows.append(np.array_equal(mine[:end], theirs[:end]))
    return float(np.mean(rows))


def _first_call(fn) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    tokens = np.asarray(fn())
    return tokens, time.perf_counter() - start


def bench_shape(shape: str, batches: list[int], in_len: int, steps: int, reps: int,
                torch_device: str) -> dict[int, dict]:
    """Every row at each batch size: {batch: {figure: value}}."""
    (ref, aligned), (config, params_ref, params_aligned) = _model_pair(shape)
    ref, aligned = ref.to(torch_device), aligned.to(torch_device)
    model = models.EncoderDecoderModel(config)
    key = jax.random.PRNGKey(0)
    predict = jax.jit(model.predict, static_argnames=("max_decode_len",))
    step_bytes = _decoder_bytes(params_ref)
    results = {}
    for batch in batches:
        inputs = np.random.default_rng(0).integers(2, config.vocab_size, size=(batch, in_len),
                                                    dtype=np.int32)
        enc = torch.tensor(inputs, dtype=torch.long, device=torch_device)
        rows = {
            "ours_single": lambda n: predict(params_ref, inputs, key, max_decode_len=n).tokens,
            "ours_dera": lambda n: realign.dera_decode(
                model, params_ref, params_aligned, inputs, np.full(batch, LAMBDA),
                max_decode_len=n, rng=key, temperature=0.0).tokens,
            "ours_sweep8": lambda n: realign.dera_sweep(
                model, params_ref, params_aligned, inputs, SWEEP, max_decode_len=n, rng=key,
                temperature=0.0).tokens,
            "torch_generate": lambda n: _torch_generate(ref, enc, n),
            "torch_two_model": lambda n: _torch_dera(ref, aligned, enc, LAMBDA, n),
        }
        # Each row also runs for one step: what the encoder pass and the first
        # step cost, so the per-step cost is (all steps - one step) / (steps - 1).
        fns = {(name, n): functools.partial(lambda row, n: np.asarray(row(n)), row, n)
               for name, row in rows.items() for n in (steps, 1)}
        first = {key_: _first_call(fn) for key_, fn in fns.items()}
        tokens = {name: first[(name, steps)][0] for name in rows}
        seconds = dict(zip(fns, common.median_times(list(fns.values()), reps, warmup=0)))
        r = {"single_tokens_agree": _agree(tokens["ours_single"], tokens["torch_generate"]),
             "dera_tokens_agree": _agree(tokens["ours_dera"], tokens["torch_two_model"]),
             "sweep_matches_dera": bool(np.array_equal(
                 tokens["ours_sweep8"][SWEEP.index(LAMBDA)], tokens["ours_dera"]))}
        for name in rows:
            t, t1 = seconds[(name, steps)], seconds[(name, 1)]
            sequences = batch * (len(SWEEP) if name == "ours_sweep8" else 1)
            models_read = 1 if name in ("ours_single", "torch_generate") else 2
            r[f"{name}_s"] = t
            r[f"{name}_tokens_per_s"] = sequences * steps / t
            r[f"{name}_first_step_s"] = t1
            r[f"{name}_per_step_s"] = (t - t1) / max(steps - 1, 1)
            r[f"{name}_weight_bandwidth"] = models_read * step_bytes / r[f"{name}_per_step_s"]
            if name.startswith("ours"):
                r[f"{name}_compile_s"] = first[(name, steps)][1] - t
        t = {name: seconds[(name, steps)] for name in rows}
        per_step = {name: r[f"{name}_per_step_s"] for name in rows}
        r["dera_vs_torch_two_model_speedup"] = t["torch_two_model"] / t["ours_dera"]
        r["dera_vs_torch_two_model_per_step_speedup"] = (per_step["torch_two_model"]
                                                         / per_step["ours_dera"])
        r["single_vs_torch_generate_speedup"] = t["torch_generate"] / t["ours_single"]
        r["dera_over_single"] = t["ours_dera"] / t["ours_single"]
        r["dera_over_single_per_step"] = per_step["ours_dera"] / per_step["ours_single"]
        r["sweep8_vs_8_dera_calls_speedup"] = len(SWEEP) * t["ours_dera"] / t["ours_sweep8"]
        r["sweep8_vs_8_torch_two_model_speedup"] = (len(SWEEP) * t["torch_two_model"]
                                                    / t["ours_sweep8"])
        sampled = distill.decode_times(model, params_aligned, params_ref, params_aligned,
                                       inputs, LAMBDA, max_decode_len=steps, seed=0, reps=reps)
        r["distilled_sampled_s"] = sampled["student_s"]
        r["dera_sampled_s"] = sampled["dera_s"]
        r["distilled_over_dera"] = sampled["student_over_dera"]
        results[batch] = r
    return results


def bench_early_exit(shape: str, batch: int, in_len: int, steps: int, chunk: int,
                     eos_prob: float, reps: int) -> dict:
    """Ours without and with early exit, on rows that end before `steps`."""
    _, (config, params_ref, params_aligned) = _model_pair(shape)
    model = models.EncoderDecoderModel(config)
    inputs = np.random.default_rng(0).integers(2, config.vocab_size, size=(batch, in_len),
                                                dtype=np.int32)
    lam = np.full(batch, 0.5, np.float32)

    def decode(chunk_size):
        def run(params_ref, params_aligned, inputs, lam, rng):
            mix = realign.tokens_to_logits(model, params_ref, params_aligned, lam)

            def ending(tokens, cache):
                logits, cache, aux = mix(tokens, cache)
                others = jax.nn.logsumexp(logits.at[:, models.EOS_ID].set(-jnp.inf), axis=-1)
                eos = others + np.log(eos_prob / (1.0 - eos_prob))  # P(EOS) = eos_prob
                return logits.at[:, models.EOS_ID].set(eos), cache, aux

            cache = {name: model.init_decode_cache(p, inputs, steps)
                     for name, p in (("ref", params_ref), ("aligned", params_aligned))}
            return decoding.sample(ending, cache, rng, batch_size=batch, max_decode_len=steps,
                                   eos_id=models.EOS_ID, temperature=1.0,
                                   chunk_size=chunk_size)
        compiled = jax.jit(run)
        args = (params_ref, params_aligned, inputs, lam, jax.random.PRNGKey(0))
        return lambda: jax.block_until_ready(compiled(*args))

    full, early = decode(None), decode(chunk)
    full_out, early_out = full(), early()
    lengths = np.asarray(full_out.lengths)
    t_full, t_early = common.median_times((full, early), reps)
    return {"exit_identical": bool(np.array_equal(full_out.tokens, early_out.tokens)),
            "exit_mean_length": float(lengths.mean()), "exit_max_length": int(lengths.max()),
            "exit_full_s": t_full, "exit_early_s": t_early, "exit_steps": steps,
            "exit_chunk": chunk}


def _decoder_only_pair(shape: str):
    """Two random causal LMs of `shape`: (torch ref, torch aligned), and
    (config, params_ref, params_aligned) read back from their safetensors."""
    torch_models, params = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed, name in ((0, "ref"), (1, "aligned")):
            directory = pathlib.Path(tmp) / name
            torch_models.append(common.random_hf_causal_lm(shape, directory, seed))
            config, loaded = checkpoints.load_hf(directory)
            params.append(loaded)
    return tuple(torch_models), (config, *params)


@torch.no_grad()
def _authors_dera(ref, aligned, prompts: torch.Tensor, lam: float, steps: int) -> np.ndarray:
    """The authors' approach, one prompt per `generate` call: [batch, steps]."""
    rows = []
    for prompt in prompts:
        prompt = prompt[None]
        processors = transformers.LogitsProcessorList([common.RealignLogitsProcessor(ref, lam)])
        out = aligned.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                               num_beams=1, max_new_tokens=steps, pad_token_id=0,
                               logits_processor=processors)
        rows.append(out[0, prompt.shape[1]:])
    return torch.stack(rows).cpu().numpy()


@torch.no_grad()
def _torch_batched_dera(ref, aligned, prompts: torch.Tensor, lam: float, steps: int
                        ) -> np.ndarray:
    """Greedy DeRa of the whole batch in eager PyTorch, a KV cache per model:
    [batch, steps]. The prompts are unpadded (all of one length)."""
    kwargs = dict(use_cache=True, logits_to_keep=1)
    r, a = ref(input_ids=prompts, **kwargs), aligned(input_ids=prompts, **kwargs)
    out = []
    for t in range(steps):
        mixed = lam * a.logits[:, -1] + (1 - lam) * r.logits[:, -1]
        tokens = mixed.argmax(-1, keepdim=True)
        out.append(tokens)
        if t + 1 < steps:
            r = ref(input_ids=tokens, past_key_values=r.past_key_values, **kwargs)
            a = aligned(input_ids=tokens, past_key_values=a.past_key_values, **kwargs)
    return torch.cat(out, 1).cpu().numpy()


def bench_decoder_only(shape: str, batch: int, prompt_len: int, steps: int, reps: int,
                       torch_device: str) -> dict:
    """The decoder-only rows: {figure: value}."""
    (ref, aligned), (config, params_ref, params_aligned) = _decoder_only_pair(shape)
    ref, aligned = ref.to(torch_device), aligned.to(torch_device)
    # On the device once, as PyTorch's are (numpy parameters would be copied
    # to the device at every call).
    params_ref, params_aligned = jax.device_put((params_ref, params_aligned))
    model = models.for_config(config)
    assert model.eos_ids == (), "the benchmarked shape decodes every step (no EOS)"
    inputs = np.random.default_rng(0).integers(2, config.vocab_size, size=(batch, prompt_len),
                                                dtype=np.int32)
    prompt_lengths = np.full(batch, prompt_len, np.int32)
    prompts = torch.tensor(inputs, dtype=torch.long, device=torch_device)
    kwargs = dict(prompt_lengths=prompt_lengths, max_decode_len=steps,
                  rng=jax.random.PRNGKey(0), temperature=0.0)
    rows = {
        "ours_dera": lambda: np.asarray(realign.dera_decode(
            model, params_ref, params_aligned, inputs, np.full(batch, LAMBDA), **kwargs).tokens),
        "ours_sweep8": lambda: np.asarray(realign.dera_sweep(
            model, params_ref, params_aligned, inputs, SWEEP, **kwargs).tokens),
        "authors": lambda: _authors_dera(ref, aligned, prompts, LAMBDA, steps),
        "torch_loop": lambda: _torch_batched_dera(ref, aligned, prompts, LAMBDA, steps),
    }
    first = {name: _first_call(fn) for name, fn in rows.items()}
    tokens = {name: value[0] for name, value in first.items()}
    seconds = dict(zip(rows, common.median_times(list(rows.values()), reps, warmup=0)))
    ours = tokens["ours_dera"]
    r = {"batch": batch, "prompt_len": prompt_len, "steps": steps,
         "authors_tokens_agree": float(np.mean(np.all(tokens["authors"] == ours, axis=1))),
         "torch_loop_tokens_agree": float(np.mean(np.all(tokens["torch_loop"] == ours, axis=1))),
         "sweep_matches_dera": bool(np.array_equal(tokens["ours_sweep8"][SWEEP.index(LAMBDA)],
                                                   ours))}
    for name in rows:
        sequences = batch * (len(SWEEP) if name == "ours_sweep8" else 1)
        r[f"{name}_s"] = seconds[name]
        r[f"{name}_tokens_per_s"] = sequences * steps / seconds[name]
        if name.startswith("ours"):
            r[f"{name}_compile_s"] = first[name][1] - seconds[name]
    t = seconds
    r["dera_vs_authors_speedup"] = t["authors"] / t["ours_dera"]
    r["dera_vs_torch_loop_speedup"] = t["torch_loop"] / t["ours_dera"]
    r["sweep8_vs_8_dera_calls_speedup"] = len(SWEEP) * t["ours_dera"] / t["ours_sweep8"]
    r["sweep8_vs_8_torch_loops_speedup"] = len(SWEEP) * t["torch_loop"] / t["ours_sweep8"]
    return r


# The decoder-only targets: (figure, comparison, bound).
DECODER_ONLY_TARGETS = (
    ("dera_vs_authors_speedup", ">=", 5.0),
    ("dera_vs_torch_loop_speedup", ">=", 1.0),
)


def _print_decoder_only(shape: str, r: dict) -> dict[str, bool]:
    """Prints the decoder-only rows and targets; returns {target: met}."""
    print(f"{shape} (decoder-only), {r['batch']} prompts of {r['prompt_len']} tokens, "
          f"{r['steps']} new tokens:", flush=True)
    for name in ("ours_dera", "ours_sweep8", "authors", "torch_loop"):
        compile_s = r.get(f"{name}_compile_s")
        print(f"  {name:12s} {r[f'{name}_s']:8.3f} s  {r[f'{name}_tokens_per_s']:9.0f} tokens/s"
              + (f"  compile {compile_s:.1f} s" if compile_s is not None else ""), flush=True)
    print(f"  DeRa vs the authors' processor {r['dera_vs_authors_speedup']:.2f}x, vs the "
          f"batched PyTorch loop {r['dera_vs_torch_loop_speedup']:.2f}x; sweep of 8 vs 8 calls "
          f"{r['sweep8_vs_8_dera_calls_speedup']:.2f}x (vs 8 batched loops "
          f"{r['sweep8_vs_8_torch_loops_speedup']:.2f}x); tokens agree with ours: authors "
          f"{100 * r['authors_tokens_agree']:.0f}%, loop {100 * r['torch_loop_tokens_agree']:.0f}%"
          f" of rows, sweep = dera_decode: {r['sweep_matches_dera']}", flush=True)
    met = {}
    for figure, op, bound in DECODER_ONLY_TARGETS:
        ok = r[figure] >= bound if op == ">=" else r[figure] <= bound
        met[f"{shape}_{figure}"] = ok
        print(f"  {'met   ' if ok else 'MISSED'} {shape}: {figure} {r[figure]:.2f} "
              f"(target {op} {bound})", flush=True)
    return met


# (figure, batch, comparison, bound): the targets; batch None = every batch.
TARGETS = (
    ("tiny", 16, "dera_vs_torch_two_model_speedup", ">=", 5.0),
    ("t5_small", 16, "dera_vs_torch_two_model_speedup", ">=", 1.0),
    (None, None, "dera_over_single", "<=", 2.05),
    (None, None, "distilled_over_dera", "<=", 0.55),
    (None, None, "sweep8_vs_8_dera_calls_speedup", ">=", 4.0),
)


def _print_rows(shape: str, batch: int, r: dict, bandwidth: float) -> None:
    print(f"{shape}, batch {batch}:", flush=True)
    for name in ("ours_single", "ours_dera", "ours_sweep8", "torch_generate",
                 "torch_two_model"):
        compile_s = r.get(f"{name}_compile_s")
        print(f"  {name:16s} {r[f'{name}_s']:8.3f} s  {r[f'{name}_tokens_per_s']:9.0f} tokens/s"
              f"  encode + first step {r[f'{name}_first_step_s']:7.3f} s, then "
              f"{1e3 * r[f'{name}_per_step_s']:7.2f} ms a step, weights read at "
              f"{100 * r[f'{name}_weight_bandwidth'] / bandwidth:5.1f}% of bandwidth"
              + (f"  compile {compile_s:.1f} s" if compile_s is not None else ""), flush=True)
    print(f"  DeRa vs PyTorch two-model loop {r['dera_vs_torch_two_model_speedup']:.2f}x "
          f"({r['dera_vs_torch_two_model_per_step_speedup']:.2f}x a step after the first); "
          f"single vs generate {r['single_vs_torch_generate_speedup']:.2f}x; DeRa / single "
          f"{r['dera_over_single']:.2f} ({r['dera_over_single_per_step']:.2f} a step); "
          f"sweep of 8 vs 8 calls "
          f"{r['sweep8_vs_8_dera_calls_speedup']:.2f}x (vs 8 PyTorch loops "
          f"{r['sweep8_vs_8_torch_two_model_speedup']:.2f}x); tokens agree: single "
          f"{100 * r['single_tokens_agree']:.0f}%, DeRa {100 * r['dera_tokens_agree']:.0f}% of "
          f"rows, sweep = dera_decode: {r['sweep_matches_dera']}", flush=True)
    print(f"  distilled (one model, sampled) {r['distilled_sampled_s']:.3f} s vs DeRa (two "
          f"models, sampled) {r['dera_sampled_s']:.3f} s: {r['distilled_over_dera']:.2f}x",
          flush=True)


def _check_targets(results: dict[str, dict[int, dict]]) -> dict[str, bool]:
    met = {}
    for shape, batch, figure, op, bound in TARGETS:
        for s, by_batch in results.items():
            for b, r in by_batch.items():
                if (shape or s) != s or (batch or b) != b:
                    continue
                ok = r[figure] >= bound if op == ">=" else r[figure] <= bound
                met[f"{s}_b{b}_{figure}"] = ok
                print(f"  {'met   ' if ok else 'MISSED'} {s} batch {b}: {figure} "
                      f"{r[figure]:.2f} (target {op} {bound})", flush=True)
    return met


def _parse_batches(text: str, shapes: list[str]) -> dict[str, list[int]]:
    """'tiny:16,t5_small:16+64' -> {'tiny': [16], 't5_small': [16, 64]}."""
    batches = {}
    for item in text.split(","):
        shape, _, sizes = item.partition(":")
        batches[shape] = [int(b) for b in sizes.split("+")]
    missing = [s for s in shapes if s not in batches]
    if missing:
        raise SystemExit(f"--batches has no sizes for {missing}; e.g. --batches=tiny:16")
    return batches


FAMILIES = ("t5", "decoder_only")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES),
                        help="which rows to run: t5, decoder_only or both")
    parser.add_argument("--shapes", default="tiny,t5_small")
    parser.add_argument("--batches", default="tiny:16,t5_small:16+64",
                        help="batch sizes per shape: shape:b1+b2,...")
    parser.add_argument("--inputs", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--exit_steps", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--eos_prob", type=float, default=0.08)
    parser.add_argument("--decoder_only_shape", default="mistral_small")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt_len", type=int, default=48)
    parser.add_argument("--new_tokens", type=int, default=48)
    parser.add_argument("--torch_threads", type=int, default=0,
                        help="PyTorch intra-op threads; 0 keeps its default")
    parser.add_argument("--torch_device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    families = args.families.split(",")
    if set(families) - set(FAMILIES):
        parser.error(f"unknown families {sorted(set(families) - set(FAMILIES))}; choose from "
                     f"{list(FAMILIES)}.")
    if args.decoder_only_shape not in common.DECODER_ONLY_SHAPES:
        parser.error(f"unknown --decoder_only_shape; choose from "
                     f"{sorted(common.DECODER_ONLY_SHAPES)}.")
    shapes = args.shapes.split(",") if "t5" in families else []
    unknown = set(shapes) - set(common.SHAPES)
    if unknown:
        parser.error(f"unknown shapes {sorted(unknown)}; choose from {sorted(common.SHAPES)}.")
    batches = _parse_batches(args.batches, shapes)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    bandwidth = common.memory_bandwidth()
    print(f"memory bandwidth ({jax.devices()[0].platform}): {bandwidth / 1e9:.1f} GB/s; "
          f"PyTorch threads: {torch.get_num_threads()}", flush=True)
    figures = {"device": jax.devices()[0].platform, "torch_device": args.torch_device,
               "torch_threads": torch.get_num_threads(), "memory_bandwidth": bandwidth}
    if shapes:
        figures.update(inputs=args.inputs, steps=args.steps)
    results = {}
    for shape in shapes:
        results[shape] = bench_shape(shape, batches[shape], args.inputs, args.steps, args.reps,
                                     args.torch_device)
        for batch, r in results[shape].items():
            _print_rows(shape, batch, r, bandwidth)
            figures.update({f"{shape}_b{batch}_{k}": v for k, v in r.items()})
        smallest = results[shape][min(results[shape])]
        figures[f"{shape}_dera_vs_torch_two_model_speedup"] = smallest[
            "dera_vs_torch_two_model_speedup"]
        e = bench_early_exit(shape, min(batches[shape]), args.inputs, args.exit_steps,
                             args.chunk, args.eos_prob, args.reps)
        e["exit_speedup"] = e["exit_full_s"] / e["exit_early_s"]
        figures.update({f"{shape}_{k}": v for k, v in e.items()})
        print(f"{shape}: early exit, lengths mean {e['exit_mean_length']:.1f} / max "
              f"{e['exit_max_length']} of {e['exit_steps']} steps: "
              f"{e['exit_full_s']:.3f}s all steps vs {e['exit_early_s']:.3f}s with chunks of "
              f"{e['exit_chunk']} ({e['exit_speedup']:.2f}x), tokens identical: "
              f"{e['exit_identical']}", flush=True)
    met = {}
    if "decoder_only" in families:
        shape = args.decoder_only_shape
        r = bench_decoder_only(shape, args.prompts, args.prompt_len, args.new_tokens,
                               args.reps, args.torch_device)
        figures.update({f"{shape}_{k}": v for k, v in r.items()})
        met.update(_print_decoder_only(shape, r))
    if shapes:
        print("targets:")
        met.update(_check_targets(results))
    figures.update({f"target_{k}": v for k, v in met.items()})
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
