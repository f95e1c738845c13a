"""The merged sketch store: shards in; a 4-bit sketch store, its doc table and optionally a FAISS index out.

`merge_sketch_shards` streams the shards' memory-mapped sketches block by block into `sketches.npy` (4-bit codes
with a step per row, `codes.encode_sketches`) and, given a factory string, a FAISS index (ids 0..N-1 in shard order; made and trained by `tiers`), and writes
`docs.parquet`, the shards' rows with an `index_id` column aligned to those ids; shards written with refine rows also give
`refine.npy`, the refine tier (`codes.RefineStore`). The build is deterministic: identical shards and
seed give byte-identical files, whatever the number of shards they were split into.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from indexes.constants import (DOCS_NAME, INDEX_ID, INDEX_META_NAME, INDEX_NAME, NO_FACTORY, REFINE_NAME, REFINE_SCALE,
                               SCALE, SEQ_ID, STORE_DTYPE, STORE_NAME)
from indexes.codes import RefineStore, SketchStore, encode_sketches
from indexes.search import fold
from indexes.shards import (
    check_sketches,
    duplicate_values,
    load_shard_refine,
    load_shard_rows,
    load_shard_sketches,
    require_all_shards,
    sketch_shard_path,
)
from indexes.tiers import add_blocks, create_index, deterministic_threads, train_index
from influence.artifacts import atomic_path, read_json, require_same, write_json, write_parquet
from influence.errors import InfluenceError

LOG = logging.getLogger(__name__)


def index_exists(index_dir: Path) -> bool:
    """Whether `merge_sketch_shards` finished in `index_dir` (its metadata is written last)."""
    index_dir = Path(index_dir)
    if not all((index_dir / name).is_file() for name in (INDEX_META_NAME, STORE_NAME, DOCS_NAME)):
        return False
    return read_json(index_dir / INDEX_META_NAME).get("factory") == NO_FACTORY or (index_dir / INDEX_NAME).is_file()


def merge_sketch_shards(
    index_dir: Path,
    num_shards: int,
    factory: str = NO_FACTORY,
    train_size: int = 50_000,
    seed: int = 0,
    block_size: int = 8192,
    progress: bool = True,
    fold_dim: int | None = None,
    executor=None,
) -> Path:
    """Build the sketch store (`sketches.npy`), `docs.parquet` and, with a factory, `index.faiss` from all shards.

    The store holds every sketch as 4-bit codes, two per byte, with a step per row (kept in the doc table's
    `sketch_scale`): entries are rounded to multiples of max |x| / 7, whatever the model's gradients are. The
    rounding moves a score by a few percent of the count sketch's own noise, and a byte per two numbers gives the
    sketch four times the dimension float16 would at the same size. Shards that carry refine rows (`--refine`) are
    concatenated into `refine.npy` (float16, memory-mapped by queries, never read whole).

    Args:
        index_dir: The directory holding the sketch shards; the outputs are written beside them.
        num_shards: How many shards were written; all must be finished.
        factory: "none" (the store is scanned exactly), or a FAISS index_factory string built with
            METRIC_INNER_PRODUCT over the float32 sketches (folded to `fold_dim` numbers when given), e.g. "Flat",
            "IVF64,Flat", "HNSW32", "IVF64,PQ16": a compact first tier that proposes candidates for the store to order.
        train_size: Most rows sampled (seeded, without replacement) to train IVF/PQ factories.
        seed: Seed of the training sample.
        block_size: Rows written per step: bounds the RAM used beyond the index itself.
        progress: Show a tqdm bar over the rows added.
        fold_dim: The first tier indexes the sketches folded to this many numbers (`search.fold`); None: unfolded.
        executor: Where an IVF first tier's blocks are encoded (`tiers.add_blocks`); default: this process.

    Returns:
        The index directory.
    """
    start_time = time.perf_counter()
    index_dir = Path(index_dir)
    require_all_shards(index_dir, num_shards)
    if train_size < 1 or block_size < 1:
        raise InfluenceError(f"train_size ({train_size}) and block_size ({block_size}) must be positive; pass values >= 1")
    # A stale completion marker must not vouch for the files this run is about to replace.
    (index_dir / INDEX_META_NAME).unlink(missing_ok=True)

    shapes, tables = [], []
    for shard in range(num_shards):
        # Only the shape is kept: the memmap (and its file descriptor) is dropped before the next shard.
        shapes.append(load_shard_sketches(index_dir, shard, num_shards).shape)
        tables.append(load_shard_rows(index_dir, shard, num_shards))
    dim = _check_shards_agree(index_dir, shapes, tables)
    sizes = [rows for rows, _ in shapes]
    total = sum(sizes)
    if total == 0:
        raise InfluenceError(f"the {num_shards} sketch shards in {index_dir} hold no rows; check that the corpus is not empty")

    scales = _write_store(index_dir, num_shards, total, dim, block_size, progress)
    refine_dim = _write_refine(index_dir, num_shards, total, progress)
    num_train = 0
    index_dim = dim if fold_dim is None else min(fold_dim, dim)
    if factory != NO_FACTORY:
        index = create_index(index_dim, factory)
        with deterministic_threads(index, factory):
            if not index.is_trained:
                sample = fold(_sample_rows(index_dir, num_shards, sizes, train_size, seed), index_dim)  # (num_train, d1)
                check_sketches(sample, where=f"the training sample of {index_dir}")
                num_train = train_index(index, factory, sample)
            blocks = [(shard, start) for shard, size in enumerate(sizes) for start in range(0, size, block_size)]
            offsets = np.concatenate([[0], np.cumsum(sizes)])

            def block(task: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
                shard, start = task
                rows = load_shard_sketches(index_dir, shard, num_shards)[start : start + block_size]  # (<= block_size, d)
                ids = np.arange(offsets[shard] + start, offsets[shard] + start + len(rows), dtype=np.int64)
                return ids, fold(np.ascontiguousarray(rows), index_dim)

            if isinstance(faiss.downcast_index(index), faiss.IndexIVF):  # a plain IVF: encoded in parallel, merged in order
                add_blocks(faiss.downcast_index(index), blocks, block, executor, progress=False)
            else:
                for task in blocks:
                    # Plain add assigns sequential ids ntotal.., i.e. the global row offset in shard order,
                    # and works for every index type (HNSW has no add_with_ids).
                    index.add(block(task)[1])
        assert index.ntotal == total, (index.ntotal, total)
        with atomic_path(index_dir / INDEX_NAME) as tmp:
            faiss.write_index(index, str(tmp))
    docs = pa.concat_tables(tables)
    docs = docs.add_column(0, INDEX_ID, pa.array(np.arange(total, dtype=np.int64))).append_column(SCALE, pa.array(scales))
    # One chunk per column so the Parquet bytes depend on the rows only, not on how they were sharded.
    write_parquet(index_dir / DOCS_NAME, docs.combine_chunks())
    meta = {
        "factory": factory,
        "metric": "inner_product",
        "dim": dim,
        "index_dim": index_dim,
        "ntotal": total,
        "num_shards": num_shards,
        "shard_rows": sizes,
        "store_dtype": STORE_DTYPE,
        "refine_dim": refine_dim,
        "train_size": train_size,
        "num_train": num_train,
        "seed": seed,
        "faiss_version": faiss.__version__,
    }
    write_json(index_dir / INDEX_META_NAME, meta)
    LOG.info("merged %d sketches (dim %d) from %d shards into %s (factory '%s') in %.1fs",
             total, dim, num_shards, index_dir, factory, time.perf_counter() - start_time)
    return index_dir


def _write_store(index_dir: Path, num_shards: int, total: int, dim: int, block_size: int, progress: bool) -> np.ndarray:
    """Every shard's sketches as 4-bit codes into one uint8 (total, ceil(dim / 2)) file; returns the rows' steps."""
    steps = np.empty(total, dtype=np.float32)
    with atomic_path(index_dir / STORE_NAME) as tmp:
        store = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(total, (dim + 1) // 2))
        offset = 0
        with tqdm(total=total, unit="rows", desc="merge sketches", disable=not progress) as bar:
            for shard in range(num_shards):
                sketches = load_shard_sketches(index_dir, shard, num_shards)  # (n_shard, d) memmap
                for start in range(0, sketches.shape[0], block_size):
                    block = np.asarray(sketches[start : start + block_size], dtype=np.float32)  # (<= block_size, d)
                    check_sketches(block, where=str(sketch_shard_path(index_dir, shard, num_shards)))
                    codes, block_steps = encode_sketches(block)
                    store[offset : offset + len(block)] = codes
                    steps[offset : offset + len(block)] = block_steps
                    offset += len(block)
                    bar.update(len(block))
        store.flush()
        del store
    return steps


def _write_refine(index_dir: Path, num_shards: int, total: int, progress: bool) -> int:
    """Every shard's refine rows into one float16 (total, D) `refine.npy`, when the shards have them; returns D (0: none)."""
    dims = []
    for shard in range(num_shards):
        refine = load_shard_refine(index_dir, shard, num_shards)
        dims.append(None if refine is None else refine.shape[1])
        del refine
    if all(d is None for d in dims):
        (index_dir / REFINE_NAME).unlink(missing_ok=True)
        return 0
    if None in dims or len(set(dims)) > 1:
        raise InfluenceError(f"the sketch shards in {index_dir} disagree on the refine tier (refine dims by shard: {dims}); they were "
                             "written with different --refine settings: delete them and re-run the index stage with one setting")
    with atomic_path(index_dir / REFINE_NAME) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(total, dims[0]))
        offset = 0
        with tqdm(total=total, unit="rows", desc="merge refine tier", disable=not progress) as bar:
            for shard in range(num_shards):
                refine = load_shard_refine(index_dir, shard, num_shards)
                for start in range(0, refine.shape[0], 1024):
                    block = refine[start : start + 1024]
                    out[offset : offset + len(block)] = block
                    offset += len(block)
                    bar.update(len(block))
                del refine
        out.flush()
        del out
    return int(dims[0])


