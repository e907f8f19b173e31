"""Sparrow@N: sample N replies, half with the search tool and half without, keep the one the
preference RM and the rule RM like best (Glaese et al. 2022, "Improving alignment of dialogue
agents via targeted human judgements": Sparrow@8). Where this departs from the paper: Sparrow
forces the search turn in its "with evidence" half; here that half has the search tool
available and the policy decides whether to search (the other half has no tool at all).

    for each user turn x:  y_1..y_ceil(N/2) ~ pi(. | x) with search   (the tool loop, actors/tools.py)
                           y_..N           ~ pi(. | x) without search
                           s_i = r(x, y_i) + sum_rule w_rule * log(1 - P_rule(violation | x, y_i))
                           reply y* = argmax_i s_i        (ties: the earliest sample)

s_i is the log of "preference x rule no-violation": the preference RM's score is a logit
(reward_offset subtracted, orchestrator/models/scoring.py) and the rule RM's log(1 - P) per rule
(`rule_violation_probs`, `rule_reward`, weights rule_rm.weights; {} = 1 each) is the log of the
probability that the reply breaks none of them. Without a rule model, s_i = r(x, y_i). Both
models score the whole reply, search turns included, as the PPO reward does.

Entry points (in-process, no Ray; transformers on CPU, or the first GPU):

    rlhf chat runs/NAME/round1/ppo/checkpoints/final/policy --rerank 4
    rlhf chat POLICY --rerank 8 --reward-model RM --rule-model RULE_RM --corpus corpus.jsonl --once "..."
    rlhf eval CONFIG A B --rerank 4      # A@4 and A's plain samples, both judged, and A@4's win rate over B

Inside a run folder the defaults come from it (`resolve_inputs`): its config.yaml, the newest
round's rm and rule_rm checkpoints, and its evidence corpus. The chat prints each search as an
evidence card (query, passage with the quote marked, source) and then the answer; the history
it re-renders on the next turn keeps only the answer (citation removed): the policy was trained
on single replies whose evidence came from its own search, so an earlier turn's passages would
be text it never learned to read, and they would fill a small model's context. On a cluster,
run it on any node that sees the folders.
"""
from __future__ import annotations

import copy
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

from rlhf.orchestrator.config import ExperimentConfig
from rlhf.orchestrator.errors import BadInput
from rlhf.orchestrator.evidence.format import SOURCE, parse
from rlhf.orchestrator.models.scoring import rule_reward

Preference = Callable[[list[dict], list[str]], list[float]]            # (messages, replies) -> [N]
RuleProbs = Callable[[list[dict], list[str]], dict[str, list[float]]]  # -> rule name -> [N] P(violation)


# --------------------------------------------------------------------------- the choice (pure)


@dataclass(frozen=True)
class Candidate:
    reply: str                # the whole reply: search turns (query + inserted results) and answer
    with_search: bool         # sampled with the search tool on
    preference: float         # preference RM score r(x, y), reward_offset subtracted
    rules: float              # sum_rule w * log(1 - P(violation)); 0 without a rule model
    violation: dict[str, float] = field(default_factory=dict)  # rule name -> P(violation)

    @property
    def total(self) -> float:
        """log of preference x no-violation: what Sparrow@N maximises."""
        return self.preference + self.rules


def score_candidates(replies: list[str], with_search: list[bool], preference: list[float],
                     probs: dict[str, list[float]], weights: dict[str, float]) -> list[Candidate]:
    """One Candidate per reply. replies, with_search, preference [N]; probs: rule -> [N] ({} = no rule model)."""
    if not len(replies) == len(with_search) == len(preference) or any(len(p) != len(replies) for p in probs.values()):
        raise ValueError(f"{len(replies)} replies need as many flags, preference scores and per-rule "
                         f"probabilities, got {len(with_search)}, {len(preference)}, "
                         f"{ {r: len(p) for r, p in probs.items()} }")
    rules = rule_reward(probs, weights) if probs else [0.0] * len(replies)
    return [Candidate(reply, searched, float(pref), float(rule), {r: float(p[i]) for r, p in probs.items()})
            for i, (reply, searched, pref, rule) in enumerate(zip(replies, with_search, preference, rules))]


