"""Runtime failures through the real CLI end in one line naming the role and phase, exit 1.

The failure is a realistic one, no test hook: a model folder whose model.safetensors is
truncated (config.json and the tokenizer load, so every pre-flight check passes; the worker
fails when it loads the weights).
- `rlhf rm`: the Ray Train reward-model worker fails -> "reward-model worker (rank 0) failed".
- `rlhf eval`: the in-process generation fails -> "eval: checkpoint A (...)".
(`rlhf sft` shares the reward model's one-line mapping of Ray Train failures, tested on
their shapes in test_sft.py; `rlhf ppo` maps actor start-up failures in ppo/groups.py.)
Lines Ray forwards from its workers ("(RayTrainWorker pid=...) ...") are the workers' logs,
not the CLI's: the contract is on the CLI's own lines.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

RLHF = [sys.executable, "-m", "rlhf.orchestrator.cli"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    from rlhf.orchestrator.models.tiny import build_tiny_from_corpus, sample_corpus

    d = tmp_path_factory.mktemp("failures")
    good = Path(build_tiny_from_corpus(sample_corpus(), d / "good", seed=0))
    shutil.copytree(good, d / "bad")
    weights = d / "bad" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)  # a killed copy
    with open(d / "prefs.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": f"What is {i}+{i}?", "chosen": str(2 * i), "rejected": "no idea"}) + "\n")
    return d


def _cli_lines(stderr: str) -> list[str]:
    """stderr without what Ray forwards from its actors and DeepSpeed's accelerator notice."""
    return [line for line in stderr.splitlines()
            if line.strip() and not line.lstrip("\x1b[0123456789m").startswith("(") and "[WARNING]" not in line]


def _check_one_line(run: subprocess.CompletedProcess, expected: str) -> str:
    lines = _cli_lines(run.stderr)
    errors = [line for line in lines if line.startswith("error: ")]
    assert run.returncode == 1, run.stderr[-3000:]
    assert len(errors) == 1 and expected in errors[0], run.stderr[-3000:]
    assert not any("Traceback" in line for line in lines), run.stderr[-3000:]
    return errors[0]


def test_reward_model_worker_failure_is_one_line_exit_1(models, tmp_path):
    run = subprocess.run(RLHF + ["rm", "configs/ppo-tiny.yaml", f"model.policy={models / 'bad'}",
                                 f"data.comparisons=[{{path: {models / 'prefs.jsonl'}, format: preference}}]",
                                 "--out", str(tmp_path / "rm"), "--max-steps", "1"],
                         capture_output=True, text=True, timeout=600)
    line = _check_one_line(run, "reward-model worker (rank 0) failed: SafetensorError")
    assert "\n" not in line and not (tmp_path / "rm" / ".lock").exists()
    # The worker's traceback is in the run folder's worker log, not on the terminal (run/quiet.py).
    assert "pid=" not in run.stdout + run.stderr, run.stderr[-3000:]
    log = (tmp_path / "rm" / "logs" / "ray-workers.log").read_text()
    assert "(RayTrainWorker pid=" in log and "SafetensorError" in log


def test_eval_failure_is_one_line_exit_1(models, tmp_path):
    run = subprocess.run(RLHF + ["eval", "configs/ppo-tiny.yaml", str(models / "bad"), str(models / "good"),
                                 "--samples", "1", "pipeline.eval_prompts=2", "--out", str(tmp_path / "eval.json")],
                         capture_output=True, text=True, timeout=600)
    _check_one_line(run, f"eval: checkpoint A ({models / 'bad'}): loading, generating or judging failed: "
                         "SafetensorError")
    assert not (tmp_path / "eval.json").exists()
