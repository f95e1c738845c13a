"""The store of gradient sketches: write shards, merge them into a 4-bit store (and optionally a FAISS index), load,
search, check.

Free functions over float32 (n, d) arrays, in the manner of faiss `contrib/`: index workers write
sketch shards atomically, one merge builds an inner-product index and an aligned doc table, and
`exact_topk` is the brute-force oracle any index can be measured against. This package owns FAISS;
`influence/` never imports it.
"""

from indexes.codes import RefineStore, SketchStore
from indexes.constants import SKETCH_SHARD_NAME
from indexes.search import exact_topk, search_both_signs, search_index
from indexes.shards import (
    finished_shards,
    iterate_shard_sketches,
    sketch_shard_exists,
    sketch_shard_path,
    write_sketch_shard,
)
from indexes.store import index_exists, load_doc_table, load_index, load_refine_store, load_sketch_store, merge_sketch_shards

__all__ = [
    "SKETCH_SHARD_NAME",
    "RefineStore",
    "SketchStore",
    "exact_topk",
    "finished_shards",
    "index_exists",
    "iterate_shard_sketches",
    "load_doc_table",
    "load_index",
    "load_refine_store",
    "load_sketch_store",
    "merge_sketch_shards",
    "search_both_signs",
    "search_index",
    "sketch_shard_exists",
    "sketch_shard_path",
    "write_sketch_shard",
]
