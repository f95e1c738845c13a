"""The `chatterbot-corpus` dialogues as a document table: a small, multilingual, assistant-style corpus.

The PyPI package `chatterbot-corpus` ships YAML files `chatterbot_corpus/data/<language>/<topic>.yml`,
each with `categories` and `conversations` (lists of turns). They are read in place from the installed
package (never copied into this repository) and rendered as one document per conversation, turns
alternating between the user and the assistant:

    User: What is AI?
    Assistant: Artificial Intelligence is the branch of engineering and science ...

`doc_id` is `<language>/<topic>/<index of the conversation in its file>`, so a document can always be
traced back to its YAML entry.
"""

from __future__ import annotations

import importlib.resources
import logging
from pathlib import Path
from typing import Iterable, Union

import pyarrow as pa
import yaml

from influence.artifacts import write_parquet
from influence.errors import InfluenceError

LOG = logging.getLogger(__name__)

PACKAGE = "chatterbot_corpus"
DEFAULT_TURN_FORMAT = "User: {}\nAssistant: {}"

#: Language directory -> BCP 47 tag (ISO 639-1 where one exists).
LANGUAGE_CODES = {
    "bengali": "bn", "chinese": "zh", "dutch": "nl", "english": "en", "french": "fr", "german": "de",
    "hebrew": "he", "hindi": "hi",
    "hinglish": "hi-Latn",  # Hindi-English code-mixing in Latin script has no ISO code of its own
    "indonesian": "id", "italian": "it", "japanese": "ja", "korean": "ko", "marathi": "mr", "oriya": "or",
    "persian": "fa", "portuguese": "pt", "russian": "ru", "spanish": "es", "swedish": "sv", "tamil": "ta",
    "telugu": "te", "thai": "th", "traditionalchinese": "zh-Hant", "turkish": "tr", "ukrainian": "uk",
    "urdu": "ur", "yoruba": "yo",
}
SCHEMA = pa.schema([("doc_id", pa.string()), ("text", pa.string()), ("source", pa.string()), ("lang", pa.string())])

try:  # the C loader is ~10x faster; BaseLoader keeps every scalar a string ('yes', '1984' stay text)
    _LOADER = yaml.CBaseLoader
except AttributeError:  # pragma: no cover - PyYAML built without libyaml
    _LOADER = yaml.BaseLoader


def read_yaml(text: str):
    """A YAML document as plain data: BaseLoader builds only strings, lists and maps (no objects, no type tags)."""
    return yaml.load(text, Loader=_LOADER)


def chatterbot_data_dir():
    """The installed package's `data/` directory (an importlib.resources Traversable)."""
    try:
        data = importlib.resources.files(PACKAGE) / "data"
    except ModuleNotFoundError as exc:
        raise InfluenceError("the chatterbot-corpus package is not installed; `pip install chatterbot-corpus`") from exc
    if not data.is_dir():
        raise InfluenceError(f"the installed {PACKAGE} package has no data/ directory; reinstall chatterbot-corpus")
    return data


def available_languages() -> list[str]:
    """Language directories shipped by the installed package, sorted."""
    return sorted(entry.name for entry in chatterbot_data_dir().iterdir() if entry.is_dir() and not entry.name.startswith(("_", ".")))


def _resolve_languages(languages: Union[str, Iterable[str], None]) -> list[str]:
    """Directory names for `languages` (directory names or language codes; None = all)."""
    available = available_languages()
    if languages is None:
        return available
    if isinstance(languages, str):
        languages = [languages]
    by_code = {code: name for name, code in LANGUAGE_CODES.items() if name in available}
    resolved = []
    for language in languages:
        name = language if language in available else by_code.get(language)
        if name is None:
            raise InfluenceError(
                f"chatterbot-corpus has no language {language!r}; available: {', '.join(available)} "
                f"(or their codes: {', '.join(sorted(by_code))})"
            )
        if name not in resolved:
            resolved.append(name)
    if not resolved:
        raise InfluenceError(f"no language given; choose among {', '.join(available)}")
    return resolved


