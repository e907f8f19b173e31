"""evidence.corpus: a JSONL of {"title", "text"} documents, read, checked and split into passages.

    {"title": "Veltra", "text": "Veltra is a river nation. Its capital is Osk. ..."}

Each document is cut into passages of about `passage_words` words at sentence ends (a
sentence longer than that is cut by words); every passage keeps its document's title and
index. Text is whitespace-normalised, so a `Search Result:` line shows exactly the passage.

Every problem is a one-line BadInput naming `evidence.corpus` and the file (and the line for
a bad document): a missing file, a file over `max_corpus_mb`, bad JSON, a line that is not an
object, a missing or empty title or text, a title holding `|` or `"` (they delimit the title
in Search Result lines and citations), and a corpus with no document. Blank lines are skipped.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from rlhf.orchestrator.errors import BadInput
from rlhf.orchestrator.evidence.format import Passage, normalize

KEY = "evidence.corpus"
MB = 1_000_000
# A sentence ends at . ! or ? followed by white space (abbreviations split too: harmless here).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def check_size(path: str | Path, max_corpus_mb: float) -> Path:
    """The corpus path, after checking it is a file no larger than `max_corpus_mb`."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{KEY}: no such file: {path}")
    size = path.stat().st_size
    if size > max_corpus_mb * MB:
        raise BadInput(f"{KEY}: {path} is {size / MB:.1f} MB, over evidence.max_corpus_mb={max_corpus_mb:g}")
    return path


def read_documents(path: str | Path, max_corpus_mb: float) -> list[dict]:
    """The corpus's documents as `{"title", "text"}` dicts (normalised), every line checked."""
    path = check_size(path, max_corpus_mb)
    docs = []
    with path.open(encoding="utf-8", errors="strict") as f:
        try:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    docs.append(_document(line, f"{path}:{lineno}"))
        except UnicodeDecodeError as err:
            raise BadInput(f"{KEY}: {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not docs:
        raise BadInput(f"{KEY}: {path}: no documents (an empty corpus)")
    return docs


def _document(line: str, where: str) -> dict:
    try:
        doc = json.loads(line)
    except json.JSONDecodeError as err:
        raise BadInput(f"{KEY}: {where}: bad JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(doc, dict):
        raise BadInput(f"{KEY}: {where}: expected an object {{\"title\", \"text\"}}, got {type(doc).__name__}")
    for field in ("title", "text"):
        value = doc.get(field)
        if not isinstance(value, str) or not value.strip():
            got = "missing" if field not in doc else f"{type(value).__name__} {value!r:.40}"
            raise BadInput(f"{KEY}: {where}: {field!r} must be a non-empty string ({got})")
    title = normalize(doc["title"])
    if "|" in title or '"' in title:
        raise BadInput(f"{KEY}: {where}: title {title!r} must not hold '|' or '\"' (they delimit it in transcripts)")
    return {"title": title, "text": normalize(doc["text"])}


def split_passages(text: str, words: int) -> list[str]:
    """`text` in passages of about `words` words: whole sentences while they fit, long ones cut."""
    pieces: list[list[str]] = []
    for sentence in _SENTENCE_END.split(normalize(text)):
        tokens = sentence.split()
        pieces.extend(tokens[i: i + words] for i in range(0, len(tokens), words))  # a long sentence: cut
    passages: list[list[str]] = []
    for piece in pieces:
        if passages and len(passages[-1]) + len(piece) <= words:
            passages[-1].extend(piece)
        else:
            passages.append(list(piece))
    return [" ".join(p) for p in passages if p]


def passages_of(docs: list[dict], words: int) -> list[Passage]:
    """Every document's passages in corpus order, each with its title and document index."""
    return [Passage(doc["title"], text, i) for i, doc in enumerate(docs) for text in split_passages(doc["text"], words)]
