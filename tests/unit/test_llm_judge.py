"""The LLM judge labeler (orchestrator/data/llm_judge.py) with plain `generate` functions in
place of a model: both orders cancel a judge that always says "A", a judge that prefers the
longer reply ranks by length, hand-counted votes and position bias, answer parsing, and
bad path / template as one-line BadInput. The engine glue (recipe/judge_engine.py) is
checked with a fake rollout and tokenizer; tests/integration/test_llm_judge.py runs it on vLLM.

Run: .venv/bin/pytest tests/unit/test_llm_judge.py -q   (no model, no Ray; a few seconds)
"""
from __future__ import annotations

import re

import pytest

from rlhf.orchestrator.config import build_config
from rlhf.orchestrator.data.labelers import build_judge, build_labeler, ranks_from_scores
from rlhf.orchestrator.data.llm_judge import DEFAULT_TEMPLATE, LLMJudge, parse_choice, ranks_from_wins
from rlhf.orchestrator.errors import BadInput
from rlhf.orchestrator.experience import Samples
from rlhf.orchestrator.recipe.judge_engine import ANSWER_TOKENS, judge_engine, judge_max_len, make_generate

Q1 = [{"role": "user", "content": "What is 2 + 3?"}]
Q2 = [{"role": "user", "content": "What is 4 * 5?"}, {"role": "assistant", "content": "4 * 5 = 20."},
      {"role": "user", "content": "Now add 1 to that."}]
_SHOWN = re.compile(r"Reply A:\n(.*)\n\nReply B:\n(.*)\n\nAnswer with", re.S)


@pytest.fixture()
def model_dir(tmp_path):
    """Enough of a model folder for the judge's checks (nothing loads it here)."""
    (tmp_path / "judge").mkdir()
    (tmp_path / "judge" / "config.json").write_text("{}")
    return tmp_path / "judge"


def shown(chat: list[dict]) -> tuple[str, str]:
    """(reply A, reply B) of one question built from the default template."""
    assert len(chat) == 1 and chat[0]["role"] == "user"
    return _SHOWN.search(chat[0]["content"]).groups()


def judge_with(model_dir, answer, **kw) -> LLMJudge:
    judge = LLMJudge(str(model_dir), **kw)
    judge.attach(lambda chats: [answer(*shown(c)) for c in chats])
    return judge


def test_always_a_judge_ties_everything_and_has_position_bias_one(model_dir):
    judge = judge_with(model_dir, lambda a, b: "A")
    assert judge.rank(Q1, ["2 + 3 = 5.", "2 + 3 = 6.", "5", "It is 5. Happy to help!"]) == [0, 0, 0, 0]
    # K = 4: C(4, 2) = 6 pairs, each asked in both orders; every reply wins its 3 "first shown".
    assert judge.stats() == {"asked": 12, "parsed": 12, "parse_rate": 1.0, "first_shown_wins": 12,
                             "position_bias": 1.0}


def test_a_judge_preferring_the_longer_reply_ranks_by_length(model_dir):
    judge = judge_with(model_dir, lambda a, b: "A" if len(a) > len(b) else "B")
    assert judge.rank(Q1, ["xx", "x", "xxxx", "xxx"]) == [2, 3, 0, 1]
    assert judge.stats()["position_bias"] == 0.5  # it ignores the position: first shown wins half the time


def test_hand_counted_votes_with_a_partly_biased_judge(model_dir):
    """x beats everything whatever the order; between y and z the judge says "A".
    Wins: x 4 (both orders against y and z), y 1, z 1 -> ranks [0, 1, 1]. First shown won:
    the 2 questions where x was A, and both y/z questions -> 4 of 6."""
    def answer(a: str, b: str) -> str:
        if "x" in (a, b):
            return "A" if a == "x" else "B"
        return "A"

    judge = judge_with(model_dir, answer)
    assert judge.rank(Q2, ["x", "y", "z"]) == [0, 1, 1]
    stats = judge.stats()
    assert (stats["asked"], stats["parsed"], stats["first_shown_wins"]) == (6, 6, 4)
    assert stats["position_bias"] == pytest.approx(4 / 6)


def test_unparseable_answers_are_no_votes(model_dir):
    judge = judge_with(model_dir, lambda a, b: "I cannot decide.")
    assert judge.rank(Q1, ["p", "q", "r"]) == [0, 0, 0]
    assert judge.stats() == {"asked": 6, "parsed": 0, "parse_rate": 0.0, "first_shown_wins": 0,
                             "position_bias": None}
    # One parsed answer among unparseable ones decides alone: p shown first beats q.
    judge = judge_with(model_dir, lambda a, b: "Reply A" if (a, b) == ("p", "q") else "hmm")
    assert judge.rank(Q1, ["p", "q", "r"]) == [0, 1, 1]
    assert judge.stats()["parse_rate"] == pytest.approx(1 / 6)


