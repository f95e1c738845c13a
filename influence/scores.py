"""Exact influence scores: stream the corpus once for a batch of queries.

score(query, z) = grad L_q^T (F + lambda I)^-1 grad L(z), summed over tracked modules, where L_q is
the completion's negative log-likelihood and L(z) the sequence's summed next-token loss (real labels).
Positive = upweighting z raises log p(completion | prompt). Because G(z) = sum_t s_t a_t^T, the score
splits exactly into modules and into training tokens: token t of z contributes s_t^T P(q) a_t.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from influence.arguments import ScoreArgs
from influence.artifacts import require_same, write_parquet
from influence.corpus import iterate_batches, load_sequences, require_fits_context
from influence.errors import InfluenceError
from influence.factors import Factors, load_factors
from influence.gradients import TokenBatch, capture_module_io, make_token_batch, rotated_gradients, sequence_gradients
from influence.models import find_tracked_modules, load_model, load_tokenizer
from influence.preconditioner import low_rank, precondition, self_influence_from_rotated
from influence.queries import Query, TokenizedQuery, context_length, tokenize_query

LOG = logging.getLogger(__name__)


@dataclass
class BatchScores:
    """Scores of a batch of training sequences against the prepared queries."""

    total: torch.Tensor                 # (queries, batch)
    per_module: torch.Tensor            # (modules, queries, batch)
    per_token: Optional[torch.Tensor]   # (queries, batch, tokens), zero past each sequence's end
    self_influence: torch.Tensor        # (batch,) float64; zeros when not requested


class Scorer:
    """A model, its factors and tokenizer loaded once; prepares queries and scores training batches."""

    def __init__(self, model_dir: Path | str, factors_dir: Path | str, args: ScoreArgs = ScoreArgs(), factors: Optional[Factors] = None):
        self.args = args
        self.model = load_model(model_dir, dtype=args.torch_dtype, device=args.device)
        self.tokenizer = load_tokenizer(Path(model_dir))
        factors = factors or load_factors(factors_dir, model_dir)
        self.manifest = factors.manifest
        self.modules = find_tracked_modules(self.model, factors.manifest["args"]["module_pattern"])
        require_same("tracked modules", [m.name for m in self.modules], factors.manifest["modules"], Path(factors_dir),
                     "re-fit the factors with the same module pattern")
        compute_dtype = torch.float64 if args.torch_dtype == torch.float64 else torch.float32
        self.factors = factors.to(compute_dtype, args.device)
        self.prepared: dict[str, object] = {}
        self.query_ids: list[str] = []

    def tokenize(self, queries: Sequence[Query]) -> list[TokenizedQuery]:
        return [tokenize_query(q, self.tokenizer, context_length(self.model)) for q in queries]

    def query_gradients(self, queries: Sequence[TokenizedQuery]) -> dict[str, torch.Tensor]:
        """Per-module gradients of each query's completion NLL: {module: (queries, d_out, d_in)}."""
        batch = make_token_batch([q.input_ids for q in queries], [q.completion_start for q in queries], device=self.args.device)
        io, _ = capture_module_io(self.model, self.modules, batch)
        return {name: sequence_gradients(a, s) for name, (a, s) in io.items()}

    def prepare(self, queries: Sequence[Query], gradients: Optional[dict[str, torch.Tensor]] = None) -> None:
        """Precondition the queries' gradients once; with `query_rank`, keep a rank-r factorisation.

        `gradients` (from `query_gradients`) avoids a second backward pass when the caller has them.
        """
        self.query_ids = [q.query_id for q in queries]
        if len(set(self.query_ids)) != len(self.query_ids):
            raise InfluenceError("query ids must be unique within a batch of queries")
        gradients = gradients if gradients is not None else self.query_gradients(self.tokenize(queries))
        self.prepared = {}
        for name, gradient in gradients.items():
            preconditioned = precondition(gradient, self.factors.modules[name])  # (queries, d_out, d_in)
            rank = self.args.query_rank
            self.prepared[name] = low_rank(preconditioned, rank) if rank else preconditioned

    def score_batch(self, batch: TokenBatch, per_token: Optional[bool] = None, self_influence: bool = True) -> BatchScores:
        if not self.prepared:
            raise InfluenceError("no queries prepared; call prepare(queries) first")
        per_token = self.args.per_token if per_token is None else per_token
        io, _ = capture_module_io(self.model, self.modules, batch)
        module_scores, token_scores, self_scores = [], None, torch.zeros(len(batch.input_ids), dtype=torch.float64)
        for name, (a, s) in io.items():
            factors = self.factors.modules[name]
            contribution = _module_scores(self.prepared[name], a, s, per_token)
            if per_token:
                token_scores = contribution if token_scores is None else token_scores + contribution
                module_scores.append(contribution.sum(-1))
            else:
                module_scores.append(contribution)
            if self_influence:  # the query engine's re-rank does not need it; the index stores it
                rotated = rotated_gradients(a, s, factors.q_a, factors.q_s)
                self_scores = self_scores + self_influence_from_rotated(rotated, factors).double().cpu()
        per_module = torch.stack(module_scores)  # (modules, queries, batch)
        return BatchScores(per_module.sum(0), per_module, token_scores, self_scores)


