"""seqio tasks of dera-t5x, registered on import of ``dera_t5x.data``.

* ``xsum``: tfds ``xsum:1.1.0`` (train / validation / test, about
  204k / 11k / 11k pairs), T5 vocabulary.
* ``xsum_bundled``: the bundled XSum pairs (800 / 100 / 100), BUNDLED
  vocabulary; ``xsum_bundled_t5``: the same with the T5 vocabulary.
* ``factual_pairs``: the bundled faithful / unfaithful triples
  (266 / 50 / 52), BUNDLED vocabulary; ``factual_pairs_t5``: T5 vocabulary.

Summarization tasks have features ``inputs`` (``"summarize: "`` + document)
and ``targets`` (summary); preference tasks have ``inputs`` (``"summarize: "``
+ article sentence), ``chosen`` (faithful summary) and ``rejected``
(unfaithful summary). Every feature is tokenized, trimmed to its sequence
length minus one, and ends with EOS (id 1); the untokenized text is kept as
``<feature>_pretokenized``. Summarization tasks report ROUGE-1/2/L. See
``bundled`` for the bundled splits and ``vocabularies`` for the vocabularies.

Preparing the full XSum for tfds: ``xsum:1.1.0`` cannot be downloaded
automatically. Run the download and extraction scripts of
https://github.com/EdinburghNLP/XSum/tree/master/XSum-Dataset, pack the
resulting folder as ``xsum-extracts-from-downloads.tar.gz`` and put it into
tfds's manual directory (``~/tensorflow_datasets/downloads/manual/``, or
``$TFDS_DATA_DIR/downloads/manual/``), then prepare it once (this also fetches
the official split file)::

  python -c "import tensorflow_datasets as tfds; tfds.builder('xsum:1.1.0').download_and_prepare()"

The ``xsum`` task then reads the prepared data from ``~/tensorflow_datasets``
(or ``$TFDS_DATA_DIR``).

User data: ``register_jsonl_task`` and ``register_jsonl_preference_task``
register tasks over JSON-lines files, one object per line. Missing or empty
files, and a first record lacking a field, are reported at registration; a
malformed later line is reported, with its line number, when the task is read.
"""

import functools
import os
from collections.abc import Mapping

import seqio
import tensorflow as tf

from dera_t5x import jsonl
from dera_t5x.data import bundled
from dera_t5x.data import metrics
from dera_t5x.data import vocabularies

PREFIX = "summarize: "
SUMMARIZATION_FEATURES = ("inputs", "targets")
PREFERENCE_FEATURES = ("inputs", "chosen", "rejected")


def get_task(name: str) -> seqio.Task:
    """The registered seqio task ``name``, with a clear error for unknown names."""
    if name not in seqio.TaskRegistry.names():
        known = ", ".join(sorted(seqio.TaskRegistry.names()))
        raise ValueError(
            f"Unknown task {name!r}. Registered tasks: {known}. Fix: use one of these, or "
            "register your data with dera_t5x.data.tasks.register_jsonl_task first.")
    return seqio.get_mixture_or_task(name)


def check_data_available(task: seqio.Task) -> None:
    """Raises FileNotFoundError if a tfds task's dataset has not been prepared."""
    if isinstance(task.source, seqio.TfdsDataSource):
        builder = task.source.tfds_dataset.builder
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"Task {task.name!r} reads tfds {task.source.tfds_dataset.name}, which is not "
                f"prepared in {builder.data_dir}. Fix: download XSum by hand (see the "
                "docstring of dera_t5x.data.tasks), put xsum-extracts-from-downloads.tar.gz "
                "into tfds's downloads/manual/ folder and run tfds.builder('xsum:1.1.0')"
                ".download_and_prepare(); or use the bundled task 'xsum_bundled'.")


def is_preference_task(task: seqio.Task) -> bool:
    """Whether ``task`` has the features ``inputs``, ``chosen`` and ``rejected``."""
    return set(task.output_features) == set(PREFERENCE_FEATURES)


@seqio.map_over_dataset
def _add_prefix(example: dict[str, tf.Tensor], prefix: str) -> dict[str, tf.Tensor]:
    example = dict(example)
    example["inputs"] = tf.strings.join([prefix, example["inputs"]])
    return example


def _register(name: str, source: seqio.DataSource, key_map: Mapping[str, str],
              vocabulary: seqio.Vocabulary, prefix: str) -> seqio.Task:
    """Registers a task renaming source fields by ``key_map`` ({feature: field})."""
    if name in seqio.TaskRegistry.names():
        raise ValueError(f"A task named {name!r} is already registered. Fix: choose another "
                         "name, or call seqio.TaskRegistry.remove(name) first.")
    summarization = tuple(key_map) == SUMMARIZATION_FEATURES
    return seqio.TaskRegistry.add(
        name,
        source=source,
        preprocessors=[
            functools.partial(seqio.preprocessors.rekey, key_map=dict(key_map)),
            functools.partial(_add_prefix, prefix=prefix),
            seqio.preprocessors.tokenize,
            seqio.preprocessors.append_eos_after_trim,
        ],
        output_features={key: seqio.Feature(vocabulary, add_eos=True) for key in key_map},
        metric_fns=[metrics.rouge_metric] if summarization else [],
    )


