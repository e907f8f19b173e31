"""The tool loop (rlhf.actors.tools) with a scripted policy: token ids, masks, log-probs, limits, seeds.

A character tokenizer (one id per character, id 0 = eos) and a fake segment primitive that
streams a scripted text per segment seed and honours stop strings, eos and max_tokens the way
the vLLM and HF engines do. Expected values are written out by hand.

Run: .venv/bin/pytest tests/unit/test_tool_loop.py -q   (no model, under a second)
"""
from __future__ import annotations

import pytest
import torch

from rlhf.actors.tools import (Segment, SearchTool, ToolSet, build_tools, find_call, generate_with_tools,
                               segment_seed)
from rlhf.orchestrator.evidence.format import Passage
from rlhf.orchestrator.experience import Samples, to_sequence_batch
from rlhf.orchestrator.ppo.trainer import sampler_logprobs

EOS = 0


class CharTokenizer:
    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        assert add_special_tokens is False  # inserted text is tokenised on its own
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids if i != EOS)


def ids(text: str) -> list[int]:
    return [EOS if c == "$" else ord(c) for c in text]


def logp(i: int) -> float:
    return -i / 1000.0  # the fake sampler's log-prob of id i


class ScriptedPolicy:
    """segment_fn: segment with seed s writes scripts[s] ('$' = eos), stopping like vLLM does."""

    def __init__(self, scripts: dict[int, str]) -> None:
        self.scripts, self.calls = scripts, []

    def __call__(self, contexts, seeds, max_tokens, stop_strings):
        self.calls.append((contexts, seeds, max_tokens, stop_strings))
        out = []
        for seed, limit, stops in zip(seeds, max_tokens, stop_strings):
            text, got = self.scripts[seed], []
            for c in text[:limit]:
                got.append(EOS if c == "$" else ord(c))
                if c == "$":
                    break
                if any(s in CharTokenizer().decode(got) for s in stops):
                    break
            stopped = any(s in CharTokenizer().decode(got) for s in stops)
            out.append(Segment(got, [logp(i) for i in got], stopped, got[-1:] == [EOS]))
        return out


class Echo:
    """A test tool: `<q>call</q>` inserts `[call]`."""

    name, opener, closer = "echo", "<q>", "</q>"

    def __init__(self) -> None:
        self.seen = []

    def __call__(self, call_text: str) -> str:
        self.seen.append(call_text)
        return f"[{call_text}]"


def run(scripts, tool=None, prompts=((7, 7),), index=(0,), n=1, max_new=50, seed=100, max_calls=2, budget=50):
    tool = tool or Echo()
    policy = ScriptedPolicy(scripts)
    samples = generate_with_tools(policy, CharTokenizer(), ToolSet([tool], max_calls, budget),
                                  [list(p) for p in prompts], list(index), n, max_new, seed)
    return samples, policy, tool


def test_a_call_inserts_the_tools_ids_masked_and_generation_goes_on():
    s0, s1, s2 = segment_seed(100, 0), segment_seed(100, 1), segment_seed(100, 2)
    samples, policy, tool = run({s0: "Hi <q>cats</q> tail", s1: "cats</q> tail", s2: " ok$"})
    # seg 0 stops at the opener, seg 1 at the closer; then [cats] is inserted; seg 2 ends on eos.
    assert tool.seen == ["cats"]
    expected = ids("Hi <q>") + ids("cats</q>") + ids("[cats]") + ids(" ok$")
    assert samples.response_ids == [expected]
    assert samples.response_mask == [[1] * 6 + [1] * 8 + [0] * 6 + [1] * 4]
    assert samples.response_logprobs == [[logp(i) for i in ids("Hi <q>cats</q> ok$")]]
    assert samples.finished == [True]
    # Stop strings: openers first, then the open tool's closer, then openers again.
    assert [c[3] for c in policy.calls] == [[["<q>"]], [["</q>"]], [["<q>"]]]
    # Each segment continues from prompt + everything so far, inserted ids included.
    assert policy.calls[2][0] == [[7, 7] + ids("Hi <q>cats</q>[cats]")]
    # max_tokens counts policy tokens only: 50, then 50 - 6, then 50 - 14 (inserted ones are free).
    assert [c[2] for c in policy.calls] == [[50], [44], [36]]


def test_the_loss_mask_and_the_sampler_logprobs_cover_only_policy_tokens():
    s0, s1, s2 = segment_seed(100, 0), segment_seed(100, 1), segment_seed(100, 2)
    samples, _, _ = run({s0: "<q>", s1: "x</q>", s2: "y$"})
    # response: <q> x</q> [x] y$  -> mask 1,1,1, 1,1,1,1,1, 0,0,0, 1,1
    batch = to_sequence_batch(samples, pad_id=EOS)
    mask = [1] * 8 + [0] * 3 + [1] * 2
    assert batch.action_mask[0].tolist() == [0.0] + mask  # target 0 is the 2nd prompt token
    sampler = sampler_logprobs(samples, batch.action_mask)
    policy_ids = ids("<q>x</q>y$")
    assert sampler[0, batch.action_mask[0].bool()].tolist() == pytest.approx([logp(i) for i in policy_ids])
    assert sampler[0, 9:12].tolist() == [0.0, 0.0, 0.0]  # the inserted [x]


