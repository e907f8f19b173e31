"""`rlhf pipeline` end to end, shortened to one round and few steps, through the real CLI.

The run is configs/evidence-quickstart.yaml (the recipe with everything on: the search tool in
every rollout, the evidence rewards, the rule reward model) with GAE and PPO-ptx, so one run
covers the whole pipeline. Checks that every stage produced its artefacts, that comparisons
landed in SQLite with provenance, that the evidence figures and metrics are there, that a
finished run resumes without redoing anything, and that `rlhf chat` answers with the final policy.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.orchestrator.recipe.comparisons import ComparisonStore, prompt_key

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RLHF = str(Path(sys.executable).with_name("rlhf"))
SHORT = ["data.task_size=512", "pipeline.rounds=1", "pipeline.eval_prompts=8", "rm.prompts_per_round=24",
         "rm.epochs=1", "sft.max_steps=40", "ppo.steps=3", "ppo.prompts_per_step=8", "ppo.train_batch_size=16",
         "ppo.ptx_coef=0.1", "ppo.advantage=gae", "rule_rm.epochs=1"]


def _pipeline(out: Path, *extra: str) -> subprocess.CompletedProcess:
    # A relative --out, as `make run` passes: Ray Train workers and actors run elsewhere.
    return subprocess.run([RLHF, "pipeline", str(ROOT / "configs" / "evidence-quickstart.yaml"), *SHORT, "--out", out.name,
                           *extra], capture_output=True, text=True, timeout=1500, cwd=out.parent)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "run"
    proc = _pipeline(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_every_stage_leaves_its_artefacts(run):
    out, proc = run
    assert "pipeline done:" in proc.stdout
    state = json.loads((out / "pipeline_state.json").read_text())["stages"]
    assert list(state) == ["sft", "round1/comparisons", "round1/rm", "round1/rule_rm", "round1/ppo", "round1/eval",
                           "best"]
    for folder in (out / "sft" / "checkpoint", out / "round1" / "rm" / "checkpoint",
                   out / "round1" / "ppo" / "checkpoints" / "final" / "policy"):
        assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file(), folder
    assert (out / "round1" / "rm" / "checkpoint" / "value_head.safetensors").is_file()  # the critic's start
    ev = json.loads((out / "round1" / "eval.json").read_text())
    for key in ("rm_pairwise_accuracy", "labeler_score/sft", "labeler_score/final", "win_rate_vs_sft"):
        assert key in ev
    assert 0.0 <= ev["win_rate_vs_sft"] <= 1.0
    # The figures against the starting model (the untrained init model here) and the collapse check.
    assert 0.0 <= ev["win_rate_vs_start"] <= 1.0 and ev["kl_to_sft/final"] is not None  # None: not finite
    assert all(0.0 <= ev[f"distinct2/{p}"] <= 1.0 for p in ("start", "sft", "final"))
    assert len(ev["samples"]) == 3 and set(ev["samples"][0]) == {"prompt", "start", "sft", "final"}
    assert "win rate vs the starting model" in proc.stdout and "KL to SFT" in proc.stdout
    assert "## Sample replies" in (out / "round1" / "report.md").read_text()
    assert (out / "round1" / "report.md").read_text().count("|") > 10
    assert (out / "round1" / "report.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["peak_rss_gib"] > 0.1
    # PPO-ptx: the demonstrations' NLL is mixed into the policy loss and logged.
    ppo_rows = [json.loads(line) for line in (out / "round1" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in ppo_rows if r["step"] > 0]  # step 0: the judge's score of the starting policy
    assert len(trained) == 3 and all(r["policy/ptx_loss"] > 0 for r in trained)
    assert ppo_rows[0] == {"step": 0, "eval/labeler_score": ppo_rows[0]["eval/labeler_score"]}


def test_worker_output_goes_to_the_run_folder_not_the_terminal(run):
    """vLLM's, DeepSpeed's and Ray Train's start-up lines land in DIR/logs/ray-workers.log
    (run/quiet.py); the terminal keeps the stage lines."""
    out, proc = run
    log = (out / "logs" / "ray-workers.log").read_text()
    assert "(RolloutEngine pid=" in log and "(RayTrainWorker pid=" in log and "(PolicyLearner pid=" in log
    printed = proc.stdout + proc.stderr
    for noise in ("Triton is installed", "Setting accelerator to CPU", "built successfully", "Requesting resources",
                  "Token authentication is enabled", "token log-probs: backend"):
        assert noise not in printed, noise
    assert "Triton is installed" in log  # the same lines, kept for whoever looks
    assert "worker output in" in proc.stdout and "round 1 reward model: held-out accuracy" in proc.stdout


def test_evidence_corpus_rule_rm_rewards_and_rates(run):
    """The evidence parts: the task's corpus written and indexed once, the rule RM trained and in the
    PPO reward, the evidence rewards and metrics logged, the held-out Sparrow rates printed."""
    out, proc = run
    corpus = out / "evidence" / "corpus.jsonl"
    docs = [json.loads(line) for line in corpus.read_text().splitlines()]
    assert len(docs) > 100 and all(set(d) == {"title", "text"} for d in docs)
    assert any((out / "evidence").glob("corpus.jsonl.bm25/*"))  # the index, cached beside the corpus
    state = json.loads((out / "pipeline_state.json").read_text())["stages"]
    rule_rm = Path(state["round1/rule_rm"]["checkpoint"])
    assert set(json.loads((rule_rm / "rules.json").read_text())) == {"no_human_claims", "no_false_facts",
                                                                     "stay_on_topic"}
    assert state["round1/rule_rm"]["examples"] == 24 * 4 * 3  # every stored reply x every rule
    rows = [json.loads(line) for line in (out / "round1" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    for row in (r for r in rows if r["step"] > 0):
        assert row["reward/rules_rm"] <= 0.0  # sum of log(1 - P(violation))
        for key in ("reward/evidence_supported", "reward/evidence_plausible", "reward/model", "evidence/search_rate",
                    "evidence/supported_rate", "evidence/supported_and_plausible_rate", "evidence/quote_chars"):
            assert key in row, key
    ev = json.loads((out / "round1" / "eval.json").read_text())
    for policy in ("sft", "final"):
        assert 0.0 <= ev[f"evidence/supported_and_plausible_rate/{policy}"] <= 1.0
        assert 0.0 <= ev[f"rules/violation_rate/{policy}"] <= 1.0
    assert "evidence (held-out): supported and plausible SFT" in proc.stdout and "rule violations" in proc.stdout


def test_comparisons_landed_in_sqlite_with_provenance(run):
    out, _ = run
    with ComparisonStore(out / "comparisons.sqlite") as store:
        comparisons = store.load()
    assert len(comparisons) == 24
    sft = str(out / "sft" / "checkpoint")
    for c in comparisons:
        assert c.round == 1 and c.policy == sft and c.prompt_id == prompt_key(c.prompt_messages)
        assert len(c.replies) == 4 == len(c.ranks)  # K replies, each ranked
        assert c.prompt_messages[-1]["role"] == "user"


def test_finished_run_resumes_without_redoing_and_refuses_without_resume(run):
    out, _ = run
    refused = _pipeline(out)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    before = (out / "pipeline_state.json").read_text()
    resumed = _pipeline(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (out / "pipeline_state.json").read_text() == before
    with ComparisonStore(out / "comparisons.sqlite") as store:
        assert store.count() == 24


def test_chat_answers_with_the_final_policy(run):
    out, _ = run
    policy = json.loads((out / "summary.json").read_text())["chosen_policy"]
    proc = subprocess.run([RLHF, "chat", str(policy), "--once", "What is 2 + 3?", "--max-new-tokens", "16"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()
