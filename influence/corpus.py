"""Corpus stage: documents (Parquet, JSONL or a `datasets` folder, read by `documents.py`) -> tokenised sequences
(Parquet).

Documents have a required `text` column and optional `doc_id`, `source` and `lang` columns, carried
through to every sequence cut from them. The chunking policy is `CorpusArgs`'s docstring.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from influence.arguments import CorpusArgs
from influence.artifacts import file_fingerprint, read_manifest, write_json, write_manifest, write_parquet
from influence.constants import ARGS_NAME, MANIFEST_NAME, SEQUENCES_NAME
from influence.documents import document_files, fingerprint_documents, load_documents
from influence.errors import InfluenceError
from influence.models import load_tokenizer, require_model_dir
from influence.outputs import check_existing, prepare_output

LOG = logging.getLogger(__name__)
SEQUENCES_SCHEMA = pa.schema([
    ("seq_id", pa.int64()), ("doc_id", pa.string()), ("chunk", pa.int32()), ("source", pa.string()),
    ("lang", pa.string()), ("input_ids", pa.list_(pa.int32())), ("num_tokens", pa.int32()), ("text", pa.string()),
])


def chunk_token_ids(ids: list[int], args: CorpusArgs) -> list[list[int]]:
    """Cut one document's tokens by the policy in `CorpusArgs`."""
    if args.policy == "truncate":
        chunks = [ids[: args.max_length]]
    else:
        chunks = [ids[start : start + args.max_length] for start in range(0, len(ids), args.max_length)]
    return [chunk for chunk in chunks if len(chunk) >= args.min_tokens]


def fingerprint_sequences(table: pa.Table) -> str:
    """A content hash of the tokenised corpus: ids and tokens, in order."""
    digest = hashlib.blake2b(digest_size=16)
    for doc_id, chunk, ids in zip(table["doc_id"].to_pylist(), table["chunk"].to_pylist(), table["input_ids"].to_pylist()):
        digest.update(f"{doc_id}\x00{chunk}\x00{len(ids)}\x00".encode())
        digest.update(pa.array(ids, pa.int32()).buffers()[1].to_pybytes())
    return digest.hexdigest()


