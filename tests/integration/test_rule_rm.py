"""Rule reward model end to end on CPU: Ray Train, 2 workers, DeepSpeed ZeRO-2, tiny model.

A comparison store holds K = 4 replies per prompt: every mix of (claims to be human | says
it is an AI) and (insults the user | is polite). A stand-in task's `rule_violations` labels
each stored reply against two rules, so half of all labels are violations and which half
depends on the rule: the model has to read the rule text to beat a constant guess. Checks:
held-out accuracy (prompts never trained on) beats the held-out majority guess, the folder
(rules.json, metrics), and RewardScorer's rules_rm ranks the reply that breaks both rules
below the clean one. The tiny model starts randomly initialised (no SFT needed for this).
"""
from __future__ import annotations

import json
import random

import pytest

from rlhf.orchestrator.config import build_config
from rlhf.orchestrator.models.tiny import IM_END, TinyModelSpec, build_tiny_from_corpus

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

RULES = {"no_human_claims": "Do not pretend to be a human.", "no_insults": "Do not insult the user."}
HUMAN, AI = ("I am a human with a body.", "I grew up in Lyon."), ("I am an AI assistant.", "I am a computer program.")
RUDE, POLITE = ("You are an idiot.", "What a stupid question."), ("Happy to help.", "Thanks for asking.")
TOPICS = ["the sea", "bread", "trains", "rain", "chess", "owls", "maps", "tea", "jazz", "snow"]


class RuleTask:
    """Stand-in for a task with simulated rule labels (the evidence task has the real ones)."""

    rules = RULES

    @staticmethod
    def rule_violations(messages, reply):
        return {"no_human_claims": any(h in reply for h in HUMAN), "no_insults": any(r in reply for r in RUDE)}


def _reply(rng, human: bool, rude: bool, topic: str) -> str:
    return f"{rng.choice(HUMAN if human else AI)} {rng.choice(RUDE if rude else POLITE)} About {topic}: yes."


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    """A tiny model and a comparison store of 80 prompts x 4 replies (unranked: labels only)."""
    from transformers import AutoTokenizer

    from rlhf.orchestrator.recipe.comparisons import ComparisonStore

    root = tmp_path_factory.mktemp("rule-rm")
    rng = random.Random(0)
    prompts = [[{"role": "user", "content": f"Tell me about {t}, friend {i}."}] for i in range(8) for t in TOPICS]
    corpus = (["Rule: " + t for t in RULES.values()] + [p[0]["content"] for p in prompts]
              + list(HUMAN + AI + RUDE + POLITE) * 3)
    model = build_tiny_from_corpus(corpus, root / "init", TinyModelSpec(vocab_size=400))
    tok = AutoTokenizer.from_pretrained(str(model))
    stop = tok.convert_tokens_to_ids(IM_END)
    with ComparisonStore(root / "comparisons.sqlite") as store:
        for i, prompt in enumerate(prompts):
            topic = TOPICS[i % len(TOPICS)]
            replies = [_reply(rng, h, r, topic) for h in (True, False) for r in (True, False)]
            rng.shuffle(replies)
            store.add(1, f"p{i}", str(model), prompt, replies,
                      [tok.encode(r, add_special_tokens=False) + [stop] for r in replies])
    return root, model


def test_rule_rm_learns_the_rules_and_rewards_the_clean_reply(ray_local, store_dir):
    from transformers import AutoTokenizer

    from rlhf.actors.reward import RewardScorer
    from rlhf.orchestrator.experience import Samples
    from rlhf.orchestrator.recipe.rule_rm import run_rule_rm, store_examples

    root, model = store_dir
    cfg = build_config({"name": "rule-rm-test", "seed": 0, "rule_rm": {
        "num_workers": 2, "zero_stage": 2, "lr": 2e-3, "batch_size": 32, "micro_batch_size": 8, "epochs": 4,
        "held_out_fraction": 0.2, "max_tokens": 96}})
    simulated, people = store_examples(root / "comparisons.sqlite", RuleTask(), RULES)
    assert len(simulated) == 80 * 4 * 2 and people == []
    result = run_rule_rm(cfg, str(model), simulated, RULES, root / "rule_rm")

    print(f"rule RM: held-out accuracy {result.heldout_accuracy:.3f} (majority {result.heldout_majority:.3f}), "
          f"per rule {result.heldout_per_rule}, violation rate {result.violation_rate:.3f}, {result.steps} steps")
    assert result.violation_rate == pytest.approx(0.5)
    assert result.heldout_examples == 16 * 4 * 2 and result.examples == 640
    assert result.heldout_accuracy >= result.heldout_majority + 0.25
    assert set(result.heldout_per_rule) == set(RULES)
    assert json.loads((root / "rule_rm" / "checkpoint" / "rules.json").read_text()) == RULES
    lines = (root / "rule_rm" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == result.steps and "rule_rm/loss" in json.loads(lines[-1])

    # The reward actor, in-process: rules_rm = sum_rule log(1 - P) is higher for the clean reply.
    tok = AutoTokenizer.from_pretrained(result.checkpoint)
    prompt = [{"role": "user", "content": "Tell me about owls, friend 9."}]  # a prompt not in the store
    rng = random.Random(5)
    replies = [_reply(rng, True, True, "owls"), _reply(rng, False, False, "owls")]
    response = [tok.encode(r, add_special_tokens=False) + [tok.convert_tokens_to_ids(IM_END)] for r in replies]
    samples = Samples(prompt_ids=[[1]] * 2, response_ids=response, response_logprobs=[[]] * 2,
                      finished=[True] * 2, prompt_index=[0, 0])
    scores = RewardScorer(result.checkpoint, functions={}, rule_model_path=result.checkpoint).score(samples, [prompt])
    broken, clean = scores.components["rules_rm"]
    assert broken < clean <= 0.0
