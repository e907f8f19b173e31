"""Tool rollouts through the real vLLM-CPU engine and the HF engine (issue 14, acceptance test 1).

For each engine: the sample's token ids are the concatenation of the ids the engine generated
and the ids the tool inserted (tokenised on their own), the loss mask covers only the policy's
tokens, and after a PPO update of the real PolicyLearner (DeepSpeed over gloo) and an
object-store weight sync, the engine's log-probs of the policy tokens equal the learner's
within 1e-4.

The test tool has an opener and a closer a random tiny model writes often (`e` and a space),
so every reply makes calls. One local Ray, one learner, both engines started once per module.
"""
from __future__ import annotations

import pytest
import torch

from rlhf.orchestrator.experience import Experience, to_sequence_batch
from rlhf.orchestrator.ppo.groups import Scattered

pytestmark = pytest.mark.slow

TIMEOUT_S = 300
ATOL = 1e-4  # float32 everywhere; measured ~1e-6
MAX_NEW, BUDGET, MAX_CALLS, N = 24, 12, 2, 2


def echo_tool():
    """Defined in a function so that Ray pickles the class by value into the engine actors."""

    class Echo:
        name, opener, closer = "echo", "e", " "

        def __call__(self, call_text: str) -> str:
            return f" <{call_text}>"

    return Echo()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from rlhf.orchestrator.models.tiny import build_tiny_from_corpus, sample_corpus

    return str(build_tiny_from_corpus(sample_corpus(), tmp_path_factory.mktemp("tools") / "tiny", seed=0))


@pytest.fixture(scope="module")
def tok(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def prompts(tok):
    texts = ["The model explains the weather today.", "A user asks about simple math.", "Every cat likes the sky!"]
    return [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True,
                                    return_dict=True)["input_ids"] for t in texts]


@pytest.fixture(scope="module")
def engines(ray_local, model_dir):
    """{"vllm": actor, "hf": actor}, each with the echo tool, in one RolloutGroup for the sync."""
    pytest.importorskip("vllm")
    from rlhf.actors.rollout import RolloutEngine
    from rlhf.actors.rollout_hf import HFRolloutEngine
    from rlhf.orchestrator.ppo.rollout_group import RolloutGroup

    spec = {"names": [echo_tool()], "max_calls": MAX_CALLS, "token_budget": BUDGET, "evidence": None}
    common = dict(dtype="float32", max_model_len=256, seed=0, tools=spec)
    actors = {"vllm": ray_local.remote(num_cpus=1)(RolloutEngine).remote(model_dir, kv_cache_gib=1,
                                                                          enforce_eager=True, **common),
              "hf": ray_local.remote(num_cpus=1)(HFRolloutEngine).remote(model_dir, **common)}
    group = RolloutGroup(list(actors.values()), timeout_s=TIMEOUT_S)
    yield actors, group
    group.shutdown()


@pytest.fixture(scope="module")
def synced(ray_local, model_dir, engines, prompts, tok):
    """One PPO update of a real PolicyLearner, then an object-store sync into both engines."""
    from rlhf.actors.learner import LearnerArgs, PolicyLearner
    from rlhf.orchestrator.experience import Samples
    from rlhf.orchestrator.ppo.groups import LearnerGroup
    from rlhf.orchestrator.ppo.weight_sync import make_weight_sync

    _, group = engines
    args = LearnerArgs(model_path=model_dir, zero_stage=2, lr=1e-2, micro_batch_size=2, seed=0)
    policy = LearnerGroup("policy", [ray_local.remote(num_cpus=1)(PolicyLearner).remote(args)], TIMEOUT_S)
    policy.init_process_group()
    fixed = Samples(prompts, [list(range(40, 52))] * len(prompts), [[0.0] * 12] * len(prompts),
                    [False] * len(prompts), list(range(len(prompts))))
    batch = to_sequence_batch(fixed, tok.pad_token_id)
    before = learner_logprobs(ray_local, policy, batch)
    adv = torch.randn(batch.action_mask.shape, generator=torch.Generator().manual_seed(1)) * batch.action_mask
    exp = Experience(batch, before, before.clone(), adv, adv.clone())
    ray_local.get(policy.train_refs([Scattered(exp)], clip_eps=0.2, dual_clip=None, entropy_coef=0.0,
                                    loss_agg="token_mean")[0], timeout=TIMEOUT_S)
    moved = float((learner_logprobs(ray_local, policy, batch) - before).abs().max())
    assert moved > 1e-2, "the update should move the policy"
    make_weight_sync("object_store", policy, group, bucket_mb=0.1, timeout_s=TIMEOUT_S).sync()
    yield policy
    for rank in policy.ranks:
        ray_local.kill(rank)


