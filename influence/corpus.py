"""Corpus stage: documents (Parquet, JSONL or a `datasets` folder) -> tokenised sequences (Parquet).

Documents have a required `text` column and optional `doc_id`, `source` and `lang` columns, carried
through to every sequence cut from them. The chunking policy is `CorpusArgs`'s docstring. Every value is
checked where it is read, so a bad row is named by file and row number, never met as a traceback later.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from influence.arguments import CorpusArgs
from influence.artifacts import read_manifest, write_json, write_manifest, write_parquet
from influence.constants import ARGS_NAME, MANIFEST_NAME, SEQUENCES_NAME
from influence.errors import InfluenceError
from influence.models import load_tokenizer, require_model_dir
from influence.outputs import check_existing, prepare_output

LOG = logging.getLogger(__name__)
DOCUMENT_COLUMNS = ("doc_id", "text", "source", "lang")
DOCUMENT_SUFFIXES = (".parquet", ".jsonl", ".json")
SEQUENCES_SCHEMA = pa.schema([
    ("seq_id", pa.int64()), ("doc_id", pa.string()), ("chunk", pa.int32()), ("source", pa.string()),
    ("lang", pa.string()), ("input_ids", pa.list_(pa.int32())), ("num_tokens", pa.int32()), ("text", pa.string()),
])


def document_files(path: Path) -> list[Path]:
    """The files a documents path stands for: itself, or a folder's .parquet/.jsonl files or `datasets` arrow files."""
    if not path.exists():
        raise InfluenceError(f"documents {path} does not exist; pass a .parquet or .jsonl file, or a folder of them")
    if not path.is_file() and not path.is_dir():
        raise InfluenceError(f"documents {path} is neither a file nor a folder (a device or a pipe?); pass a .parquet or .jsonl "
                             "file, or a folder of them")
    if path.is_file():
        if path.suffix not in DOCUMENT_SUFFIXES:
            raise InfluenceError(f"unknown corpus format {path.suffix!r} for {path}; use .parquet, .jsonl or a datasets folder")
        return [path]
    if (path / "state.json").is_file() or (path / "dataset_info.json").is_file():
        files = sorted(path.glob("*.arrow"))
        if not files:
            raise InfluenceError(f"the datasets folder {path} holds no .arrow files; save it again with Dataset.save_to_disk")
        return files
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in DOCUMENT_SUFFIXES)
    if not files:
        raise InfluenceError(f"{path} has no .parquet or .jsonl files and is not a datasets folder; point to a folder of documents")
    return files


