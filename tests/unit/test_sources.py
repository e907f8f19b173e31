"""Data sources: every format from JSONL and from local Hugging Face datasets (save_to_disk
folders, parquet files), column mapping, mixing by weight, preference shapes, and each bad
input as a one-line BadInput naming the key, file:line, dataset row or column."""
from __future__ import annotations

import json

import pytest

from rlhf.orchestrator.config import DataSourceConfig
from rlhf.orchestrator.data.sources import PreferencePair, load_dialogues, load_preferences, read_rows
from rlhf.orchestrator.errors import BadInput

datasets = pytest.importorskip("datasets")


def _src(path, **kw) -> DataSourceConfig:
    return DataSourceConfig(path=str(path), **kw)


def _jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def _store(tmp_path, rows, kind: str, name: str = "data"):
    """The same rows as a JSONL file, a save_to_disk folder or a parquet file."""
    if kind == "jsonl":
        return _jsonl(tmp_path / f"{name}.jsonl", rows)
    ds = datasets.Dataset.from_list(rows)
    if kind == "disk":
        ds.save_to_disk(str(tmp_path / name))
        return tmp_path / name
    ds.to_parquet(str(tmp_path / f"{name}.parquet"))
    return tmp_path / f"{name}.parquet"


def _turns(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def _raises(match: str):
    return pytest.raises(BadInput, match=match)


KINDS = ["jsonl", "disk", "parquet"]
DIALOGUES = [_turns(("system", "Be brief."), ("user", f"q{k}"), ("assistant", f"a{k}")) for k in range(3)]


@pytest.mark.parametrize("kind", KINDS)
def test_messages_format(tmp_path, kind):
    path = _store(tmp_path, [{"messages": d, "id": k} for k, d in enumerate(DIALOGUES)], kind)
    assert load_dialogues([_src(path)], "data.sft", seed=0) == DIALOGUES


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_response_format_with_column_mapping(tmp_path, kind):
    rows = [{"instruction": f"Say {k}.", "output": f"{k}!", "prompt": "ignored"} for k in range(2)]
    src = _src(_store(tmp_path, rows, kind), format="prompt_response",
               column={"prompt": "instruction", "response": "output"})
    assert load_dialogues([src], "data.sft", seed=0) == [
        _turns(("user", "Say 0."), ("assistant", "0!")), _turns(("user", "Say 1."), ("assistant", "1!"))]
    assert read_rows(src, "data.sft.0")[1]["prompt"] == "Say 1."  # mapped: ours from their column


@pytest.mark.parametrize("kind", KINDS)
def test_preference_with_string_replies(tmp_path, kind):
    rows = [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}]
    assert load_preferences([_src(_store(tmp_path, rows, kind), format="preference")], "data.comparisons") == [
        PreferencePair(_turns(("user", "2+2?")), "4", "5")]


@pytest.mark.parametrize("kind", KINDS)
def test_preference_with_message_list_replies(tmp_path, kind):
    """UltraFeedback style: chosen/rejected are whole conversations; the prompt is what they share."""
    convo = _turns(("system", "Add."), ("user", "1+2?"))
    rows = [{"chosen": convo + _turns(("assistant", "3")), "rejected": convo + _turns(("assistant", "4")),
             "score": 1.0}]
    pairs = load_preferences([_src(_store(tmp_path, rows, kind))], "data.comparisons")  # default format is fine
    assert pairs == [PreferencePair(convo, "3", "4")]


def test_preference_prompt_as_messages_and_as_messages_field(tmp_path):
    """TRL conversational (prompt list, one-message replies) and a `messages` prompt column."""
    prompt = _turns(("user", "hi"))
    path = _jsonl(tmp_path / "p.jsonl", [
        {"prompt": prompt, "chosen": _turns(("assistant", "hello")), "rejected": _turns(("assistant", "go"))},
        {"messages": prompt, "chosen": "hello", "rejected": "go"},
        # UltraFeedback-binarized: a prompt string and full conversations; the prompt column wins
        {"prompt": "hi", "chosen": prompt + _turns(("assistant", "hello")), "rejected": "go"}])
    assert load_preferences([_src(path, format="preference")], "data.comparisons") == \
        [PreferencePair(prompt, "hello", "go")] * 3


def test_preference_source_in_dialogues_gives_the_chosen_dialogue(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}])
    assert load_dialogues([_src(path, format="preference")], "data.sft", seed=0) == [
        _turns(("user", "2+2?"), ("assistant", "4"))]


