"""EK-FAC influence functions for Hugging Face causal language models.

The library half of the engine: model adapters, corpus preparation, EK-FAC factors, exact
influence scores and their per-module / per-token decompositions. It imports neither Ray nor
FAISS; `indexes/` and `jobs/` build on it.
"""

from influence.arguments import CorpusArgs, FactorArgs, IndexArgs, QueryArgs, ScoreArgs
from influence.corpus import load_documents, prepare_corpus, load_sequences
from influence.errors import InfluenceError
from influence.factors import fit_factors, load_factors
from influence.models import load_model, find_tracked_modules
from influence.queries import Query, load_queries
from influence.scores import compute_scores

__all__ = [
    "CorpusArgs",
    "FactorArgs",
    "IndexArgs",
    "QueryArgs",
    "ScoreArgs",
    "InfluenceError",
    "Query",
    "compute_scores",
    "find_tracked_modules",
    "fit_factors",
    "load_documents",
    "load_factors",
    "load_model",
    "load_queries",
    "load_sequences",
    "prepare_corpus",
]
__version__ = "0.1.0"
