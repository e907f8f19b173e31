"""`rlhf pipeline`: the ChatGPT / InstructGPT recipe, resumable stage by stage.

    SFT on demonstrations (the task's and/or data.sft files)
    round 0: data.comparisons preference files, if any, go into the comparison store
    repeat for pipeline.rounds:
        collect comparisons: K replies from the newest policy, ranked by the labeler (SQLite)
        pipeline.method ppo (default):
            train the reward model on every comparison so far (from the SFT model)
            PPO against the reward model with an (adaptive) KL penalty to the SFT model, the
                critic from the RM, and the judge watching a held-out sample (best step kept,
                early stop once it falls: ppo/judging.py)
        pipeline.method dpo: DPO (dpo.loss) on this round's comparisons, the round's starting
            policy as the reference (online / iterative DPO)
        pipeline.method best_of_n: the reward model as above, then best_of_n.n replies per
            prompt, the RM keeps the best, SFT on them (rejection sampling)
        evaluate on held-out prompts with the judge and write the round's report; the
            policy handed on is the best one so far by that score (SFT counts), or the
            newest with pipeline.select: last

With `labeler.kind: human` the comparison stage stores the K replies unranked and the run
stops (exit 0) until people have ranked `labeler.min_ranked` of them; `--resume` goes on.
Every finished stage is recorded in `pipeline_state.json` (written atomically); `--resume`
skips what is done. Run on one CPU machine:
    rlhf pipeline configs/quickstart.yaml --out runs/quickstart
On a cluster: add `--address auto` (every stage places its actors on the cluster).
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from rlhf.orchestrator.config import ExperimentConfig
from rlhf.orchestrator.data.dialogues import load_sft_dialogues
from rlhf.orchestrator.data.labelers import build_judge, build_labeler
from rlhf.orchestrator.data.prompts import build_prompts, load_eval_prompts, load_prompts
from rlhf.orchestrator.data.sources import load_preferences
from rlhf.orchestrator.errors import BadInput
from rlhf.orchestrator.evidence.prepare import check_evidence_source, evidence_spec, prepare_evidence, tool_spec
from rlhf.orchestrator.ppo.judging import HeldOutJudge, JudgePlan
from rlhf.orchestrator.ppo.launch import (check_all_lora_targets, resolve_policy, run_ppo, sampling_rollout,
                                          start_ray)
from rlhf.orchestrator.ppo.placement import plan_resources
from rlhf.orchestrator.run.lock import lock_run_dir
from rlhf.orchestrator.run.rundir import prepare_run_dir, write_atomic
from rlhf.orchestrator.tasks import load_task

STATE_FILE = "pipeline_state.json"
EVAL_SEED_OFFSET = 10_000  # held-out prompts come from another seed of the task generator


@dataclass
class PipelineState:
    """Finished stages and their artefacts: {"sft": {...}, "round1/rm": {...}, ...}."""

    path: Path
    stages: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> "PipelineState":
        return cls(path, json.loads(path.read_text())["stages"] if path.is_file() else {})

    def done(self, stage: str) -> bool:
        return stage in self.stages

    def mark(self, stage: str, **artefacts) -> dict:
        self.stages[stage] = {k: str(v) if isinstance(v, Path) else v for k, v in artefacts.items()}
        write_atomic(self.path, json.dumps({"stages": self.stages}, indent=2))
        return self.stages[stage]


def ppo_stage_config(cfg: ExperimentConfig, policy: str, reward_model: str,
                     rule_model: str | None = None) -> ExperimentConfig:
    """The PPO stage's config: start from `policy`, score with the round's reward model (and rule
    reward model, with rule_rm.enabled), and an adaptive KL target (pipeline.kl_target) unless
    ppo.kl.target is set."""
    model = {"policy": policy, "reward": reward_model, **({"rule_reward": rule_model} if rule_model else {})}
    update = {"model": cfg.model.model_copy(update=model)}
    if cfg.ppo.kl.target is None and cfg.pipeline.kl_target is not None:
        kl = cfg.ppo.kl.model_copy(update={"target": cfg.pipeline.kl_target, "horizon": cfg.pipeline.kl_horizon})
        update["ppo"] = cfg.ppo.model_copy(update={"kl": kl})
    return cfg.model_copy(update=update)


def collect_round(cfg: ExperimentConfig, round_: int, policy: str, dialogues, store, labeler, tokenizer) -> int:
    """K replies per prompt from the newest policy, ranked by `labeler` (None: left unranked
    for people), stored with provenance (prompt id = hash of the conversation)."""
    from rlhf.orchestrator.recipe.comparisons import collect_comparisons, prompt_key
    from rlhf.orchestrator.recipe.judge_engine import judge_engine

    rng = random.Random(cfg.seed * 1000 + round_)
    chosen = rng.sample(range(len(dialogues)), min(cfg.rm.prompts_per_round, len(dialogues)))
    prompts = build_prompts([dialogues[i] for i in chosen], tokenizer, cfg.data.max_prompt_tokens,
                            cfg.data.prompt_overflow)
    group = sampling_rollout(cfg, policy, seed=cfg.seed + round_)
    try:
        keys = [prompt_key(m) for m in prompts.messages]
        with judge_engine(cfg, labeler):  # labeler.kind llm_judge: its own engine; others: nothing
            return collect_comparisons(group, prompts.messages, prompts.token_ids, keys, cfg.rm.replies_per_prompt,
                                       labeler, store, round_, policy, cfg.rollout.temperature,
                                       cfg.rollout.max_new_tokens, cfg.seed * 7919 + round_, tokenizer)
    finally:
        group.shutdown()


def run_sft_stage(cfg: ExperimentConfig, out_dir: str | Path, address: str | None = None,
                  max_steps: int | None = None):
    """`rlhf sft`: the SFT stage alone (the model from model.policy, demonstrations from data/sft)."""
    from rlhf.orchestrator.recipe.sft import run_sft

    dialogues = load_sft_dialogues(cfg, load_task(cfg.data.task), cfg.seed)  # bad data fails before the folder
    check_all_lora_targets(cfg, Path(out_dir))  # so do LoRA targets that match no layer
    out = prepare_run_dir(out_dir, cfg)
    base = resolve_policy(cfg, out, dialogues)
    start_ray(address, cfg.sft.num_workers + 1, out)
    result = run_sft(cfg, base, out / "sft", max_steps=max_steps)
    print(f"sft done: {result.steps} steps, final loss {result.final_loss:.3f}; model in {result.checkpoint}")
    return result


@dataclass(frozen=True)
class Inputs:
    """Everything the pipeline reads, loaded and checked before anything is written."""

    task: object                     # Task or None
    labeler: object                  # Labeler, or None for people (labeler.kind: human)
    judge: object                    # Judge: scores held-out replies
    sft: list[list[dict]]            # demonstrations
    prompts: list[list[dict]]        # conversations ending with a user turn (comparisons and PPO)
    eval_prompts: list[list[dict]]   # held out
    preferences: list                # PreferencePair (data.comparisons), stored as round 0
    rules: dict = field(default_factory=dict)        # rule_rm.enabled: rule name -> text the rule RM learns
    rule_labels: list = field(default_factory=list)  # RuleExample (data.rule_labels files)


def load_inputs(cfg: ExperimentConfig) -> Inputs:
    task = load_task(cfg.data.task)
    rules, rule_labels = _rule_inputs(cfg, task)
    inputs = Inputs(task=task, labeler=build_labeler(cfg.labeler, task), judge=build_judge(cfg, task),
                    sft=load_sft_dialogues(cfg, task, cfg.seed), prompts=load_prompts(cfg, task),
                    eval_prompts=load_eval_prompts(cfg, task, cfg.pipeline.eval_prompts),
                    preferences=load_preferences(cfg.data.comparisons, "data.comparisons"),
                    rules=rules, rule_labels=rule_labels)
    _probe(cfg, inputs)
    check_evidence_source(cfg, task)
    return inputs


def _rule_inputs(cfg: ExperimentConfig, task) -> tuple[dict, list]:
    """rule_rm.enabled: the rules (label.rules, else the task's) and the data.rule_labels examples,
    checked before anything is written."""
    if not cfg.rule_rm.enabled:
        return {}, []
    from rlhf.orchestrator.data.rule_labels import load_rule_labels
    from rlhf.orchestrator.recipe.rule_rm import task_rules

    rules = task_rules(cfg, task)
    if not rules:
        raise BadInput("rule_rm.enabled: no rules to learn; set label.rules or use a task with rules (evidence, rules)")
    unknown = sorted(set(cfg.rule_rm.weights) - set(rules))
    if unknown:
        raise BadInput(f"rule_rm.weights: unknown rules {unknown}; the rules are {', '.join(sorted(rules))}")
    return rules, load_rule_labels(cfg.data.rule_labels, "data.rule_labels", rules)


def judge_plan_for(cfg: ExperimentConfig, inputs: Inputs, tokenizer) -> JudgePlan:
    subset = build_prompts(inputs.eval_prompts[: cfg.pipeline.eval_subset], tokenizer, cfg.data.max_prompt_tokens,
                           cfg.data.prompt_overflow)
    judge = HeldOutJudge(subset.messages, subset.token_ids, inputs.judge.score, samples=cfg.pipeline.eval_samples,
                         temperature=cfg.rollout.temperature, max_new_tokens=cfg.rollout.max_new_tokens,
                         seed=cfg.seed + 4242)
    return JudgePlan(judge, every=cfg.pipeline.eval_every, select=cfg.pipeline.select, patience=cfg.pipeline.patience)


def _wait_for_people(store, round_: int, need: int, out: Path, just_collected: bool) -> bool:
    """labeler.kind human: True when enough of the round's comparisons are ranked. If not: right
    after collecting, print the one line that says what to do and return False (the run ends,
    exit 0); on a --resume that finds them still unranked, that line is a BadInput (exit 2)."""
    ranked, total = store.count_ranked([round_]), store.count([round_])
    if ranked >= need:
        return True
    line = (f"{total - ranked} comparisons of round {round_} wait for ranking in {out / 'comparisons.sqlite'} "
            f"({ranked} ranked, labeler.min_ranked = {need}); rank them in a browser with `rlhf label serve {out}` "
            f"(or write replies.rank, 0 = best), then rerun with --resume")
    if not just_collected:
        raise BadInput(f"labeler.min_ranked: {line}")
    print(f"pipeline: {line}")
    return False


def _probe(cfg: ExperimentConfig, inputs: "Inputs") -> None:
    """Calls a Python labeler and judge once on a real prompt, with a demonstration reply and an
    empty one (both happen when sampling), so one that raises or returns a non-number fails now,
    in one line naming the target and the prompt, not after SFT has run."""
    if not inputs.prompts:
        return
    messages = inputs.prompts[0]
    replies = [inputs.sft[0][-1]["content"] if inputs.sft else "ok", ""]
    if cfg.labeler.kind == "python":
        inputs.labeler.rank(messages, replies)
    if (cfg.pipeline.judge or cfg.labeler).kind == "python":
        inputs.judge.score(messages, replies[0])


def run_pipeline(cfg: ExperimentConfig, out_dir: str | Path, address: str | None = None,
                 resume: bool = False, max_steps: int | None = None) -> dict:
    from transformers import AutoTokenizer

    from rlhf.orchestrator.recipe.comparisons import ComparisonStore, prompt_key
    from rlhf.orchestrator.recipe.report import evaluate_policies, write_round_report
    from rlhf.orchestrator.models.scoring import turn_end_ids
    from rlhf.orchestrator.recipe.rm import run_rm
    from rlhf.orchestrator.recipe.sft import run_sft
    from rlhf.orchestrator.recipe.stages import store_preferences
    from rlhf.orchestrator.run.memwatch import MemoryWatcher

    plan_resources(cfg)  # a layout that cannot work fails before anything is written
    inputs = load_inputs(cfg)  # so does bad data, a labeler that cannot load, a judge that cannot score
    check_all_lora_targets(cfg, Path(out_dir))  # and LoRA targets that match no layer
    out = Path(out_dir)
    lock_run_dir(out)  # one writer: a second pipeline into this folder stops here (exit 2)
    if (out / STATE_FILE).is_file() and not resume:
        raise BadInput(f"output folder {out} holds a pipeline run; pass --resume to continue it or choose another --out")
    out = prepare_run_dir(out, cfg)
    cfg = prepare_evidence(cfg, inputs.task, out)  # the search corpus (the task's, written once) and its index
    state = PipelineState.load(out / STATE_FILE)
    waiting = next((r for r in range(1, cfg.pipeline.rounds + 1) if state.done(f"round{r}/comparisons")
                    and not state.done(f"round{r}/rm")), None)
    if inputs.labeler is None and waiting is not None:  # people still ranking: say so before Ray starts
        with ComparisonStore(out / "comparisons.sqlite") as store:
            _wait_for_people(store, waiting, cfg.labeler.min_ranked, out, just_collected=False)
    started = time.perf_counter()
    # Sized for the largest stage: PPO with its reward-model actor.
    start_ray(address, int(plan_resources(ppo_stage_config(cfg, "policy", "reward-model")).total("CPU")), out)
    with MemoryWatcher() as memory:
        base = resolve_policy(cfg, out, inputs.sft + inputs.prompts)
        if not state.done("sft"):
            result = run_sft(cfg, base, out / "sft", max_steps=max_steps)
            state.mark("sft", checkpoint=result.checkpoint, steps=result.steps, loss=result.final_loss)
        sft = state.stages["sft"]["checkpoint"]
        tokenizer = AutoTokenizer.from_pretrained(sft)
        if inputs.preferences and not state.done("round0/comparisons"):
            with ComparisonStore(out / "comparisons.sqlite") as store:
                store.delete_round(0)
                n = store_preferences(store, inputs.preferences, tokenizer, turn_end_ids(sft, tokenizer))
            state.mark("round0/comparisons", count=n, source="data.comparisons")
        demos = {prompt_key(d[:-1]): d[-1]["content"] for d in inputs.sft if d[-1]["role"] == "assistant"}
        judge_plan = judge_plan_for(cfg, inputs, tokenizer)
        # The policy handed on: the best so far by the held-out judge (SFT is round 0's).
        best = state.stages.get("best", {"round": 0, "checkpoint": sft, "score": None})
        for r in range(1, cfg.pipeline.rounds + 1):
            rd = out / f"round{r}"
            policy = best["checkpoint"]
            with ComparisonStore(out / "comparisons.sqlite") as store:
                collected = not state.done(f"round{r}/comparisons")
                if collected:
                    store.delete_round(r)  # a crash mid-collection leaves a partial round
                    n = collect_round(cfg, r, policy, inputs.prompts, store, inputs.labeler, tokenizer)
                    state.mark(f"round{r}/comparisons", count=n, policy=policy, ranked=inputs.labeler is not None)
                    print(f"round {r} comparisons: {n} collected, {cfg.rm.replies_per_prompt} replies per prompt "
                          f"(labeler {cfg.labeler.kind})", flush=True)
                if inputs.labeler is None and not _wait_for_people(store, r, cfg.labeler.min_ranked, out, collected):
                    return {"waiting_for_ranking": r}
                comparisons = store.load()
            if cfg.pipeline.method != "dpo" and not state.done(f"round{r}/rm"):
                rm = run_rm(cfg, sft, comparisons, demos, sft, rd / "rm", max_steps=max_steps)
                state.mark(f"round{r}/rm", checkpoint=rm.checkpoint, accuracy=rm.heldout_accuracy,
                           comparisons=len(comparisons))
                print(f"round {r} reward model: held-out accuracy {_pct(rm.heldout_accuracy)} on {len(comparisons)} "
                      f"comparisons; model in {rm.checkpoint}", flush=True)
            rm_stage = state.stages.get(f"round{r}/rm", {"checkpoint": None, "accuracy": None})
            if cfg.rule_rm.enabled and cfg.pipeline.method == "ppo" and not state.done(f"round{r}/rule_rm"):
                state.mark(f"round{r}/rule_rm", **rule_rm_round(cfg, inputs, out, sft, rd, max_steps))
            rule_model = state.stages.get(f"round{r}/rule_rm", {}).get("checkpoint")
            stage = f"round{r}/{cfg.pipeline.method}"
            if not state.done(stage):
                state.mark(stage, **improve_policy(cfg, r, rd, policy, sft, rm_stage["checkpoint"], comparisons,
                                                    inputs.prompts, judge_plan, resume, max_steps, rule_model))
            trained = state.stages[stage]
            if not state.done(f"round{r}/eval"):
                ev = evaluate_policies(trained["checkpoint"], sft, inputs.eval_prompts, inputs.judge,
                                       n_samples=cfg.pipeline.eval_samples, max_new_tokens=cfg.rollout.max_new_tokens,
                                       temperature=cfg.rollout.temperature, seed=cfg.seed, start_dir=base,
                                       detail=True, tools=tool_spec(cfg))
                ev.update(evidence_rates(cfg, inputs, ev.pop("detail")))
                ev.update(rm_pairwise_accuracy=rm_stage["accuracy"], method=cfg.pipeline.method,
                          **{k: v for k, v in trained.items() if k not in ("checkpoint", "metrics")})
                samples = ev.pop("samples")  # start/SFT/final replies: report.md and eval.json, not the state
                metrics = Path(trained["metrics"])
                rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
                write_round_report(rd, r, rows, ev, samples, method=cfg.pipeline.method)
                state.mark(f"round{r}/eval", **ev)
                print(f"round {r} eval: win rate vs SFT {ev['win_rate_vs_sft']:.0%}, judge score "
                      f"{ev['labeler_score/sft']:.2f} -> {ev['labeler_score/final']:.2f}; report in {rd}", flush=True)
                if best["score"] is None:
                    best["score"] = ev["labeler_score/sft"]
                if cfg.pipeline.select == "last" or ev["labeler_score/final"] > best["score"]:
                    best = {"round": r, "checkpoint": trained["checkpoint"], "score": ev["labeler_score/final"],
                            "win_rate_vs_sft": ev["win_rate_vs_sft"]}
                state.mark("best", **best)
            best = state.stages["best"]
    last = state.stages[f"round{cfg.pipeline.rounds}/eval"]
    summary = {**last, "chosen_round": best["round"], "chosen_policy": best["checkpoint"],
               "labeler_score/chosen": best["score"], "win_rate_vs_sft/chosen": best.get("win_rate_vs_sft", 0.5),
               "peak_rss_gib": memory.peak_bytes / 2**30, "seconds": time.perf_counter() - started}
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    chosen = "SFT (no round beat it)" if best["round"] == 0 else f"round {best['round']}"
    distinct = "/".join(_num(last.get(f"distinct2/{p}"), ".2f") for p in ("start", "sft", "final"))
    print(f"pipeline done: {cfg.pipeline.rounds} round(s) in {summary['seconds']:.0f}s; last round: win rate vs the "
          f"starting model {_pct(last.get('win_rate_vs_start'))}, vs SFT {last['win_rate_vs_sft']:.0%}, judge score "
          f"{last['labeler_score/sft']:.2f} -> {last['labeler_score/final']:.2f}, RM held-out accuracy "
          f"{_pct(last['rm_pairwise_accuracy'])}, KL to SFT {_num(last.get('kl_to_sft/final'), '.2f')} nats per reply, "
          f"distinct-2 of replies start/SFT/final {distinct}; "
          f"chosen policy: {chosen} (judge {best['score']:.2f}), peak memory {summary['peak_rss_gib']:.1f} GiB; "
          f"report in {out / f'round{cfg.pipeline.rounds}'}")
    if "evidence/supported_and_plausible_rate/final" in last:
        print(evidence_line(last))
    return summary


def evidence_line(ev: dict) -> str:
    """The held-out Sparrow figures of a round's evaluation, SFT -> final, beside Sparrow's own."""
    def pair(key: str) -> str:
        return f"SFT {_pct(ev.get(f'{key}/sft'))} -> final {_pct(ev.get(f'{key}/final'))}"
    return (f"evidence (held-out): supported and plausible {pair('evidence/supported_and_plausible_rate')} "
            f"(Sparrow: 78%); rule violations on rule probes {pair('rules/violation_rate')} (Sparrow: 8%); "
            f"searched on factual questions {pair('evidence/search_rate/factual')}, on direct ones "
            f"{pair('evidence/search_rate/direct')}")


def evidence_rates(cfg: ExperimentConfig, inputs: Inputs, detail: dict) -> dict:
    """With the search tool and a task that sorts its prompts (the evidence task): Sparrow's held-out
    rates of each evaluated policy, from the evaluation's own replies (orchestrator/evidence/evaluate.py):
    evidence/supported_and_plausible_rate/<policy>, rules/violation_rate/<policy>, and the search rates."""
    if not cfg.rollout.tools or not callable(getattr(inputs.task, "prompt_kind", None)):
        return {}
    from rlhf.orchestrator.evidence.evaluate import summarize
    from rlhf.orchestrator.tasks.rewards import evidence_checker

    checker, n, out = evidence_checker(evidence_spec(cfg)), cfg.pipeline.eval_samples, {}
    for policy, replies in detail["replies"].items():
        pairs = [(m, r) for i, m in enumerate(inputs.eval_prompts) for r in replies[i * n:(i + 1) * n]]
        report = summarize(pairs, inputs.task, checker, examples=0)
        out.update({f"{key}/{policy}": value for key, value in report.items() if isinstance(value, float)})
    return out


def rule_rm_round(cfg: ExperimentConfig, inputs: Inputs, out: Path, sft: str, rd: Path, max_steps: int | None) -> dict:
    """Round r's rule reward model, from the SFT model, on every rule label so far: the task's simulated
    ones (labeler.kind task) on every stored reply, people's per-reply checkboxes, data.rule_labels."""
    from rlhf.orchestrator.recipe.rule_rm import run_rule_rm, store_examples

    simulated, people = store_examples(out / "comparisons.sqlite", inputs.task, inputs.rules)
    examples = (simulated if cfg.labeler.kind == "task" else []) + people + inputs.rule_labels
    result = run_rule_rm(cfg, sft, examples, inputs.rules, rd / "rule_rm", max_steps=max_steps)
    print(f"rule rm: {len(examples)} labels ({len(people)} from people), held-out accuracy "
          f"{_pct(result.heldout_accuracy)} (majority guess {_pct(result.heldout_majority)}), "
          f"violations {result.violation_rate:.0%}")
    return {"checkpoint": result.checkpoint, "accuracy": result.heldout_accuracy, "majority": result.heldout_majority,
            "violation_rate": result.violation_rate, "examples": len(examples)}


def improve_policy(cfg: ExperimentConfig, r: int, rd: Path, policy: str, sft: str, rm: str | None, comparisons,
                    prompts, judge_plan: JudgePlan, resume: bool, max_steps: int | None,
                    rule_model: str | None = None) -> dict:
    """Round r's training of `policy` by pipeline.method; returns what the state records: the
    new policy folder, the step handed on, whether it stopped early, its metrics file."""
    method = cfg.pipeline.method
    if method == "ppo":  # resume: a PPO stage cut short continues from its own latest checkpoint
        result = run_ppo(ppo_stage_config(cfg, policy, rm, rule_model), rd / "ppo", max_steps=max_steps, reference=sft,
                         resume=resume, judge=judge_plan)
        return {"checkpoint": result["policy_dir"], "selected_step": result["selected_step"],
                "stopped_early": result["stopped_early"], "metrics": str(rd / "ppo" / "metrics.jsonl")}
    if method == "dpo":  # online DPO: this round's comparisons (and round 0's files), reference = the round's start
        from rlhf.orchestrator.recipe.dpo import run_dpo

        result = run_dpo(cfg, policy, [c for c in comparisons if c.round in (0, r)], rd / "dpo", max_steps=max_steps)
        return {"checkpoint": result.checkpoint, "selected_step": result.steps, "stopped_early": False,
                "metrics": result.metrics_path, "dpo/heldout_accuracy_before": result.heldout_accuracy_before,
                "dpo/heldout_accuracy_after": result.heldout_accuracy_after}
    from rlhf.orchestrator.recipe.best_of_n import run_best_of_n  # best_of_n: RM picks, SFT on the picks

    result = run_best_of_n(cfg, policy, rm, prompts, rd / "best_of_n", max_steps=max_steps, round_=r)
    return {"checkpoint": str(result.checkpoint), "selected_step": result.sft_steps, "stopped_early": False,
            "metrics": str(rd / "best_of_n" / "metrics.jsonl"), "best_of_n/mean_best_score": result.mean_best_score,
            "best_of_n/mean_score": result.mean_score}


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _num(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)
