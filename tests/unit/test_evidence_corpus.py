"""Evidence corpus and BM25 retrieval: passages, bad corpora through the real CLI, the cached index.

Run: .venv/bin/pytest tests/unit/test_evidence_corpus.py -q   (no model, no Ray; a few seconds on one CPU)
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.orchestrator.errors import BadInput
from rlhf.orchestrator.evidence.corpus import read_documents, split_passages
from rlhf.orchestrator.evidence.format import Passage
from rlhf.orchestrator.evidence.retrieval import build_index, load_retriever

RLHF = str(Path(sys.executable).with_name("rlhf"))
DOCS = [
    {"title": "Veltra", "text": "Veltra is a river nation in the east.  Its capital is Osk.\nIt trades in salt."},
    {"title": "Brenn Peak", "text": "Brenn Peak is a mountain. Shepherds graze goats below it. It rises 3,100 metres."},
    {"title": "Osk", "text": "Osk is a city on the river Lume. Its bridges are made of white stone."},
]


def _write(path: Path, docs: list) -> Path:
    path.write_text("".join((d if isinstance(d, str) else json.dumps(d)) + "\n" for d in docs))
    return path


def _rlhf(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([RLHF, *args], capture_output=True, text=True, timeout=120)


def test_passages_follow_sentences_and_cut_long_ones():
    text = "One two three. Four five six seven. Eight nine."
    assert split_passages(text, 4) == ["One two three.", "Four five six seven.", "Eight nine."]
    assert split_passages(text, 7) == ["One two three. Four five six seven.", "Eight nine."]
    long = " ".join(f"w{i}" for i in range(10)) + "."
    assert split_passages(long, 4) == ["w0 w1 w2 w3", "w4 w5 w6 w7", "w8 w9."]


def test_documents_are_normalised_and_passages_keep_title_and_doc(tmp_path):
    corpus = _write(tmp_path / "c.jsonl", [DOCS[0], "", DOCS[1]])  # a blank line is skipped
    assert read_documents(corpus, 1.0)[0]["text"] == "Veltra is a river nation in the east. Its capital is Osk. It trades in salt."
    retriever, built = build_index(corpus, 8, 1.0)
    assert built and retriever.documents == 2
    assert retriever.passages[:2] == [Passage("Veltra", "Veltra is a river nation in the east.", 0),
                                      Passage("Veltra", "Its capital is Osk. It trades in salt.", 0)]
    assert {p.doc for p in retriever.passages if p.title == "Brenn Peak"} == {1}


@pytest.mark.parametrize("lines, message", [
    ([DOCS[0], '{"title": "Veltra", "text": "x"', DOCS[1]], "c.jsonl:2: bad JSON"),
    ([DOCS[0], DOCS[1], {"title": "Osk"}], "c.jsonl:3: 'text' must be a non-empty string (missing)"),
    ([{"title": "  ", "text": "x"}], "c.jsonl:1: 'title' must be a non-empty string"),
    (['["Veltra", "text"]'], "c.jsonl:1: expected an object"),
    ([{"title": 'The "Peak"', "text": "x"}], "c.jsonl:1: title"),
    (["", "  "], "c.jsonl: no documents (an empty corpus)"),
])
def test_bad_corpus_is_one_line_exit_2_through_the_cli(tmp_path, lines, message):
    corpus = _write(tmp_path / "c.jsonl", lines)
    done = _rlhf("evidence", "index", str(corpus))
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "c.jsonl.bm25").exists()  # nothing half-written


def test_corpus_over_the_memory_limit_and_a_missing_file_are_exit_2(tmp_path):
    corpus = _write(tmp_path / "c.jsonl", [{"title": f"T{i}", "text": "word " * 400} for i in range(10)])  # ~20 kB
    done = _rlhf("evidence", "index", str(corpus), "--max-corpus-mb", "0.01")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "over evidence.max_corpus_mb=0.01" in done.stderr
    assert not (tmp_path / "c.jsonl.bm25").exists()
    missing = _rlhf("evidence", "search", str(tmp_path / "none.jsonl"), "q")
    assert missing.returncode == 2 and "evidence.corpus: no such file" in missing.stderr
    with pytest.raises(BadInput, match="evidence.corpus: not set"):
        load_retriever({"corpus": None, "passage_words": 48, "max_corpus_mb": 1.0})


def test_index_and_search_commands_print_the_passages(tmp_path):
    corpus = _write(tmp_path / "c.jsonl", DOCS)
    done = _rlhf("evidence", "index", str(corpus), "--passage-words", "12")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("built: 3 documents, ") and len(done.stdout.splitlines()) == 1
    again = _rlhf("evidence", "index", str(corpus), "--passage-words", "12")
    assert again.stdout.startswith("cached: 3 documents, ")
    found = _rlhf("evidence", "search", str(corpus), "Brenn Peak goats", "-k", "1", "--passage-words", "12")
    assert found.returncode == 0, found.stderr
    assert found.stdout.splitlines() == ["Search Result: Brenn Peak | Brenn Peak is a mountain. Shepherds graze goats below it."]


def test_bm25_finds_the_document_of_a_title_query_deterministically(tmp_path):
    docs = DOCS + [{"title": f"Filler {i}", "text": f"Filler text number {i} about nothing in particular."}
                   for i in range(50)]
    retriever, _ = build_index(_write(tmp_path / "c.jsonl", docs), 48, 1.0)
    assert retriever.search("Brenn Peak", 1)[0].title == "Brenn Peak"
    assert retriever.search("capital of Veltra", 1)[0] == Passage("Veltra", DOCS[0]["text"].replace("  ", " ")
                                                                  .replace("\n", " "), 0)
    top = retriever.search("filler particular", 5)
    assert top == retriever.search("filler particular", 5) and [p.title for p in top] == [f"Filler {i}" for i in range(5)]
    assert retriever.search("the of and", 3) == []          # stop words only: nothing
    assert retriever.search("zzyzx quux", 3) == []          # no shared word: nothing
    assert len(retriever.search("Osk", 10)) == 2            # only passages that share a word


def test_the_cache_is_reused_and_a_changed_corpus_rebuilds(tmp_path):
    corpus = _write(tmp_path / "c.jsonl", DOCS)
    first, built = build_index(corpus, 48, 1.0)
    assert built and first.cache is not None and (first.cache / "meta.json").is_file()
    stamp = (first.cache / "meta.json").stat().st_mtime_ns
    second, built = build_index(corpus, 48, 1.0)
    assert not built and second.cache == first.cache and second.passages == first.passages
    assert (first.cache / "meta.json").stat().st_mtime_ns == stamp
    assert second.search("capital of Veltra", 1) == first.search("capital of Veltra", 1)
    other_width, built = build_index(corpus, 8, 1.0)        # another passage size: its own index, both kept
    assert built and other_width.cache != first.cache and first.cache.is_dir()
    _write(corpus, DOCS + [{"title": "Lume", "text": "Lume is a slow green river."}])
    changed, built = build_index(corpus, 48, 1.0)
    assert built and changed.documents == 4 and changed.search("Lume river", 1)[0].title == "Lume"
    assert not first.cache.exists() and not other_width.cache.exists()  # the old corpus's indexes are gone
    assert [p.name for p in (tmp_path / "c.jsonl.bm25").iterdir()] == [changed.cache.name]  # no temp folder left
