"""DPO-family stage: train the policy directly on ranked comparisons (Ray Train + DeepSpeed).

    rlhf dpo CONFIG [overrides] [--out DIR] [--max-steps N] [--address ADDR]

Losses by `dpo.loss` (rlhf.orchestrator.rl.preference): dpo (Rafailov et al. 2023), ipo, cdpo,
simpo (reference-free) and kto (unpaired). As done here:
- Inputs: the ranked comparisons of OUT/comparisons.sqlite (a pipeline's, or people's; each
  labeler's ranking is one comparison) plus every data.comparisons pair (chosen rank 0,
  rejected rank 1), exactly as `rlhf rm` reads them (recipe/stages.py). A K-reply comparison
  gives every (better, worse) pair or only best against worst (`dpo.pairs`); for kto its best
  replies are desirable and its worst undesirable.
- Split by prompt id (`dpo.held_out_fraction`, all comparisons of a prompt on one side).
- The policy starts from OUT/sft/checkpoint when the folder holds one (the pipeline's SFT
  model, as InstructGPT starts RL from SFT), else from model.policy. The reference is that
  same starting policy.
- The reference actor (rlhf.actors.reference.ReferenceModel, as PPO uses it) scores every
  distinct (prompt, reply) once, before training, never again per step; skipped for simpo.
  `dpo.reference: false` with a reference-needing loss uses a uniform reference (ref
  log-probs 0), TRL's `reference_free`.
- A sequence's log-prob is the sum over its reply tokens (prompt masked out); the reply ends
  with the end-of-turn id, as the policy emits it (stages.reply_token_ids). Sequences are cut
  to dpo.max_tokens from the left of the prompt, so the reply is kept.

Writes OUT/dpo/metrics.jsonl (dpo/loss, margin, chosen/rejected log-prob, accuracy, lr per
step; held-out implicit-reward accuracy before and after), OUT/dpo/checkpoint (HF folder with
the tokenizer, LoRA merged, atomic) and prints one summary line. Bad input is one line (exit
2) and leaves no new output folder behind.

Run on one CPU machine (embedded local Ray, gloo):
    rlhf dpo configs/quickstart.yaml --out runs/quickstart
On a cluster: add `--address auto` (Ray Train workers and the reference actor are placed there).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from rlhf.orchestrator.config import ExperimentConfig
from rlhf.orchestrator.errors import BadInput, RemoteCallFailed, RemoteCallTimeout
from rlhf.orchestrator.recipe.comparisons import Comparison
from rlhf.orchestrator.recipe.rm import split_by_prompt

REFERENCE_TIMEOUT_S = 1800.0  # the reference actor's start and its one pass over every sequence


@dataclass(frozen=True)
class DPOResult:
    checkpoint: str                         # HF folder of the trained policy (and tokenizer)
    heldout_accuracy_before: float | None   # implicit-reward accuracy on held-out pairs (tie = 1/2); None: none
    heldout_accuracy_after: float | None
    steps: int
    train_pairs: int                        # kto: train rows
    heldout_pairs: int
    metrics_path: str


def run_dpo(cfg: ExperimentConfig, policy_path: str, comparisons: list[Comparison], out_dir: str | Path,
            max_steps: int | None = None) -> DPOResult:
    """Trains `policy_path` on `comparisons` into <out_dir>/checkpoint; Ray must be running."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from rlhf.actors.dpo_worker import DPOLoopArgs, LossArgs, train_loop
    from rlhf.actors.lora import LoraArgs, check_targets_for
    from rlhf.orchestrator.recipe.sft import is_model_dir, load_tokenizer, plan_steps, worker_failure

    d, out = cfg.dpo, Path(out_dir).resolve()
    lora = LoraArgs.from_config(d.lora, "dpo.lora")
    check_targets_for(policy_path, lora)  # before any worker starts
    tokenizer = load_tokenizer(policy_path)
    data, n_pairs = build_dpo_data(cfg, comparisons, tokenizer)
    batch = min(d.batch_size, n_pairs[0]) // d.num_workers * d.num_workers
    if batch < 1:
        raise BadInput(f"dpo.num_workers: {n_pairs[0]} training pairs for {d.num_workers} workers; "
                       "collect more comparisons or use fewer workers")
    out.mkdir(parents=True, exist_ok=True)
    data = _with_reference(cfg, policy_path, data)
    on_gpu = cfg.placement.gpus_per_node > 0
    steps = plan_steps(n_pairs[0], batch, d.epochs, d.max_steps, max_steps)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    args = DPOLoopArgs(
        model_path=str(policy_path), data_ref=ray.put(data),
        loss=LossArgs(name=d.loss, beta=d.beta, label_smoothing=d.label_smoothing, gamma=d.gamma,
                      desirable_weight=d.desirable_weight, undesirable_weight=d.undesirable_weight),
        total_steps=steps, batch_size=batch, micro_batch_size=d.micro_batch_size, zero_stage=d.zero_stage,
        lr=d.lr, dtype=cfg.model.dtype, seed=cfg.seed, pad_id=pad_id, metrics_path=str(out / "metrics.jsonl"),
        checkpoint_path=str(out / "checkpoint"), summary_path=str(out / "summary.json"), lora=lora)
    trainer = TorchTrainer(
        train_loop, train_loop_config={"args": args},
        scaling_config=ScalingConfig(num_workers=d.num_workers, use_gpu=on_gpu),
        torch_config=TorchConfig(backend="nccl" if on_gpu else "gloo"),
        run_config=RunConfig(storage_path=str(out / "ray_train"), name="dpo"))
    try:
        trainer.fit()
    except Exception as err:  # noqa: BLE001 - every worker/controller failure becomes one line
        raise worker_failure(err, role="dpo") from err
    if not is_model_dir(out / "checkpoint") or not (out / "summary.json").is_file():
        raise RemoteCallFailed(f"dpo worker (rank 0) finished without writing a model to {out / 'checkpoint'}")
    summary = json.loads((out / "summary.json").read_text())
    return DPOResult(checkpoint=str(out / "checkpoint"), heldout_accuracy_before=summary["heldout_accuracy_before"],
                     heldout_accuracy_after=summary["heldout_accuracy_after"], steps=summary["steps"],
                     train_pairs=n_pairs[0], heldout_pairs=n_pairs[1], metrics_path=str(out / "metrics.jsonl"))


