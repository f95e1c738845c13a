"""Exact influence scores: query gradients, their preconditioning, and the score stage over a corpus.

score(query, z) = grad L_q^T (F + lambda I)^-1 grad L(z), summed over tracked modules, where L_q is
the completion's negative log-likelihood and L(z) the sequence's summed next-token loss (real labels).
Positive = upweighting z raises log p(completion | prompt). Because G(z) = sum_t s_t a_t^T, the score
splits exactly into modules and into training tokens: token t of z contributes s_t^T P(q) a_t.

The functions are stateless: `query_gradients` and `prepare_queries` turn queries into preconditioned
gradients P(q) once, and `score_batch` scores any batch against them, in the score stage (`compute_scores`,
spread over workers) and in the query engine's re-rank alike.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Collection, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from influence.arguments import ScoreArgs
from influence.artifacts import write_parquet
from influence.corpus import TokenRows, load_sequences, require_fits_context, require_same_tokenizer, shard_rows, token_rows
from influence.errors import InfluenceError
from influence.factors import Factors, load_factors
from influence.gradients import (TokenBatch, capture_module_io, make_token_batch, plan_model_batches, rotated_gradient_blocks,
                                 rotated_gradients, sequence_gradients)
from influence.models import LoadedModel, ModelSpec, describe_model, load_model_context, load_tokenizer, model_identity, require_model_dir
from influence.outputs import check_output_file
from influence.preconditioner import low_rank, rotate, self_influence_from_rotated, unrotate
from influence.queries import Query, TokenizedQuery, tokenize_query
from influence.stage import Executor, Pass, Workspace, run_stage

LOG = logging.getLogger(__name__)

#: one module's preconditioned query gradients: (queries, d_out, d_in), or rank-r factors (left, right)
Prepared = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


def query_gradients(loaded: LoadedModel, queries: Sequence[TokenizedQuery]) -> dict[str, torch.Tensor]:
    """Per-module gradients of each query's completion NLL: {module: (queries, d_out, d_in)}."""
    batch = make_token_batch([q.input_ids for q in queries], [q.completion_start for q in queries], device=loaded.device)
    io, _ = capture_module_io(loaded.model, loaded.modules, batch)
    return {name: sequence_gradients(a, s) for name, (a, s) in io.items()}


def rotated_query_gradients(loaded: LoadedModel, queries: Sequence[TokenizedQuery], factors: Factors) -> dict[str, torch.Tensor]:
    """The same gradients in the EK-FAC eigenbasis, Q_S^T G Q_A: each token's a and s rotated, then multiplied, which for a
    query of a few dozen tokens is several times cheaper than rotating G."""
    batch = make_token_batch([q.input_ids for q in queries], [q.completion_start for q in queries], device=loaded.device)
    io, _ = capture_module_io(loaded.model, loaded.modules, batch)
    rotated = {}
    for name, (a, s) in io.items():
        f = factors.modules[name]
        rotated[name] = rotated_gradients(a.to(f.eigenvalues.dtype), s.to(f.eigenvalues.dtype), f.q_a, f.q_s)
    return rotated


def prepare_rotated_queries(rotated: dict[str, torch.Tensor], factors: Factors, query_rank: Optional[int] = None) -> dict[str, Prepared]:
    """P(q) = Q_S [(Q_S^T G Q_A) / (Lambda + lambda)] Q_A^T from rotated gradients; with `query_rank`, its rank-r factors."""
    prepared = {}
    for name, gradient in rotated.items():
        f = factors.modules[name]
        preconditioned = unrotate(gradient / (f.eigenvalues + f.damping), f)  # (q, d_out, d_in)
        prepared[name] = low_rank(preconditioned, query_rank) if query_rank else preconditioned
    return prepared


def prepare_queries(gradients: dict[str, torch.Tensor], factors: Factors, query_rank: Optional[int] = None) -> dict[str, Prepared]:
    """P(q) = (F + lambda I)^-1 grad L_q per module, from gradients in the original basis."""
    rotated = {name: rotate(g.to(factors.modules[name].eigenvalues.dtype), factors.modules[name]) for name, g in gradients.items()}
    return prepare_rotated_queries(rotated, factors, query_rank)


@dataclass
class BatchScores:
    """Scores of a batch of training sequences against prepared queries."""

    total: torch.Tensor                 # (queries, batch)
    per_module: torch.Tensor            # (modules, queries, batch)
    per_token: Optional[torch.Tensor]   # (queries, batch, tokens), zero past each sequence's end
    self_influence: Optional[torch.Tensor]  # (batch,) float64, when asked for


