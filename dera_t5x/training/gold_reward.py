"""A computable gold faithfulness reward: how well the input supports a summary.

The reward reads token ids, as every `rewards.Reward` does, so RL, DeRa
evaluation and the preference-pair builder score samples with it inside
jitted code, against the truncated input the model actually saw. Words are
rebuilt from the vocabulary's SentencePiece pieces: a piece starting with
"▁" starts a word, a piece without letters or digits (punctuation, control
ids, ids past the vocabulary) separates words and is never counted, and
matching is case-insensitive (a word is its case-folded text, hashed).

The support of a summary S by a document D (words, punctuation dropped; the
task prefix "summarize:" is not part of D) is the mean of three terms, each
in [0, 1]:

* unigram: of S's content words (not in `STOPWORDS`), the fraction D
  contains, counts clipped by D's counts (a word said twice needs two
  mentions) and entity-like words (a digit, or a capital first letter)
  weighted `entity_weight`;
* skip-bigram: for each pair of adjacent words of S, 1 if D has them
  adjacent, `skip_decay ** (g - 1)` if D has the second g <= `max_gap` words
  after the first (a deletion in between), else 0 (reversed, far apart or
  absent);
* trigram: the fraction of S's word trigrams in D, counts clipped.

A term with nothing to count (no content word, fewer than 2 or 3 words) is
0. The gold reward is `support * min(1, num_words / target_length)`, so an
empty or one-word summary cannot win, and length beyond the target buys
nothing. Repetition gains nothing either: clipping and the n-gram terms
count a repeated word once per mention in D. An empty document supports
nothing: every summary of it scores 0 (no preference).

Designed on the `factual_pairs` training triples only (the terms, the
weights, `target_length`); `python -m dera_t5x.training.gold_reward` prints
how often it prefers the human-labelled faithful summary on every split.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from dera_t5x import batching
from dera_t5x import evaluation
from dera_t5x import models
from dera_t5x.models import protocol
from dera_t5x.training import rewards

Array = jax.Array

# English function words: not content, so not counted by the unigram term.
STOPWORDS = tuple(
    "a an the of to in on at for by with from and or but is are was were be been being has "
    "have had do does did it its this that these those he she they we you i his her their "
    "our your my me him them us as into over after before about than then so not no s".split())
# Piece kinds.
SEPARATOR, WORD_START, WORD_CONTINUES = 0, 1, 2
# Two polynomial string hashes modulo 2**32 (a word is equal when both are).
_HASH_BASES = (1_000_003, 998_244_353)
_MOD = 1 << 32


def _hash(text: str) -> tuple[list[int], list[int]]:
    """(hashes, bases ** len(text)) modulo 2**32 of text's code points, one per base."""
    hashes, powers = [], []
    for base in _HASH_BASES:
        value, power = 0, 1
        for char in text:
            value = (value * base + ord(char) + 1) % _MOD
            power = power * base % _MOD
        hashes.append(value)
        powers.append(power)
    return hashes, powers


def piece_texts(vocabulary: Any) -> list[str | None]:
    """The text of each id of a seqio SentencePiece vocabulary (None: control,
    unknown, unused and extra ids)."""
    processor = vocabulary.tokenizer
    texts: list[str | None] = []
    for i in range(vocabulary.vocab_size):
        if i >= processor.get_piece_size() or processor.is_control(i) or \
                processor.is_unknown(i) or processor.is_unused(i):
            texts.append(None)
        else:
            texts.append(processor.id_to_piece(i))
    return texts


