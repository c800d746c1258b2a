"""The reproduction report: `report.json`, `report.md` and PNG plots.

`write_report(output_dir, results)` takes the dictionary the pipeline
assembled (see `dera_t5x.reproduce`) and writes everything a reader needs to
judge DeRa against retraining: the comparison table with gaps, the lambda
choice on validation data and its test result, and three plots.
"""

from __future__ import annotations

import json
import pathlib
import textwrap
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from dera_t5x import evaluation  # noqa: E402


def eval_rows(results: dict[str, Any], key: str) -> list[evaluation.EvalRow]:
    """results[key] ('dera', 'retrained') as typed rows, by lambda."""
    return sorted((evaluation.EvalRow.from_json(row) for row in results[key]),
                  key=lambda row: row.lam)


def comparison_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """DeRa at lambda next to the model retrained at beta / lambda, with gaps."""
    retrained = {row.lam: row for row in eval_rows(results, "retrained")}
    rows = []
    for dera in eval_rows(results, "dera"):
        other = retrained.get(dera.lam)
        if other is None:
            continue
        rows.append({
            "lambda": dera.lam,
            "beta": other.beta,
            "dera_length": dera.mean_length, "retrained_length": other.mean_length,
            "length_gap": evaluation.relative_gap(dera.mean_length, other.mean_length),
            "dera_reward": dera.mean_reward, "retrained_reward": other.mean_reward,
            "dera_kl": dera.kl, "retrained_kl": other.kl,
        })
    return rows


def _fmt(value: float | None, digits: int = 2) -> str:
    """A number for the tables; None is an infinite beta (the SFT model)."""
    return "inf (SFT)" if value is None or value == float("inf") else f"{value:.{digits}f}"


