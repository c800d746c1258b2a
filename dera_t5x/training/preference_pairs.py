"""Preference pairs we can compute: samples of the SFT model labelled by a reward.

`build` samples `pairs_per_prompt` independent pairs of responses per prompt
from a model (the SFT model, which DeRa uses as its reference) and labels each
pair through a Bradley-Terry
model of a reward r: response a is preferred with probability
`sigmoid((r(a) - r(b)) / tau)`. Labels are drawn from that probability
(`labels='sampled'`, optionally flipped with probability `flip_rate`, as
AlpacaFarm's noisy annotators) or kept as the probability itself
(`labels='soft'`). DPO at beta on labels drawn at tau targets
`softmax(log pi_ref + r / (tau * beta))`, the RL optimum for the reward r / tau.
Choose tau near the spread of reward differences: with tau far below it the
labels are deterministic and DPO stops depending on beta.

Pairs whose two responses are identical carry no preference and are dropped
(counted in the header). `write` / `read` keep pairs as JSON lines, text
fields included, so `tasks.register_jsonl_preference_task(name, paths,
'prompt', 'chosen_text', 'rejected_text')` reads them like users' own; the
header holds the settings, and `cached` rebuilds a file built with others.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dera_t5x import batching
from dera_t5x import jsonl
from dera_t5x import models
from dera_t5x.models import protocol
from dera_t5x.training import rewards

Params = Any
LABELS = ("sampled", "soft")


def build(model: models.Model, params: Params, prompts: np.ndarray, reward: rewards.Reward, *,
          tau: float, labels: str = "sampled", flip_rate: float = 0.0, max_decode_len: int,
          pairs_per_prompt: int = 1, batch_size: int = 64, seed: int = 0,
          prompt_lengths: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], int]:
    """Samples and labels `pairs_per_prompt` pairs per prompt.

    Args:
      prompts: [n, in_len] model inputs (T5: encoder input tokens; a
        decoder-only model's right-padded prompts, with `prompt_lengths` [n]).
      reward: scores (prompt, response) rows.
      tau: the Bradley-Terry temperature (> 0).
      labels: 'sampled' (hard labels drawn from the preference probability)
        or 'soft' (preference = the probability).
      flip_rate: probability of swapping a sampled label (noise), in [0, 0.5].
      pairs_per_prompt: independent pairs per prompt (rows of a prompt adjacent).

    Returns:
      (pairs, number dropped as identical): `inputs`, `chosen`, `rejected`
      [m, ...] int32, `preference` [m] float32 (P(chosen preferred)),
      `chosen_reward`, `rejected_reward` [m] float32, and with prompt
      lengths given, `prompt_lengths` [m] int32 (what `dpo.train_dpo` reads).
    """
    if not (np.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}.")
    if labels not in LABELS:
        raise ValueError(f"labels must be one of {LABELS}, got {labels!r}.")
    if not 0.0 <= flip_rate <= 0.5:
        raise ValueError(f"flip_rate must be in [0, 0.5], got {flip_rate!r}.")
    if not (isinstance(pairs_per_prompt, int) and pairs_per_prompt >= 1):
        raise ValueError(f"pairs_per_prompt must be an integer >= 1, got {pairs_per_prompt!r}.")
    rows = {"p": np.repeat(np.asarray(prompts), pairs_per_prompt, axis=0)}
    if prompt_lengths is not None:
        protocol.check_prompt_lengths(prompt_lengths, prompts, "prompt_lengths")
        rows["n"] = np.repeat(np.asarray(prompt_lengths, np.int32), pairs_per_prompt)
    key = jax.random.PRNGKey(seed)

    @jax.jit
    def sample_pair(batch, rng):
        both = {k: jnp.concatenate([v, v], axis=0) for k, v in batch.items()}
        out = model.predict(params, both["p"], rng, prompt_lengths=both.get("n"),
                            max_decode_len=max_decode_len, temperature=1.0)
        scores = reward.apply(reward.params, both["p"], out.tokens)
        return jnp.split(out.tokens, 2), jnp.split(scores, 2)

    columns: dict[str, list[np.ndarray]] = {name: [] for name in ("a", "b", "ra", "rb")}
    for i, (batch, mask) in enumerate(batching.eval_batches(rows, batch_size)):
        (a, b), (ra, rb) = sample_pair(batch, jax.random.fold_in(key, i))
        for name, value in (("a", a), ("b", b), ("ra", ra), ("rb", rb)):
            columns[name].append(np.asarray(value)[mask])
    a, b, ra, rb = (np.concatenate(columns[name]) for name in ("a", "b", "ra", "rb"))
    if not (np.all(np.isfinite(ra)) and np.all(np.isfinite(rb))):
        raise FloatingPointError("The reward is not finite for some sampled responses; "
                                 "fix the reward before building pairs.")
    p_a = 1.0 / (1.0 + np.exp(-(ra - rb) / tau))  # P(a preferred)
    noise = np.random.default_rng([seed, 1])
    if labels == "sampled":
        a_wins = noise.random(len(p_a)) < p_a
        a_wins ^= noise.random(len(p_a)) < flip_rate
        preference = np.ones(len(p_a), np.float32)
    else:
        a_wins = p_a >= 0.5
        preference = np.where(a_wins, p_a, 1.0 - p_a).astype(np.float32)
    distinct = ~np.all(a == b, axis=1)
    chosen = np.where(a_wins[:, None], a, b)
    rejected = np.where(a_wins[:, None], b, a)
    pairs = {"inputs": np.asarray(rows["p"], np.int32)[distinct],
             "chosen": chosen[distinct].astype(np.int32),
             "rejected": rejected[distinct].astype(np.int32),
             "preference": preference[distinct],
             "chosen_reward": np.where(a_wins, ra, rb)[distinct].astype(np.float32),
             "rejected_reward": np.where(a_wins, rb, ra)[distinct].astype(np.float32)}
    if "n" in rows:
        pairs["prompt_lengths"] = rows["n"][distinct]
    return pairs, int(np.sum(~distinct))


def write(path: str | pathlib.Path, pairs: Mapping[str, np.ndarray], header: dict[str, Any],
          texts: Callable[[np.ndarray], list[str]] | None = None) -> None:
    """Writes pairs as JSON lines (atomically): a header line, then one pair per line.

    Args:
      texts: token rows -> text, for the `prompt`, `chosen_text` and
        `rejected_text` fields (omitted without it).
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = {name: texts(np.asarray(pairs[source])) if texts else None
            for name, source in (("prompt", "inputs"), ("chosen_text", "chosen"),
                                 ("rejected_text", "rejected"))}
    lines = [jsonl.dumps({"header": header})]
    for i in range(len(pairs["inputs"])):
        record = {name: np.asarray(value[i]).tolist() for name, value in pairs.items()}
        record.update({name: values[i] for name, values in text.items() if values is not None})
        lines.append(jsonl.dumps(record))
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)


