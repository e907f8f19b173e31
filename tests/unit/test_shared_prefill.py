"""The HF rollout engine prefills each prompt once for its n samples (rlhf.actors.rollout_hf
`_shared_prefill`): the same tokens and log-probs as prefilling every row.

A tiny random model built locally, in-process (no Ray): 3 prompts of different lengths
(left padding) x 4 seeded samples each, with and without the shared prefill.

Run: .venv/bin/pytest tests/unit/test_shared_prefill.py -q
"""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from rlhf.actors.rollout_hf import HFRolloutEngine
    from rlhf.orchestrator.models.tiny import TinyModelSpec, build_tiny_model, sample_corpus, train_tokenizer

    spec = TinyModelSpec()
    tokenizer = train_tokenizer(sample_corpus(), spec.vocab_size)
    path = build_tiny_model(spec, tokenizer, tmp_path_factory.mktemp("prefill") / "m", seed=0)
    return HFRolloutEngine(str(path), dtype="float32", max_model_len=256, seed=0)


def _generate(engine, prompts, n):
    return engine.generate(prompts, list(range(len(prompts))), n=n, temperature=0.9, max_new_tokens=12, seed=7)


def test_shared_prefill_gives_the_same_samples(engine, monkeypatch):
    prompts = [[5, 9, 13, 40, 41, 42, 7], [11, 12], [20, 30, 40, 50]]
    calls = []
    real = engine._shared_prefill

    def spy(ids, mask):
        cache = real(ids, mask)
        calls.append(cache is not None)
        return cache

    monkeypatch.setattr(engine, "_shared_prefill", spy)
    shared = _generate(engine, prompts, n=4)
    assert calls == [True]  # one generate call, its prompts prefilled once per group
    monkeypatch.setattr(engine, "_shared_prefill", lambda ids, mask: None)
    plain = _generate(engine, prompts, n=4)
    assert shared.response_ids == plain.response_ids
    assert shared.prompt_index == plain.prompt_index == [i for i in range(3) for _ in range(4)]
    for a, b in zip(shared.response_logprobs, plain.response_logprobs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
    assert len({tuple(r) for r in shared.response_ids}) > 3  # the samples differ: seeds per row


def test_no_sharing_without_repeated_prompts(engine):
    ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    assert engine._shared_prefill(ids, (ids > 0).long()) is None
    one = torch.tensor([[5, 6, 7]])
    assert engine._shared_prefill(one, torch.ones_like(one)) is None
