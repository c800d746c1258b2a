"""Task splits as numpy arrays, and deterministic, resumable batch iterators.

``load_split`` runs a task's seqio pipeline once (tokenize, trim to the
feature length minus one, append EOS) and seqio's
``EncDecFeatureConverter(pack=False)``, and keeps the result in memory as
int32 arrays ``[num_examples, length]`` (fine for XSum-size data), with the
untokenized text of every feature in the same order (references for ROUGE).

Summarization tasks give the model features ``encoder_input_tokens``,
``decoder_input_tokens`` (targets shifted right, starting with 0),
``decoder_target_tokens`` and ``decoder_loss_weights``. Preference tasks give
``encoder_input_tokens`` and, for ``chosen`` and for ``rejected``, the three
decoder features prefixed ``chosen_`` / ``rejected_``; their ``targets``
length applies to both.

Batching the arrays is `dera_t5x.batching` (numpy only).
"""

import dataclasses
from collections.abc import Iterator, Mapping

import numpy as np
import seqio
import tensorflow as tf

from dera_t5x.data import tasks

DECODER_FEATURES = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")


@dataclasses.dataclass(frozen=True)
class Split:
    """A materialized task split.

    Attributes:
      features: model features, each a read-only int32 array [num_examples, length].
      texts: untokenized text per task feature (``inputs`` includes the prefix).
      num_truncated: per task feature, how many examples were cut to fit.
    """
    features: dict[str, np.ndarray]
    texts: dict[str, tuple[str, ...]]
    num_truncated: dict[str, int]

    @property
    def num_examples(self) -> int:
        return len(self.features["encoder_input_tokens"])


_CACHE: dict[tuple[str, str, int, int], tuple[seqio.Task, Split]] = {}


def _check_lengths(feature_lengths: Mapping[str, int]) -> tuple[int, int]:
    valid = all(isinstance(v, int) and v >= 2 for v in feature_lengths.values())
    if set(feature_lengths) != {"inputs", "targets"} or not valid:
        raise ValueError(f"feature_lengths must be {{'inputs': int, 'targets': int}}, each >= 2 "
                         f"(room for a token and EOS); got {dict(feature_lengths)}.")
    return feature_lengths["inputs"], feature_lengths["targets"]


def _convert(ds: tf.data.Dataset, target: str, lengths: dict[str, int], prefix: str
             ) -> tf.data.Dataset:
    """EncDecFeatureConverter on (inputs, ``target``); decoder features get ``prefix``."""
    ds = ds.map(lambda ex: {"inputs": ex["inputs"], "targets": ex[target]})
    ds = seqio.EncDecFeatureConverter(pack=False)(ds, lengths)
    return ds.map(lambda ex: {
        (prefix + k if k in DECODER_FEATURES else k): v for k, v in ex.items()})


def _materialize(task: seqio.Task, split: str, inputs_length: int, targets_length: int
                 ) -> Split:
    targets = ("chosen", "rejected") if tasks.is_preference_task(task) else ("targets",)
    task_lengths = {"inputs": inputs_length, **{t: targets_length for t in targets}}
    lengths = {"inputs": inputs_length, "targets": targets_length}
    read = dict(split=split, shuffle=False, num_epochs=1, use_cached=False)
    trimmed = task.get_dataset(task_lengths, **read)
    converted = [_convert(trimmed, t, lengths, f"{t}_" if t != "targets" else "")
                 for t in targets]
    # The same pipeline without trimming: full token counts and the texts.
    untrimmed = task.get_dataset(None, **read)
    features: dict[str, list[np.ndarray]] = {}
    full_lengths: dict[str, list[int]] = {key: [] for key in task_lengths}
    texts: dict[str, list[str]] = {key: [] for key in task_lengths}
    for *model_examples, raw in tf.data.Dataset.zip((*converted, untrimmed)).as_numpy_iterator():
        merged = {}
        for example in model_examples:  # encoder_input_tokens is the same in each.
            merged.update(example)
        for key, value in merged.items():
            features.setdefault(key, []).append(value)
        for key in task_lengths:
            full_lengths[key].append(len(raw[key]))
            texts[key].append(raw[f"{key}_pretokenized"].decode("utf-8"))
    if not features:
        raise ValueError(f"Split {split!r} of task {task.name!r} has no examples.")
    arrays = {key: np.stack(rows).astype(np.int32) for key, rows in features.items()}
    for array in arrays.values():
        array.flags.writeable = False
    return Split(
        features=arrays,
        texts={key: tuple(values) for key, values in texts.items()},
        num_truncated={key: sum(n > task_lengths[key] for n in full_lengths[key])
                       for key in task_lengths})


def load_split(task_name: str, split: str, feature_lengths: Mapping[str, int]) -> Split:
    """Materializes a task split as numpy arrays (cached in memory).

    Args:
      task_name: a registered task, e.g. "xsum_bundled".
      split: e.g. "train", "validation", "test".
      feature_lengths: ``{"inputs": int, "targets": int}``, e.g. the gin macro
        ``TASK_FEATURE_LENGTHS``.

    Returns:
      The split; see ``Split``.
    """
    inputs_length, targets_length = _check_lengths(feature_lengths)
    task = tasks.get_task(task_name)
    tasks.check_data_available(task)
    if split not in task.splits:
        raise ValueError(f"Task {task_name!r} has no split {split!r}; its splits are "
                         f"{sorted(task.splits)}.")
    key = (task_name, split, inputs_length, targets_length)
    cached = _CACHE.get(key)
    if cached is None or cached[0] is not task:  # A task re-registered under the same name.
        cached = _CACHE[key] = (task, _materialize(task, split, inputs_length, targets_length))
    return cached[1]
