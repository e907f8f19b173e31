"""Tools a policy calls inside one reply, and the one tool loop both rollout engines share.

Token in, token out: a sample's `response_ids` are the ids the policy generated and the ids the
system inserted, concatenated exactly as they happened; generated text is never re-tokenised.
`response_mask` marks which is which (1 = the policy's, 0 = inserted), the sampler's log-probs
cover the policy's tokens only, and the PPO losses see only mask-1 tokens.

A tool call is text the policy writes: the tool's `opener`, the call text, the tool's `closer`
(the search tool: `Search Query: capital of Veltra` and a newline, see
rlhf.orchestrator.evidence.format). The loop generates in segments with stop strings:

    1. generate, stopping at any tool's opener (or eos, or the reply's token limit);
    2. after an opener, generate on, stopping at that tool's closer;
    3. the text generated since the last insertion now holds opener ... closer: a call. Decode
       the call text from the generated ids, run the tool, tokenise what it returns on its own
       (add_special_tokens=False), append those ids (mask 0), and go to 1 from prompt + all so far.

So a closer without an opener before it never ends a segment: generation just goes on. (Stop
strings are searched in each segment's own text, as vLLM does: a multi-character closer begun
inside the token that completed the opener is missed; the search tool's one-character newline
cannot be split that way.)
Limits: `max_new_tokens` counts the policy's tokens of the whole reply; after `max_calls` calls,
or once `token_budget` inserted tokens are spent (inserted ids are cut at the budget), openers
are plain text. Seeds: segment k of sample j of prompt i has seed `segment_seed(seed + n*i + j, k)`;
segment 0 keeps the engines' usual seed, so a reply that never calls a tool is the sample a
tool-free `generate` returns. `finished` = the reply ended on an eos id.

Used by `RolloutEngine(..., tools=spec)` and `HFRolloutEngine(..., tools=spec)`, whose `generate`
keeps its signature and its `Samples` contract; on one CPU machine without Ray:

    engine = HFRolloutEngine(model_path, tools={"names": ["search"], "max_calls": 1,
                                                "token_budget": 96, "evidence": evidence_spec})
    samples = engine.generate(prompt_ids, list(range(len(prompt_ids))), n=4, seed=0)
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, runtime_checkable

from rlhf.orchestrator.experience import Samples


@runtime_checkable
class Tool(Protocol):
    name: str     # what rollout.tools calls it
    opener: str   # text that starts a call in the policy's output
    closer: str   # text that ends it (the policy writes it; it stays in the reply)

    def __call__(self, call_text: str) -> str:
        """The text to insert after the call (may be empty)."""
        ...


class SearchTool:
    """`Search Query: <query>` + newline -> one `Search Result: <title> | <passage>` line per passage."""

    name = "search"
    closer = "\n"

    def __init__(self, retriever, top_k: int) -> None:
        from rlhf.orchestrator.evidence.format import QUERY

        self.opener = QUERY
        self.retriever, self.top_k = retriever, top_k

    def __call__(self, call_text: str) -> str:
        from rlhf.orchestrator.evidence.format import normalize, result_lines

        query = normalize(call_text)
        return result_lines(self.retriever.search(query, self.top_k)) if query else ""


def _search(spec: dict) -> Tool:
    from rlhf.orchestrator.evidence.retrieval import load_retriever

    evidence = spec.get("evidence")
    if not evidence:
        raise ValueError("the search tool needs spec['evidence'] (launch.evidence_spec: corpus, top_k, ...)")
    return SearchTool(load_retriever(evidence), int(evidence["top_k"]))


TOOL_FACTORIES: dict[str, Callable[[dict], Tool]] = {"search": _search}


@dataclass(frozen=True)
class ToolSet:
    """What the loop needs: the tools and the per-reply limits (from launch.tool_spec)."""

    tools: list[Tool]
    max_calls: int       # rollout.max_tool_calls
    token_budget: int    # rollout.tool_token_budget: inserted tokens per reply, in all


def build_tools(spec: dict) -> ToolSet:
    """`spec` = launch.tool_spec(cfg): {"names", "max_calls", "token_budget", "evidence"}. A name is
    looked up in TOOL_FACTORIES; an entry that already is a Tool object is used as it is (library
    callers and tests; it must pickle to travel to a Ray actor)."""
    tools = []
    for entry in spec["names"]:
        if isinstance(entry, str):
            if entry not in TOOL_FACTORIES:
                raise ValueError(f"unknown tool {entry!r}; known: {sorted(TOOL_FACTORIES)}")
            tools.append(TOOL_FACTORIES[entry](spec))
        elif isinstance(entry, Tool):
            tools.append(entry)
        else:
            raise TypeError(f"a tool spec entry must be a name or a Tool, got {type(entry).__name__}")
    openers = [t.opener for t in tools]
    if len(set(openers)) != len(openers) or not all(openers) or not all(t.closer for t in tools):
        raise ValueError(f"tools need distinct, non-empty openers and non-empty closers: {openers}")
    return ToolSet(tools, int(spec["max_calls"]), int(spec["token_budget"]))


def check_lengths(prompt_ids: list[list[int]], max_new_tokens: int, tools: ToolSet, max_model_len: int) -> None:
    """A reply may grow to max_new_tokens policy tokens + token_budget inserted ones."""
    longest = max((len(p) for p in prompt_ids), default=0)
    if longest + max_new_tokens + tools.token_budget > max_model_len:
        raise ValueError(f"a prompt of {longest} tokens + max_new_tokens {max_new_tokens} + tool token budget "
                         f"{tools.token_budget} exceeds max_model_len {max_model_len}")


class Segment(NamedTuple):
    """What an engine's segment primitive returns for one context."""

    ids: list[int]          # generated ids (the one completing a stop string included)
    logprobs: list[float]   # the sampler's log-prob of each
    stopped: bool           # ended on one of its stop strings
    eos: bool               # ended on an eos id (the last of `ids`)


