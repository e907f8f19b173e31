"""`rlhf compare CONFIG --methods ppo,dpo,best_of_n`: which method wins, for how much compute.

    SFT once; collect one round of comparisons on the SFT model (K replies per prompt,
    ranked by the labeler); train one reward model on them (when ppo or best_of_n runs)
    for each method, from the same SFT model (recipe/pipeline.py improve_policy):
        ppo        PPO against that reward model, KL to SFT
        dpo        DPO (dpo.loss) on those comparisons, SFT as the reference
        best_of_n  best_of_n.n replies per prompt, the reward model keeps the best, SFT on them
    evaluate each against SFT on the held-out prompts with the judge

The budget is matched and printed with the table:
- every method sees the same comparisons (the reward model of ppo and best_of_n is trained
  on them once, so it costs them nothing extra);
- ppo and best_of_n draw the same number of samples scored by that reward model:
  best_of_n takes ppo.steps x ppo.prompts_per_step prompts with rollout.n_samples replies each;
- dpo takes as many optimizer steps as PPO's policy does at most (ppo.steps x ppo.epochs x
  samples per step / ppo.train_batch_size), unless dpo.max_steps is set.
Wall time is each method's own training (the shared SFT, collection and reward model are
apart). "policy updates" are the optimizer steps in the policy each method hands on: for
PPO the selected step's (pipeline.select best keeps the best judged step, and
pipeline.patience may stop it early).

Output: OUT/compare.md (the table), OUT/compare.png (win rate vs SFT with its 95 % interval,
KL to SFT, reward-model score, reply length, wall time), OUT/compare.json, and each method's
folder OUT/<method>/. Finished parts are recorded in OUT/compare_state.json; `--resume` skips them.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from rlhf.orchestrator.config import ExperimentConfig
from rlhf.orchestrator.errors import BadInput
from rlhf.orchestrator.recipe.pipeline import (PipelineState, collect_round, improve_policy, judge_plan_for,
                                               load_inputs, ppo_stage_config)

METHODS = ("ppo", "dpo", "best_of_n")
STATE_FILE = "compare_state.json"
NEEDS_RM = ("ppo", "best_of_n")


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise BadInput(f"--methods: unknown method(s) {unknown or [text]}; choose from {', '.join(METHODS)}")
    return list(dict.fromkeys(methods))


def _updates_per_step(cfg: ExperimentConfig) -> int:
    ppo = cfg.ppo
    return ppo.epochs * (ppo.prompts_per_step * cfg.rollout.n_samples // ppo.train_batch_size)


def policy_updates(cfg: ExperimentConfig) -> int:
    """Optimizer steps PPO's policy takes in ppo.steps steps (no early stop)."""
    return cfg.ppo.steps * _updates_per_step(cfg)


def matched_config(cfg: ExperimentConfig, method: str) -> ExperimentConfig:
    """`cfg` with the method's budget matched to PPO's (module docstring)."""
    if method == "best_of_n":
        bon = cfg.best_of_n.model_copy(update={"prompts": cfg.ppo.steps * cfg.ppo.prompts_per_step,
                                               "n": cfg.rollout.n_samples})
        return cfg.model_copy(update={"best_of_n": bon})
    if method == "dpo" and cfg.dpo.max_steps is None:
        return cfg.model_copy(update={"dpo": cfg.dpo.model_copy(update={"max_steps": policy_updates(cfg)})})
    return cfg


