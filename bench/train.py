r"""Training-step speed: our jitted T5 train step vs transformers' PyTorch T5.

    python bench/train.py [--shapes=tiny,t5_small] [--batch=16] [--reps=5] [--dtype=float32]

Both sides train the same weights (a random transformers T5 saved as
safetensors and read with `checkpoints.load_hf_t5`) on the same random batch:
teacher-forced cross-entropy, backward pass and an AdamW update (lr 1e-4, no
weight decay, no dropout), one process. The first step of each is checked to
give the same loss. Reported: tokens/s (inputs + targets per step / median
step time over --reps steps, the two sides timed in turns, warm-up and
compilation excluded), our speedup, and our model FLOPs utilization: the
FLOPs XLA counts for the step divided by a matmul peak measured in the same
run (a large `jnp.dot`). Prints one line
per shape, then one JSON line of all figures. Not a test: timings are noisy.

It also splits one RL step (REINFORCE, batch prompts, `--targets` sampled
tokens) into rollout, scoring and update, so the cost of each is visible.
With `--rl_samples=k` (k > 1 samples a prompt) it times the step twice, the
prompts repeated k times and read once (`RLConfig.encode_prompts_once`), and
prints the ratio of the two steps' times.

`--dtype bfloat16` runs our activations in bfloat16 (params stay float32)
and PyTorch under bfloat16 autocast; meant for accelerators.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from dera_t5x import models  # noqa: E402
from dera_t5x.training import rewards  # noqa: E402
from dera_t5x.training import rl  # noqa: E402
from dera_t5x.training import trainer  # noqa: E402

LEARNING_RATE = 1e-4


def matmul_peak_flops(dtype: str, n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of a jitted n x n matmul on the default device (median of reps)."""
    a = jnp.ones((n, n), dtype)
    b = jnp.ones((n, n), dtype)
    dot = jax.jit(jnp.dot)
    seconds, = common.median_times([lambda: dot(a, b).block_until_ready()], reps)
    return 2.0 * n ** 3 / seconds


def _batch(vocab_size: int, batch: int, inputs: int, targets: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    enc = rng.integers(2, vocab_size, size=(batch, inputs)).astype(np.int32)
    tgt = rng.integers(2, vocab_size, size=(batch, targets)).astype(np.int32)
    dec = np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], axis=1)
    return {"encoder_input_tokens": enc, "decoder_input_tokens": dec,
            "decoder_target_tokens": tgt, "decoder_loss_weights": np.ones_like(tgt)}


def _flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
    return float(analysis.get("flops", 0.0))


