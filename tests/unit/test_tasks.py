"""Task registry, load_task (name / module:Factory / file.py:Factory and each error), both
built-in tasks' dialogues, held-out prompts, and the instruct scorer worked out by hand."""
from __future__ import annotations

import json
import sys

import pytest

from rlhf.orchestrator.errors import BadInput
from rlhf.orchestrator.tasks import TASK_METHODS, TASKS, import_target, load_task
from rlhf.orchestrator.tasks import arithmetic, instruct
from rlhf.orchestrator.tasks.instruct import parse_request, score_reply, sentences

USER_TASK = '''
class Echo:
    def demonstrations(self, n, seed):
        return [[{"role": "user", "content": f"say {seed + i}"}, {"role": "assistant", "content": str(seed + i)}]
                for i in range(n)]

    def prompts(self, n, seed):
        return [d[:-1] for d in self.demonstrations(n, seed)]

    def eval_prompts(self, n, seed):
        return self.prompts(n, seed + 1000)

    def score(self, messages, reply):
        return float(reply == messages[-1]["content"].split()[-1])


class NoScore:
    def demonstrations(self, n, seed): return []
    def prompts(self, n, seed): return []
    def eval_prompts(self, n, seed): return []


def broken():
    raise RuntimeError("no data today")

NOT_CALLABLE = 3
'''


