"""The reference as DeepSpeed ZeRO-3 inference ranks (2 Ray actors, gloo, CPU).

Invariant: sharding the reference changes where its parameters live, not its answers; the
2 ranks' log-probs equal the whole-model reference's. Each rank holds about half of the
parameters, and ranks sent unequal slices fail instead of hanging in a gather.
"""
from __future__ import annotations

import pytest
import torch

from rlhf.actors.reference import ReferenceModel
from rlhf.orchestrator.experience import SequenceBatch
from rlhf.orchestrator.models.tiny import TinyModelSpec, build_tiny_from_corpus, sample_corpus

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

WORLD = 2
TIMEOUT_S = 300
TEMPERATURE = 0.7
LOGPROB_ATOL = 1e-5  # float32; the sharded forward gathers the same weights, measured 0.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # Untied LM head: it is used outside its module's forward, so the sharded path must
    # register it as an external parameter (a missed gather would fail or give wrong values).
    return build_tiny_from_corpus(sample_corpus(), tmp_path_factory.mktemp("ref") / "tiny",
                                  spec=TinyModelSpec(hidden_size=128, num_layers=2, tie_word_embeddings=False), seed=0)


def _batch(rows: int = 8) -> SequenceBatch:
    g = torch.Generator().manual_seed(3)
    lengths = [7, 12, 5, 16, 9, 14, 6, 11][:rows]
    T = max(lengths)
    input_ids = torch.randint(3, 300, (rows, T), generator=g)
    attention_mask = torch.zeros(rows, T, dtype=torch.long)
    action_mask = torch.zeros(rows, T - 1)
    for i, n in enumerate(lengths):
        attention_mask[i, :n] = 1
        action_mask[i, 2 : n - 1] = 1  # the first tokens are the "prompt"
    return SequenceBatch(input_ids * attention_mask, attention_mask, action_mask)


@pytest.fixture(scope="module")
def sharded(ray_local, model_dir):
    remote = ray.remote(num_cpus=1)(ReferenceModel)
    ranks = [remote.remote(str(model_dir), micro_batch_size=3, zero_stage=3) for _ in range(WORLD)]
    host, port = ray.get(ranks[0].master_address.remote(), timeout=TIMEOUT_S)
    ray.get([r.init_process_group.remote(host, port, i, WORLD) for i, r in enumerate(ranks)], timeout=TIMEOUT_S)
    yield ranks
    for r in ranks:
        ray.kill(r)


def test_zero3_ranks_equal_the_whole_model_reference(sharded, model_dir):
    batch = _batch()
    whole = ReferenceModel(str(model_dir), micro_batch_size=3)
    want = whole.compute_logprobs(batch, TEMPERATURE)
    got = torch.cat(ray.get([r.compute_logprobs.remote(part, TEMPERATURE)
                             for r, part in zip(sharded, batch.split(WORLD))], timeout=TIMEOUT_S))
    assert got.shape == want.shape == batch.action_mask.shape
    assert (want[batch.action_mask.bool()] < -0.1).all()  # real log-probs, not zeros
    assert (got[~batch.action_mask.bool()] == 0).all()
    assert (got - want).abs().max() < LOGPROB_ATOL
    # Each rank holds its partition only: about half of the parameters (DeepSpeed pads
    # each tensor's partition to equal sizes, so a little more).
    held = ray.get([r.held_parameters.remote() for r in sharded], timeout=TIMEOUT_S)
    total = whole.held_parameters()
    assert all(total / WORLD <= h < 0.55 * total for h in held), (held, total)


def test_unequal_slices_fail_instead_of_hanging(sharded):
    batch = _batch()
    # 6 rows (2 micro-batches of 3) on rank 0, 2 rows (1 micro-batch) on rank 1.
    refs = [sharded[0].compute_logprobs.remote(batch.select(slice(0, 6)), TEMPERATURE),
            sharded[1].compute_logprobs.remote(batch.select(slice(6, 8)), TEMPERATURE)]
    for ref in refs:
        with pytest.raises(ray.exceptions.RayTaskError, match="different numbers of micro-batches"):
            ray.get(ref, timeout=TIMEOUT_S)