def bench_shape(shape: str, batch_size: int, inputs: int, targets: int, reps: int, dtype: str,
                torch_device: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        peer = common.random_hf_t5(shape, pathlib.Path(tmp))
        config, params = checkpoints.load_hf_t5(tmp)
    config = dataclasses.replace(config, dropout_rate=0.0, dtype=dtype)
    model = models.EncoderDecoderModel(config)
    batch = _batch(config.vocab_size, batch_size, inputs, targets)
    tokens = batch_size * (inputs + targets)

    optimizer = trainer.make_optimizer("adamw", trainer.make_schedule("constant", LEARNING_RATE))
    step = trainer.make_train_step(lambda p, b, rng: model.loss(p, b), optimizer)
    batch_dev = jax.device_put(batch)
    state = trainer.TrainState.create(params, optimizer, 0)
    flops = _flops(step.lower(state, batch_dev).compile())
    state, metrics = step(state, batch_dev)
    ours_first_loss = float(metrics["loss"])

    def ours_step():
        nonlocal state
        state, metrics = step(state, batch_dev)
        jax.block_until_ready(metrics["loss"])

    peer = peer.to(torch_device).train()
    peer_optimizer = torch.optim.AdamW(peer.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    enc = torch.tensor(batch["encoder_input_tokens"], dtype=torch.long, device=torch_device)
    labels = torch.tensor(batch["decoder_target_tokens"], dtype=torch.long, device=torch_device)
    autocast = torch.autocast(torch_device.split(":")[0], dtype=torch.bfloat16,
                              enabled=dtype == "bfloat16")

    def peer_step() -> float:
        with autocast:
            loss = peer(input_ids=enc, labels=labels).loss
        loss.backward()
        peer_optimizer.step()
        peer_optimizer.zero_grad(set_to_none=True)
        if torch_device.startswith("cuda"):
            torch.cuda.synchronize()
        return float(loss.detach())

    peer_first_loss = peer_step()
    t_ours, t_peer = common.median_times((ours_step, peer_step), reps, warmup=2)
    return {"ours_tokens_per_s": tokens / t_ours, "torch_tokens_per_s": tokens / t_peer,
            "speedup_vs_torch": t_peer / t_ours, "ours_step_s": t_ours, "torch_step_s": t_peer,
            "step_flops": flops, "first_loss_ours": ours_first_loss,
            "first_loss_torch": peer_first_loss}


def bench_rl_step(shape: str, batch_size: int, inputs: int, targets: int, reps: int,
                  num_samples: int = 1, encode_prompts_once: bool = False) -> dict:
    """Seconds per RL step split into rollout (sampling `targets` tokens for
    each of `num_samples` samples a prompt), scoring (policy and reference
    log-probs, values, advantages) and update."""
    with tempfile.TemporaryDirectory() as tmp:
        common.random_hf_t5(shape, pathlib.Path(tmp))
        config, params = checkpoints.load_hf_t5(pathlib.Path(tmp))
    model = models.EncoderDecoderModel(config)
    rl_config = rl.RLConfig(beta=0.1, max_decode_len=targets, num_samples=num_samples,
                            encode_prompts_once=encode_prompts_once)
    optimizer = rl.make_optimizer(1e-5, 1e-4)
    steps = rl.make_step_functions(model, rl_config, optimizer, rewards.length_reward())
    state = {"params": rl.init_params(jax.tree_util.tree_map(jnp.copy, params),
                                      config.emb_dim)}
    state["opt_state"] = optimizer.init(state["params"])
    prompts = jnp.asarray(_batch(config.vocab_size, batch_size, inputs, targets)[
        "encoder_input_tokens"])
    out = {}

    def rollout():
        out["rollout"] = jax.block_until_ready(
            steps.rollout(state["params"], prompts, jax.random.PRNGKey(0)))

    def score():
        out["batch"] = jax.block_until_ready(
            steps.score(state["params"], params, None, out["rollout"][0], out["rollout"][2],
                        prompt_lengths=out["rollout"][1]))

    def update():
        state["params"], state["opt_state"], metrics = steps.update(
            state["params"], state["opt_state"], out["batch"])
        jax.block_until_ready(metrics)

    rollout(), score()
    names = ("rollout", "scoring", "update")
    times = dict(zip(names, common.median_times((rollout, score, update), reps, warmup=2)))
    total = sum(times.values())
    return {f"rl_{k}_s": v for k, v in times.items()} | {
        f"rl_{k}_share": v / total for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="tiny,t5_small")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--inputs", type=int, default=128)
    parser.add_argument("--targets", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rl_samples", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--torch_device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    unknown = set(args.shapes.split(",")) - set(common.SHAPES)
    if unknown:
        parser.error(f"unknown shapes {sorted(unknown)}; choose from {sorted(common.SHAPES)}.")
    if args.rl_samples < 1:
        parser.error(f"--rl_samples must be >= 1, got {args.rl_samples}.")
    peak = matmul_peak_flops(args.dtype)
    print(f"matmul peak ({args.dtype}, {jax.devices()[0].platform}): {peak / 1e9:.1f} GFLOP/s",
          flush=True)
    figures = {"device": jax.devices()[0].platform, "torch_device": args.torch_device,
               "dtype": args.dtype, "batch": args.batch, "inputs": args.inputs,
               "targets": args.targets, "matmul_peak_flops": peak}
    for shape in args.shapes.split(","):
        r = bench_shape(shape, args.batch, args.inputs, args.targets, args.reps, args.dtype,
                        args.torch_device)
        r["mfu"] = r["step_flops"] / r["ours_step_s"] / peak
        print(f"{shape}: ours {r['ours_tokens_per_s']:.0f} tokens/s vs torch "
              f"{r['torch_tokens_per_s']:.0f} ({r['speedup_vs_torch']:.2f}x); MFU "
              f"{100 * r['mfu']:.1f}%; first-step loss {r['first_loss_ours']:.4f} vs "
              f"{r['first_loss_torch']:.4f}", flush=True)
        figures.update({f"{shape}_{k}": v for k, v in r.items()})
        variants = {"": False} if args.rl_samples == 1 else {"": False, "once_": True}
        for prefix, once in variants.items():
            r = bench_rl_step(shape, args.batch, args.inputs, args.targets, args.reps,
                              args.rl_samples, once)
            print(f"{shape} RL step{', prompts encoded once' if once else ''}: rollout "
                  f"{r['rl_rollout_s']:.3f}s ({100 * r['rl_rollout_share']:.0f}%), scoring "
                  f"{r['rl_scoring_s']:.3f}s ({100 * r['rl_scoring_share']:.0f}%), update "
                  f"{r['rl_update_s']:.3f}s ({100 * r['rl_update_share']:.0f}%)", flush=True)
            figures.update({f"{shape}_{prefix}{k}": v for k, v in r.items()})
        if args.rl_samples > 1:
            step_s = {p: sum(figures[f"{shape}_{p}rl_{k}_s"]
                             for k in ("rollout", "scoring", "update")) for p in variants}
            figures[f"{shape}_rl_once_over_plain"] = step_s["once_"] / step_s[""]
            print(f"{shape} RL step with {args.rl_samples} samples a prompt: encoded once / "
                  f"repeated {figures[f'{shape}_rl_once_over_plain']:.2f}x", flush=True)
    figures["mfu"] = figures.get("t5_small_mfu", figures.get(f"{shape}_mfu"))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
