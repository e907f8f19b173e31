"""Labelers and judges (orchestrator/data/labelers.py): every kind, ranks implied by scores
with ties, rank objects, and every user-code error as one-line BadInput naming the target.
The reward_model kind runs on a tiny random model with a random head (no training needed)."""
from __future__ import annotations

import json
import sys

import pytest

from rlhf.orchestrator.config import LabelerConfig, build_config
from rlhf.orchestrator.data.labelers import (
    FileLabeler,
    RankingLabeler,
    RewardModelLabeler,
    SimulatedLabeler,
    build_judge,
    build_labeler,
    ranks_from_scores,
)
from rlhf.orchestrator.errors import BadInput
from rlhf.orchestrator.tasks import arithmetic, load_task

Q1 = [{"role": "user", "content": "What is 2 + 3?"}]
Q2 = [{"role": "user", "content": "What is 4 * 5?"}, {"role": "assistant", "content": "4 * 5 = 20."},
      {"role": "user", "content": "Now add 1 to that."}]

USER_LABELERS = '''
import math

def by_length(messages, reply):
    return -len(reply)          # shorter is better; equal lengths tie

def one_arg(reply):
    return 0.0

def explodes(messages, reply):
    raise KeyError("who")

def says_text(messages, reply):
    return "good"

def says_bool(messages, reply):
    return True

def says_nan(messages, reply):
    return math.nan

class Alphabetical:
    """Ranks by text: a rank-only labeler, instantiated with no arguments."""
    def rank(self, messages, replies):
        order = sorted(set(replies))
        return [order.index(r) for r in replies]

class RanksAndScores(Alphabetical):
    def score(self, messages, reply):
        return float(len(reply))

class ShortRanks:
    def rank(self, messages, replies):
        return [0]

class FloatRanks:
    def rank(self, messages, replies):
        return [0.0 for _ in replies]

class BadRankSignature:
    def rank(self, replies):
        return [0 for _ in replies]

class NeedsArgs:
    def __init__(self, path):
        self.path = path

INSTANCE = RanksAndScores()
NUMBER = 42
'''


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "prefs.py"
    path.write_text(USER_LABELERS)
    return path


def _python(path, name, key="labeler"):
    return build_labeler(LabelerConfig(kind="python", target=f"{path}:{name}"), None, key)


def test_ranks_from_scores_dense_with_ties():
    assert ranks_from_scores([1.5, -1.0, 1.5, 0.0]) == [0, 2, 0, 1]
    assert ranks_from_scores([0.0, 0.0]) == [0, 0]


def test_simulated_labeler_ranks_by_arithmetic_score():
    labeler = SimulatedLabeler(arithmetic.score_reply)
    replies = ["2 + 3 = 5.", "2 + 3 = 5. Happy to help!", "2 + 3 = 6.",
               "2 + 3 = 6. Let me tell you much more about numbers than you asked for today."]
    # scores 1.0, 1.5, -1.0, -1.5
    assert labeler.rank(Q1, replies) == [1, 0, 2, 3]
    assert labeler.rank(Q1, ["2 + 3 = 5.", "5"]) == [0, 0]  # equal scores: a tie
    assert labeler.score(Q1, "2 + 3 = 5.") == 1.0


def test_task_kind_uses_the_task_score_and_needs_a_task():
    labeler = build_labeler(LabelerConfig(kind="task"), load_task("instruct"))
    messages = [{"role": "user", "content": "List 2 colors."}]
    # 1.5 (exact, brief), 0.5 (chatty), 0.5 (three items): the two 0.5s tie
    assert labeler.rank(messages, ["Red, blue.", "Red, blue. Hope that helps!", "Red, blue, pink."]) == [0, 1, 1]
    with pytest.raises(BadInput, match=r"^labeler.kind: task needs data.task$"):
        build_labeler(LabelerConfig(kind="task"), None)
    # A prompt the task cannot read is the user's problem: one line naming the task and the prompt.
    with pytest.raises(BadInput, match=r"labeler: task instruct raised ValueError: .* on prompt 'What is 2 \+ 3\?'"):
        labeler.rank(Q1, ["a", "b"])


def test_human_kind_has_no_labeler():
    assert build_labeler(LabelerConfig(kind="human"), load_task("arithmetic")) is None


def test_python_function_from_a_file_ranks_by_its_scores_with_ties(user_file):
    labeler = _python(user_file, "by_length")
    assert isinstance(labeler, SimulatedLabeler)
    assert labeler.rank(Q1, ["ccc", "a", "bb", "x"]) == [2, 0, 1, 0]  # -3, -1, -2, -1
    assert labeler.score(Q1, "four") == -4.0


def test_python_function_from_a_module(user_file, monkeypatch):
    monkeypatch.syspath_prepend(str(user_file.parent))
    try:
        labeler = build_labeler(LabelerConfig(kind="python", target="prefs:by_length"), None)
        assert labeler.rank(Q1, ["aa", "a"]) == [1, 0]
    finally:
        sys.modules.pop("prefs", None)