def build_tables(pieces: Sequence[str | None], num_ids: int,
                 prefix_ids: Sequence[int] = ()) -> dict[str, np.ndarray]:
    """The reward's parameters: per-id tables of word structure.

    Args:
      pieces: the SentencePiece text of every id ("▁" marks a word start),
        None for ids that are not text.
      num_ids: ids the model can emit (its embedding rows, >= len(pieces));
        ids past `pieces` are separators.
      prefix_ids: the task prefix's ids ("summarize: "), dropped from the
        start of an input that begins with them.

    Returns:
      `kind` [num_ids] int32 (SEPARATOR / WORD_START / WORD_CONTINUES),
      `hash`, `power` [num_ids, 2] uint32, `capital`, `digit` [num_ids] bool,
      `stopwords` [len(STOPWORDS), 2] uint32, `prefix` [len(prefix_ids)] int32.
    """
    if num_ids < len(pieces):
        raise ValueError(f"num_ids ({num_ids}) must cover the vocabulary's {len(pieces)} "
                         "pieces; pass the model's vocab_size.")
    kind = np.zeros(num_ids, np.int32)
    hashes = np.zeros((num_ids, 2), np.uint32)
    powers = np.ones((num_ids, 2), np.uint32)
    capital = np.zeros(num_ids, bool)
    digit = np.zeros(num_ids, bool)
    for i, piece in enumerate(pieces):
        text = (piece or "").removeprefix("▁")
        if not any(char.isalnum() for char in text):
            continue
        kind[i] = WORD_START if piece.startswith("▁") else WORD_CONTINUES
        hashes[i], powers[i] = _hash(text.casefold())
        capital[i] = text[0].isupper()
        digit[i] = any(char.isdigit() for char in text)
    return {"kind": kind, "hash": hashes, "power": powers, "capital": capital, "digit": digit,
            "stopwords": np.array([_hash(word)[0] for word in STOPWORDS], np.uint32),
            "prefix": np.asarray(prefix_ids, np.int32)}


def _words(tables: Mapping[str, Array], tokens: Array, valid: Array
           ) -> tuple[Array, Array, Array]:
    """The words of one sequence, in order, packed to the front.

    Args:
      tokens: [len] ids; valid: [len] bool (the tokens to read).

    Returns:
      (hash [len, 2] uint32, present [len] bool, entity [len] bool); word k
      is at index k, `present` marks the words that exist.
    """
    kind = jnp.where(valid, tables["kind"][tokens], SEPARATOR)
    in_word = kind != SEPARATOR
    after_separator = jnp.concatenate([jnp.ones(1, bool), ~in_word[:-1]])
    start = in_word & ((kind == WORD_START) | after_separator)
    entity = (tables["capital"][tokens] & start) | (tables["digit"][tokens] & in_word)

    # Prefix by prefix within a word: hash h_t = h_{t-1} * power_t + hash_t and
    # entity e_t = e_{t-1} or entity_t, both restarting at each word start.
    def step(carry, token):
        hash_, is_entity = carry
        restart, power, piece_hash, piece_entity = token
        hash_ = jnp.where(restart, 0, hash_) * power + piece_hash
        is_entity = (is_entity & ~restart) | piece_entity
        return (hash_, is_entity), (hash_, is_entity)

    _, (prefix_hash, prefix_entity) = jax.lax.scan(
        step, (jnp.zeros(2, jnp.uint32), jnp.zeros((), bool)),
        (start | ~in_word, tables["power"][tokens], tables["hash"][tokens], entity))
    ends = in_word & ~jnp.concatenate([in_word[1:] & ~start[1:], jnp.zeros(1, bool)])
    # Each word is complete at its last piece; those positions, in order, first.
    order = jnp.argsort(~ends, stable=True)
    present = jnp.arange(tokens.shape[0]) < jnp.sum(ends)
    return (jnp.where(present[:, None], prefix_hash[order], jnp.uint32(0)), present,
            prefix_entity[order] & present)


def _shifted(matrix: Array, rows: int, cols: int) -> Array:
    """matrix[i + rows, j + cols], False past the end: [n, m] -> [n, m]."""
    return jnp.pad(matrix[rows:, cols:], ((0, rows), (0, cols)))


def _ahead(vector: Array, steps: int) -> Array:
    """vector[i + steps], False past the end: [n] -> [n]."""
    return jnp.pad(vector[steps:], (0, steps))


def _clipped_precision(same_summary: Array, same_document: Array, counted: Array,
                       weight: Array) -> Array:
    """Weighted fraction of counted summary units found in the document, each
    unit's document count clipped by its count in the summary: a scalar."""
    in_summary = jnp.sum(same_summary & counted[None, :], axis=1)
    found = jnp.minimum(1.0, jnp.sum(same_document, axis=1) / jnp.maximum(in_summary, 1))
    weight = weight * counted
    return jnp.sum(weight * found) / jnp.maximum(jnp.sum(weight), 1e-9)