def build_dpo_data(cfg: ExperimentConfig, comparisons: list[Comparison], tokenizer):
    """Tokenized sequences and pairs (reference log-probs not yet filled in), and the counts
    (train pairs or kto rows, held-out pairs)."""
    from rlhf.actors.dpo_worker import DPOData
    from rlhf.orchestrator.rl.preference import kto_examples, preference_pairs

    d = cfg.dpo
    usable = [c for c in comparisons if len({r for r in c.ranks}) > 1]  # all-tied: nothing to learn
    if not usable:
        raise BadInput(f"dpo: none of the {len(comparisons)} comparisons has two differently ranked replies")
    train, heldout = split_by_prompt(usable, d.held_out_fraction, cfg.seed)
    sequences: list[tuple[list[int], list[int]]] = []
    index: dict[tuple, int] = {}
    prompt_cache: dict[str, list[int]] = {}

    def prompt_ids(c: Comparison) -> list[int]:
        key = json.dumps(c.prompt_messages, sort_keys=True)
        if key not in prompt_cache:
            prompt_cache[key] = list(tokenizer.apply_chat_template(
                c.prompt_messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        return prompt_cache[key]

    def seq(prompt: Comparison, reply: list[int]) -> int:
        key = (prompt.prompt_id, tuple(reply))
        if key not in index:
            index[key] = len(sequences)
            sequences.append(cut_sequence(prompt_ids(prompt), list(reply), d.max_tokens))
        return index[key]

    def pairs_of(cs: list[Comparison]) -> list[tuple[int, int]]:
        return [(seq(c, c.reply_ids[i]), seq(c, c.reply_ids[j])) for c in cs
                for i, j in preference_pairs(list(c.ranks), d.pairs)
                if list(c.reply_ids[i]) != list(c.reply_ids[j])]  # the same reply ranked twice: no signal

    held = pairs_of(heldout)
    if d.loss != "kto":
        rows, desirable = pairs_of(train), None
    else:
        examples = [(c, list(c.reply_ids[i]), good) for c in train for i, good in _kto_rows(c, kto_examples)]
        # KL rows: each prompt with the reply of the next example of another prompt (mismatched).
        rows, desirable = [], []
        for k, (c, reply, good) in enumerate(examples):
            other = next((e for e in examples[k + 1:] + examples[:k] if e[0].prompt_id != c.prompt_id), None)
            if other is None:
                raise BadInput("dpo.loss kto: needs comparisons of at least two prompts (for its reference point)")
            rows.append((seq(c, reply), seq(c, other[1])))
            desirable.append(good)
    if not rows:
        raise BadInput(f"dpo: the {len(train)} training comparisons give no pair of different replies")
    return DPOData(sequences=sequences, ref_logps=None, train=rows, desirable=desirable, heldout=held), \
        (len(rows), len(held))


def _kto_rows(c: Comparison, kto_examples) -> list[tuple[int, bool]]:
    """kto_examples of one comparison without replies that are both desirable and undesirable
    (the same reply sampled twice and ranked apart)."""
    rows = kto_examples(list(c.ranks))
    sides = {(tuple(c.reply_ids[i]), good) for i, good in rows}
    return [(i, good) for i, good in rows if (tuple(c.reply_ids[i]), not good) not in sides]


def cut_sequence(prompt: list[int], reply: list[int], max_tokens: int) -> tuple[list[int], list[int]]:
    """(prompt + reply ids, reply mask), at most max_tokens long: the prompt loses its start
    first (the reply is what is scored); a reply longer than max_tokens - 1 loses its end."""
    reply = reply[: max_tokens - 1]
    prompt = prompt[-(max_tokens - len(reply)):]
    return prompt + reply, [0] * len(prompt) + [1] * len(reply)


def _with_reference(cfg: ExperimentConfig, policy_path: str, data):
    """`data` with the summed reply log-probs of every sequence under the reference (the
    starting policy), computed once by a ReferenceModel actor; 0s for `dpo.reference: false`,
    None for reference-free losses."""
    import dataclasses

    import ray
    import torch

    from rlhf.actors.dpo_worker import reply_logps
    from rlhf.actors.reference import ReferenceModel
    from rlhf.orchestrator.experience import dialogue_batch
    from rlhf.orchestrator.rl.preference import REFERENCE_FREE

    if cfg.dpo.loss in REFERENCE_FREE:
        return data
    if cfg.dpo.reference is False:
        return dataclasses.replace(data, ref_logps=[0.0] * len(data.sequences))
    # Sorted by length so that each micro-batch is trimmed to little padding.
    order = sorted(range(len(data.sequences)), key=lambda i: len(data.sequences[i][0]))
    batch = dialogue_batch([data.sequences[i] for i in order], pad_id=0)  # pad positions are masked out
    actor = ray.remote(ReferenceModel).options(num_cpus=1, num_gpus=1 if cfg.placement.gpus_per_node else 0).remote(
        model_path=str(policy_path), dtype=cfg.model.dtype, micro_batch_size=2 * cfg.dpo.micro_batch_size)
    try:
        logp = ray.get(actor.compute_logprobs.remote(batch), timeout=REFERENCE_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise RemoteCallTimeout(f"reference actor: no log-probs for {len(order)} sequences within "
                                f"{REFERENCE_TIMEOUT_S:.0f} s") from None
    except ray.exceptions.RayError as err:
        raise RemoteCallFailed(f"reference actor failed: {str(err).strip().splitlines()[-1][:300]}") from err
    finally:
        ray.kill(actor)  # its CPU and memory go to the training workers
    sums, _ = reply_logps(logp, batch.action_mask)
    ref = torch.empty(len(order), dtype=torch.float64)
    ref[torch.tensor(order)] = sums.double()
    return dataclasses.replace(data, ref_logps=ref.tolist())


def run_dpo_stage(cfg: ExperimentConfig, out_dir: str | Path, address: str | None = None,
                  max_steps: int | None = None) -> DPOResult:
    """`rlhf dpo`: OUT/comparisons.sqlite + data.comparisons -> OUT/dpo/checkpoint."""
    from transformers import AutoTokenizer

    from rlhf.orchestrator.models.scoring import turn_end_ids
    from rlhf.orchestrator.ppo.launch import resolve_policy, start_ray
    from rlhf.orchestrator.recipe.sft import is_model_dir
    from rlhf.orchestrator.recipe.stages import STORE_FILE, tokenizer_corpus, preference_comparisons, stage_comparisons
    from rlhf.orchestrator.run.lock import holds
    from rlhf.orchestrator.run.rundir import prepare_run_dir

    out = Path(out_dir).resolve()
    pairs, stored = stage_comparisons(cfg, out)  # bad files fail before any folder
    created = not out.exists()
    try:
        out = prepare_run_dir(out, cfg)
        sft = out / "sft" / "checkpoint"
        model = str(sft) if is_model_dir(sft) else resolve_policy(cfg, out, tokenizer_corpus(pairs, stored))
        tokenizer = AutoTokenizer.from_pretrained(model)
        if tokenizer.chat_template is None:
            raise BadInput(f"model.policy: the tokenizer of {model} has no chat template")
        comparisons = preference_comparisons(pairs, tokenizer, turn_end_ids(model, tokenizer)) + stored
        start_ray(address, cfg.dpo.num_workers + 1, out)
        result = run_dpo(cfg, model, comparisons, out / "dpo", max_steps=max_steps)
    except BadInput:
        if created and holds(out):  # nothing half-written: the folder this call made goes again
            shutil.rmtree(out, ignore_errors=True)
        raise

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.0%}"
    print(f"dpo done ({cfg.dpo.loss}): {result.train_pairs} train / {result.heldout_pairs} held-out pairs from "
          f"{len(comparisons)} comparisons ({len(pairs)} from data.comparisons, {len(stored)} from {STORE_FILE}), "
          f"start {model}; held-out implicit-reward accuracy {pct(result.heldout_accuracy_before)} -> "
          f"{pct(result.heldout_accuracy_after)}, {result.steps} steps; model in {result.checkpoint}")
    return result