def _markdown(results: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    tolerance = results["gap_tolerance"]
    lines = [
        f"# DeRa vs retrained models: {results['pipeline']}", "",
        f"Base beta {results['beta']}, reward `{results['reward']}`, seed {results['seed']}, "
        f"evaluated on the {results['eval_split']} split ({results['num_eval']} samples per "
        "model).", "",
        "| lambda | beta/lambda | DeRa length | retrained length | gap | DeRa reward | "
        "retrained reward | DeRa KL | retrained KL |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        flag = "" if row["length_gap"] <= tolerance else " (over)"
        lines.append(
            f"| {row['lambda']:g} | {_fmt(row['beta'], 4)} | {_fmt(row['dera_length'])} | "
            f"{_fmt(row['retrained_length'])} | {100 * row['length_gap']:.1f}%{flag} | "
            f"{_fmt(row['dera_reward'])} | {_fmt(row['retrained_reward'])} | "
            f"{_fmt(row['dera_kl'])} | {_fmt(row['retrained_kl'])} |")
    over = [row["lambda"] for row in rows if row["length_gap"] > tolerance]
    lines += ["", (f"Length gaps above {100 * tolerance:.0f}% at lambda {over}."
                   if over else f"Every length gap is within {100 * tolerance:.0f}%."), ""]
    selection = results["selection"]
    lines += [
        "## Choosing lambda on validation data", "", selection["objective"], "",
        "| lambda | mean reward | ROUGE-L | eligible |", "| --- | --- | --- | --- |",
    ]
    for row in selection["validation"]:
        lines.append(f"| {row['lambda']:g} | {_fmt(row['mean_reward'])} | "
                     f"{_fmt(row['rougeL'])} | {'yes' if row['eligible'] else 'no'} |")
    test = selection["test"]
    chosen = results["chosen_lambda"]
    lines += ["", f"Chosen lambda: **{chosen:g}** (beta/lambda = "
              f"{_fmt(results['beta'] / chosen if chosen else None, 4)}).", "",
              "| test split | mean length | mean reward | KL to SFT | ROUGE-L |",
              "| --- | --- | --- | --- | --- |"]
    for name in ("chosen", "base", "sft"):
        row = test[name]
        lines.append(f"| {name} (lambda {row['lambda']:g}) | {_fmt(row['mean_length'])} | "
                     f"{_fmt(row['mean_reward'])} | {_fmt(row['kl'])} | {_fmt(row['rougeL'])} |")
    lines += _aligner_lines(results)
    lines += ["", "Plots: `length_vs_lambda.png`, `reward_vs_kl.png`, `examples.png`.", ""]
    return "\n".join(lines)


def _aligner_lines(results: dict[str, Any]) -> list[str]:
    """The aligned models' own held-out metrics (DPO: implicit-reward accuracy),
    DeRa's monotonicity in lambda, and the RL model aiming at the same optimum."""
    lines = []
    evals = {name: metrics for name, metrics in results.get("aligner_eval", {}).items()
             if metrics}
    if evals:
        names = sorted({key for metrics in evals.values() for key in metrics})
        lines += ["", "## The aligned models' held-out metrics", "",
                  "| model | " + " | ".join(names) + " |",
                  "| --- |" + " --- |" * len(names)]
        for model, metrics in evals.items():
            lines.append(f"| {model} | " + " | ".join(_fmt(metrics.get(k), 3) for k in names)
                         + " |")
    lengths = [row.mean_length for row in eval_rows(results, "dera")]
    monotone = all(a <= b for a, b in zip(lengths, lengths[1:]))
    lines += ["", f"DeRa's mean length is {'' if monotone else 'not '}monotone in lambda."]
    same = results.get("rl_same_optimum")
    if same:
        base = next(row for row in eval_rows(results, "retrained") if row.lam == 1.0)
        lines += ["", f"RL at beta {same['beta']:g} (the same optimum as the base model): mean "
                  f"length {same['mean_length']:.2f} (sem {same['mean_length_sem']:.2f}), KL "
                  f"{same['kl']:.2f}, against {base.mean_length:.2f} (sem "
                  f"{base.mean_length_sem:.2f}) and KL {base.kl:.2f} for the base "
                  f"{results.get('aligner', 'aligned')} model."]
    return lines


def _plot_length(results: dict[str, Any], path: pathlib.Path) -> None:
    dera, retrained = eval_rows(results, "dera"), eval_rows(results, "retrained")
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.errorbar([r.lam for r in dera], [r.mean_length for r in dera],
                yerr=[r.mean_length_sem for r in dera], marker="o", label="DeRa at lambda")
    ax.errorbar([r.lam for r in retrained], [r.mean_length for r in retrained],
                yerr=[r.mean_length_sem for r in retrained], marker="s", linestyle="--",
                label="retrained at beta/lambda")
    lambdas = [r.lam for r in dera]
    ax.set_xscale("symlog", linthresh=min([lam for lam in lambdas if lam > 0], default=1.0))
    ax.set_xticks(lambdas, [f"{lam:g}" for lam in lambdas])
    ax.minorticks_off()
    ax.set_xlabel("lambda")
    ax.set_ylabel("mean summary length (tokens)")
    ax.set_title(f"{results['pipeline']}: base beta {results['beta']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_reward_kl(results: dict[str, Any], path: pathlib.Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for key, marker, label in (("dera", "o", "DeRa"), ("retrained", "s", "retrained")):
        rows = eval_rows(results, key)
        ax.plot([r.kl for r in rows], [r.mean_reward for r in rows], marker=marker, label=label)
        for r in rows:
            ax.annotate(f"{r.lam:g}", (r.kl, r.mean_reward), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("KL to the SFT model (nats per summary)")
    ax.set_ylabel("mean reward")
    ax.set_title("reward vs KL (labels: lambda)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_examples(results: dict[str, Any], path: pathlib.Path) -> None:
    examples = results["examples"]
    lines = []
    for i, example in enumerate(examples):
        lines.append(f"Example {i + 1}: " + textwrap.shorten(example["input"], 150))
        for lam, text in example["summaries"]:
            wrapped = textwrap.wrap(f"lambda {lam:g}: {text}", 110) or [f"lambda {lam:g}:"]
            lines.extend("    " + w for w in wrapped)
        lines.append("")
    fig = plt.figure(figsize=(10, 0.2 * len(lines) + 0.5))
    fig.text(0.01, 0.99, "\n".join(lines), family="monospace", fontsize=7, va="top")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(output_dir: str | pathlib.Path, results: dict[str, Any]) -> dict[str, Any]:
    """Writes report.json, report.md and the plots; returns the JSON content."""
    output_dir = pathlib.Path(output_dir)
    rows = comparison_rows(results)
    content = dict(results, comparison=rows)
    (output_dir / "report.json").write_text(json.dumps(content, indent=2))
    (output_dir / "report.md").write_text(_markdown(results, rows))
    _plot_length(results, output_dir / "length_vs_lambda.png")
    _plot_reward_kl(results, output_dir / "reward_vs_kl.png")
    _plot_examples(results, output_dir / "examples.png")
    return content


def compare(old: dict[str, Any], new: dict[str, Any], fields: tuple[str, ...] = (
        "mean_length", "mean_reward", "kl")) -> list[dict[str, Any]]:
    """Two reports of one pipeline, row by row: each field's difference in units of
    sqrt(sem_old^2 + sem_new^2) (|z| <= 3: the change is within sampling noise).

    Returns:
      one dict per (kind, lambda, field) with `old`, `new` and `z`.
    """
    rows = []
    for kind in ("dera", "retrained"):
        before = {row.lam: row for row in eval_rows(old, kind)}
        for row in eval_rows(new, kind):
            if row.lam not in before:
                continue
            for field in fields:
                a, b = getattr(before[row.lam], field), getattr(row, field)
                se = (getattr(before[row.lam], field + "_sem") ** 2
                      + getattr(row, field + "_sem") ** 2) ** 0.5
                rows.append({"kind": kind, "lambda": row.lam, "field": field, "old": a,
                             "new": b, "z": (b - a) / se if se else 0.0})
    return rows


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 4 or sys.argv[1] != "--compare":
        sys.exit("usage: python -m dera_t5x.report --compare OLD/report.json NEW/report.json")
    for r in compare(json.loads(pathlib.Path(sys.argv[2]).read_text()),
                     json.loads(pathlib.Path(sys.argv[3]).read_text())):
        print(f"{r['kind']:9s} lambda {r['lambda']:<5g} {r['field']:11s} {r['old']:8.2f} -> "
              f"{r['new']:8.2f}  z {r['z']:+.2f}{'' if abs(r['z']) <= 3 else '  (beyond 3)'}")
