"""The HF `generate` rollout backend on a real local Ray: the rollout contract, weight sync
from a real DeepSpeed `PolicyLearner` (object_store and gloo), and a short PPO run with it.

The engine starts from model B and the learner from model A (same tokenizer and shape,
other random weights), so a sync has something to change; after each sync the engine's
sampler log-probs must equal the learner's log-probs of the same tokens. No vLLM needed.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlhf.orchestrator.experience import Experience, Samples, to_sequence_batch
from rlhf.orchestrator.ppo.groups import Scattered

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300
ATOL = 1e-4  # float32 on both sides
TEMPERATURE = 0.7  # not 1, so the log_softmax(logits / T) convention is what is checked


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(A, B): one tokenizer, one shape, weights from seeds 0 and 1."""
    from rlhf.orchestrator.models.tiny import TinyModelSpec, build_tiny_model, sample_corpus, train_tokenizer

    spec = TinyModelSpec()
    tokenizer = train_tokenizer(sample_corpus(), spec.vocab_size)
    root = tmp_path_factory.mktemp("hf-rollout")
    return tuple(str(build_tiny_model(spec, tokenizer, root / name, seed=seed)) for name, seed in (("a", 0), ("b", 1)))


@pytest.fixture(scope="module")
def engines(ray_local, models):
    """Two HF engines on model B with different engine seeds (only unseeded requests use them)."""
    from rlhf.actors.rollout_hf import HFRolloutEngine

    actors = [ray_local.remote(num_cpus=1)(HFRolloutEngine).remote(models[1], dtype="float32", max_model_len=256,
                                                                    seed=seed, rpc_timeout_s=120)
              for seed in (0, 1)]
    ray_local.get([a.__ray_ready__.remote() for a in actors], timeout=TIMEOUT_S)
    yield actors
    for actor in actors:
        ray_local.get(actor.shutdown.remote(), timeout=60)
        ray_local.kill(actor)


@pytest.fixture(scope="module")
def prompts(models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models[0])
    texts = ["The model explains the weather today.", "Hi!", "A user asks about simple math, then asks again.",
             "Every cat likes the sky!"]  # different lengths: generate left-pads them in one batch
    return [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True,
                                    return_dict=True)["input_ids"] for t in texts], tok


def _sampler_layout(samples: Samples, like: torch.Tensor) -> torch.Tensor:
    """The sampler's log-probs laid out like a learner's [B, T-1] tensor."""
    out = torch.zeros_like(like)
    for i, lp in enumerate(samples.response_logprobs):
        start = len(samples.prompt_ids[i]) - 1
        out[i, start:start + len(lp)] = torch.tensor(lp)
    return out


def test_generate_follows_the_rollout_contract(ray_local, models, engines, prompts):
    from transformers import AutoModelForCausalLM

    from rlhf.orchestrator.ppo.rollout_group import RolloutGroup
    from rlhf.orchestrator.models.tiny import stop_token_ids

    prompt_ids, tok = prompts
    n, max_new = 3, 24
    s = ray_local.get(engines[0].generate.remote(prompt_ids, [5, 6, 7, 8], n, TEMPERATURE, 1.0, max_new, 123),
                      timeout=TIMEOUT_S)
    assert len(s) == n * len(prompt_ids) and s.prompt_index == [i for i in (5, 6, 7, 8) for _ in range(n)]
    assert s.prompt_ids == [p for p in prompt_ids for _ in range(n)]
    stops = set(stop_token_ids(tok))
    for ids, lps, done in zip(s.response_ids, s.response_logprobs, s.finished):
        assert len(ids) == len(lps) >= 1 and all(lp <= 0.0 for lp in lps)
        assert done == (ids[-1] in stops) and not stops & set(ids[:-1])
        assert done or len(ids) == max_new
    assert len({tuple(r) for r in s.response_ids}) > 1  # sampled, not one greedy reply

    # Sampler log-probs are log_softmax(logits / T) of a plain forward pass (what a learner computes).
    model = AutoModelForCausalLM.from_pretrained(models[1], dtype=torch.float32).eval()
    batch = to_sequence_batch(s, tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1] / TEMPERATURE
    forward = torch.log_softmax(logits, -1).gather(-1, batch.input_ids[:, 1:, None])[..., 0] * batch.action_mask
    torch.testing.assert_close(_sampler_layout(s, forward), forward, atol=ATOL, rtol=0)

    # Seeds follow the global prompt index: two engines (other engine seeds), one prompt per
    # chunk, give the very samples that one engine gave for the whole batch.
    group = RolloutGroup(engines, timeout_s=TIMEOUT_S)
    spread = group.generate(prompt_ids, n=n, temperature=TEMPERATURE, max_new_tokens=max_new, seed=123 + 5 * n,
                            chunk_size=1)
    assert sum(c > 0 for c in group.last_chunks_per_engine) == 2
    assert spread.response_ids == s.response_ids and spread.finished == s.finished
    assert max(abs(a - b) for x, y in zip(spread.response_logprobs, s.response_logprobs) for a, b in zip(x, y)) < 1e-5