def run_compare(cfg: ExperimentConfig, methods: list[str], out_dir: str | Path, address: str | None = None,
                resume: bool = False, max_steps: int | None = None) -> dict:
    from transformers import AutoTokenizer

    from rlhf.orchestrator.ppo.launch import check_all_lora_targets, resolve_policy, start_ray
    from rlhf.orchestrator.ppo.placement import plan_resources
    from rlhf.orchestrator.recipe.comparisons import ComparisonStore
    from rlhf.orchestrator.recipe.rm import run_rm
    from rlhf.orchestrator.recipe.sft import run_sft
    from rlhf.orchestrator.run.lock import lock_run_dir
    from rlhf.orchestrator.run.rundir import prepare_run_dir

    plan_resources(cfg)
    inputs = load_inputs(cfg)
    if inputs.labeler is None:
        raise BadInput("labeler.kind: rlhf compare needs a labeler that ranks now; human rankings wait for people "
                       "(rank them, then train with rlhf pipeline --resume)")
    check_all_lora_targets(cfg, Path(out_dir))
    out = Path(out_dir)
    lock_run_dir(out)
    if (out / STATE_FILE).is_file() and not resume:
        raise BadInput(f"output folder {out} holds a comparison run; pass --resume to continue it or choose another --out")
    out = prepare_run_dir(out, cfg)
    state = PipelineState.load(out / STATE_FILE)
    start_ray(address, int(plan_resources(ppo_stage_config(cfg, "policy", "reward-model")).total("CPU")), out)
    base = resolve_policy(cfg, out, inputs.sft + inputs.prompts)
    if not state.done("sft"):
        result = run_sft(cfg, base, out / "sft", max_steps=max_steps)
        state.mark("sft", checkpoint=result.checkpoint, steps=result.steps)
    sft = state.stages["sft"]["checkpoint"]
    tokenizer = AutoTokenizer.from_pretrained(sft)
    with ComparisonStore(out / "comparisons.sqlite") as store:
        if not state.done("comparisons"):
            store.delete_round(1)
            state.mark("comparisons", count=collect_round(cfg, 1, sft, inputs.prompts, store, inputs.labeler,
                                                          tokenizer))
        comparisons = store.load()
    rm = None
    if any(m in NEEDS_RM for m in methods):
        if not state.done("rm"):
            result = run_rm(cfg, sft, comparisons, None, sft, out / "rm", max_steps=max_steps)
            state.mark("rm", checkpoint=result.checkpoint, accuracy=result.heldout_accuracy)
        rm = state.stages["rm"]["checkpoint"]
    judge_plan = judge_plan_for(cfg, inputs, tokenizer)
    for method in methods:
        if not state.done(f"{method}/train"):
            started = time.perf_counter()
            trained = improve_policy(matched_config(cfg, method).model_copy(
                update={"pipeline": cfg.pipeline.model_copy(update={"method": method})}), 1, out, sft, sft, rm,
                comparisons, inputs.prompts, judge_plan, resume, max_steps)
            state.mark(f"{method}/train", **trained, seconds=time.perf_counter() - started)
    rows = [_baseline_or_method(cfg, state, m, sft, rm, inputs) for m in ["sft", *methods]]
    report = {"methods": rows, "comparisons": state.stages["comparisons"]["count"], "policy_updates/ppo_max":
              policy_updates(cfg), "rm_heldout_accuracy": state.stages.get("rm", {}).get("accuracy"),
              "eval_prompts": len(inputs.eval_prompts), "eval_samples": cfg.pipeline.eval_samples}
    write_report(out, report)
    print(format_table(report))
    print(f"compare done: report in {out / 'compare.md'} and {out / 'compare.png'}")
    return report


