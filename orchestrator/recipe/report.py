"""Per-round report of the pipeline: what PPO did, and whether the policy got better.

    paths = write_round_report(Path("runs/x/round_1"), round=1, ppo_rows=rows, eval=summary)
    # -> report.md (tables), report.png (4 panels over steps), eval.json (the summary)

`evaluate_policies` produces the summary's policy part: both policies (final and SFT)
answer the same held-out prompts with transformers' `generate` (batched, left-padded),
and the task's labeler scores every reply. Runs on CPU for tiny models; on a cluster, run it
on the driver or any node that sees both folders (it uses the first GPU if there is one).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from rlhf.orchestrator.run.rundir import write_atomic

# Keys a round's eval summary must hold (values may be None when a stage was skipped).
EVAL_KEYS = ("rm_pairwise_accuracy", "labeler_score/sft", "labeler_score/final", "win_rate_vs_sft")
# Per-step columns of the PPO table, in order; the labeler column is added when present.
STEP_KEYS = ("reward/mean", "kl/mean", "response_length/mean")
# Where a row may hold the labeler's score, in order of preference.
LABELER_KEYS = ("eval/labeler_score",)



# --------------------------------------------------------------------------- report files


def write_round_report(out_dir: Path, round: int, ppo_rows: list[dict], eval: dict) -> dict[str, Path]:
    """Writes report.md, report.png and eval.json into `out_dir`; returns {name: path}.

    `ppo_rows` are the round's metrics.jsonl rows (flat dicts with `step`); `eval` holds at
    least EVAL_KEYS. Raises ValueError naming the missing eval keys.
    """
    missing = [k for k in EVAL_KEYS if k not in eval]
    if missing:
        raise ValueError(f"round {round} eval summary lacks {missing}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    series = step_series(ppo_rows)
    paths = {"eval": out_dir / "eval.json", "markdown": out_dir / "report.md", "plot": out_dir / "report.png"}
    write_atomic(paths["eval"], json.dumps({"round": round, **{k: _json_value(v) for k, v in eval.items()}},
                                           indent=2) + "\n")
    write_atomic(paths["markdown"], _markdown(round, series, eval))
    _plot(paths["plot"], round, series)
    return paths


def step_series(rows: list[dict]) -> dict[str, list]:
    """Columns over steps: `step`, STEP_KEYS and `labeler` (None where a row lacks a value)."""
    labeler_key = next((k for k in LABELER_KEYS if any(_finite(r.get(k)) is not None for r in rows)), None)
    series: dict[str, list] = {"step": [r.get("step", i + 1) for i, r in enumerate(rows)]}
    for key in STEP_KEYS:
        series[key] = [_finite(r.get(key)) for r in rows]
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
    head = ["step", *STEP_KEYS] + ([labeler_key] if labeler_key else [])
    lines = [f"# Round {round}", "", "## Evaluation", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v if isinstance(v, (bool, str)) else _fmt(_finite(v))} |" for k, v in eval.items()]
    lines += ["", "win_rate_vs_sft: share of held-out prompts where the round's policy's judge score beats "
              "the SFT policy's (ties count one half). The round's policy is the PPO step with the best judge "
              "score on a fixed held-out sample (`selected_step`; 0 = the policy the round started from).", "", f"## PPO steps ({len(series['step'])})", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, step in enumerate(series["step"]):
        cells = [str(step)] + [_fmt(series[k][i]) for k in STEP_KEYS]
        cells += [_fmt(series["labeler"][i])] if labeler_key else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(path: Path, round: int, series: dict) -> None:
    """Four panels over steps and two over-optimisation panels (the judge's score against the
    RM's reward and against the KL: Gao et al. 2022's curves, where a rising proxy and a falling
    true score show reward hacking); a Figure with the Agg canvas, so no global pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 7), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(2, 3).flat)
    panels = [("reward/mean", "RM reward"), ("kl/mean", "KL to SFT"), ("response_length/mean", "response length"),
              ("labeler", f"judge score ({series['labeler_key'] or 'none logged'})")]
    for ax, (key, title) in zip(axes[:4], panels):
        _line(ax, series["step"], series[key], title, "PPO step")
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
                      batch_size: int = 32) -> dict[str, float]:
    """Judge scores of the final and SFT policies on `prompts`, and the final's win rate.

    Each policy samples `n_samples` replies per prompt (same seed for both, so two identical
    models give identical replies); a prompt's score is the mean over its replies.
      labeler_score/{sft,final}: mean over prompts of the prompt's score
      win_rate_vs_sft = mean over prompts of 1[final > sft] + 0.5 * 1[final == sft]
    `judge` has `score(messages, reply) -> float`. `temperature` 0 means greedy decoding.
    """
    if not prompts:
        raise ValueError("evaluate_policies needs at least one prompt")
    final, sft = (prompt_scores(folder, prompts, judge, n_samples, max_new_tokens, temperature, seed, batch_size)
                  for folder in (final_dir, sft_dir))
    return {"labeler_score/sft": sum(sft) / len(sft), "labeler_score/final": sum(final) / len(final),
            "win_rate_vs_sft": win_rate(final, sft), "eval/prompts": float(len(prompts))}


def prompt_scores(model_dir: str | Path, prompts: list[list[dict]], judge, samples: int, max_new_tokens: int,
                  temperature: float, seed: int, batch_size: int = 32) -> list[float]:
    """Per prompt, the mean judge score of the model's `samples` replies to it (a judge with a
    batch `scores(messages, replies)`, e.g. a reward model, scores one prompt's replies at once)."""
    replies = generate_replies(model_dir, prompts, samples, max_new_tokens, temperature, seed, batch_size)
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


@torch.no_grad()
def generate_replies(model_dir: str | Path, prompts: list[list[dict]], n_samples: int = 1, max_new_tokens: int = 64,
                     temperature: float = 1.0, seed: int = 0, batch_size: int = 32) -> list[str]:
    """Replies (n_samples per prompt, consecutive) of the model in `model_dir`, batched, left-padded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.orchestrator.models.chat import generation_stop_ids

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"  # generation appends on the right: pad on the left
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if torch.cuda.is_available():
        model = model.to("cuda")
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
             for p in prompts for _ in range(n_samples)]
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    stop_ids = generation_stop_ids(model, tokenizer)
    replies: list[str] = []
    with torch.random.fork_rng(devices=[]):  # seeded sampling without touching the caller's RNG
        torch.manual_seed(seed)
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start: start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(model.device)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
                                 pad_token_id=tokenizer.pad_token_id, **sampling)
            replies += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return [r.strip() for r in replies]