# segment_fn(contexts, seeds, max_tokens, stop_strings) -> one Segment per context; stop_strings
# and max_tokens are per context, a seed None means unseeded.
SegmentFn = Callable[[list[list[int]], list[int | None], list[int], list[list[str]]], list[Segment]]

_MASK64 = (1 << 64) - 1


def segment_seed(base: int | None, segment: int) -> int | None:
    """Seed of a sample's `segment`-th segment: `base` itself for segment 0, else a splitmix64 mix
    of (base, segment), in [0, 2**63). Depends on nothing but its arguments."""
    if base is None or segment == 0:
        return base
    z = (base + segment * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


@dataclass
class _Reply:
    prompt: list[int]
    index: int
    seed: int | None
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    segments: int = 0
    calls: int = 0
    inserted: int = 0
    since: int = 0            # offset in `ids` where the text after the last insertion starts
    open_tool: Tool | None = None  # an opener was written, its closer not yet
    finished: bool = False
    done: bool = False

    @property
    def policy_tokens(self) -> int:
        return len(self.logprobs)


def find_call(text: str, tools: Sequence[Tool]) -> tuple[Tool | None, str | None]:
    """The tool whose opener occurs last in `text` and, when its closer follows that opener, the
    call text between them (else None: the call is still open). (None, None) without an opener."""
    best, pos = None, -1
    for tool in tools:
        at = text.rfind(tool.opener)
        if at > pos:
            best, pos = tool, at
    if best is None:
        return None, None
    rest = text[pos + len(best.opener):]
    end = rest.find(best.closer)
    return best, (rest[:end] if end >= 0 else None)


def generate_with_tools(segment_fn: SegmentFn, tokenizer, tools: ToolSet, prompt_ids: list[list[int]],
                        prompt_index: list[int], n: int, max_new_tokens: int, seed: int | None) -> Samples:
    """`n` replies per prompt with tool calls (module docstring), the n of one prompt consecutive;
    `Samples` with `response_mask`. The engine's `segment_fn` applies temperature and top_p.
    One `segment_fn` call per round serves every reply still going, so a batch costs as many
    rounds as its longest reply has segments (2 per call + 1)."""
    replies = [_Reply(list(p), idx, None if seed is None else seed + n * idx + j)
               for p, idx in zip(prompt_ids, prompt_index) for j in range(n)]
    active = replies if max_new_tokens > 0 else []
    while active:
        stops = [_stop_strings(r, tools) for r in active]
        results = segment_fn([r.prompt + r.ids for r in active], [segment_seed(r.seed, r.segments) for r in active],
                             [max_new_tokens - r.policy_tokens for r in active], stops)
        for r, seg in zip(active, results):
            _advance(r, seg, tokenizer, tools, max_new_tokens)
        active = [r for r in active if not r.done]
    return Samples([r.prompt for r in replies], [r.ids for r in replies], [r.logprobs for r in replies],
                   [r.finished for r in replies], [r.index for r in replies], [r.mask for r in replies])


def _can_call(r: _Reply, tools: ToolSet) -> bool:
    return r.calls < tools.max_calls and r.inserted < tools.token_budget


def _stop_strings(r: _Reply, tools: ToolSet) -> list[str]:
    if not _can_call(r, tools):
        return []
    return [r.open_tool.closer] if r.open_tool is not None else [t.opener for t in tools.tools]


def _advance(r: _Reply, seg: Segment, tokenizer, tools: ToolSet, max_new_tokens: int) -> None:
    """Appends one segment to reply `r`; runs a tool when the segment completed a call."""
    r.ids += seg.ids
    r.mask += [1] * len(seg.ids)
    r.logprobs += seg.logprobs
    r.segments += 1
    if seg.eos or not seg.stopped or not seg.ids or r.policy_tokens >= max_new_tokens:
        r.finished, r.done = seg.eos, True
        return
    # Decoded from the generated ids since the last insertion only (the inserted text may hold an opener).
    text = tokenizer.decode(r.ids[r.since:], skip_special_tokens=True)
    tool, call = find_call(text, tools.tools)
    r.open_tool = tool if call is None else None
    if tool is None or call is None:
        return  # an opener: generate on to its closer (a stop string the decode cannot see: go on too)
    inserted = tokenizer(tool(call), add_special_tokens=False)["input_ids"][: tools.token_budget - r.inserted]
    r.ids += inserted
    r.mask += [0] * len(inserted)
    r.calls += 1
    r.inserted += len(inserted)
    r.since = len(r.ids)
