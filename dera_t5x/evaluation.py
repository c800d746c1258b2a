"""Evaluation of decoded summaries: length, reward, KL to SFT, win rates.

ROUGE lives with the tasks (`dera_t5x.data.metrics.rouge`).

All statistics are means over examples with their standard errors
(`*_sem`), computed on the host from arrays of decodes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from dera_t5x import models
from dera_t5x.training import rewards


def mean_and_sem(values: np.ndarray) -> tuple[float, float]:
    values = np.asarray(values, np.float64)
    sem = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0.0
    return float(values.mean()), float(sem)


def summary_lengths(tokens: np.ndarray, eos_ids: Sequence[int] = (models.EOS_ID,)
                    ) -> np.ndarray:
    """Tokens before EOS per row: [n, len] -> [n] (as the length reward counts)."""
    return np.asarray(rewards.response_length(np.asarray(tokens), eos_ids)).astype(np.int64)


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
        out[name], out[name + "_sem"] = mean_and_sem(values)
    return out


@dataclasses.dataclass(frozen=True)
class EvalRow:
    """One model (or DeRa at one lambda) evaluated on a split: the row the
    pipelines cache, compare and report.

    Attributes:
      lam: lambda (1.0 for a model evaluated alone); `lambda` in JSON.
      mean_length, mean_reward, kl: means over samples, each with `*_sem`;
        mean_reward is the reward the model was aligned with.
      rewards: every named reward of the evaluation: name -> [mean, sem].
      rouge: ROUGE-1 / 2 / L against the references (`rouge1`, ...).
      samples: a few decoded texts, for the report's examples.
      beta: the KL strength a retrained model was trained at (None: SFT).
    """

    lam: float
    mean_length: float
    mean_length_sem: float
    mean_reward: float
    mean_reward_sem: float
    kl: float
    kl_sem: float
    rouge: dict[str, float]
    samples: list[str]
    rewards: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    beta: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON form: `lambda` for `lam`, ROUGE scores at the top level."""
        row = dataclasses.asdict(self)
        row["lambda"] = row.pop("lam")
        row.update(row.pop("rouge"))
        return row

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> "EvalRow":
        row = dict(row)
        row["lam"] = row.pop("lambda")
        fields = {f.name for f in dataclasses.fields(cls)}
        row["rouge"] = {k: row.pop(k) for k in list(row) if k.startswith("rouge")}
        return cls(**{k: v for k, v in row.items() if k in fields})


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


def gold_comparison(dera: Sequence[Mapping[str, Any]], retrained: Sequence[Mapping[str, Any]],
                    share: float = 0.15, num_sem: float = 2.0) -> list[dict[str, Any]]:
    """DeRa's gold reward against the retrained models', lambda by lambda.

    Rows are report rows (`lambda`, `rewards`['gold'] = [mean, sem]); the
    retrained row at lambda 0 is the SFT model. A lambda passes when
    |DeRa - retrained| is at most `share` of the retrained model's gain over
    SFT, or, where that gain is near zero (within `num_sem` standard errors
    of the difference to SFT), at most `num_sem` standard errors of the
    DeRa - retrained difference. Returns one dict per shared lambda: `lambda`,
    `dera_gold`, `retrained_gold`, `gap`, `gain`, `tolerance`, `within`.
    """
    def gold(row):
        return row["rewards"]["gold"]

    by_lambda = {row["lambda"]: row for row in retrained}
    if 0.0 not in by_lambda:
        raise ValueError("The retrained rows need lambda 0 (the SFT model) to measure gains.")
    sft_mean, sft_sem = gold(by_lambda[0.0])
    rows = []
    for row in sorted(dera, key=lambda r: r["lambda"]):
        other = by_lambda.get(row["lambda"])
        if other is None:
            continue
        (d_mean, d_sem), (r_mean, r_sem) = gold(row), gold(other)
        gain = r_mean - sft_mean
        near_zero = abs(gain) <= num_sem * np.hypot(r_sem, sft_sem)
        tolerance = (num_sem * float(np.hypot(d_sem, r_sem)) if near_zero
                     else share * abs(gain))
        gap = abs(d_mean - r_mean)
        rows.append({"lambda": row["lambda"], "dera_gold": d_mean, "retrained_gold": r_mean,
                     "gap": gap, "gain": gain, "tolerance": tolerance,
                     "near_zero_gain": bool(near_zero), "within": bool(gap <= tolerance)})
    return rows


