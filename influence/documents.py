"""Documents as users bring them: Parquet, JSONL, a JSON array, a `datasets` folder, or a folder of those files.

`load_documents` reads them into one table of strings (doc_id, text, source, lang); every value is checked where it
is read, so a bad row is named by file and row number (or line), never met as a traceback later. `fingerprint_documents`
hashes the files, so a corpus cut from them notices when they change.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq

from influence.artifacts import hash_file
from influence.errors import InfluenceError

DOCUMENT_COLUMNS = ("doc_id", "text", "source", "lang")
DOCUMENT_SUFFIXES = (".parquet", ".jsonl", ".json")


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


def fingerprint_documents(path: Path | str) -> str:
    """A content hash of the documents' files: a corpus records it, and refuses to be reused once they change."""
    digest = hashlib.blake2b(digest_size=16)
    for file in document_files(Path(path)):
        digest.update(file.name.encode() + b"\x00")
        hash_file(digest, file)
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