def _module_scores(prepared, a: torch.Tensor, s: torch.Tensor, per_token: bool) -> torch.Tensor:
    """<P(q), G(z)> for one module: (queries, batch), or per token (queries, batch, tokens)."""
    if isinstance(prepared, tuple):  # rank-r: P(q) ~ left @ right^T
        left, right = prepared  # (queries, d_out, r), (queries, d_in, r)
        tokens = (torch.einsum("bto,qor->qbtr", s, left) * torch.einsum("bti,qir->qbtr", a, right)).sum(-1)
        return tokens if per_token else tokens.sum(-1)
    if per_token:
        return torch.einsum("bto,qoi,bti->qbt", s, prepared, a)
    return torch.einsum("qoi,boi->qb", prepared, sequence_gradients(a, s))


@dataclass
class ScoreResult:
    query_ids: list[str]
    seq_ids: np.ndarray                  # (n,)
    scores: np.ndarray                   # (queries, n)
    per_module: Optional[np.ndarray]     # (modules, queries, n)
    per_token: Optional[list]            # [n] arrays (queries, tokens_n)
    self_influence: np.ndarray           # (n,)
    modules: list[str]

    def to_table(self, sequences: Optional[pa.Table] = None) -> pa.Table:
        """Long format: one row per (query, sequence), with the breakdowns as list columns."""
        q, n = self.scores.shape
        columns = {
            "query_id": np.repeat(np.asarray(self.query_ids, dtype=object), n),
            "seq_id": np.tile(self.seq_ids, q),
            "score": self.scores.reshape(-1),
            "self_influence": np.tile(self.self_influence, q),
        }
        if sequences is not None:
            lookup = {name: sequences[name].to_numpy(zero_copy_only=False) for name in ("doc_id", "source", "lang")}
            for name, values in lookup.items():
                columns[name] = np.tile(values[self.seq_ids], q)
        table = pa.table(columns)
        if self.per_module is not None:
            per_module = self.per_module.transpose(1, 2, 0).reshape(q * n, -1)  # (rows, modules)
            table = table.append_column("module_scores", pa.array(list(per_module), pa.list_(pa.float64())))
        if self.per_token is not None:
            tokens = [self.per_token[j][i].tolist() for i in range(q) for j in range(n)]
            table = table.append_column("token_scores", pa.array(tokens, pa.list_(pa.float64())))
        return table.replace_schema_metadata({"modules": ",".join(self.modules)})


def compute_scores(model_dir: Path | str, factors_dir: Path | str, corpus_dir: Path | str, queries: Sequence[Query],
                   args: ScoreArgs = ScoreArgs(), out_path: Path | str | None = None, scorer: Optional[Scorer] = None,
                   rows: Optional[range] = None) -> ScoreResult:
    """Score every training sequence (or those in `rows`) against every query in one pass over the corpus.

    Writes a Parquet table (query_id, seq_id, doc_id, source, lang, score, self_influence, breakdowns)
    to `out_path` when given.
    """
    start = time.perf_counter()
    scorer = scorer or Scorer(model_dir, factors_dir, args)
    # the scored corpus may differ from the one the factors were fitted on (e.g. fit on a sample)
    sequences, _ = load_sequences(corpus_dir)
    require_fits_context(sequences, scorer.model, corpus_dir)
    scorer.prepare(queries)
    totals, modules, tokens, selfs, seq_ids = [], [], [], [], []
    rows = rows if rows is not None else range(sequences.num_rows)
    num_batches = -(-len(rows) // args.batch_size)
    for ids_batch, ids in tqdm(iterate_batches(sequences, args.batch_size, rows), total=num_batches, desc="score",
                               unit="batch", disable=not args.progress):
        batch = make_token_batch(ids, seq_ids=ids_batch, device=args.device)
        result = scorer.score_batch(batch)
        totals.append(result.total.double().cpu())
        modules.append(result.per_module.double().cpu())
        selfs.append(result.self_influence.double().cpu())
        seq_ids.extend(ids_batch)
        if result.per_token is not None:
            lengths = batch.attention_mask.sum(1).tolist()
            tokens.extend(result.per_token[:, j, : lengths[j]].double().cpu().numpy() for j in range(len(ids)))
    score_result = ScoreResult(
        query_ids=scorer.query_ids, seq_ids=np.asarray(seq_ids, dtype=np.int64),
        scores=torch.cat(totals, dim=1).numpy(), per_module=torch.cat(modules, dim=2).numpy() if args.per_module else None,
        per_token=tokens if args.per_token else None, self_influence=torch.cat(selfs).numpy(), modules=[m.name for m in scorer.modules],
    )
    if out_path is not None:
        write_parquet(Path(out_path), score_result.to_table(sequences))
    LOG.info("scored %d queries x %d sequences in %.1fs", len(queries), len(rows), time.perf_counter() - start)
    return score_result
