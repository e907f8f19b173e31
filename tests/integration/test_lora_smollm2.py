"""PPO with LoRA on a real pretrained model: `rlhf ppo` on SmolLM2-135M-Instruct with
`policy.lora`, through the real actors (vLLM-CPU engine, DeepSpeed ZeRO-2 learner, reference,
the digit_fraction reward function), two GRPO steps.

Checks: after the weight sync of step 1 the engine samples step 2 with the learner's exact
(merged) weights: rollout/logprob_gap < 1e-3 (the engine's log-probs of its own samples
against the learner's); the sync sends only the adapted layers (q/k/v/o), not the whole model;
the checkpoint leaves the frozen base out; the exported policy is a plain HF folder with the
adapters merged, changed only where the adapters are. One run (one model load) per module;
small on purpose (4 prompts x 2 samples x 16 tokens) to stay inside the CI budget.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STEPS = 2


@pytest.fixture(scope="module")
def run(smollm2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    rlhf = Path(sys.executable).with_name("rlhf")
    overrides = [f"model.policy={smollm2_dir}", "ppo.advantage=grpo", "ppo.prompts_per_step=4",
                 "rollout.n_samples=2", "ppo.train_batch_size=8", "ppo.micro_batch_size=8",
                 "rollout.max_new_tokens=16", "data.max_prompt_tokens=96", "data.task_size=64",
                 "policy.lr=1e-3", "policy.lora.rank=8", "policy.lora.alpha=16", "sync.bucket_mb=64"]
    proc = subprocess.run([str(rlhf), "ppo", str(ROOT / "configs" / "ppo-tiny.yaml"), *overrides,
                           "--max-steps", str(STEPS), "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return out, [r for r in rows if "reward/mean" in r], Path(smollm2_dir)


def test_engine_samples_with_the_learners_merged_weights_after_the_sync(run):
    _, rows, _ = run
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    # Step 2's samples come from the engine after step 1's sync; the learner scores them
    # with the weights it just trained: equal within 1e-3 per token.
    assert all(r["rollout/logprob_gap"] < 1e-3 for r in rows)


def test_sync_sends_only_the_adapted_layers(run):
    _, rows, base = run
    model_bytes = (base / "model.safetensors").stat().st_size
    # q/k/v/o of 30 layers: 101 MB of the 538 MB float32 model.
    assert 0 < rows[-1]["sync/bytes"] < model_bytes / 4


def test_checkpoint_holds_adapters_not_the_base(run):
    out, _, base = run
    step_dirs = [d for d in (out / "checkpoints").iterdir() if d.name not in ("final", "best") and d.is_dir()]
    assert step_dirs
    size = sum(f.stat().st_size for f in step_dirs[-1].rglob("*") if f.is_file())
    assert size < (base / "model.safetensors").stat().st_size / 10


def test_exported_policy_is_a_plain_merged_folder(run):
    from transformers import AutoModelForCausalLM

    out, _, base = run
    policy = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "final" / "policy", dtype=torch.float32)
    start = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    trained, initial = policy.state_dict(), start.state_dict()
    assert set(trained) == set(initial)
    changed = {n for n in initial if not torch.equal(trained[n], initial[n])}
    assert changed and all(n.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj", "o_proj") for n in changed)
    ids = torch.tensor([[1, 9690, 198, 2683, 314, 260, 3575, 282, 4649, 47, 2]])
    with torch.no_grad():
        gap = (policy(ids).logits.log_softmax(-1) - start(ids).logits.log_softmax(-1)).abs().max()
    assert gap > 1e-3  # the sync above had a real update to carry