@pytest.mark.parametrize("answer, choice", [
    ("A", "A"), ("B", "B"), (" B.\n", "B"), ("**A**", "A"), ("(B)", "B"), ("A is better.", "A"),
    ("Reply B is better than reply A.", "B"), ("The better reply is Reply A", "A"), ("answer: b", "B"),
    ("The answer is B", "B"), ("A better reply is B.", "B"), ("Response A", "A"),
    ("Both are fine.", None), ("", None), ("APPLE BANANA", None), ("a", None), ("Ab", None),
])
def test_parse_choice(answer, choice):
    assert parse_choice(answer) == choice


def test_ranks_from_wins_is_the_labelers_rule():
    for wins in ([3, 1, 3, 0], [0, 0], [2, 4, 1, 3], [5]):
        assert ranks_from_wins(wins) == ranks_from_scores([float(w) for w in wins])
    assert ranks_from_wins([3, 1, 3, 0]) == [0, 1, 0, 2]


def test_rank_many_asks_everything_in_one_generate_call(model_dir):
    calls = []
    judge = LLMJudge(str(model_dir))
    judge.attach(lambda chats: calls.append(len(chats)) or ["B"] * len(chats))
    ranks = judge.rank_many([(Q1, ["a", "b"]), (Q2, ["a", "b", "c"]), (Q1, ["a", "b", "c", "d"])])
    assert ranks == [[0, 0], [0, 0, 0], [0, 0, 0, 0]]
    assert calls == [2 + 6 + 12]
    assert judge.stats()["position_bias"] == 0.0  # always "B": the reply shown second always wins


def test_the_shuffle_is_seeded_per_comparison_and_never_changes_the_ranks(model_dir):
    replies = ["a", "bbbb", "cc", "ddd", "eeeee"]
    orders = {seed: LLMJudge(str(model_dir), seed=seed).order(Q1, replies) for seed in range(6)}
    assert all(sorted(o) == list(range(5)) for o in orders.values())
    assert len({tuple(o) for o in orders.values()}) > 1  # the seed changes the order...
    assert LLMJudge(str(model_dir), seed=3).order(Q1, replies) == orders[3]  # ...reproducibly
    ranks = {seed: judge_with(model_dir, lambda a, b: "A" if len(a) > len(b) else "B", seed=seed).rank(Q1, replies)
             for seed in range(6)}
    assert set(map(tuple, ranks.values())) == {(4, 1, 3, 2, 0)}  # ...but not the votes (longest first)


def test_questions_show_the_conversation_and_both_replies(model_dir):
    chat = LLMJudge(str(model_dir)).question(Q2, "21.", "22, happy to help!")
    text = chat[0]["content"]
    assert "User: What is 4 * 5?\nAssistant: 4 * 5 = 20.\nUser: Now add 1 to that." in text
    assert shown(chat) == ("21.", "22, happy to help!")
    assert text.startswith(DEFAULT_TEMPLATE.split("{")[0])