def _turns(conversation) -> list[str]:
    """A YAML conversation as a list of non-empty turn strings.

    A conversation that YAML folded into one string (a mis-indented `- - ` in the source) is kept as a
    single turn; non-string turns are converted with str().
    """
    if conversation is None:
        return []
    if not isinstance(conversation, list):
        conversation = [conversation]
    turns = [turn if isinstance(turn, str) else str(turn) for turn in conversation if turn is not None]
    return [turn.strip() for turn in turns if turn.strip()]


def render_conversation(turns: list[str], turn_format: str = DEFAULT_TURN_FORMAT) -> str:
    """Pairs of turns through `turn_format` (two `{}` slots), one pair after another on new lines.

    A trailing unanswered turn is rendered with the part of the format up to its first slot.
    """
    user_only = turn_format[: turn_format.index("{}") + 2]
    lines = [turn_format.format(turns[i], turns[i + 1]) for i in range(0, len(turns) - 1, 2)]
    if len(turns) % 2:
        lines.append(user_only.format(turns[-1]))
    return "\n".join(lines)


def chatterbot_documents(languages: Union[str, Iterable[str], None] = ("english",),
                         turn_format: str = DEFAULT_TURN_FORMAT) -> pa.Table:
    """One document per conversation of the given languages (None = all), as (doc_id, text, source, lang).

    Args:
        languages: language directory names ("english") or their codes ("en"); None for every language.
        turn_format: how a (user, assistant) pair of turns is written; must hold exactly two `{}` slots.

    Raises:
        InfluenceError: an unknown language (the message lists the available ones), a bad turn format,
            or a YAML file that cannot be parsed.
    """
    if turn_format.count("{}") != 2 or turn_format.replace("{}", "").count("{") or turn_format.replace("{}", "").count("}"):
        raise InfluenceError(f"turn_format must hold exactly two '{{}}' slots (user, assistant), got {turn_format!r}")
    data = chatterbot_data_dir()
    columns: dict[str, list[str]] = {name: [] for name in SCHEMA.names}
    for language in _resolve_languages(languages):
        code = LANGUAGE_CODES.get(language, "und")
        topics = sorted((f for f in (data / language).iterdir() if f.name.endswith((".yml", ".yaml"))), key=lambda f: f.name)
        skipped = 0
        for topic_file in topics:
            topic = topic_file.name.rsplit(".", 1)[0]
            try:
                content = read_yaml(topic_file.read_text(encoding="utf-8"))
            except yaml.YAMLError as exc:
                raise InfluenceError(f"cannot parse chatterbot-corpus file {language}/{topic_file.name}: {exc}") from exc
            conversations = content.get("conversations") if isinstance(content, dict) else None
            for index, conversation in enumerate(conversations or []):
                turns = _turns(conversation)
                if not turns:
                    skipped += 1
                    continue
                columns["doc_id"].append(f"{language}/{topic}/{index}")
                columns["text"].append(render_conversation(turns, turn_format))
                columns["source"].append(topic)
                columns["lang"].append(code)
        if skipped:
            LOG.info("chatterbot %s: skipped %d empty conversations", language, skipped)
    if not columns["doc_id"]:
        raise InfluenceError(f"chatterbot-corpus has no conversations for {languages!r}")
    return pa.table(columns, schema=SCHEMA)


def write_chatterbot_corpus(path: Path | str, languages: Union[str, Iterable[str], None] = ("english",),
                            turn_format: str = DEFAULT_TURN_FORMAT) -> Path:
    """Write `chatterbot_documents(languages, turn_format)` to `path` as Parquet, atomically; returns `path`."""
    path = Path(path)
    table = chatterbot_documents(languages, turn_format)
    write_parquet(path, table)
    LOG.info("wrote %d chatterbot documents to %s", table.num_rows, path)
    return path

