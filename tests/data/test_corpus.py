from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from megatron_tst.data.corpus import (
    LEE_SOURCE,
    WIKI_SOURCE,
    Document,
    clean_wiki_text,
    corpus_fingerprint,
    demo_documents,
    split_documents,
)

MARKUP = ("[[", "]]", "{{", "}}", "{|", "|}", "'''", "''", "<ref", "&nbsp;", "Category:", "thumb|")


needs_gensim = pytest.mark.skipif(
    importlib.util.find_spec("gensim") is None, reason="the demo corpus needs gensim (the demo extra)"
)


@pytest.fixture(scope="module")
def docs() -> list[Document]:
    pytest.importorskip("gensim")
    return demo_documents()


def test_demo_corpus_size_and_sources(docs):
    wiki = [d for d in docs if d.source == WIKI_SOURCE]
    news = [d for d in docs if d.source == LEE_SOURCE]
    assert len(wiki) + len(news) == len(docs)
    # The dump holds 206 pages; 99 are redirects and one is empty, which leaves 106 articles.
    assert len(wiki) > 100
    assert len(news) > 250
    assert len({d.key for d in docs}) == len(docs), "source/title pairs are unique"
    assert sum(len(d.text) for d in docs) > 3_000_000
    assert all(len(d.text.split()) >= 50 for d in wiki)
    assert not any(d.text.lstrip().lower().startswith("#redirect") for d in docs)
    assert any(d.title == "Anarchism" for d in wiki)


def test_demo_corpus_has_no_markup_leftovers(docs):
    for doc in docs:
        for marker in MARKUP:
            assert marker not in doc.text, (doc.title, marker)
        assert "|" not in doc.text, doc.title
        for line in doc.text.split("\n"):
            assert line == line.strip(), (doc.title, line)
            assert not line.startswith(("*", "#", "=", "!", ":")), (doc.title, line)
            assert "  " not in line, (doc.title, line)
        assert "\n\n\n" not in doc.text
        assert doc.text == doc.text.strip()


def test_demo_corpus_is_deterministic_in_a_fresh_interpreter(docs):
    """Same documents, in the same order, in another process with another hash seed."""
    code = (
        "import hashlib; from megatron_tst.data.corpus import demo_documents\n"
        "h = hashlib.sha256()\n"
        "for d in demo_documents(): h.update(f'{d.source}\\0{d.title}\\0{d.text}\\0'.encode())\n"
        "print(h.hexdigest())"
    )
    import hashlib
    import os

    expected = hashlib.sha256()
    for d in docs:
        expected.update(f"{d.source}\0{d.title}\0{d.text}\0".encode())
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    assert out.stdout.strip() == expected.hexdigest()
    assert out.stderr == "", "the corpus prints nothing"


def test_split_documents_is_deterministic_and_disjoint(docs):
    train, valid = split_documents(docs, valid_fraction=0.05, seed=1234)
    again = split_documents(docs, valid_fraction=0.05, seed=1234)
    assert (train, valid) == again
    assert valid, "validation split is non-empty"
    assert len(valid) == -(-len(docs) * 5 // 100)  # ceil(5 %)
    assert {d.key for d in train}.isdisjoint({d.key for d in valid})
    assert len(train) + len(valid) == len(docs)
    assert [d for d in docs if d in set(valid)] == valid, "input order is kept"
    other_train, other_valid = split_documents(docs, valid_fraction=0.05, seed=99)
    assert {d.key for d in other_valid} != {d.key for d in valid}


def test_split_documents_is_stable_across_versions():
    """Hash based (sha256 of seed/source/title): this exact split must never change silently."""
    docs = [Document("s", f"doc{i}", "x") for i in range(20)]
    train, valid = split_documents(docs, valid_fraction=0.2, seed=1234)
    assert [d.title for d in valid] == EXPECTED_VALID_TITLES
    assert len(train) == 16


EXPECTED_VALID_TITLES = ["doc3", "doc5", "doc12", "doc14"]


def test_split_documents_edge_cases():
    docs = [Document("s", f"t{i}", "x") for i in range(3)]
    assert split_documents(docs, valid_fraction=0.0) == (docs, [])
    assert split_documents(docs[:1], valid_fraction=0.5) == (docs[:1], [])
    train, valid = split_documents(docs, valid_fraction=0.01)
    assert len(valid) == 1 and len(train) == 2
    train, valid = split_documents(docs, valid_fraction=0.99)
    assert len(train) == 1, "at least one training document"
    dup = [Document("s", "same", "a"), Document("s", "same", "b"), Document("s", "other", "c")]
    train, valid = split_documents(dup, valid_fraction=0.3, seed=0)
    assert {d.title for d in train}.isdisjoint({d.title for d in valid})
    with pytest.raises(ValueError, match="valid_fraction"):
        split_documents(docs, valid_fraction=1.0)


@needs_gensim
def test_clean_wiki_text():
    markup = """{{Infobox thing|name=X}}
'''Example''' is a ''test'' page about [[Cats|felines]] and [[dogs]].<ref>A source</ref>

{| class="wikitable"
|-
! Head !! Other
|-
| cell || more cells
|}

== History ==
=== Early ===
* First &amp; item
# Second item
: indented   text with    spaces

== Empty section ==

== References ==
{{reflist}}
[[Category:Examples]]
"""
    text = clean_wiki_text(markup)
    assert text == (
        "Example is a test page about felines and dogs.\n\n"
        "History\n\nEarly\nFirst & item\nSecond item\nindented text with spaces"
    )


def test_missing_gensim_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "gensim", None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[demo\]'"):
        demo_documents()
    with pytest.raises(ImportError, match="gensim package"):
        corpus_fingerprint()