def tokenize_documents(documents: pa.Table, tokenizer, args: CorpusArgs, progress: bool = True) -> tuple[pa.Table, int]:
    """Sequences cut from the documents, and how many chunks were dropped for being shorter than `min_tokens`
    (`dropped_documents(table, documents)` counts the documents left with no sequence at all)."""
    columns: dict[str, list] = {name: [] for name in SEQUENCES_SCHEMA.names}
    dropped = 0
    for row in tqdm(documents.to_pylist(), desc="tokenise", unit="doc", disable=not progress):
        ids = tokenizer(row["text"], add_special_tokens=args.add_special_tokens)["input_ids"]
        chunks = chunk_token_ids(ids, args)
        dropped += max(1 if args.policy == "truncate" else -(-len(ids) // args.max_length), 1) - len(chunks)
        for chunk_number, chunk in enumerate(chunks):
            columns["seq_id"].append(len(columns["seq_id"]))
            columns["doc_id"].append(row["doc_id"])
            columns["chunk"].append(chunk_number)
            columns["source"].append(row["source"])
            columns["lang"].append(row["lang"])
            columns["input_ids"].append(chunk)
            columns["num_tokens"].append(len(chunk))
            columns["text"].append(tokenizer.decode(chunk, skip_special_tokens=True))
    if not columns["seq_id"]:
        raise InfluenceError(f"no document yields a sequence of at least {args.min_tokens} tokens; lower min_tokens or add text")
    return pa.table(columns, schema=SEQUENCES_SCHEMA), dropped


def tokenizer_fingerprint(model_dir: Path | str) -> str:
    """A hash of the tokenizer's definition files: a corpus is usable only with the tokenizer that cut it."""
    digest = hashlib.blake2b(digest_size=16)
    model_dir = Path(model_dir)
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "special_tokens_map.json"):
        path = model_dir / name
        if path.is_file():
            digest.update(name.encode() + path.read_bytes())
    config = model_dir / "tokenizer_config.json"
    if config.is_file():  # only what changes the ids: not the paths and names a save writes there
        try:
            settings = json.loads(config.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            settings = {"unreadable": config.read_bytes().hex()}
        kept = {k: v for k, v in settings.items() if k not in ("name_or_path", "tokenizer_file", "auto_map")} if isinstance(settings, dict) else settings
        digest.update(json.dumps(kept, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def prepare_corpus(documents_path: Path | str, model_dir: Path | str, out_dir: Path | str, args: CorpusArgs = CorpusArgs(),
                   progress: bool = True) -> Path:
    """Tokenise documents with the model's tokenizer and write `sequences.parquet` plus a manifest.

    Skips the work when `out_dir` already holds this corpus (same documents' content, tokenizer and arguments);
    refuses when it holds a corpus of other documents, so a stale corpus is never reused.
    """
    documents_path, out_dir = Path(documents_path).resolve(), Path(out_dir).resolve()
    model_dir = require_model_dir(model_dir)
    tokenizer_id = tokenizer_fingerprint(model_dir)
    documents_id = fingerprint_documents(documents_path)
    inputs = {"documents": documents_path, "model": model_dir}
    check_existing(out_dir, "corpus", inputs)
    if (out_dir / MANIFEST_NAME).exists():
        manifest = read_manifest(out_dir, "corpus")
        args.require_matches(manifest["args"], str(out_dir))
        if manifest.get("documents_fingerprint") != documents_id:
            raise InfluenceError(f"{out_dir} holds a corpus prepared from other documents (or from {documents_path} before it "
                                 "changed); write this corpus to a new --out directory, or delete the old one")
        if manifest["tokenizer_fingerprint"] != tokenizer_id:
            raise InfluenceError(f"{out_dir} holds a corpus cut by another tokenizer than {model_dir}'s; write to a new --out directory")
        LOG.info("corpus %s already prepared; skipping", out_dir)
        return out_dir
    needed = 2 * sum(f.stat().st_size for f in document_files(documents_path))  # text, token ids and decoded text, compressed
    with prepare_output(out_dir, "corpus", inputs, needed_bytes=needed):
        start = time.perf_counter()
        documents = load_documents(documents_path)
        table, dropped = tokenize_documents(documents, load_tokenizer(model_dir), args, progress=progress)
        lost = documents.num_rows - len(set(table["doc_id"].to_pylist()))
        if dropped:
            LOG.warning("dropped %d chunks shorter than %d tokens (min_tokens), %d of them whole documents", dropped,
                        args.min_tokens, lost)
        write_parquet(out_dir / SEQUENCES_NAME, table)
        sequences_file = file_fingerprint(out_dir / SEQUENCES_NAME)
        write_json(out_dir / ARGS_NAME, args.to_dict())
        write_manifest(
            out_dir, "corpus", corpus_fingerprint=fingerprint_sequences(table), tokenizer_fingerprint=tokenizer_id,
            documents_fingerprint=documents_id, model_dir=str(model_dir), documents=str(documents_path), args=args.to_dict(),
            num_documents=documents.num_rows, num_sequences=table.num_rows, num_tokens=int(sum(table["num_tokens"].to_pylist())),
            num_dropped=dropped, num_dropped_documents=lost, sequences_file_fingerprint=sequences_file,
        )
    LOG.info("corpus: %d documents -> %d sequences in %.1fs", documents.num_rows, table.num_rows, time.perf_counter() - start)
    return out_dir


def load_sequences(corpus_dir: Path | str) -> tuple[pa.Table, dict]:
    """The sequences table and the corpus manifest (which holds the corpus fingerprint).

    `seq_id` is the row position (the corpus stage numbers rows 0..n-1); it is checked here so every reader can
    index rows by it.
    """
    corpus_dir = Path(corpus_dir)
    manifest = read_manifest(corpus_dir, "corpus")
    recorded = manifest.get("sequences_file_fingerprint")
    if isinstance(recorded, str) and (corpus_dir / SEQUENCES_NAME).is_file() and file_fingerprint(corpus_dir / SEQUENCES_NAME) != recorded:
        raise InfluenceError(f"{corpus_dir / SEQUENCES_NAME} changed after the corpus stage wrote it (edited or replaced); "
                             "re-run `influence corpus` into a new directory")
    try:
        table = pq.read_table(corpus_dir / SEQUENCES_NAME)
    except (OSError, pa.ArrowException) as exc:
        raise InfluenceError(f"{corpus_dir / SEQUENCES_NAME} is unreadable ({exc}); re-run `influence corpus`") from exc
    missing = [name for name in SEQUENCES_SCHEMA.names if name not in table.column_names]
    if missing or not np.array_equal(table["seq_id"].to_numpy(), np.arange(table.num_rows)):
        raise InfluenceError(f"{corpus_dir / SEQUENCES_NAME} was edited (columns missing: {missing} or seq_id is not the row "
                             "number); re-run `influence corpus` into a new directory")
    return table, manifest


def require_same_tokenizer(corpus_manifest: dict, model_dir: Path | str, corpus_dir: Path | str) -> None:
    """Refuse a corpus cut by another tokenizer: its token ids would mean other words to this model."""
    if corpus_manifest["tokenizer_fingerprint"] != tokenizer_fingerprint(model_dir):
        raise InfluenceError(f"corpus {corpus_dir} was tokenised with another tokenizer than {model_dir}'s; re-run "
                             "`influence corpus` with this model into a new directory")


def require_fits_context(sequences: pa.Table, context: int | None, corpus_dir: Path | str) -> None:
    """Refuse sequences longer than the model's context: they would run past its position embeddings."""
    longest = max(sequences["num_tokens"].to_pylist(), default=0)
    if context is not None and longest > context:
        raise InfluenceError(f"corpus {corpus_dir} has sequences of up to {longest} tokens but the model's context is {context}; "
                             f"re-run `influence corpus` with --max-length {context} or less")


@dataclass(frozen=True)
class TokenRows:
    """Some sequences of a corpus as flat arrays: what a task sends a worker (compact, picklable, zero-copy in Ray)."""

    seq_ids: np.ndarray   # (n,) int64
    offsets: np.ndarray   # (n + 1,) int64 into `ids`
    ids: np.ndarray       # (total tokens,) int32

    def __len__(self) -> int:
        return len(self.seq_ids)

    @property
    def lengths(self) -> list[int]:
        return np.diff(self.offsets).tolist()

    def sequence(self, i: int) -> list[int]:
        return self.ids[self.offsets[i] : self.offsets[i + 1]].tolist()


def token_rows(sequences: pa.Table, rows: range | np.ndarray) -> TokenRows:
    """TokenRows of the given row positions (a range or an array) of a sequences table."""
    if isinstance(rows, range):
        part = sequences.slice(rows.start, len(rows))
    else:
        part = sequences.take(pa.array(np.asarray(rows, dtype=np.int64)))
    column = part["input_ids"].combine_chunks()
    offsets = column.offsets.to_numpy().astype(np.int64)
    ids = column.values.to_numpy()[offsets[0] : offsets[-1]].astype(np.int32)
    return TokenRows(part["seq_id"].to_numpy().astype(np.int64), offsets - offsets[0], ids)


def shard_rows(num_rows: int, shard: int, num_shards: int) -> range:
    """Contiguous rows of one shard; shards differ in size by at most one row."""
    if not 0 <= shard < num_shards:
        raise InfluenceError(f"shard {shard} is outside 0..{num_shards - 1}")
    return range(shard * num_rows // num_shards, (shard + 1) * num_rows // num_shards)
