"""Runs an LLM judge (rlhf.orchestrator.data.llm_judge) on a rollout engine for as long as it ranks.

    labeler = build_labeler(cfg.labeler, task)        # an LLMJudge for labeler.kind: llm_judge
    with judge_engine(cfg, labeler):                  # starts one engine on the judge model
        ranks = labeler.rank_many([(messages, replies), ...])
    # the engine is shut down here; for any other labeler the block runs with nothing started

The engine is `sampling_rollout` (rollout.backend: vLLM, or HF generate) on the judge's
folder, outside any placement group. Each question is rendered with the judge tokenizer's
chat template (add_generation_prompt) and answered greedily in at most ANSWER_TOKENS
tokens: vLLM treats temperature 0 as greedy; the HF engine samples by inverse CDF of
softmax(logits / T), which at T = 1e-4 is the argmax unless two logits lie within ~1e-3.

Run on one CPU machine inside a running Ray (the pipeline's, or `ray.init()`), e.g. with
SmolLM2-135M as the judge (about 35 s to start); on a cluster the same, the engine gets
rollout.tensor_parallel_size GPUs when placement.gpus_per_node > 0.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from rlhf.orchestrator.config import ExperimentConfig
from rlhf.orchestrator.data.llm_judge import LLMJudge
from rlhf.orchestrator.errors import BadInput

ANSWER_TOKENS = 12          # "Reply B is the better one." fits; the parser reads the first choice
GREEDY = {"vllm": 0.0, "hf": 1e-4}  # per rollout.backend, see the module docstring
TEMPLATE_TOKENS = 512       # the template and the judge's own system prompt, with room to spare


def judge_max_len(cfg: ExperimentConfig, max_positions: int | None) -> int:
    """The judge engine's context: a conversation and two replies, counted in policy tokens
    and doubled (the judge's tokenizer may split text finer), plus the template and the answer;
    never past the judge's own position limit."""
    want = 2 * (cfg.data.max_prompt_tokens + 2 * cfg.rollout.max_new_tokens) + TEMPLATE_TOKENS + ANSWER_TOKENS
    return min(want, max_positions) if max_positions else want


def load_judge_tokenizer(judge: LLMJudge):
    """The judge model's tokenizer; BadInput naming `<key>.path` if it has no chat template."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(judge.model)
    except (OSError, ValueError) as err:
        raise BadInput(f"{judge.key}.path: cannot load a tokenizer from {judge.model}: {type(err).__name__}: "
                       f"{str(err).splitlines()[0] if str(err) else ''}") from None
    if not getattr(tokenizer, "chat_template", None):
        raise BadInput(f"{judge.key}.path: the tokenizer of {judge.model} has no chat template; the judge "
                       "must be a chat model")
    return tokenizer


def make_generate(rollout, tokenizer, max_len: int, temperature: float, seed: int):
    """`generate(chats) -> answers` over `rollout` (a RolloutGroup): chat-templated, greedy.
    A question longer than the engine's context is not sent; its answer is "" (no vote)."""
    budget = max_len - ANSWER_TOKENS

    def generate(chats: list[list[dict]]) -> list[str]:
        ids = [list(tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"]) for chat in chats]
        fits = [i for i, p in enumerate(ids) if len(p) <= budget]
        if len(fits) < len(ids):
            print(f"llm judge: {len(ids) - len(fits)} of {len(ids)} questions exceed the judge's {budget}-token "
                  "context; they count as unparsed answers")
        answers = [""] * len(ids)
        if fits:
            samples = rollout.generate([ids[i] for i in fits], n=1, temperature=temperature, top_p=1.0,
                                       max_new_tokens=ANSWER_TOKENS, seed=seed)
            for i, text in zip(fits, tokenizer.batch_decode(samples.response_ids, skip_special_tokens=True)):
                answers[i] = text
        return answers

    return generate


@contextmanager
def judge_engine(cfg: ExperimentConfig, labeler) -> Iterator[object]:
    """While the block runs, an LLMJudge `labeler` ranks on its own rollout engine (started
    here, shut down on exit, the judge detached again). Any other labeler: nothing happens."""
    if not isinstance(labeler, LLMJudge):
        yield labeler
        return
    from transformers import AutoConfig

    from rlhf.orchestrator.ppo.groups import wait_all
    from rlhf.orchestrator.ppo.launch import sampling_rollout

    tokenizer = load_judge_tokenizer(labeler)
    max_len = judge_max_len(cfg, getattr(AutoConfig.from_pretrained(labeler.model), "max_position_embeddings", None))
    rollout = sampling_rollout(cfg, labeler.model, seed=cfg.seed, max_model_len=max_len)
    try:
        # Started now, not at the first question: a judge that cannot load fails here, by name.
        wait_all([e.__ray_ready__.remote() for e in rollout.engines], rollout.timeout_s, "llm judge engine start-up")
        labeler.attach(make_generate(rollout, tokenizer, max_len, GREEDY[cfg.rollout.backend], cfg.seed))
        yield labeler
    finally:
        labeler.attach(None)
        rollout.shutdown()
