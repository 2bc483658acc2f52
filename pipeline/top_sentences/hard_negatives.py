"""Hard negatives: for each latent, sentences that hold its key token (the token at the peak of most of its top
sentences) and where it never fires. A detection judge that tells activating sentences from silent ones by that
token alone is caught out on them; random silent sentences rarely hold it.

Found in one sequential pass over each rank's code store once the top tables are merged (the key token is known only
then); each rank samples its own sentences, and the samples merge like the top tables.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from pipeline.top_sentences.code_store import CodeStore
from pipeline.top_sentences.tables import SparseSample, pair_key

KEY_TOKEN_RANKS = 20  # a latent's top sentences (max aggregation) whose peak tokens vote for its key token
HARD_NEGATIVE_SALT = 2  # another sample than the random silent one (salt 0) and the activating one (salt 1)


def key_tokens(latent: np.ndarray, peak_token: np.ndarray, n_latents: int) -> np.ndarray:
    """[n_latents] the token at the peak of most of each latent's rows (ties: the lower token id); -1 without rows.

    latent, peak_token [R]: one vote per top row."""
    out = np.full(n_latents, -1, np.int64)
    if not len(latent):
        return out
    pairs, counts = np.unique(np.stack([latent, peak_token], 1).astype(np.int64), axis=0, return_counts=True)
    pairs = pairs[np.lexsort((pairs[:, 1], -counts, pairs[:, 0]))]
    first = np.r_[True, pairs[1:, 0] != pairs[:-1, 0]]
    out[pairs[first, 0]] = pairs[first, 1]
    return out


def find_hard_negatives(
    store: CodeStore, key_token: np.ndarray, n: int, skip_first: int, progress: bool = False
) -> SparseSample:
    """Per latent, a fixed random sample of n stored sentences holding its key token at a counted position (not the
    first skip_first, which the SAE never saw) where the latent is zero on every token."""
    sample = SparseSample(n)
    L = len(key_token)
    with_key = np.flatnonzero(key_token >= 0)
    by_token = with_key[np.argsort(key_token[with_key], kind="stable")]  # latents sorted by their key token
    sorted_tokens = key_token[by_token]
    bar = tqdm(total=store.n, unit="tok", unit_scale=True, desc="hard negatives", disable=not progress)
    for ids, lengths, tokens, widths, values, indices in store.chunks():
        bar.update(len(tokens))
        m = len(ids)
        sentence = np.repeat(np.arange(m), lengths)  # [n] each token's sentence in the chunk
        position = np.arange(len(tokens)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        counted = position >= skip_first
        token, sentence = tokens[counted].astype(np.int64), sentence[counted]
        lo = np.searchsorted(sorted_tokens, token, "left")
        count = np.searchsorted(sorted_tokens, token, "right") - lo  # latents whose key this token is
        total = int(count.sum())
        if not total:
            continue
        # each token expanded to its latents: by_token[lo_i], ..., by_token[lo_i + count_i - 1]
        at = np.repeat(lo - (np.cumsum(count) - count), count) + np.arange(total)
        candidates = np.unique(np.repeat(sentence, count) * L + by_token[at])  # (sentence, latent) pairs
        code_sentence = np.repeat(np.arange(m), lengths * widths)
        fired = values > 0
        fired = np.unique(code_sentence[fired] * L + indices[fired])
        candidates = candidates[~np.isin(candidates, fired, assume_unique=True)]
        latent, sentence_id = candidates % L, ids[candidates // L]
        sample.update(latent, sentence_id, pair_key(sentence_id, latent, HARD_NEGATIVE_SALT))
    bar.close()
    return sample
