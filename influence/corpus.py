"""Corpus stage: documents (Parquet, JSONL or a `datasets` folder) -> tokenised sequences (Parquet).

Documents have a required `text` column and optional `doc_id`, `source` and `lang` columns, carried
through to every sequence cut from them. The chunking policy is `CorpusArgs`'s docstring.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from influence.arguments import CorpusArgs
from influence.artifacts import read_manifest, write_manifest, write_parquet, write_json
from influence.constants import ARGS_NAME, SEQUENCES_NAME
from influence.errors import InfluenceError
from influence.models import fingerprint_model, load_tokenizer

LOG = logging.getLogger(__name__)
DOCUMENT_COLUMNS = ("doc_id", "text", "source", "lang")


def _read_jsonl(path: Path) -> pa.Table:
    rows = []
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InfluenceError(f"{path}:{line_number} is not UTF-8 ({exc.reason}); re-encode the file as UTF-8") from exc
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InfluenceError(f"{path}:{line_number} is not valid JSON ({exc.msg}); fix or remove that line") from exc
            if not isinstance(row, dict):
                raise InfluenceError(f"{path}:{line_number} is not a JSON object; each line must be {{\"text\": ...}}")
            rows.append(row)
    if not rows:
        raise InfluenceError(f"{path} holds no documents; add lines like {{\"text\": \"...\"}}")
    return pa.Table.from_pylist(rows)


def _read_table(path: Path) -> pa.Table:
    if not path.exists():
        raise InfluenceError(f"corpus {path} does not exist; pass a .parquet, .jsonl or datasets folder")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            import datasets

            try:
                return datasets.load_from_disk(str(path)).data.table
            except Exception as exc:
                raise InfluenceError(f"cannot read the datasets folder {path} ({exc}); save it again with Dataset.save_to_disk") from exc
        files = sorted(path.glob("*.parquet")) + sorted(path.glob("*.jsonl"))
        if not files:
            raise InfluenceError(f"{path} has no .parquet or .jsonl files and is not a datasets folder; point to a folder of documents")
        return pa.concat_tables([_read_table(f) for f in files], promote_options="default")
    if path.suffix in (".jsonl", ".json"):
        return _read_jsonl(path)
    if path.suffix == ".parquet":
        try:
            return pq.read_table(path)
        except Exception as exc:
            raise InfluenceError(f"{path} is not a readable Parquet file ({exc}); re-export it") from exc
    raise InfluenceError(f"unknown corpus format {path.suffix!r} for {path}; use .parquet, .jsonl or a datasets folder")


def load_documents(path: Path | str) -> pa.Table:
    """Read documents and normalise them to the columns (doc_id, text, source, lang), all strings.

    Raises:
        InfluenceError: no documents, no `text` column, a row without text, or duplicate doc ids.
    """
    path = Path(path)
    table = _read_table(path)
    if table.num_rows == 0:
        raise InfluenceError(f"corpus {path} is empty; it needs at least one document")
    if "text" not in table.column_names:
        raise InfluenceError(f"corpus {path} has no 'text' column (columns: {table.column_names}); rename the text column to 'text'")
    texts = _column_values(table, "text", path)
    for row, text in enumerate(texts):
        if isinstance(text, bytes):
            raise InfluenceError(f"corpus {path} row {row} holds bytes, not text; store the 'text' column as UTF-8 strings")
        if not isinstance(text, str) or not text.strip():
            raise InfluenceError(f"corpus {path} row {row} has no text ({text!r}); drop the row or fill it in")
    n = table.num_rows
    doc_ids = [str(v) for v in _column_values(table, "doc_id", path)] if "doc_id" in table.column_names else [str(i) for i in range(n)]
    if len(set(doc_ids)) != n:
        duplicate = next(d for i, d in enumerate(doc_ids) if d in doc_ids[:i])
        raise InfluenceError(f"corpus {path} has duplicate doc_id {duplicate!r}; doc ids must be unique")

    def optional(name: str, default: str) -> list[str]:
        if name not in table.column_names:
            return [default] * n
        return [default if v is None else str(v) for v in _column_values(table, name, path)]

    return pa.table({"doc_id": doc_ids, "text": texts, "source": optional("source", path.stem), "lang": optional("lang", "und")})


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


def tokenize_documents(documents: pa.Table, tokenizer, args: CorpusArgs, progress: bool = True) -> pa.Table:
    columns = {name: [] for name in ("seq_id", "doc_id", "chunk", "source", "lang", "input_ids", "num_tokens", "text")}
    rows = documents.to_pylist()
    for row in tqdm(rows, desc="tokenise", unit="doc", disable=not progress):
        ids = tokenizer(row["text"], add_special_tokens=args.add_special_tokens)["input_ids"]
        for chunk_number, chunk in enumerate(chunk_token_ids(ids, args)):
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
    schema = pa.schema([
        ("seq_id", pa.int64()), ("doc_id", pa.string()), ("chunk", pa.int32()), ("source", pa.string()),
        ("lang", pa.string()), ("input_ids", pa.list_(pa.int32())), ("num_tokens", pa.int32()), ("text", pa.string()),
    ])
    return pa.table(columns, schema=schema)


def prepare_corpus(documents_path: Path | str, model_dir: Path | str, out_dir: Path | str, args: CorpusArgs = CorpusArgs(),
                   progress: bool = True) -> Path:
    """Tokenise documents with the model's tokenizer and write `sequences.parquet` plus a manifest.

    Skips the work when `out_dir` already holds the same corpus built with the same arguments.
    """
    out_dir = Path(out_dir)
    tokenizer_fingerprint = _tokenizer_fingerprint(Path(model_dir))
    if (out_dir / SEQUENCES_NAME).exists() and (out_dir / "manifest.json").exists():
        manifest = read_manifest(out_dir, "corpus")
        args.require_matches(manifest["args"], str(out_dir))
        if manifest["tokenizer_fingerprint"] == tokenizer_fingerprint and manifest["documents"] == str(Path(documents_path).resolve()):
            LOG.info("corpus %s already prepared; skipping", out_dir)
            return out_dir
        raise InfluenceError(f"{out_dir} already holds another corpus or tokenizer; choose a new output directory")
    start = time.perf_counter()
    documents = load_documents(documents_path)
    table = tokenize_documents(documents, load_tokenizer(Path(model_dir)), args, progress=progress)
    write_parquet(out_dir / SEQUENCES_NAME, table)
    write_json(out_dir / ARGS_NAME, args.to_dict())
    write_manifest(
        out_dir, "corpus", corpus_fingerprint=fingerprint_sequences(table), tokenizer_fingerprint=tokenizer_fingerprint,
        model_dir=str(Path(model_dir).resolve()), documents=str(Path(documents_path).resolve()), args=args.to_dict(),
        num_documents=documents.num_rows, num_sequences=table.num_rows, num_tokens=sum(table["num_tokens"].to_pylist()),
    )
    LOG.info("corpus: %d documents -> %d sequences in %.1fs", documents.num_rows, table.num_rows, time.perf_counter() - start)
    return out_dir


def _tokenizer_fingerprint(model_dir: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "tokenizer_config.json"):
        path = model_dir / name
        if path.is_file():
            digest.update(name.encode() + path.read_bytes())
    return digest.hexdigest()


def load_sequences(corpus_dir: Path | str) -> tuple[pa.Table, dict]:
    """The sequences table and the corpus manifest (which holds the corpus fingerprint)."""
    corpus_dir = Path(corpus_dir)
    manifest = read_manifest(corpus_dir, "corpus")
    try:
        table = pq.read_table(corpus_dir / SEQUENCES_NAME)
    except Exception as exc:
        raise InfluenceError(f"{corpus_dir / SEQUENCES_NAME} is unreadable ({exc}); re-run `influence corpus`") from exc
    return table, manifest


def require_fits_context(sequences: pa.Table, model, corpus_dir: Path | str) -> None:
    """Refuse sequences longer than the model's context: they would run past its position embeddings."""
    from influence.queries import context_length

    limit, longest = context_length(model), max(sequences["num_tokens"].to_pylist(), default=0)
    if limit is not None and longest > limit:
        raise InfluenceError(f"corpus {corpus_dir} has sequences of up to {longest} tokens but the model's context is {limit}; "
                             f"re-run `influence corpus` with --max-length {limit} or less")


def iterate_batches(sequences: pa.Table, batch_size: int, rows: range | None = None) -> Iterator[tuple[list[int], list[list[int]]]]:
    """(seq_ids, input_ids) batches over `rows` (default: all), in order."""
    rows = rows if rows is not None else range(sequences.num_rows)
    seq_ids = sequences["seq_id"]
    input_ids = sequences["input_ids"]
    for start in range(rows.start, rows.stop, batch_size):
        stop = min(start + batch_size, rows.stop)
        yield seq_ids[start:stop].to_pylist(), input_ids[start:stop].to_pylist()
