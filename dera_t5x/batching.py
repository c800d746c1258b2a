"""Deterministic, resumable batch iterators over numpy arrays (no TensorFlow).

``train_batches`` is an endless stream over per-epoch permutations drawn from
``(seed, epoch)``; batches run on across epoch boundaries, so every example is
seen once per epoch. Step ``k`` of the stream depends only on (data, batch
size, seed, k): starting at ``start_step=k`` yields exactly the batches an
uninterrupted run sees from step ``k`` on. ``eval_batches`` covers every
example once, in order, in batches of one shape.
"""

from collections.abc import Iterator, Mapping

import numpy as np


def _num_rows(arrays: Mapping[str, np.ndarray]) -> int:
    sizes = {len(v) for v in arrays.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError("arrays must be non-empty and share their first dimension; got "
                         f"{ {k: v.shape for k, v in arrays.items()} }.")
    return sizes.pop()


def _permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def train_batches(arrays: Mapping[str, np.ndarray], batch_size: int, seed: int,
                  start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Endless deterministic training batches, resumable at any step.

    Args:
      arrays: features [num_examples, ...], e.g. ``load_split(...).features``.
      batch_size: examples per batch (may exceed the number of examples).
      seed: non-negative seed of the per-epoch permutations.
      start_step: the first step to yield.

    Yields:
      Dicts of the same keys, each [batch_size, ...].
    """
    if batch_size < 1 or seed < 0 or start_step < 0:
        raise ValueError(f"Need batch_size >= 1, seed >= 0, start_step >= 0; got {batch_size}, "
                         f"{seed}, {start_step}.")
    n = _num_rows(arrays)
    epoch, position = divmod(start_step * batch_size, n)
    order = _permutation(n, seed, epoch)
    while True:
        parts = []
        needed = batch_size
        while needed:
            part = order[position:position + needed]
            parts.append(part)
            needed -= len(part)
            position += len(part)
            if position == n:
                epoch, position = epoch + 1, 0
                order = _permutation(n, seed, epoch)
        indices = np.concatenate(parts)
        yield {key: value[indices] for key, value in arrays.items()}


def eval_batches(arrays: Mapping[str, np.ndarray], batch_size: int
                 ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
    """All examples once, in order, in batches of a fixed shape.

    Args:
      arrays: features [num_examples, ...].
      batch_size: examples per batch.

    Yields:
      ``(batch, mask)``: ``batch`` as in ``train_batches``; the last one is padded
      with all-zero rows, which ``mask`` [batch_size] (bool) marks False.
    """
    if batch_size < 1:
        raise ValueError(f"Need batch_size >= 1; got {batch_size}.")
    n = _num_rows(arrays)
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        batch = {}
        for key, value in arrays.items():
            batch[key] = np.zeros((batch_size, *value.shape[1:]), value.dtype)
            batch[key][:count] = value[start:start + count]
        yield batch, np.arange(batch_size) < count
