"""Queries: a prompt and a completion whose log-probability we attribute to training documents.

The measurement is f = log p(completion | prompt), over completion tokens only. Its gradient is taken
as the gradient of the completion's summed negative log-likelihood, so that a positive influence
score means "upweighting this document raises p(completion | prompt)" (the paper's sign convention).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from influence.errors import InfluenceError


@dataclass(frozen=True)
class Query:
    """A prompt and completion. Translations of one query share a `group` (default: the query id)."""

    query_id: str
    prompt: str
    completion: str
    lang: str = "und"
    group: str = ""

    @property
    def group_id(self) -> str:
        return self.group or self.query_id


@dataclass(frozen=True)
class TokenizedQuery:
    query: Query
    prompt_ids: list[int]
    completion_ids: list[int]

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.completion_ids

    @property
    def completion_start(self) -> int:
        return len(self.prompt_ids)


def tokenize_query(query: Query, tokenizer, max_length: Optional[int] = None) -> TokenizedQuery:
    """Prompt with the tokenizer's special tokens, completion without, concatenated.

    Raises:
        InfluenceError: empty completion, a prompt that tokenizes to nothing, or a query longer than the context.
    """
    if not query.completion.strip():
        raise InfluenceError(f"query {query.query_id!r} has an empty completion; give the text whose probability to explain")
    if not tokenizer(query.prompt, add_special_tokens=False)["input_ids"]:
        raise InfluenceError(f"query {query.query_id!r}: the prompt tokenizes to nothing; give a non-empty prompt")
    prompt_ids = list(tokenizer(query.prompt, add_special_tokens=True)["input_ids"])
    completion_ids = list(tokenizer(query.completion, add_special_tokens=False)["input_ids"])
    if not completion_ids:
        raise InfluenceError(f"query {query.query_id!r}: the completion tokenizes to nothing; give a completion with text")
    total = len(prompt_ids) + len(completion_ids)
    if max_length is not None and total > max_length:
        raise InfluenceError(
            f"query {query.query_id!r} is {total} tokens ({len(prompt_ids)} prompt + {len(completion_ids)} completion), "
            f"longer than the model's context of {max_length}; shorten the prompt or the completion"
        )
    return TokenizedQuery(query, prompt_ids, completion_ids)


def load_queries(path: Path | str) -> list[Query]:
    """Queries from a JSONL file with fields prompt, completion and optional query_id (or id), lang and group.

    Every value is checked here, with the file and line in the message: prompt and completion must be strings (not
    null); a query id may be a string or a number, not null; lang and group may be left out or null (their defaults).
    """
    from influence.documents import parse_json_line

    path = Path(path)
    if path.is_dir():
        raise InfluenceError(f"query file {path} is a directory; pass a JSONL file with one {{\"prompt\": ..., \"completion\": ...}} per line")
    if not path.is_file():
        raise InfluenceError(f"query file {path} does not exist; pass a JSONL file with one {{\"prompt\": ..., \"completion\": ...}} per line")
    queries, seen = [], set()
    for line_number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        row = parse_json_line(raw, path, line_number)
        if row is None:
            continue
        where = f"{path}:{line_number}"
        if not isinstance(row, dict) or "prompt" not in row or "completion" not in row:
            raise InfluenceError(f"{where} needs the fields 'prompt' and 'completion'; give both on every line, e.g. "
                                 '{"prompt": "...", "completion": "..."}')
        for name in ("prompt", "completion"):
            if not isinstance(row[name], str):
                raise InfluenceError(f"{where}: '{name}' is {_shown(row[name])}, not a string; give the text")
        fields = {"query_id": _field(row.get("query_id", row.get("id", f"q{len(queries)}")), where, "query_id", None),
                  "lang": _field(row.get("lang"), where, "lang", "und"), "group": _field(row.get("group"), where, "group", "")}
        if fields["query_id"] in seen:
            raise InfluenceError(f"{where} repeats query id {fields['query_id']!r}; query ids must be unique")
        seen.add(fields["query_id"])
        for name, text in [("prompt", row["prompt"]), ("completion", row["completion"]), *fields.items()]:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise InfluenceError(f"{where}: '{name}' holds a lone surrogate; fix the JSON escape") from exc
        queries.append(Query(fields["query_id"], row["prompt"], row["completion"], fields["lang"], fields["group"]))
    if not queries:
        raise InfluenceError(f"query file {path} holds no queries; add lines like {{\"prompt\": ..., \"completion\": ...}}")
    return queries


def _shown(value) -> str:
    return json.dumps(value, ensure_ascii=True)[:60]


def _field(value, where: str, name: str, default: Optional[str]) -> str:
    """An optional string field: a string, or a finite number written as one; null means the default where there is one."""
    if value is None and default is not None:
        return default
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return str(value)
    raise InfluenceError(f"{where}: '{name}' is {_shown(value)}; give a string" + (" or leave the field out" if default is not None else ""))
