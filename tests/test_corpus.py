"""Corpora: the three readers on the shared files, markup stripping, sentence splitting, held-out split."""

from __future__ import annotations

from pathlib import Path

from metalm.data.corpus import (corpus_sentences, is_validation, read_corpus, read_wikipedia, split_sentences,
                                strip_wiki_markup)


def test_wiki_markup_is_stripped_to_running_text():
    text = ("{{Infobox person|name=X {{nested|a}}}}'''Ada Lovelace''' was an [[England|English]] "
            "[[mathematician]].<ref>Some {{cite}} source</ref> She wrote [http://x.org notes].\n"
            "== Life ==\n* [[File:Ada.jpg|thumb|A [[portrait]]]]Her father was [[Lord Byron]].<!-- c -->\n"
            "{| class=wikitable\n|-\n| cell\n|}\n[[Category:Mathematicians]]")
    assert strip_wiki_markup(text).split("\n") == [
        "Ada Lovelace was an English mathematician. She wrote notes.", "Her father was Lord Byron."]


def test_wikipedia_dump_streams_articles_without_markup(data_root: Path):
    dump = next((data_root / "corpus" / "wikipedia").glob("*.bz2"))
    articles = list(read_wikipedia(dump))
    assert len(articles) > 50  # 206 pages less redirects and other namespaces
    text = "\n".join(articles)
    for markup in ("{{", "}}", "[[", "]]", "<ref", "'''", "&nbsp;"):
        assert markup not in text, markup
    assert "Anarchism" in articles[0][:200] or "anarch" in articles[0][:400].lower()


def test_readers_by_format(data_root: Path):
    corpus = data_root / "corpus"
    lines = list(read_corpus([corpus / "lee_background.cor"]))
    assert len(lines) == sum(1 for line in open(corpus / "lee_background.cor") if line.strip())
    speeches = read_corpus([corpus / "sotu"])  # a folder: one document per file, lazily
    first = next(speeches)
    assert first.startswith(("Fellow", "Gentlemen")) and len(first) > 1000
    assert sum(1 for _ in speeches) + 1 == len([p for p in (corpus / "sotu").iterdir() if p.name.endswith(".txt")])


def test_sentence_splitting_keeps_abbreviations_and_initials():
    text = 'Mr. Smith met Dr. J. Doe in Washington. "It rained," he said! Was it 3 p.m. then? Yes.\nNew line'
    assert split_sentences(text) == ["Mr. Smith met Dr. J. Doe in Washington.", '"It rained," he said!',
                                     "Was it 3 p.m. then?", "Yes.", "New line"]


def test_validation_split_is_seeded_disjoint_and_of_the_right_size(data_root: Path):
    docs = [f"document number {i}" for i in range(4000)]
    held = [d for d in docs if is_validation(d, seed=1, fraction=0.1)]
    assert 340 < len(held) < 460  # binomial(4000, 0.1): mean 400, sd 19
    assert held == [d for d in docs if is_validation(d, seed=1, fraction=0.1)]
    assert held != [d for d in docs if is_validation(d, seed=2, fraction=0.1)]
    split = corpus_sentences([data_root / "corpus" / "lee_background.cor"], validation_fraction=0.2, seed=0)
    train = {tuple(doc) for doc in split["train"]}
    assert split["validation"] and not train & {tuple(doc) for doc in split["validation"]}  # whole documents
    few = corpus_sentences([data_root / "corpus" / "sotu"], max_sentences=50, validation_fraction=0.0)
    counts = [len(doc) for doc in few["train"]]
    assert sum(counts) >= 50 > sum(counts[:-1])  # stopped reading once 50 sentences were in