def _records_dataset(records: tuple[dict[str, str], ...], fields: tuple[str, ...]
                     ) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices(
        {field: tf.constant([r[field] for r in records], tf.string) for field in fields})


def _bundled_xsum_dataset(split: str, shuffle_files: bool, seed: int | None = None
                          ) -> tf.data.Dataset:
    del shuffle_files, seed  # In the documented order; the pipeline shuffles.
    return _records_dataset(bundled.xsum(split), ("id", "document", "summary"))


def _bundled_factual_dataset(split: str, shuffle_files: bool, seed: int | None = None
                             ) -> tf.data.Dataset:
    del shuffle_files, seed  # In the documented order; the pipeline shuffles.
    return _records_dataset(bundled.factual_pairs(split),
                            ("article_sent", "correct_sent", "incorrect_sent"))


def _jsonl_dataset(split: str, shuffle_files: bool, seed: int | None = None, *,
                   path_by_split: Mapping[str, str], fields: tuple[str, ...]
                   ) -> tf.data.Dataset:
    del shuffle_files, seed  # In file order; the pipeline shuffles.
    return _records_dataset(jsonl.read_records(path_by_split[split], fields), fields)


def _register_jsonl(name: str, path_by_split: Mapping[str, str], key_map: dict[str, str],
                    vocabulary: seqio.Vocabulary, prefix: str) -> seqio.Task:
    if not path_by_split:
        raise ValueError(f"Task {name!r} needs at least one split, e.g. "
                         "{'train': 'train.jsonl', 'validation': 'validation.jsonl'}.")
    fields = tuple(dict.fromkeys(key_map.values()))
    paths = {split: os.fspath(path) for split, path in path_by_split.items()}
    for path in paths.values():
        jsonl.check_first_record(path, fields)
    source = seqio.FunctionDataSource(
        functools.partial(_jsonl_dataset, path_by_split=paths, fields=fields),
        splits=tuple(paths))
    return _register(name, source, key_map, vocabulary, prefix)


def register_jsonl_task(name: str, path_by_split: Mapping[str, str],
                        input_field: str = "document", target_field: str = "summary",
                        vocabulary: seqio.Vocabulary = vocabularies.BUNDLED,
                        prefix: str = PREFIX) -> seqio.Task:
    """Registers a summarization task over JSON-lines files of (document, summary).

    Args:
      name: the task name.
      path_by_split: ``{split: path}``, e.g. ``{"train": ..., "validation": ...}``.
      input_field: the field holding the document.
      target_field: the field holding the summary.
      vocabulary: the model's vocabulary: ``vocabularies.BUNDLED`` (default) or
        ``vocabularies.T5``, or a ``seqio.SentencePieceVocabulary`` of a file made
        with ``vocabularies.trained_model_file``.
      prefix: prepended to every input.

    Returns:
      The task, with features ``inputs`` and ``targets``.

    Raises:
      FileNotFoundError / ValueError: a file is missing, empty, or its first
        record lacks a field.
    """
    return _register_jsonl(name, path_by_split,
                           {"inputs": input_field, "targets": target_field},
                           vocabulary, prefix)


def register_jsonl_preference_task(name: str, path_by_split: Mapping[str, str],
                                   prompt_field: str, chosen_field: str,
                                   rejected_field: str,
                                   vocabulary: seqio.Vocabulary = vocabularies.BUNDLED,
                                   prefix: str = PREFIX) -> seqio.Task:
    """Registers a preference task over JSON-lines files of (prompt, chosen, rejected).

    Args and errors as ``register_jsonl_task``; the task has features
    ``inputs`` (prefix + prompt), ``chosen`` and ``rejected``. Use the vocabulary
    of the summarization task whose model the preferences will align.
    """
    return _register_jsonl(
        name, path_by_split,
        {"inputs": prompt_field, "chosen": chosen_field, "rejected": rejected_field},
        vocabulary, prefix)


def _register_defaults() -> None:
    _register("xsum", seqio.TfdsDataSource(tfds_name="xsum:1.1.0"),
              {"inputs": "document", "targets": "summary"}, vocabularies.T5, PREFIX)
    xsum_source = seqio.FunctionDataSource(
        _bundled_xsum_dataset, splits=bundled.SPLITS,
        num_input_examples=bundled.XSUM_SPLIT_SIZES)
    factual_source = seqio.FunctionDataSource(_bundled_factual_dataset,
                                              splits=bundled.SPLITS)
    for suffix, vocabulary in (("", vocabularies.BUNDLED), ("_t5", vocabularies.T5)):
        _register(f"xsum_bundled{suffix}", xsum_source,
                  {"inputs": "document", "targets": "summary"}, vocabulary, PREFIX)
        _register(f"factual_pairs{suffix}", factual_source,
                  {"inputs": "article_sent", "chosen": "correct_sent",
                   "rejected": "incorrect_sent"}, vocabulary, PREFIX)


_register_defaults()
