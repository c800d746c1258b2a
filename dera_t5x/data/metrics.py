"""Text metrics of the summarization tasks: ROUGE F-measures (rouge-score)."""

from collections.abc import Sequence

from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure x 100 over pairs, with Porter stemming.

    Args:
      predictions: generated summaries.
      references: reference summaries, in the same order.

    Returns:
      ``{"rouge1": ..., "rouge2": ..., "rougeL": ...}``.
    """
    if len(predictions) != len(references):
        raise ValueError(f"rouge got {len(predictions)} predictions but {len(references)} "
                         "references; pass one prediction per reference, in the same order.")
    if not predictions:
        raise ValueError("rouge needs at least one (prediction, reference) pair.")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = {name: 0.0 for name in ROUGE_TYPES}
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(target=reference, prediction=prediction)
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    return {name: 100.0 * total / len(predictions) for name, total in totals.items()}


def rouge_metric(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """``rouge`` with seqio's metric-function signature ``(targets, predictions)``."""
    return rouge(predictions, references=targets)
