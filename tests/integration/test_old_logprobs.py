"""Issue 16's correctness checks for two speed levers, on a real DeepSpeed PolicyLearner (gloo,
one Ray actor) and the HF rollout engine holding the same weights:

- ppo.old_logprobs=sampler: the engine's log-probs of its sampled tokens as PPO's old
  log-probs give the same update as the learner's own forward (within 1e-5), and the guard's
  gap, measured on the first micro-batch, is ~0;
- reference.colocate: the reference held inside the policy rank gives the same log-probs as a
  separate ReferenceModel of the same folder.

The reference is a second tiny model (another seed), so its log-probs differ from the policy's.
"""
from __future__ import annotations

import pytest
import torch

from rlhf.orchestrator.experience import Experience, to_sequence_batch
from rlhf.orchestrator.rl import masked_mean

pytestmark = pytest.mark.slow

TIMEOUT_S = 300
TEMPERATURE = 0.7
UPDATE_ATOL = 1e-5  # the bound; float32 everywhere, measured ~1e-8


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from rlhf.orchestrator.models.tiny import build_tiny_from_corpus, sample_corpus

    root = tmp_path_factory.mktemp("old_logprobs")
    return {name: str(build_tiny_from_corpus(sample_corpus(), root / name, seed=seed))
            for name, seed in (("policy", 0), ("reference", 1))}


@pytest.fixture(scope="module")
def learner(ray_local, models):
    from rlhf.actors.learner import LearnerArgs, PolicyLearner

    # adam_eps 1e-5 (tests/integration/test_learners.py): Adam's first step would otherwise
    # magnify float32 noise in near-zero gradients.
    args = LearnerArgs(model_path=models["policy"], zero_stage=2, lr=1e-2, adam_eps=1e-5, micro_batch_size=4,
                       seed=0, temperature=TEMPERATURE, reference_path=models["reference"])
    actor = ray_local.remote(num_cpus=1)(PolicyLearner).remote(args)
    host, port = ray_local.get(actor.master_address.remote(), timeout=TIMEOUT_S)
    ray_local.get(actor.init_process_group.remote(host, port, 0, 1), timeout=TIMEOUT_S)
    yield actor
    ray_local.kill(actor)


@pytest.fixture(scope="module")
def sampled(models):
    """Replies of the HF engine (in this process) from the policy folder, and their batch."""
    from transformers import AutoTokenizer

    from rlhf.actors.rollout_hf import HFRolloutEngine

    tok = AutoTokenizer.from_pretrained(models["policy"])
    texts = ["The model explains the weather today.", "A user asks about simple math.", "Every cat likes the sky!",
             "Tell me a story about a dog."]
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"] for t in texts]
    engine = HFRolloutEngine(models["policy"], dtype="float32", max_model_len=256, seed=0)
    samples = engine.generate(prompts, list(range(len(prompts))), 2, TEMPERATURE, 1.0, 12, 5)
    return samples, to_sequence_batch(samples, tok.pad_token_id)


def _get(ray, ref):
    return ray.get(ref, timeout=TIMEOUT_S)


def test_sampler_old_logprobs_give_the_learners_update(ray_local, learner, sampled, tmp_path):
    from rlhf.orchestrator.ppo.trainer import sampler_logprobs

    samples, batch = sampled
    mask = batch.action_mask
    learner_old = _get(ray_local, learner.compute_logprobs.remote(batch))
    sampler_old = sampler_logprobs(samples, mask)
    assert float(masked_mean((learner_old - sampler_old).abs(), mask)) < 1e-5  # the engine holds these weights
    adv = torch.randn(mask.shape, generator=torch.Generator().manual_seed(3)) * mask
    counts = dict(num_tokens=int(mask.sum()), num_seqs=len(batch))
    ppo = dict(clip_eps=0.2, dual_clip=None, entropy_coef=0.0, loss_agg="token_mean", measure_gap=True)

    _get(ray_local, learner.save_checkpoint.remote(str(tmp_path)))
    start = _get(ray_local, learner.full_state_dict.remote())
    updated = {}
    for name, old in (("learner", learner_old), ("sampler", sampler_old)):
        _get(ray_local, learner.load_checkpoint.remote(str(tmp_path)))  # the same weights, optimizer and RNG
        exp = Experience(batch, old, old.clone(), adv, adv.clone())
        stats = _get(ray_local, learner.train_step.remote(exp, **counts, **ppo))
        assert stats["policy/old_logprob_gap"] < 1e-5  # the guard: old log-probs match these weights
        updated[name] = _get(ray_local, learner.full_state_dict.remote())

    moved = max(float((updated["learner"][k] - start[k]).abs().max()) for k in start)
    assert moved > 1e-3, "the update should move the weights"
    diff = max(float((updated["learner"][k] - updated["sampler"][k]).abs().max()) for k in start)
    assert diff <= UPDATE_ATOL, f"sampler old log-probs changed the update by {diff:.2e}"


def test_guard_reports_a_gap_when_old_logprobs_are_off(ray_local, learner, sampled):
    _, batch = sampled
    mask = batch.action_mask
    learner_old = _get(ray_local, learner.compute_logprobs.remote(batch))
    off = learner_old + 0.05 * mask  # as if the engine held other weights
    exp = Experience(batch, off, off.clone(), torch.zeros(mask.shape), torch.zeros(mask.shape))
    stats = _get(ray_local, learner.train_step.remote(exp, num_tokens=int(mask.sum()), num_seqs=len(batch),
                                                      clip_eps=0.2, dual_clip=None, entropy_coef=0.0,
                                                      loss_agg="token_mean", measure_gap=True))
    assert stats["policy/old_logprob_gap"] == pytest.approx(0.05, abs=1e-4)


def test_colocated_reference_equals_a_separate_reference(ray_local, learner, sampled, models):
    from rlhf.actors.reference import ReferenceModel

    _, batch = sampled
    mask = batch.action_mask
    inside = _get(ray_local, learner.reference_logprobs.remote(batch, temperature=TEMPERATURE))
    separate = ReferenceModel(models["reference"], micro_batch_size=3).compute_logprobs(batch, TEMPERATURE)
    assert float((inside - separate).abs().max()) < 1e-6
    policy = _get(ray_local, learner.compute_logprobs.remote(batch))
    assert float(masked_mean((inside - policy).abs(), mask)) > 1e-2  # it is the reference, not the policy
