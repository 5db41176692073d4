"""Unlabelled corpora for pre-training: streaming readers, sentence splitting, a held-out split.

Readers are generators of documents (one string each), so reading never holds more than one
document: plain-text files and folders (a file is a document, paragraphs joined), one document
per line (``.cor``, ``.jsonl``-free text), and Wikipedia XML dumps (``.xml.bz2``), whose wiki
markup is stripped to running text as wikiextractor does. ``split_sentences`` is a rule-based
splitter; ``split_documents`` assigns whole documents to train or validation by a seeded hash,
so the split does not depend on reading order or on how much of the corpus is read.
"""

from __future__ import annotations

import bz2
import hashlib
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterable, Iterator, Literal

CorpusFormat = Literal["auto", "text", "lines", "wikipedia"]
TEXT_SUFFIXES = (".txt", ".text", ".md")


def read_corpus(paths: Iterable[str | Path], *, format: CorpusFormat = "auto") -> Iterator[str]:
    """Documents from files and folders (folders: their files in sorted order, recursively).

    Args:
        paths: files or folders.
        format: ``text`` (a file is one document), ``lines`` (one document per line),
            ``wikipedia`` (a MediaWiki XML dump, optionally .bz2) or ``auto`` (by name: ``.bz2``
            or ``.xml`` -> wikipedia, ``.cor``/``.lines`` -> lines, otherwise text).
    """
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"corpus path not found: {path}")
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
                       and p.name not in ("LICENSE", "README", "README.md")) if path.is_dir() else [path]
        for file in files:
            kind = format if format != "auto" else _guess_format(file)
            if kind == "wikipedia":
                yield from read_wikipedia(file)
            elif kind == "lines":
                yield from read_lines(file)
            else:
                text = file.read_text(encoding="utf-8", errors="replace").strip()
                if text:
                    yield text


def _guess_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".bz2", ".xml")):
        return "wikipedia"
    if name.endswith((".cor", ".lines")):
        return "lines"
    return "text"


def read_lines(path: str | Path) -> Iterator[str]:
    """One document per non-empty line."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.strip():
                yield line.strip()


def read_wikipedia(path: str | Path) -> Iterator[str]:
    """Article text (namespace 0, no redirects) of a MediaWiki XML dump, markup stripped, streamed."""
    opener = bz2.open if str(path).endswith(".bz2") else open
    with opener(path, "rb") as handle:
        namespace, is_redirect, text = None, False, None
        for _, element in ET.iterparse(handle, events=("end",)):
            tag = element.tag.rsplit("}", 1)[-1]
            if tag == "ns":
                namespace = element.text
            elif tag == "redirect":
                is_redirect = True
            elif tag == "text":
                text = element.text or ""
            elif tag == "page":
                if namespace == "0" and not is_redirect and text:
                    clean = strip_wiki_markup(text)
                    if clean:
                        yield clean
                namespace, is_redirect, text = None, False, None
                element.clear()  # keep memory flat over a large dump


_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_DROP_TAGS = re.compile(r"<(math|gallery|timeline|code|pre|score|syntaxhighlight|imagemap)[^>]*>.*?</\1>", re.S | re.I)
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_FILE_LINK = re.compile(r"\[\[\s*(?:File|Image|Category|Media):", re.I)
_LINK = re.compile(r"\[\[(?:[^\[\]|]*\|)?([^\[\]|]*)\]\]")
_EXT_LINK = re.compile(r"\[(?:https?|ftp)://[^\s\]]+\s*([^\]]*)\]")
_HEADING = re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M)
_EMPHASIS = re.compile(r"'{2,}")
_ENTITIES = {"&nbsp;": " ", "&amp;": "&", "&lt;": "<", "&gt;": ">", "&quot;": '"', "&ndash;": "–", "&mdash;": "—"}


def strip_wiki_markup(text: str) -> str:
    """Running text of wiki markup: templates, tables, references, files, categories and tags go;
    links keep their label; headings, list markers and bold/italic quotes are dropped (as wikiextractor)."""
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _DROP_TAGS.sub("", text)
    text = _remove_nested(text, "{{", "}}")
    text = _remove_nested(text, "{|", "|}")
    text = _remove_file_links(text)
    text = _LINK.sub(r"\1", text)
    text = _EXT_LINK.sub(r"\1", text)
    text = _TAG.sub("", text)
    for entity, char in _ENTITIES.items():
        text = text.replace(entity, char)
    text = _EMPHASIS.sub("", text)
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if not line or _HEADING.match(line) or line.startswith(("|", "!", "__", "#REDIRECT")):
            continue  # headings, table debris and magic words are not running text
        line = line.lstrip("*#:; ").strip()
        if line:
            lines.append(line)
    return "\n".join(lines)


def _remove_file_links(text: str) -> str:
    """Removes [[File:...]], [[Image:...]], [[Category:...]] links, captions with nested links included."""
    out, i = [], 0
    for match in _FILE_LINK.finditer(text):
        if match.start() < i:
            continue
        out.append(text[i:match.start()])
        depth, j = 0, match.start()
        while j < len(text):
            if text.startswith("[[", j):
                depth, j = depth + 1, j + 2
            elif text.startswith("]]", j):
                depth, j = depth - 1, j + 2
                if depth == 0:
                    break
            else:
                j += 1
        i = j
    out.append(text[i:])
    return "".join(out)


def _remove_nested(text: str, open_: str, close: str) -> str:
    """Removes balanced ``open_ ... close`` spans, nested ones included."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(open_, i):
            depth, i = depth + 1, i + len(open_)
        elif depth and text.startswith(close, i):
            depth, i = depth - 1, i + len(close)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "no", "gen", "gov",
                  "sen", "rep", "u.s", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov",
                  "dec", "inc", "co", "corp", "ltd", "fig", "vol", "col", "capt", "lt", "mt"}
