"""What a query returns: documents with exact scores, their layer shares and per-token influence.

Plain data, shared by the query engine (`indexes/engine.py`), the reports and the CLI.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import asdict, dataclass, field
from typing import Optional

from influence.queries import Query

LAYER_PATTERN = re.compile(r"(?:layers|h|layer|blocks|block)\.(\d+)\.")


def layer_of(module: str) -> str:
    """'model.layers.3.mlp.up_proj' -> 'layer 3'; modules outside numbered blocks keep their name."""
    match = LAYER_PATTERN.search(module)
    return f"layer {int(match.group(1)):02d}" if match else module


def layer_scores(module_scores: dict[str, float]) -> dict[str, float]:
    layers: dict[str, float] = {}
    for module, score in module_scores.items():
        layers[layer_of(module)] = layers.get(layer_of(module), 0.0) + score
    return dict(sorted(layers.items()))


# tokenizer -> {token id, or a span of up to 4 ids: its text}: a query shows a few thousand tokens, of a vocabulary's most common few
_PIECES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Display text of each token; a character split over several byte tokens goes to its last token."""
    pieces = _PIECES.setdefault(tokenizer, {})
    texts, start = [], 0
    for i in range(len(ids)):
        # a token alone, or the bytes of a character split over a few: decoded once per tokenizer (transformers' decode
        # costs ~15 us a call, and Korean text splits most of its characters)
        key = ids[i] if start == i else tuple(ids[start : i + 1])
        piece = pieces.get(key)
        if piece is None:
            piece = pieces[key] = tokenizer.decode(ids[start : i + 1], skip_special_tokens=False)
        if piece.endswith("\ufffd") and i + 1 < len(ids) and i + 1 - start < 4:
            texts.append("")
            continue
        texts.append(piece)
        start = i + 1
    return texts


@dataclass
class DocumentInfluence:
    """One training sequence's influence on one query."""

    query_id: str
    sign: str                      # "+" most positive, "-" most negative
    rank: int
    seq_id: int
    doc_id: str
    chunk: int
    source: str
    lang: str
    score: float
    module_scores: dict[str, float]
    layer_scores: dict[str, float]
    text: str
    tokens: list[str] = field(default_factory=list)
    token_scores: list[float] = field(default_factory=list)
    sketch_score: Optional[float] = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class QueryResult:
    query: Query
    completion_tokens: list[str]
    documents: list[DocumentInfluence]
    generator: str
    num_candidates: int                # sequences scored exactly (0 when ranked by sketch scores only)
    seconds: dict[str, float]
    exact: bool = True                 # False: scores are sketch estimates, without breakdowns
    refined: int = 0                   # candidates ordered by the index's refine tier (its rows read), both signs
    # signs ("+", "-") whose top k a document the sketch ranked beyond the candidates could plausibly enter: the sketch's
    # noise reaches from the last candidate to the k-th exact score (raise `candidates`, or score exactly). "Plausibly"
    # is the adaptive stop's rule (stop_margin standard deviations): an unflagged sign is not a guarantee
    incomplete: tuple[str, ...] = ()

    @property
    def positive(self) -> list[DocumentInfluence]:
        return [d for d in self.documents if d.sign == "+"]

    @property
    def negative(self) -> list[DocumentInfluence]:
        return [d for d in self.documents if d.sign == "-"]

    def to_dict(self) -> dict:
        return {"query": asdict(self.query), "completion_tokens": self.completion_tokens, "generator": self.generator,
                "num_candidates": self.num_candidates, "seconds": self.seconds, "exact": self.exact,
                "refined": self.refined, "incomplete": list(self.incomplete), "documents": [d.to_dict() for d in self.documents]}
