"""Per-round report of the pipeline: what PPO did, and whether the policy got better.

    paths = write_round_report(Path("runs/x/round_1"), round=1, ppo_rows=rows, eval=summary)
    # -> report.md (tables), report.png (4 panels over steps), eval.json (the summary)

`evaluate_policies` produces the summary's policy part: the final, SFT and starting policies
answer the same held-out prompts with transformers' `generate` (batched, left-padded), the
judge scores every reply, the SFT model scores the final policy's replies (its KL to SFT), and
distinct-2 of each policy's replies shows a collapse. Runs on CPU for tiny models; on a
cluster, run it on the driver or any node that sees the folders (it uses the first GPU if
there is one). One model is in memory at a time.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from rlhf.orchestrator.run.rundir import write_atomic

# Keys a round's eval summary must hold (values may be None when a stage was skipped).
EVAL_KEYS = ("rm_pairwise_accuracy", "labeler_score/sft", "labeler_score/final", "win_rate_vs_sft",
             "win_rate_vs_start", "kl_to_sft/final")
# Per-step columns of the PPO table, in order; the labeler column is added when present.
STEP_KEYS = ("reward/mean", "kl/mean", "response_length/mean")
# The step columns of each pipeline.method's table and first three panels.
METHOD_KEYS = {"ppo": STEP_KEYS, "dpo": ("dpo/loss", "dpo/margin", "dpo/accuracy"),
               "best_of_n": ("sft/loss", "sft/lr", "sft/grad_norm")}
# Where a row may hold the labeler's score, in order of preference.
LABELER_KEYS = ("eval/labeler_score",)



# --------------------------------------------------------------------------- report files


def write_round_report(out_dir: Path, round: int, ppo_rows: list[dict], eval: dict,
                       samples: list[dict] | None = None, method: str = "ppo") -> dict[str, Path]:
    """Writes report.md, report.png and eval.json into `out_dir`; returns {name: path}.

    `ppo_rows` are the round's metrics.jsonl rows (flat dicts with `step`); `eval` holds at
    least EVAL_KEYS. `samples` (evaluate_policies' "samples") are shown in report.md and kept
    in eval.json. Raises ValueError naming the missing eval keys.
    """
    missing = [k for k in EVAL_KEYS if k not in eval]
    if missing:
        raise ValueError(f"round {round} eval summary lacks {missing}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    series = step_series(ppo_rows, METHOD_KEYS[method])
    series["method"] = method
    paths = {"eval": out_dir / "eval.json", "markdown": out_dir / "report.md", "plot": out_dir / "report.png"}
    figures = {"round": round, **{k: _json_value(v) for k, v in eval.items()}}
    write_atomic(paths["eval"], json.dumps({**figures, **({"samples": samples} if samples else {})}, indent=2) + "\n")
    write_atomic(paths["markdown"], _markdown(round, series, eval) + _samples_markdown(samples or []))
    _plot(paths["plot"], round, series)
    return paths


def step_series(rows: list[dict], keys: tuple[str, ...] = STEP_KEYS) -> dict[str, list]:
    """Columns over steps: `step`, `keys` and `labeler` (None where a row lacks a value)."""
    labeler_key = next((k for k in LABELER_KEYS if any(_finite(r.get(k)) is not None for r in rows)), None)
    series: dict[str, list] = {"step": [r.get("step", i + 1) for i, r in enumerate(rows)]}
    for key in keys:
        series[key] = [_finite(r.get(key)) for r in rows]
    series["keys"] = keys
    series["labeler"] = [_finite(r.get(labeler_key)) for r in rows] if labeler_key else [None] * len(rows)
    series["labeler_key"] = labeler_key
    return series


def _finite(value):
    """A float, or None for missing / non-numeric / NaN / inf (JSON has no NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _json_value(value):
    """Flags, names and counts as they are; other numbers finite or None (JSON has no NaN)."""
    if value is None or isinstance(value, (bool, str)) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    return _finite(value)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _markdown(round: int, series: dict, eval: dict) -> str:
    labeler_key = series["labeler_key"]
    keys, method = series["keys"], series.get("method", "ppo")
    head = ["step", *keys] + ([labeler_key] if labeler_key else [])
    lines = [f"# Round {round}", "", "## Evaluation", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v if isinstance(v, (bool, str)) else _fmt(_finite(v))} |" for k, v in eval.items()]
    lines += ["", "win_rate_vs_sft (vs_start): share of held-out prompts where the round's policy's judge score "
              "beats the SFT policy's (the starting model's, before SFT); ties count one half. The round's policy "
              "is the PPO step with the best judge score on a fixed held-out sample (`selected_step`; 0 = the "
              "policy the round started from). kl_to_sft/final: mean over its held-out replies of "
              "log pi(reply) - log pi_SFT(reply), nats per reply. distinct2: unique word bigrams / all bigrams "
              "of a policy's replies (falls when replies collapse to a few).", "",
              f"## {method.upper() if method != 'best_of_n' else 'Best-of-N SFT'} steps ({len(series['step'])})", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, step in enumerate(series["step"]):
        cells = [str(step)] + [_fmt(series[k][i]) for k in keys]
        cells += [_fmt(series["labeler"][i])] if labeler_key else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _samples_markdown(samples: list[dict]) -> str:
    """A table per held-out prompt: each policy's first reply, side by side in rows."""
    cell = lambda text: " ".join(str(text).split()).replace("|", "\\|") or "(empty)"  # noqa: E731
    lines = ["", f"## Sample replies ({len(samples)} held-out prompts, first sample of each policy)"] if samples else []
    for i, sample in enumerate(samples, 1):
        lines += ["", f"**Prompt {i}:** {cell(sample['prompt'])}", "", "| policy | reply |", "|---|---|"]
        lines += [f"| {name} | {cell(sample[name])} |" for name in ("start", "sft", "final") if name in sample]
    return "\n".join(lines) + ("\n" if lines else "")


def _plot(path: Path, round: int, series: dict) -> None:
    """Four panels over steps and two over-optimisation panels (the judge's score against the
    RM's reward and against the KL: Gao et al. 2022's curves, where a rising proxy and a falling
    true score show reward hacking); a Figure with the Agg canvas, so no global pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 7), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(2, 3).flat)
    titles = {"reward/mean": "RM reward", "kl/mean": "KL to SFT", "response_length/mean": "response length"}
    panels = [(k, titles.get(k, k)) for k in series["keys"]] + [
        ("labeler", f"judge score ({series['labeler_key'] or 'none logged'})")]
    for ax, (key, title) in zip(axes[:4], panels):
        _line(ax, series["step"], series[key], title, f"{series.get('method', 'ppo')} step")
    for key in ("reward/mean", "kl/mean"):  # the over-optimisation panels read PPO's columns
        series.setdefault(key, [None] * len(series["step"]))
    for ax, (key, label) in zip(axes[4:], (("reward/mean", "RM reward (same step)"), ("kl/mean", "KL to SFT (same step)"))):
        points = [(x, y, s) for x, y, s in zip(series[key], series["labeler"], series["step"])
                  if x is not None and y is not None]
        _line(ax, [p[0] for p in points], [p[1] for p in points], f"over-optimisation: judge vs {label.split(' (')[0]}",
              label, annotate=[p[2] for p in points])
        ax.set_ylabel("judge score")
    fig.suptitle(f"Round {round}")
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(path)


def _line(ax, xs: list, ys: list, title: str, xlabel: str, annotate: list | None = None) -> None:
    points = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
    if points:
        ax.plot(*zip(*points), marker="." if len(points) < 50 else None)
        for (x, y), label in zip(points, annotate or []):
            ax.annotate(str(label), (x, y), fontsize=7, alpha=0.7)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)


# --------------------------------------------------------------------------- evaluation


def evaluate_policies(final_dir: str | Path, sft_dir: str | Path, prompts: list[list[dict]], judge,
                      n_samples: int = 1, max_new_tokens: int = 64, temperature: float = 1.0, seed: int = 0,
                      batch_size: int = 32, start_dir: str | Path | None = None, n_examples: int = 3,
                      detail: bool = False, tools: dict | None = None) -> dict:
    """Judge scores of the final, SFT and (with `start_dir`) starting policies on `prompts`.

    Each policy samples `n_samples` replies per prompt (same seed for all, so two identical
    models give identical replies); a prompt's score is the mean over its replies.
      labeler_score/{start,sft,final}: mean over prompts of the prompt's score
      win_rate_vs_{sft,start} = mean over prompts of 1[final > other] + 0.5 * 1[final == other]
      kl_to_sft/final = mean over final's replies y of log pi_final(y) - log pi_sft(y)  (k1, nats
          per reply, log-probs of softmax(logits / temperature) as in PPO's kl/mean)
      distinct2/{start,sft,final}: `distinct_n(replies, 2)`
      samples: the first `n_examples` prompts with each policy's first reply (for the report)
      detail (only with detail=True): {"prompt_scores": {policy: [per prompt]}, "replies":
          {policy: [n_samples per prompt, in prompt order]}}
    `judge` has `score(messages, reply) -> float`. `temperature` 0 means greedy decoding.
    `tools` (launch.tool_spec(cfg)): replies are sampled through the tool loop (rollout.tools, e.g.
    search), as in the rollouts, and the KL counts only the policy's own tokens, not inserted ones.
    """
    if not prompts:
        raise ValueError("evaluate_policies needs at least one prompt")
    folders = {"final": final_dir, "sft": sft_dir, **({"start": start_dir} if start_dir is not None else {})}
    scale = temperature if temperature > 0 else 1.0
    replies, scores, logp = {}, {}, {}
    for name, folder in folders.items():  # final first: the SFT model then scores its replies
        model, tokenizer = _load_policy(folder)
        if tools:
            prompt_ids, reply_ids, replies[name], masks = _sample_with_tools(folder, prompts, n_samples,
                                                                             max_new_tokens, temperature, seed, tools)
        else:
            prompt_ids, reply_ids, replies[name] = _sample(model, tokenizer, prompts, n_samples, max_new_tokens,
                                                           temperature, seed, batch_size)
            masks = None
        scores[name] = _prompt_means(judge, prompts, replies[name], n_samples)
        if name == "final":
            final_ids, final_masks = (prompt_ids, reply_ids), masks
        if name in ("final", "sft"):
            logp[name] = sequence_logprobs(model, *final_ids, scale, pad_id=tokenizer.pad_token_id or 0,
                                           masks=final_masks)
        del model
    out = {f"labeler_score/{name}": sum(v) / len(v) for name, v in scores.items()}
    out["win_rate_vs_sft"] = win_rate(scores["final"], scores["sft"])
    if "start" in scores:
        out["win_rate_vs_start"] = win_rate(scores["final"], scores["start"])
    out["kl_to_sft/final"] = sum(f - s for f, s in zip(logp["final"], logp["sft"])) / len(logp["final"])
    out.update({f"distinct2/{name}": distinct_n(texts, 2) for name, texts in replies.items()})
    out["eval/prompts"] = float(len(prompts))
    out["samples"] = [{"prompt": _conversation(prompts[i]), **{name: texts[i * n_samples] for name, texts in
                                                                 sorted(replies.items(), key=_policy_order)}}
                      for i in range(min(n_examples, len(prompts)))]
    if detail:
        out["detail"] = {"prompt_scores": scores, "replies": replies}
    return out


def _conversation(messages: list[dict]) -> str:
    """The prompt as the report shows it: the user's text, or every turn of a longer conversation."""
    if len(messages) == 1:
        return messages[0]["content"]
    return " / ".join(f"{m['role']}: {m['content']}" for m in messages)


def _policy_order(item) -> int:
    return ("start", "sft", "final").index(item[0])


def distinct_n(replies: list[str], n: int = 2) -> float:
    """Distinct-n (Li et al., 2016) of a set of replies: unique n-grams / all n-grams, over
    whitespace-separated words, each n-gram within one reply. 0.0 when there is no n-gram at
    all (every reply shorter than n words). A policy collapsed onto one reply scores ~1/N."""
    grams = [tuple(words[i:i + n]) for reply in replies for words in [reply.split()]
             for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def prompt_scores(model_dir: str | Path, prompts: list[list[dict]], judge, samples: int, max_new_tokens: int,
                  temperature: float, seed: int, batch_size: int = 32) -> list[float]:
    """Per prompt, the mean judge score of the model's `samples` replies to it (a judge with a
    batch `scores(messages, replies)`, e.g. a reward model, scores one prompt's replies at once)."""
    replies = generate_replies(model_dir, prompts, samples, max_new_tokens, temperature, seed, batch_size)
    return _prompt_means(judge, prompts, replies, samples)


def _prompt_means(judge, prompts: list[list[dict]], replies: list[str], samples: int) -> list[float]:
    batch = getattr(judge, "scores", None)
    out = []
    for i, messages in enumerate(prompts):
        mine = replies[i * samples:(i + 1) * samples]
        scores = batch(messages, mine) if batch else [judge.score(messages, reply) for reply in mine]
        out.append(sum(float(s) for s in scores) / len(scores))
    return out


def win_rate(final: list[float], sft: list[float]) -> float:
    """Mean over prompts of 1[final > sft] + 0.5 * 1[final == sft] (per-prompt scores)."""
    if len(final) != len(sft) or not final:
        raise ValueError(f"need equally many (>0) scores, got {len(final)} and {len(sft)}")
    return sum(1.0 if f > s else 0.5 if f == s else 0.0 for f, s in zip(final, sft)) / len(final)


def _load_policy(model_dir: str | Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"  # generation appends on the right: pad on the left
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return (model.to("cuda") if torch.cuda.is_available() else model), tokenizer


def generate_replies(model_dir: str | Path, prompts: list[list[dict]], n_samples: int = 1, max_new_tokens: int = 64,
                     temperature: float = 1.0, seed: int = 0, batch_size: int = 32) -> list[str]:
    """Replies (n_samples per prompt, consecutive) of the model in `model_dir`, batched, left-padded."""
    model, tokenizer = _load_policy(model_dir)
    return _sample(model, tokenizer, prompts, n_samples, max_new_tokens, temperature, seed, batch_size)[2]


@torch.no_grad()
def _sample(model, tokenizer, prompts: list[list[dict]], n_samples: int, max_new_tokens: int, temperature: float,
            seed: int, batch_size: int) -> tuple[list[list[int]], list[list[int]], list[str]]:
    """(prompt ids, reply ids up to and including the stop token, reply texts), each [P * n_samples]."""
    from rlhf.orchestrator.models.chat import generation_stop_ids

    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
             for p in prompts for _ in range(n_samples)]
    # Plain sampling at `temperature`, as the rollout engines do: transformers would otherwise add
    # its default top-k of 50 (and a model's generation config its own top-k/top-p).
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 \
        else {"do_sample": False}
    stop_ids = generation_stop_ids(model, tokenizer)
    prompt_ids, reply_ids = [], []
    with torch.random.fork_rng(devices=[]):  # seeded sampling without touching the caller's RNG
        torch.manual_seed(seed)
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start: start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(model.device)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
                                 pad_token_id=tokenizer.pad_token_id, **sampling)
            width = batch["input_ids"].shape[1]
            for row, attn, new in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(),
                                      out[:, width:].tolist()):
                prompt_ids.append([t for t, a in zip(row, attn) if a])
                stop = next((k for k, t in enumerate(new) if t in stop_ids), None)
                reply_ids.append(new if stop is None else new[: stop + 1])  # the rest is padding
    replies = tokenizer.batch_decode(reply_ids, skip_special_tokens=True)
    return prompt_ids, reply_ids, [r.strip() for r in replies]


@torch.no_grad()
def sequence_logprobs(model, prompt_ids: list[list[int]], reply_ids: list[list[int]], temperature: float = 1.0,
                      pad_id: int = 0, batch_size: int = 8, masks: list[list[int]] | None = None) -> list[float]:
    """Per sequence, sum_t log softmax(logits / temperature)[reply token t] given the prompt and
    the reply's earlier tokens (teacher-forced, right-padded) -> [N] floats; 0.0 for an empty reply.
    `masks`: per reply one 0/1 per token (Samples.response_mask); only the 1s count (the policy's
    tokens, not those a tool inserted). An empty mask counts every token."""
    from rlhf.orchestrator.models.scoring import pad_right

    out = []
    for start in range(0, len(prompt_ids), batch_size):
        seqs = [p + r for p, r in zip(prompt_ids[start:start + batch_size], reply_ids[start:start + batch_size])]
        ids, attn = (t.to(model.device) for t in pad_right(seqs, pad_id))
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float() / temperature
        token_logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # [B, T-1]
        for k, (p, r) in enumerate(zip(prompt_ids[start:start + batch_size], reply_ids[start:start + batch_size])):
            # Token j of the sequence is predicted at position j - 1.
            row = token_logp[k, len(p) - 1: len(p) - 1 + len(r)]
            mask = masks[start + k] if masks is not None else None
            if mask:
                row = row * torch.tensor(mask, dtype=row.dtype, device=row.device)
            out.append(float(row.sum()))
    return out


def _sample_with_tools(folder: str | Path, prompts: list[list[dict]], n_samples: int, max_new_tokens: int,
                       temperature: float, seed: int, tools: dict):
    """`_sample` through the tool loop: an in-process HF engine with `tools`; returns (prompt ids,
    reply ids with inserted tokens, reply texts, response masks), each [P * n_samples]."""
    from rlhf.actors.rollout_hf import HFRolloutEngine

    longest = max_new_tokens + tools["token_budget"] + 1024  # prompts are checked against max_model_len
    engine = HFRolloutEngine(str(folder), dtype="float32", max_model_len=longest, tools=tools)
    tok = engine.tokenizer
    ids = [list(tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
           for p in prompts]
    out = engine.generate(ids, list(range(len(ids))), n=n_samples, temperature=temperature if temperature > 0 else 1e-4,
                          max_new_tokens=max_new_tokens, seed=seed)
    texts = [r.strip() for r in tok.batch_decode(out.response_ids, skip_special_tokens=True)]
    masks = out.response_mask or [[] for _ in out.response_ids]
    return out.prompt_ids, out.response_ids, texts, masks
