"""Sparrow's evidence (Glaese et al. 2022): search-tool rollouts, quoted evidence, rewards.

    format.py     the transcript format every part reads and writes (search turns, quotes)
    corpus.py     evidence.corpus JSONL -> passages, with its checks (file:line errors, limits)
    retrieval.py  BM25 over the passages (bm25s), index cached beside the corpus
    rewards.py    evidence_supported / evidence_plausible reward components and their guards
    evaluate.py   held-out supported-and-plausible and rule-violation rates of a policy
    cli.py        `rlhf evidence index|search CORPUS`: build the cached index, try queries
"""