def _baseline_or_method(cfg: ExperimentConfig, state: PipelineState, method: str, sft: str, rm: str | None,
                        inputs) -> dict:
    """One table row: the method's policy against SFT on the held-out prompts (cached in the state)."""
    from rlhf.orchestrator.recipe.evaluate import win_rate_ci
    from rlhf.orchestrator.recipe.report import evaluate_policies

    key = f"{method}/eval"
    if not state.done(key):
        policy = sft if method == "sft" else state.stages[f"{method}/train"]["checkpoint"]
        ev = evaluate_policies(policy, sft, inputs.eval_prompts, inputs.judge, n_samples=cfg.pipeline.eval_samples,
                               max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                               seed=cfg.seed, detail=True)
        scores, replies = ev["detail"]["prompt_scores"], ev["detail"]["replies"]["final"]
        ci = win_rate_ci(scores["final"], scores["sft"])
        train = state.stages.get(f"{method}/train", {})
        state.mark(key, method=method, win_rate_vs_sft=ci["win_rate"], ci_low=ci["ci_low"], ci_high=ci["ci_high"],
                   judge_score=ev["labeler_score/final"], kl_to_sft=ev["kl_to_sft/final"],
                   rm_score=_rm_score(rm, inputs.eval_prompts, replies, cfg.pipeline.eval_samples),
                   length_words=sum(len(r.split()) for r in replies) / len(replies),
                   updates=train.get("selected_step", 0) * (_updates_per_step(cfg) if method == "ppo" else 1),
                   seconds=train.get("seconds", 0.0))
    return state.stages[key]


def _rm_score(rm: str | None, prompts: list[list[dict]], replies: list[str], samples: int) -> float | None:
    """Mean reward-model score of the replies (None when no reward model was trained)."""
    if rm is None:
        return None
    from rlhf.orchestrator.data.labelers import RewardModelLabeler

    scorer = RewardModelLabeler(rm, key="compare reward model")
    scores = [s for i, p in enumerate(prompts) for s in scorer.scores(p, replies[i * samples:(i + 1) * samples])]
    return sum(scores) / len(scores)


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_table(report: dict) -> str:
    head = ("| method | win rate vs SFT (95 % CI) | judge score | KL to SFT | RM score | length (words) | "
            "policy updates | wall time |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n")
    lines = [f"| {r['method']} | {r['win_rate_vs_sft']:.0%} ({r['ci_low']:.0%}-{r['ci_high']:.0%}) | "
             f"{r['judge_score']:.2f} | {r['kl_to_sft']:.2f} | {_fmt(r['rm_score'], '.2f')} | "
             f"{r['length_words']:.1f} | {r['updates']} | {r['seconds']:.0f} s |" for r in report["methods"]]
    return head + "\n".join(lines) + "\n"


def write_report(out: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlhf.orchestrator.run.rundir import write_atomic

    rows = report["methods"]
    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 5, figsize=(17, 3.4))
    win = [r["win_rate_vs_sft"] for r in rows]
    axes[0].bar(names, win, yerr=[[w - r["ci_low"] for w, r in zip(win, rows)],
                                  [r["ci_high"] - w for w, r in zip(win, rows)]], capsize=4, color="#2f5fd0")
    axes[0].axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    axes[0].set_ylim(0, 1)
    axes[0].set_title("win rate vs SFT (95 % CI)")
    for ax, key, title in zip(axes[1:], ("kl_to_sft", "rm_score", "length_words", "seconds"),
                              ("KL to SFT (nats/reply)", "reward-model score", "reply length (words)",
                               "training wall time (s)")):
        ax.bar(names, [r[key] or 0.0 for r in rows], color="#6b8ee8")
        ax.set_title(title)
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(out / "compare.png.tmp.png", dpi=110)
    plt.close(fig)
    (out / "compare.png.tmp.png").replace(out / "compare.png")
    budget = (f"Same SFT model and the same {report['comparisons']} comparisons for every method; ppo and best_of_n "
              f"draw the same number of samples scored by one reward model (held-out accuracy "
              f"{_fmt(report['rm_heldout_accuracy'], '.0%')}); dpo takes at most as many optimizer steps as PPO's "
              f"policy ({report['policy_updates/ppo_max']}). Win rates on {report['eval_prompts']} held-out prompts x "
              f"{report['eval_samples']} samples, judged by the judge; wall time is each method's own training.\n")
    write_atomic(out / "compare.md", "# rlhf compare\n\n" + format_table(report) + "\n" + budget
                 + "\n![compare](compare.png)\n")
    write_atomic(out / "compare.json", json.dumps(report, indent=2) + "\n")
