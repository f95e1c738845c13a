"""How much two rankings of documents agree: across languages of one query, and across model sizes."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def jaccard(a: Sequence, b: Sequence) -> float:
    """|A ∩ B| / |A ∪ B| of two top-k lists (order ignored)."""
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0


def rank_biased_overlap(a: Sequence, b: Sequence, p: float = 0.9) -> float:
    """Rank-biased overlap (Webber et al. 2010) truncated at the lists' depth and normalised so that
    identical lists score 1: sum_d p^(d-1) |A_:d ∩ B_:d| / d, divided by sum_d p^(d-1)."""
    depth = min(len(a), len(b))
    if depth == 0:
        return 1.0
    weights = p ** np.arange(depth)
    agreement = [len(set(a[: d + 1]) & set(b[: d + 1])) / (d + 1) for d in range(depth)]
    return float(np.dot(weights, agreement) / weights.sum())


def crosslingual_ratio(scores_translated: np.ndarray, scores_reference: np.ndarray) -> float:
    """The paper's cross-lingual measure: the influence of the reference query's top documents on the
    translated query, relative to their influence on the reference query (sum over the documents)."""
    reference = float(np.sum(scores_reference))
    return float(np.sum(scores_translated)) / reference if reference != 0 else float("nan")