def load_refine_store(index_dir: Path) -> RefineStore | None:
    """The refine tier (float16 whitened gradients, memory-mapped, with each row's scale), or None if the index has none."""
    index_dir = Path(index_dir)
    meta = _read_meta(index_dir)
    dim = int(meta.get("refine_dim") or 0)
    if not dim:
        return None
    try:
        rows = np.load(index_dir / REFINE_NAME, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InfluenceError(f"{index_dir / REFINE_NAME} is not a readable refine tier ({exc}); rebuild the index") from exc
    if rows.dtype != np.float16 or rows.shape != (meta["ntotal"], dim):
        raise InfluenceError(f"{index_dir / REFINE_NAME} holds {rows.dtype} {rows.shape}, not the float16 ({meta['ntotal']}, {dim}) "
                             "its index.json names; rebuild the index")
    docs = load_doc_table(index_dir)
    if REFINE_SCALE not in docs.column_names:
        raise InfluenceError(f"{index_dir / DOCS_NAME} has no {REFINE_SCALE} column for its refine tier; rebuild the index")
    return RefineStore(rows, docs[REFINE_SCALE].to_numpy(), dim)


def load_sketch_store(index_dir: Path) -> SketchStore:
    """The 4-bit sketch store, memory-mapped (read-only), with each row's step: an exact-scan search tier."""
    index_dir = Path(index_dir)
    meta = _read_meta(index_dir)
    if meta.get("store_dtype") != STORE_DTYPE:
        raise InfluenceError(f"{index_dir} holds a {meta.get('store_dtype')} sketch store written by an earlier version; this "
                             f"version reads {STORE_DTYPE} stores: rebuild the index (influence index)")
    try:
        rows = np.load(index_dir / STORE_NAME, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InfluenceError(f"{index_dir / STORE_NAME} is not a readable sketch store ({exc}); rebuild the index") from exc
    expected = (meta["ntotal"], (meta["dim"] + 1) // 2)
    if rows.dtype != np.uint8 or rows.shape != expected:
        raise InfluenceError(f"{index_dir / STORE_NAME} holds {rows.dtype} {rows.shape}, not the uint8 {expected} of {meta['dim']}-number "
                             "4-bit sketches; rebuild the index")
    docs = load_doc_table(index_dir)
    if SCALE not in docs.column_names:
        raise InfluenceError(f"{index_dir / DOCS_NAME} has no {SCALE} column: it was written by another version; rebuild the index")
    return SketchStore(rows, docs[SCALE].to_numpy(), int(meta["dim"]))


def load_index(index_dir: Path, mmap: bool = True) -> faiss.Index:
    """Read `index.faiss` (an index built with a factory), memory-mapped and read-only where the index type allows it.

    Args:
        index_dir: A directory written by `merge_sketch_shards`.
        mmap: Map the index's vectors/codes from disk instead of reading them into RAM. FAISS maps
            flat codes (Flat, PQ, SQ, HNSW storage) with IO_FLAG_MMAP_IFC (faiss >= 1.10) and IVF
            inverted lists with IO_FLAG_MMAP; other parts (HNSW graph, IVF centroids) are read.
            A mapped index is read-only: do not add to it.

    Returns:
        The FAISS index; its ids are the `index_id` column of `load_doc_table`.
    """
    index_dir = Path(index_dir)
    meta = _read_meta(index_dir)
    path = str(index_dir / INDEX_NAME)
    attempts = []
    if mmap:
        if hasattr(faiss, "IO_FLAG_MMAP_IFC"):
            attempts.append(faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
        attempts.append(faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    attempts.append(0)
    for flags in attempts:
        try:
            index = faiss.read_index(path, flags)
            break
        except RuntimeError as exc:
            # Not every index type can be mapped with every flag: fall through to the next way.
            LOG.debug("faiss.read_index(%s, %d) failed: %s", path, flags, exc)
    else:
        raise InfluenceError(f"{path} is not a readable FAISS index; delete it and re-run merge_sketch_shards")
    require_same("index size", meta["ntotal"], index.ntotal, index_dir, "re-run merge_sketch_shards")
    require_same("index dimension", meta.get("index_dim", meta["dim"]), index.d, index_dir, "re-run merge_sketch_shards")
    LOG.info("loaded %s (%s, %d vectors, flags %d)", path, meta["factory"], index.ntotal, flags)
    return index


def load_doc_table(index_dir: Path) -> pa.Table:
    """Read `docs.parquet`: one row per FAISS id, `index_id` = row position, plus the shards' columns."""
    index_dir = Path(index_dir)
    meta = _read_meta(index_dir)
    try:
        docs = pq.read_table(index_dir / DOCS_NAME)
    except (OSError, pa.ArrowException) as exc:
        raise InfluenceError(f"{index_dir / DOCS_NAME} is not a readable Parquet file ({exc}); re-run merge_sketch_shards") from exc
    require_same("doc table rows", meta["ntotal"], docs.num_rows, index_dir, "re-run merge_sketch_shards")
    return docs


def _read_meta(index_dir: Path) -> dict:
    if not index_exists(index_dir):
        raise InfluenceError(f"{index_dir} holds no finished index; run merge_sketch_shards on it once all sketch shards exist")
    return read_json(index_dir / INDEX_META_NAME)


def _check_shards_agree(index_dir: Path, shapes: list[tuple[int, int]], tables: list[pa.Table]) -> int:
    """Rows aligned with sketches, one sketch dimension and row schema, no seq_id in two places."""
    for shard, ((num_rows, _), rows) in enumerate(zip(shapes, tables)):
        if rows.num_rows != num_rows:
            raise InfluenceError(
                f"shard {shard} in {index_dir} holds {num_rows} sketches but {rows.num_rows} rows; delete it and re-run that shard"
            )
    dims = [dim for _, dim in shapes]
    if len(set(dims)) > 1:
        raise InfluenceError(
            f"sketch dimensions differ across the shards in {index_dir}: {dims}; shards were written with different "
            "sketch settings: delete them and re-run the index stage with one setting"
        )
    schema = tables[0].schema
    for shard, rows in enumerate(tables):
        if not rows.schema.equals(schema, check_metadata=False):
            raise InfluenceError(
                f"shard {shard} in {index_dir} has row columns {rows.schema.names} with types differing from shard 0's "
                f"{schema.names}; write every shard's rows with the same columns and types"
            )
    seq_ids = np.concatenate([rows.column(SEQ_ID).to_numpy() for rows in tables])
    duplicates = duplicate_values(seq_ids)
    if duplicates.size:
        shown = set(duplicates[:5].tolist())
        owners = {shard: sorted(shown & set(rows.column(SEQ_ID).to_numpy().tolist())) for shard, rows in enumerate(tables)}
        owners = {shard: ids for shard, ids in owners.items() if ids}
        raise InfluenceError(
            f"{duplicates.size} {SEQ_ID}s occur in more than one shard of {index_dir} (shard: ids {owners}); a document "
            f"would be counted twice: check how the corpus was split into the {len(tables)} shards, delete the shards "
            "and re-run the index stage"
        )
    return dims[0]


def _sample_rows(index_dir: Path, num_shards: int, sizes: list[int], size: int, seed: int) -> np.ndarray:
    """A seeded sample of at most `size` rows, gathered from the shards' memmaps without reading the rest."""
    total = sum(sizes)
    rng = np.random.default_rng(seed)
    # Sorted global positions: the sample depends on the rows, not on the shard boundaries.
    chosen = np.sort(rng.choice(total, size=min(size, total), replace=False))
    parts, offset = [], 0
    for shard, num_rows in enumerate(sizes):
        local = chosen[(chosen >= offset) & (chosen < offset + num_rows)] - offset
        if local.size:
            parts.append(np.array(load_shard_sketches(index_dir, shard, num_shards)[local]))  # (rows sampled here, d)
        offset += num_rows
    return np.ascontiguousarray(np.concatenate(parts))