def test_preference_column_mapping(tmp_path):
    path = _store(tmp_path, [{"question": "q", "good": "g", "bad": "b"}], "disk")
    src = _src(path, format="preference", column={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert load_preferences([src], "data.comparisons") == [PreferencePair(_turns(("user", "q")), "g", "b")]


def test_save_to_disk_dataset_dict_splits(tmp_path):
    rows = lambda tag: [{"prompt": f"{tag}{k}", "response": "r"} for k in range(2)]  # noqa: E731
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows("t")),
                               "test": datasets.Dataset.from_list(rows("e"))})
    dd.save_to_disk(str(tmp_path / "dd"))
    first = lambda **kw: load_dialogues([_src(tmp_path / "dd", format="prompt_response", **kw)],  # noqa: E731
                                        "data.eval", seed=0)[0][0]["content"]
    assert first() == "t0" and first(split="test") == "e0"
    with _raises(r"^data\.eval\.0\.split: no split 'dev' in .*dd; splits: \['train', 'test'\]$"):
        first(split="dev")
    datasets.DatasetDict({"only": datasets.Dataset.from_list(rows("o"))}).save_to_disk(str(tmp_path / "one"))
    assert load_dialogues([_src(tmp_path / "one", format="prompt_response")], "k", 0)[0][0]["content"] == "o0"
    datasets.DatasetDict({"a": datasets.Dataset.from_list(rows("a")),
                          "b": datasets.Dataset.from_list(rows("b"))}).save_to_disk(str(tmp_path / "two"))
    with _raises(r"k\.0\.split: .*two has splits \['a', 'b'\] and none is train"):
        load_dialogues([_src(tmp_path / "two", format="prompt_response")], "k", 0)


def test_folder_and_glob_of_parquet_files(tmp_path):
    (tmp_path / "shards").mkdir()
    for k in range(2):
        datasets.Dataset.from_list([{"messages": DIALOGUES[k]}]).to_parquet(str(tmp_path / "shards" / f"{k}.parquet"))
    (tmp_path / "shards" / "README.md").write_text("not data")
    assert load_dialogues([_src(tmp_path / "shards")], "data.sft", 0) == DIALOGUES[:2]
    assert load_dialogues([_src(tmp_path / "shards" / "*.parquet")], "data.sft", 0) == DIALOGUES[:2]


def test_weights_mix_counts_base_first_and_seeded(tmp_path):
    ten = _jsonl(tmp_path / "ten.jsonl", [{"prompt": f"t{k}", "response": "r"} for k in range(10)])
    four = _jsonl(tmp_path / "four.jsonl", [{"prompt": f"f{k}", "response": "r"} for k in range(4)])
    base = [_turns(("user", "base"), ("assistant", "b"))] * 3
    sources = [_src(ten, format="prompt_response", weight=0.5), _src(four, format="prompt_response", weight=2.5)]
    mixed = load_dialogues(sources, "data.sft", seed=1, base=base)
    assert len(mixed) == 3 + 5 + 10 and mixed[:3] == base  # base unweighted; round(0.5 x 10), round(2.5 x 4)
    half = [d[0]["content"] for d in mixed[3:8]]
    assert len(set(half)) == 5 and half == sorted(half, key=lambda t: int(t[1:]))  # no repeats, file order
    assert [d[0]["content"] for d in mixed[8:16]] == ["f0", "f1", "f2", "f3"] * 2  # two whole copies
    assert len({d[0]["content"] for d in mixed[16:]}) == 2  # plus half a copy, no repeats
    assert load_dialogues(sources, "data.sft", seed=1, base=base) == mixed
    assert any(load_dialogues(sources, "data.sft", seed=s, base=base) != mixed for s in (2, 3, 4))
    whole = load_dialogues([_src(ten, format="prompt_response")], "data.sft", seed=5)
    assert [d[0]["content"] for d in whole] == [f"t{k}" for k in range(10)]  # weight 1: the file as it is


def test_weight_that_rounds_to_no_row_is_bad_input(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"messages": DIALOGUES[0]}])
    with _raises(r"^data\.sft\.0\.weight: 0\.2 x 1 rows rounds to no row"):
        load_dialogues([_src(path, weight=0.2)], "data.sft", 0)


def test_missing_path_names_the_key_and_index(tmp_path):
    good = _jsonl(tmp_path / "d.jsonl", [{"messages": DIALOGUES[0]}])
    with _raises(r"^data\.sft\.1\.path: no such file or folder: .*nope\.jsonl$"):
        load_dialogues([_src(good), _src(tmp_path / "nope.jsonl")], "data.sft", 0)
    with _raises(r"^data\.prompts\.0\.path: .*no file matches"):
        load_dialogues([_src(tmp_path / "*.parquet")], "data.prompts", 0)
    (tmp_path / "empty_dir").mkdir()
    with _raises(r"^data\.sft\.0\.path: .*empty_dir holds no dataset"):
        load_dialogues([_src(tmp_path / "empty_dir")], "data.sft", 0)


