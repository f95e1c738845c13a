"""Queries: a prompt and a completion whose log-probability we attribute to training documents.

The measurement is f = log p(completion | prompt), over completion tokens only. Its gradient is taken
as the gradient of the completion's summed negative log-likelihood, so that a positive influence
score means "upweighting this document raises p(completion | prompt)" (the paper's sign convention).
"""

from __future__ import annotations

import json
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
        raise InfluenceError(f"query {query.query_id!r}: the completion tokenizes to nothing")
    total = len(prompt_ids) + len(completion_ids)
    if max_length is not None and total > max_length:
        raise InfluenceError(
            f"query {query.query_id!r} is {total} tokens ({len(prompt_ids)} prompt + {len(completion_ids)} completion), "
            f"longer than the model's context of {max_length}; shorten the prompt or the completion"
        )
    return TokenizedQuery(query, prompt_ids, completion_ids)


def load_queries(path: Path | str) -> list[Query]:
    """Queries from a JSONL file with fields prompt, completion and optional query_id (or id), lang and group."""
    path = Path(path)
    if not path.is_file():
        raise InfluenceError(f"query file {path} does not exist; pass a JSONL file with one {{\"prompt\": ..., \"completion\": ...}} per line")
    queries, seen = [], set()
    for line_number, raw in enumerate(path.read_bytes().splitlines(), start=1):
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
        if not isinstance(row, dict) or "prompt" not in row or "completion" not in row:
            raise InfluenceError(f"{path}:{line_number} needs the fields 'prompt' and 'completion'")
        for name in ("prompt", "completion"):
            if not isinstance(row[name], str):
                raise InfluenceError(f"{path}:{line_number}: '{name}' is {json.dumps(row[name])}, not a string; give the text")
        fields = {}
        for name, default in (("query_id", row.get("id", f"q{len(queries)}")), ("lang", "und"), ("group", "")):
            value = row.get(name, default)
            if value is None or isinstance(value, (dict, list, bool)):
                raise InfluenceError(f"{path}:{line_number}: '{name}' is {json.dumps(value)}; give a string or leave the field out")
            fields[name] = str(value)
        if fields["query_id"] in seen:
            raise InfluenceError(f"{path}:{line_number} repeats query id {fields['query_id']!r}; query ids must be unique")
        seen.add(fields["query_id"])
        for name, text in [("prompt", row["prompt"]), ("completion", row["completion"]), *fields.items()]:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise InfluenceError(f"{path}:{line_number}: '{name}' holds a lone surrogate; fix the JSON escape") from exc
        queries.append(Query(fields["query_id"], row["prompt"], row["completion"], fields["lang"], fields["group"]))
    if not queries:
        raise InfluenceError(f"query file {path} holds no queries; add lines like {{\"prompt\": ..., \"completion\": ...}}")
    return queries