def _user_file(tmp_path, text=USER_TASK, name="my_task.py"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _shape_ok(dialogue, last_role):
    return (isinstance(dialogue, list) and dialogue and dialogue[-1]["role"] == last_role
            and all(m["role"] in ("system", "user", "assistant") and isinstance(m["content"], str) for m in dialogue))


def test_registry_holds_both_built_ins_and_loads_them_by_name():
    assert sorted(TASKS) == ["arithmetic", "evidence", "instruct", "rules"]
    for name in TASKS:
        task = load_task(name)
        assert task.name == name and all(callable(getattr(task, m)) for m in TASK_METHODS)
    assert load_task(None) is None


@pytest.mark.parametrize("name", sorted(TASKS))
def test_built_in_dialogues_have_the_right_shape_and_are_seeded(name):
    task = load_task(name)
    demos, prompts, held = task.demonstrations(50, 3), task.prompts(50, 3), task.eval_prompts(20, 3)
    assert len(demos) == len(prompts) == 50 and len(held) == 20
    assert all(_shape_ok(d, "assistant") for d in demos)
    assert all(_shape_ok(p, "user") for p in prompts + held)
    assert prompts == [d[:-1] for d in demos]  # prompts are the demonstrations cut before their last reply
    assert task.demonstrations(50, 3) == demos and task.demonstrations(50, 4) != demos
    # Every demonstration is a reply the task's own labeler can score.
    assert all(isinstance(task.score(d[:-1], d[-1]["content"]), float) for d in demos)


def test_arithmetic_keeps_the_quickstart_data():
    task = load_task("arithmetic")
    assert task.demonstrations(20, 0) == arithmetic.make_dialogues(20, seed=0)
    assert task.eval_prompts(8, 0) == [d[:-1] for d in arithmetic.make_dialogues(8, seed=10_000)]
    assert task.score([{"role": "user", "content": "What is 2 + 3?"}], "2 + 3 = 5. Happy to help!") == 1.5


def test_instruct_eval_prompts_are_disjoint_from_prompts():
    task = load_task("instruct")
    train = {json.dumps(p) for p in task.prompts(3000, 0)}
    held = [json.dumps(p) for p in task.eval_prompts(200, 0)]
    assert not train & set(held)
    assert all(instruct.is_held_out(json.loads(h)) for h in held)


def test_instruct_demonstrations_leave_room_for_rl():
    """SFT sees a mix: about half exact in form, half brief; the content is always right."""
    task = load_task("instruct")
    demos = task.demonstrations(2000, 0)
    scores = [task.score(d[:-1], d[-1]["content"]) for d in demos]
    assert set(scores) <= {-0.5, 0.5, 1.5}
    best = scores.count(1.5) / len(scores)
    assert 0.15 < best < 0.35  # exact and brief: ~0.5 * 0.5
    assert max(len(d[-1]["content"]) for d in demos) <= 60


def test_load_task_from_module_and_file(tmp_path, monkeypatch):
    path = _user_file(tmp_path)
    from_file = load_task(f"{path}:Echo")
    assert from_file.name == f"{path}:Echo"  # no name of its own: the spec names it
    assert from_file.prompts(2, 5) == [[{"role": "user", "content": "say 5"}], [{"role": "user", "content": "say 6"}]]
    assert from_file.score([{"role": "user", "content": "say 5"}], "5") == 1.0
    monkeypatch.syspath_prepend(str(tmp_path))
    from_module = load_task("my_task:Echo")
    assert from_module.demonstrations(1, 0)[0][-1]["content"] == "0"
    sys.modules.pop("my_task", None)


@pytest.mark.parametrize("spec, why", [
    ("algebra", "unknown task 'algebra'; known: arithmetic, evidence, instruct, rules"),
    ("{dir}/nowhere.py:Echo", "no such file"),
    ("no_such_module_xyz:Echo", "no module named 'no_such_module_xyz'"),
    ("{dir}/my_task.py:Missing", "has no attribute 'Missing'"),
    ("{dir}/my_task.py:NoScore", "the task lacks score"),
    ("{dir}/my_task.py:broken", "raised RuntimeError: no data today"),
    ("{dir}/my_task.py:NOT_CALLABLE", "int is not callable"),
    ("{dir}/syntax.py:Echo", "raised SyntaxError"),
])
def test_load_task_errors_are_one_line_bad_input_naming_the_key(tmp_path, spec, why):
    _user_file(tmp_path)
    _user_file(tmp_path, "def oops(:\n", "syntax.py")
    spec = spec.format(dir=tmp_path)
    with pytest.raises(BadInput) as err:
        load_task(spec)
    msg = str(err.value)
    assert msg.startswith("data.task: ") and why in msg and "\n" not in msg
    if spec != "algebra":
        assert spec in msg  # the spec is named


def test_import_target_needs_a_colon():
    with pytest.raises(BadInput, match="labeler.target: 'justaname': expected pkg.module:name"):
        import_target("justaname", "labeler.target")


# --------------------------------------------------------------------------- instruct scorer by hand

LIST3 = [{"role": "user", "content": "List 3 fruits."}]
NAME = [{"role": "user", "content": "Greet me casually."}, {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "Name an animal."}]
FORMAL = [{"role": "user", "content": "Greet me formally."}]


def test_parse_request_reads_the_last_user_turn():
    assert parse_request(LIST3) == ("items", 3, "fruit")
    assert parse_request([{"role": "user", "content": "List 1 color."}]) == ("items", 1, "color")
    assert parse_request(NAME) == ("items", 1, "animal")
    assert parse_request(FORMAL) == ("greet", "formally")
    for bad in ("List 3 cars.", "What is 2 + 3?", "List 3 fruits"):
        with pytest.raises(ValueError, match="not an instruct-task turn"):
            parse_request([{"role": "user", "content": bad}])


def test_sentences_split_at_end_punctuation():
    assert sentences("Pear, plum. Hope that helps!") == ["Pear, plum.", "Hope that helps!"]
    assert sentences("  no stop at all ") == ["no stop at all"]
    assert sentences("") == []


@pytest.mark.parametrize("messages, reply, expected", [
    # form +0.5 (3 items), content +0.5 (all fruits, distinct), brevity +0.5 (one short sentence)
    (LIST3, "Apple, pear, plum.", 1.5),
    (LIST3, "apple,pear,plum", 1.5),                          # case and spacing do not matter
    (LIST3, "Apple, pear, plum. Hope that helps!", 0.5),      # chatty second sentence: brevity -0.5
    (LIST3, "Apple, pear.", 0.5),                             # 2 items for 3: form -0.5
    (LIST3, "Apple, pear, cat.", 0.5),                        # a cat is no fruit: content -0.5
    (LIST3, "Apple, apple, pear.", 0.5),                      # a repeat: content -0.5
    (LIST3, "Apple, cat. Ask me for more!", -1.5),            # wrong count, wrong item, chatty
    (LIST3, "", -1.5),                                        # nothing said: every term fails
    (LIST3, "Apple, pear, plum, " + "grape, " * 12 + "lemon.", -1.5),  # too many, repeats, over 60 chars
    (NAME, "Fox.", 1.5),
    (NAME, "Fox, owl.", 0.5),                                 # two items for one
    (NAME, "Red.", 0.5),                                      # one item, not an animal
    (NAME, "Big fox.", -0.5),                                 # one item "big fox": not an animal word
    (FORMAL, "Good evening.", 1.5),
    (FORMAL, "Good evening!", 1.5),                           # end punctuation does not matter
    (FORMAL, "Hey there!", 0.5),                              # a greeting, the wrong register
    (FORMAL, "Hey there! Nice to chat.", -0.5),
    (FORMAL, "Apple.", -0.5),                                 # no greeting at all, but brief
])
def test_instruct_score_by_hand(messages, reply, expected):
    assert score_reply(messages, reply) == expected


def test_instruct_scores_tie():
    assert score_reply(LIST3, "Apple, pear.") == score_reply(LIST3, "Apple, pear, plum. Hope that helps!")