def score_batch(loaded: LoadedModel, prepared: dict[str, Prepared], batch: TokenBatch, per_token: bool = False,
                factors: Optional[Factors] = None, pairs: Optional[Sequence[Collection[int]]] = None) -> BatchScores:
    """Exact scores of `batch` against `prepared` queries; with `factors`, also each sequence's self-influence.

    `pairs` names, per sequence of the batch, the queries to score it against; the other (query, sequence) pairs come
    back NaN (totals, per module and per token). A pair then costs one GEMM per module, through its per-token scores
    (kept with `per_token`), where every pair costs one GEMM per sequence and module plus a small one per query: cheaper
    when each sequence is wanted by one query or two of many, as in a re-rank of several queries' own candidates.
    """
    io, _ = capture_module_io(loaded.model, loaded.modules, batch)
    module_scores, token_scores = [], None
    self_scores = torch.zeros(len(batch.input_ids), dtype=torch.float64) if factors is not None else None
    for name, (a, s) in io.items():
        p = prepared[name]
        dtype = p[0].dtype if isinstance(p, tuple) else p.dtype
        a, s = a.to(dtype), s.to(dtype)
        if pairs is not None and not isinstance(p, tuple):
            contribution = _chosen_token_scores(p, a, s, pairs)
        else:
            contribution = _module_scores(p, a, s, per_token)
        if contribution.dim() == 3:  # per token: (queries, batch, tokens)
            if per_token:
                token_scores = contribution if token_scores is None else token_scores + contribution
            contribution = contribution.sum(-1)
        module_scores.append(contribution)
        if factors is not None:
            # a few rows of the rotated gradients at a time, as the index's sketcher forms them: never the whole
            # (batch, d_out, d_in) tensor
            module = factors.modules[name]
            for rows, block in rotated_gradient_blocks(a, s, module.q_a, module.q_s):
                self_scores += self_influence_from_rotated(block, module, rows).double().cpu()
    per_module = torch.stack(module_scores)  # (modules, queries, batch)
    if pairs is not None:
        unscored = torch.ones(per_module.shape[1:], dtype=torch.bool)  # (queries, batch)
        for j, queries in enumerate(pairs):
            unscored[list(queries), j] = False
        per_module[:, unscored.to(per_module.device)] = float("nan")
        if token_scores is not None:
            token_scores[unscored.to(token_scores.device)] = float("nan")
    return BatchScores(per_module.sum(0), per_module, token_scores, self_scores)


def _module_scores(prepared: Prepared, a: torch.Tensor, s: torch.Tensor, per_token: bool) -> torch.Tensor:
    """<P(q), G(z)> for one module: (queries, batch), or per token (queries, batch, tokens)."""
    if isinstance(prepared, tuple):  # rank-r: P(q) ~ left @ right^T
        left, right = prepared  # (queries, d_out, r), (queries, d_in, r)
        tokens = (torch.einsum("bto,qor->qbtr", s, left) * torch.einsum("bti,qir->qbtr", a, right)).sum(-1)
        return tokens if per_token else tokens.sum(-1)
    if per_token:
        # s_t^T P a_t for every token: (s @ P) * a summed over d_in, one GEMM per query
        return torch.stack([((s @ p) * a).sum(-1) for p in prepared])  # (queries, batch, tokens)
    if prepared.shape[0] == 1:
        # one query: through its per-token scores, never forming the (batch, d_out, d_in) gradients, whose memory
        # traffic made this 15% (32 tokens) to 40% (64 tokens) slower on SmolLM2's MLPs; from two queries on, the
        # gradients formed once serve them all and the GEMMs below win
        return ((s @ prepared[0]) * a).sum(dim=(-1, -2))[None]
    # each sequence's gradient formed once serves every query, a few output rows at a time (on a CPU): each block is
    # still in the cache when the queries' GEMM reads it; formed whole, their memory traffic made this part of a scan
    # 1.9x slower on SmolLM2 and 1.4x on Gemma 3 (three queries; README, "What an exact scan costs"). One GEMM per
    # block: torch.einsum takes a batched path here, twice as slow on CPU
    scores = torch.zeros(prepared.shape[0], a.shape[0], dtype=a.dtype, device=a.device)
    for rows, block in rotated_gradient_blocks(a, s, None, None):
        scores += prepared[:, rows].flatten(1) @ block.flatten(1).T
    return scores


