"""File names of the sketch store: one place, so index directories stay readable across versions.

An index directory holds the sketch shards while it is built and, once merged, the sketch store, an optional
FAISS index and their aligned doc table:

    index_dir/
        sketch_shard_00000_of_00004/    one per worker; a directory exists only if fully written
            sketches.npy                float32 (n, d) whitened-gradient sketches
            rows.parquet                one row per sketch: seq_id int64 plus metadata columns
            refine.npy                  float16 (n, D) whitened gradients / refine_scale (with --refine)
        sketches.npy                    uint8 (N, ceil(d/2)): every sketch as 4-bit codes, in shard order
        index.faiss                     FAISS inner-product index, ids 0..N-1 in shard order (with --factory)
        refine.npy                      float16 (N, D): the refine tier, every whitened gradient itself (with --refine)
        docs.parquet                    the shards' rows concatenated, plus index_id = 0..N-1 and sketch_scale (the step)
        index.json                      how index.faiss was built; written last (completion marker)
        text_index/                     BM25 over the sequences' text (with --text-index; `text.py`)
"""

SKETCH_SHARD_NAME = "sketch_shard_{shard:05d}_of_{num_shards:05d}"
SKETCHES_NAME = "sketches.npy"
ROWS_NAME = "rows.parquet"

STORE_NAME = "sketches.npy"    # uint8 (N, ceil(d/2)): 4-bit codes, two entries per byte (codes.SketchStore)
STORE_DTYPE = "int4"          # recorded in index.json; a store of another format is refused
INDEX_NAME = "index.faiss"
DOCS_NAME = "docs.parquet"
INDEX_META_NAME = "index.json"

SEQ_ID = "seq_id"      # the corpus stage's sequence id; unique across the whole index
INDEX_ID = "index_id"  # the FAISS id of a row: its position in shard order
SCALE = "sketch_scale"  # the step of a stored row: its codes minus 7, times it, are the sketch
REFINE_NAME = "refine.npy"      # float16 (N, D): each row W(z) / refine_scale (codes.RefineStore); in shards too
REFINE_SCALE = "refine_scale"   # a refine row's scale: max |W(z)|, a column of the shards' rows and the doc table

NO_FACTORY = "none"    # no FAISS index: the 4-bit store is scanned in full

# The factory strings quoted in error messages, from exact to most compressed.
FACTORY_EXAMPLES = ("Flat", "IVF64,Flat", "HNSW32", "IVF64,PQ16")
