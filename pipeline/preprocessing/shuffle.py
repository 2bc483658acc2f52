"""The seeded external shuffle of preprocessing: memory bounded by a budget whatever the data size,
disk touched only in large sequential runs.

Every training row gets a 64-bit key, a hash of (seed, sentence id, position); the shuffled order is
the rows sorted by (key, sentence id, position), a seeded random permutation that depends on nothing
else (not on workers, shards or memory). It is built in two passes over train_acts.npy:

    1. each capture shard's rows go, grouped by bucket (the key's top bits), to their bucket's region
       of the file, after the earlier shards' rows of that bucket: one contiguous write per bucket
    2. each bucket region is read whole, sorted by key in memory, and written back in place

With K = 2^b buckets a bucket holds ~1/K of the rows, so memory is ~1/K of the data per worker.
"""

from __future__ import annotations

import math

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64) + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def row_keys(sentence_ids: np.ndarray, positions: np.ndarray, seed: int) -> np.ndarray:
    """[n] uint64 shuffle keys of rows (sentence id, position) under `seed`."""
    with np.errstate(over="ignore"):
        seeded = splitmix64(sentence_ids.astype(np.uint64) ^ splitmix64(np.array([seed & (2**64 - 1)], np.uint64)))
        return splitmix64(seeded ^ positions.astype(np.uint64) * _GOLDEN)


def bucket_bits(n_rows: int, row_bytes: int, memory_bytes: int, workers: int) -> int:
    """log2 of the bucket count that keeps every worker's bucket (rows, index, keys, a sorted copy)
    within its share of the memory budget."""
    need = n_rows * (2 * row_bytes + 2 * 16 + 8) * workers
    return max(0, math.ceil(math.log2(max(1.0, need / max(memory_bytes, 1)))))


def bucket_of(keys: np.ndarray, bits: int) -> np.ndarray:
    """The bucket of each key: its top `bits` bits (0 when there is one bucket)."""
    if bits == 0:
        return np.zeros(len(keys), np.int64)
    return (keys >> np.uint64(64 - bits)).astype(np.int64)


def shuffled_order(keys: np.ndarray, sentence_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The rows' order in the shuffle: by key, ties (a 64-bit collision) by sentence id and position."""
    return np.lexsort((positions, sentence_ids, keys))