def test_a_template_file_with_literal_braces(model_dir, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text('JSON {{"x": 1}}\n{conversation}\n1) {reply_a}\n2) {reply_b}\nSay A or B.')
    chat = LLMJudge(str(model_dir), template=str(path)).question(Q1, "5", "6")
    assert chat[0]["content"] == 'JSON {"x": 1}\nUser: What is 2 + 3?\n1) 5\n2) 6\nSay A or B.'


def test_rank_before_attach_says_so(model_dir):
    judge = LLMJudge(str(model_dir))
    with pytest.raises(RuntimeError, match=r"before attach\(generate\).*judge_engine"):
        judge.rank(Q1, ["a", "b"])
    judge.attach(lambda chats: ["A"])  # one answer for two questions
    with pytest.raises(RuntimeError, match="returned 1 answers for 2 questions"):
        judge.rank(Q1, ["a", "b"])


def _one_line_bad_input(match: str, **kw) -> str:
    with pytest.raises(BadInput) as err:
        LLMJudge(**kw)
    msg = str(err.value)
    assert "\n" not in msg and re.search(match, msg), msg
    return msg


def test_bad_judge_path_is_one_line_naming_the_key(tmp_path, model_dir):
    _one_line_bad_input(r"^labeler\.path: kind llm_judge needs the judge model", path=None)
    _one_line_bad_input(r"^labeler\.path: no such model folder: .*nowhere", path=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    _one_line_bad_input(r"^labeler\.path: .*empty is not a model folder \(no config\.json\)",
                        path=str(tmp_path / "empty"))
    (tmp_path / "file.bin").write_text("x")
    _one_line_bad_input(r"^labeler\.path: .*file\.bin is a file", path=str(tmp_path / "file.bin"))
    _one_line_bad_input(r"^pipeline\.judge\.path: unknown model name 'smollm2-135m'; did you mean",
                        path="smollm2-135m", key="pipeline.judge")
    assert LLMJudge("Qwen/Qwen2.5-0.5B-Instruct").model == "Qwen/Qwen2.5-0.5B-Instruct"  # a hub name passes


def test_bad_template_is_one_line_naming_the_key(tmp_path, model_dir):
    path = tmp_path / "t.txt"
    _one_line_bad_input(r"^labeler\.template: no such template file", path=str(model_dir), template=str(path))
    for text, why in [("{conversation} {reply_a}", r"missing \{reply_b\}"),
                      ("{conversation} {reply_a} {reply_b} {score}", r"unknown field\(s\) 'score'"),
                      ("{conversation} {reply_a} {reply_b} {", "not a valid template"),
                      ("{conversation} {reply_a} {reply_b} }", "not a valid template")]:
        path.write_text(text)
        _one_line_bad_input(rf"^labeler\.template: .*t\.txt: .*{why}", path=str(model_dir), template=str(path))
    # The template is checked before the model is resolved (which may import a known model).
    _one_line_bad_input(r"^labeler\.template:", path="smollm2-135m-instruct", template=str(tmp_path / "no"))


def test_build_labeler_makes_it_and_build_judge_refuses_it(model_dir):
    cfg = build_config({"labeler": {"kind": "llm_judge", "path": str(model_dir)}})
    judge = build_labeler(cfg.labeler, None)
    assert isinstance(judge, LLMJudge) and judge.model == str(model_dir.resolve()) and judge.key == "labeler"
    with pytest.raises(BadInput, match=r"^pipeline\.judge: labeler\.kind llm_judge cannot score replies"):
        build_judge(cfg, None)
    cfg = build_config({"pipeline": {"judge": {"kind": "llm_judge", "path": str(model_dir)}}})
    with pytest.raises(BadInput, match=r"^pipeline\.judge: pipeline\.judge\.kind llm_judge cannot score"):
        build_judge(cfg, None)


# --------------------------------------------------------------------------- the engine glue


class FakeTokenizer:
    """One id per character of the last message; decodes id lists back to "A"/"B" text."""

    def apply_chat_template(self, chat, add_generation_prompt, tokenize, return_dict):
        assert add_generation_prompt and tokenize and return_dict
        return {"input_ids": [ord(c) for c in chat[-1]["content"]]}

    def batch_decode(self, ids, skip_special_tokens):
        return ["".join(map(chr, row)) for row in ids]


class FakeRollout:
    """Answers "A" to every prompt; records how it was called."""

    def __init__(self):
        self.calls = []

    def generate(self, prompt_ids, n, temperature, top_p, max_new_tokens, seed):
        self.calls.append((len(prompt_ids), n, temperature, max_new_tokens))
        return Samples([list(p) for p in prompt_ids], [[ord("A")] for _ in prompt_ids], [[0.0] for _ in prompt_ids],
                       [True] * len(prompt_ids), list(range(len(prompt_ids))))


def test_make_generate_is_greedy_and_skips_questions_past_the_context():
    rollout = FakeRollout()
    generate = make_generate(rollout, FakeTokenizer(), max_len=10 + ANSWER_TOKENS, temperature=0.0, seed=0)
    chats = [[{"role": "user", "content": "short"}], [{"role": "user", "content": "far too long a question"}],
             [{"role": "user", "content": "0123456789"}]]
    assert generate(chats) == ["A", "", "A"]  # the long one is not sent: an unparsed answer
    assert rollout.calls == [(2, 1, 0.0, ANSWER_TOKENS)]


def test_judge_max_len_and_other_labelers_start_nothing():
    cfg = build_config({"data": {"max_prompt_tokens": 96}, "rollout": {"max_new_tokens": 24}})
    assert judge_max_len(cfg, None) == 2 * (96 + 48) + 512 + ANSWER_TOKENS
    assert judge_max_len(cfg, 256) == 256
    marker = object()
    with judge_engine(cfg, marker) as labeler:  # not an LLMJudge: no Ray, no engine
        assert labeler is marker


def test_config_keeps_a_model_name_and_resolves_folders_and_the_template(tmp_path, model_dir):
    from rlhf.orchestrator.config import load_config

    (tmp_path / "judge.txt").write_text("{conversation} {reply_a} {reply_b}")
    (tmp_path / "c.yaml").write_text("labeler: {kind: llm_judge, path: smollm2-135m-instruct, template: judge.txt}\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.labeler.path == "smollm2-135m-instruct"  # a known name, not a folder under the cwd
    assert cfg.labeler.template == str(tmp_path / "judge.txt")  # against the config's folder
    cfg = load_config(tmp_path / "c.yaml", ["pipeline.judge.kind=llm_judge", "pipeline.judge.path=judge"])
    assert cfg.pipeline.judge.path == str(model_dir)  # a folder next to the config