def best_index(candidates: list[Candidate]) -> int:
    """Index of the highest total; ties keep the earliest."""
    if not candidates:
        raise ValueError("no candidates to choose from")
    return max(range(len(candidates)), key=lambda i: (candidates[i].total, -i))


class Reranker:
    """The two scorers and the rule weights; `rank` scores one prompt's candidates."""

    def __init__(self, preference: Preference, rule_probs: RuleProbs | None = None,
                 weights: dict[str, float] | None = None) -> None:
        self.preference, self.rule_probs, self.weights = preference, rule_probs, dict(weights or {})

    @classmethod
    def load(cls, reward_model: str, rule_model: str | None = None, weights: dict[str, float] | None = None,
             max_tokens: int = 512) -> "Reranker":
        """From a reward-model folder and (optionally) a rule-model folder (with rules.json)."""
        from rlhf.orchestrator.data.labelers import RewardModelLabeler
        from rlhf.orchestrator.models.scoring import RULES_FILE, load_rule_model, rule_violation_probs

        rm = RewardModelLabeler(reward_model, key="--reward-model")
        if rule_model is None:
            return cls(rm.scores, None, weights)
        if not (Path(rule_model) / RULES_FILE).is_file():
            raise BadInput(f"--rule-model {rule_model}: not a rule reward model folder (no {RULES_FILE})")
        model, tokenizer, rules = load_rule_model(str(rule_model))
        return cls(rm.scores, lambda messages, replies: rule_violation_probs(model, tokenizer, messages, replies,
                                                                             rules, max_tokens), weights)

    def rank(self, messages: list[dict], replies: list[str], with_search: list[bool]) -> list[Candidate]:
        probs = self.rule_probs(messages, replies) if self.rule_probs else {}
        return score_candidates(replies, with_search, self.preference(messages, replies), probs, self.weights)


# --------------------------------------------------------------------------- sampling


