"""Reward functions and Sparrow-style rules, hand-computed; RewardScorer combining them."""
from __future__ import annotations

import pytest

from rlhf.actors.reward import RewardScorer
from rlhf.orchestrator.config import RewardConfig, build_config
from rlhf.orchestrator.errors import ConfigError
from rlhf.orchestrator.experience import Samples
from rlhf.orchestrator.tasks.rewards import (
    REWARD_FUNCTIONS,
    RuleParams,
    bind_reward_functions,
    build_reward_functions,
    digit_fraction,
    forbidden_phrase,
    no_repetition,
)
from rlhf.orchestrator.models.tiny import build_tiny_from_corpus, sample_corpus

ADD = [{"role": "user", "content": "What is 2 + 3?"}]
MUL = [{"role": "user", "content": "What is 3 * 4?"}]


def test_digit_fraction_unchanged():
    assert digit_fraction(ADD, " a1b2 ", []) == 0.5  # 2 digits of 4 characters after strip
    assert digit_fraction(ADD, "   ", []) == 0.0


def test_arithmetic_is_the_simulated_labeler():
    fn = REWARD_FUNCTIONS["arithmetic"]
    assert fn(ADD, "2 + 3 = 5. Happy to help!", []) == 1.5   # correct +1, polite +0.5
    assert fn(ADD, "It is 6.", []) == -1.0                   # wrong


def test_forbidden_phrase_counts_every_occurrence_case_insensitively():
    reply = "Sorry, as an AI I am SORRY."
    # "sorry" twice + "as an ai" once = 3 occurrences -> -3
    assert forbidden_phrase(ADD, reply, [], phrases=("sorry", "As an AI")) == -3.0
    assert forbidden_phrase(ADD, "2 + 3 = 5.", [], phrases=("sorry",)) == 0.0
    assert forbidden_phrase(ADD, reply, []) == 0.0  # unbound: no phrases, no penalty
    bound = bind_reward_functions(["forbidden_phrase"], RuleParams(forbidden_phrases=("sorry",)))
    assert bound["forbidden_phrase"](ADD, reply, []) == -2.0


def test_no_repetition_is_minus_repeated_trigram_share():
    # trigrams: (a b a) (b a b) (a b a) (b a b): 4 total, 2 unique -> -(1 - 2/4)
    assert no_repetition(ADD, "a b A b a B", []) == -0.5
    assert no_repetition(ADD, "one two three four", []) == 0.0
    assert no_repetition(ADD, "too short", []) == 0.0


def test_binding_errors():
    with pytest.raises(ValueError, match="forbidden_phrases"):
        bind_reward_functions(["forbidden_phrase"])
    with pytest.raises(ValueError, match="empty"):
        bind_reward_functions(["forbidden_phrase"], RuleParams(forbidden_phrases=("ok", " ")))
    with pytest.raises(ValueError, match="unknown"):
        bind_reward_functions(["nope"])


def test_build_from_config_and_names_validated():
    cfg = build_config({"reward": {"functions": {"arithmetic": 1.0, "forbidden_phrase": 0.5, "no_repetition": 0.1},
                                   "forbidden_phrases": ["sorry"]}})
    fns = build_reward_functions(cfg.reward)
    assert list(fns) == ["arithmetic", "forbidden_phrase", "no_repetition"]
    assert fns["forbidden_phrase"](ADD, "sorry SORRY", []) == -2.0
    assert build_reward_functions(RewardConfig(functions={"digit_fraction": 1.0})) == {"digit_fraction": digit_fraction}
    with pytest.raises(ConfigError, match="forbidden_phrase"):
        build_config({"reward": {"functions": {"forbiden_phrase": 1.0}}})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(build_tiny_from_corpus(sample_corpus(), tmp_path_factory.mktemp("rw") / "tiny"))


def test_reward_scorer_combines_rules_with_weights(model_dir):
    scorer = RewardScorer(tokenizer_path=model_dir, functions={"arithmetic": 1.0, "forbidden_phrase": 0.5},
                          forbidden_phrases=["sorry"])
    replies = ["2 + 3 = 5. Happy to help!", "Sorry, sorry: 12."]
    ids = [scorer.tokenizer.encode(r, add_special_tokens=False) for r in replies]
    samples = Samples(prompt_ids=[[1], [1]], response_ids=ids, response_logprobs=[[0.0] * len(i) for i in ids],
                      finished=[True, True], prompt_index=[0, 1])
    scores = scorer.score(samples, [ADD, MUL])
    assert scores.components == {"arithmetic": [1.5, 1.0], "forbidden_phrase": [0.0, -2.0]}
    # 1.0 * 1.5 + 0.5 * 0 = 1.5;  1.0 * 1.0 + 0.5 * -2 = 0.0
    assert scores.total == [1.5, 0.0]
    # As PPO sends them: only the batch's prompts, keyed by their index in the whole prompt set.
    samples.prompt_index = [7, 3]
    keyed = scorer.score(samples, {7: ADD, 3: MUL})
    assert keyed.components == scores.components and keyed.total == scores.total


def test_reward_scorer_rejects_rule_without_params(model_dir):
    with pytest.raises(ValueError, match="forbidden_phrases"):
        RewardScorer(tokenizer_path=model_dir, functions={"forbidden_phrase": 1.0})


@pytest.fixture(scope="module")
def reward_model_dir(model_dir, tmp_path_factory):
    """The tiny model as a sequence classifier: seeded random head, config.reward_offset = 0.5."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("rw") / "rm"
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    model.config.reward_offset = 0.5
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(str(out))
    return str(out)


def test_reward_scorer_model_score_is_the_head_at_the_last_token_minus_offset(reward_model_dir):
    """The shared scorer (orchestrator/models/scoring.py) against the classifier's own forward."""
    import torch
    from transformers import AutoModelForSequenceClassification

    scorer = RewardScorer(tokenizer_path=reward_model_dir, functions={}, model_path=reward_model_dir)
    seqs = [[5, 6, 7, 8], [9, 10]]  # different lengths: the shorter one is right-padded
    samples = Samples(prompt_ids=[s[:2] for s in seqs], response_ids=[s[2:] for s in seqs],
                      response_logprobs=[[0.0] * len(s[2:]) for s in seqs], finished=[True, True],
                      prompt_index=[0, 1])
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir, num_labels=1).eval()
    with torch.no_grad():
        expected = [float(model(input_ids=torch.tensor([s])).logits[0, 0]) - 0.5 for s in seqs]
    got = scorer.score(samples, [ADD, MUL]).components["model"]
    assert got == pytest.approx(expected, abs=1e-5)
