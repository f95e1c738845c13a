"""The query engine: one backward pass, a candidate search, an exact EK-FAC re-rank with breakdowns.

`QueryEngine` loads the model, factors, index, doc table and sequences once; every call to `query`
shares them. Candidates come from the FAISS index over sketches (default: the highest and the lowest inner
products with q, so both signs are found), from BM25 over the sequences' text (the paper's TF-IDF
baseline), or from a full scan. Candidates are then scored exactly, with per-module and per-token
decompositions; index candidates best-first, stopping a sign once the sketch noise rules out the rest
(`QueryArgs.adaptive`), since the forward and backward pass of each candidate is most of a query's time.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from indexes.search import search_both_signs
from indexes.store import load_doc_table, load_index
from influence.arguments import QueryArgs, ScoreArgs
from influence.artifacts import read_manifest, require_same
from influence.corpus import load_sequences
from influence.errors import InfluenceError
from influence.explain import DocumentInfluence, QueryResult, layer_scores, token_texts
from influence.gradients import make_token_batch
from influence.queries import Query
from influence.scores import Scorer
from influence.sketches import Sketcher

LOG = logging.getLogger(__name__)


class QueryEngine:
    """Everything a query needs, loaded once per process. Thread-safe: the model runs one query batch at a time."""

    def __init__(self, index_dir: Path | str, args: QueryArgs = QueryArgs(), model_dir: Path | str | None = None,
                 factors_dir: Path | str | None = None, corpus_dir: Path | str | None = None):
        start = time.perf_counter()
        self.index_dir, self.args = Path(index_dir), args
        manifest = read_manifest(self.index_dir, "index")
        self.model_dir = Path(model_dir or manifest["model_dir"])
        self.factors_dir = Path(factors_dir or manifest["factors_dir"])
        self.corpus_dir = Path(corpus_dir or manifest["corpus_dir"])
        score_args = ScoreArgs(dtype=args.dtype, batch_size=args.batch_size, device=args.device, progress=False)
        self.scorer = Scorer(self.model_dir, self.factors_dir, score_args)
        require_same("model", manifest["model_fingerprint"], self.scorer.manifest["model_fingerprint"], self.index_dir,
                     "query with the model and factors the index was built from")
        self.sequences, corpus_manifest = load_sequences(self.corpus_dir)
        require_same("corpus", manifest["corpus_fingerprint"], corpus_manifest["corpus_fingerprint"], self.index_dir,
                     "pass the corpus directory the index was built from")
        index_args = manifest["args"]
        self.sketcher = Sketcher(self.scorer.factors, self.scorer.modules, index_args["sketch_size"], index_args["seed"],
                                 index_args.get("sketch", "kronecker"))
        self.index = load_index(self.index_dir)
        self.docs = load_doc_table(self.index_dir)
        self.seq_ids = self.docs["seq_id"].to_numpy()
        self.document_norms = np.sqrt(np.maximum(self.docs["self_influence"].to_numpy(), 0.0))  # ||W(z)||, by FAISS id
        if self.index.ntotal != len(self.seq_ids) or self.index.d != self.sketcher.dim:
            raise InfluenceError(f"{self.index_dir}: the index holds {self.index.ntotal} vectors of dim {self.index.d} but the doc "
                                 f"table has {len(self.seq_ids)} rows and the sketch dim is {self.sketcher.dim}; rebuild the index")
        self.input_ids = self.sequences["input_ids"]
        self._bm25 = None
        self._lock = threading.Lock()
        LOG.info("query engine loaded from %s in %.2fs", self.index_dir, time.perf_counter() - start)

    def query(self, queries: Sequence[Query], args: Optional[QueryArgs] = None) -> list[QueryResult]:
        """The most positively and most negatively influential sequences for each query, exactly scored."""
        args = args or self.args
        with self._lock:
            return self._query(list(queries), args)

    def score_documents(self, queries: Sequence[Query], seq_ids: Sequence[int]) -> np.ndarray:
        """Exact scores (queries, len(seq_ids)) of given sequences, e.g. one query's top documents on its translations."""
        with self._lock:
            self.scorer.prepare(list(queries))
            scores, _, _ = self._score(np.asarray(seq_ids, dtype=np.int64), per_token=False)
        return scores

    def _query(self, queries: list[Query], args: QueryArgs) -> list[QueryResult]:
        seconds: dict[str, float] = {}
        tick = time.perf_counter()
        tokenized = self.scorer.tokenize(queries)
        gradients = self.scorer.query_gradients(tokenized)
        if args.rerank:
            self.scorer.prepare(queries, gradients)
        seconds["gradient"] = time.perf_counter() - tick

        tick = time.perf_counter()
        pools = self._candidates(queries, gradients, args)
        seconds["search"] = time.perf_counter() - tick

        if not args.rerank:
            return [self._sketch_result(query, qi, pools[qi], tokenized[qi], args, seconds) for qi, query in enumerate(queries)]

        tick = time.perf_counter()
        scored = self._rerank(pools, args)
        seconds["rerank"] = time.perf_counter() - tick
        seconds["total"] = sum(seconds.values())

        union = np.fromiter(scored.order, np.int64, len(scored.order))
        results = []
        for qi, query in enumerate(queries):
            sketch_scores = {int(s): float(v) for pool in pools[qi] if pool.sketch_scores is not None
                             for s, v in zip(pool.seq_ids, pool.sketch_scores)}
            documents = []
            for sign in "+-":
                # every re-ranked sequence has an exact score: rank them all, whichever pool brought them in
                order = np.argsort(-scored.scores[qi] if sign == "+" else scored.scores[qi], kind="stable")
                for rank, col in enumerate(order[: args.top_k], start=1):
                    seq_id = int(union[col])
                    documents.append(self._document(query, qi, sign, rank, seq_id, scored.scores[qi, col], scored.per_module[:, qi, col],
                                                    None if scored.per_token is None else scored.per_token[col][qi], sketch_scores.get(seq_id)))
            completion = token_texts(self.scorer.tokenizer, tokenized[qi].completion_ids)
            results.append(QueryResult(query, completion, documents, args.generator, len(union), dict(seconds)))
        return results

    def _sketch_result(self, query: Query, qi: int, pools, tokenized, args: QueryArgs, seconds: dict) -> QueryResult:
        """The top sketch scores of each sign as they come from the index: estimates, no exact scores or breakdowns."""
        seconds = {**seconds, "rerank": 0.0, "total": sum(seconds.values())}
        documents = []
        for sign, pool in zip("+-", pools):
            for rank, (seq_id, score) in enumerate(zip(pool.seq_ids[: args.top_k], pool.sketch_scores[: args.top_k]), start=1):
                documents.append(self._document(query, qi, sign, rank, int(seq_id), float(score), [], None, float(score)))
        completion = token_texts(self.scorer.tokenizer, tokenized.completion_ids)
        return QueryResult(query, completion, documents, args.generator, 0, seconds, exact=False)

    def _candidates(self, queries, gradients, args) -> list[tuple["CandidatePool", "CandidatePool"]]:
        """Per query: (positive, negative) candidate pools, best first, with sketch scores and noise where known."""
        n = len(self.seq_ids)
        depth = min(args.candidates if args.rerank else args.top_k, n)
        if args.generator == "exact":
            return [(CandidatePool(self.seq_ids),) * 2 for _ in queries]
        if args.generator == "bm25":
            return [(CandidatePool(ids),) * 2 for ids in self._bm25_candidates(queries, depth)]
        sketches, query_norms = self.sketcher.sketch_gradients_with_norms(gradients)  # (queries, dim), (queries,)
        (top_scores, top_ids), (low_scores, low_ids) = search_both_signs(self.index, sketches.numpy(), depth, nprobe=args.nprobe)
        # the sketch noise only bounds random sketches; 'eigen' drops coordinates (a bias, not noise)
        adaptive = args.rerank and args.adaptive and self.sketcher.method != "eigen"
        pools = []
        for qi in range(len(queries)):
            pair = []
            for ids, scores in ((top_ids[qi], top_scores[qi]), (low_ids[qi], low_scores[qi])):
                found = ids >= 0
                ids, scores = ids[found], scores[found].astype(np.float64)
                noise = self.sketcher.noise_scale(query_norms[qi], self.document_norms[ids]) if adaptive else None
                pair.append(CandidatePool(self.seq_ids[ids], scores, noise))
            pools.append(tuple(pair))
        return pools

    def _rerank(self, pools: list[tuple["CandidatePool", "CandidatePool"]], args: QueryArgs) -> "ExactScores":
        """Exact scores of the candidates, in rounds of the best unscored candidates of every open (query, sign),
        each round twice as deep as the one before.

        A (query, sign) closes when its pool is exhausted or, for adaptive pools, when even the most
        hopeful remaining candidate (sketch score + stop_margin x noise, in that sign's direction) falls
        below its k-th best exact score so far; every exactly scored sequence counts, whichever pool
        brought it in.
        """
        scored = ExactScores(len(pools), len(self.scorer.modules), args.per_token)
        cursors = {(qi, sign): 0 for qi in range(len(pools)) for sign in (0, 1)}
        step = max(args.top_k, args.batch_size)
        while cursors:
            wanted = []
            for (qi, sign), cursor in cursors.items():
                pool = pools[qi][sign]
                end = len(pool.seq_ids) if pool.noise is None else cursor + step
                wanted.append(pool.seq_ids[cursor:end])
                cursors[(qi, sign)] = min(end, len(pool.seq_ids))
            new = [s for s in dict.fromkeys(int(s) for s in np.concatenate(wanted)) if s not in scored.column]
            if new:
                scored.add(np.asarray(new, np.int64), *self._score(np.asarray(new, np.int64), args.per_token, args.batch_size))
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
        import bm25s

        if self._bm25 is None:
            retriever = bm25s.BM25()
            retriever.index(bm25s.tokenize(self.sequences["text"].to_pylist(), show_progress=False), show_progress=False)
            self._bm25 = retriever
        texts = [f"{q.prompt} {q.completion}" for q in queries]
        ids, _ = self._bm25.retrieve(bm25s.tokenize(texts, show_progress=False), k=depth, show_progress=False)
        return [self.sequences["seq_id"].to_numpy()[row] for row in ids]

    def _score(self, seq_ids: np.ndarray, per_token: bool, batch_size: Optional[int] = None):
        """Exact scores of the given sequences: (queries, n), (modules, queries, n), per-token list."""
        totals, modules, tokens = [], [], []
        size = batch_size or self.args.batch_size
        sequences = [self.input_ids[int(s)].as_py() for s in seq_ids]
        by_length = np.argsort([len(ids) for ids in sequences], kind="stable")  # batches of similar length pad less
        for start in range(0, len(seq_ids), size):
            ids = [sequences[i] for i in by_length[start : start + size]]
            result = self.scorer.score_batch(make_token_batch(ids, device=self.args.device), per_token=per_token, self_influence=False)
            totals.append(result.total.double().cpu())
            modules.append(result.per_module.double().cpu())
            if per_token:
                tokens.extend(result.per_token[:, j, : len(ids[j])].double().cpu().numpy() for j in range(len(ids)))
        restore = np.argsort(by_length, kind="stable")
        scores, per_module = torch.cat(totals, 1).numpy()[:, restore], torch.cat(modules, 2).numpy()[:, :, restore]
        return scores, per_module, ([tokens[i] for i in restore] if per_token else None)

    def _document(self, query, qi, sign, rank, seq_id, score, module_scores, token_scores, sketch_score) -> DocumentInfluence:
        row = self.sequences.slice(seq_id, 1).to_pylist()[0]
        names = [m.name for m in self.scorer.modules]
        by_module = {name: float(v) for name, v in zip(names, module_scores)}
        return DocumentInfluence(
            query_id=query.query_id, sign=sign, rank=rank, seq_id=seq_id, doc_id=row["doc_id"], chunk=row["chunk"],
            source=row["source"], lang=row["lang"], score=float(score), module_scores=by_module, layer_scores=layer_scores(by_module),
            text=row["text"], tokens=token_texts(self.scorer.tokenizer, row["input_ids"]) if token_scores is not None else [],
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

    def __init__(self, num_queries: int, num_modules: int, per_token: bool):
        self.order: list[int] = []
        self.column: dict[int, int] = {}
        self.scores = np.zeros((num_queries, 0))
        self.per_module = np.zeros((num_modules, num_queries, 0))
        self.per_token: Optional[list] = [] if per_token else None

    def add(self, seq_ids: np.ndarray, scores: np.ndarray, per_module: np.ndarray, per_token: Optional[list]) -> None:
        for s in seq_ids:
            self.column[int(s)] = len(self.order)
            self.order.append(int(s))
        self.scores = np.concatenate([self.scores, scores], axis=1)
        self.per_module = np.concatenate([self.per_module, per_module], axis=2)
        if self.per_token is not None:
            self.per_token.extend(per_token)
