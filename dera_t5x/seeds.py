"""The length-reward pipeline over seeds: DeRa against retrained models with error bars.

    python -m dera_t5x.seeds --gin_file=gin/reproduce/length_reward_seeds.gin \\
        --output_dir=runs/length_reward_seeds

One SFT model, trained once with `sft_seed` into `<out>/sft/`, is shared by
every seed. Each seed s runs `reproduce.run` with `seed=s` into
`<out>/seed_<s>/` (the base model at beta, DeRa on it, every model retrained
at beta / lambda, each stage cached and resumed as in a single-seed run), so
the spread across seeds is that of RL (and of evaluation sampling), not of SFT.

The aggregate `report.json` holds `seeds`, one row per lambda in `dera` and
`retrained` (`mean_length` and `mean_length_sd` across seeds, `objective`
and `objective_se`, ...), the per-lambda `comparison` with its tolerances,
the toy's predicted gap, the exact optimum at beta / lambda and the RL runs'
convergence (`convergence`).

The exact optimum is known here: the reward is the length, so
pi*(y) ∝ pi_sft(y) exp(n(y) / beta) has the length distribution
P_sft(n) exp(n / beta) / Z, estimated from `optimum_samples` samples per
evaluation input of the shared SFT model (`sft_lengths_<split>.json`,
`evaluation.tilted_optimum`): its mean length and objective are what a
converged retrained model reaches.

The objective at lambda is E[r] - (beta / lambda) * KL(pi || pi_sft), which
the model retrained at beta / lambda maximizes: a converged retrained model
scores at least as high as DeRa at lambda. At lambda 0 both rows are the SFT
model, whose KL to itself is exactly 0; its objective is E[r].
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Any, Sequence

from absl import flags
import gin
import numpy as np

from dera_t5x import evaluation
from dera_t5x import gin_utils
from dera_t5x import models
from dera_t5x import realign
from dera_t5x import report
from dera_t5x import reproduce
from dera_t5x.data import pipeline
from dera_t5x.models.t5 import network
from dera_t5x.training import sft

LENGTH_TOLERANCE = 0.05  # of the retrained mean length
SD_TOLERANCE = 2.0  # standard deviations across the retrained seeds
OBJECTIVE_SE = 2.0  # standard errors of the objective difference
TOY_RESOLUTION = 0.05  # words: a smaller predicted gap counts as none


def objective(row: dict[str, Any], beta: float, lam: float) -> float:
    """E[r] - (beta / lam) * KL of an evaluation row; E[r] at lam 0 (the SFT model)."""
    return row["mean_reward"] if lam == 0 else row["mean_reward"] - beta / lam * row["kl"]


def seed_statistics(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, sd across seeds (ddof 1), standard error of the mean) of per-seed values."""
    values = np.asarray(values, np.float64)
    sd = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return float(values.mean()), sd, sd / math.sqrt(len(values))