def _terms(tables: Mapping[str, Array], document: Array, document_valid: Array,
           summary: Array, summary_valid: Array, entity_weight: float, skip_decay: float,
           max_gap: int) -> dict[str, Array]:
    """The support terms of one (document, summary): scalars."""
    doc_hash, doc_present, _ = _words(tables, document, document_valid)
    hash_, present, entity = _words(tables, summary, summary_valid)

    def same(a, b, present_a, present_b):
        return (jnp.all(a[:, None] == b[None, :], axis=-1)
                & present_a[:, None] & present_b[None, :])

    in_document = same(hash_, doc_hash, present, doc_present)  # [summary words, doc words]
    in_summary = same(hash_, hash_, present, present)
    stop = jnp.any(jnp.all(hash_[:, None] == tables["stopwords"][None], axis=-1), axis=1)
    unigram = _clipped_precision(in_summary, in_document, present & ~stop,
                                 jnp.where(entity, entity_weight, 1.0))
    # Skip-bigram: words k, k + 1 of the summary at document positions i, i + g.
    pair = _ahead(present, 1)
    best = jnp.zeros(present.shape, jnp.float32)
    for gap in range(1, max_gap + 1):
        found = jnp.any(in_document & _shifted(in_document, 1, gap), axis=1)
        best = jnp.maximum(best, found * skip_decay ** (gap - 1))
    skip_bigram = jnp.sum(best * pair) / jnp.maximum(jnp.sum(pair), 1)
    trigram_present = _ahead(present, 2)

    def trigrams(matrix):
        return matrix & _shifted(matrix, 1, 1) & _shifted(matrix, 2, 2)

    trigram = _clipped_precision(trigrams(in_summary), trigrams(in_document), trigram_present,
                                 jnp.ones(present.shape, jnp.float32))
    return {"unigram": unigram, "skip_bigram": skip_bigram, "trigram": trigram,
            "support": (unigram + skip_bigram + trigram) / 3.0,
            "num_words": jnp.sum(present).astype(jnp.float32)}


def support_terms(tables: Mapping[str, Array], encoder_input_tokens: Array,
                  response_tokens: Array, *, eos_ids: Sequence[int] = (models.EOS_ID,),
                  entity_weight: float = 2.0, skip_decay: float = 0.5, max_gap: int = 3
                  ) -> dict[str, Array]:
    """Every term of the support, per example.

    Args:
      tables: `build_tables`'s arrays.
      encoder_input_tokens: [batch, enc_len] (the task prefix, the document,
        EOS, padding).
      response_tokens: [batch, dec_len] (EOS included, then padding).

    Returns:
      `unigram`, `skip_bigram`, `trigram`, `support` (their mean) and
      `num_words` (of the summary), each [batch] float32.
    """
    tables = {name: jnp.asarray(value) for name, value in tables.items()}
    document_valid = rewards.summary_tokens(encoder_input_tokens, eos_ids) > 0
    prefix = tables["prefix"]
    if prefix.shape[0]:
        starts = jnp.all(encoder_input_tokens[:, :prefix.shape[0]] == prefix, axis=1)
        in_prefix = jnp.arange(encoder_input_tokens.shape[1]) < prefix.shape[0]
        document_valid &= ~(starts[:, None] & in_prefix[None, :])
    summary_valid = rewards.summary_tokens(response_tokens, eos_ids) > 0
    return jax.vmap(lambda *row: _terms(tables, *row, entity_weight, skip_decay, max_gap))(
        encoder_input_tokens, document_valid, response_tokens, summary_valid)