@pytest.mark.parametrize("line,fmt,expected", [
    ("not json", "messages", r"d\.jsonl:2: invalid JSON"),
    ("[1, 2]", "messages", r"d\.jsonl:2: expected a JSON object, got list"),
    ('{"text": "x"}', "messages", r"d\.jsonl:2: malformed dialogue: missing field 'messages' .*\['text'\]"),
    ('{"messages": []}', "messages", r"d\.jsonl:2: malformed dialogue: 'messages' must be a non-empty list"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "messages", r"d\.jsonl:2: malformed dialogue: .*role"),
    ('{"messages": [{"role": "user", "content": 3}]}', "messages", r"d\.jsonl:2: malformed dialogue: .*content"),
    ('{"prompt": "p"}', "prompt_response", r"d\.jsonl:2: malformed prompt/response pair: missing field 'response'"),
    ('{"prompt": 1, "response": "r"}', "prompt_response", r"d\.jsonl:2: .*'prompt' must be a string, got int"),
    ('{"chosen": "a", "rejected": "b"}', "preference", r"d\.jsonl:2: malformed preference pair: no prompt"),
    ('{"prompt": "p", "chosen": 1, "rejected": "b"}', "preference", r"d\.jsonl:2: .*'chosen' must be a string or"),
    ('{"chosen": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "a"}], '
     '"rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}', "preference",
     r"d\.jsonl:2: .*chosen and rejected continue different conversations"),
    ('{"prompt": "p", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}', "preference",
     r"d\.jsonl:2: .*last message of 'chosen' must be the assistant reply"),
    ('{"messages": [{"role": "assistant", "content": "p"}], "chosen": "a", "rejected": "b"}', "preference",
     r"d\.jsonl:2: .*the prompt must end with a user turn"),
])
def test_malformed_jsonl_line_names_file_and_line(tmp_path, line, fmt, expected):
    good = {"messages": DIALOGUES[0], "prompt": "p", "response": "r", "chosen": "a", "rejected": "b"}
    path = _jsonl(tmp_path / "d.jsonl", [good, line])
    with pytest.raises(BadInput, match=expected) as err:
        load_dialogues([_src(path, format=fmt)], "data.sft", 0)
    assert "\n" not in str(err.value)


def test_bad_dataset_row_names_path_and_row(tmp_path):
    rows = [{"prompt": "p", "response": "r"}, {"prompt": "p", "response": None}]
    path = _store(tmp_path, rows, "disk")
    with _raises(r"data row 1: malformed prompt/response pair: 'response' must be a string, got NoneType"):
        load_dialogues([_src(path, format="prompt_response")], "data.sft", 0)


@pytest.mark.parametrize("kind", ["disk", "parquet"])
def test_missing_column_names_column_format_and_dataset_columns(tmp_path, kind):
    path = _store(tmp_path, [{"text": "x", "label": 1}], kind)
    with _raises(r"^data\.sft\.0: column 'messages' \(format messages\) not in dataset columns "
                 r"\['text', 'label'\]; map it with column: \{messages: \.\.\.\}$"):
        load_dialogues([_src(path)], "data.sft", 0)
    with _raises(r"^data\.sft\.0: column 'instruction' \(for field prompt, format prompt_response\) not in "
                 r"dataset columns \['text', 'label'\]"):
        load_dialogues([_src(path, format="prompt_response", column={"prompt": "instruction"})], "data.sft", 0)


def test_unknown_column_field_and_split_on_a_file(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"messages": DIALOGUES[0]}])
    with _raises(r"^data\.sft\.0\.column: 'promt' is not a field of format prompt_response"):
        load_dialogues([_src(path, format="prompt_response", column={"promt": "q"})], "data.sft", 0)
    with _raises(r"^data\.sft\.0\.split: only a folder written by DatasetDict\.save_to_disk has splits"):
        load_dialogues([_src(path, split="test")], "data.sft", 0)


def test_empty_source_is_bad_input(tmp_path):
    path = _jsonl(tmp_path / "e.jsonl", ["", "  "])
    with _raises(r"^data\.sft\.0: .*e\.jsonl: empty dataset \(no rows\)$"):
        load_dialogues([_src(path)], "data.sft", 0)
    datasets.Dataset.from_list([{"messages": DIALOGUES[0]}]).select([]).save_to_disk(str(tmp_path / "none"))
    with _raises(r"^data\.eval\.0: .*none: empty dataset"):
        load_dialogues([_src(tmp_path / "none")], "data.eval", 0)


def test_unreadable_dataset_is_bad_input(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with _raises(r"^data\.sft\.0\.path: cannot read .*broken\.parquet as a Hugging Face dataset"):
        load_dialogues([_src(tmp_path / "broken.parquet")], "data.sft", 0)


def test_comparisons_need_rejected_replies(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"}])
    with _raises(r"^data\.comparisons\.0\.format: .*prompt_response has no rejected reply"):
        load_preferences([_src(path, format="prompt_response")], "data.comparisons")
    with _raises(r"d\.jsonl:1: malformed preference pair: missing field 'chosen'"):
        load_preferences([_src(path)], "data.comparisons")


def test_preference_weights_do_not_depend_on_an_experiment_seed(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": f"p{k}", "chosen": "a", "rejected": "b"} for k in range(8)])
    pairs = load_preferences([_src(path, weight=0.5), _src(path, weight=1.5)], "data.comparisons")
    assert len(pairs) == 4 + 12 and pairs == load_preferences([_src(path, weight=0.5), _src(path, weight=1.5)],
                                                               "data.comparisons")