def length_toy(p_stop: float, cap: int, beta: float, lam: float) -> tuple[float, float]:
    """DeRa's own approximation gap where the optimum is computable.

    The SFT policy stops with probability `p_stop` after every token and
    always at `cap` tokens; the reward is the length. The exact optimum at
    beta is P*(n) ∝ P_sft(n) exp(n / beta), whose per-step stop probability
    is P*(n = t | n >= t). DeRa mixes the per-step log-probabilities of SFT
    and that optimum with weight lam.

    Returns:
      (mean length of DeRa at lam, mean length of the exact optimum at beta / lam).
    """
    n = np.arange(1, cap + 1)
    p_sft = np.where(n < cap, (1 - p_stop) ** (n - 1) * p_stop, (1 - p_stop) ** (cap - 1))

    def optimum(b):
        log_w = np.log(p_sft) + n / b
        w = np.exp(log_w - log_w.max())
        return w / w.sum()

    def stop_probs(p_n):
        survival = np.cumsum(p_n[::-1])[::-1]  # P(n >= t)
        return p_n / survival

    aligned = stop_probs(optimum(beta))
    sft = np.full(cap, p_stop)
    with np.errstate(divide="ignore"):
        stop = lam * np.log(aligned) + (1 - lam) * np.log(sft)
        go = lam * np.log1p(-aligned) + (1 - lam) * np.log1p(-sft)
    q = 1.0 / (1.0 + np.exp(go - stop))
    q[-1] = 1.0  # the cap
    dera_mean = float(np.sum(np.cumprod(np.concatenate([[1.0], 1 - q[:-1]]))))
    exact = optimum(beta / lam)
    return dera_mean, float(np.sum(n * exact))


def tilted_optimum(sft_lengths: np.ndarray, beta: float) -> dict[str, float]:
    """The exact KL-regularized optimum at beta for a reward that is the length,
    estimated from samples of the SFT model.

    pi*(y) ∝ pi_sft(y) exp(n(y) / beta) depends on y only through its length
    n, so its length distribution is P_sft(n) exp(n / beta) / Z and its
    objective max E[r] - beta * KL = beta * log E_sft[exp(n / beta)]. Both are
    self-normalized importance estimates over the samples; `ess` (the
    effective sample size) says how many carry the estimate (few at small
    beta, where the longest samples dominate).

    Args:
      sft_lengths: [n] lengths of samples from the SFT model.
    Returns:
      {'mean_length', 'objective', 'ess'}.
    """
    lengths = np.asarray(sft_lengths, np.float64)
    log_w = lengths / beta
    w = np.exp(log_w - log_w.max())
    return {"mean_length": float(np.sum(w * lengths) / np.sum(w)),
            "objective": float(beta * (np.log(np.mean(w)) + log_w.max())),
            "ess": float(np.sum(w) ** 2 / np.sum(w ** 2))}


def fit_stop_probability(mean_length: float, cap: int) -> float:
    """The stop probability p of `length_toy` whose SFT mean length (n >= 1,
    at most cap) is `mean_length`: (1 - (1 - p)^cap) / p = mean_length, 1 < mean_length < cap."""
    if not 1.0 < mean_length < cap:
        raise ValueError(f"The toy's SFT mean length must lie in (1, {cap}), got {mean_length}.")
    low, high = 1e-9, 1.0  # the mean falls from cap to 1 as p rises
    for _ in range(200):
        mid = 0.5 * (low + high)
        if (1 - (1 - mid) ** cap) / mid > mean_length:
            low = mid
        else:
            high = mid
    return 0.5 * (low + high)


def predicted_lengths(sft_mean_length: float, max_decode_len: int, beta: float, lam: float
                      ) -> tuple[float, float]:
    """`length_toy` matched to a measured SFT model: (DeRa's, the exact optimum's)
    mean length at lam, in the pipeline's units (words before EOS, at most
    max_decode_len).

    The toy counts the stop as a token (n = words + 1, cap max_decode_len + 1);
    its stop probability is fitted so that its SFT mean is `sft_mean_length`.
    """
    cap = max_decode_len + 1
    dera, exact = length_toy(fit_stop_probability(sft_mean_length + 1, cap), cap, beta, lam)
    return dera - 1, exact - 1


if __name__ == "__main__":
    print("| beta | aligned mean | lambda 0.25 | 0.5 | 2 | 4 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for beta in (8, 15, 30):
        cells = []
        for lam in (0.25, 0.5, 2, 4):
            dera, exact = length_toy(0.05, 64, beta, lam)
            cells.append(f"{dera:.1f} vs {exact:.1f} ({100 * abs(dera - exact) / exact:.1f}%)")
        print(f"| {beta} | {length_toy(0.05, 64, beta, 1.0)[1]:.1f} | " + " | ".join(cells) + " |")
