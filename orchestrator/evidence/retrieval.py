"""BM25 over the corpus's passages (bm25s), with the index cached beside the corpus.

    retriever = load_retriever({"corpus": "docs.jsonl", "passage_words": 48, "max_corpus_mb": 256})
    retriever.search("capital of Veltra", k=1)   # -> [Passage("Veltra", "... Its capital is Osk.", 0)]

A passage is indexed as its title and text (so a query naming a title finds its document),
lower-cased, English stop words dropped, no stemming. `search` scores every passage and ranks
by score then passage order, so equal scores always come back in the same order; passages
that share no word with the query are never returned (a query of stop words finds nothing).

The index lives in `<corpus>.bm25/<sha256 of the corpus, 16 hex>-w<passage_words>/` (the BM25
matrices, the passages, a meta.json). It is built in a temporary folder and renamed into place,
so a reader never sees half an index; a changed corpus (or passage_words) gets a new folder, and
the folders of older versions of the corpus are removed. A corpus in a folder that cannot be
written is indexed in memory each time. Loading a few thousand passages from the cache takes well under a second (the rollout
engines, the reward actor and the evaluator each load it); within one process it is loaded once.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rlhf.orchestrator.errors import BadInput
from rlhf.orchestrator.evidence.corpus import KEY, check_size, passages_of, read_documents
from rlhf.orchestrator.evidence.format import Passage

CACHE_FORMAT = 1  # bump when the cached layout or the tokenisation changes
STOPWORDS = "en"


def _tokens(texts: list[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(texts, stopwords=STOPWORDS, return_ids=False, show_progress=False)


@dataclass
class Retriever:
    passages: list[Passage]   # every passage, in corpus order
    documents: int            # documents in the corpus
    cache: Path | None        # the index folder it was loaded from or written to (None: in memory)
    model: object             # the bm25s.BM25 index, one row per passage

    def search(self, query: str, k: int) -> list[Passage]:
        """The `k` best passages for `query` (fewer when fewer share a word with it), best first."""
        words = _tokens([query])[0]
        if not words or k < 1:
            return []
        scores = np.asarray(self.model.get_scores(words), dtype=np.float64)
        order = np.lexsort((np.arange(len(scores)), -scores))[:k]  # by score, then passage order
        return [self.passages[i] for i in order if scores[i] > 0]


def corpus_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_dir(path: Path, digest: str, passage_words: int) -> Path:
    return path.parent / f"{path.name}.bm25" / f"{digest[:16]}-w{passage_words}"


_LOADED: dict[tuple, Retriever] = {}


def load_retriever(evidence: dict) -> Retriever:
    """The retriever for `evidence` (launch.evidence_spec: corpus, passage_words, max_corpus_mb, ...),
    from the cache when it matches the corpus, else built and cached. Bad corpus -> BadInput."""
    if not evidence.get("corpus"):
        raise BadInput(f"{KEY}: not set (a JSONL of {{\"title\", \"text\"}} documents)")
    path = check_size(evidence["corpus"], evidence["max_corpus_mb"])
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, evidence["passage_words"], evidence["max_corpus_mb"])
    if key not in _LOADED:
        _LOADED[key] = build_index(path, evidence["passage_words"], evidence["max_corpus_mb"])[0]
    return _LOADED[key]


def build_index(path: str | Path, passage_words: int, max_corpus_mb: float) -> tuple[Retriever, bool]:
    """(retriever, built): loads the cached index of `path`, or builds it (built=True) and caches it."""
    path = check_size(path, max_corpus_mb)
    target = cache_dir(path, corpus_digest(path), passage_words)
    cached = _read_cache(target)
    if cached is not None:
        return cached, False
    docs = read_documents(path, max_corpus_mb)
    passages = passages_of(docs, passage_words)
    model = _index(passages)
    retriever = Retriever(passages, len(docs), None, model)
    try:
        retriever.cache = _write_cache(target, retriever)
    except OSError:
        pass  # a read-only corpus folder: the index stays in memory
    return retriever, True


def _index(passages: list[Passage]):
    import bm25s

    model = bm25s.BM25()
    model.index(_tokens([f"{p.title} {p.text}" for p in passages]), show_progress=False)
    return model


def _read_cache(folder: Path) -> Retriever | None:
    import bm25s

    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("format") != CACHE_FORMAT:
            return None
        rows = [json.loads(line) for line in (folder / "passages.jsonl").read_text().splitlines()]
        model = bm25s.BM25.load(str(folder / "index"), show_progress=False)
    except (OSError, ValueError, KeyError):
        return None  # absent or unreadable: rebuilt
    return Retriever([Passage(r["title"], r["text"], r["doc"]) for r in rows], meta["documents"], folder, model)


def _write_cache(target: Path, retriever: Retriever) -> Path:
    """Writes the index into a temporary folder beside `target`, then renames it into place and
    removes the indexes of older versions of the corpus (a process that won the race keeps its copy)."""
    root = target.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the index from other users of the corpus
        retriever.model.save(str(tmp / "index"), show_progress=False)
        with (tmp / "passages.jsonl").open("w") as f:
            for p in retriever.passages:
                f.write(json.dumps({"title": p.title, "text": p.text, "doc": p.doc}) + "\n")
        meta = {"format": CACHE_FORMAT, "documents": retriever.documents, "passages": len(retriever.passages),
                "passage_words": int(target.name.rpartition("-w")[2]), "built": time.time()}
        (tmp / "meta.json").write_text(json.dumps(meta))  # written last: its presence marks a whole index
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    digest = target.name.partition("-w")[0]
    for old in root.iterdir():  # indexes of an older corpus (other passage_words of this one stay)
        if old.is_dir() and not old.name.startswith((".", digest)):
            shutil.rmtree(old, ignore_errors=True)
    return target
