"""EK-FAC influence functions for Hugging Face causal language models.

The library half of the engine: model adapters, corpus preparation, EK-FAC factors, exact influence scores and
their per-module / per-token decompositions, sketches, and the stage runner's local executor. It imports neither
Ray nor FAISS; `indexes/` and `jobs/` build on it.
"""

from influence.arguments import CorpusArgs, FactorArgs, IndexArgs, QueryArgs, ScoreArgs
from influence.corpus import load_sequences, prepare_corpus
from influence.documents import load_documents
from influence.errors import InfluenceError
from influence.factors import fit_factors, load_factors
from influence.models import describe_model, find_tracked_modules, load_model, model_identity
from influence.queries import Query, load_queries
from influence.scores import compute_scores
from influence.stage import LocalExecutor, run_stage

__all__ = [
    "CorpusArgs",
    "FactorArgs",
    "IndexArgs",
    "InfluenceError",
    "LocalExecutor",
    "Query",
    "QueryArgs",
    "ScoreArgs",
    "compute_scores",
    "describe_model",
    "find_tracked_modules",
    "fit_factors",
    "load_documents",
    "load_factors",
    "load_model",
    "load_queries",
    "load_sequences",
    "model_identity",
    "prepare_corpus",
    "run_stage",
]
__version__ = "0.2.0"
