"""`rlhf quickstart`: the foundation-stage quickstart, in one process on one CPU.

What it does, for real, with the pieces that exist so far:
  1. builds the task's demonstration dialogues and a tiny model (tokenizer trained on them);
  2. samples replies to held-out prompts and has the simulated labeler score them;
  3. a short supervised warm-up on the assistant turns only (memory-lean token log-probs,
     masked mean over assistant tokens);
  4. samples and scores again, writes metrics.jsonl, the policy as a Hugging Face folder,
     and a one-line summary.
The full SFT -> reward model -> PPO pipeline on Ray replaces this as `rlhf pipeline`.

Run: `rlhf quickstart configs/quickstart.yaml --out runs/quickstart` (or `make run`).
"""
from __future__ import annotations

import math
import random
import shutil
import time
from pathlib import Path

import torch

from rlhf.kernels.logprobs import token_logprobs
from rlhf.orchestrator.config import ExperimentConfig
from rlhf.orchestrator.errors import BadInput
from rlhf.orchestrator.experience import SequenceBatch, dialogue_batch
from rlhf.orchestrator.rl.masked import masked_mean
from rlhf.orchestrator.rundir import MetricsLog, prepare_run_dir
from rlhf.orchestrator.tasks import arithmetic
from rlhf.orchestrator.tiny import TinyModelSpec, build_tiny_from_corpus, is_complete_model_dir

HELD_OUT_PROMPTS = 32


def _render(dialogue: list[dict]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in dialogue)


def _encode(tokenizer, dialogues: list[list[dict]], max_len: int) -> list[tuple[list[int], list[int]]]:
    """(token ids, assistant-token mask) per dialogue, cut to `max_len` tokens."""
    out = []
    for dialogue in dialogues:
        enc = tokenizer.apply_chat_template(dialogue, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        out.append((enc["input_ids"][:max_len], enc["assistant_masks"][:max_len]))
    return out


def sft_loss(model, batch: SequenceBatch) -> torch.Tensor:
    """Mean negative log-likelihood of the assistant tokens.

    Token t is predicted from positions < t, so hidden state t scores token t+1; the loss
    mask of the *target* token decides whether it counts.
    """
    hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    logp = token_logprobs(hidden[:, :-1], model.lm_head.weight, batch.input_ids[:, 1:])
    return -masked_mean(logp, batch.action_mask)


@torch.no_grad()
def sample_and_score(model, tokenizer, prompts: list[list[dict]], n: int, max_new_tokens: int,
                     temperature: float, seed: int) -> dict:
    """Samples `n` replies per prompt with HF generate; the simulated labeler scores each."""
    torch.manual_seed(seed)
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    out = model.generate(**enc, do_sample=True, temperature=temperature, top_p=1.0,
                         max_new_tokens=max_new_tokens, num_return_sequences=n)
    replies = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    scores, correct, polite, lengths = [], [], [], []
    for i, reply in enumerate(replies):
        prompt = prompts[i // n]
        scores.append(arithmetic.score_reply(prompt, reply))
        correct.append(arithmetic.is_correct(prompt, reply))
        polite.append(arithmetic.is_polite(reply))
        lengths.append(len(tokenizer(reply)["input_ids"]))
    return {"labeler_score": sum(scores) / len(scores), "correct": sum(correct) / len(correct),
            "polite": sum(polite) / len(polite), "response_length": sum(lengths) / len(lengths),
            "example": f"{prompts[0][-1]['content']} -> {replies[0]!r}"}


def run_quickstart(cfg: ExperimentConfig, out_dir: str | Path, max_steps: int | None = None) -> dict:
    if cfg.model.policy != "tiny":
        raise BadInput(f"model.policy: the quickstart builds its own model and needs 'tiny', got {cfg.model.policy!r}")
    if cfg.data.task != "arithmetic":
        raise BadInput(f"data.task: the quickstart runs the built-in 'arithmetic' task, got {cfg.data.task!r}")
    if max_steps is not None and max_steps < 1:
        raise BadInput(f"--max-steps must be >= 1, got {max_steps}")
    out = prepare_run_dir(out_dir, cfg)
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)

    # 1. Demonstrations and a tiny model whose tokenizer is trained on them.
    train = arithmetic.make_dialogues(cfg.data.task_size, seed=cfg.seed)
    held_out = [d[:-1] for d in arithmetic.make_dialogues(HELD_OUT_PROMPTS, seed=cfg.seed + 10_000)]
    model_dir = out / "init_model"
    if not is_complete_model_dir(model_dir):
        spec = TinyModelSpec(**cfg.model.tiny.model_dump())
        build_tiny_from_corpus([_render(d) for d in train], model_dir, spec=spec, seed=cfg.seed, overwrite=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    sample = dict(n=cfg.rollout.n_samples, max_new_tokens=cfg.rollout.max_new_tokens,
                  temperature=cfg.rollout.temperature, seed=cfg.seed)

    # 2. What the untrained model says, as the labeler sees it.
    model.eval()
    before = sample_and_score(model, tokenizer, held_out, **sample)

    # 3. Supervised warm-up on assistant tokens only.
    rows = _encode(tokenizer, train, cfg.model.tiny.max_position_embeddings)
    steps_per_epoch = math.ceil(len(rows) / cfg.sft.batch_size)
    total = min(max_steps or steps_per_epoch * cfg.sft.epochs, steps_per_epoch * cfg.sft.epochs)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / total)
    rng = random.Random(cfg.seed)
    model.train()
    with MetricsLog(out / "metrics.jsonl") as log:
        order: list[int] = []
        for step in range(1, total + 1):
            if not order:
                order = list(range(len(rows)))
                rng.shuffle(order)
            batch = [rows[order.pop()] for _ in range(min(cfg.sft.batch_size, len(order)))]
            tick = time.perf_counter()
            loss = sft_loss(model, dialogue_batch(batch, tokenizer.pad_token_id))
            opt.zero_grad()
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            log.log({"step": step, "sft/loss": loss.item(), "sft/grad_norm": grad_norm.item(),
                     "sft/lr": sched.get_last_lr()[0], "timing/step_s": time.perf_counter() - tick})

        # 4. The warmed-up model, scored the same way; saved for `rlhf chat` and later stages.
        model.eval()
        after = sample_and_score(model, tokenizer, held_out, **sample)
        log.log({"step": total, **{f"eval/{k}_before": v for k, v in before.items() if k != "example"},
                 **{f"eval/{k}_after": v for k, v in after.items() if k != "example"}})
    policy_dir, tmp = out / "policy", out / ".policy.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(policy_dir, ignore_errors=True)
    tmp.rename(policy_dir)

    elapsed = time.perf_counter() - started
    print(f"example after warm-up: {after['example']}")
    print(f"quickstart done: {total} SFT steps in {elapsed:.0f}s; labeler score {before['labeler_score']:.2f} -> "
          f"{after['labeler_score']:.2f}, correct {before['correct']:.0%} -> {after['correct']:.0%}, "
          f"polite {before['polite']:.0%} -> {after['polite']:.0%}; policy in {policy_dir}")
    return {"before": before, "after": after, "steps": total, "policy_dir": policy_dir}
