"""A query's candidates and their exact scores: what the engine's adaptive re-rank reads and fills.

`CandidatePool` holds one query's candidates for one sign, best first, with the index's scores and how far an exact
score may lie from them (a few standard deviations of sketch noise, or the refine tier's bound); `ExactScores` the
exact scores of the (query, sequence) pairs re-ranked so far. `incomplete_signs` says which signs' top k a document
the pool left out could still enter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass
class CandidatePool:
    """One query's candidates for one sign, best first: sequence ids, and for index pools the index's scores (sketch
    or refine tier inner products with q) and their slack: how far an exact score may plausibly (sketch: stop_margin
    standard deviations) or at most (refine tier: a bound) lie from them, which lets the adaptive re-rank stop early."""

    seq_ids: np.ndarray
    scores: Optional[np.ndarray] = None
    slack: Optional[np.ndarray] = None
    bounded: bool = False  # the slack is a bound (refine tier), not a few standard deviations (sketch)
    # a sketch pool shorter than the corpus: how high (in its sign's direction) the exact score of a document the sketch
    # ranked beyond the pool plausibly reaches: the last candidate's sketch score + stop_margin x the median noise
    beyond: Optional[float] = None

    def with_text_candidates(self, seq_ids: np.ndarray, sketch_scores: np.ndarray) -> "CandidatePool":
        """This pool and text retrieval's candidates (best first, with their sketch scores), alternating from the best
        of each; the text's are re-ranked whatever their sketch scores, also those this pool holds already (infinite
        slack: the text gives no bound). The exact scores of all re-ranked sequences are ranked for both signs, so the
        positive pool can carry them."""
        rest = ~np.isin(self.seq_ids, seq_ids)
        ids = np.concatenate([self.seq_ids[rest], seq_ids])
        scores = np.concatenate([self.scores[rest], sketch_scores])
        slack = None if self.slack is None else np.concatenate([self.slack[rest], np.full(len(seq_ids), np.inf)])
        # position i of each list goes to 2i (index) and 2i + 1 (text), the longer list's tail after
        rank = np.concatenate([2 * np.arange(rest.sum()), 2 * np.arange(len(seq_ids)) + 1])
        order = np.argsort(rank, kind="stable")
        return CandidatePool(ids[order], scores[order], None if slack is None else slack[order], self.bounded, self.beyond)

    def first_round(self, direction: float, top_k: int, most: int) -> np.ndarray:
        """The candidates worth an exact score before any is known: all without slack; else, best first, those whose
        score + slack reaches the k-th best score - slack (the top k among them): all of them when the slack is a
        bound (they are few), at most max(top_k, most) when it is the sketch's noise (they can be many)."""
        if self.slack is None or len(self.seq_ids) <= top_k:
            return self.seq_ids
        lower = np.sort(direction * self.scores - self.slack)[-top_k]
        plausible = np.flatnonzero(direction * self.scores + self.slack >= lower)
        return self.seq_ids[plausible if self.bounded else plausible[: max(top_k, most)]]


class ExactScores:
    """Exact scores of the (query, sequence) pairs re-ranked so far: one column per sequence, in the order first scored;
    NaN for a pair not (yet) scored."""

    def __init__(self, num_queries: int, num_modules: int, per_token: bool = False):
        self.order: list[int] = []
        self.column: dict[int, int] = {}
        self.scores = np.zeros((num_queries, 0))                    # (queries, sequences)
        self.per_module = np.zeros((num_modules, num_queries, 0))   # (modules, queries, sequences)
        self.tokens: Optional[list[np.ndarray]] = [] if per_token else None  # by column: (queries, tokens)

    def add(self, seq_ids: np.ndarray, scores: np.ndarray, per_module: np.ndarray, tokens: Optional[list] = None) -> None:
        """Scores of `seq_ids` (queries, n), NaN where a pair was not scored; pairs scored before are kept."""
        new = [int(s) for s in seq_ids if int(s) not in self.column]
        for s in new:
            self.column[s] = len(self.order)
            self.order.append(s)
        nan = lambda shape: np.full(shape, np.nan)  # noqa: E731
        self.scores = np.concatenate([self.scores, nan((self.scores.shape[0], len(new)))], axis=1)
        self.per_module = np.concatenate([self.per_module, nan((*self.per_module.shape[:2], len(new)))], axis=2)
        columns = np.asarray([self.column[int(s)] for s in seq_ids], np.int64)
        fresh = ~np.isnan(scores)  # (queries, n)
        self.scores[:, columns] = np.where(fresh, scores, self.scores[:, columns])
        self.per_module[:, :, columns] = np.where(fresh, per_module, self.per_module[:, :, columns])
        if self.tokens is not None:
            self.tokens.extend([None] * len(new))
            for j, column in enumerate(columns):
                held = self.tokens[column]
                self.tokens[column] = tokens[j] if held is None else np.where(fresh[:, j, None], tokens[j], held)

    def has(self, query: int, seq_ids: np.ndarray) -> np.ndarray:
        """Whether each of `seq_ids` has an exact score for `query`."""
        columns = np.fromiter((self.column.get(int(s), -1) for s in seq_ids), np.int64, len(seq_ids))
        held = columns >= 0
        held[held] = ~np.isnan(self.scores[query, columns[held]])
        return held


def incomplete_signs(pools: tuple[CandidatePool, CandidatePool], exact: np.ndarray, top_k: int,
                     corpus_size: int) -> tuple[str, ...]:
    """The signs whose top k a document outside the candidates could plausibly enter (`CandidatePool.beyond` reaches
    the k-th best exact score of the sign; any reaches when fewer than k were scored). None when the two pools together
    brought every one of the corpus's `corpus_size` sequences to an exact score: a corpus under twice the candidates
    per sign is scanned whole, though each pool alone leaves some of it beyond."""
    if np.count_nonzero(~np.isnan(exact)) >= corpus_size:
        return ()
    signs = []
    for sign, direction, pool in (("+", 1.0, pools[0]), ("-", -1.0, pools[1])):
        if pool.beyond is None:
            continue
        scores = np.sort(direction * exact[~np.isnan(exact)])
        if len(scores) < top_k or pool.beyond >= scores[-top_k]:
            signs.append(sign)
    return tuple(signs)


def refined_count(pools: tuple[CandidatePool, CandidatePool]) -> int:
    return sum(len(pool.seq_ids) for pool in pools if pool.bounded)  # a refine pool holds the candidates whose rows were read
