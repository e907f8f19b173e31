"""`rlhf pipeline`: the ChatGPT / InstructGPT recipe, resumable stage by stage.

    SFT on demonstrations
    repeat for pipeline.rounds:
        collect comparisons: K replies from the newest policy, ranked by the labeler (SQLite)
        train the reward model on every comparison so far (from the SFT model)
        PPO against the reward model with a KL penalty to the SFT model (critic from the RM)
        evaluate on held-out prompts and write the round's report

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

import ray

from rlhf.orchestrator.config import ExperimentConfig
from rlhf.orchestrator.errors import BadInput
from rlhf.orchestrator.ppo.launch import resolve_policy, rollout_engine_class, run_ppo, start_ray
from rlhf.orchestrator.ppo.placement import plan_resources
from rlhf.orchestrator.data.prompts import build_prompts, task_dialogues
from rlhf.orchestrator.run.rundir import prepare_run_dir, write_atomic
from rlhf.orchestrator.tasks import arithmetic

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


def _score_fn(cfg: ExperimentConfig):
    if cfg.data.task != "arithmetic":
        raise BadInput(f"data.task: the pipeline's simulated labeler needs a built-in task, got {cfg.data.task!r}")
    return arithmetic.score_reply


def _ppo_config(cfg: ExperimentConfig, policy: str, reward_model: str) -> ExperimentConfig:
    """The PPO stage's config: start from `policy`, score with the round's reward model."""
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"policy": policy, "reward": reward_model})})


def _collect(cfg: ExperimentConfig, round_: int, policy: str, dialogues, store, labeler, tokenizer) -> int:
    """K replies per prompt from the newest policy, ranked, stored with provenance."""
    from rlhf.orchestrator.recipe.comparisons import collect_comparisons
    from rlhf.orchestrator.ppo.rollout_group import RolloutGroup

    rng = random.Random(cfg.seed * 1000 + round_)
    chosen = rng.sample(range(len(dialogues)), min(cfg.rm.prompts_per_round, len(dialogues)))
    prompts = build_prompts([dialogues[i] for i in chosen], tokenizer, cfg.data.max_prompt_tokens,
                            cfg.data.prompt_overflow)
    gpus = cfg.rollout.tensor_parallel_size if cfg.placement.gpus_per_node else 0
    engine = ray.remote(rollout_engine_class(cfg.rollout.backend)).options(num_cpus=1, num_gpus=gpus).remote(
        model_path=policy, dtype=cfg.model.dtype, max_model_len=cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens,
        seed=cfg.seed + round_, kv_cache_gib=cfg.rollout.kv_cache_gib,
        gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
        tensor_parallel_size=cfg.rollout.tensor_parallel_size, enforce_eager=gpus == 0)
    group = RolloutGroup([engine], tensor_parallel_size=cfg.rollout.tensor_parallel_size)
    try:
        keys = [f"task-{cfg.seed}-{i}" for i in chosen]  # prompt provenance: generator seed and index
        return collect_comparisons(group, prompts.messages, prompts.token_ids, keys, cfg.rm.replies_per_prompt,
                                   labeler, store, round_, policy, cfg.rollout.temperature,
                                   cfg.rollout.max_new_tokens, cfg.seed * 7919 + round_, tokenizer)
    finally:
        group.shutdown()


def run_sft_stage(cfg: ExperimentConfig, out_dir: str | Path, address: str | None = None,
                  max_steps: int | None = None):
    """`rlhf sft`: the SFT stage alone (the model from model.policy, demonstrations from data/sft)."""
    from rlhf.orchestrator.recipe.sft import run_sft

    out = prepare_run_dir(out_dir, cfg)
    dialogues = task_dialogues(cfg.data.task, cfg.data.task_size, cfg.seed) if cfg.data.task else []
    base = resolve_policy(cfg, out, dialogues)
    start_ray(address, cfg.sft.num_workers + 1)
    result = run_sft(cfg, base, out / "sft", max_steps=max_steps)
    print(f"sft done: {result.steps} steps, final loss {result.final_loss:.3f}; model in {result.checkpoint}")
    return result


def run_pipeline(cfg: ExperimentConfig, out_dir: str | Path, address: str | None = None,
                 resume: bool = False, max_steps: int | None = None) -> dict:
    from transformers import AutoTokenizer

    from rlhf.orchestrator.recipe.comparisons import ComparisonStore, FileLabeler, SimulatedLabeler
    from rlhf.orchestrator.run.memwatch import MemoryWatcher
    from rlhf.orchestrator.recipe.report import evaluate_policies, write_round_report
    from rlhf.orchestrator.recipe.rm import run_rm
    from rlhf.orchestrator.recipe.sft import run_sft

    score_fn = _score_fn(cfg)
    plan_resources(cfg)  # a layout that cannot work fails before anything is written
    out = Path(out_dir)
    if (out / STATE_FILE).is_file() and not resume:
        raise BadInput(f"output folder {out} holds a pipeline run; pass --resume to continue it or choose another --out")
    out = prepare_run_dir(out, cfg)
    state = PipelineState.load(out / STATE_FILE)
    dialogues = task_dialogues(cfg.data.task, cfg.data.task_size, cfg.seed)
    eval_prompts = [d[:-1] for d in task_dialogues(cfg.data.task, cfg.pipeline.eval_prompts,
                                                    cfg.seed + EVAL_SEED_OFFSET)]
    started = time.perf_counter()
    # Sized for the largest stage: PPO with its reward-model actor.
    start_ray(address, int(plan_resources(_ppo_config(cfg, "policy", "reward-model")).total("CPU")))
    with MemoryWatcher() as memory:
        base = resolve_policy(cfg, out, dialogues)
        if not state.done("sft"):
            result = run_sft(cfg, base, out / "sft", max_steps=max_steps)
            state.mark("sft", checkpoint=result.checkpoint, steps=result.steps, loss=result.final_loss)
        sft = state.stages["sft"]["checkpoint"]
        tokenizer = AutoTokenizer.from_pretrained(sft)
        labeler = (FileLabeler(cfg.rm.rankings_file) if cfg.rm.labeler == "file" else SimulatedLabeler(score_fn))
        demos = {f"task-{cfg.seed}-{i}": d[-1]["content"] for i, d in enumerate(dialogues)}
        policy, summary = sft, {}
        for r in range(1, cfg.pipeline.rounds + 1):
            rd = out / f"round{r}"
            with ComparisonStore(out / "comparisons.sqlite") as store:
                if not state.done(f"round{r}/comparisons"):
                    store.delete_round(r)  # a crash mid-collection leaves a partial round
                    n = _collect(cfg, r, policy, dialogues, store, labeler, tokenizer)
                    state.mark(f"round{r}/comparisons", count=n, policy=policy)
                comparisons = store.load()
            if not state.done(f"round{r}/rm"):
                rm = run_rm(cfg, sft, comparisons, demos, sft, rd / "rm", max_steps=max_steps)
                state.mark(f"round{r}/rm", checkpoint=rm.checkpoint, accuracy=rm.heldout_accuracy)
            rm_stage = state.stages[f"round{r}/rm"]
            if not state.done(f"round{r}/ppo"):
                # resume: a PPO stage cut short continues from its own latest checkpoint.
                result = run_ppo(_ppo_config(cfg, policy, rm_stage["checkpoint"]), rd / "ppo", max_steps=max_steps,
                                 reference=sft, resume=resume)
                state.mark(f"round{r}/ppo", checkpoint=result["policy_dir"])
            policy = state.stages[f"round{r}/ppo"]["checkpoint"]
            if not state.done(f"round{r}/eval"):
                ev = evaluate_policies(policy, sft, eval_prompts, score_fn, n_samples=cfg.pipeline.eval_samples,
                                       max_new_tokens=cfg.rollout.max_new_tokens,
                                       temperature=cfg.rollout.temperature, seed=cfg.seed)
                ev["rm_pairwise_accuracy"] = rm_stage["accuracy"]
                rows = [json.loads(line) for line in (rd / "ppo" / "metrics.jsonl").read_text().splitlines()]
                write_round_report(rd, r, rows, ev)
                state.mark(f"round{r}/eval", **ev)
            summary = state.stages[f"round{r}/eval"]
    summary = {**summary, "peak_rss_gib": memory.peak_bytes / 2**30, "seconds": time.perf_counter() - started}
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    print(f"pipeline done: {cfg.pipeline.rounds} round(s) in {summary['seconds']:.0f}s; "
          f"win rate vs SFT {summary['win_rate_vs_sft']:.0%}, labeler score {summary['labeler_score/sft']:.2f} -> "
          f"{summary['labeler_score/final']:.2f}, RM held-out accuracy {summary['rm_pairwise_accuracy']:.0%}, "
          f"peak memory {summary['peak_rss_gib']:.1f} GiB; report in {out / f'round{cfg.pipeline.rounds}'}")
    return summary
