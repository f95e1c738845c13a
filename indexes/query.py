"""The query engine: one backward pass, a candidate search, an exact EK-FAC re-rank with breakdowns.

`QueryEngine` loads the model, factors, index, doc table and sequences once; every call to `query`
shares them. Candidates come from the FAISS index over sketches (default: the top candidates for q and
for -q, so both signs are found), from BM25 over the sequences' text (the paper's TF-IDF baseline), or
from a full scan. Every candidate is then scored exactly, with per-module and per-token decompositions.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from indexes.search import search_index
from indexes.store import load_doc_table, load_index
from influence.arguments import QueryArgs, ScoreArgs
from influence.artifacts import read_manifest, require_same
from influence.corpus import load_sequences
from influence.errors import InfluenceError
from influence.explain import DocumentInfluence, QueryResult, layer_scores, token_texts
from influence.gradients import make_token_batch
from influence.query import Query
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
        self.scorer.prepare(queries, gradients)
        seconds["gradient"] = time.perf_counter() - tick

        tick = time.perf_counter()
        candidates, sketch_scores = self._candidates(queries, gradients, args)
        seconds["search"] = time.perf_counter() - tick

        tick = time.perf_counter()
        union = np.unique(np.concatenate([np.concatenate(c) for c in candidates]))
        scores, per_module, per_token = self._score(union, args.per_token, args.batch_size)
        seconds["rerank"] = time.perf_counter() - tick
        seconds["total"] = sum(seconds.values())

        position = {int(s): i for i, s in enumerate(union)}
        results = []
        for qi, query in enumerate(queries):
            documents = []
            for sign, pool in zip("+-", candidates[qi]):
                columns = np.array([position[int(s)] for s in pool])
                order = np.argsort(-scores[qi, columns] if sign == "+" else scores[qi, columns], kind="stable")
                for rank, col in enumerate(columns[order][: args.top_k], start=1):
                    documents.append(self._document(query, qi, sign, rank, int(union[col]), scores[qi, col], per_module[:, qi, col],
                                                    None if per_token is None else per_token[col][qi], sketch_scores[qi].get(int(union[col]))))
            completion = token_texts(self.scorer.tokenizer, tokenized[qi].completion_ids)
            results.append(QueryResult(query, completion, documents, args.generator, len(union), dict(seconds)))
        return results

    def _candidates(self, queries, gradients, args) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[dict[int, float]]]:
        """Per query: (positive candidates, negative candidates) as seq ids, and sketch scores where known."""
        n = len(self.seq_ids)
        depth = min(args.candidates, n)
        if args.generator == "exact":
            return [(self.seq_ids, self.seq_ids)] * len(queries), [{} for _ in queries]
        if args.generator == "bm25":
            return [(ids, ids) for ids in self._bm25_candidates(queries, depth)], [{} for _ in queries]
        sketches = self.sketcher.sketch_gradients(gradients).numpy()  # (queries, dim)
        top_scores, top_ids = search_index(self.index, np.concatenate([sketches, -sketches]), depth, nprobe=args.nprobe)
        q = len(queries)
        result, sketch_scores = [], []
        for qi in range(q):
            pos, neg = top_ids[qi][top_ids[qi] >= 0], top_ids[q + qi][top_ids[q + qi] >= 0]
            result.append((self.seq_ids[pos], self.seq_ids[neg]))
            known = {int(self.seq_ids[i]): float(s) for i, s in zip(pos, top_scores[qi][: len(pos)])}
            known.update({int(self.seq_ids[i]): -float(s) for i, s in zip(neg, top_scores[q + qi][: len(neg)])})
            sketch_scores.append(known)
        return result, sketch_scores

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
