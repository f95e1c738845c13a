"""Sketch shards: the unit one index worker writes, and the blocks the merge and the oracle read.

A shard is a directory holding `sketches.npy` (float32, (n, d)) and `rows.parquet` (n rows, with at
least an int64 `seq_id`). It is written into a hidden temporary sibling and renamed into place, so a
shard directory exists only when complete: a killed worker leaves at most a `.sketch_shard_*.tmp`
directory, which is never counted as finished.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from indexes.constants import INDEX_ID, REFINE_NAME, REFINE_SCALE, ROWS_NAME, SEQ_ID, SKETCH_SHARD_NAME, SKETCHES_NAME
from influence.artifacts import ensure_writable_dir, no_space_error
from influence.errors import InfluenceError

LOG = logging.getLogger(__name__)


def sketch_shard_path(index_dir: Path, shard: int, num_shards: int) -> Path:
    """The directory of shard `shard` of `num_shards` inside `index_dir`."""
    _check_shard_number(shard, num_shards)
    return Path(index_dir) / SKETCH_SHARD_NAME.format(shard=shard, num_shards=num_shards)


def sketch_shard_exists(index_dir: Path, shard: int, num_shards: int) -> bool:
    """Whether shard `shard` of `num_shards` was fully written (temporary directories do not count)."""
    path = sketch_shard_path(index_dir, shard, num_shards)
    # The rename makes the directory complete; checking the files too guards against hand edits.
    return path.is_dir() and (path / SKETCHES_NAME).is_file() and (path / ROWS_NAME).is_file()


def finished_shards(index_dir: Path, num_shards: int) -> list[int]:
    """The sorted shard numbers of `num_shards` that are complete in `index_dir`."""
    if not Path(index_dir).is_dir():
        return []
    return [shard for shard in range(num_shards) if sketch_shard_exists(index_dir, shard, num_shards)]


def write_sketch_shard(index_dir: Path, shard: int, num_shards: int, sketches: np.ndarray, rows: pa.Table,
                       refine: np.ndarray | None = None) -> Path:
    """Write one shard of sketches and their rows atomically; an existing shard is replaced.

    Args:
        index_dir: The index directory (created if missing).
        shard: This shard's number, in [0, num_shards).
        num_shards: How many shards the corpus is split into.
        sketches: float32 (n, d), finite.
        rows: n rows in the same order as `sketches`, with an int64 `seq_id` column and any metadata
            columns (doc_id, source, lang, num_tokens, grad_norm, self_influence, ...).
        refine: Optional float16 (n, D) refine rows (`codes.encode_refine`); `rows` then carries their scales in a
            float32 `refine_scale` column.

    Returns:
        The shard directory.
    """
    check_sketches(sketches, where=f"shard {shard}")
    check_rows(rows, sketches.shape[0], where=f"shard {shard}")
    if refine is not None:
        check_refine(refine, rows, where=f"shard {shard}")
    final = sketch_shard_path(index_dir, shard, num_shards)
    ensure_writable_dir(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        # C order so that the merge's mmap blocks are contiguous rows FAISS can take without a copy.
        np.save(tmp / SKETCHES_NAME, np.ascontiguousarray(sketches), allow_pickle=False)
        if refine is not None:
            np.save(tmp / REFINE_NAME, np.ascontiguousarray(refine), allow_pickle=False)
        pq.write_table(rows.replace_schema_metadata(None), tmp / ROWS_NAME)
        _rename_into_place(tmp, final)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise no_space_error(final, size=sketches.nbytes) from exc
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    LOG.debug("wrote %s: %d sketches of dim %d", final.name, sketches.shape[0], sketches.shape[1])
    return final


def load_shard_sketches(index_dir: Path, shard: int, num_shards: int) -> np.ndarray:
    """Memory-map one finished shard's sketches: a read-only float32 (n, d) memmap.

    Each open memmap holds a file descriptor: callers looping over many shards should drop one
    before opening the next.
    """
    return _load_shard_matrix(sketch_shard_path(index_dir, shard, num_shards) / SKETCHES_NAME, np.float32, "sketch array")


def load_shard_refine(index_dir: Path, shard: int, num_shards: int) -> np.ndarray | None:
    """Memory-map one finished shard's refine rows (float16 (n, D)), or None when it was written without them."""
    path = sketch_shard_path(index_dir, shard, num_shards) / REFINE_NAME
    return _load_shard_matrix(path, np.float16, "refine array") if path.is_file() else None


def _load_shard_matrix(path: Path, dtype, what: str) -> np.ndarray:
    """A read-only memmap of a shard's 2-D `dtype` array, or a clear error naming the shard to re-run."""
    try:
        matrix = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InfluenceError(f"{path} is not a readable {what} ({exc}); delete its shard and re-run that shard") from exc
    if matrix.ndim != 2 or matrix.dtype != dtype:
        raise InfluenceError(f"{path} holds {matrix.dtype} {matrix.shape}, not {np.dtype(dtype).name} (n, d); delete its shard and "
                             "re-run that shard")
    return matrix


def load_shard_rows(index_dir: Path, shard: int, num_shards: int) -> pa.Table:
    """Read one finished shard's rows table."""
    path = sketch_shard_path(index_dir, shard, num_shards) / ROWS_NAME
    try:
        return pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise InfluenceError(f"{path} is not a readable Parquet file ({exc}); delete its shard and re-run that shard") from exc


