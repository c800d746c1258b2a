"""The reproduction pipeline with micro settings: report structure and trend."""

import json

import gin
import numpy as np
import pytest

from dera_t5x import checkpoints
from dera_t5x import evaluation
from dera_t5x import gin_utils
from dera_t5x import reproduce
from dera_t5x import seeds

# A small model on short summaries (12 target tokens, so SFT learns to stop)
# and a strong length reward, so that a few RL steps make summaries longer.
MICRO = [
    "network.T5Config.emb_dim = 32", "network.T5Config.num_heads = 2",
    "network.T5Config.head_dim = 16", "network.T5Config.mlp_dim = 64",
    "network.T5Config.num_encoder_layers = 1", "network.T5Config.num_decoder_layers = 1",
    "TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': 12}",
    "sft.train_sft.num_steps = 60", "sft.train_sft.eval_every = 0",
    "trainer.make_schedule.learning_rate = 3e-3",
    "rl.train_rl.num_steps = 15", "rl.train_rl.batch_size = 8",
    "rl.make_optimizer.policy_learning_rate = 3e-3",
    "reproduce.run.beta = 1.0", "reproduce.run.lambdas = (0.0, 1.0, 2.0)",
    "reproduce.run.max_decode_len = 24", "rl.RLConfig.max_decode_len = 24",
    "reproduce.run.max_eval_examples = 16", "reproduce.run.eval_batch_size = 32",
    "distill.train_distill.num_steps = 4", "distill.train_distill.batch_size = 8",
]


@pytest.mark.slow
def test_micro_pipeline_writes_a_report_with_the_trend(tmp_path):
    gin.clear_config()
    try:
        gin_utils.parse(["gin/reproduce/length_reward_tiny.gin"], MICRO)
        content = reproduce.run(str(tmp_path))
    finally:
        gin.clear_config()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report == json.loads(json.dumps(content))
    for key in ("beta", "lambdas", "chosen_lambda", "dera", "retrained", "comparison"):
        assert key in report
    assert report["lambdas"] == [0.0, 1.0, 2.0]
    for key in ("dera", "retrained"):
        assert [row["lambda"] for row in report[key]] == report["lambdas"]
        for row in report[key]:
            assert {"lambda", "mean_length", "mean_reward", "kl"} <= set(row)
    dera = [row["mean_length"] for row in report["dera"]]
    retrained = [row["mean_length"] for row in report["retrained"]]
    assert dera[0] < dera[1] < dera[2], dera
    assert retrained[0] < retrained[1] <= retrained[2], retrained
    # Retrained at the smaller beta (lambda 2): larger KL to SFT.
    assert report["retrained"][2]["kl"] > report["retrained"][1]["kl"]
    # lambda 0 and 1 are the SFT and the base model themselves.
    assert report["comparison"][0]["length_gap"] == 0.0
    assert report["comparison"][1]["length_gap"] == 0.0
    assert report["chosen_lambda"] in report["lambdas"]
    for name in ("report.md", "length_vs_lambda.png", "reward_vs_kl.png", "examples.png"):
        assert (tmp_path / name).stat().st_size > 0
    # The distilled comparator (TrRa at the gin's lambda 2), evaluated like the others.
    distilled = report["distilled"]
    assert distilled["lambda"] == 2.0 and distilled["data_source"] == "dera_samples"
    assert (tmp_path / "distill_lambda_2" / "checkpoints" / "4").is_dir()
    assert distilled["dera"]["mean_length"] == report["dera"][2]["mean_length"]
    assert distilled["length_gap"] == pytest.approx(abs(
        distilled["mean_length"] - distilled["dera"]["mean_length"])
        / distilled["dera"]["mean_length"])
    assert 0 < distilled["mixture_kl_per_token"] < 10 and np.isfinite(distilled["kl"])
    decode = distilled["decode"]
    assert decode["batch_size"] == 32 and decode["student_s"] > 0 and decode["dera_s"] > 0
    assert "One model at lambda 2 (distilled, TrRa)" in (tmp_path / "report.md").read_text()
    # Every trained model is exported as a checkpoint the decode job reads.
    exported = {name: checkpoints.restore_params(tmp_path / name / "params")
                for name in ("sft", "rl_beta_1", "rl_beta_0.5", "distill_lambda_2")}
    sft_kernel, rl_kernel = (exported[name]["decoder"]["logits_dense"]["kernel"]
                             for name in ("sft", "rl_beta_1"))
    assert sft_kernel.shape == rl_kernel.shape and not np.array_equal(sft_kernel, rl_kernel)
    # A rerun reuses every stage.
    gin_utils.parse(["gin/reproduce/length_reward_tiny.gin"], MICRO)
    try:
        again = reproduce.run(str(tmp_path))
    finally:
        gin.clear_config()
    assert again["dera"] == content["dera"]
    assert again["distilled"] == content["distilled"] and "distill" not in again[
        "timings_this_run_s"]
    assert sum(again["timings_this_run_s"].values()) < sum(content["timings_s"].values())
    assert again["timings_s"]["sft"] >= content["timings_s"]["sft"]  # accumulated


