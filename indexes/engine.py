"""The query engine: one backward pass, a candidate search, an exact EK-FAC re-rank with breakdowns.

`QueryEngine` loads the model, factors, sketch store (or FAISS index), doc table and sequences once; every call to
`query` shares them. Candidates come from the sketches (default: the highest and the lowest inner products with q,
so both signs are found), from BM25 over the sequences' text (the paper's TF-IDF baseline), or from a full scan.
Candidates are then scored exactly, index candidates best-first, stopping a sign once the sketch noise rules out
the rest (`QueryArgs.adaptive`), since the forward and backward pass of each candidate is most of a query's time.
Per-token scores come with the re-rank for a single query (they cost what its totals do); for several queries at
once, which share one gradient per candidate, they are computed only for the documents returned.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from indexes.constants import NO_FACTORY
from indexes.search import search_both_signs, tiered_both_signs
from indexes.store import load_doc_table, load_index, load_sketch_store
from influence.arguments import QueryArgs
from influence.artifacts import read_manifest, require_same, resolve_reference
from influence.corpus import load_sequences, require_same_tokenizer
from influence.errors import InfluenceError
from influence.explain import DocumentInfluence, QueryResult, layer_scores, token_texts
from influence.factors import load_factors
from influence.gradients import make_token_batch, plan_batches
from influence.models import ModelSpec, context_length, load_model_context, load_tokenizer, model_identity, require_model_dir
from influence.queries import Query, tokenize_query
from influence.scores import Prepared, prepare_rotated_queries, rotated_query_gradients, score_batch
from influence.sketches import Sketcher

LOG = logging.getLogger(__name__)


class QueryEngine:
    """Everything a query needs, loaded once per process. Thread-safe: the model runs one query batch at a time."""

    def __init__(self, index_dir: Path | str, args: QueryArgs = QueryArgs(), model_dir: Path | str | None = None,
                 factors_dir: Path | str | None = None, corpus_dir: Path | str | None = None):
        start = time.perf_counter()
        self.index_dir, self.args = Path(index_dir).resolve(), args
        manifest = read_manifest(self.index_dir, "index")
        self.manifest = manifest
        self.model_dir = require_model_dir(model_dir or resolve_reference(manifest, "model_dir", self.index_dir))
        self.factors_dir = Path(factors_dir or resolve_reference(manifest, "factors_dir", self.index_dir))
        self.corpus_dir = Path(corpus_dir or resolve_reference(manifest, "corpus_dir", self.index_dir))
        identity = model_identity(self.model_dir)
        require_same("model", manifest["model_fingerprint"], identity.fingerprint, self.index_dir,
                     "query with the model the index was built from (--model)")
        factors = load_factors(self.factors_dir, identity.fingerprint)
        require_same("factors", manifest["factors_fingerprint"], factors.fingerprint, self.index_dir,
                     "pass the factors directory the index was built from (--factors)")
        self.sequences, corpus_manifest = load_sequences(self.corpus_dir)
        require_same("corpus", manifest["corpus_fingerprint"], corpus_manifest["corpus_fingerprint"], self.index_dir,
                     "pass the corpus directory the index was built from")
        require_same_tokenizer(corpus_manifest, self.model_dir, self.corpus_dir)
        spec = ModelSpec(str(self.model_dir), args.dtype, args.device, factors.manifest["args"]["module_pattern"], identity.quick)
        self.loaded = load_model_context(spec)
        self.module_names = [m.name for m in self.loaded.modules]
        require_same("tracked modules", manifest["modules"], self.module_names, self.index_dir, "rebuild the index")
        self.tokenizer = load_tokenizer(self.model_dir)
        self.context = context_length(self.loaded.model)
        self.factors = factors.to(args.compute_dtype, args.device)
        self.sketcher = Sketcher(self.factors, self.module_names, manifest["sketch_dim"], manifest["args"]["seed"])
        self.store = load_sketch_store(self.index_dir)
        self.first_tier = None if manifest.get("first_tier", NO_FACTORY) == NO_FACTORY else load_index(self.index_dir)
        self.docs = load_doc_table(self.index_dir)
        self.seq_ids = self.docs["seq_id"].to_numpy()
        self.index_ids = np.full(self.sequences.num_rows, -1, np.int64)  # seq_id -> row of the store
        self.index_ids[self.seq_ids] = np.arange(len(self.seq_ids))
        self.document_norms = np.sqrt(np.maximum(self.docs["self_influence"].to_numpy(), 0.0))  # ||W(z)||, by index id
        if self.store.ntotal != len(self.seq_ids) or self.store.d != self.sketcher.dim:
            raise InfluenceError(f"{self.index_dir}: the store holds {self.store.ntotal} sketches of dim {self.store.d} but the doc "
                                 f"table has {len(self.seq_ids)} rows and the sketch dim is {self.sketcher.dim}; rebuild the index")
        self.input_ids = self.sequences["input_ids"]
        self._bm25 = None
        self._lock = threading.Lock()
        LOG.info("query engine loaded from %s in %.2fs", self.index_dir, time.perf_counter() - start)

    def _check_args(self, args: QueryArgs) -> QueryArgs:
        if (args.dtype, args.device) != (self.args.dtype, self.args.device):
            raise InfluenceError(f"this engine loaded the model as {self.args.dtype} on {self.args.device}; a query cannot change "
                                 f"that (asked: {args.dtype} on {args.device}): create a QueryEngine with those settings")
        return args

    def query(self, queries: Sequence[Query], args: Optional[QueryArgs] = None) -> list[QueryResult]:
        """The most positively and most negatively influential sequences for each query, exactly scored."""
        args = self._check_args(args or self.args)
        with self._lock:
            return self._query(list(queries), args)

    def score_documents(self, queries: Sequence[Query], seq_ids: Sequence[int]) -> np.ndarray:
        """Exact scores (queries, len(seq_ids)) of given sequences, e.g. one query's top documents on its translations."""
        with self._lock:
            prepared = prepare_rotated_queries(rotated_query_gradients(self.loaded, self._tokenize(list(queries)), self.factors),
                                               self.factors)
            scores, _, _ = self._score(prepared, np.asarray(seq_ids, dtype=np.int64), False, self.args.batch_tokens)
        return scores

    def _tokenize(self, queries: list[Query]):
        if len({q.query_id for q in queries}) != len(queries):
            raise InfluenceError("query ids must be unique within a batch of queries")
        return [tokenize_query(q, self.tokenizer, self.context) for q in queries]

    def _query(self, queries: list[Query], args: QueryArgs) -> list[QueryResult]:
        seconds: dict[str, float] = {}
        tick = time.perf_counter()
        tokenized = self._tokenize(queries)
        rotated = rotated_query_gradients(self.loaded, tokenized, self.factors)
        prepared = prepare_rotated_queries(rotated, self.factors) if args.rerank else None
        seconds["gradient"] = time.perf_counter() - tick

        tick = time.perf_counter()
        sketches, query_norms = self.sketcher.sketch_rotated(rotated)  # (queries, dim), (queries,)
        pools = self._candidates(queries, sketches.numpy(), query_norms, args)
        seconds["search"] = time.perf_counter() - tick

        if not args.rerank:
            seconds["total"] = sum(seconds.values())
            return [self._sketch_result(query, pools[qi], tokenized[qi], args, seconds) for qi, query in enumerate(queries)]

        tick = time.perf_counter()
        scored = self._rerank(prepared, pools, args)
        seconds["rerank"] = time.perf_counter() - tick

        tick = time.perf_counter()
        union = np.fromiter(scored.order, np.int64, len(scored.order))
        chosen = []  # per query and sign: the columns of the returned documents
        for qi in range(len(queries)):
            for sign in (1.0, -1.0):
                # every re-ranked sequence has an exact score: rank them all, whichever pool brought them in; a list
                # holds only scores of its sign (a corpus smaller than 2 x top_k must not list a positive as negative)
                columns = np.argsort(-sign * scored.scores[qi], kind="stable")[: args.top_k]
                chosen.append(columns[sign * scored.scores[qi, columns] > 0])
        token_scores = {}
        if args.per_token:
            returned = np.unique(np.concatenate(chosen)).astype(np.int64)
            if scored.tokens is not None:  # kept from the re-rank
                token_scores = {int(col): scored.tokens[int(col)] for col in returned}
            else:
                _, _, per_token = self._score(prepared, union[returned], True, args.batch_tokens)
                token_scores = dict(zip(returned.tolist(), per_token))
        seconds["tokens"] = time.perf_counter() - tick
        seconds["total"] = sum(seconds.values())

        results = []
        for qi, query in enumerate(queries):
            documents = []
            for sign, columns in zip("+-", chosen[2 * qi : 2 * qi + 2]):
                estimates = self._sketch_scores(sketches[qi].numpy(), union[columns])
                for rank, (col, estimate) in enumerate(zip(columns, estimates), start=1):
                    seq_id = int(union[col])
                    tokens = token_scores[int(col)][qi] if int(col) in token_scores else None
                    documents.append(self._document(query, sign, rank, seq_id, scored.scores[qi, col], scored.per_module[:, qi, col],
                                                    tokens, float(estimate)))
            completion = token_texts(self.tokenizer, tokenized[qi].completion_ids)
            results.append(QueryResult(query, completion, documents, args.generator, len(union), dict(seconds)))
        return results

    def _sketch_scores(self, sketch: np.ndarray, seq_ids: np.ndarray) -> np.ndarray:
        """The sketch estimates of some sequences' scores, read from the store (for every document returned, whichever
        generator or query's pool brought it in)."""
        rows = self.index_ids[seq_ids]
        return self.store.decode(rows) @ sketch

    def _sketch_result(self, query: Query, pools, tokenized, args: QueryArgs, seconds: dict) -> QueryResult:
        """The top sketch scores of each sign as they come from the index: estimates, no exact scores or breakdowns."""
        documents = []
        for sign, pool in zip("+-", pools):
            direction = 1.0 if sign == "+" else -1.0
            kept = [(s, v) for s, v in zip(pool.seq_ids[: args.top_k], pool.sketch_scores[: args.top_k]) if direction * v > 0]
            for rank, (seq_id, score) in enumerate(kept, start=1):
                documents.append(self._document(query, sign, rank, int(seq_id), float(score), [], None, float(score)))
        completion = token_texts(self.tokenizer, tokenized.completion_ids)
        return QueryResult(query, completion, documents, args.generator, 0, dict(seconds), exact=False)

    def _candidates(self, queries, sketches: np.ndarray, query_norms: np.ndarray, args) -> list[tuple["CandidatePool", "CandidatePool"]]:
        """Per query: (positive, negative) candidate pools, best first, with sketch scores and noise where known."""
        n = len(self.seq_ids)
        depth = min(args.candidates if args.rerank else args.top_k, n)
        if args.generator == "exact":
            return [(CandidatePool(self.seq_ids),) * 2 for _ in queries]
        if args.generator == "bm25":
            return [(CandidatePool(ids),) * 2 for ids in self._bm25_candidates(queries, depth)]
        if self.first_tier is None:
            (top_scores, top_ids), (low_scores, low_ids) = search_both_signs(self.store, sketches, depth)
        else:
            (top_scores, top_ids), (low_scores, low_ids) = tiered_both_signs(self.first_tier, self.store, sketches, depth,
                                                                             args.first_tier_depth, nprobe=args.nprobe)
        adaptive = args.rerank and args.adaptive
        sketch_norms = np.linalg.norm(sketches, axis=1)
        pools = []
        for qi in range(len(queries)):
            pair = []
            for ids, scores in ((top_ids[qi], top_scores[qi]), (low_ids[qi], low_scores[qi])):
                found = ids >= 0
                ids, scores = ids[found], scores[found].astype(np.float64)
                noise = None
                if adaptive:  # the count sketch's noise and the store's 4-bit rounding, independent
                    noise = np.hypot(self.sketcher.noise_scale(query_norms[qi], self.document_norms[ids]),
                                     self.store.rounding_noise(sketch_norms[qi], ids))
                pair.append(CandidatePool(self.seq_ids[ids], scores, noise))
            pools.append(tuple(pair))
        return pools

    def _rerank(self, prepared, pools: list[tuple["CandidatePool", "CandidatePool"]], args: QueryArgs) -> "ExactScores":
        """Exact scores of the candidates, in rounds of the best unscored candidates of every open (query, sign),
        each round twice as deep as the one before.

        A (query, sign) closes when its pool is exhausted or, for adaptive pools, when even the most
        hopeful remaining candidate (sketch score + stop_margin x noise, in that sign's direction) falls
        below its k-th best exact score so far; every exactly scored sequence counts, whichever pool
        brought it in.
        """
        # One query: its per-token scores cost what its totals do (one GEMM per sequence and module either way), so the
        # re-rank keeps them and the returned documents need no second forward and backward pass. Several queries
        # share one gradient per sequence for their totals, and per-token scores would cost a GEMM per query. A full
        # scan (`exact`) would keep every sequence's per-token scores in memory: only the returned ones are kept.
        per_token = args.per_token and len(pools) == 1 and args.generator != "exact"
        scored = ExactScores(len(pools), len(self.module_names), per_token)
        cursors = {(qi, sign): 0 for qi in range(len(pools)) for sign in (0, 1)}
        step = max(args.top_k, 8)
        while cursors:
            wanted = []
            for (qi, sign), cursor in cursors.items():
                pool = pools[qi][sign]
                end = len(pool.seq_ids) if pool.noise is None else cursor + step
                wanted.append(pool.seq_ids[cursor:end])
                cursors[(qi, sign)] = min(end, len(pool.seq_ids))
            new = [s for s in dict.fromkeys(int(s) for s in np.concatenate(wanted)) if s not in scored.column]
            if new:
                scores, per_module, tokens = self._score(prepared, np.asarray(new, np.int64), per_token, args.batch_tokens)
                scored.add(np.asarray(new, np.int64), scores, per_module, tokens)
            step *= 2  # few rounds: each costs a partly filled batch per (query, sign)
            for (qi, sign), cursor in list(cursors.items()):
                pool = pools[qi][sign]
                if cursor >= len(pool.seq_ids) or pool.noise is None:
                    del cursors[(qi, sign)]
                    continue
                direction = 1.0 if sign == 0 else -1.0
                exact = np.sort(direction * scored.scores[qi])
                if len(exact) < args.top_k:
                    continue
                hopeful = direction * pool.sketch_scores[cursor:] + args.stop_margin * pool.noise[cursor:]
                if hopeful.max() < exact[-args.top_k]:
                    del cursors[(qi, sign)]
        return scored

    def _bm25_candidates(self, queries: list[Query], depth: int) -> list[np.ndarray]:
        try:
            import bm25s
        except ImportError as exc:
            raise InfluenceError("the bm25 generator needs the bm25s package; pip install -e \".[bm25]\" (or use --generator index)") from exc
        if self._bm25 is None:
            retriever = bm25s.BM25()
            retriever.index(bm25s.tokenize(self.sequences["text"].to_pylist(), show_progress=False), show_progress=False)
            self._bm25 = retriever
        texts = [f"{q.prompt} {q.completion}" for q in queries]
        ids, _ = self._bm25.retrieve(bm25s.tokenize(texts, show_progress=False), k=depth, show_progress=False)
        return [self.sequences["seq_id"].to_numpy()[row] for row in ids]

    def _score(self, prepared: dict[str, Prepared], seq_ids: np.ndarray, per_token: bool, batch_tokens: int):
        """Exact scores of the given sequences: (queries, n), (modules, queries, n), and per token a list of (queries, tokens)."""
        sequences = [self.input_ids[int(s)].as_py() for s in seq_ids]
        num_queries = next(iter(prepared.values()))
        num_queries = (num_queries[0] if isinstance(num_queries, tuple) else num_queries).shape[0]
        scores, per_module = np.zeros((num_queries, len(seq_ids))), np.zeros((len(self.module_names), num_queries, len(seq_ids)))
        tokens: list = [None] * len(seq_ids)
        for positions in plan_batches([len(ids) for ids in sequences], batch_tokens):
            batch = make_token_batch([sequences[i] for i in positions], device=self.args.device)
            result = score_batch(self.loaded, prepared, batch, per_token)
            scores[:, positions] = result.total.double().cpu().numpy()
            per_module[:, :, positions] = result.per_module.double().cpu().numpy()
            if per_token:
                for j, i in enumerate(positions):
                    tokens[i] = result.per_token[:, j, : len(sequences[i])].double().cpu().numpy()
        return scores, per_module, (tokens if per_token else None)

    def _document(self, query, sign, rank, seq_id, score, module_scores, token_scores, sketch_score) -> DocumentInfluence:
        row = self.sequences.slice(seq_id, 1).to_pylist()[0]
        by_module = {name: float(v) for name, v in zip(self.module_names, module_scores)}
        return DocumentInfluence(
            query_id=query.query_id, sign=sign, rank=rank, seq_id=seq_id, doc_id=row["doc_id"], chunk=row["chunk"],
            source=row["source"], lang=row["lang"], score=float(score), module_scores=by_module, layer_scores=layer_scores(by_module),
            text=row["text"], tokens=token_texts(self.tokenizer, row["input_ids"]) if token_scores is not None else [],
            token_scores=[] if token_scores is None else [float(v) for v in token_scores], sketch_score=sketch_score,
        )


