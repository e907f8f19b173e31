"""The rule reward model's parts: the BCE loss and the reward formula (hand-computed), the model
input, the rule_labels files (bad lines as one line with file:line), examples from the store
(simulated and people's checkboxes), the split by prompt, and the rules_rm reward component
through RewardScorer with a tiny untrained rule model.

Run: .venv/bin/pytest tests/unit/test_rule_rm.py -q   (CPU, a few seconds; no Ray)
"""
from __future__ import annotations

import json
import math
import sqlite3

import pytest
import torch

from rlhf.orchestrator.config import DataSourceConfig
from rlhf.orchestrator.data.rule_labels import RuleExample, load_rule_labels, people_labels, simulated_labels
from rlhf.orchestrator.errors import BadInput
from rlhf.orchestrator.models.scoring import (MIN_NO_VIOLATION, RULES_FILE, rule_messages, rule_reward,
                                              rule_sequence_ids, rule_violation_probs)
from rlhf.orchestrator.rl.losses import rule_violation_loss

RULES = {"no_human_claims": "Do not pretend to be human.", "no_insults": "Do not insult the user."}
ASK = [{"role": "user", "content": "Are you a person?"}]


def test_rule_violation_loss_by_hand():
    # s = 0, v = 1: -log 0.5 = 0.693147; s = ln 3, v = 1: -log 3/4 = 0.287682; s = -ln 3, v = 0: the same.
    scores = torch.tensor([0.0, math.log(3.0), -math.log(3.0)])
    loss, accuracy = rule_violation_loss(scores, torch.tensor([True, True, False]))
    assert float(loss) == pytest.approx((0.693147 + 2 * 0.287682) / 3, abs=1e-5)
    assert float(accuracy) == pytest.approx(2 / 3)  # s = 0 says "not violated": wrong


def test_rule_reward_by_hand():
    probs = {"a": [0.5, 1.0], "b": [0.0, 0.75]}
    got = rule_reward(probs, {"a": 2.0})  # b has weight 1
    assert got[0] == pytest.approx(2 * math.log(0.5) + 0.0)
    assert got[1] == pytest.approx(2 * math.log(MIN_NO_VIOLATION) + math.log(0.25))  # P = 1 stays finite
    assert rule_reward({}, {}) == []


def test_rule_messages_put_the_rule_first():
    assert rule_messages(ASK, "No.", "Be kind.") == [
        {"role": "system", "content": "Rule: Be kind."}, *ASK, {"role": "assistant", "content": "No."}]
    with_system = rule_messages([{"role": "system", "content": "You help."}, *ASK], "No.", "Be kind.")
    assert with_system[0] == {"role": "system", "content": "Rule: Be kind.\n\nYou help."}
    assert [m["role"] for m in with_system] == ["system", "user", "assistant"]