def test_a_closer_without_an_opener_does_not_end_a_segment():
    s0 = segment_seed(100, 0)
    samples, policy, tool = run({s0: "a</q>b</q>c$"})
    assert len(policy.calls) == 1 and tool.seen == []
    assert samples.response_ids == [ids("a</q>b</q>c$")] and samples.response_mask == [[1] * 12]


def test_after_max_calls_openers_are_plain_text():
    s0, s1, s2 = segment_seed(100, 0), segment_seed(100, 1), segment_seed(100, 2)
    samples, policy, tool = run({s0: "<q>", s1: "a</q>", s2: "<q>b</q>$"}, max_calls=1)
    assert tool.seen == ["a"]
    assert policy.calls[2][3] == [[]]  # no stop strings once the calls are used up
    assert samples.response_ids == [ids("<q>a</q>[a]<q>b</q>$")]
    assert sum(samples.response_mask[0]) == len(ids("<q>a</q><q>b</q>$"))
    # max_calls 0: never a call, one segment.
    _, policy0, tool0 = run({s0: "<q>a</q>$"}, max_calls=0)
    assert tool0.seen == [] and len(policy0.calls) == 1


def test_inserted_ids_are_cut_at_the_token_budget_and_a_spent_budget_ends_calls():
    s0, s1, s2 = segment_seed(100, 0), segment_seed(100, 1), segment_seed(100, 2)
    samples, policy, tool = run({s0: "<q>", s1: "abcd</q>", s2: "<q>e</q>$"}, budget=4)
    assert tool.seen == ["abcd"]
    # "[abcd]" cut to its first 4 ids; then the budget is spent: no more stops, the rest is text.
    assert samples.response_ids == [ids("<q>abcd</q>[abc<q>e</q>$")]
    assert samples.response_mask[0].count(0) == 4
    assert policy.calls[2][3] == [[]]


def test_max_new_tokens_counts_the_policys_tokens_of_the_whole_reply():
    s0, s1, s2 = segment_seed(100, 0), segment_seed(100, 1), segment_seed(100, 2)
    samples, _, _ = run({s0: "<q>", s1: "a</q>", s2: "0123456789$"}, max_new=12)
    # 3 + 5 policy tokens before the insertion, so 4 more: "0123", cut, not finished.
    assert samples.response_ids == [ids("<q>a</q>[a]0123")]
    assert sum(samples.response_mask[0]) == 12 and samples.finished == [False]


def test_a_sample_depends_only_on_seed_prompt_index_and_j():
    scripts = {}
    for base in (100 + 2 * 3, 100 + 2 * 3 + 1, 100 + 2 * 4, 100 + 2 * 4 + 1):
        scripts[segment_seed(base, 0)] = f"<q>{base}"
        scripts[segment_seed(base, 1)] = f"{base}</q>"
        scripts[segment_seed(base, 2)] = f"{base}$"
    both, _, _ = run(scripts, prompts=((5,), (6,)), index=(3, 4), n=2)
    alone, _, _ = run(scripts, prompts=((6,),), index=(4,), n=2)
    assert both.prompt_index == [3, 3, 4, 4] and both.prompt_ids == [[5], [5], [6], [6]]
    assert alone.response_ids == both.response_ids[2:] and alone.response_mask == both.response_mask[2:]
    # seed + n * index + j = 100 + 6 + 0; segment 0 stops at its opener, before "106".
    assert both.response_ids[0] == ids("<q>106</q>[106]106$")


def test_segment_seeds_are_distinct_and_keep_segment_0():
    assert segment_seed(42, 0) == 42 and segment_seed(None, 3) is None
    seeds = {segment_seed(base, k) for base in range(50) for k in range(1, 6)}
    assert len(seeds) == 250 and all(0 <= s < 2**63 for s in seeds)
    assert segment_seed(7, 2) == segment_seed(7, 2)


def test_find_call_takes_the_last_opener():
    tool = Echo()
    assert find_call("x <q>a</q> <q>b</q>y", [tool]) == (tool, "b")
    assert find_call("x <q>open", [tool]) == (tool, None)
    assert find_call("no call</q>", [tool]) == (None, None)


def test_search_tool_inserts_result_lines():
    class Retriever:
        def search(self, query, k):
            assert (query, k) == ("capital of Veltra", 1)
            return [Passage("Veltra", "Its capital is Osk.")]

    tool = SearchTool(Retriever(), top_k=1)
    assert (tool.opener, tool.closer) == ("Search Query:", "\n")
    assert tool("  capital of  Veltra ") == "Search Result: Veltra | Its capital is Osk.\n"
    assert tool("   ") == ""


