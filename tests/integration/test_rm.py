"""Reward-model stage end to end on CPU: Ray Train, 2 workers, DeepSpeed ZeRO-2, tiny model.

Synthetic comparisons from the arithmetic task, K = 4 replies per prompt ranked by the
simulated labeler (arithmetic.score_reply): correct + polite (1.5) > correct (1.0) >
wrong (-1.0) > wrong + rambling (-1.5). A tiny randomly initialised model cannot do
arithmetic, but politeness and rambling are learnable from the text, which decides 5 of
the 6 pairs of every prompt; the held-out accuracy bound (0.7) leaves room for guessing
the remaining pair. Checks: held-out accuracy, metrics.jsonl, the score shift (the
demonstration replies average 0 through RewardScorer), and the critic initialised from
the folder with ValueModel.from_pretrained.

Collection with a real vLLM engine is not exercised here (an engine start costs ~30 s);
tests/unit/test_comparisons.py covers collect_comparisons with a stand-in rollout group.
"""
from __future__ import annotations

import json
import random

import pytest
import torch

from rlhf.orchestrator.data.labelers import SimulatedLabeler
from rlhf.orchestrator.recipe.comparisons import ComparisonStore, prompt_key
from rlhf.orchestrator.config import build_config
from rlhf.orchestrator.tasks import arithmetic
from rlhf.orchestrator.models.tiny import IM_END, TinyModelSpec, build_tiny_from_corpus

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

N_PROMPTS, K = 100, 4
RAMBLE = " Let me also tell you a great deal more about this number than you asked."


def _replies(rng: random.Random, question: str) -> list[str]:
    a, op, b = arithmetic._FIRST.fullmatch(question).groups()
    value = arithmetic._OPS[op](int(a), int(b))
    wrong = value + rng.choice([-3, -2, -1, 1, 2, 3])
    expr = f"{a} {op} {b}"
    replies = [f"{expr} = {value}. {rng.choice(arithmetic.POLITE)}", f"{expr} = {value}.",
               f"{expr} = {wrong}.", f"{expr} = {wrong}.{RAMBLE}"]
    rng.shuffle(replies)  # the sampled order carries no signal
    return replies


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model, and a store of ranked comparisons with their demonstrations."""
    root = tmp_path_factory.mktemp("rm")
    # Distinct questions, so the split by prompt id holds out exactly 20 % of them.
    dialogues = list({d[0]["content"]: d for d in arithmetic.make_dialogues(3 * N_PROMPTS, seed=1, max_turns=1)}
                     .values())[:N_PROMPTS]
    corpus = [m["content"] for d in dialogues for m in d] + [RAMBLE] * 4
    model = build_tiny_from_corpus(corpus, root / "sft", TinyModelSpec(vocab_size=400))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    stop = tok.convert_tokens_to_ids(IM_END)
    labeler, rng = SimulatedLabeler(arithmetic.score_reply), random.Random(0)
    demos = {}
    with ComparisonStore(root / "comparisons.sqlite") as store:
        for dialogue in dialogues:
            prompt, key = dialogue[:-1], prompt_key(dialogue[:-1])
            replies = _replies(rng, prompt[0]["content"])
            ids = [tok.encode(r, add_special_tokens=False) + [stop] for r in replies]
            ranks = labeler.rank(prompt, replies)
            assert sorted(ranks) == [0, 1, 2, 3]
            store.add(0, key, str(model), prompt, replies, ids, ranks)
            demos[key] = dialogue[-1]["content"]  # the SFT demonstration for this prompt
        comparisons = store.load()
    return root, model, comparisons, demos


def test_rm_learns_shifts_and_initialises_critic(ray_local, setup):
    from rlhf.actors.modeling import ValueModel
    from rlhf.actors.reward import RewardScorer
    from rlhf.orchestrator.experience import Samples
    from rlhf.orchestrator.recipe.rm import run_rm

    root, model, comparisons, demos = setup
    assert len({c.prompt_id for c in comparisons}) == N_PROMPTS
    cfg = build_config({"seed": 0, "rm": {"num_workers": 2, "zero_stage": 2, "lr": 1e-3, "prompts_per_batch": 8,
                                           "epochs": 3, "held_out_fraction": 0.2}})
    out = root / "rm-run"
    result = run_rm(cfg, str(model), comparisons, demos, str(model), out)
    print(f"RM result: {result}")

    assert (result.train_prompts, result.heldout_prompts) == (80, 20)
    assert result.steps == 3 * 80 // 8
    assert result.heldout_accuracy is not None and result.heldout_accuracy >= 0.7, result
    assert result.offset_source == "demonstrations"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, result.steps + 1))
    assert set(rows[0]) == {"step", "rm/loss", "rm/accuracy", "rm/lr"}
    assert rows[-1]["rm/loss"] < rows[0]["rm/loss"]
    assert rows[-1]["rm/lr"] < rows[0]["rm/lr"] == pytest.approx(1e-3)  # cosine decay

    ckpt = out / "checkpoint"
    assert json.loads((ckpt / "config.json").read_text())["reward_offset"] == pytest.approx(result.offset)
    # Through the PPO stage's scorer the demonstrations now average 0 (InstructGPT's shift).
    scorer = RewardScorer(str(ckpt), functions={}, model_path=str(ckpt))
    tok = scorer.tokenizer
    stop = tok.convert_tokens_to_ids(IM_END)
    prompts = [c.prompt_messages for c in comparisons]
    prompt_ids = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
                  for p in prompts]
    demo_ids = [tok.encode(demos[c.prompt_id], add_special_tokens=False) + [stop] for c in comparisons]
    n = len(prompts)
    samples = Samples(prompt_ids, demo_ids, [[]] * n, [True] * n, list(range(n)))
    demo_scores = torch.tensor(scorer.score(samples, prompts).components["model"])
    assert abs(float(demo_scores.mean())) < 1e-4

    # The critic starts as the shifted reward model: V(s[:t+1]) = r(s[:t+1]) - offset.
    critic = ValueModel.from_pretrained(str(ckpt)).eval()
    seq = prompt_ids[0] + demo_ids[0]
    with torch.no_grad():
        values = critic(torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long))[0]
    prefix = Samples([prompt_ids[0]], [demo_ids[0][:-1]], [[]], [True], [0])
    expected = scorer.score(prefix, prompts[:1]).components["model"][0]
    assert float(values[-1]) == pytest.approx(expected, abs=1e-4)


def test_rm_zero3_without_demonstrations_or_held_out(ray_local, setup):
    """ZeRO-3 (parameters gathered for saving), --max-steps, no held-out share, and the shift
    falling back to the best (rank-0) replies when no demonstration is given."""
    from rlhf.orchestrator.recipe.rm import run_rm

    root, model, comparisons, _ = setup
    cfg = build_config({"seed": 1, "rm": {"num_workers": 2, "zero_stage": 3, "prompts_per_batch": 4,
                                           "held_out_fraction": 0.0}})
    result = run_rm(cfg, str(model), comparisons[:20], None, str(model), root / "rm-z3", max_steps=2)
    assert (result.steps, result.train_prompts, result.heldout_prompts) == (2, 20, 0)
    assert result.heldout_accuracy is None and result.offset_source == "best_replies"
    rows = (root / "rm-z3" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2
    from rlhf.actors.modeling import ValueModel

    critic = ValueModel.from_pretrained(result.checkpoint)
    assert float(critic.value_head.bias) == pytest.approx(-result.offset)
