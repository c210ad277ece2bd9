"""The demo corpus: a small English corpus read at run time from the installed ``gensim`` package.

Two sources, both shipped in gensim's test data (``gensim/test/test_data``); no text is copied into
this repository:

* ``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``: 206 pages of an English
  Wikipedia dump (CC BY-SA). 99 of them are redirects and one is empty, which leaves 106 articles.
  Wiki markup is removed with gensim's ``filter_wiki`` and a second clean-up pass here.
* ``lee_background.cor``: 300 short news articles (the Lee corpus), one per line.

``demo_documents()`` returns about 400 documents (~3.3 M characters, ~1 M tokens at vocab 4096).
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import html
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CORPUS_VERSION",
    "Document",
    "LEE_FILE",
    "WIKI_FILE",
    "clean_wiki_text",
    "corpus_files",
    "corpus_fingerprint",
    "demo_documents",
    "split_documents",
]

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_FILE = "lee_background.cor"
WIKI_SOURCE = "enwiki"
LEE_SOURCE = "lee_background"

#: Bump when the cleaning below changes, so cached demo data is rebuilt.
CORPUS_VERSION = 1

_MISSING_GENSIM = "The demo corpus is read from the gensim package: pip install -e '.[demo]'"

# A page is kept when its cleaned text has at least this many words.
_MIN_WORDS = 50


@dataclass(frozen=True)
class Document:
    """One document of the demo corpus."""

    source: str  # "enwiki" or "lee_background"
    title: str  # the Wikipedia page title, or "lee_background-NNN" (0-based line number)
    text: str

    @property
    def key(self) -> str:
        return f"{self.source}/{self.title}"


def _test_data_dir() -> Path:
    try:
        import gensim
    except ImportError as err:
        raise ImportError(_MISSING_GENSIM) from err
    return Path(gensim.__file__).resolve().parent / "test" / "test_data"


def corpus_files() -> tuple[Path, Path]:
    """The (wikipedia dump, Lee corpus) files inside the installed gensim package."""
    directory = _test_data_dir()
    files = (directory / WIKI_FILE, directory / LEE_FILE)
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(
                f"demo corpus file {str(path)!r} is missing from the installed gensim package "
                "(its test data was stripped?). Reinstall gensim from PyPI: "
                "pip install --force-reinstall gensim"
            )
    return files


def corpus_fingerprint() -> str:
    """A hash of the corpus source files and of the cleaning code version (cheap: no parsing)."""
    digest = hashlib.sha256(f"megatron-tst demo corpus v{CORPUS_VERSION}".encode())
    for path in corpus_files():
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Wikipedia clean-up
# --------------------------------------------------------------------------------------------------
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1$")
_DROP_LINE = re.compile(
    r"^(\{\||\|\}|\||!|\{\{|\}\}|\[\[|\]\]|(category|file|image|media)\s*:)", re.IGNORECASE
)
_LIST_MARKER = re.compile(r"^(?:[*#:;=]+\s*)+")  # list markers; "=" left by removed <math>
_BOLD_ITALIC = re.compile(r"'{2,}")
_BRACKETS = re.compile(r"\[\[|\]\]|\{\{|\}\}")
_TAG = re.compile(r"</?[a-zA-Z][^<>]*>")
_EMPTY_PARENS = re.compile(r"\(\s*[,;:]?\s*\)")
_SPACE_BEFORE_PUNCT = re.compile(r" +([,.;:])")
_SPACES = re.compile(r"[ \t\u00a0]+")
_WORD = re.compile(r"\w")


def _clean_line(line: str) -> tuple[str, int] | None:
    """Clean one line of ``filter_wiki`` output. Returns (text, heading level or 0), or None to drop."""
    line = html.unescape(line).strip()
    if not line:
        return ("", 0)
    heading = _HEADING.match(line)
    if heading:
        text = _BOLD_ITALIC.sub("", heading.group(2)).strip()
        return (text, len(heading.group(1))) if _WORD.search(text) else None
    if _DROP_LINE.match(line) or "|" in line:  # tables, templates, galleries, image captions
        return None
    line = _LIST_MARKER.sub("", line)
    if _DROP_LINE.match(line):
        return None
    line = _BOLD_ITALIC.sub("", line)
    line = _BRACKETS.sub("", line)
    line = _TAG.sub("", line)
    line = _EMPTY_PARENS.sub("", line)
    line = _SPACES.sub(" ", line)
    line = _SPACE_BEFORE_PUNCT.sub(r"\1", line).strip()
    if not _WORD.search(line):  # only punctuation left (e.g. a lone ':' or '}')
        return None
    return (line, 0)


def _strip_tables(markup: str) -> str:
    """Remove ``{| ... |}`` tables (nested too): filter_wiki would keep their cells as fragments."""
    kept: list[str] = []
    depth = 0
    for line in markup.splitlines():
        stripped = line.lstrip(" :")
        if stripped.startswith("{|"):
            depth += 1
            continue
        if depth:
            if stripped.startswith("|}"):
                depth -= 1
            continue
        kept.append(line)
    return "\n".join(kept)


def clean_wiki_text(markup: str) -> str:
    """Turn raw wiki markup into plain text: paragraphs separated by a blank line, list items and
    headings on their own lines, no tables/templates/links/categories/bold/italics."""
    from gensim.corpora.wikicorpus import filter_wiki

    lines: list[tuple[str, int]] = []
    for raw in filter_wiki(_strip_tables(markup)).splitlines():
        cleaned = _clean_line(raw)
        if cleaned is None:
            continue
        if cleaned[0] == "" and (not lines or lines[-1][0] == ""):
            continue  # collapse runs of blank lines, no leading blank line
        lines.append(cleaned)
    while lines and lines[-1][0] == "":
        lines.pop()

    # Drop headings with no content under them (e.g. an emptied "References" or "Gallery" section).
    keep = [True] * len(lines)
    for i, (_, level) in enumerate(lines):
        if level == 0:
            continue
        has_content = False
        for text, other_level in lines[i + 1 :]:
            if other_level and other_level <= level:
                break
            if text and not other_level:
                has_content = True
                break
        keep[i] = has_content

    out: list[str] = []
    for (text, level), kept in zip(lines, keep):
        if not kept:
            continue
        if text == "" and (not out or out[-1] == ""):
            continue
        if level and out and out[-1] != "":
            out.append("")  # a heading starts a new paragraph
        out.append(text)
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out)


def _wiki_documents(path: Path) -> list[Document]:
    from gensim.corpora.wikicorpus import extract_pages

    documents = []
    with bz2.open(path, "rb") as f:
        for title, markup, _page_id in extract_pages(f, filter_namespaces=("0",)):
            if markup.lstrip()[:9].lower() == "#redirect":
                continue
            text = clean_wiki_text(markup)
            if len(text.split()) < _MIN_WORDS:
                continue
            documents.append(Document(WIKI_SOURCE, title, text))
    return documents


def _lee_documents(path: Path) -> list[Document]:
    documents = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for index, line in enumerate(f):
            text = _SPACES.sub(" ", line).strip()
            if text:
                documents.append(Document(LEE_SOURCE, f"{LEE_SOURCE}-{index:03d}", text))
    return documents


@functools.lru_cache(maxsize=2)
def _load_documents(wiki_path: Path, lee_path: Path, mtimes: tuple[int, int]) -> tuple[Document, ...]:
    return tuple(_wiki_documents(wiki_path) + _lee_documents(lee_path))


def demo_documents() -> list[Document]:
    """The demo corpus: ~106 cleaned English Wikipedia articles followed by 300 Lee news articles.

    Deterministic (same documents, same order, every call). Needs gensim installed. Parsing takes
    a few seconds; the result is cached in the process (documents are immutable).
    """
    wiki_path, lee_path = corpus_files()
    mtimes = (wiki_path.stat().st_mtime_ns, lee_path.stat().st_mtime_ns)
    return list(_load_documents(wiki_path, lee_path, mtimes))


# --------------------------------------------------------------------------------------------------
# Train/validation split
# --------------------------------------------------------------------------------------------------
def _split_key(document: Document, seed: int) -> bytes:
    return hashlib.sha256(f"{seed}\0{document.source}\0{document.title}".encode()).digest()


def split_documents(
    docs: Sequence[Document], valid_fraction: float = 0.05, seed: int = 1234
) -> tuple[list[Document], list[Document]]:
    """Split documents into (train, valid), deterministically, by document.

    Documents are ranked by a SHA-256 hash of ``(seed, source, title)`` (stable across runs,
    machines and Python hash seeds); the lowest-ranked ``ceil(valid_fraction * n)`` go to the
    validation set (at least one when ``valid_fraction > 0`` and there are two or more documents).
    Documents sharing a source and title always land on the same side. Both lists keep the input
    order.
    """
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    docs = list(docs)
    if valid_fraction == 0.0 or len(docs) < 2:
        return docs, []
    target = max(1, math.ceil(valid_fraction * len(docs)))
    target = min(target, len(docs) - 1)
    keys = [_split_key(doc, seed) for doc in docs]
    counts: dict[bytes, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    valid_keys: set[bytes] = set()
    taken = 0
    for key in sorted(counts):
        if taken >= target:
            break
        valid_keys.add(key)
        taken += counts[key]
    train = [doc for doc, key in zip(docs, keys) if key not in valid_keys]
    valid = [doc for doc, key in zip(docs, keys) if key in valid_keys]
    return train, valid
