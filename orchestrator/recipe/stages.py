"""Stages run on their own: `rlhf rm` trains a reward model from preference data.

Comparisons for `rlhf rm`:
  - every data.comparisons pair (HH-RLHF / UltraFeedback shaped files or local Hugging Face
    datasets, data/sources.py) is one comparison of two replies, chosen rank 0 and rejected
    rank 1, round 0, prompt id `prompt_key(prompt)`; the reply token ids are the reply text's
    tokens plus the end-of-turn id, as the policy emits a reply it ends itself;
  - plus, when the output folder holds a comparisons.sqlite (a pipeline's, or one people
    ranked), its ranked comparisons, except those it took from data.comparisons earlier
    (policy "data.comparisons"): the files as configured now replace them.
The reward model starts from model.policy (`tiny` builds a small model whose tokenizer is
trained on the pairs' texts). Bad input (files, columns, too few comparisons for the
workers) is one line and leaves no new output folder behind.

Run on one CPU machine (embedded local Ray, gloo):
    rlhf rm CONFIG data.comparisons=prefs.jsonl --out runs/rm
On a cluster: add `--address auto` (the Ray Train workers are placed on the cluster).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from rlhf.orchestrator.config import ExperimentConfig
from rlhf.orchestrator.data.sources import PreferencePair, load_preferences
from rlhf.orchestrator.errors import BadInput
from rlhf.orchestrator.models.scoring import turn_end_ids
from rlhf.orchestrator.ppo.launch import check_all_lora_targets, resolve_policy, start_ray
from rlhf.orchestrator.recipe.comparisons import Comparison, ComparisonStore, prompt_key
from rlhf.orchestrator.recipe.rm import RMResult
from rlhf.orchestrator.run.lock import holds
from rlhf.orchestrator.run.rundir import prepare_run_dir

STORE_FILE = "comparisons.sqlite"
PREFERENCE_POLICY = "data.comparisons"  # the `policy` provenance of comparisons read from files


def reply_token_ids(tokenizer, text: str, eos_ids: list[int]) -> list[int]:
    """A reply as the policy would have generated it: its text tokens, then the stop id(s)."""
    return list(tokenizer.encode(text, add_special_tokens=False)) + list(eos_ids)


def preference_comparisons(pairs: list[PreferencePair], tokenizer, eos_ids: list[int], round: int = 0,
                           policy: str = PREFERENCE_POLICY) -> list[Comparison]:
    """Preference pairs as two-reply comparisons (chosen rank 0, rejected rank 1), not stored:
    ids are -1, -2, ... so they cannot be mistaken for rows of a store."""
    return [Comparison(id=-1 - i, round=round, prompt_id=prompt_key(p.prompt), policy=policy,
                       prompt_messages=p.prompt, replies=[p.chosen, p.rejected],
                       reply_ids=[reply_token_ids(tokenizer, p.chosen, eos_ids),
                                  reply_token_ids(tokenizer, p.rejected, eos_ids)],
                       ranks=[0, 1], created="")
            for i, p in enumerate(pairs)]


def store_preferences(store: ComparisonStore, pairs: list[PreferencePair], tokenizer, eos_ids: list[int],
                      round: int = 0, policy: str = PREFERENCE_POLICY) -> int:
    """Adds each pair to `store` as a two-reply comparison of `round`; returns how many.
    (Callers that may run twice clear the round first: `store.delete_round(round)`.)"""
    for c in preference_comparisons(pairs, tokenizer, eos_ids, round, policy):
        store.add(c.round, c.prompt_id, c.policy, c.prompt_messages, c.replies, c.reply_ids, c.ranks)
    return len(pairs)


def _stored_comparisons(path: Path) -> list[Comparison]:
    """The ranked comparisons of a store, without those earlier read from data.comparisons."""
    with ComparisonStore(path) as store:
        return [c for c in store.load() if c.policy != PREFERENCE_POLICY and len(set(c.ranks)) > 1]


def stage_comparisons(cfg: ExperimentConfig, out: Path) -> tuple[list[PreferencePair], list[Comparison]]:
    """What a stage run on its own (`rlhf rm`, `rlhf dpo`) trains on: the data.comparisons pairs
    and the ranked comparisons of OUT/comparisons.sqlite; BadInput when there are none."""
    pairs = load_preferences(cfg.data.comparisons, "data.comparisons")
    store_path = out / STORE_FILE
    stored = _stored_comparisons(store_path) if store_path.is_file() else []
    if not pairs and not stored:
        where = f"; {store_path} has no ranked comparisons either" if store_path.is_file() else ""
        raise BadInput(f"data.comparisons: no comparisons to train on (give preference files or datasets, "
                       f"or run the pipeline into --out first){where}")
    return pairs, stored


def tokenizer_corpus(pairs: list[PreferencePair], stored: list[Comparison]) -> list[list[dict]]:
    """Every prompt with each of its replies: the corpus a `tiny` model's tokenizer learns from."""
    return ([p.prompt + [{"role": "assistant", "content": r}] for p in pairs for r in (p.chosen, p.rejected)]
            + [c.prompt_messages + [{"role": "assistant", "content": r}] for c in stored for r in c.replies])


def run_rm_stage(cfg: ExperimentConfig, out_dir: str | Path, address: str | None = None,
                 max_steps: int | None = None) -> RMResult:
    """`rlhf rm`: trains a reward model on data.comparisons (and OUT/comparisons.sqlite) from
    model.policy; the model lands in OUT/rm/checkpoint."""
    from transformers import AutoTokenizer

    from rlhf.orchestrator.recipe.rm import run_rm

    out = Path(out_dir).resolve()
    pairs, stored = stage_comparisons(cfg, out)  # bad files fail before any folder
    check_all_lora_targets(cfg, out)  # LoRA targets that match no layer, before any folder
    created = not out.exists()
    try:
        out = prepare_run_dir(out, cfg)
        model = resolve_policy(cfg, out, tokenizer_corpus(pairs, stored))
        tokenizer = AutoTokenizer.from_pretrained(model)
        if tokenizer.chat_template is None:
            raise BadInput(f"model.policy: the tokenizer of {model} has no chat template")
        comparisons = preference_comparisons(pairs, tokenizer, turn_end_ids(model, tokenizer)) + stored
        start_ray(address, cfg.rm.num_workers + 1, out)
        result = run_rm(cfg, model, comparisons, demonstrations=None, tokenizer_path=model,
                        out_dir=out / "rm", max_steps=max_steps)
    except BadInput:
        if created and holds(out):  # nothing half-written: the folder this call made goes again
            shutil.rmtree(out, ignore_errors=True)
        raise
    held = "n/a (rm.held_out_fraction is 0)" if result.heldout_accuracy is None else f"{result.heldout_accuracy:.0%}"
    print(f"rm done: {len(comparisons)} comparisons ({len(pairs)} from data.comparisons, {len(stored)} from "
          f"{STORE_FILE}) on {result.train_prompts + result.heldout_prompts} prompts "
          f"({result.heldout_prompts} held out), held-out accuracy {held}, train accuracy "
          f"{result.train_accuracy:.0%}, {result.steps} steps; model in {result.checkpoint}")
    return result