_BOUNDARY = re.compile(r"(?<=[.!?])[\"'”’)\]]*\s+(?=[\"'“‘(\[]*[A-Z0-9])")


def split_sentences(text: str, *, min_chars: int = 1) -> list[str]:
    """Sentences of a document: paragraph breaks always split; '.', '!', '?' split before an
    upper-case letter or digit unless the word before is an abbreviation or an initial."""
    sentences = []
    for paragraph in re.split(r"\n\s*\n|\n", text):
        paragraph = " ".join(paragraph.split())
        start = 0
        for match in _BOUNDARY.finditer(paragraph):
            before = paragraph[start:match.start()].rstrip(".!?\"'”’)]")
            last_word = before.rsplit(" ", 1)[-1].lower()
            if last_word in _ABBREVIATIONS or (len(last_word) == 1 and last_word.isalpha()):
                continue
            sentences.append(paragraph[start:match.start()].strip())
            start = match.end()
        sentences.append(paragraph[start:].strip())
    return [s for s in sentences if len(s) >= min_chars]


def is_validation(document: str, *, seed: int, fraction: float) -> bool:
    """Whether a document belongs to the held-out split: a seeded hash of its text, so the
    assignment is the same however the corpus is read or truncated."""
    digest = hashlib.sha256(f"{seed}:{document}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < fraction


def corpus_sentences(paths: Iterable[str | Path], *, format: CorpusFormat = "auto", seed: int = 0,
                     validation_fraction: float = 0.05, max_documents: int | None = None,
                     max_sentences: int | None = None, min_chars: int = 20) -> dict[str, list[list[str]]]:
    """``{"train": docs, "validation": docs}`` where each document is its list of sentences.

    Reads documents lazily and stops once ``max_documents`` or ``max_sentences`` (training
    sentences) are reached, so only the part of a large corpus that is used is read.
    """
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    out: dict[str, list[list[str]]] = {"train": [], "validation": []}
    count = 0
    for i, document in enumerate(read_corpus(paths, format=format)):
        if max_documents is not None and i >= max_documents:
            break
        if max_sentences is not None and count >= max_sentences:
            break
        sentences = split_sentences(document, min_chars=min_chars)
        if not sentences:
            continue
        split = "validation" if is_validation(document, seed=seed, fraction=validation_fraction) else "train"
        out[split].append(sentences)
        count += len(sentences) if split == "train" else 0
    return out
