r"""DeRa decoding speed: our compiled two-model scan vs a PyTorch two-model loop.

    python bench/decode.py [--shapes=tiny,t5_small] [--batch=16] [--reps=3]

The peer is what the authors' public code does with transformers: two T5
models with their own KV caches, the last-step logits mixed per step in eager
PyTorch, one lambda per call (a sweep of K lambdas is K calls, each encoding
the inputs again). Ours is `realign.dera_decode` for one lambda and
`realign.dera_sweep` for K lambdas (one encoder pass per parameter set).
Both decode greedily for a fixed number of steps from the same random
weights (loaded from the same safetensors), so they do the same work; the
script checks the tokens agree. Prints ratios measured side by side in one
process, then one JSON line with every figure. Not a test: timings are noisy.

It also shows what the loop's early exit (`chunk_size`) buys when outputs
end before `max_decode_len`: our DeRa step (`realign.tokens_to_logits`) in
`decoding.sample`, sampled at temperature 1 with the EOS logit set so that
every step ends a row with probability --eos_prob (geometric lengths, mean
1 / eos_prob), run for all --exit_steps steps
and with chunks of --chunk steps (the same tokens, checked).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402
from dera_t5x import checkpoints  # noqa: E402
from dera_t5x import decoding  # noqa: E402
from dera_t5x import models  # noqa: E402
from dera_t5x import realign  # noqa: E402

LAMBDAS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)


def _hf_pair(shape: str, directory: pathlib.Path):
    """[(reference, its directory), (aligned, its directory)]: two random T5s."""
    return [(common.random_hf_t5(shape, directory / name, seed).eval(), directory / name)
            for seed, name in ((0, "ref"), (1, "aligned"))]


@torch.no_grad()
def _torch_dera(ref, aligned, inputs, lam: float, steps: int) -> np.ndarray:
    """Greedy DeRa in eager PyTorch with a KV cache per model."""
    enc = torch.tensor(inputs)
    mask = enc > 0
    ref_enc = ref.encoder(input_ids=enc, attention_mask=mask)
    aligned_enc = aligned.encoder(input_ids=enc, attention_mask=mask)
    tokens = torch.zeros((len(inputs), 1), dtype=torch.long)
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
    return torch.cat(out, 1).numpy()


def bench_shape(shape: str, batch: int, in_len: int, steps: int, reps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        (ref, ref_path), (aligned, aligned_path) = _hf_pair(shape, pathlib.Path(tmp))
        config, params_ref = checkpoints.load_hf_t5(ref_path)
        _, params_aligned = checkpoints.load_hf_t5(aligned_path)
    model = models.EncoderDecoderModel(config)
    rng = np.random.default_rng(0)
    inputs = rng.integers(2, config.vocab_size, size=(batch, in_len)).astype(np.int32)
    key = jax.random.PRNGKey(0)

    def ours_one():
        out = realign.dera_decode(model, params_ref, params_aligned, inputs, np.full(batch, 0.5),
                                  max_decode_len=steps, rng=key, temperature=0.0)
        return jax.block_until_ready(out.tokens)

    def ours_sweep():
        out = realign.dera_sweep(model, params_ref, params_aligned, inputs, LAMBDAS,
                                 max_decode_len=steps, rng=key, temperature=0.0)
        return jax.block_until_ready(out.tokens)

    # Greedy rows stop differing only at EOS handling: compare up to our EOS.
    ours = np.asarray(ours_one())
    peer = _torch_dera(ref, aligned, inputs, 0.5, steps)
    agree = float(np.mean([np.array_equal(ours[i][ours[i] != 0], peer[i][:np.sum(ours[i] != 0)])
                           for i in range(batch)]))
    t_ours, t_peer, t_sweep = common.median_times(
        (ours_one, lambda: _torch_dera(ref, aligned, inputs, 0.5, steps), ours_sweep), reps)
    t_peer_sweep = t_peer * len(LAMBDAS)  # the peer decodes one lambda per call
    return {"shape": shape, "tokens_agree": agree, "ours_s": t_ours, "torch_s": t_peer,
            "speedup_one_lambda": t_peer / t_ours, "ours_sweep_s": t_sweep,
            "torch_sweep_s": t_peer_sweep, "speedup_sweep": t_peer_sweep / t_sweep}


def bench_early_exit(shape: str, batch: int, in_len: int, steps: int, chunk: int,
                     eos_prob: float, reps: int) -> dict:
    """Ours without and with early exit, on rows that end before `steps`."""
    with tempfile.TemporaryDirectory() as tmp:
        (_, ref_path), (_, aligned_path) = _hf_pair(shape, pathlib.Path(tmp))
        config, params_ref = checkpoints.load_hf_t5(ref_path)
        _, params_aligned = checkpoints.load_hf_t5(aligned_path)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="tiny,t5_small")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--inputs", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--exit_steps", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--eos_prob", type=float, default=0.08)
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    results = {}
    for shape in args.shapes.split(","):
        r = bench_shape(shape, args.batch, args.inputs, args.steps, args.reps)
        results[shape] = r
        print(f"{shape}: one lambda {r['ours_s']:.3f}s vs torch {r['torch_s']:.3f}s "
              f"({r['speedup_one_lambda']:.2f}x); sweep of {len(LAMBDAS)} lambdas "
              f"{r['ours_sweep_s']:.3f}s vs {r['torch_sweep_s']:.3f}s "
              f"({r['speedup_sweep']:.2f}x); tokens agree on {100 * r['tokens_agree']:.0f}% "
              "of rows", flush=True)
        e = bench_early_exit(shape, args.batch, args.inputs, args.exit_steps, args.chunk,
                             args.eos_prob, args.reps)
        r.update(e, exit_speedup=e["exit_full_s"] / e["exit_early_s"])
        print(f"{shape}: early exit, lengths mean {e['exit_mean_length']:.1f} / max "
              f"{e['exit_max_length']} of {e['exit_steps']} steps: "
              f"{e['exit_full_s']:.3f}s all steps vs {e['exit_early_s']:.3f}s with chunks of "
              f"{e['exit_chunk']} ({r['exit_speedup']:.2f}x), tokens identical: "
              f"{e['exit_identical']}", flush=True)
    print(json.dumps({"device": jax.devices()[0].platform, "batch": args.batch,
                      "inputs": args.inputs, "steps": args.steps, **{
                          f"{s}_{k}": v for s, r in results.items() for k, v in r.items()
                          if k != "shape"}}))


if __name__ == "__main__":
    main()
