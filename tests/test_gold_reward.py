"""The gold faithfulness reward on hand-made cases (a hand-made vocabulary)
and under jit / vmap as the pipelines call it; the proxy reward model on
gold-labelled pairs; the gold / proxy pipeline with micro settings, which
also checks the gold reward's agreement with the human labels of
`factual_pairs`."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dera_t5x.training import gold_reward
from dera_t5x.training import trainer

# Ids 0-2 are pad, EOS and unknown; the prefix is "▁sum mar ize :".
PIECES = [None, None, None, "▁sum", "mar", "ize", ":", "▁the", "▁cat", "▁sat", "▁on", "▁mat",
          ".", ",", "▁", "Ja", "ne", "▁Jane", "▁5", "2", "▁25", "▁dog", "▁ran", "▁The", "▁Cat",
          "▁big", "▁red", "▁old", "▁home", "▁today", "'", "s", "▁it", "▁near", "▁park"]
PREFIX = ("▁sum", "mar", "ize", ":")
NUM_IDS = 48  # ids 35-47 are past the vocabulary, as in a model's padded embedding
TABLES = gold_reward.build_tables(PIECES, NUM_IDS, [PIECES.index(p) for p in PREFIX])


def ids(text: str, length: int) -> np.ndarray:
    """Space-separated pieces ("_" for "▁") -> ids with EOS, zero-padded: [length]."""
    row = [PIECES.index(p.replace("_", "▁")) for p in text.split()] + [1]
    return np.array(row + [0] * (length - len(row)), np.int32)


SUPPORT_TERMS = jax.jit(gold_reward.support_terms)


def terms(document: str, summaries: list[str | np.ndarray]) -> dict[str, np.ndarray]:
    """The support terms of summaries (texts or id rows [20]) of one document
    (padded to 4 rows: one compile)."""
    rows = [ids(s, 20) if isinstance(s, str) else s for s in summaries]
    rows += [ids("", 20)] * (4 - len(rows))
    inputs = np.stack([ids("_sum mar ize : " + document, 40)] * 4)
    out = SUPPORT_TERMS(TABLES, inputs, np.stack(rows))
    return {name: np.asarray(value)[:len(summaries)] for name, value in out.items()}


@functools.cache
def jitted_reward(**settings):
    reward = gold_reward.faithfulness_reward(TABLES, **settings)
    return reward, jax.jit(reward.apply)


def gold(document: str, summaries: list[str], **settings) -> np.ndarray:
    """The gold reward of summaries of one document (jitted, as every caller runs it)."""
    reward, apply = jitted_reward(**settings)
    padded = summaries + [""] * (4 - len(summaries))
    inputs = np.stack([ids("_sum mar ize : " + document, 40)] * 4)
    out = apply(reward.params, inputs, np.stack([ids(s, 20) for s in padded]))
    return np.asarray(out)[:len(summaries)]


DOC = "_The _cat _sat _on _the _mat . _ Ja ne _ran _near _the _big _red _park , _5 2 ."


def test_a_copied_span_is_fully_supported_and_unsupported_words_are_not():
    out = terms(DOC, ["_the _cat _sat _on _the _mat .", "_dog _home _today _old"])
    for name in ("unigram", "skip_bigram", "trigram", "support"):
        assert out[name][0] == pytest.approx(1.0), name
        assert out[name][1] == 0.0, name
    np.testing.assert_array_equal(out["num_words"], [6, 4])


def test_words_match_across_case_and_segmentation_and_punctuation_separates():
    # "▁Jane" is one piece here and "▁ Ja ne" in the document; "The Cat" vs "the cat".
    out = terms(DOC, ["_Jane _ran _near _the _big _red _park", "_The _Cat _sat"])
    np.testing.assert_allclose(out["support"], [1.0, 1.0])
    # "park , 52 ." reads as the words park, 52: the comma only separates.
    out = terms(DOC, ["_red _park _5 2"])
    np.testing.assert_allclose([out["trigram"][0], out["num_words"][0]], [1.0, 3.0])


def test_empty_and_one_word_summaries_cannot_win():
    scores = gold(DOC, ["", "_cat", "_cat _sat", "_the _cat _sat _on _the _mat ."], target_length=4)
    assert scores[0] == 0.0
    # One word: only the unigram term (1 / 3), times the guard (1 / 4).
    assert scores[1] == pytest.approx(1 / 12)
    assert scores[1] < scores[2] < scores[3] == pytest.approx(1.0)
    # The guard caps at 1: words past the target add nothing.
    longer = gold(DOC, ["_the _cat _sat _on _the _mat . _Jane _ran _near _the _big _red _park"],
                  target_length=4)
    assert longer[0] == pytest.approx(1.0)


def test_repeating_words_gains_nothing():
    out = terms(DOC, ["_cat _cat _cat _cat _cat _cat", "_Jane _ran _near _the _park",
                      "_Jane _Jane _ran _near _the _park"])
    assert out["support"][0] < 0.25  # one supported mention, no supported pair
    assert out["unigram"][2] < out["unigram"][1] == 1.0  # the document names Jane once
    assert gold(DOC, ["_cat _cat _cat _cat _cat _cat"], target_length=4)[0] < 0.25


def test_numbers_and_names_weigh_more_than_other_content_words():
    document = "_Jane _ran _5 2 _big _red _park"
    base = "_Jane _ran _5 2 _big _red _park"
    out = terms(document, [base, base.replace("_5 2", "_25"), base.replace("_big", "_old")])
    assert out["unigram"][0] == 1.0
    # Content words weigh 1, entity-like 2: Jane 2, ran 1, 52 2, big 1, red 1, park 1.
    np.testing.assert_allclose(out["unigram"][1:], [6 / 8, 7 / 8])


def test_a_deletion_is_partly_supported_and_a_reordering_is_not():
    out = terms("_the _big _red _park", ["_big _park", "_the _park", "_park _big"])
    np.testing.assert_allclose(out["skip_bigram"], [0.5, 0.25, 0.0])


def test_the_prefix_padding_and_ids_past_the_vocabulary_are_not_words():
    # Ids the model could emit past the vocabulary separate words and count nothing.
    separated = np.zeros(20, np.int32)
    separated[:5] = [PIECES.index("▁cat"), 40, PIECES.index("▁sat"), 47, 1]
    out = terms(DOC, ["_sum mar ize", "_cat _sat", separated])
    assert out["support"][0] == 0.0  # the task prefix supports nothing
    np.testing.assert_array_equal(out["num_words"], [1, 2, 2])
    assert out["support"][2] == out["support"][1] == pytest.approx(2 / 3)


def test_an_empty_document_supports_nothing():
    out = terms("", ["_the _cat _sat", ""])
    np.testing.assert_array_equal(out["support"], [0.0, 0.0])


def test_the_reward_runs_jitted_and_vmapped_over_lambdas_as_the_evaluator_calls_it():
    reward, _ = jitted_reward(target_length=4)
    inputs = np.stack([ids("_sum mar ize : " + DOC, 40)] * 2)
    per_lambda = np.stack([np.stack([ids("_the _cat _sat", 20), ids("_dog _ran", 20)]),
                           np.stack([ids("_big _red _park", 20), ids("", 20)])])
    fn = jax.jit(jax.vmap(reward.apply, in_axes=(None, None, 0)))
    out = np.asarray(fn(reward.params, inputs, per_lambda))
    for k in range(2):
        np.testing.assert_allclose(out[k], gold(DOC, [["_the _cat _sat", "_dog _ran"],
                                                      ["_big _red _park", ""]][k],
                                                target_length=4), atol=1e-6)
    assert out.shape == (2, 2) and np.all(np.isfinite(out))
    # Token rewards (RL) put the sequence reward on the last response token.
    token = np.asarray(jax.jit(reward.token_rewards)(reward.params, inputs, per_lambda[0]))
    np.testing.assert_allclose(token.sum(axis=1), out[0], atol=1e-6)
    # RL with prompts encoded once passes one input row per prompt for its
    # consecutive samples (`protocol.rows_per_input`): the same rewards.
    once = np.asarray(jax.jit(reward.apply)(reward.params, inputs[:1], per_lambda[0]))
    np.testing.assert_allclose(once, out[0], atol=1e-6)
    with pytest.raises(ValueError, match="do not split evenly"):
        reward.apply(reward.params, inputs, per_lambda[0][:1])


def test_support_alone_is_the_unguarded_reward():
    assert gold_reward.faithfulness_reward(TABLES, length_guard=False).name == "gold_support"
    np.testing.assert_allclose(gold(DOC, ["_cat _sat", "_big"], length_guard=False),
                               terms(DOC, ["_cat _sat", "_big"])["support"])


@pytest.mark.parametrize("settings, message", [
    ({"target_length": 0}, "target_length"),
    ({"skip_decay": 1.5}, "skip_decay"),
    ({"max_gap": 0}, "max_gap"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        gold_reward.faithfulness_reward(TABLES, **settings)


def test_bad_tables_are_refused():
    with pytest.raises(ValueError, match="num_ids"):
        gold_reward.build_tables(PIECES, 10)
    with pytest.raises(ValueError, match="build_tables"):
        gold_reward.faithfulness_reward({"kind": np.zeros(3)})


# The proxy reward model: Bradley-Terry on gold-labelled pairs.
DOC_WORDS = ["▁the", "▁cat", "▁sat", "▁on", "▁mat", "▁big", "▁red", "▁park", "▁ran", "▁near"]
OTHER_WORDS = ["▁dog", "▁home", "▁today", "▁old", "▁it", "▁25"]


def toy_pairs(num: int, seed: int) -> dict[str, np.ndarray]:
    """Documents of 8 document words; two 4-word responses copied from the
    document with k1 != k2 words replaced by other words, labelled by gold."""
    rng = np.random.default_rng(seed)
    prefix = [PIECES.index(p) for p in PREFIX]
    inputs, chosen, rejected = [], [], []
    for _ in range(num):
        doc = [PIECES.index(w) for w in rng.choice(DOC_WORDS, 8)]
        inputs.append(prefix + doc + [1] + [0] * 3)
        start = rng.integers(0, 5)
        responses = []
        for k in rng.choice(5, 2, replace=False):
            words = list(doc[start:start + 4])
            for i in rng.choice(4, k, replace=False):
                words[i] = PIECES.index(rng.choice(OTHER_WORDS))
            responses.append(words + [1, 0])
        chosen.append(responses[0])
        rejected.append(responses[1])
    pairs = {"inputs": np.array(inputs, np.int32), "chosen": np.array(chosen, np.int32),
             "rejected": np.array(rejected, np.int32)}
    reward, apply = jitted_reward(target_length=4)
    pairs["chosen_reward"], pairs["rejected_reward"] = gold_reward.pair_scores(
        apply, reward.params, pairs)
    return pairs


@pytest.fixture(scope="module")
def rm_model():
    """A micro T5 over the hand-made vocabulary and its random params."""
    from dera_t5x import models  # noqa: PLC0415
    from t5_factories import tiny_config  # noqa: PLC0415

    model = models.for_config(tiny_config(vocab_size=NUM_IDS, emb_dim=32, mlp_dim=64))
    return model, jax.jit(model.init)(jax.random.PRNGKey(0))


def test_the_proxy_reward_model_learns_gold_labelled_pairs(rm_model, tmp_path):
    from dera_t5x.training import reward_model  # noqa: PLC0415

    model, params = rm_model
    train, held_out = (reward_model.by_reward(toy_pairs(n, seed)) for n, seed in ((96, 0),
                                                                                    (48, 1)))
    # Every pair orders the responses by gold: more replaced words, lower gold.
    assert len(held_out["inputs"]) >= 40
    before = reward_model.pairwise_accuracy(
        model, reward_model.init_params(params, model.hidden_size), held_out)
    trained = reward_model.train_reward_model(
        str(tmp_path / "rm"), model=model, model_params=params, feature_lengths={},
        batch_size=16, num_steps=60, checkpoint_every=60, seed=0,
        optimizer=reward_model.trainer.make_optimizer(
            name="adamw", schedule=reward_model.trainer.make_schedule(learning_rate=3e-3)),
        pairs=train, eval_pairs={"gold_agreement": held_out})
    after = reward_model.pairwise_accuracy(model, trained, held_out)
    assert before == 0.0  # the zero head scores every response 0
    assert after >= 0.85, after
    metrics = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").open()]
    assert metrics[-1]["eval/gold_agreement"] == pytest.approx(after)


def test_soft_labels_and_bad_pairs(rm_model, tmp_path):
    from dera_t5x.training import reward_model  # noqa: PLC0415

    model, model_params = rm_model
    pairs = toy_pairs(8, 2)
    params = reward_model.init_params(model_params, model.hidden_size)
    params["head"]["bias"] = jnp.float32(0.3)
    params["head"]["kernel"] = jnp.full_like(params["head"]["kernel"], 0.1)
    batch = {k: pairs[k] for k in ("inputs", "chosen", "rejected")}
    p = np.linspace(0.0, 1.0, 8).astype(np.float32)

    @jax.jit
    def losses(params):
        margin = (reward_model.score(model, params, batch["inputs"], batch["chosen"])
                  - reward_model.score(model, params, batch["inputs"], batch["rejected"]))
        return (margin, reward_model.pairwise_loss(model, params, dict(batch, preference=p))[0],
                reward_model.pairwise_loss(model, params, batch)[0])

    margin, soft, hard = losses(params)
    want = -np.mean(p * jax.nn.log_sigmoid(margin) + (1 - p) * jax.nn.log_sigmoid(-margin))
    assert float(soft) == pytest.approx(float(want), rel=1e-5)
    assert float(hard) == pytest.approx(float(-np.mean(jax.nn.log_sigmoid(margin))), rel=1e-5)
    assert float(jnp.std(margin)) > 0  # the pairs are told apart: the check has teeth
    with pytest.raises(ValueError, match="identical chosen and rejected"):
        reward_model.check_pairs(dict(batch, rejected=batch["chosen"]))
    with pytest.raises(ValueError, match="no NaN"):
        reward_model.check_pairs(dict(batch, preference=np.full(8, np.nan)))
    with pytest.raises(ValueError, match="lack"):
        reward_model.check_pairs({"inputs": batch["inputs"]})
    with pytest.raises(ValueError, match="not all finite"):
        reward_model.by_reward(dict(pairs, chosen_reward=np.full(8, np.nan)))
    # Refused before any compiling or writing.
    with pytest.raises(ValueError, match="identical"):
        reward_model.train_reward_model(str(tmp_path / "refused"), model=model,
                                        model_params=model_params, feature_lengths={},
                                        pairs=dict(batch, rejected=batch["chosen"]))
    assert not (tmp_path / "refused").exists()


# The gold / proxy pipeline with micro settings.
GOLD_MICRO = [
    "network.T5Config.emb_dim = 32", "network.T5Config.num_heads = 2",
    "network.T5Config.head_dim = 16", "network.T5Config.mlp_dim = 64",
    "network.T5Config.num_encoder_layers = 1", "network.T5Config.num_decoder_layers = 1",
    "TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': 12}",
    "sft.train_sft.num_steps = 20", "sft.train_sft.batch_size = 8",
    "sft.train_sft.eval_split = None", "reproduce.run.num_eval_samples = 1",
    "reward_model.train_proxy.max_prompts = 24", "reward_model.train_proxy.pairs_per_prompt = 2",
    "reward_model.train_proxy.held_out_fraction = 0.25",
    "reward_model.train_reward_model.num_steps = 4",
    "reward_model.train_reward_model.checkpoint_every = 4",
    "reward_model.train_reward_model.batch_size = 8",
    "rl.train_rl.num_steps = 2", "rl.train_rl.batch_size = 8",
    "rl.train_rl.num_steps_reference_beta = None", "oracle/rl.train_rl.num_steps = 3",
    "reproduce.run.lambdas = (0.0, 1.0)", "reproduce.run.max_decode_len = 12",
    "rl.RLConfig.max_decode_len = 12", "reproduce.run.max_eval_examples = 8",
    "reproduce.run.eval_batch_size = 16",
]


@pytest.mark.slow
def test_micro_gold_proxy_pipeline_reports_gold_and_proxy(tmp_path):
    import gin  # noqa: PLC0415
    from dera_t5x import gin_utils  # noqa: PLC0415
    from dera_t5x import reproduce  # noqa: PLC0415
    from dera_t5x.training import preference_pairs  # noqa: PLC0415
    from dera_t5x.training import reward_model  # noqa: PLC0415

    gin.clear_config()
    try:
        gin_utils.parse(["gin/reproduce/gold_proxy_tiny.gin"], GOLD_MICRO)
        content = reproduce.run(str(tmp_path))
        # The gold reward the pipeline built, with the pipeline's gin settings.
        gold = gold_reward.faithfulness_reward(gold_reward.tables_for_task("xsum_bundled", 4096))
    finally:
        gin.clear_config()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report == json.loads(json.dumps(content))
    assert report["reward"] == "reward_model"
    # The proxy trained on pairs of SFT samples labelled by the gold reward.
    header, pairs = preference_pairs.read(tmp_path / "proxy_reward_model" / "pairs.jsonl")
    assert header["settings"]["reward"] == "gold" and len(pairs["inputs"]) <= 48
    chosen, rejected = gold_reward.pair_scores(gold.apply, gold.params, pairs)
    np.testing.assert_allclose(chosen, pairs["chosen_reward"], atol=1e-6)
    np.testing.assert_allclose(rejected, pairs["rejected_reward"], atol=1e-6)
    assert 0.0 <= report["proxy_gold_agreement"] <= 1.0
    assert 0.0 <= report["proxy_human_accuracy"] <= 1.0
    # The gold reward agrees with the human labels of the held-out factual pairs
    # (computed here on the inputs the prefix of which it drops).
    assert set(report["gold_human_agreement"]) == {"validation", "test"}
    for split, agreement in report["gold_human_agreement"].items():
        assert agreement >= 0.70, (split, agreement)
        inputs = reward_model.preference_arrays("factual_pairs", split,
                                                reward_model.HUMAN_PAIR_LENGTHS)["inputs"]
        assert np.all(inputs[:, :len(gold.params["prefix"])] == gold.params["prefix"])
    for key in ("dera", "retrained"):
        assert [row["lambda"] for row in report[key]] == [0.0, 1.0]
        for row in report[key]:
            assert 0.0 <= row["gold_reward"] <= 1.0 and np.isfinite(row["proxy_reward"])
            assert row["proxy_reward"] == row["mean_reward"]
            assert np.isfinite(row["kl"]) and row["mean_length"] > 0
            assert set(row["rewards"]) == {"reward_model", "gold", "gold_support"}
        assert report["gold_proxy_part_at"][key] in (None, 0.0)
    # lambda is chosen by the gold reward among the eligible rows.
    table = report["selection"]["validation"]
    eligible = [row for row in table if row["eligible"]] or table
    assert report["chosen_lambda"] == max(eligible, key=lambda row: row["gold"])["lambda"]
    assert "gold" in report["selection"]["objective"]
    # The oracle: RL on the gold reward itself at its own beta, scored like the others.
    oracle = report["oracle"]
    assert (tmp_path / "oracle_rl_beta_0.001" / "checkpoints").is_dir()
    # under its own gin scope: `oracle/rl.train_rl.num_steps = 3`, the others' 2.
    last_step = {name: max(row["step"] for row in trainer.read_metrics(tmp_path / name))
                 for name in ("oracle_rl_beta_0.001", "rl_beta_0.02")}
    assert last_step == {"oracle_rl_beta_0.001": 3, "rl_beta_0.02": 2}
    assert oracle["beta"] == 0.001 and report["beta"] == 0.02  # gold's units, the proxy's
    assert oracle["gold_reward"] == oracle["rewards"]["gold"][0]
    assert oracle["proxy_reward"] == oracle["mean_reward"] != report["dera"][1]["mean_reward"]
    # DeRa's gold reward against the retrained models': lambdas 0 and 1 are the same
    # models with the same samples, so no gap.
    rows = report["gold_comparison_rows"]
    assert [(row["lambda"], row["gap"], row["within"]) for row in rows] == [
        (0.0, 0.0, True), (1.0, 0.0, True)]
    text = (tmp_path / "report.md").read_text()
    assert "## Gold and proxy rewards" in text and "Oracle RL on the gold reward" in text
    assert (tmp_path / "gold_proxy_vs_sqrt_kl.png").stat().st_size > 0