class CandidateSampler:
    """N replies per conversation from one model folder: ceil(N/2) through the tool loop with the
    search tool (when there is a corpus), the rest without tools. One in-process HF engine
    (actors/rollout_hf.py) and a shallow copy of it with `tools = None`: one copy of the weights,
    and each half keeps the engine's seeding contract."""

    def __init__(self, model_dir: str, tools: dict | None, max_new_tokens: int, temperature: float,
                 top_p: float = 1.0) -> None:
        from transformers import AutoConfig, AutoTokenizer

        from rlhf.actors.rollout_hf import HFRolloutEngine

        limit = getattr(AutoConfig.from_pretrained(model_dir), "max_position_embeddings", None) or 2048
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.searching = HFRolloutEngine(model_dir, dtype="float32", max_model_len=limit, tools=tools) \
            if tools else None
        if self.searching is None:
            self.plain = HFRolloutEngine(model_dir, dtype="float32", max_model_len=limit)
        else:
            self.plain = copy.copy(self.searching)  # same model object; generate() without the tool loop
            self.plain.tools = None
        self.reserve = max_new_tokens + (int(tools["token_budget"]) if tools else 0)  # room for the reply
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p

    def prompt_ids(self, messages: list[dict]) -> tuple[list[int], list[dict]]:
        """The chat-templated prompt (oldest exchanges dropped to fit the context) and the messages kept."""
        from rlhf.orchestrator.models.chat import fit_context

        ids, kept = fit_context(self.plain.model, self.tokenizer, messages, self.reserve)
        return ids["input_ids"][0].tolist(), kept

    def sample(self, conversations: list[list[dict]], n: int, seed: int,
               n_search: int | None = None) -> list[list[tuple[str, bool]]]:
        """Per conversation, n (reply text, with_search) pairs, the searching ones first:
        `n_search` of them (default ceil(n / 2); 0 when there is no corpus)."""
        prompts = [self.prompt_ids(m)[0] for m in conversations]
        index = list(range(len(prompts)))
        n_search = 0 if self.searching is None else min(n, (n + 1) // 2 if n_search is None else n_search)
        out: list[list[tuple[str, bool]]] = [[] for _ in prompts]
        # Different seeds per half, so "with" and "without" never replay the same uniforms.
        for engine, count, with_search, half_seed in ((self.searching, n_search, True, seed),
                                                      (self.plain, n - n_search, False, seed + 1_000_003)):
            if count == 0:
                continue
            samples = engine.generate(prompts, index, n=count, temperature=self.temperature, top_p=self.top_p,
                                      max_new_tokens=self.max_new_tokens, seed=half_seed)
            for k, ids in enumerate(samples.response_ids):
                text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
                out[samples.prompt_index[k]].append((text, with_search))
        return out


class Sparrow:
    """Sampler + reranker: `answer_all` gives each conversation's N candidates, scored, and the best's index."""

    def __init__(self, sampler: CandidateSampler, reranker: Reranker, n: int) -> None:
        self.sampler, self.reranker, self.n = sampler, reranker, n

    def answer_all(self, conversations: list[list[dict]], seed: int) -> list[tuple[list[Candidate], int]]:
        out = []
        for messages, drawn in zip(conversations, self.sampler.sample(conversations, self.n, seed)):
            ranked = self.reranker.rank(messages, [t for t, _ in drawn], [s for _, s in drawn])
            out.append((ranked, best_index(ranked)))
        return out


# --------------------------------------------------------------------------- what the chat shows


def _marked(text: str, quote: str | None, color: bool) -> str:
    if not quote or quote not in text:
        return text
    start, end = ("\x1b[1;4m", "\x1b[0m") if color else ("«", "»")
    return text.replace(quote, f"{start}{quote}{end}", 1)


def render_turn(reply: str, color: bool = False, retrieved: bool = True) -> str:
    """A reply as the chat prints it: each search as an evidence card, then the answer.

        Search Query: capital of Veltra
          ┌─ Veltra
          │  Veltra is a river nation. «Its capital is Osk.»
          └─ Source: Veltra "Its capital is Osk."
        Osk is the capital of Veltra.

    A reply that did not search is printed as it is. `retrieved=False` (a candidate sampled
    without the search tool): its Search Result lines are the policy's own, and say so."""
    t = parse(reply)
    if not t.searched:
        return reply.strip()
    lines = []
    for query, passages in zip(t.queries, t.results):
        lines.append(f"Search Query: {query}")
        for p in passages:
            cited = t.cited_title is not None and p.title == t.cited_title
            own = "" if retrieved else " (written by the model, not retrieved)"
            lines += [f"  ┌─ {p.title or '(no title)'}{own}", f"  │  {_marked(p.text, t.quote if cited else None, color)}"]
        if not passages:
            lines.append("  ┌─ (nothing found)")
    if t.cited_title is None:
        lines.append("  └─ (no source cited)")
    else:
        found = any(p.title == t.cited_title and t.quote and t.quote in p.text for p in t.retrieved)
        lines.append(f'  └─ {SOURCE} {t.cited_title} "{t.quote}"' + ("" if found else " (not in the passages shown)"))
    lines.append(t.answer)
    return "\n".join(lines)


def history_text(reply: str) -> str:
    """What the next turn's prompt keeps of a reply: its answer alone when it searched."""
    t = parse(reply)
    return t.answer if t.searched else reply.strip()


def summary_line(candidates: list[Candidate], best: int) -> str:
    """One line about the choice (the chat writes it to stderr)."""
    c = candidates[best]
    searched = sum(x.with_search for x in candidates)
    return (f"sparrow@{len(candidates)}: reply {best + 1} of {len(candidates)} ({searched} sampled with search; "
            f"this one {'with' if c.with_search else 'without'}), preference {c.preference:+.3f}, "
            f"rules {c.rules:+.3f}, total {c.total:+.3f}; others' totals "
            + ", ".join(f"{x.total:+.3f}" for i, x in enumerate(candidates) if i != best))


class SparrowChat:
    """`ChatSession`'s interface (`send`, `reset`) with Sparrow@N behind it."""

    def __init__(self, sparrow: Sparrow, system: str | None = None, seed: int = 0, color: bool = False,
                 log: TextIO | None = None) -> None:
        self.sparrow, self.system, self.seed, self.color, self.log = sparrow, system, seed, color, log
        self.messages: list[dict] = []
        self.last: tuple[list[Candidate], int] | None = None
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.turn = 0  # same seed, same replies after a reset

    def send(self, text: str) -> str:
        self.messages.append({"role": "user", "content": text})
        _, self.messages = self.sparrow.sampler.prompt_ids(self.messages)  # what the prompt keeps
        [(candidates, best)] = self.sparrow.answer_all([self.messages], seed=self.seed + 7919 * self.turn)
        self.turn += 1
        self.last = (candidates, best)
        reply = candidates[best].reply
        self.messages.append({"role": "assistant", "content": history_text(reply)})
        if self.log is not None:
            print(summary_line(candidates, best), file=self.log, flush=True)
        return render_turn(reply, self.color, retrieved=candidates[best].with_search)


# --------------------------------------------------------------------------- inputs from a run folder


@dataclass(frozen=True)
class SparrowInputs:
    cfg: ExperimentConfig        # the run's config (the nearest config.yaml above the checkpoint), else defaults
    run_dir: Path | None         # the outermost folder above the checkpoint with a config.yaml
    reward_model: str
    rule_model: str | None       # None: rerank by the preference RM alone
    corpus: str | None           # None: no search half (every candidate without search)


def _newest(run: Path | None, name: str) -> str | None:
    """RUN/roundN/<name>/checkpoint of the highest N, else RUN/<name>/checkpoint, else None."""
    if run is None:
        return None
    rounds = sorted((int(m.group(1)), p) for p in run.glob(f"round*/{name}/checkpoint")
                    if (m := re.fullmatch(r"round(\d+)", p.parent.parent.name)) and (p / "config.json").is_file())
    if rounds:
        return str(rounds[-1][1])
    single = run / name / "checkpoint"
    return str(single) if (single / "config.json").is_file() else None


def _existing(path: str | None, want_file: bool = False) -> str | None:
    if not path:
        return None
    return path if (Path(path).is_file() if want_file else (Path(path) / "config.json").is_file()) else None


def resolve_inputs(checkpoint: str, reward_model: str | None = None, rule_model: str | None = None,
                   corpus: str | None = None, cfg: ExperimentConfig | None = None) -> SparrowInputs:
    """Flags first, then the config (model.reward, model.rule_reward, evidence.corpus), then the run
    folder above `checkpoint` (newest roundN/rm, roundN/rule_rm, evidence/corpus.jsonl)."""
    from rlhf.orchestrator.config import load_config
    from rlhf.orchestrator.evidence.prepare import CORPUS_FILE

    folder = Path(checkpoint).resolve()
    above = [p for p in [folder, *folder.parents][:8] if (p / "config.yaml").is_file()]
    run_dir = above[-1] if above else None
    if cfg is None:
        cfg = load_config(str(above[0] / "config.yaml"), []) if above else ExperimentConfig()
    for flag, value, want_file in (("--reward-model", reward_model, False), ("--rule-model", rule_model, False),
                                   ("--corpus", corpus, True)):
        if value is not None and not _existing(value, want_file):
            raise BadInput(f"{flag} {value}: " + ("no such file" if want_file else "not a model folder (no config.json)"))
    reward_model = reward_model or _existing(cfg.model.reward) or _newest(run_dir, "rm")
    if reward_model is None:
        raise BadInput(f"--reward-model: not given, and no reward model in {run_dir or 'a run folder above ' + checkpoint} "
                       f"(model.reward, roundN/rm/checkpoint); Sparrow@N needs one to rank the candidates")
    rule_model = rule_model or _existing(cfg.model.rule_reward) or _newest(run_dir, "rule_rm")
    corpus = corpus or _existing(cfg.evidence.corpus, True) or \
        (_existing(str(run_dir / CORPUS_FILE), True) if run_dir else None)
    return SparrowInputs(cfg, run_dir, str(reward_model), rule_model, corpus)


def search_spec(cfg: ExperimentConfig, corpus: str | None) -> dict | None:
    """The tool spec of the search half (launch.tool_spec's shape) over `corpus`; None without one."""
    if corpus is None:
        return None
    evidence = {**cfg.evidence.model_dump(), "corpus": str(corpus), "task": cfg.data.task}
    return {"names": ["search"], "max_calls": max(1, cfg.rollout.max_tool_calls),
            "token_budget": cfg.rollout.tool_token_budget, "evidence": evidence}


def load_sparrow(model_dir: str, inputs: SparrowInputs, n: int, max_new_tokens: int, temperature: float,
                 top_p: float = 1.0) -> Sparrow:
    """Checks n and temperature, then loads the engines and the scorers (bad folders: BadInput)."""
    if n < 1:
        raise BadInput(f"--rerank must be >= 1, got {n}")
    if temperature <= 0:
        raise BadInput(f"--temperature must be > 0 with --rerank (N samples of a greedy policy are one reply), "
                       f"got {temperature}")
    if inputs.corpus is not None:
        from rlhf.orchestrator.evidence.retrieval import load_retriever

        load_retriever(search_spec(inputs.cfg, inputs.corpus)["evidence"])  # a bad corpus fails here, one line
    reranker = Reranker.load(inputs.reward_model, inputs.rule_model, dict(inputs.cfg.rule_rm.weights),
                             inputs.cfg.rule_rm.max_tokens)
    sampler = CandidateSampler(str(model_dir), search_spec(inputs.cfg, inputs.corpus), max_new_tokens, temperature,
                               top_p)
    return Sparrow(sampler, reranker, n)


def check_policy(checkpoint: str, key: str = "chat") -> str:
    """The policy folder (a known name resolved, orchestrator/models/registry.py), checked before
    anything loads: one line naming it when it is not a model folder with a chat template."""
    import json

    from rlhf.orchestrator.models.registry import resolve_model

    folder = Path(resolve_model(str(checkpoint), key=key))
    if not folder.is_dir():
        raise BadInput(f"{key}: no such model folder: {folder}")
    if not (folder / "config.json").is_file():
        raise BadInput(f"{key}: {folder} is not a model folder (no config.json)")
    tokenizer_config = folder / "tokenizer_config.json"
    has_template = (folder / "chat_template.jinja").is_file() or (
        tokenizer_config.is_file() and "chat_template" in json.loads(tokenizer_config.read_text()))
    if not has_template:
        raise BadInput(f"{key}: the tokenizer in {folder} has no chat template")
    return str(folder)


def run_sparrow_chat(checkpoint: str, n: int, reward_model: str | None = None, rule_model: str | None = None,
                     corpus: str | None = None, once: str | None = None, system: str | None = None,
                     max_new_tokens: int = 128, temperature: float = 0.7, seed: int = 0,
                     stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr) -> None:
    """`rlhf chat CHECKPOINT --rerank N ...`: the chat loop of orchestrator/models/chat.py over SparrowChat."""
    from rlhf.orchestrator.models.chat import chat_loop

    from transformers.utils import logging as hf_logging

    checkpoint = check_policy(checkpoint)
    inputs = resolve_inputs(checkpoint, reward_model, rule_model, corpus)
    hf_logging.disable_progress_bar()  # the terminal is for the conversation
    print(f"sparrow@{n}: reward model {inputs.reward_model}; rule model {inputs.rule_model or '(none)'}; "
          f"corpus {inputs.corpus or '(none: no candidate searches)'}", file=stderr, flush=True)
    sparrow = load_sparrow(checkpoint, inputs, n, max_new_tokens, temperature)
    session = SparrowChat(sparrow, system=system, seed=seed, color=stdout.isatty(), log=stderr)
    chat_loop(session, str(checkpoint), once, stdin, stdout)