def _chosen_token_scores(prepared: torch.Tensor, a: torch.Tensor, s: torch.Tensor, pairs: Sequence[Collection[int]]) -> torch.Tensor:
    """s_t^T P a_t (queries, batch, tokens) for the (query, sequence) pairs of `pairs` only, zero elsewhere.

    One GEMM per query and run of consecutive sequences that want it: a run is a view, where gathering a query's rows
    would copy them (callers order a batch by query, so each query's sequences are mostly one run)."""
    out = torch.zeros(prepared.shape[0], *a.shape[:2], dtype=a.dtype, device=a.device)
    for qi, p in enumerate(prepared):
        rows = [j for j, wanted in enumerate(pairs) if qi in wanted]
        for start, stop in _runs(rows):
            out[qi, start:stop] = ((s[start:stop] @ p) * a[start:stop]).sum(-1)
    return out


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """Sorted distinct integers as half-open runs of consecutive ones: [0, 1, 2, 5] -> [(0, 3), (5, 6)]."""
    runs: list[tuple[int, int]] = []
    for row in rows:
        if runs and runs[-1][1] == row:
            runs[-1] = (runs[-1][0], row + 1)
        else:
            runs.append((row, row + 1))
    return runs


@dataclass
class ScoreResult:
    query_ids: list[str]
    seq_ids: np.ndarray                  # (n,)
    scores: np.ndarray                   # (queries, n)
    per_module: Optional[np.ndarray]     # (modules, queries, n)
    per_token: Optional[list]            # [n] arrays (queries, tokens_n)
    self_influence: Optional[np.ndarray]  # (n,), when asked for
    modules: list[str]

    def to_table(self, sequences: Optional[pa.Table] = None) -> pa.Table:
        """Long format: one row per (query, sequence), with the breakdowns as list columns."""
        q, n = self.scores.shape
        columns = {
            "query_id": np.repeat(np.asarray(self.query_ids, dtype=object), n),
            "seq_id": np.tile(self.seq_ids, q),
            "score": self.scores.reshape(-1),
        }
        if self.self_influence is not None:
            columns["self_influence"] = np.tile(self.self_influence, q)
        if sequences is not None:
            for name in ("doc_id", "source", "lang"):
                columns[name] = np.tile(sequences[name].to_numpy(zero_copy_only=False)[self.seq_ids], q)
        table = pa.table(columns)
        if self.per_module is not None:
            per_module = self.per_module.transpose(1, 2, 0).reshape(q * n, -1)  # (rows, modules)
            table = table.append_column("module_scores", pa.array(list(per_module), pa.list_(pa.float64())))
        if self.per_token is not None:
            tokens = [self.per_token[j][i].tolist() for i in range(q) for j in range(n)]
            table = table.append_column("token_scores", pa.array(tokens, pa.list_(pa.float64())))
        return table.replace_schema_metadata({"modules": ",".join(self.modules)})


@dataclass(frozen=True)
class ScoreWork:
    """What every task of the score stage shares: the model to load, the factors and the tokenized queries."""

    spec: ModelSpec
    factors: Factors
    queries: tuple[TokenizedQuery, ...]
    args: ScoreArgs
    key: tuple


def _prepared(workspace: Workspace, work: ScoreWork) -> tuple[LoadedModel, dict[str, Prepared], Factors]:
    loaded = workspace.get(("model", work.spec), partial(load_model_context, work.spec))
    factors = workspace.get(("factors", work.key), lambda: work.factors.to(work.args.compute_dtype, work.spec.device))
    prepared = workspace.get(("prepared", work.key), lambda: prepare_rotated_queries(
        rotated_query_gradients(loaded, work.queries, factors), factors, work.args.query_rank))
    return loaded, prepared, factors


def score_work(workspace: Workspace, work: ScoreWork, rows: TokenRows) -> dict:
    """Scores of some rows against the queries, in row order: totals, per module, per token, self-influence."""
    loaded, prepared, factors = _prepared(workspace, work)
    n, q = len(rows), len(work.queries)
    totals, per_module = np.zeros((q, n)), np.zeros((len(loaded.modules), q, n))
    self_influence, tokens = np.zeros(n) if work.args.self_influence else None, [None] * n
    for positions in plan_model_batches(rows.lengths, work.args.batch_tokens, loaded.modules):
        batch = make_token_batch([rows.sequence(i) for i in positions], device=work.spec.device)
        result = score_batch(loaded, prepared, batch, work.args.per_token, factors if work.args.self_influence else None)
        totals[:, positions] = result.total.double().cpu().numpy()
        per_module[:, :, positions] = result.per_module.double().cpu().numpy()
        if self_influence is not None:
            self_influence[positions] = result.self_influence.numpy()
        if result.per_token is not None:
            lengths = batch.attention_mask.sum(1).tolist()
            for j, i in enumerate(positions):
                tokens[i] = result.per_token[:, j, : lengths[j]].double().cpu().numpy()
    return {"seq_ids": rows.seq_ids, "scores": totals, "per_module": per_module, "self_influence": self_influence,
            "per_token": tokens if work.args.per_token else None}