def test_build_tools_names_objects_and_errors():
    echo = Echo()
    tools = build_tools({"names": [echo], "max_calls": 2, "token_budget": 9, "evidence": None})
    assert tools == ToolSet([echo], 2, 9)
    with pytest.raises(ValueError, match="unknown tool 'grep'"):
        build_tools({"names": ["grep"], "max_calls": 1, "token_budget": 9})
    with pytest.raises(ValueError, match="search tool needs"):
        build_tools({"names": ["search"], "max_calls": 1, "token_budget": 9, "evidence": None})
    with pytest.raises(ValueError, match="distinct"):
        build_tools({"names": [echo, Echo()], "max_calls": 1, "token_budget": 9})


def test_samples_concat_mixes_parts_with_and_without_masks():
    plain = Samples([[1]], [[5, 6]], [[-0.1, -0.2]], [True], [0])
    tooled = Samples([[2]], [[7, 8, 9]], [[-0.3, -0.4]], [False], [1], [[1, 0, 1]])
    assert Samples.concat([plain, plain]).response_mask == []
    both = Samples.concat([plain, tooled])
    assert both.response_mask == [[1, 1], [1, 0, 1]]
    assert both.response_ids == [[5, 6], [7, 8, 9]] and both.prompt_index == [0, 1]
    batch = to_sequence_batch(both, pad_id=0)
    assert batch.action_mask.tolist() == [[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]]
    sampler = sampler_logprobs(both, batch.action_mask)
    torch.testing.assert_close(sampler, torch.tensor([[-0.1, -0.2, 0.0], [-0.3, 0.0, -0.4]]))
    with pytest.raises(ValueError, match="sample 0: 1 sampler log-probs for 2 policy tokens"):
        sampler_logprobs(Samples([[1]], [[5, 6]], [[-0.1]], [True], [0]), torch.ones(1, 2))


# ---- the HF engine in-process (no Ray), on a tiny random model -------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from rlhf.orchestrator.models.tiny import build_tiny_from_corpus, sample_corpus

    return str(build_tiny_from_corpus(sample_corpus(), tmp_path_factory.mktemp("tools") / "tiny", seed=0))


def test_hf_engine_with_tools_in_process(tiny):
    """Segments end at the token that completes a stop string; segment 0 is the tool-free sample;
    the policy tokens' log-probs are a transformers forward's of the whole sequence."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.actors.rollout_hf import HFRolloutEngine

    class Spaced:  # a random tiny model writes `e` and spaces often
        name, opener, closer = "spaced", "e", " "

        def __call__(self, call_text: str) -> str:
            return f" <{call_text}>"

    tok, tool = AutoTokenizer.from_pretrained(tiny), Spaced()
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"] for t in ["The weather today.", "Simple math."]]
    spec = {"names": [tool], "max_calls": 2, "token_budget": 10}
    samples = HFRolloutEngine(tiny, dtype="float32", max_model_len=128, tools=spec).generate(
        prompts, [0, 1], n=2, max_new_tokens=16, seed=5)
    plain = HFRolloutEngine(tiny, dtype="float32", max_model_len=128).generate(prompts, [0, 1], n=2,
                                                                               max_new_tokens=16, seed=5)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    insertions = 0
    for i, (ids, mask) in enumerate(zip(samples.response_ids, samples.response_mask)):
        first = next((k for k in range(1, len(ids) + 1) if "e" in tok.decode(ids[:k], skip_special_tokens=True)),
                     len(ids))
        assert ids[:first] == plain.response_ids[i][:first]  # segment 0: the tool-free sample's seed
        starts = [k for k in range(1, len(mask)) if mask[k] == 0 and mask[k - 1] == 1]
        for k in starts:  # the token before an insertion completes the closer, the one before it does not
            since = max([j for j in range(1, k) if mask[j] == 1 and mask[j - 1] == 0], default=0)
            assert find_call(tok.decode(ids[since:k], skip_special_tokens=True), [tool])[1] is not None
            assert find_call(tok.decode(ids[since:k - 1], skip_special_tokens=True), [tool])[1] is None
        insertions += len(starts)
        seq = torch.tensor([samples.prompt_ids[i] + ids])
        with torch.no_grad():
            lp = torch.log_softmax(model(seq).logits[0, :-1].float(), -1).gather(-1, seq[0, 1:, None])[:, 0]
        policy = lp[len(samples.prompt_ids[i]) - 1:][torch.tensor(mask, dtype=torch.bool)]
        torch.testing.assert_close(policy, torch.tensor(samples.response_logprobs[i]), atol=1e-4, rtol=0)
    assert insertions >= 2, insertions