def test_python_rank_objects(user_file):
    rank_only = _python(user_file, "Alphabetical")  # a class: instantiated with no arguments
    assert isinstance(rank_only, RankingLabeler) and rank_only.scorer is None
    assert rank_only.rank(Q1, ["b", "a", "b"]) == [1, 0, 1]
    both = _python(user_file, "INSTANCE")  # an instance with rank and score
    assert both.rank(Q1, ["b", "a"]) == [1, 0] and both.scorer.score(Q1, "abc") == 3.0


@pytest.mark.parametrize("name, why", [
    ("missing", "has no attribute 'missing'"),
    ("one_arg", "must be callable as score(messages, reply); its signature is (reply)"),
    ("BadRankSignature", "must be callable as rank(messages, replies); its signature is (replies)"),
    ("NeedsArgs", "NeedsArgs() raised TypeError"),
    ("NUMBER", "a int is neither a function score(messages, reply) nor an object with rank"),
])
def test_python_load_errors_name_key_and_target(user_file, name, why):
    with pytest.raises(BadInput) as err:
        _python(user_file, name)
    msg = str(err.value)
    assert msg.startswith(f"labeler.target: {user_file}:{name}") and why in msg and "\n" not in msg


def test_python_missing_file_and_module(tmp_path):
    with pytest.raises(BadInput, match=r"^pipeline.judge.target: .*nowhere.py:f: no such file"):
        _python(tmp_path / "nowhere.py", "f", key="pipeline.judge")
    with pytest.raises(BadInput, match=r"^labeler.target: no_such_prefs_mod:f: no module named 'no_such_prefs_mod'"):
        build_labeler(LabelerConfig(kind="python", target="no_such_prefs_mod:f"), None)


@pytest.mark.parametrize("name, why", [
    ("explodes", "raised KeyError: 'who'"),
    ("says_text", "returned 'good' (str), not a number"),
    ("says_bool", "returned True (bool), not a number"),
    ("says_nan", "returned nan, not a finite number"),
    ("ShortRanks", "rank returned [0]; expected a list of 2 ints >= 0"),
    ("FloatRanks", "rank returned [0.0, 0.0]; expected a list of 2 ints >= 0"),
])
def test_python_call_errors_name_target_and_prompt(user_file, name, why):
    labeler = _python(user_file, name)
    with pytest.raises(BadInput) as err:
        labeler.rank(Q2, ["a", "b"])
    msg = str(err.value)
    assert msg.startswith(f"labeler.target: {user_file}:{name}") and why in msg
    assert "on prompt 'Now add 1 to that.'" in msg and "\n" not in msg


