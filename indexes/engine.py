"""The query engine: one backward pass, a candidate search, an exact EK-FAC re-rank with breakdowns.

`QueryEngine` loads the model, factors, sketch store (or FAISS index), doc table and sequences once; every call to
`query` shares them. Candidates come from the sketches (default: the highest and the lowest inner products with q,
so both signs are found), from BM25 over the sequences' text (the paper's TF-IDF baseline), from both (`hybrid`: on
real models the text finds positive top documents a small sketch misses, `benchmarks/sketch_budget.py`), or from a
full scan.
Candidates are then scored exactly, index candidates best-first, stopping a sign once the sketch noise rules out
the rest (`QueryArgs.adaptive`), since the forward and backward pass of each candidate is most of a query's time.
An index built with a refine tier (`IndexArgs.refine`) orders the candidates by their float16 whitened gradients first
(read best sketch score first, while a candidate can still enter the top k): those scores are off by at most a bound,
not a noise, so the re-rank scores exactly little more than the top k. A sequence is scored for the queries whose
candidates it is, so a query answers the same alone or with others.
Per-token scores come with the re-rank (a GEMM per query, sequence and module: far less than a second forward and
backward pass over the returned documents); a full scan's answers are scored again, per token.
The pools and the table of exact scores they fill are in `candidates.py`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from indexes.candidates import CandidatePool, ExactScores, incomplete_signs, refined_count
from indexes.constants import NO_FACTORY
from indexes.search import search_both_signs, tiered_both_signs
from indexes.store import load_doc_table, load_index, load_refine_store, load_sketch_store
from indexes.text import TextIndex, open_text_index
from influence.arguments import QueryArgs
from influence.artifacts import read_manifest, require_same, resolve_reference
from influence.corpus import load_sequences, require_same_tokenizer
from influence.errors import InfluenceError
from influence.explain import DocumentInfluence, QueryResult, layer_scores, token_texts
from influence.factors import load_factors
from influence.gradients import make_token_batch, plan_model_batches
from influence.models import ModelSpec, context_length, load_model_context, load_tokenizer, model_identity, require_model_dir
from influence.queries import Query, tokenize_query
from influence.scores import Prepared, prepare_rotated_queries, rotated_query_gradients, score_batch
from influence.sketches import Sketcher

LOG = logging.getLogger(__name__)
#: A re-rank shows its bar (`QueryArgs.progress`) once it has run this long: a query of a tiny model answers in
#: milliseconds and should print nothing, one over a real model's corpus takes minutes (one pass per candidate).
PROGRESS_DELAY_S = 2.0


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
        self.refine = load_refine_store(self.index_dir)
        if self.refine is not None and self.refine.dim != self.sketcher.whitened_dim:
            raise InfluenceError(f"{self.index_dir}: its refine tier holds {self.refine.dim} numbers per document but the tracked "
                                 f"modules' whitened gradients have {self.sketcher.whitened_dim}; rebuild the index")
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
        self.corpus_fingerprint = corpus_manifest["corpus_fingerprint"]
        self._text_index: Optional[TextIndex] = None
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

    def sketch_queries(self, queries: Sequence[Query], dim: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        """What the index compares documents with: the queries' sketches (queries, dim) float32, in the index's hash
        functions, and their exact whitened norms ||W(q)|| (queries,) float64 (the sketch noise scales with them).
        With `dim`, sketches of that many numbers instead, as an index of the same factors, modules and seed built with
        that `--sketch-dim` holds them (e.g. to compare sketch sizes without loading the model again)."""
        sketcher = self.sketcher if dim is None or dim == self.sketcher.dim else \
            Sketcher(self.factors, self.module_names, dim, self.manifest["args"]["seed"])
        with self._lock:
            sketches, norms, _ = sketcher.sketch_rotated(rotated_query_gradients(self.loaded, self._tokenize(list(queries)),
                                                                                 self.factors))
        return sketches.numpy(), norms

    def bm25_candidates(self, queries: Sequence[Query], depth: int, matching_only: bool = False) -> list[np.ndarray]:
        """Per query, the seq ids of the `depth` sequences whose text best matches the query's prompt and completion
        (BM25, the paper's TF-IDF baseline), best first; `matching_only`: only those sharing a word with the query (the
        `bm25` and `hybrid` generators' candidates)."""
        with self._lock:
            return self._bm25_candidates(list(queries), min(int(depth), len(self.seq_ids)), matching_only)

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
        # (queries, dim), (queries,), and (queries, D) for the refine tier
        sketches, query_norms, whitened = self.sketcher.sketch_rotated(rotated, whitened=self._refines(args))
        pools = self._candidates(queries, sketches.numpy(), query_norms, args, whitened)
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
        token_scores: dict[tuple[int, int], np.ndarray] = {}  # (query, column) -> per-token scores
        if args.per_token:
            for qi in range(len(queries)):
                returned = np.unique(np.concatenate(chosen[2 * qi : 2 * qi + 2])).astype(np.int64)
                if scored.tokens is not None:  # kept from the re-rank for the queries whose pools brought them in
                    kept = {int(col): scored.tokens[int(col)][qi] for col in returned}
                    token_scores.update({(qi, col): tokens for col, tokens in kept.items() if not np.isnan(tokens).any()})
                    returned = np.asarray([col for col in returned if (qi, int(col)) not in token_scores], np.int64)
                if len(returned):  # scored again, against the query that returns them alone
                    alone = {name: tuple(x[qi : qi + 1] for x in p) if isinstance(p, tuple) else p[qi : qi + 1] for name, p in prepared.items()}
                    _, _, per_token = self._score(alone, union[returned], True, args.batch_tokens)
                    token_scores.update({(qi, int(col)): tokens[0] for col, tokens in zip(returned, per_token)})
        seconds["tokens"] = time.perf_counter() - tick
        seconds["total"] = sum(seconds.values())

        results = []
        for qi, query in enumerate(queries):
            documents = []
            for sign, columns in zip("+-", chosen[2 * qi : 2 * qi + 2]):
                estimates = self._sketch_scores(sketches[qi].numpy(), union[columns])
                for rank, (col, estimate) in enumerate(zip(columns, estimates), start=1):
                    seq_id = int(union[col])
                    tokens = token_scores.get((qi, int(col)))
                    documents.append(self._document(query, sign, rank, seq_id, scored.scores[qi, col], scored.per_module[:, qi, col],
                                                    tokens, float(estimate)))
            completion = token_texts(self.tokenizer, tokenized[qi].completion_ids)
            scored_here = int(np.count_nonzero(~np.isnan(scored.scores[qi])))  # sequences scored exactly for this query
            results.append(QueryResult(query, completion, documents, args.generator, scored_here, dict(seconds),
                                       refined=refined_count(pools[qi]), incomplete=incomplete_signs(pools[qi], scored.scores[qi], args.top_k, len(self.seq_ids))))
            if results[-1].incomplete:
                # the hybrid is the cheap remedy where the query shares words with its documents: on the real models it
                # found every positive top-10 document the default sketch missed (README, "How many bytes ...")
                hybrid = ", or `--generator hybrid` (also re-ranks the sequences sharing the most words with the query)" \
                    if args.generator == "index" else ""
                LOG.warning("query %s: its top %d (%s) may miss documents the sketch ranked beyond the %d candidates per sign "
                            "(the sketch's noise is wider than the gap to the k-th exact score); raise --candidates%s, or score "
                            "every document exactly with `influence score`", query.query_id, args.top_k,
                            " and ".join(results[-1].incomplete), len(pools[qi][1].seq_ids), hybrid)  # [1]: no text candidates
        return results

    def _sketch_scores(self, sketch: np.ndarray, seq_ids: np.ndarray) -> np.ndarray:
        """The sketch estimates of some sequences' scores, read from the store (for every document returned, whichever
        generator or query's pool brought it in)."""
        rows = self.index_ids[seq_ids]
        return self.store.decode(rows) @ sketch

    def _refines(self, args: QueryArgs) -> bool:
        return self.refine is not None and args.refine and args.generator == "index"

    def _sketch_result(self, query: Query, pools, tokenized, args: QueryArgs, seconds: dict) -> QueryResult:
        """The top index scores of each sign (the refine tier's where the index has one): estimates, no exact scores or
        breakdowns."""
        documents = []
        for sign, pool in zip("+-", pools):
            direction = 1.0 if sign == "+" else -1.0
            kept = [(s, v) for s, v in zip(pool.seq_ids[: args.top_k], pool.scores[: args.top_k]) if direction * v > 0]
            for rank, (seq_id, score) in enumerate(kept, start=1):
                documents.append(self._document(query, sign, rank, int(seq_id), float(score), [], None, float(score)))
        completion = token_texts(self.tokenizer, tokenized.completion_ids)
        return QueryResult(query, completion, documents, args.generator, 0, dict(seconds), exact=False, refined=refined_count(pools))

    def _candidates(self, queries, sketches: np.ndarray, query_norms: np.ndarray, args,
                    whitened: Optional[np.ndarray] = None) -> list[tuple[CandidatePool, CandidatePool]]:
        """Per query: (positive, negative) candidate pools, best first, with the index's scores and their slack where known;
        with `whitened` queries, ordered by the refine tier's scores with its error bounds."""
        n = len(self.seq_ids)
        depth = min(args.depth(whitened is not None) if args.rerank or whitened is not None else args.top_k, n)
        if args.generator == "exact":
            return [(CandidatePool(self.seq_ids),) * 2 for _ in queries]
        if args.generator == "bm25":
            return [(CandidatePool(ids),) * 2 for ids in self._bm25_candidates(queries, depth, True)]
        if args.generator == "hybrid":
            # a sequence sharing no word with the query is no text candidate (a translated query may have none): the
            # re-rank would spend a forward and backward pass on an arbitrary sequence
            texts = self._bm25_candidates(queries, min(args.text_candidates, n), True)
            pools = self._candidates(queries, sketches, query_norms, dataclasses.replace(args, generator="index"))
            return [(pair[0].with_text_candidates(found, self._sketch_scores(sketches[qi], found)), pair[1])
                    for qi, (pair, found) in enumerate(zip(pools, texts))]
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
            for direction, ids, scores in ((1.0, top_ids[qi], top_scores[qi]), (-1.0, low_ids[qi], low_scores[qi])):
                found = ids >= 0
                ids, scores = ids[found], scores[found].astype(np.float64)
                # the count sketch's noise and the store's 4-bit rounding, independent: a few standard deviations
                slack = args.stop_margin * np.hypot(self.sketcher.noise_scale(query_norms[qi], self.document_norms[ids]),
                                                    self.store.rounding_noise(sketch_norms[qi], ids))
                if whitened is not None:
                    pair.append(self._refined_pool(whitened[qi : qi + 1], direction, ids, scores, slack, args))
                else:
                    beyond = float(np.min(direction * scores) + np.median(slack)) if 0 < len(ids) < n else None
                    pair.append(CandidatePool(self.seq_ids[ids], scores, slack if adaptive else None, beyond=beyond))
            pools.append(tuple(pair))
        return pools

    def _refined_pool(self, whitened: np.ndarray, direction: float, ids: np.ndarray, sketch_scores: np.ndarray,
                      sketch_slack: np.ndarray, args: QueryArgs) -> CandidatePool:
        """One (query, sign)'s candidates ordered by the refine tier's scores, with their bounds as slack.

        Reading a refine row costs what scanning ~50 store rows does (2 bytes per whitened number), so with `adaptive`
        the rows are read best sketch score first, in rounds, and a candidate is read only while its sketch score plus
        slack reaches the k-th best refine score minus its bound: a candidate left unread could enter the top k only by
        a sketch error beyond stop_margin standard deviations, the rule the sketch's own adaptive re-rank follows."""
        scores, bounds = np.full(len(ids), np.nan), np.full(len(ids), np.nan)
        read = np.zeros(len(ids), bool)
        step = max(4 * args.top_k, 16)  # the top k and their likely rivals in one read
        wanted = np.arange(min(step, len(ids))) if args.adaptive else np.arange(len(ids))
        while len(wanted):
            scores[wanted] = self.refine.scores(whitened, ids[wanted])[0]
            bounds[wanted] = self.refine.error_bound(whitened, ids[wanted], self.document_norms[ids[wanted]])[0]
            read[wanted] = True
            lower = np.sort(direction * scores[read] - bounds[read])
            kth = lower[-args.top_k] if len(lower) >= args.top_k else -np.inf
            step *= 2
            wanted = np.flatnonzero(~read & (direction * sketch_scores + sketch_slack >= kth))[:step]
        ids, scores, bounds = ids[read], scores[read], bounds[read]
        order = np.argsort(-direction * scores, kind="stable")
        return CandidatePool(self.seq_ids[ids[order]], scores[order], bounds[order] if args.rerank and args.adaptive else None,
                             bounded=True)

    def _rerank(self, prepared, pools: list[tuple[CandidatePool, CandidatePool]], args: QueryArgs) -> ExactScores:
        """Exact scores of the candidates, in rounds over every open (query, sign).

        The first round scores, best first, the candidates of each pool that could be in its top k by the index's own
        scores and slack (`CandidatePool.first_round`): the top k and those close behind (all for a refine tier's bounds,
        up to max(top_k, 8) for a sketch's noise). After each round a (query, sign) stays open only while some unscored
        candidate could still enter its top k, i.e. its index score plus slack (in that sign's direction) reaches the
        k-th best exact score so far; the next round scores those, best first, twice as many as the round before at
        most. For a sketch pool the slack is stop_margin standard deviations of its noise: a document of the exact top k
        is missed when its sketch score is that far off (a refine pool's bound never is). A sequence is scored for the
        queries whose pools want it, not against every query of the call: a query's answer is the same alone or in a
        batch, and a batch of queries with different candidates costs what they cost apart, less the shared passes.
        Pools without slack (BM25, a full scan, `adaptive` off) are scored whole in the first round.
        """
        # Per-token scores cost a GEMM per sequence and module for each query whose pool brought the sequence in (one
        # query: what its totals cost), far less than the second forward and backward pass over the returned documents
        # they would otherwise need, so the re-rank keeps them. A full scan (`exact`) would keep every sequence's in
        # memory: there only the returned ones are scored.
        per_token = args.per_token and args.generator != "exact"
        scored = ExactScores(len(pools), len(self.module_names), per_token)
        step = max(args.top_k, 8)
        wanted = {(qi, sign): pools[qi][sign].first_round(1.0 if sign == 0 else -1.0, args.top_k, step)
                  for qi in range(len(pools)) for sign in (0, 1)}
        # the bar counts sequences scored (a forward and backward pass each), out of at most each query's candidates once
        # (a sequence another query wants later is scored again; the adaptive stop may end the bar short)
        most = sum(len(np.union1d(positive.seq_ids, negative.seq_ids)) for positive, negative in pools)
        bar = tqdm(total=most, desc="exact re-rank", unit="seq", disable=not args.progress, delay=PROGRESS_DELAY_S, leave=False)
        with bar:
            while wanted:
                owners: dict[int, set] = {}  # sequence -> the queries whose pools want it scored, and do not have it yet
                for (qi, _), ids in wanted.items():
                    for seq_id in ids[~scored.has(qi, ids)].tolist():
                        owners.setdefault(seq_id, set()).add(qi)
                if owners:
                    # grouped by query: a batch then scores each query's sequences as one run (`score_batch`'s pairs)
                    new = np.asarray(sorted(owners, key=lambda seq_id: min(owners[seq_id])), np.int64)
                    every = all(len(queries) == len(pools) for queries in owners.values())
                    pairs = None if every else list(owners.values())
                    scored.add(new, *self._score(prepared, new, per_token, args.batch_tokens, pairs, bar))
                step *= 2  # few rounds: each costs a partly filled batch per (query, sign)
                wanted = {}
                for qi, pair in enumerate(pools):
                    for sign, pool in enumerate(pair):
                        if pool.slack is None:
                            continue
                        direction = 1.0 if sign == 0 else -1.0
                        exact = np.sort(direction * scored.scores[qi][~np.isnan(scored.scores[qi])])
                        kth = exact[-args.top_k] if len(exact) >= args.top_k else -np.inf
                        hopeful = ~scored.has(qi, pool.seq_ids) & (direction * pool.scores + pool.slack >= kth)
                        if hopeful.any():
                            wanted[(qi, sign)] = pool.seq_ids[hopeful][:step]
        return scored

    def _bm25_candidates(self, queries: list[Query], depth: int, matching_only: bool = False) -> list[np.ndarray]:
        rows = self.text_index.search([f"{q.prompt} {q.completion}" for q in queries], depth, matching_only)
        return [self.sequences["seq_id"].to_numpy()[r] for r in rows]

    @property
    def text_index(self) -> TextIndex:
        """BM25 over the corpus's text: the one the index stage stored, else built here in memory on first use."""
        if self._text_index is None:
            self._text_index = open_text_index(self.index_dir, self.sequences, self.corpus_fingerprint, self.args.progress)
        return self._text_index

    def _score(self, prepared: dict[str, Prepared], seq_ids: np.ndarray, per_token: bool, batch_tokens: int,
               pairs: Optional[list] = None, bar: Optional[tqdm] = None):
        """Exact scores of the given sequences: (queries, n), (modules, queries, n), and per token a list of (queries, tokens);
        with `pairs` (per sequence, the queries to score it against), NaN for the other pairs. `bar` counts the sequences."""
        sequences = [self.input_ids[int(s)].as_py() for s in seq_ids]
        num_queries = next(iter(prepared.values()))
        num_queries = (num_queries[0] if isinstance(num_queries, tuple) else num_queries).shape[0]
        scores, per_module = np.zeros((num_queries, len(seq_ids))), np.zeros((len(self.module_names), num_queries, len(seq_ids)))
        tokens: list = [None] * len(seq_ids)
        for positions in plan_model_batches([len(ids) for ids in sequences], batch_tokens, self.loaded.modules):
            batch = make_token_batch([sequences[i] for i in positions], device=self.args.device)
            result = score_batch(self.loaded, prepared, batch, per_token, pairs=None if pairs is None else [pairs[i] for i in positions])
            scores[:, positions] = result.total.double().cpu().numpy()
            per_module[:, :, positions] = result.per_module.double().cpu().numpy()
            if per_token:
                for j, i in enumerate(positions):
                    tokens[i] = result.per_token[:, j, : len(sequences[i])].double().cpu().numpy()
            if bar is not None:
                bar.update(len(positions))
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
