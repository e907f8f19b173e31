"""Rule reward-model stage: one model scores (dialogue, rule) -> P(violation), on Ray Train + DeepSpeed.

Sparrow (Glaese et al. 2022, sec. 2.5) judges rules one at a time with a rule-conditional
reward model; its log(1 - P(violation)) per rule enters the PPO reward with weights
(actors/reward.py, component `rules_rm`, logged as reward/rules_rm). As done here:
- Examples (`RuleExample`, orchestrator/data/rule_labels.py) from data.rule_labels files, from
  the task's simulated labels (`task.rule_violations(messages, reply) -> {rule: bool}`, applied
  to every stored reply of the comparison store) and from people's per-reply rule checkboxes
  on the labeling page (rankings.violations of the store).
- The input is the chat template of [system "Rule: <text>", *messages, assistant reply]
  (rlhf.orchestrator.models.scoring.rule_sequence_ids); the model is the SFT model with a
  scalar head (`AutoModelForSequenceClassification(num_labels=1)`), trained with binary
  cross-entropy (`rule_violation_loss`); the Ray Train worker is rlhf.actors.rule_rm_worker.
- Examples are split by prompt (every reply and rule of a held-out prompt is held out), so
  held-out accuracy measures conversations the model never saw. It is reported beside the
  majority-class accuracy of the held-out labels and the violation base rate.
The folder holds the model, the tokenizer, rules.json {name: text} and rule_rm_eval.json.

Run on one CPU machine (local Ray, gloo) or a cluster (Ray Train workers) alike:

    rlhf rule-rm CONFIG --out runs/NAME    # OUT/comparisons.sqlite + data.rule_labels -> OUT/rule_rm/checkpoint

or from Python, with Ray started by the caller:

    result = run_rule_rm(cfg, sft_dir, examples, rules, out_dir / "rule_rm")
"""
from __future__ import annotations

import random
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from rlhf.actors.rule_rm_worker import EVAL_FILE, RuleRMData, RuleRMWorkerArgs, _train_worker
from rlhf.orchestrator.config import ExperimentConfig
from rlhf.orchestrator.data.rule_labels import RuleExample, load_rule_labels, people_labels, simulated_labels
from rlhf.orchestrator.errors import BadInput
from rlhf.orchestrator.models.scoring import rule_sequence_ids
from rlhf.orchestrator.recipe.comparisons import ComparisonStore, prompt_key
from rlhf.orchestrator.recipe.rm import fit_to_folder

STORE_FILE = "comparisons.sqlite"


@dataclass(frozen=True)
class RuleRMResult:
    checkpoint: str                   # HF folder: weights, tokenizer, rules.json
    heldout_accuracy: float | None    # P > 0.5 = violated, on held-out prompts; None if none held out
    heldout_majority: float | None    # accuracy of always guessing the held-out majority label
    heldout_per_rule: dict[str, float]  # rule name -> held-out accuracy
    violation_rate: float             # share of all examples labeled violated
    examples: int                     # train + held out
    train_examples: int
    heldout_examples: int
    steps: int


def task_rules(cfg: ExperimentConfig, task) -> dict[str, str]:
    """The rules the model learns: label.rules, else the task's `rules` ({} when it has none)."""
    return dict(cfg.label.rules) or dict(getattr(task, "rules", None) or {})


def store_examples(store_path: str | Path, task, rules: dict[str, str]) -> tuple[list[RuleExample], list[RuleExample]]:
    """(simulated, people) examples of a comparison store: the task's rule_violations on every
    stored reply (none when the task has no rule_violations), and every ranking's checkboxes."""
    with ComparisonStore(store_path) as store:
        comparisons = {c.id: c for c in store.load(ranked_only=False)}  # one per comparison, not per ranking
    judge = getattr(task, "rule_violations", None)
    simulated = [] if judge is None else simulated_labels(
        judge, [(c.prompt_messages, r) for c in comparisons.values() for r in c.replies], rules)
    db = sqlite3.connect(f"file:{Path(store_path).resolve()}?mode=ro", uri=True)
    try:
        rankings = db.execute("SELECT comparison_id, violations FROM rankings ORDER BY id").fetchall()
    finally:
        db.close()
    people = [e for cid, ticked in rankings if cid in comparisons
              for e in people_labels(comparisons[cid].prompt_messages, comparisons[cid].replies, ticked, rules)]
    return simulated, people


def split_examples(examples: list[RuleExample], held_out_fraction: float,
                   seed: int) -> tuple[list[RuleExample], list[RuleExample]]:
    """(train, held-out): a seeded share of the prompts, with all their replies and rules, is held out."""
    keys = sorted({prompt_key(e.messages) for e in examples})
    random.Random(seed).shuffle(keys)
    n_held = 0
    if held_out_fraction > 0 and len(keys) >= 2:
        n_held = min(len(keys) - 1, max(1, round(held_out_fraction * len(keys))))
    held = set(keys[:n_held])
    return ([e for e in examples if prompt_key(e.messages) not in held],
            [e for e in examples if prompt_key(e.messages) in held])