def learner_logprobs(ray, policy, batch) -> torch.Tensor:
    return torch.cat(ray.get(policy.forward_refs("compute_logprobs", Scattered(batch)), timeout=TIMEOUT_S))


def runs(mask: list[int]) -> list[tuple[int, int, int]]:
    """(value, start, end) of each run of equal mask values."""
    out, start = [], 0
    for k in range(1, len(mask) + 1):
        if k == len(mask) or mask[k] != mask[start]:
            out.append((mask[start], start, k))
            start = k
    return out


@pytest.mark.parametrize("backend", ["vllm", "hf"])
def test_tool_rollout_tokens_mask_and_logprobs_after_a_sync(ray_local, engines, synced, prompts, tok, backend):
    from rlhf.actors.tools import find_call
    from rlhf.orchestrator.models.tiny import stop_token_ids
    from rlhf.orchestrator.ppo.trainer import sampler_logprobs

    actors, _ = engines
    engine, tool = actors[backend], echo_tool()
    index = list(range(len(prompts)))
    samples = ray_local.get(engine.generate.remote(prompts, index, N, 1.0, 1.0, MAX_NEW, 11), timeout=TIMEOUT_S)
    again = ray_local.get(engine.generate.remote(prompts, index, N, 1.0, 1.0, MAX_NEW, 11), timeout=TIMEOUT_S)
    assert again.response_ids == samples.response_ids  # seeded: the same replies again
    assert len(samples) == N * len(prompts) and len(samples.response_mask) == len(samples)

    calls, calling = 0, 0
    stops = set(stop_token_ids(tok))
    for ids, mask, lps, done in zip(samples.response_ids, samples.response_mask, samples.response_logprobs,
                                    samples.finished):
        assert len(mask) == len(ids) and len(lps) == sum(mask) <= MAX_NEW and mask.count(0) <= BUDGET
        assert done == (ids[-1] in stops) and (done or sum(mask) == MAX_NEW)
        # Token ids = generated runs + inserted runs: each inserted run is the tool's answer to
        # the call in the generated text since the previous insertion, tokenised on its own.
        spent, since = 0, 0
        for value, start, end in runs(mask):
            if value == 0:
                _, call = find_call(tok.decode(ids[since:start], skip_special_tokens=True), [tool])
                assert call is not None, f"{backend}: an insertion without a call before it"
                expected = tok(tool(call), add_special_tokens=False)["input_ids"][: BUDGET - spent]
                assert ids[start:end] == expected
                spent, since, calls = spent + end - start, end, calls + 1
        calling += 0 in mask
    assert 2 * calling >= len(samples), f"{backend}: only {calling} of {len(samples)} replies called the tool"

    # The loss mask covers exactly the policy's tokens.
    batch = to_sequence_batch(samples, tok.pad_token_id)
    for i, (p, mask) in enumerate(zip(samples.prompt_ids, samples.response_mask)):
        expected = torch.zeros(batch.action_mask.shape[1])
        expected[len(p) - 1:len(p) - 1 + len(mask)] = torch.tensor(mask, dtype=torch.float32)
        assert torch.equal(batch.action_mask[i], expected)

    # After the sync, the sampler's log-probs of the policy tokens are the learner's.
    learner = learner_logprobs(ray_local, synced, batch)
    sampler = sampler_logprobs(samples, batch.action_mask)
    on = batch.action_mask.bool()
    diff = float((learner - sampler)[on].abs().max())
    print(f"{backend}: {calls} tool calls in {len(samples)} replies; max |sampler - learner| log-prob = {diff:.2e}")
    assert diff < ATOL