@dataclass
class CandidatePool:
    """One query's candidates for one sign, best first: sequence ids, and for index pools the sketch scores
    (inner products with q) and their noise scale, which allow the adaptive re-rank to stop early."""

    seq_ids: np.ndarray
    sketch_scores: Optional[np.ndarray] = None
    noise: Optional[np.ndarray] = None


class ExactScores:
    """Exact scores of the sequences re-ranked so far, one column per sequence in the order scored."""

    def __init__(self, num_queries: int, num_modules: int, per_token: bool = False):
        self.order: list[int] = []
        self.column: dict[int, int] = {}
        self._scores: list[np.ndarray] = []
        self._per_module: list[np.ndarray] = []
        self.tokens: Optional[list[np.ndarray]] = [] if per_token else None  # by column: (queries, tokens)
        self.num_queries, self.num_modules = num_queries, num_modules

    def add(self, seq_ids: np.ndarray, scores: np.ndarray, per_module: np.ndarray, tokens: Optional[list] = None) -> None:
        for s in seq_ids:
            self.column[int(s)] = len(self.order)
            self.order.append(int(s))
        self._scores.append(scores)
        self._per_module.append(per_module)
        if self.tokens is not None:
            self.tokens.extend(tokens)

    @property
    def scores(self) -> np.ndarray:  # (queries, scored)
        return np.concatenate(self._scores, axis=1) if self._scores else np.zeros((self.num_queries, 0))

    @property
    def per_module(self) -> np.ndarray:  # (modules, queries, scored)
        return np.concatenate(self._per_module, axis=2) if self._per_module else np.zeros((self.num_modules, self.num_queries, 0))