def build_rule_rm_data(cfg: ExperimentConfig, examples: list[RuleExample], rules: dict[str, str],
                       tokenizer_path: str) -> RuleRMData:
    """Splits by prompt and tokenizes (rule + dialogue + reply, cut to rule_rm.max_tokens)."""
    from transformers import AutoTokenizer

    if not examples:
        raise BadInput("rule_rm: no rule labels to train on (data.rule_labels, the task's rule_violations, "
                       "or rule checkboxes ticked on the labeling page)")
    train, heldout = split_examples(examples, cfg.rule_rm.held_out_fraction, cfg.seed)
    if len(train) < cfg.rule_rm.num_workers:
        raise BadInput(f"rule_rm.num_workers: {len(train)} training examples for {cfg.rule_rm.num_workers} workers")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
    if tokenizer.chat_template is None:
        raise BadInput(f"model.policy: the tokenizer of {tokenizer_path} has no chat template")

    def ids(e: RuleExample) -> list[int]:
        return rule_sequence_ids(tokenizer, e.messages, e.reply, e.rule_text, cfg.rule_rm.max_tokens)

    return RuleRMData(train_sequences=[ids(e) for e in train], train_labels=[e.violated for e in train],
                      heldout_sequences=[ids(e) for e in heldout], heldout_labels=[e.violated for e in heldout],
                      heldout_rules=[e.rule for e in heldout], rules=dict(rules))


def run_rule_rm(cfg: ExperimentConfig, sft_dir: str, examples: list[RuleExample], rules: dict[str, str],
                out_dir: str | Path, max_steps: int | None = None) -> RuleRMResult:
    """Trains the rule model from `sft_dir` on `examples` and saves it to <out_dir>/checkpoint."""
    import ray

    out = Path(out_dir).resolve()
    data = build_rule_rm_data(cfg, examples, rules, sft_dir)  # bad input before any folder or worker
    out.mkdir(parents=True, exist_ok=True)
    use_gpu = cfg.placement.gpus_per_node > 0
    r = cfg.rule_rm
    args = RuleRMWorkerArgs(
        model_path=str(sft_dir), tokenizer_path=str(sft_dir), metrics_path=str(out / "metrics.jsonl"),
        data_ref=ray.put(data), zero_stage=r.zero_stage, lr=r.lr, batch_size=r.batch_size,
        micro_batch_size=r.micro_batch_size, epochs=r.epochs, max_steps=max_steps, seed=cfg.seed,
        dtype=cfg.model.dtype, backend="nccl" if use_gpu else "gloo", max_tokens=r.max_tokens)
    final, summary = fit_to_folder(_train_worker, args, r.num_workers, use_gpu, out, "rule reward model", EVAL_FILE)
    return RuleRMResult(checkpoint=str(final), examples=summary["train_examples"] + summary["heldout_examples"],
                        **summary)


def stage_examples(cfg: ExperimentConfig, out: Path, task) -> tuple[dict[str, str], dict[str, list[RuleExample]]]:
    """What `rlhf rule-rm` trains on: rules, and examples by source (files, simulated, people)."""
    rules = task_rules(cfg, task)
    if not rules:
        raise BadInput("label.rules: no rules to learn (set label.rules or use a task with rules)")
    by_source = {"files": load_rule_labels(cfg.data.rule_labels, "data.rule_labels", rules),
                 "simulated": [], "people": []}
    if (out / STORE_FILE).is_file():
        by_source["simulated"], by_source["people"] = store_examples(out / STORE_FILE, task, rules)
    if not any(by_source.values()):
        raise BadInput(f"data.rule_labels: no rule labels to train on (give rule_labels files, or a run folder "
                       f"whose {STORE_FILE} has replies and a task with rule_violations, or ticked rules)")
    return rules, by_source


def run_rule_rm_stage(cfg: ExperimentConfig, out_dir: str | Path, address: str | None = None,
                      max_steps: int | None = None) -> RuleRMResult:
    """`rlhf rule-rm`: the rule model from OUT/sft/checkpoint (else model.policy), on OUT's store and
    data.rule_labels; lands in OUT/rule_rm/checkpoint. Bad input leaves no new folder behind."""
    from rlhf.orchestrator.ppo.launch import resolve_policy, start_ray
    from rlhf.orchestrator.recipe.sft import is_model_dir
    from rlhf.orchestrator.run.lock import holds
    from rlhf.orchestrator.run.rundir import prepare_run_dir
    from rlhf.orchestrator.tasks import load_task

    out = Path(out_dir).resolve()
    task = load_task(cfg.data.task)
    rules, by_source = stage_examples(cfg, out, task)  # bad files fail before any folder
    examples = [e for part in by_source.values() for e in part]
    created = not out.exists()
    try:
        out = prepare_run_dir(out, cfg)
        sft = out / "sft" / "checkpoint"
        model = str(sft) if is_model_dir(sft) else resolve_policy(
            cfg, out, [e.messages + [{"role": "assistant", "content": e.reply}] for e in examples])
        start_ray(address, cfg.rule_rm.num_workers + 1, out)
        result = run_rule_rm(cfg, model, examples, rules, out / "rule_rm", max_steps=max_steps)
    except BadInput:
        if created and holds(out):  # nothing half-written: the folder this call made goes again
            shutil.rmtree(out, ignore_errors=True)
        raise
    print(summary_line(result, {k: len(v) for k, v in by_source.items()}))
    return result


def summary_line(result: RuleRMResult, counts: dict[str, int]) -> str:
    """One line for the console: sizes by source, held-out accuracy beside the majority guess."""
    held = ("n/a (rule_rm.held_out_fraction is 0)" if result.heldout_accuracy is None
            else f"{result.heldout_accuracy:.0%} (majority guess {result.heldout_majority:.0%})")
    sources = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
    return (f"rule-rm done: {result.examples} examples ({sources}), violation rate {result.violation_rate:.0%}, "
            f"held-out accuracy {held}, {result.steps} steps; model in {result.checkpoint}")