def file_fingerprint(path: Path) -> str:
    """A content hash of one file (blake2b, read in 4 MiB blocks: about a second per GB)."""
    digest = hashlib.blake2b(digest_size=16)
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint_documents(path: Path | str) -> str:
    """A content hash of the documents' files: a corpus records it, and refuses to be reused once they change."""
    digest = hashlib.blake2b(digest_size=16)
    for file in document_files(Path(path)):
        digest.update(file.name.encode() + b"\x00")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def _read_json_array(path: Path) -> Optional[list[dict]]:
    """A .json file holding one JSON array of documents (how many tools export), or None when it is JSON Lines."""
    with path.open("rb") as handle:
        head = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head.startswith(b"["):
        return None
    try:
        rows = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise InfluenceError(f"{path} is not UTF-8 ({exc.reason}); re-encode the file as UTF-8") from exc
    except (ValueError, RecursionError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply or a number too long"
        raise InfluenceError(f"{path} is not valid JSON ({reason}); fix the file, or write one document per line (JSONL)") from exc
    if not isinstance(rows, list):
        return None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise InfluenceError(f"{path} item {i} is not a JSON object; each document must be {{\"text\": ...}}")
    return [{"__line__": f"{path} item {i}", **row} for i, row in enumerate(rows)]


def _read_jsonl(path: Path) -> list[dict]:
    if path.suffix == ".json" and (array := _read_json_array(path)) is not None:
        return array
    rows = []
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            row = parse_json_line(raw, path, line_number)
            if row is None:
                continue
            if not isinstance(row, dict):
                raise InfluenceError(f"{path}:{line_number} is not a JSON object; each line must be {{\"text\": ...}}")
            rows.append({"__line__": f"{path}:{line_number}", **row})
    return rows


def parse_json_line(raw: bytes, path: Path, line_number: int):
    """One line of a JSONL file as a value, or None for a blank line; every way it can be bad is one InfluenceError.

    A UTF-8 byte-order mark on the first line is skipped (editors on Windows write one).
    """
    try:
        line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        raise InfluenceError(f"{path}:{line_number} is not UTF-8 ({exc.reason}); re-encode the file as UTF-8") from exc
    if not line.strip():
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise InfluenceError(f"{path}:{line_number} is not valid JSON ({exc.msg}); fix or remove that line") from exc
    except RecursionError as exc:
        raise InfluenceError(f"{path}:{line_number} is not valid JSON (nested too deeply); fix or remove that line") from exc
    except ValueError as exc:  # an integer of more than 4300 digits
        raise InfluenceError(f"{path}:{line_number} is not valid JSON ({str(exc).split(':')[0]}); fix or remove that line") from exc


def _read_columnar(path: Path) -> list[dict]:
    try:
        if path.suffix == ".arrow":
            with pa.memory_map(str(path)) as source:
                try:
                    table = pa.ipc.open_stream(source).read_all()
                except pa.ArrowInvalid:
                    table = pa.ipc.open_file(source).read_all()
        else:
            table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise InfluenceError(f"{path} is not a readable {'Arrow' if path.suffix == '.arrow' else 'Parquet'} file ({exc}); re-export it") from exc
    if table.num_rows and "text" not in table.column_names:
        raise InfluenceError(f"corpus {path} has no 'text' column (columns: {table.column_names}); rename the text column to 'text'")
    names = [n for n in table.column_names if n in DOCUMENT_COLUMNS]
    columns = {name: _column_values(table, name, path) for name in names}
    return [{"__line__": f"{path} row {i}", **{name: columns[name][i] for name in names}} for i in range(table.num_rows)]


def _column_values(table: pa.Table, name: str, path: Path) -> list:
    """A column as Python values. Parquet does not check that strings are UTF-8, so a bad one is named by row."""
    column = table.column(name)
    try:
        return column.to_pylist()
    except UnicodeDecodeError as exc:
        for row in range(len(column)):
            try:
                column[row].as_py()
            except UnicodeDecodeError:
                raise InfluenceError(f"corpus {path} row {row}: '{name}' is not UTF-8 ({exc.reason}); re-encode the file as UTF-8") from exc
        raise


def _as_text(value, where: str, name: str, required: bool) -> str | None:
    """A document field as a string: text must be a non-empty string; ids, sources and languages may be strings or finite
    numbers (an integer id 7 becomes "7"), never booleans, bytes, lists or maps. Missing values (null, NaN) are None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        if required:
            raise InfluenceError(f"{where} has no {name} ({value!r}); drop the row or fill it in")
        return None
    if isinstance(value, bytes):
        raise InfluenceError(f"{where}: '{name}' holds bytes, not text; store it as UTF-8 strings")
    if name == "text" and not isinstance(value, str):
        raise InfluenceError(f"{where}: 'text' is a {type(value).__name__} ({str(value)[:40]!r}), not a string; "
                             "store the text as a string")
    if isinstance(value, bool):
        raise InfluenceError(f"{where}: '{name}' is {json.dumps(value)}, a boolean; give a string (or a number)")
    if isinstance(value, float) and not math.isfinite(value):
        raise InfluenceError(f"{where}: '{name}' is {value}, not a finite number; give a string")
    if isinstance(value, (dict, list, tuple)):
        raise InfluenceError(f"{where}: '{name}' is a {type(value).__name__}, not a single value; flatten it to a string")
    text = value if isinstance(value, str) else str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InfluenceError(f"{where}: '{name}' holds a lone surrogate ({exc.object[exc.start:exc.end]!r}), which is not "
                             "valid Unicode; fix the JSON escape (\\ud83d alone is half of a character)") from exc
    if name == "text" and not text.strip():
        raise InfluenceError(f"{where} has no text ({value!r}); drop the row or fill it in")
    return text


def load_documents(path: Path | str) -> pa.Table:
    """Read documents and normalise them to the columns (doc_id, text, source, lang), all strings.

    Raises:
        InfluenceError: no documents, no `text` column, a row without text, a value of the wrong kind, a null or
            duplicate doc id.
    """
    path = Path(path)
    files = document_files(path)
    rows: list[dict] = []
    for file in files:
        found = _read_jsonl(file) if file.suffix in (".jsonl", ".json") else _read_columnar(file)
        if found and not any("text" in r for r in found):
            columns = sorted({k for r in found for k in r if k != "__line__"})
            raise InfluenceError(f"corpus {file} has no 'text' column (columns: {columns}); rename the text column to 'text'")
        rows += [(file, i, r) for i, r in enumerate(found)]
    if not rows:
        what = "holds no documents; add lines like {\"text\": \"...\"}" if files[0].suffix in (".jsonl", ".json") else \
            "is empty; it needs at least one document"
        raise InfluenceError(f"corpus {path} {what}")
    columns: dict[str, list] = {name: [] for name in DOCUMENT_COLUMNS}
    for file, i, row in rows:
        where = row["__line__"]
        columns["text"].append(_as_text(row.get("text"), where, "text", required=True))
        if "doc_id" in row:
            doc_id = _as_text(row["doc_id"], where, "doc_id", required=False)
            if doc_id is None:
                raise InfluenceError(f"{where} has a null doc_id; give every document an id, or drop the doc_id column")
        else:  # unique across a folder's files too
            doc_id = str(i) if len(files) == 1 else f"{file.stem}:{i}"
        columns["doc_id"].append(doc_id)
        columns["source"].append(_as_text(row.get("source"), where, "source", required=False) or file.stem)
        columns["lang"].append(_as_text(row.get("lang"), where, "lang", required=False) or "und")
    seen: dict[str, int] = {}
    for i, doc_id in enumerate(columns["doc_id"]):
        if doc_id in seen:
            raise InfluenceError(f"corpus {path} has duplicate doc_id {doc_id!r} ({rows[seen[doc_id]][2]['__line__']} and "
                                 f"{rows[i][2]['__line__']}); doc ids must be unique")
        seen[doc_id] = i
    return pa.table({name: pa.array(values, pa.string()) for name, values in columns.items()})


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