@pytest.mark.slow
def test_micro_dpo_pipeline_reports_dera_against_retrained_dpo(tmp_path):
    bindings = MICRO + ["dpo.train_dpo.num_steps = 15", "dpo.train_dpo.batch_size = 8",
                        "dpo/trainer.make_schedule.learning_rate = 3e-3",
                        "dpo/trainer.make_schedule.warmup_steps = 0",
                        "aligners.dpo_aligner.tau = 2.0", "aligners.dpo_aligner.max_prompts = 64",
                        "reproduce.run.beta = 0.5", "reproduce.run.rl_beta_same_optimum = 1.0",
                        "reproduce.run.distill_lambda = None"]
    gin.clear_config()
    try:
        gin_utils.parse(["gin/reproduce/dpo_length_tiny.gin"], bindings)
        report = reproduce.run(str(tmp_path))
    finally:
        gin.clear_config()
    assert report["aligner"] == "dpo_aligner" and report["lambdas"] == [0.0, 1.0, 2.0]
    assert "distilled" not in report and not list(tmp_path.glob("distill*"))  # disabled
    assert [row["lambda"] for row in report["dera"]] == [0.0, 1.0, 2.0]
    assert [row["beta"] for row in report["retrained"]] == [None, 0.5, 0.25]
    for name in ("dpo_beta_0.5", "dpo_beta_0.25"):
        assert (tmp_path / name / "checkpoints").is_dir()
        assert 0.0 <= report["aligner_eval"][name]["eval/rewards/accuracies"] <= 1.0
    assert (tmp_path / "rl_beta_1").is_dir() and report["rl_same_optimum"]["beta"] == 1.0
    header = json.loads((tmp_path / "preference_pairs.jsonl").read_text().splitlines()[0])
    assert header["header"]["settings"]["tau"] == 2.0
    # DPO moved the model: the base model's samples are longer than SFT's.
    dera = [row["mean_length"] for row in report["dera"]]
    assert dera[0] < dera[1], dera
    assert "held-out metrics" in (tmp_path / "report.md").read_text()


@pytest.mark.slow
def test_micro_two_seed_run_shares_sft_and_writes_seed_statistics(tmp_path):
    bindings = MICRO + ["seeds.run_seeds.seeds = (0, 1)", "sft.train_sft.num_steps = 10",
                        "rl.train_rl.num_steps = 4", "rl.train_rl.batch_size = 4",
                        "rl.train_rl.num_steps_reference_beta = 1.0",
                        "rl.train_rl.max_num_steps = 8", "rl.train_rl.checkpoint_every = 8",
                        "reproduce.run.max_eval_examples = 8",
                        "seeds.run_seeds.optimum_samples = 1"]
    gin.clear_config()
    try:
        gin_utils.parse(["gin/reproduce/length_reward_seeds.gin"], bindings)
        content = seeds.run_seeds(str(tmp_path))
    finally:
        gin.clear_config()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report == json.loads(json.dumps(content))
    assert report["seeds"] == [0, 1] and report["lambdas"] == [0.0, 1.0, 2.0]
    # One SFT model for both seeds; each seed its own RL models and report.
    assert (tmp_path / "sft" / "checkpoints").is_dir()
    per_seed = [json.loads((tmp_path / f"seed_{s}" / "report.json").read_text()) for s in (0, 1)]
    assert not (tmp_path / "seed_0" / "sft").exists()
    assert [r["seed"] for r in per_seed] == [0, 1]
    assert per_seed[0]["dera"][1] != per_seed[1]["dera"][1]  # two base models
    for kind in ("dera", "retrained"):
        for k, row in enumerate(report[kind]):
            lengths = [r[kind][k]["mean_length"] for r in per_seed]
            assert row["lambda"] == report["lambdas"][k]
            assert row["mean_length"] == pytest.approx(np.mean(lengths))
            assert row["mean_length_sd"] == pytest.approx(np.std(lengths, ddof=1))
            lam, beta = row["lambda"], report["beta"]
            objectives = [r[kind][k]["mean_reward"] - (beta / lam * r[kind][k]["kl"] if lam else 0)
                          for r in per_seed]
            assert row["objective"] == pytest.approx(np.mean(objectives))
            assert row["objective_se"] == pytest.approx(np.std(objectives, ddof=1) / np.sqrt(2))
    for row in report["comparison"]:
        assert row["tolerance"] == pytest.approx(max(0.05 * row["retrained_length"], 2 * next(
            r["mean_length_sd"] for r in report["retrained"] if r["lambda"] == row["lambda"])))
        assert isinstance(row["retrained_below_dera"], bool)
    toy_dera, toy_exact = evaluation.predicted_lengths(report["dera"][0]["mean_length"], 24,
                                                       report["beta"], 2.0)
    assert report["comparison"][2]["predicted_exact_length"] == pytest.approx(toy_exact)
    assert report["comparison"][2]["predicted_dera_length"] == pytest.approx(toy_dera)
    # The exact optimum at beta / lambda from the SFT model's cached samples.
    lengths = json.loads((tmp_path / "sft_lengths_validation.json").read_text())["value"]
    assert len(lengths) == report["num_sft_length_samples"] == 100
    assert report["comparison"][2]["exact_length"] == pytest.approx(
        evaluation.tilted_optimum(np.array(lengths), report["beta"] / 2.0)["mean_length"])
    # The retrained model at beta 0.5 trained twice the base model's steps.
    convergence = {row["lambda"]: row for row in report["convergence"]}
    assert [run["steps"] for run in convergence[1.0]["runs"]] == [4, 4]
    assert [run["steps"] for run in convergence[2.0]["runs"]] == [8, 8]
    assert report["chosen_lambda"] in report["lambdas"]
    for name in ("report.md", "length_vs_lambda.png", "objective_vs_lambda.png"):
        assert (tmp_path / name).stat().st_size > 0
