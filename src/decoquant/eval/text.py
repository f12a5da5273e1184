"""Real text offline: WikiText-2 raw test from a data folder, or the Wikipedia articles shipped
in the gensim wheel's test data."""

from __future__ import annotations

import bz2
import importlib.util
import re
from pathlib import Path

GENSIM_WIKI = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def gensim_wikipedia() -> str:
    """The real English Wikipedia articles in gensim's test data, as plain text (markup removed)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None:
        raise ValueError("the built-in text needs gensim: pip install gensim (or pass a data folder)")
    path = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / GENSIM_WIKI
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    articles = []
    with bz2.open(path) as f:
        for title, text, _ in extract_pages(f):
            if not text or text.lower().startswith("#redirect"):
                continue
            body = filter_wiki(text)
            body = re.sub(r"'{2,}", "", body)
            body = re.sub(r"\n{3,}", "\n\n", body).strip()
            if body:
                articles.append(f"= {title} =\n\n{body}")
    return "\n\n".join(articles)


def wikitext2_test(data_dir: str | Path) -> str:
    path = Path(data_dir) / "wikitext2" / "wiki.test.raw"
    if not path.exists():
        raise ValueError(f"expected WikiText-2 raw test at {path} (a data folder with wikitext2/wiki.test.raw)")
    return path.read_text(encoding="utf-8")


def wikitext2_validation(data_dir: str | Path) -> str:
    """WikiText-2's validation split (the tokenized release): calibration text kept apart from the test."""
    path = Path(data_dir) / "wikitext2" / "wiki.valid.tokens"
    if not path.exists():
        raise ValueError(f"expected WikiText-2 validation at {path} (a data folder with wikitext2/wiki.valid.tokens)")
    return path.read_text(encoding="utf-8")


def load_text(source: str = "gensim-wiki", data_dir: str | Path | None = None) -> str:
    """source: "gensim-wiki" or "wikitext2" (needs data_dir)."""
    if source == "gensim-wiki":
        return gensim_wikipedia()
    if source == "wikitext2":
        if data_dir is None:
            raise ValueError("source='wikitext2' needs data_dir (a folder holding wikitext2/wiki.test.raw)")
        return wikitext2_test(data_dir)
    raise ValueError(f"source={source!r} is not supported; allowed values: 'gensim-wiki', 'wikitext2'")
