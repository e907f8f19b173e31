"""`rlhf evidence ...`: build and query the search tool's index of a corpus.

    rlhf evidence index CORPUS.jsonl [--passage-words 48]       builds (or finds) the cached index, one line
    rlhf evidence search CORPUS.jsonl "capital of Veltra" [-k 3]  the passages the search tool would insert

A bad corpus (missing, over --max-corpus-mb, a malformed line, no documents) is one line
naming the file (and line), exit 2. Runs on one CPU; nothing here needs Ray.
"""
from __future__ import annotations

import time

from rlhf.orchestrator.errors import EXIT_OK


def _positive(kind):
    def parse(text: str):
        import argparse

        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value <= 0:
            raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
        return value
    return parse


def _cmd_index(args) -> int:
    from rlhf.orchestrator.evidence.retrieval import build_index

    start = time.perf_counter()
    retriever, built = build_index(args.corpus, args.passage_words, args.max_corpus_mb)
    seconds = time.perf_counter() - start
    where = retriever.cache if retriever.cache is not None else "in memory (corpus folder not writable)"
    print(f"{'built' if built else 'cached'}: {retriever.documents} documents, {len(retriever.passages)} passages "
          f"of ~{args.passage_words} words, {seconds:.2f} s, index {where}")
    return EXIT_OK


def _cmd_search(args) -> int:
    from rlhf.orchestrator.evidence.format import result_lines
    from rlhf.orchestrator.evidence.retrieval import build_index

    retriever, _ = build_index(args.corpus, args.passage_words, args.max_corpus_mb)
    found = retriever.search(args.query, args.k)
    print(result_lines(found) if found else "(no passage shares a word with the query)", end="" if found else "\n")
    return EXIT_OK


def register(sub) -> None:
    """Adds `evidence index|search` to the top-level subparsers."""
    evidence = sub.add_parser("evidence", help="the search tool's BM25 index over an evidence corpus")
    evidence_sub = evidence.add_subparsers(dest="evidence_command", required=True, parser_class=type(evidence))
    for name, func, help in (("index", _cmd_index, "build (or find) the cached BM25 index; prints one line"),
                             ("search", _cmd_search, "print the passages a query retrieves, as Search Result lines")):
        cmd = evidence_sub.add_parser(name, help=help)
        cmd.add_argument("corpus", metavar="CORPUS", help='JSONL of {"title", "text"} documents')
        if name == "search":
            cmd.add_argument("query", help="the search query")
            cmd.add_argument("-k", type=_positive(int), default=3, help="passages to show (default 3)")
        cmd.add_argument("--passage-words", type=_positive(int), default=48,
                         help="documents are split into passages of about this many words (evidence.passage_words)")
        cmd.add_argument("--max-corpus-mb", type=_positive(float), default=256.0,
                         help="largest corpus file accepted, in MB (evidence.max_corpus_mb)")
        cmd.set_defaults(func=func)