@gin.configurable(denylist=["tables"])
def faithfulness_reward(tables: Mapping[str, Any], *, target_length: float = 8.0,
                        length_guard: bool = True, entity_weight: float = 2.0,
                        skip_decay: float = 0.5, max_gap: int = 3,
                        eos_ids: Sequence[int] = (models.EOS_ID,)) -> rewards.Reward:
    """The gold reward `support * min(1, num_words / target_length)` ('gold'),
    or the support alone without the length guard ('gold_support').

    `target_length` (words) is meant to sit at or below the SFT model's
    median summary length (8 here: the bundled XSum summaries have ~21).
    """
    if not (np.isfinite(target_length) and target_length > 0):
        raise ValueError(f"target_length must be a number of words > 0, got {target_length!r}.")
    if not (0.0 <= skip_decay <= 1.0 and isinstance(max_gap, int) and max_gap >= 1):
        raise ValueError(f"skip_decay must be in [0, 1] and max_gap an integer >= 1, got "
                         f"{skip_decay!r} and {max_gap!r}.")
    if set(tables) != {"kind", "hash", "power", "capital", "digit", "stopwords", "prefix"}:
        raise ValueError("tables must be gold_reward.build_tables(...)'s arrays, got keys "
                         f"{sorted(tables)}.")
    settings = dict(eos_ids=tuple(eos_ids), entity_weight=entity_weight,
                    skip_decay=skip_decay, max_gap=max_gap)

    def apply(params, encoder_input_tokens, response_tokens):
        documents = protocol.repeat_rows(encoder_input_tokens, protocol.rows_per_input(
            encoder_input_tokens, response_tokens))
        terms = support_terms(params, documents, response_tokens, **settings)
        if not length_guard:
            return terms["support"]
        return terms["support"] * jnp.minimum(1.0, terms["num_words"] / target_length)

    params = {name: jnp.asarray(value) for name, value in tables.items()}
    return rewards.Reward(name="gold" if length_guard else "gold_support", apply=apply,
                          params=params)


def pair_scores(score: Callable[[Any, Array, Array], Array], params: Any,
                pairs: Mapping[str, np.ndarray], batch_size: int = 64
                ) -> tuple[np.ndarray, np.ndarray]:
    """(score of chosen, score of rejected), each [n], in batches of one shape.

    Args:
      score: (params, inputs, responses) -> [batch], e.g. a reward's `apply`.
      pairs: `inputs` [n, enc_len], `chosen`, `rejected` [n, dec_len] (a
        preference task's tokens).
    """
    score = jax.jit(score)
    chosen, rejected = [], []
    for batch, mask in batching.eval_batches(
            {name: pairs[name] for name in ("inputs", "chosen", "rejected")}, batch_size):
        chosen.append(np.asarray(score(params, batch["inputs"], batch["chosen"]))[mask])
        rejected.append(np.asarray(score(params, batch["inputs"], batch["rejected"]))[mask])
    return np.concatenate(chosen), np.concatenate(rejected)


def human_agreement(reward: rewards.Reward, pairs: Mapping[str, np.ndarray]) -> float:
    """How often `reward` prefers the chosen (faithful) response of `pairs`
    (as `pair_scores`); ties count 1/2."""
    return evaluation.win_rate(*pair_scores(reward.apply, reward.params, pairs))


def tables_for_task(task_name: str, num_ids: int | None = None) -> dict[str, np.ndarray]:
    """`build_tables` for a registered task's vocabulary and prefix (reads seqio)."""
    from dera_t5x.data import tasks  # noqa: PLC0415  (TensorFlow: the drivers only)
    vocabulary = tasks.get_task(task_name).output_features["inputs"].vocabulary
    return build_tables(piece_texts(vocabulary), num_ids or vocabulary.vocab_size,
                        vocabulary.encode(tasks.PREFIX))


def main() -> None:
    """Prints the agreement with the human labels of `factual_pairs`, per split."""
    from dera_t5x.data import bundled  # noqa: PLC0415
    from dera_t5x.data import pipeline  # noqa: PLC0415
    tables = tables_for_task("factual_pairs")
    scorers = {"gold": faithfulness_reward(tables),
               "support": faithfulness_reward(tables, length_guard=False)}
    print("Agreement with the human labels of factual_pairs (faithful preferred; ties 1/2):")
    print("| split | pairs | gold | support alone | trigram term alone |")
    print("| --- | --- | --- | --- | --- |")
    def trigram_term(params, inputs, responses):
        return support_terms(params, inputs, responses)["trigram"]

    for split in bundled.SPLITS:
        features = pipeline.load_split("factual_pairs", split,
                                       {"inputs": 128, "targets": 64}).features
        pairs = {"inputs": features["encoder_input_tokens"],
                 "chosen": features["chosen_decoder_target_tokens"],
                 "rejected": features["rejected_decoder_target_tokens"]}
        cells = [f"{human_agreement(reward, pairs):.3f}" for reward in scorers.values()]
        trigram = pair_scores(trigram_term, tables, pairs)
        cells.append(f"{evaluation.win_rate(*trigram):.3f}")
        print(f"| {split} | {len(pairs['inputs'])} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
