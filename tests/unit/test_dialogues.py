"""SFT demonstrations: loading, mixing by weight, bad lines, assistant masks, truncation."""
from __future__ import annotations

import json

import pytest

from rlhf.orchestrator.config import build_config
from rlhf.orchestrator.data.dialogues import encode_dialogues, load_sft_dialogues, read_instructions
from rlhf.orchestrator.errors import BadInput
from rlhf.orchestrator.tasks import arithmetic
from rlhf.orchestrator.models.tiny import IM_END, train_tokenizer


def _write(path, lines):
    path.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n")
    return str(path)


def _cfg(**sections):
    return build_config({"data": {"task": "arithmetic", "task_size": 20}, **sections})


@pytest.fixture(scope="module")
def tokenizer():
    corpus = ["\n".join(m["content"] for m in d) for d in arithmetic.make_dialogues(200, seed=0)]
    return train_tokenizer(corpus + ["Say hi. Hi there!"], vocab_size=320)


def test_instruction_pairs_become_two_turn_dialogues(tmp_path):
    path = _write(tmp_path / "inst.jsonl", [{"instruction": "Say hi.", "response": "Hi!"}, "",
                                            {"instruction": "Count.", "response": "1 2 3", "extra": 1}])
    assert read_instructions(path) == [
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}],
        [{"role": "user", "content": "Count."}, {"role": "assistant", "content": "1 2 3"}]]


@pytest.mark.parametrize("bad", ['{"instruction": "x"}', "not json", '{"instruction": 1, "response": "y"}', "[1]"])
def test_malformed_instruction_line_names_file_and_line(tmp_path, bad):
    path = _write(tmp_path / "inst.jsonl", [{"instruction": "a", "response": "b"}, bad])
    cfg = _cfg(sft={"sources": [{"path": path, "format": "instruction"}]})
    with pytest.raises(BadInput, match=r"inst\.jsonl:2: malformed instruction pair"):
        load_sft_dialogues(cfg, seed=0)


def test_malformed_dialogue_source_names_file_and_line(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "q"}]}, {"messages": []}])
    with pytest.raises(BadInput, match=r"d\.jsonl:2: malformed dialogue"):
        load_sft_dialogues(_cfg(sft={"sources": [{"path": path}]}), seed=0)


def test_missing_source_file_names_the_key(tmp_path):
    with pytest.raises(BadInput, match=r"sft\.sources\.0\.path: no such file"):
        load_sft_dialogues(_cfg(sft={"sources": [{"path": str(tmp_path / "nope.jsonl")}]}), seed=0)


def test_sources_mixed_in_by_weight(tmp_path):
    small = _write(tmp_path / "small.jsonl", [{"instruction": f"i{k}", "response": f"r{k}"} for k in range(3)])
    big = _write(tmp_path / "big.jsonl",
                 [{"messages": [{"role": "user", "content": f"u{k}"}, {"role": "assistant", "content": f"a{k}"}]}
                  for k in range(50)])
    cfg = _cfg(sft={"sources": [{"path": small, "format": "instruction", "weight": 0.5},
                                {"path": big, "weight": 0.25}]})
    mixed = load_sft_dialogues(cfg, seed=1)
    base = arithmetic.make_dialogues(20, seed=1)
    assert mixed[:20] == base
    from_small = [d for d in mixed if d[0]["content"].startswith("i")]
    from_big = [d for d in mixed if d[0]["content"].startswith("u")]
    assert len(mixed) == 20 + 10 + 5
    assert len(from_small) == 10 and len(from_big) == 5  # round(0.5 * 20), round(0.25 * 20)
    assert len({d[0]["content"] for d in from_big}) == 5  # enough rows: drawn without replacement
    assert {d[0]["content"] for d in from_small} <= {"i0", "i1", "i2"}  # too few: with replacement
    assert load_sft_dialogues(cfg, seed=1) == mixed  # seeded
    assert load_sft_dialogues(cfg, seed=2) != mixed


def test_without_base_set_a_source_contributes_its_size_times_weight(tmp_path):
    path = _write(tmp_path / "inst.jsonl", [{"instruction": f"i{k}", "response": "r"} for k in range(8)])
    cfg = build_config({"data": {"task": None}, "sft": {"sources": [{"path": path, "format": "instruction",
                                                                     "weight": 1.5}]}})
    assert len(load_sft_dialogues(cfg, seed=0)) == 12


def test_data_train_dialogues_count_as_demonstrations(tmp_path):
    path = _write(tmp_path / "train.jsonl",
                  [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}] * 4)
    cfg = build_config({"data": {"task": "arithmetic", "task_size": 6, "train": path}})
    assert len(load_sft_dialogues(cfg, seed=0)) == 10


def test_empty_result_is_bad_input():
    with pytest.raises(BadInput, match="no demonstration dialogues"):
        load_sft_dialogues(build_config({"data": {"task": None}}), seed=0)


def test_assistant_mask_covers_exactly_the_assistant_turns(tokenizer):
    dialogue = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5."},
                {"role": "user", "content": "Now add 1 to that."}, {"role": "assistant", "content": "5 + 1 = 6."}]
    enc = encode_dialogues(tokenizer, [dialogue], max_tokens=512)
    (ids, mask), = enc.rows
    assert enc.truncated == 0 and enc.skipped == 0 and len(ids) == len(mask)
    trained = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert trained == f"2 + 3 = 5.{IM_END}5 + 1 = 6.{IM_END}"
    # Each masked span is one assistant reply plus its <|im_end|>; nothing of the user turns.
    spans, current = [], []
    for t, m in zip(ids, mask):
        if m:
            current.append(t)
        elif current:
            spans.append(tokenizer.decode(current)); current = []
    assert spans == [f"2 + 3 = 5.{IM_END}", f"5 + 1 = 6.{IM_END}"]


def test_truncation_keeps_partial_dialogues_and_counts_dropped_ones(tokenizer):
    long = [{"role": "user", "content": "What is 2 + 3? " * 20}, {"role": "assistant", "content": "5."}]
    short = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5."}]
    no_reply = [{"role": "user", "content": "What is 2 + 3?"}]
    full = len(encode_dialogues(tokenizer, [short], 512).rows[0][0])
    enc = encode_dialogues(tokenizer, [long, short, no_reply], max_tokens=full - 2)
    assert enc.skipped == 2  # `long` lost its reply to the cut; `no_reply` never had one
    assert enc.truncated == 1  # `short` was cut but still trains on its first reply tokens
    (ids, mask), = enc.rows
    assert len(ids) == len(mask) == full - 2 and any(mask)
    with pytest.raises(BadInput, match="sft.max_tokens"):
        encode_dialogues(tokenizer, [long], max_tokens=8)


def test_tokenizer_without_generation_blocks_is_bad_input(tokenizer):
    plain = train_tokenizer(["a b c"], vocab_size=300)
    plain.chat_template = None
    with pytest.raises(BadInput, match="no chat template"):
        encode_dialogues(plain, [[{"role": "user", "content": "a"}]], 16)
    plain.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(BadInput, match="generation"):
        encode_dialogues(plain, [[{"role": "user", "content": "a"}]], 16)
