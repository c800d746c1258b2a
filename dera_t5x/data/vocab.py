r"""Trains (or finds cached) the bundled vocabulary and prints token statistics.

  python -m dera_t5x.data.vocab --size=4000

trains the unigram SentencePiece model of ``vocabularies.BUNDLED`` on the
``train`` split of ``xsum_bundled`` (deterministic; cached under
``$DERA_T5X_CACHE/vocab/``, a few seconds), prints its path, the embedding
size a model needs, and the token lengths of the split's documents and
summaries, which guide ``TASK_FEATURE_LENGTHS``. Use the same size in gin:
``bundled_vocabulary_file.size``.
"""

from absl import app
from absl import flags
import numpy as np
import seqio

from dera_t5x.data import bundled
from dera_t5x.data import vocabularies

_SIZE = flags.DEFINE_integer("size", vocabularies.DEFAULT_BUNDLED_SIZE,
                             "Number of SentencePiece pieces.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    path = vocabularies.bundled_vocabulary_file(_SIZE.value)
    vocabulary = seqio.SentencePieceVocabulary(path)
    records = bundled.xsum("train")
    documents = np.array([len(vocabulary.encode(r["document"])) for r in records])
    summaries = np.array([len(vocabulary.encode(r["summary"])) for r in records])
    print(f"model file: {path}")
    print(f"pieces: {vocabulary.vocab_size}; model embedding rows: "
          f"{vocabularies.model_vocab_size(vocabulary)}")
    for name, lengths in (("document", documents), ("summary", summaries)):
        p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
        print(f"{name} tokens (train, without prefix and EOS): median {p50:.0f}, "
              f"p90 {p90:.0f}, p99 {p99:.0f}, max {lengths.max()}")


if __name__ == "__main__":
    app.run(main)
