"""File names of the sketch store: one place, so index directories stay readable across versions.

An index directory holds the per-worker sketch shards and, once merged, the FAISS index with its
aligned doc table:

    index_dir/
        sketch_shard_00000_of_00004/    one per worker; a directory exists only if fully written
            sketches.npy                float32 (n, d) whitened-gradient sketches
            rows.parquet                one row per sketch: seq_id int64 plus metadata columns
        index.faiss                     FAISS inner-product index, ids 0..N-1 in shard order
        docs.parquet                    the shards' rows concatenated, plus index_id = 0..N-1
        index.json                      how index.faiss was built; written last (completion marker)
"""

SKETCH_SHARD_NAME = "sketch_shard_{shard:05d}_of_{num_shards:05d}"
SKETCHES_NAME = "sketches.npy"
ROWS_NAME = "rows.parquet"

INDEX_NAME = "index.faiss"
DOCS_NAME = "docs.parquet"
INDEX_META_NAME = "index.json"

SEQ_ID = "seq_id"      # the corpus stage's sequence id; unique across the whole index
INDEX_ID = "index_id"  # the FAISS id of a row: its position in shard order

# The factory strings quoted in error messages, from exact to most compressed.
FACTORY_EXAMPLES = ("Flat", "IVF64,Flat", "HNSW32", "IVF64,PQ16")