def require_all_shards(index_dir: Path, num_shards: int) -> None:
    """Raise unless every shard of `num_shards` is finished, naming the missing ones."""
    if num_shards < 1:
        raise InfluenceError(f"num_shards must be at least 1, got {num_shards}; pass the number of shards the index stage wrote")
    missing = sorted(set(range(num_shards)) - set(finished_shards(index_dir, num_shards)))
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise InfluenceError(
            f"{len(missing)} of {num_shards} sketch shards are missing in {index_dir} (shards {shown}); "
            "re-run the index stage to finish them, or check that num_shards matches the run that wrote them"
        )


def iterate_shard_sketches(index_dir: Path, num_shards: int, block_size: int | None = None) -> Iterator[np.ndarray]:
    """Yield the stored sketches in shard order as read-only memmap blocks, for `exact_topk`.

    Args:
        index_dir: The index directory.
        num_shards: How many shards were written; all must be finished.
        block_size: Rows per block; None yields one block per shard (still lazy: a memmap).
    """
    require_all_shards(index_dir, num_shards)
    for shard in range(num_shards):
        sketches = load_shard_sketches(index_dir, shard, num_shards)
        step = block_size or max(sketches.shape[0], 1)
        for start in range(0, sketches.shape[0], step):
            yield sketches[start : start + step]  # (<= block_size, d)


def _rename_into_place(tmp: Path, final: Path) -> None:
    """Rename a finished temporary shard directory onto `final`, replacing an older one."""
    if not final.exists():
        os.replace(tmp, final)
        return
    # os.replace cannot overwrite a non-empty directory: move the old one aside first. The final
    # name is never a partial shard, only briefly absent; a concurrent reader then sees "not finished".
    LOG.warning("replacing existing sketch shard %s", final)
    trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
    os.replace(final, trash / final.name)
    os.replace(tmp, final)
    shutil.rmtree(trash, ignore_errors=True)


def _check_shard_number(shard: int, num_shards: int) -> None:
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise InfluenceError(f"shard {shard} of {num_shards} is out of range; shards are numbered 0..num_shards-1 with num_shards >= 1")


def check_sketches(sketches: np.ndarray, where: str) -> None:
    """Shape, dtype and finiteness of one block of sketches: what FAISS would silently accept."""
    if not isinstance(sketches, np.ndarray) or sketches.ndim != 2:
        shape = getattr(sketches, "shape", type(sketches).__name__)
        raise InfluenceError(f"{where}: sketches must be a 2-D numpy array (n, d), got {shape}; stack the sketches row-wise")
    if sketches.dtype != np.float32:
        raise InfluenceError(f"{where}: sketches must be float32, got {sketches.dtype}; convert with sketches.astype(np.float32)")
    if sketches.shape[1] == 0:
        raise InfluenceError(f"{where}: sketches have dimension 0; check the sketch projection's output size")
    if not np.isfinite(sketches).all():
        bad = np.flatnonzero(~np.isfinite(sketches).all(axis=1))
        raise InfluenceError(
            f"{where}: {bad.size} sketch rows contain NaN or inf (first rows {bad[:5].tolist()}); "
            "these come from overflowing gradients: check the damping and the model dtype (use float32), then re-run"
        )


def check_rows(rows: pa.Table, num_sketches: int, where: str) -> None:
    """The rows table must align one-to-one with the sketches and carry unique int64 seq ids."""
    if not isinstance(rows, pa.Table):
        raise InfluenceError(f"{where}: rows must be a pyarrow.Table, got {type(rows).__name__}; build it with pa.table({{...}})")
    if rows.num_rows != num_sketches:
        raise InfluenceError(f"{where}: {rows.num_rows} rows for {num_sketches} sketches; pass exactly one row per sketch, in the same order")
    if SEQ_ID not in rows.column_names or rows.schema.field(SEQ_ID).type != pa.int64():
        found = rows.schema.field(SEQ_ID).type if SEQ_ID in rows.column_names else "no such column"
        raise InfluenceError(f"{where}: rows need an int64 '{SEQ_ID}' column (found: {found}); cast it with pa.array(ids, pa.int64())")
    if INDEX_ID in rows.column_names:
        raise InfluenceError(f"{where}: the column '{INDEX_ID}' is reserved for the merged FAISS ids; rename or drop it")
    seq_ids = rows.column(SEQ_ID)
    if seq_ids.null_count:
        raise InfluenceError(f"{where}: '{SEQ_ID}' has {seq_ids.null_count} nulls; every sketch needs its sequence id")
    duplicates = duplicate_values(seq_ids.to_numpy())
    if duplicates.size:
        raise InfluenceError(f"{where}: duplicate {SEQ_ID}s {duplicates[:5].tolist()}; each sequence must be sketched once")


def check_refine(refine: np.ndarray, rows: pa.Table, where: str) -> None:
    """Refine rows: float16 (n, D), finite, one per row of `rows`, whose float32 `refine_scale` column gives their scales."""
    if not isinstance(refine, np.ndarray) or refine.ndim != 2 or refine.dtype != np.float16:
        shape = getattr(refine, "shape", type(refine).__name__)
        raise InfluenceError(f"{where}: refine rows must be a float16 (n, D) array, got {getattr(refine, 'dtype', '')} {shape}; "
                             "encode them with indexes.codes.encode_refine")
    if refine.shape[0] != rows.num_rows or REFINE_SCALE not in rows.column_names:
        raise InfluenceError(f"{where}: {refine.shape[0]} refine rows for {rows.num_rows} rows (with a '{REFINE_SCALE}' column: "
                             f"{REFINE_SCALE in rows.column_names}); pass one refine row per row and their scales")
    if not np.isfinite(refine).all():
        raise InfluenceError(f"{where}: refine rows contain NaN or inf; check the damping and the model dtype (use float32), then re-run")


def duplicate_values(values: np.ndarray) -> np.ndarray:
    """The values occurring more than once, sorted."""
    ordered = np.sort(values, kind="stable")
    return np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
