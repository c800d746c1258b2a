"""Evaluation of decoded summaries: length, reward, KL to SFT, win rates.

ROUGE lives with the tasks (`dera_t5x.data.metrics.rouge`).

All statistics are means over examples with their standard errors
(`*_sem`), computed on the host from arrays of decodes.
"""

from __future__ import annotations

import numpy as np

from dera_t5x import models


def _mean_and_sem(values: np.ndarray) -> tuple[float, float]:
    values = np.asarray(values, np.float64)
    sem = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0.0
    return float(values.mean()), float(sem)


def summary_lengths(tokens: np.ndarray) -> np.ndarray:
    """Tokens before EOS per row: [n, len] -> [n] (as the length reward counts)."""
    tokens = np.asarray(tokens)
    return np.sum((tokens != 0) & (tokens != models.EOS_ID), axis=-1)


def sequence_kl(log_probs: np.ndarray, ref_log_probs: np.ndarray) -> np.ndarray:
    """Per-sequence KL(pi || pi_ref) estimates [n] from samples of pi.

    Args:
      log_probs: [n, len] log pi of the sampled tokens (0 after the end).
      ref_log_probs: [n, len] log pi_ref of the same tokens (0 after the end).
    Returns the sum over tokens of log pi - log pi_ref, whose mean over samples
    is an unbiased estimate of the sequence-level KL.
    """
    return np.sum(np.asarray(log_probs, np.float64) - np.asarray(ref_log_probs, np.float64), -1)


def summarize(tokens: np.ndarray, rewards: np.ndarray, log_probs: np.ndarray,
              ref_log_probs: np.ndarray) -> dict[str, float]:
    """mean_length, mean_reward, kl (to the reference), each with its `_sem`."""
    out = {}
    for name, values in (("mean_length", summary_lengths(tokens)),
                         ("mean_reward", np.asarray(rewards)),
                         ("kl", sequence_kl(log_probs, ref_log_probs))):
        out[name], out[name + "_sem"] = _mean_and_sem(values)
    return out


def win_rate(rewards_a: np.ndarray, rewards_b: np.ndarray) -> float:
    """Fraction of examples where a's reward beats b's; ties count one half."""
    a, b = np.asarray(rewards_a), np.asarray(rewards_b)
    if a.shape != b.shape:
        raise ValueError(f"win_rate compares paired rewards, got shapes {a.shape} and {b.shape}.")
    return float(np.mean((a > b) + 0.5 * (a == b)))


def relative_gap(value: float, reference: float) -> float:
    """|value - reference| / |reference| (inf when the reference is 0 and value is not)."""
    if reference == 0:
        return 0.0 if value == 0 else float("inf")
    return abs(value - reference) / abs(reference)
