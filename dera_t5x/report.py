"""The reproduction report: `report.json`, `report.md` and PNG plots.

`write_report(output_dir, results)` takes the dictionary the pipeline
assembled (see `dera_t5x.reproduce`) and writes everything a reader needs to
judge DeRa against retraining: the comparison table with gaps, the lambda
choice on validation data and its test result, and plots (a gold / proxy
pipeline adds its gold and proxy rewards and their plot against sqrt(KL)).
`write_seed_report` does the same for a run over seeds (`dera_t5x.seeds`).
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
    # A criterion other than the aligned-with reward (e.g. gold) gets its own column.
    extra = [key for key in selection["validation"][0]
             if key not in ("lambda", "mean_reward", "rougeL", "eligible")]
    lines += [
        "## Choosing lambda on validation data", "", selection["objective"], "",
        "| lambda | mean reward | " + "".join(f"mean {key} | " for key in extra)
        + "ROUGE-L | eligible |", "| --- " * (4 + len(extra)) + "|",
    ]
    for row in selection["validation"]:
        lines.append(f"| {row['lambda']:g} | {_fmt(row['mean_reward'])} | "
                     + "".join(f"{_fmt(row[key], 4)} | " for key in extra)
                     + f"{_fmt(row['rougeL'])} | {'yes' if row['eligible'] else 'no'} |")
    test = selection["test"]
    chosen = results["chosen_lambda"]
    lines += ["", f"Chosen lambda: **{chosen:g}** (beta/lambda = "
              f"{_fmt(results['beta'] / chosen if chosen else None, 4)}).", "",
              "| test split | mean length | mean reward | "
              + "".join(f"mean {key} | " for key in extra) + "KL to SFT | ROUGE-L |",
              "| --- " * (5 + len(extra)) + "|"]
    for name in ("chosen", "base", "sft"):
        row = test[name]
        lines.append(f"| {name} (lambda {row['lambda']:g}) | {_fmt(row['mean_length'])} | "
                     f"{_fmt(row['mean_reward'])} | "
                     + "".join(f"{_fmt(mean, 4)} ({_fmt(sem, 4)}) | "
                               for mean, sem in (row["rewards"][key] for key in extra))
                     + f"{_fmt(row['kl'])} | {_fmt(row['rougeL'])} |")
    lines += _aligner_lines(results)
    lines += _distilled_lines(results)
    lines += _gold_lines(results)
    plots = ["length_vs_lambda.png", "reward_vs_kl.png", "examples.png"]
    if "gold_comparison_rows" in results:
        plots.insert(2, "gold_proxy_vs_sqrt_kl.png")
    lines += ["", "Plots: " + ", ".join(f"`{name}`" for name in plots) + ".", ""]
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


def _distilled_lines(results: dict[str, Any]) -> list[str]:
    """The model DeRa at one lambda was distilled into (TrRa), beside DeRa."""
    d = results.get("distilled")
    if not d:
        return []
    lam, decode = d["lambda"], d["decode"]
    lines = ["", f"## One model at lambda {lam:g} (distilled, TrRa)", "",
             f"DeRa's mixture at lambda {lam:g} distilled into one model (responses: "
             f"`{d['data_source']}`), evaluated like the others on the "
             f"{results['eval_split']} split.", "",
             "| model | mean length | mean reward | KL to SFT | ROUGE-L |",
             "| --- | --- | --- | --- | --- |"]
    for name, row in ((f"DeRa at lambda {lam:g} (two models)", d["dera"]),
                      ("distilled (one model)", d)):
        lines.append(f"| {name} | {_fmt(row['mean_length'])} (sem "
                     f"{_fmt(row['mean_length_sem'])}) | {_fmt(row['mean_reward'])} | "
                     f"{_fmt(row['kl'])} | {_fmt(row['rougeL'])} |")
    lines += ["", f"Length gap {100 * d['length_gap']:.1f}%; mean per-token KL(DeRa mixture "
              f"|| distilled) on DeRa samples: {d['mixture_kl_per_token']:.4f} nats. One decode "
              f"call at batch {decode['batch_size']}: distilled {decode['student_s']:.3f} s, "
              f"DeRa {decode['dera_s']:.3f} s ({decode['student_over_dera']:.2f}x)."]
    return lines


def _gold_lines(results: dict[str, Any]) -> list[str]:
    """A gold / proxy pipeline: agreements, gold and proxy reward per lambda
    for DeRa and the retrained models, the oracle, where gold and proxy part."""
    if "gold_comparison_rows" not in results:
        return []
    human = results.get("gold_human_agreement", {})
    lines = ["", "## Gold and proxy rewards", "",
             "The gold reward agrees with the human labels on "
             + ", ".join(f"{_fmt(v, 3)} of the {k} pairs" for k, v in human.items())
             + f"; the proxy reward model agrees with gold on "
             f"{_fmt(results['proxy_gold_agreement'], 3)} of held-out pairs of SFT samples "
             f"and with the human labels on {_fmt(results.get('proxy_human_accuracy'), 3)} of "
             "the human test pairs.", "",
             "| lambda | DeRa gold | retrained gold | gap | tolerance | within | DeRa proxy | "
             "retrained proxy | DeRa KL | retrained KL |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    dera = {row["lambda"]: row for row in results["dera"]}
    retrained = {row["lambda"]: row for row in results["retrained"]}
    for row in results["gold_comparison_rows"]:
        lam = row["lambda"]
        d, r = dera[lam], retrained[lam]
        lines.append(
            f"| {lam:g} | {d['gold_reward']:.4f} ({d['rewards']['gold'][1]:.4f}) | "
            f"{r['gold_reward']:.4f} ({r['rewards']['gold'][1]:.4f}) | {row['gap']:.4f} | "
            f"{row['tolerance']:.4f}{' (2 se)' if row['near_zero_gain'] else ''} | "
            f"{'yes' if row['within'] else 'no'} | {d['proxy_reward']:.3f} | "
            f"{r['proxy_reward']:.3f} | {_fmt(d['kl'])} | {_fmt(r['kl'])} |")
    lines += ["", "Gold reward: mean (standard error). Tolerance: 15% of the retrained "
              "model's gold gain over SFT, or 2 standard errors of the difference where "
              "that gain is within 2 standard errors of zero."]
    oracle = results.get("oracle")
    if oracle:
        sft = retrained[0.0]
        lines += ["", f"Oracle RL on the gold reward itself at beta {oracle['beta']:g}: gold "
                  f"{oracle['gold_reward']:.4f} ({oracle['rewards']['gold'][1]:.4f}) against "
                  f"SFT's {sft['gold_reward']:.4f} ({sft['rewards']['gold'][1]:.4f}), KL "
                  f"{oracle['kl']:.2f}, mean length {oracle['mean_length']:.1f}."]
    lines.append("")
    for key, lam in results["gold_proxy_part_at"].items():
        lines.append(f"- {key}: " + (f"past lambda {lam:g} gold falls while the proxy still rises."
                                   if lam is not None else
                                   "gold and proxy never part (no lambda where gold falls "
                                   "while the proxy rises)."))
    return lines


def _plot_gold_proxy(results: dict[str, Any], path: pathlib.Path) -> None:
    """Gold and proxy reward against sqrt(KL to SFT): the over-optimization picture."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, name, label in zip(axes, ("gold", "reward_model"), ("gold reward", "proxy reward")):
        for key, marker in (("dera", "o"), ("retrained", "s")):
            rows = sorted(results[key], key=lambda row: row["lambda"])
            x = [max(row["kl"], 0.0) ** 0.5 for row in rows]
            y = [row["rewards"][name][0] for row in rows]
            ax.errorbar(x, y, yerr=[row["rewards"][name][1] for row in rows], marker=marker,
                        capsize=2, label="DeRa" if key == "dera" else "retrained")
            for xi, yi, row in zip(x, y, rows):
                ax.annotate(f"{row['lambda']:g}", (xi, yi), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
        oracle = results.get("oracle")
        if oracle:
            ax.errorbar([max(oracle["kl"], 0.0) ** 0.5], [oracle["rewards"][name][0]],
                        yerr=[oracle["rewards"][name][1]], marker="*", markersize=10,
                        linestyle="none", label="oracle RL on gold")
        ax.set_xlabel("sqrt(KL to the SFT model)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle("gold and proxy reward vs sqrt(KL) (labels: lambda; bars: 1 sem)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _lambda_axis(ax: Any, lambdas: list[float]) -> None:
    """A symlog lambda axis with a tick at every lambda of the grid."""
    ax.set_xscale("symlog", linthresh=min([lam for lam in lambdas if lam > 0], default=1.0))
    ax.set_xticks(lambdas, [f"{lam:g}" for lam in lambdas])
    ax.minorticks_off()
    ax.set_xlabel("lambda")


def _plot_length(results: dict[str, Any], path: pathlib.Path) -> None:
    dera, retrained = eval_rows(results, "dera"), eval_rows(results, "retrained")
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.errorbar([r.lam for r in dera], [r.mean_length for r in dera],
                yerr=[r.mean_length_sem for r in dera], marker="o", label="DeRa at lambda")
    ax.errorbar([r.lam for r in retrained], [r.mean_length for r in retrained],
                yerr=[r.mean_length_sem for r in retrained], marker="s", linestyle="--",
                label="retrained at beta/lambda")
    _lambda_axis(ax, [r.lam for r in dera])
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
    if "gold_comparison_rows" in results:
        _plot_gold_proxy(results, output_dir / "gold_proxy_vs_sqrt_kl.png")
    return content


def _seed_markdown(results: dict[str, Any]) -> str:
    """The multi-seed report (`dera_t5x.seeds`): length gaps against their
    tolerances, objectives with standard errors, the toy's predicted gap, the
    RL runs' convergence."""
    seeds, beta = results["seeds"], results["beta"]
    rows = {row["lambda"]: row for row in results["retrained"]}
    lines = [
        f"# DeRa vs retrained models over {len(seeds)} seeds: {results['pipeline']}", "",
        f"Base beta {beta}, reward `{results['reward']}`, seeds {seeds} sharing one SFT model; "
        f"each model evaluated on the {results['eval_split']} split ({results['num_eval']} "
        "samples per model and seed). Means over seeds; sd is the standard deviation across "
        "seeds, se the standard error of the seed mean.", "",
        "## Mean length", "",
        "| lambda | beta/lambda | DeRa (sd) | retrained (sd) | gap | tolerance | within |",
        "| --- | --- | --- | --- | --- | --- | --- |"]
    for c in results["comparison"]:
        d = next(row for row in results["dera"] if row["lambda"] == c["lambda"])
        r = rows[c["lambda"]]
        lines.append(
            f"| {c['lambda']:g} | {_fmt(r['beta_over_lambda'], 3)} | {d['mean_length']:.2f} "
            f"({d['mean_length_sd']:.2f}) | {r['mean_length']:.2f} ({r['mean_length_sd']:.2f}) | "
            f"{c['gap']:+.2f} ({100 * c['relative_gap']:+.1f}%) | {c['tolerance']:.2f} "
            f"({c['tolerance_rule']}) | {'yes' if c['within_tolerance'] else '**no**'} |")
    lines += ["", "## Objective E[r] - (beta / lambda) KL(pi || pi_sft)", "",
              "At lambda 0 both rows are the SFT model (KL exactly 0): the objective is E[r]. "
              "A retrained model at its optimum scores at least DeRa's objective.", "",
              "| lambda | DeRa (se) | retrained (se) | retrained - DeRa (se) | "
              "retrained below DeRa by > 2 se |", "| --- | --- | --- | --- | --- |"]
    for c in results["comparison"]:
        d = next(row for row in results["dera"] if row["lambda"] == c["lambda"])
        r = rows[c["lambda"]]
        lines.append(
            f"| {c['lambda']:g} | {d['objective']:.2f} ({d['objective_se']:.2f}) | "
            f"{r['objective']:.2f} ({r['objective_se']:.2f}) | "
            f"{c['objective_difference']:+.2f} ({c['objective_difference_se']:.2f}) | "
            f"{'**yes**' if c['retrained_below_dera'] else 'no'} |")
    exact = [c for c in results["comparison"] if "exact_length" in c]
    if exact:
        lines += ["", "## The exact optimum at beta / lambda", "",
                  "The reward is the length, so the optimum's length distribution is "
                  "P_sft(n) exp(n lambda / beta) / Z, estimated from "
                  f"{results['num_sft_length_samples']} samples of the SFT model "
                  "(`evaluation.tilted_optimum`; ESS: its effective sample size). A converged "
                  "retrained model sits at it.", "",
                  "| lambda | exact length | DeRa | retrained | exact objective (ESS) | DeRa "
                  "| retrained |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for c in exact:
            lines.append(
                f"| {c['lambda']:g} | {c['exact_length']:.2f} | {c['dera_length']:.2f} | "
                f"{c['retrained_length']:.2f} | {c['exact_objective']:.2f} "
                f"({c['exact_ess']:.0f}) | {c['dera_objective']:.2f} | "
                f"{c['retrained_objective']:.2f} |")
    lines += ["", "## The gap the method itself predicts (length toy)", "",
              f"The toy's SFT policy stops with a constant probability per token, fitted to the "
              f"SFT model's mean length ({results['dera'][0]['mean_length']:.2f}), capped at "
              f"{results['max_decode_len']} tokens; its optimum at beta is "
              "P*(n) ∝ P_sft(n) exp(n / beta), and DeRa mixes the per-token stop "
              f"probabilities (`evaluation.predicted_lengths`, beta {beta}).", "",
              "| lambda | measured gap (DeRa - retrained) | toy: DeRa vs exact | toy gap | "
              "same direction |", "| --- | --- | --- | --- | --- |"]
    for c in results["comparison"]:
        if "predicted_relative_gap" not in c:
            continue
        agree = c["measured_direction"] == c["predicted_direction"]
        lines.append(
            f"| {c['lambda']:g} | {100 * c['relative_gap']:+.1f}% ({c['measured_direction']}) | "
            f"{c['predicted_dera_length']:.1f} vs {c['predicted_exact_length']:.1f} | "
            f"{100 * c['predicted_relative_gap']:+.1f}% ({c['predicted_direction']}) | "
            f"{'yes' if agree else 'no'} |")
    lines += ["", "## Convergence of the RL runs", "",
              "The training objective (r - beta KL of each step's batch), its mean over the "
              "last quarter of a run's steps against the quarter before (`train/objective_mean` "
              "of the log lines); a plateau is a change of at most 2 se.", "",
              "| lambda | beta | steps | final objective per seed | change per seed (se) | "
              "all plateaued |", "| --- | --- | --- | --- | --- | --- |"]
    for row in results["convergence"]:
        runs = [run for run in row["runs"] if run["plateau"] is not None]
        lines.append(
            f"| {row['lambda']:g} | {row['beta']:.3g} | "
            f"{', '.join(str(run['steps']) for run in row['runs'])} | "
            f"{', '.join(_fmt(run['final_objective']) for run in runs) or 'too few logged'} | "
            + (", ".join(f"{run['change']:+.2f} ({run['change_se']:.2f})" for run in runs)
               or "-")
            + f" | {'yes' if row['all_plateaued'] else 'no'} |")
    targets = results["targets"]
    lines += ["", "## Targets", "",
              f"- Every length gap within its tolerance: "
              f"{'yes' if targets['length_gaps_within_tolerance'] else 'no'}.",
              f"- No retrained model's objective below DeRa's by more than 2 se: "
              f"{'yes' if targets['no_retrained_objective_below_dera'] else 'no'}.", "",
              f"Chosen lambda (the pipeline's rule on the seed means): "
              f"**{results['chosen_lambda']:g}**; per seed: "
              f"{', '.join(f'{lam:g}' for lam in results['chosen_lambda_per_seed'])}.", "",
              f"Wall time of this run: {results['wall_time_this_run_s'] / 60:.1f} min. Seconds "
              "per stage, summed over seeds, in this run: " + ", ".join(
                  f"{name} {seconds:.0f}" for name, seconds in
                  results["timings_this_run_s"].items()) + "; over every run of this folder: "
              + ", ".join(f"{name} {seconds:.0f}" for name, seconds in
                          results["timings_s"].items()) + ".", "",
              "Plots: `length_vs_lambda.png` (sd across seeds), `objective_vs_lambda.png` "
              "(2 se); each seed's own report is in `seed_<s>/`.", ""]
    return "\n".join(lines)


def _plot_seeds(results: dict[str, Any], output_dir: pathlib.Path) -> None:
    """Mean length with sd error bars, and retrained - DeRa objective with 2 se."""
    lambdas = [row["lambda"] for row in results["dera"]]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for key, marker, style, label in (("dera", "o", "-", "DeRa at lambda"),
                                      ("retrained", "s", "--", "retrained at beta/lambda")):
        rows = results[key]
        ax.errorbar(lambdas, [r["mean_length"] for r in rows],
                    yerr=[r["mean_length_sd"] for r in rows], marker=marker, linestyle=style,
                    capsize=3, label=label)
    exact = [r for r in results["comparison"] if "exact_length" in r]
    if exact:
        ax.plot([r["lambda"] for r in exact], [r["exact_length"] for r in exact], marker="x",
                linestyle=":", color="gray", label="exact optimum at beta/lambda")
    _lambda_axis(ax, lambdas)
    ax.set_ylabel("mean summary length (tokens; bars: sd across seeds)")
    ax.set_title(f"{results['pipeline']}: beta {results['beta']}, {len(results['seeds'])} seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(output_dir / "length_vs_lambda.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    rows = results["comparison"]
    ax.errorbar(lambdas, [r["objective_difference"] for r in rows],
                yerr=[2 * r["objective_difference_se"] for r in rows], marker="o", capsize=3)
    ax.axhline(0.0, color="gray", linewidth=0.8)
    _lambda_axis(ax, lambdas)
    ax.set_ylabel("objective: retrained - DeRa (bars: 2 se)")
    ax.set_title("E[r] - (beta/lambda) KL: >= 0 at the optimum")
    fig.tight_layout()
    fig.savefig(output_dir / "objective_vs_lambda.png", dpi=120)
    plt.close(fig)


def write_seed_report(output_dir: str | pathlib.Path, results: dict[str, Any]
                      ) -> dict[str, Any]:
    """Writes the multi-seed report.json, report.md and plots; returns the JSON content."""
    output_dir = pathlib.Path(output_dir)
    (output_dir / "report.json").write_text(json.dumps(results, indent=2))
    (output_dir / "report.md").write_text(_seed_markdown(results))
    _plot_seeds(results, output_dir)
    return results


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