def _write(path, *lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_file_labeler_reads_ranks_matched_by_reply_text(tmp_path):
    path = _write(tmp_path / "r.jsonl",
                  json.dumps({"prompt": Q1, "replies": ["b", "a", "c"], "ranks": [1, 0, 2]}),
                  "",
                  json.dumps({"prompt": Q2, "ranks": [0, 0, 1]}))
    labeler = build_labeler(LabelerConfig(kind="file", path=str(path)), None)
    assert isinstance(labeler, FileLabeler)
    assert labeler.rank(Q1, ["a", "b", "c"]) == [0, 1, 2]  # reordered to the sampled order
    assert labeler.rank(Q2, ["x", "y", "z"]) == [0, 0, 1]
    with pytest.raises(BadInput, match=r"r\.jsonl:1: the ranked replies differ"):
        labeler.rank(Q1, ["a", "b", "d"])
    with pytest.raises(BadInput, match=r"r\.jsonl:3: 3 ranks for 2 sampled replies"):
        labeler.rank(Q2, ["x", "y"])
    with pytest.raises(BadInput, match="no ranking for prompt 'What is 9 - 1\\?'"):
        labeler.rank([{"role": "user", "content": "What is 9 - 1?"}], ["a", "b"])


@pytest.mark.parametrize("bad, why", [
    ("{not json", "invalid JSON"),
    (json.dumps({"ranks": [0, 1]}), "missing key 'prompt'"),
    (json.dumps({"prompt": Q1, "ranks": [0]}), "'ranks' must be a list of >= 2"),
    (json.dumps({"prompt": Q1, "ranks": [0, "1"]}), "'ranks' must be a list of >= 2"),
    (json.dumps({"prompt": "What?", "ranks": [0, 1]}), "'prompt' must be a non-empty list"),
    (json.dumps({"prompt": Q1, "ranks": [0, 1], "replies": ["a"]}), "'replies' must be a list"),
    (json.dumps([1, 2]), "must be a JSON object"),
])
def test_file_labeler_malformed_line_names_file_and_line(tmp_path, bad, why):
    path = _write(tmp_path / "r.jsonl", json.dumps({"prompt": Q2, "ranks": [0, 1]}), bad)
    with pytest.raises(BadInput) as err:
        FileLabeler(path)
    msg = str(err.value)
    assert f"{path}:2: malformed ranking" in msg and why in msg and "\n" not in msg


def test_file_labeler_missing_file_empty_and_duplicate(tmp_path):
    with pytest.raises(BadInput, match=r"^labeler.path: no such file"):
        FileLabeler(tmp_path / "none.jsonl")
    with pytest.raises(BadInput, match="no rankings"):
        FileLabeler(_write(tmp_path / "empty.jsonl", ""))
    line = json.dumps({"prompt": Q1, "ranks": [0, 1]})
    with pytest.raises(BadInput, match=r"dup\.jsonl:2: prompt already ranked on line 1"):
        FileLabeler(_write(tmp_path / "dup.jsonl", line, line))


# --------------------------------------------------------------------------- judges


def _cfg(labeler: dict, judge: dict | None = None):
    return build_config({"labeler": labeler, "pipeline": {"judge": judge}})


def test_judge_is_the_labeler_unless_pipeline_judge_is_set(user_file):
    task = load_task("arithmetic")
    assert build_judge(_cfg({"kind": "task"}), task).score(Q1, "2 + 3 = 5.") == 1.0
    judge = build_judge(_cfg({"kind": "task"}, {"kind": "python", "target": f"{user_file}:by_length"}), task)
    assert judge.score(Q1, "abc") == -3.0
    judge = build_judge(_cfg({"kind": "human"}, {"kind": "python", "target": f"{user_file}:INSTANCE"}), task)
    assert judge.score(Q1, "abcd") == 4.0  # the object's own score


@pytest.mark.parametrize("labeler, judge, what", [
    ({"kind": "file", "path": "/x/r.jsonl"}, None, "labeler.kind file"),
    ({"kind": "human"}, None, "labeler.kind human"),
    ({"kind": "task"}, {"kind": "file", "path": "/x/r.jsonl"}, "pipeline.judge.kind file"),
    ({"kind": "task"}, {"kind": "python", "target": "{file}:Alphabetical"}, "pipeline.judge.kind python"),
])
def test_what_cannot_score_cannot_judge(user_file, labeler, judge, what):
    if judge and judge.get("target"):
        judge["target"] = judge["target"].format(file=user_file)
    with pytest.raises(BadInput) as err:
        build_judge(_cfg(labeler, judge), load_task("arithmetic"))
    msg = str(err.value)
    assert msg.startswith(f"pipeline.judge: {what}")
    assert msg.endswith("cannot score replies; set pipeline.judge to a task, python score function or reward_model")


# --------------------------------------------------------------------------- reward model


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    """A tiny causal LM turned into a sequence classifier with a seeded random head and an offset."""
    import shutil

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf.orchestrator.models.tiny import build_tiny_from_corpus

    root = tmp_path_factory.mktemp("rm")
    corpus = [m["content"] for d in arithmetic.make_dialogues(200, seed=0) for m in d]
    base = build_tiny_from_corpus(corpus, root / "base")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=1)
    model.config.reward_offset = 0.25
    model.save_pretrained(str(root / "rm"))
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(root / "rm"))
    shutil.copy(base / "generation_config.json", root / "rm" / "generation_config.json")
    return root / "rm"


def test_reward_model_scores_prompt_reply_and_end_of_turn_minus_offset(reward_model_dir):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    labeler = build_labeler(LabelerConfig(kind="reward_model", path=str(reward_model_dir)), None)
    assert isinstance(labeler, RewardModelLabeler)
    tok = AutoTokenizer.from_pretrained(str(reward_model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(reward_model_dir), num_labels=1).eval()
    # Expected by another route: the classifier's own forward on one unpadded sequence.
    seq = (tok.apply_chat_template(Q2, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
           + tok.encode("4 * 5 + 1 = 21.", add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")])
    with torch.no_grad():
        expected = float(model(input_ids=torch.tensor([seq])).logits[0, 0]) - 0.25
    assert labeler.score(Q2, "4 * 5 + 1 = 21.") == pytest.approx(expected, abs=1e-5)
    scores = labeler.scores(Q2, ["21.", "4 * 5 + 1 = 21.", "21."])
    assert scores[1] == pytest.approx(expected, abs=1e-5) and scores[0] == scores[2]
    ranks = labeler.rank(Q2, ["21.", "4 * 5 + 1 = 21.", "21."])
    assert ranks[0] == ranks[2] and sorted(set(ranks)) == [0, 1]  # identical replies tie
    cfg = _cfg({"kind": "human"}, {"kind": "reward_model", "path": str(reward_model_dir)})
    assert build_judge(cfg, None).score(Q2, "4 * 5 + 1 = 21.") == pytest.approx(expected, abs=1e-5)


def test_reward_model_folder_errors(tmp_path):
    with pytest.raises(BadInput, match=r"^pipeline.judge.path: .*not a reward-model folder \(no config.json\)"):
        RewardModelLabeler(tmp_path, key="pipeline.judge")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(BadInput, match=r"^labeler.path: cannot load a reward model from"):
        RewardModelLabeler(tmp_path)