def _seed_rows(reports: Sequence[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """One row per lambda of reports[*][kind], its statistics across seeds."""
    beta, rows = reports[0]["beta"], []
    for k, lam in enumerate(reports[0]["lambdas"]):
        per_seed = [report_[kind][k] for report_ in reports]
        row = {"lambda": lam, "beta_over_lambda": beta / lam if lam else None}
        for name in ("mean_length", "mean_reward", "kl"):
            row[name], row[name + "_sd"], _ = seed_statistics([r[name] for r in per_seed])
        objectives = [objective(r, beta, lam) for r in per_seed]
        row["objective"], row["objective_sd"], row["objective_se"] = seed_statistics(objectives)
        row["per_seed"] = {"mean_length": [r["mean_length"] for r in per_seed],
                           "kl": [r["kl"] for r in per_seed], "objective": objectives}
        rows.append(row)
    return rows


def _direction(gap: float, resolution: float = 0.0) -> str:
    """The sign of a length gap (DeRa - other) in words; within `resolution`: equal."""
    return ("DeRa longer" if gap > resolution else "DeRa shorter" if gap < -resolution
            else "equal")


def compare(dera: Sequence[dict[str, Any]], retrained: Sequence[dict[str, Any]], beta: float,
            max_decode_len: int, sft_lengths: np.ndarray | None = None
            ) -> list[dict[str, Any]]:
    """Per lambda: the length gap against its tolerance (the larger of 5% of the
    retrained length and 2 sd across the retrained seeds), the objective
    difference in standard errors, the gap the length toy predicts at this
    beta (its stop probability fitted to the SFT model's mean length), and,
    given samples of the SFT model's lengths, the exact optimum at
    beta / lambda (`exact_length`, `exact_objective`, `exact_ess`)."""
    sft_length = dera[0]["mean_length"] if dera[0]["lambda"] == 0 else None
    rows = []
    for d, r in zip(dera, retrained):
        lam = d["lambda"]
        gap = d["mean_length"] - r["mean_length"]
        relative, spread = LENGTH_TOLERANCE * r["mean_length"], SD_TOLERANCE * r["mean_length_sd"]
        difference = r["objective"] - d["objective"]
        difference_se = math.hypot(r["objective_se"], d["objective_se"])
        row = {
            "lambda": lam, "dera_length": d["mean_length"],
            "retrained_length": r["mean_length"], "gap": gap,
            "relative_gap": gap / r["mean_length"] if r["mean_length"] else 0.0,
            "tolerance": max(relative, spread),
            "tolerance_rule": ("5% of the retrained length" if relative >= spread
                               else "2 sd across the retrained seeds"),
            "within_tolerance": abs(gap) <= max(relative, spread),
            "dera_objective": d["objective"], "retrained_objective": r["objective"],
            "objective_difference": difference, "objective_difference_se": difference_se,
            "retrained_below_dera": difference < -OBJECTIVE_SE * difference_se,
            "measured_direction": _direction(gap),
        }
        if sft_length is not None and lam > 0:
            toy_dera, toy_exact = evaluation.predicted_lengths(sft_length, max_decode_len, beta,
                                                               lam)
            row.update(predicted_dera_length=toy_dera, predicted_exact_length=toy_exact,
                       predicted_relative_gap=(toy_dera - toy_exact) / toy_exact,
                       predicted_direction=_direction(toy_dera - toy_exact, TOY_RESOLUTION))
        if sft_lengths is not None and lam > 0:
            exact = evaluation.tilted_optimum(sft_lengths, beta / lam)
            row.update(exact_length=exact["mean_length"], exact_objective=exact["objective"],
                       exact_ess=exact["ess"])
        rows.append(row)
    return rows


def objective_plateau(model_dir: str | pathlib.Path, window: float = 0.25) -> dict[str, Any]:
    """Whether an RL run's objective (r - beta * KL of each step's batch) stopped
    rising: its mean over the last `window` of the run against the `window`
    before, in standard errors of the per-step values.

    Reads the log lines' `train/objective_mean`, `_sd` and `_steps` (each the
    statistics of the last LOG_EVERY steps, `rl.train_rl`): a window is a
    `window` fraction of the lines, at least 2.
    """
    path = pathlib.Path(model_dir) / "metrics.jsonl"
    lines = [line for line in map(json.loads, path.read_text().splitlines())
             if "train/objective_mean" in line]
    n = max(2, int(len(lines) * window))
    if len(lines) < 2 * n:
        return {"steps": lines[-1]["step"] if lines else 0, "logged": len(lines),
                "plateau": None}

    def mean_and_se(chunk):
        counts = np.array([line["train/objective_steps"] for line in chunk])
        means = np.array([line["train/objective_mean"] for line in chunk])
        sds = np.array([line["train/objective_sd"] for line in chunk])
        mean = float(np.sum(counts * means) / np.sum(counts))
        var = (np.sum((counts - 1) * sds ** 2 + counts * (means - mean) ** 2)
               / max(np.sum(counts) - 1, 1))
        return mean, math.sqrt(var / np.sum(counts))

    last, last_se = mean_and_se(lines[-n:])
    before, before_se = mean_and_se(lines[-2 * n:-n])
    se = math.hypot(last_se, before_se)
    return {"steps": lines[-1]["step"], "logged": len(lines), "final_objective": last,
            "change": last - before, "change_se": se, "plateau": last - before <= 2.0 * se}


def _convergence(out: pathlib.Path, seeds: Sequence[int], reports: Sequence[dict[str, Any]]
                 ) -> list[dict[str, Any]]:
    """`objective_plateau` of every aligned model, per lambda > 0, over seeds.
    The aligned models' folders are the keys of each report's `aligner_eval`
    (one per lambda > 0, in order)."""
    lambdas = [lam for lam in reports[0]["lambdas"] if lam > 0]
    rows = []
    for k, lam in enumerate(lambdas):
        runs = []
        for seed, report_ in zip(seeds, reports):
            name = list(report_["aligner_eval"])[k]
            path = out / f"seed_{seed}" / name
            if (path / "metrics.jsonl").exists():
                runs.append({"seed": seed, "model": name, **objective_plateau(path)})
        rows.append({"lambda": lam, "beta": reports[0]["beta"] / lam, "runs": runs,
                     "all_plateaued": bool(runs) and all(run["plateau"] is True
                                                         for run in runs)})
    return rows


def _chosen_lambda(reports: Sequence[dict[str, Any]]) -> tuple[float, list[float]]:
    """The pipeline's rule on the seed means: the largest mean reward among the
    lambdas eligible (ROUGE-L within the margin of SFT's) in every seed; and
    each seed's own choice."""
    tables = [report_["selection"]["validation"] for report_ in reports]
    rows = [{"lambda": rows_[0]["lambda"],
             "mean_reward": float(np.mean([row["mean_reward"] for row in rows_])),
             "eligible": all(row["eligible"] for row in rows_)} for rows_ in zip(*tables)]
    eligible = [row for row in rows if row["eligible"]] or rows
    return (max(eligible, key=lambda row: row["mean_reward"])["lambda"],
            [report_["chosen_lambda"] for report_ in reports])


def sample_sft_lengths(out: pathlib.Path, *, model_config: network.T5Config, task_name: str,
                feature_lengths: dict[str, int], split: str, num_samples: int,
                max_decode_len: int, batch_size: int, sft_seed: int) -> np.ndarray:
    """Lengths [inputs * num_samples] of temperature-1 samples of the shared SFT
    model (`<out>/sft`, finished) on `split`, cached in
    `<out>/sft_lengths_<split>.json` (keyed by the SFT stage and these settings)."""
    sft_dir = out / "sft"
    settings = {"stage": "sft_lengths",
                "sft": json.loads((sft_dir / "stage.json").read_text())["stage_key"],
                "split": split, "num_samples": num_samples, "max_decode_len": max_decode_len,
                "batch_size": batch_size}

    def compute() -> list[int]:
        params = sft.train_sft(str(sft_dir), model_config=model_config, task_name=task_name,
                               feature_lengths=feature_lengths, seed=sft_seed)
        model = models.for_config(model_config)
        inputs = np.repeat(pipeline.load_split(task_name, split, feature_lengths).features[
            "encoder_input_tokens"], num_samples, axis=0)
        batches = realign.sweep_batches(model, params, params, inputs, [0.0],
                                        batch_size=batch_size, seed=sft_seed,
                                        max_decode_len=max_decode_len, temperature=1.0)
        return np.concatenate([evaluation.summary_lengths(decoded.tokens[0][rows], model.eos_ids)
                               for _, rows, decoded in batches]).tolist()

    return np.asarray(reproduce._cached_json(out / f"sft_lengths_{split}.json", settings,
                                             compute))


def aggregate(out: pathlib.Path, seeds: Sequence[int], reports: Sequence[dict[str, Any]],
              sft_lengths: np.ndarray | None = None) -> dict[str, Any]:
    """The multi-seed results from the per-seed reports (same beta and lambdas)
    and, if given, the SFT model's sampled lengths (for the exact optimum)."""
    first = reports[0]
    for seed, report_ in zip(seeds, reports):
        if (report_["beta"], report_["lambdas"]) != (first["beta"], first["lambdas"]):
            raise ValueError(f"Seed {seed} ran at beta {report_['beta']}, lambdas "
                             f"{report_['lambdas']}; seed {seeds[0]} at {first['beta']}, "
                             f"{first['lambdas']}. Rerun every seed with one setting.")
    dera, retrained = _seed_rows(reports, "dera"), _seed_rows(reports, "retrained")
    comparison = compare(dera, retrained, first["beta"], first["max_decode_len"], sft_lengths)
    chosen, per_seed_choice = _chosen_lambda(reports)
    timings: dict[str, dict[str, float]] = {"timings_s": {}, "timings_this_run_s": {}}
    for key, totals in timings.items():
        for report_ in reports:
            for name, seconds in report_[key].items():
                totals[name] = totals.get(name, 0.0) + seconds
    return {
        "pipeline": first["pipeline"], "reward": first["reward"], "beta": first["beta"],
        "lambdas": first["lambdas"], "seeds": list(seeds), "eval_split": first["eval_split"],
        "num_eval": first["num_eval"], "max_decode_len": first["max_decode_len"],
        "num_sft_length_samples": 0 if sft_lengths is None else len(sft_lengths),
        "dera": dera, "retrained": retrained, "comparison": comparison,
        "targets": {
            "length_gaps_within_tolerance": all(row["within_tolerance"] for row in comparison),
            "no_retrained_objective_below_dera": not any(row["retrained_below_dera"]
                                                         for row in comparison)},
        "convergence": _convergence(out, seeds, reports),
        "chosen_lambda": chosen, "chosen_lambda_per_seed": per_seed_choice,
        **timings,
    }


@gin.configurable
def run_seeds(output_dir: str, *, seeds: Sequence[int] = (0, 1, 2), sft_seed: int = 0,
              model_config: network.T5Config = gin.REQUIRED, task_name: str = gin.REQUIRED,
              feature_lengths: dict[str, int] = gin.REQUIRED, optimum_samples: int = 8,
              batch_size: int = 50) -> dict[str, Any]:
    """Runs (or resumes) `reproduce.run` for every seed on one shared SFT model and
    writes the aggregate report.json, report.md and plots; returns report.json.

    Args:
      seeds: at least two distinct integers (standard deviations need two).
      sft_seed: the seed of the one SFT model.
      model_config, task_name, feature_lengths: the pipeline's (`reproduce.run`'s).
      optimum_samples: SFT samples per evaluation input for the exact optimum.
      batch_size: the batch of those samples' decoding.
    """
    seeds = list(seeds)
    if (len(seeds) < 2 or len(set(seeds)) != len(seeds)
            or not all(isinstance(s, int) and s >= 0 for s in seeds)):
        raise ValueError(f"seeds.run_seeds.seeds must be at least two distinct integers >= 0, "
                         f"got {seeds!r}.")
    out = pathlib.Path(output_dir).absolute()
    start = time.perf_counter()
    reports = [reproduce.run(str(out / f"seed_{seed}"), seed=seed, sft_seed=sft_seed,
                             sft_dir=str(out / "sft")) for seed in seeds]
    lengths = sample_sft_lengths(out, model_config=model_config, task_name=task_name,
                                 feature_lengths=feature_lengths,
                                 split=reports[0]["eval_split"], num_samples=optimum_samples,
                                 max_decode_len=reports[0]["max_decode_len"],
                                 batch_size=batch_size, sft_seed=sft_seed)
    results = aggregate(out, seeds, reports, lengths)
    results["wall_time_this_run_s"] = time.perf_counter() - start
    return report.write_seed_report(out, results)


def main(argv: Sequence[str]) -> None:
    del argv
    content = run_seeds(flags.FLAGS.output_dir)
    print(pathlib.Path(flags.FLAGS.output_dir) / "report.md")
    for row in content["comparison"]:
        print(f"lambda {row['lambda']:g}: DeRa {row['dera_length']:.1f}, retrained "
              f"{row['retrained_length']:.1f}, gap {row['gap']:+.1f} (tolerance "
              f"{row['tolerance']:.1f}), objective difference {row['objective_difference']:+.2f}"
              f" (se {row['objective_difference_se']:.2f})")


if __name__ == "__main__":
    # Run the importable module, not __main__, so gin binds one `seeds.run_seeds`.
    from dera_t5x import seeds as seeds_module

    flags.DEFINE_string("output_dir", None, "Where the seeds and the report go.", required=True)
    gin_utils.run(seeds_module.main)