def read(path: str | pathlib.Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(header, pairs) of a file `write` wrote."""
    lines = pathlib.Path(path).read_text(encoding="utf-8").splitlines()
    header = json.loads(lines[0])["header"]
    records = [json.loads(line) for line in lines[1:]]
    names = ["inputs", "chosen", "rejected", "preference", "chosen_reward", "rejected_reward"]
    if records and "prompt_lengths" in records[0]:  # a decoder-only model's pairs
        names.append("prompt_lengths")
    pairs = {name: np.asarray([r[name] for r in records],
                              np.float32 if name in ("preference", "chosen_reward",
                                                     "rejected_reward") else np.int32)
             for name in names}
    return header, pairs


def cached(path: str | pathlib.Path, settings: dict[str, Any],
           compute: Callable[[], tuple[dict[str, np.ndarray], int]],
           texts: Callable[[np.ndarray], list[str]] | None = None) -> dict[str, np.ndarray]:
    """The pairs at `path` if built with `settings`, else `compute()`d and written.

    Every DPO run of a pipeline (the base beta and each beta / lambda) reads
    the identical file.
    """
    settings = json.loads(json.dumps(settings))
    if pathlib.Path(path).exists():
        header, pairs = read(path)
        if header.get("settings") == settings:
            return pairs
    pairs, dropped = compute()
    write(path, pairs, {"settings": settings, "num_pairs": len(pairs["inputs"]),
                        "dropped_identical": dropped}, texts)
    return pairs


def split(pairs: Mapping[str, np.ndarray], fraction: float, seed: int
          ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(train, held-out) by a seeded permutation of the prompts: about `fraction`
    of the pairs held out, and every pair of a held-out prompt with them."""
    _, prompt_of_pair = np.unique(np.asarray(pairs["inputs"]), axis=0, return_inverse=True)
    prompt_of_pair = prompt_of_pair.reshape(-1)
    num_prompts = int(prompt_of_pair.max()) + 1
    order = np.random.default_rng([seed, 2]).permutation(num_prompts)
    held_out_prompts = order[:max(1, int(round(fraction * num_prompts)))]
    held_out = np.isin(prompt_of_pair, held_out_prompts)
    if held_out.all():
        raise ValueError(f"Holding out {fraction} of {num_prompts} prompts leaves no "
                         "training pairs; lower the held-out fraction or add prompts.")
    return ({k: np.asarray(v)[~held_out] for k, v in pairs.items()},
            {k: np.asarray(v)[held_out] for k, v in pairs.items()})


def reward_spread(pairs: Mapping[str, np.ndarray]) -> float:
    """The standard deviation of reward differences within pairs (a scale for tau)."""
    return float(np.std(np.asarray(pairs["chosen_reward"]) - pairs["rejected_reward"]))