@pytest.fixture(scope="module")
def rule_model_dir(tmp_path_factory):
    """A tiny, untrained rule-model folder: sequence-classification head, tokenizer, rules.json."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf.orchestrator.models.tiny import TinyModelSpec, build_tiny_from_corpus

    root = tmp_path_factory.mktemp("rule-model")
    corpus = ["Rule: " + t for t in RULES.values()] + ["Are you a person? No, I am an AI. You fool."] * 3
    base = build_tiny_from_corpus(corpus, root / "base", TinyModelSpec(vocab_size=300))
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=1)
    model.save_pretrained(str(root / "rule"))
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(root / "rule"))
    (root / "rule" / RULES_FILE).write_text(json.dumps(RULES))
    return root / "rule"


def test_long_dialogues_lose_their_middle_not_the_rule(rule_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(rule_model_dir))
    long = [{"role": "user", "content": "Are you a person? " * 40}]
    full = rule_sequence_ids(tok, long, "No, I am an AI.", RULES["no_insults"], 10_000)
    cut = rule_sequence_ids(tok, long, "No, I am an AI.", RULES["no_insults"], 64)
    head = tok.apply_chat_template([{"role": "system", "content": "Rule: " + RULES["no_insults"]}],
                                   tokenize=True, return_dict=True)["input_ids"]
    assert len(full) > 64 and len(cut) == 64
    assert cut[: len(head)] == head and cut[len(head):] == full[-(64 - len(head)):]


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"messages": ASK, "reply": "Yes, I live in Paris.", "rule": "no_human_claims", "violated": True}


def test_rule_label_files(tmp_path):
    path = _write(tmp_path / "labels.jsonl", [GOOD, {**GOOD, "reply": "No, I am an AI.", "violated": False}])
    got = load_rule_labels([DataSourceConfig(path=str(path), format="rule_labels", weight=2)], "data.rule_labels", RULES)
    assert len(got) == 4 and [e.violated for e in got] == [True, False, True, False]
    assert got[0] == RuleExample(ASK, "Yes, I live in Paris.", "no_human_claims", RULES["no_human_claims"], True)


@pytest.mark.parametrize("bad, says", [
    ('{"messages": [', "invalid JSON"),
    ({**GOOD, "violated": "yes"}, "'violated' must be true or false"),
    ({**GOOD, "rule": "no_typos"}, "unknown rule 'no_typos'"),
    ({k: v for k, v in GOOD.items() if k != "reply"}, "missing field 'reply'"),
    ({**GOOD, "messages": ASK + [{"role": "assistant", "content": "Hi"}]}, "must end with the user turn"),
])
def test_a_bad_rule_label_line_is_named_by_file_and_line(tmp_path, bad, says):
    path = _write(tmp_path / "labels.jsonl", [GOOD, bad])
    with pytest.raises(BadInput) as err:
        load_rule_labels([DataSourceConfig(path=str(path), format="rule_labels")], "data.rule_labels", RULES)
    assert f"{path}:2:" in str(err.value) and says in str(err.value) and "\n" not in str(err.value)


def test_rule_labels_need_their_format(tmp_path):
    path = _write(tmp_path / "labels.jsonl", [GOOD])
    with pytest.raises(BadInput, match=r"data.rule_labels.0.format: .*use format: rule_labels"):
        load_rule_labels([DataSourceConfig(path=str(path))], "data.rule_labels", RULES)


def test_people_labels_judge_every_reply_against_every_rule():
    replies = ["Yes, I am human.", "No, you fool.", "No, I am an AI."]
    got = people_labels(ASK, replies, json.dumps({"0": ["no_human_claims"], "1": ["no_insults"]}), RULES)
    assert {(e.reply, e.rule): e.violated for e in got} == {
        (replies[0], "no_human_claims"): True, (replies[0], "no_insults"): False,
        (replies[1], "no_human_claims"): False, (replies[1], "no_insults"): True,
        (replies[2], "no_human_claims"): False, (replies[2], "no_insults"): False}
    assert people_labels(ASK, replies, json.dumps(["no_insults"]), RULES) == []  # old list: which reply?
    assert len(people_labels(ASK, replies, "{}", RULES)) == 6 and not any(e.violated for e in
                                                                        people_labels(ASK, replies, "{}", RULES))


def test_simulated_labels_keep_known_rules_only():
    judge = lambda messages, reply: {"no_insults": "fool" in reply, "elsewhere": True}  # noqa: E731
    got = simulated_labels(judge, [(ASK, "No, you fool."), (ASK, "No.")], RULES)
    assert [(e.reply, e.rule, e.violated) for e in got] == [("No, you fool.", "no_insults", True),
                                                            ("No.", "no_insults", False)]


def test_store_examples_simulated_and_people(tmp_path):
    from rlhf.orchestrator.recipe.comparisons import ComparisonStore
    from rlhf.orchestrator.recipe.rule_rm import store_examples

    class Task:
        rules = RULES

        @staticmethod
        def rule_violations(messages, reply):
            return {"no_human_claims": "human" in reply, "no_insults": "fool" in reply}

    path = tmp_path / "comparisons.sqlite"
    with ComparisonStore(path) as store:
        cid = store.add(1, "p", "policy", ASK, ["Yes, human.", "No, fool."], [[1], [2]], ranks=None)
    db = sqlite3.connect(str(path))
    with db:  # two people ranked it: one with per-reply boxes, one on the old page (a plain list)
        for who, ticked in (("ann", {"1": ["no_insults"]}), ("bob", ["no_insults"])):
            db.execute("INSERT INTO rankings (comparison_id, labeler, ranks, display_order, violations, created) "
                       "VALUES (?, ?, '[1, 0]', '[0, 1]', ?, 'now')", (cid, who, json.dumps(ticked)))
    db.close()
    simulated, people = store_examples(path, Task(), RULES)
    assert len(simulated) == 4  # 2 replies x 2 rules, once although two people ranked
    assert {(e.reply, e.rule) for e in simulated if e.violated} == {("Yes, human.", "no_human_claims"),
                                                                   ("No, fool.", "no_insults")}
    assert len(people) == 4 and {(e.reply, e.rule) for e in people if e.violated} == {("No, fool.", "no_insults")}
    assert store_examples(path, object(), RULES)[0] == []  # a task without rule_violations


def test_split_keeps_each_prompt_on_one_side():
    from rlhf.orchestrator.recipe.rule_rm import split_examples

    examples = [RuleExample([{"role": "user", "content": f"q{i}"}], r, rule, t, False)
                for i in range(20) for r in ("a", "b") for rule, t in RULES.items()]
    train, held = split_examples(examples, 0.2, seed=0)
    train_q = {e.messages[0]["content"] for e in train}
    held_q = {e.messages[0]["content"] for e in held}
    assert len(held_q) == 4 and not train_q & held_q and len(train) + len(held) == len(examples)


def test_step_shape():
    from rlhf.actors.rule_rm_worker import step_shape

    assert step_shape(1000, 32, 8, 2) == (8, 2)   # 2 workers x 8 x 2 micro-batches = 32
    assert step_shape(10, 32, 8, 2) == (5, 1)     # fewer examples than a batch: all of them
    assert step_shape(1000, 32, 64, 1) == (32, 1)


def test_reward_scorer_rules_rm_component(rule_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf.actors.reward import RewardScorer
    from rlhf.orchestrator.experience import Samples

    tok = AutoTokenizer.from_pretrained(str(rule_model_dir))
    replies = ["No, I am an AI.", "Yes, you fool."]
    response = [tok.encode(r, add_special_tokens=False) for r in replies]
    samples = Samples(prompt_ids=[[1, 2]] * 2, response_ids=response, response_logprobs=[[]] * 2,
                      finished=[True] * 2, prompt_index=[0, 0])
    scorer = RewardScorer(str(rule_model_dir), functions={}, rule_model_path=str(rule_model_dir),
                          rule_weights={"no_insults": 3.0})
    scores = scorer.score(samples, [ASK])
    model = AutoModelForSequenceClassification.from_pretrained(str(rule_model_dir), num_labels=1).eval()
    probs = rule_violation_probs(model, tok, ASK, replies, RULES)
    assert set(probs) == set(RULES) and all(0 < p < 1 for ps in probs.values() for p in ps)
    want = [3.0 * math.log(1 - probs["no_insults"][i]) + math.log(1 - probs["no_human_claims"][i]) for i in range(2)]
    assert scores.components["rules_rm"] == pytest.approx(want, abs=1e-5)
    assert scores.total == pytest.approx(want, abs=1e-5)
    with pytest.raises(ValueError, match=r"rule_rm.weights: rules \['no_typos'\]"):
        RewardScorer(str(rule_model_dir), functions={}, rule_model_path=str(rule_model_dir),
                     rule_weights={"no_typos": 1.0})


def test_a_folder_without_rules_json_is_no_rule_model(tmp_path):
    from rlhf.orchestrator.models.scoring import load_rule_model

    with pytest.raises(BadInput, match=r"model.rule_reward: .* \(no rules.json\)"):
        load_rule_model(str(tmp_path))


def test_rlhf_rule_rm_bad_label_line_is_one_line_exit_2(tmp_path, capsys):
    from rlhf.orchestrator.cli import main

    path = _write(tmp_path / "labels.jsonl", [{**GOOD, "rule": "no_verdicts"}, {**GOOD, "rule": "no_verdicts", "violated": 1}])
    out = tmp_path / "run"
    code = main(["rule-rm", "configs/quickstart.yaml", "data.task=rules",
                 f"data.rule_labels=[{{path: {path}, format: rule_labels}}]", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and f"{path}:2:" in err and "'violated' must be true or false" in err
    assert len(err.splitlines()) == 1 and not out.exists()