def compute_scores(model_dir: Path | str, factors_dir: Path | str, corpus_dir: Path | str, queries: Sequence[Query],
                   args: ScoreArgs = ScoreArgs(), out_path: Path | str | None = None, executor: Optional[Executor] = None,
                   rows: Optional[range] = None) -> ScoreResult:
    """Score every training sequence (or those in `rows`) against every query in one pass over the corpus.

    The corpus may differ from the one the factors were fitted on (e.g. a fit on a sample), if it was cut by the same
    tokenizer. Writes a Parquet table (query_id, seq_id, doc_id, source, lang, score, breakdowns, and self_influence
    with `args.self_influence`) to `out_path` when given.
    """
    model_dir, corpus_dir = require_model_dir(model_dir), Path(corpus_dir).resolve()
    if out_path is not None:
        check_score_output(Path(out_path), {"model": model_dir, "factors": Path(factors_dir), "corpus": corpus_dir})
    identity = model_identity(model_dir)
    factors = load_factors(factors_dir, identity.fingerprint)
    info = describe_model(model_dir, factors.manifest["args"]["module_pattern"])
    if info.module_names != factors.manifest["modules"]:
        raise InfluenceError(f"tracked modules mismatch: {factors_dir} was fitted on {factors.manifest['modules'][:3]}... but "
                             f"{model_dir} gives {info.module_names[:3]}...; re-fit the factors with the same module pattern")
    sequences, corpus_manifest = load_sequences(corpus_dir)
    require_same_tokenizer(corpus_manifest, model_dir, corpus_dir)
    require_fits_context(sequences, info.context, corpus_dir)
    tokenizer = load_tokenizer(model_dir)
    tokenized = tuple(tokenize_query(q, tokenizer, info.context) for q in queries)
    if len({q.query_id for q in queries}) != len(queries):
        raise InfluenceError("query ids must be unique within a batch of queries")
    rows = rows if rows is not None else range(sequences.num_rows)
    num_shards = max(1, min(2 * getattr(executor, "workers", 1), len(rows)))  # two per worker: a slow one delays less
    shards = [range(rows.start + r.start, rows.start + r.stop) for r in (shard_rows(len(rows), k, num_shards) for k in range(num_shards))]
    spec = ModelSpec(str(model_dir), args.dtype, args.device, factors.manifest["args"]["module_pattern"], identity.quick)
    queries_key = tuple((tuple(q.input_ids), q.completion_start) for q in tokenized)
    work = ScoreWork(spec, factors, tokenized, args, (factors.fingerprint, queries_key, args.query_rank, args.dtype, args.device))
    parts: dict[int, dict] = {}
    step = Pass("score", list(range(len(shards))), score_work, save=parts.__setitem__, payload=lambda k: token_rows(sequences, shards[k]),
                shared=work, shared_key=("score", work.key, spec), sizes=[len(r) for r in shards])
    run_stage("score", [step], executor, args.progress)
    ordered = [parts[k] for k in range(len(shards))]
    result = ScoreResult(
        query_ids=[q.query_id for q in queries], seq_ids=np.concatenate([p["seq_ids"] for p in ordered]),
        scores=np.concatenate([p["scores"] for p in ordered], axis=1),
        per_module=np.concatenate([p["per_module"] for p in ordered], axis=2) if args.per_module else None,
        per_token=[t for p in ordered for t in p["per_token"]] if args.per_token else None,
        self_influence=np.concatenate([p["self_influence"] for p in ordered]) if args.self_influence else None,
        modules=info.module_names,
    )
    if out_path is not None:
        write_parquet(Path(out_path), result.to_table(sequences))
    return result


def check_score_output(out_path: Path, inputs: dict) -> Path:
    """The score table is one file: a .parquet path that is not an input or inside an artifact, not an existing
    directory, and replaces only an earlier score table (`outputs.check_output_file`)."""
    def is_scores_table(path: Path) -> bool:
        try:
            return {"query_id", "seq_id", "score"} <= set(pq.read_schema(path).names)
        except Exception:  # not Parquet at all: not a score table either
            return False

    return check_output_file(Path(out_path), "score", ".parquet", inputs, is_scores_table, "a scores table")
