"""SentencePiece vocabularies: the T5 one, and small ones trained on a task.

Two vocabularies are shared by the registered tasks:

* ``T5``: the T5 vocabulary (``cc_all.32000`` plus 100 extra ids = 32,100
  pieces, padded to 32,128 embedding rows in the model). Its file defaults to
  ``gs://t5-data/vocabs/cc_all.32000/sentencepiece.model``; without access to
  Google Cloud Storage, bind ``t5_vocabulary_file.path`` to a local copy.
* ``BUNDLED``: a unigram model trained on the ``train`` split of
  ``xsum_bundled`` (documents and summaries), 4,000 pieces by default (bind
  ``bundled_vocabulary_file.size``), no extra ids (nothing here pre-trains
  with span corruption, which is what T5's sentinels are for). It is trained on first use
  (a few seconds) and cached; ``python -m dera_t5x.data.vocab`` trains it ahead.

Both resolve their model file at first use, so gin bindings parsed before any
data is loaded apply; later bindings do not change an already loaded one.

Trained models follow the T5 conventions: pad 0, EOS 1, UNK 2, no BOS. Training
is deterministic: sentences in a fixed order, no sampling or shuffling, one
thread. The cache file ``<cache>/vocab/<name>-<size>-<fingerprint>.model`` is
keyed by the corpus text and training options, so a changed corpus retrains.
"""

import hashlib
import io
import json
import os
from collections.abc import Callable, Sequence

import gin
import seqio
import sentencepiece
import tensorflow as tf

from dera_t5x.data import bundled

T5_VOCABULARY_FILE = "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"
T5_EXTRA_IDS = 100
DEFAULT_BUNDLED_SIZE = 4000
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2

_TRAINER_OPTIONS = {
    "model_type": "unigram",
    "pad_id": PAD_ID,
    "eos_id": EOS_ID,
    "unk_id": UNK_ID,
    "bos_id": -1,
    # Every character of the corpus gets a piece, so training text round-trips.
    "character_coverage": 1.0,
    "num_threads": 1,
    "shuffle_input_sentence": False,
    "input_sentence_size": 0,
    "max_sentence_length": 1 << 16,
}


def train_sentencepiece(texts: Sequence[str], size: int) -> bytes:
    """Trains a unigram SentencePiece model deterministically.

    Args:
      texts: training sentences, used in this order.
      size: number of pieces, including pad, EOS and UNK.

    Returns:
      The serialized model proto.
    """
    if not texts:
        raise ValueError("Cannot train a vocabulary on an empty corpus.")
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, vocab_size=size,
            minloglevel=2, **_TRAINER_OPTIONS)
    except RuntimeError as e:
        raise ValueError(
            f"SentencePiece training with {size} pieces failed on {len(texts)} "
            f"sentences: {e}. Fix: choose a smaller vocabulary size.") from e
    return model.getvalue()


def trained_model_file(name: str, texts: Sequence[str], size: int) -> str:
    """Path of a cached SentencePiece model trained on ``texts``.

    Args:
      name: a name for the cache file, usually the task name.
      texts: the training sentences, in order.
      size: number of pieces.

    Returns:
      The model file path; the model is trained and written atomically if absent.
    """
    digest = hashlib.sha256(json.dumps(_TRAINER_OPTIONS, sort_keys=True).encode())
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    path = bundled.cache_dir() / "vocab" / f"{name}-{size}-{digest.hexdigest()[:12]}.model"
    if not path.exists():
        bundled.write_atomically(path, train_sentencepiece(texts, size))
    return os.fspath(path)


@gin.configurable
def t5_vocabulary_file(path: str = T5_VOCABULARY_FILE) -> str:
    """The T5 SentencePiece model file (bind ``path`` to use a local copy)."""
    if "://" not in path and not os.path.exists(path):
        raise FileNotFoundError(
            f"T5 vocabulary file {path} does not exist. Fix: bind "
            "t5_vocabulary_file.path to the cc_all.32000 sentencepiece.model (the "
            "spiece.model of a T5 checkpoint on Hugging Face is the same model).")
    return path


@gin.configurable
def bundled_vocabulary_file(size: int = DEFAULT_BUNDLED_SIZE) -> str:
    """The bundled vocabulary's model file, trained on the xsum_bundled train split."""
    return trained_model_file("xsum_bundled", bundled.xsum_texts("train"), size)


class LazyVocabulary(seqio.SentencePieceVocabulary):
    """A ``seqio.SentencePieceVocabulary`` whose model file is found at first use.

    Attributes:
      locate: returns the model file path (may train it); called once.
    """

    def __init__(self, locate: Callable[[], str], extra_ids: int = 0):
        super().__init__(sentencepiece_model_file="", extra_ids=extra_ids)
        self.locate = locate

    @property
    def sentencepiece_model_file(self) -> str:
        if not self._sentencepiece_model_file:
            self._sentencepiece_model_file = self.locate()
        return self._sentencepiece_model_file

    def _model_context(self):
        if self._model:
            return self._model
        path = self.sentencepiece_model_file
        try:
            return super()._model_context()
        except (tf.errors.OpError, OSError) as e:
            raise FileNotFoundError(
                f"Cannot read the SentencePiece model {path}: {e}. Fix: make the file "
                "readable, or for the T5 vocabulary bind t5_vocabulary_file.path to a "
                "local copy.") from e

    def __eq__(self, other) -> bool:
        return (isinstance(other, seqio.SentencePieceVocabulary)
                and self.sentencepiece_model_file == other.sentencepiece_model_file
                and self.extra_ids == other.extra_ids)


T5 = LazyVocabulary(t5_vocabulary_file, extra_ids=T5_EXTRA_IDS)
BUNDLED = LazyVocabulary(bundled_vocabulary_file)


def model_vocab_size(vocabulary: seqio.Vocabulary, multiple: int = 128) -> int:
    """Embedding rows a model needs: the vocabulary size rounded up to ``multiple``.

    T5: 32,100 -> 32,128; the default bundled vocabulary: 4,000 -> 4,096.
    """
    return _round_up(vocabulary.vocab_size, multiple)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def check_vocab_fits(vocabulary: seqio.Vocabulary, model_vocab_size: int) -> None:
    """Raises ValueError if token ids of ``vocabulary`` exceed the model's embedding."""
    if vocabulary.vocab_size > model_vocab_size:
        raise ValueError(
            f"The task's vocabulary has {vocabulary.vocab_size} pieces but the model's "
            f"embedding has only {model_vocab_size} rows, so some token ids would index "
            "past it. Fix: build the model with vocab_size >= "
            f"{_round_up(vocabulary.vocab_size, 128)}, or use a task whose vocabulary "
            "matches the model (e.g. xsum_bundled_t5 for a T5 checkpoint).")


def detokenize(vocabulary: seqio.Vocabulary, token_rows: Sequence[Sequence[int]]) -> list[str]:
    """The text of each row of generated ids, up to (not including) the first
    EOS: the one detokenization of decoded output (job, pipelines, ROUGE)."""
    texts = []
    for row in token_rows:
        ids = [int(t) for t in row]
        if vocabulary.eos_id in ids:
            ids = ids[:ids.index(vocabulary.eos_id)]
        texts.append(vocabulary.decode(ids))
    return texts