def test_weight_sync_from_a_policy_learner_object_store_then_gloo(ray_local, models, engines, prompts):
    from rlhf.actors.learner import LearnerArgs, PolicyLearner
    from rlhf.orchestrator.ppo.groups import LearnerGroup
    from rlhf.orchestrator.ppo.rollout_group import RolloutGroup
    from rlhf.orchestrator.ppo.weight_sync import make_weight_sync

    prompt_ids, tok = prompts
    rollout = RolloutGroup(engines[:1], timeout_s=TIMEOUT_S)
    args = LearnerArgs(model_path=models[0], lr=1e-2, micro_batch_size=4, temperature=TEMPERATURE)
    policy = LearnerGroup("policy", [ray_local.remote(num_cpus=1)(PolicyLearner).remote(args)], TIMEOUT_S)
    policy.init_process_group()

    def gap(step: int) -> tuple[float, torch.Tensor]:
        """max |sampler - learner| over sampled tokens, and the batch the engine sampled."""
        s = rollout.generate(prompt_ids, n=2, temperature=TEMPERATURE, max_new_tokens=16, seed=step)
        batch = to_sequence_batch(s, tok.pad_token_id)
        learner = torch.cat(ray_local.get(policy.forward_refs("compute_logprobs", Scattered(batch)),
                                          timeout=TIMEOUT_S))
        return float((_sampler_layout(s, learner) - learner).abs().max()), batch

    def check_sync(backend: str) -> None:
        stats = make_weight_sync(backend, policy, rollout, bucket_mb=0.05, timeout_s=TIMEOUT_S).sync()
        assert stats.buckets > 1
        after, _ = gap(2)
        print(f"{backend}: sampler vs learner after sync {after:.2e}")
        assert after < ATOL
        sent = ray_local.get(policy.call_all("weight_checksums"), timeout=TIMEOUT_S)[0]
        received = rollout.weights_checksums()[0]
        assert received.keys() == sent.keys()
        assert received == pytest.approx(sent, rel=1e-9, abs=1e-9)

    try:
        before, batch = gap(1)
        assert before > 1e-2, "engine (model B) and learner (model A) should differ before a sync"
        check_sync("object_store")

        # One PPO step with fixed random advantages moves the learner away from the engine.
        g = torch.Generator().manual_seed(1)
        old = torch.cat(ray_local.get(policy.forward_refs("compute_logprobs", Scattered(batch)), timeout=TIMEOUT_S))
        adv = torch.randn(batch.action_mask.shape, generator=g) * batch.action_mask
        ray_local.get(policy.train_refs([Scattered(Experience(batch, old, old.clone(), adv, adv.clone()))],
                                        clip_eps=0.2, dual_clip=None, entropy_coef=0.0, loss_agg="token_mean")[0],
                      timeout=TIMEOUT_S)
        assert gap(3)[0] > 1e-3, "the update should move the learner's log-probs"
        check_sync("gloo")
    finally:
        for rank in policy.ranks:
            ray_local.kill(rank)


@pytest.mark.parametrize("overrides,key,reason", [
    (["rollout.backend=hf", "rollout.tensor_parallel_size=2"], "rollout.tensor_parallel_size", "one device per engine"),
    (["rollout.backend=hf", "placement.gpus_per_node=8", "sync.backend=nccl"], "sync.backend", "object_store, gloo"),
    (["rollout.backend=hff"], "rollout.backend", "'vllm' or 'hf'"),
])
def test_hf_backend_config_rules_are_one_line_errors(capsys, overrides, key, reason):
    from rlhf.orchestrator.cli import main

    assert main(["config", "show", str(ROOT / "configs" / "ppo-tiny.yaml"), *overrides]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert key in err and reason in err, err
