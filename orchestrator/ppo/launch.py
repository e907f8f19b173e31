"""`rlhf ppo`: resolve the models, start Ray, place and launch every role, run the steps.

Run on one CPU machine (embedded local Ray):
    rlhf ppo configs/ppo-tiny.yaml --out runs/ppo-tiny
On a cluster (join a running Ray cluster; see deploy/):
    rlhf ppo configs/CONFIG.yaml --address auto
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import ray

from rlhf.actors.timing import with_compute_clock
from rlhf.orchestrator.run.checkpoint import CheckpointManager
from rlhf.orchestrator.config import ExperimentConfig, max_sequence_tokens
from rlhf.orchestrator.evidence.prepare import evidence_spec, prepare_evidence, tool_spec  # noqa: F401
from rlhf.orchestrator.errors import BadInput, TrainingAborted
from rlhf.orchestrator.ppo.groups import LearnerGroup, wait_all
from rlhf.orchestrator.ppo.judging import JudgePlan, Selection
from rlhf.orchestrator.run.logger import RunLogger
from rlhf.orchestrator.ppo.placement import (create_placement_groups, plan_resources, plan_threads, reference_in_policy,
                                             reward_in_driver)
from rlhf.orchestrator.data.dialogues import encode_dialogues, load_sft_dialogues
from rlhf.orchestrator.data.prompts import build_prompts, load_prompts, prompt_batches
from rlhf.orchestrator.run.rundir import prepare_run_dir, replace_folder, write_atomic
from rlhf.orchestrator.run.lock import holds, lock_run_dir
from rlhf.orchestrator.run.quiet import WORKER_LOG, quiet_driver, route_worker_output
from rlhf.orchestrator.ppo.trainer import kl_abort_reason
from rlhf.orchestrator.ppo.weight_sync import make_weight_sync
from rlhf.orchestrator.tasks import load_task


@dataclass
class Roles:
    rollout: object            # RolloutGroup
    policy: LearnerGroup
    critic: LearnerGroup | None
    reference: LearnerGroup
    reward: object             # RewardScorer actor, or (reward_in_driver) the RewardScorer itself
    sync: object               # WeightSync
    reward_in_driver: bool = False  # reward.scorer: the driver scores the replies (no actor, no call)


def resolve_policy(cfg: ExperimentConfig, out: Path, dialogues: list[list[dict]]) -> str:
    """The initial policy folder: built from the task corpus for `tiny`, imported once for a
    known name (`rlhf model list`), else the name/path as given."""
    if cfg.model.policy != "tiny":
        from rlhf.orchestrator.models.registry import resolve_model

        policy = resolve_model(cfg.model.policy, "model.policy")
        path = Path(policy)
        if path.is_dir():
            return str(path.resolve())  # actors run in other working directories
        if path.is_absolute() or policy.startswith(".") or (path.parent != Path(".") and path.parent.is_dir()):
            raise BadInput(f"model.policy: no such model folder: {path}")
        return policy  # a hub name such as Qwen/Qwen2.5-0.5B-Instruct
    from rlhf.orchestrator.models.tiny import TinyModelSpec, build_tiny_from_corpus, is_complete_model_dir

    model_dir = out / "init_model"
    if not is_complete_model_dir(model_dir):
        corpus = ["\n".join(f"{m['role']}: {m['content']}" for m in d) for d in dialogues]
        build_tiny_from_corpus(corpus, model_dir, spec=TinyModelSpec(**cfg.model.tiny.model_dump()),
                               seed=cfg.seed, overwrite=True)
    return str(model_dir)


def start_ray(address: str | None, num_cpus: int, run_dir: Path | None = None) -> None:
    """Joins `address`, or starts an embedded local Ray on loopback without the dashboard; a
    local one writes its workers' output to RUN_DIR/logs/ray-workers.log (run/quiet.py)."""
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # address="local": always a fresh embedded cluster, never one found running here. No
        # runtime env: workers inherit this process's environment (quiet_driver sets QUIET_ENV
        # in it) and set their loggers up themselves (run/quiet.py), so Ray's pre-started
        # workers serve the first actors.
        quiet_driver()
        ray.init(address="local", num_cpus=max(num_cpus, os.cpu_count() or 1), include_dashboard=False,
                 _node_ip_address="127.0.0.1", log_to_driver=True, logging_level=logging.WARNING)
        if run_dir is not None and route_worker_output(Path(run_dir) / WORKER_LOG):
            print(f"ray: local cluster started; worker output in {Path(run_dir) / WORKER_LOG}", flush=True)


class RayStart:
    """`start_ray` in a background thread, so that a local Ray's daemons start on the idle
    cores while the driver goes on with its own single-threaded start-up (transformers'
    import, the tiny model, the tokenizer, the prompts: about 6 s of one core on ppo-tiny).
    `ready()` blocks until Ray is up and re-raises its error; joining a cluster (`address`),
    or a Ray this process already runs, happens there, in this thread. `abandon()` (bad input
    found meanwhile) shuts down a local Ray that this start began.

    The thread stays parked once Ray is up: Ray starts its processes with PR_SET_PDEATHSIG,
    which fires when the *thread* that started them ends. Ray sets its SIGTERM handler (exit,
    so that Ray shuts down) only from the main thread, so it is set here."""

    def __init__(self, address: str | None, num_cpus: int, run_dir: Path) -> None:
        self.args = (address, num_cpus, run_dir)
        self.local = not address and not ray.is_initialized()
        self.up, self.failed = threading.Event(), []
        if self.local:
            quiet_driver()  # the workers' environment, before any Ray process starts
            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
            threading.Thread(target=self._run, name="ray-start", daemon=True).start()

    def _run(self) -> None:
        try:
            start_ray(*self.args)
        except BaseException as err:  # noqa: BLE001 - re-raised by ready()
            self.failed.append(err)
        self.up.set()
        threading.Event().wait()  # parked for the life of the driver

    def ready(self) -> None:
        if not self.local:
            start_ray(*self.args)
            return
        self.up.wait()
        if self.failed:
            raise self.failed[0]

    def abandon(self) -> None:
        if self.local:
            self.up.wait()
            ray.shutdown()


@dataclass(frozen=True)
class ModelPaths:
    """Which folder each role loads. In the pipeline the reference is the SFT model and the
    critic starts from the reward model (InstructGPT); a plain `rlhf ppo` uses the policy."""

    policy: str
    reference: str
    critic: str


def model_paths(cfg: ExperimentConfig, policy: str, reference: str | None = None) -> ModelPaths:
    critic = cfg.model.reward if (cfg.critic.init == "reward" and cfg.model.reward) else policy
    return ModelPaths(policy=policy, reference=reference or policy, critic=critic)


def check_lora_targets(cfg: ExperimentConfig, paths: ModelPaths) -> None:
    """policy.lora / critic.lora target modules that match nothing: BadInput now, on the meta
    device, before Ray or DeepSpeed start (rlhf.actors.lora)."""
    from rlhf.actors.lora import LoraArgs, check_targets_for

    check_targets_for(paths.policy, LoraArgs.from_config(cfg.policy.lora, "policy.lora"))
    if cfg.ppo.advantage == "gae":
        check_targets_for(paths.critic, LoraArgs.from_config(cfg.critic.lora, "critic.lora"))


def check_all_lora_targets(cfg: ExperimentConfig, out: Path) -> None:
    """sft/rm/policy/critic.lora against the starting model before Ray starts (pipeline, sft
    and rm stages). A tiny model is not built yet: run_sft, run_rm and start_ppo check it
    in the driver once it is, before any worker starts."""
    from rlhf.actors.lora import LoraArgs, check_targets_for

    if cfg.model.policy == "tiny":
        return
    path = resolve_policy(cfg, out, [])
    for key in ("sft", "rm", "policy", "critic"):
        check_targets_for(path, LoraArgs.from_config(getattr(cfg, key).lora, f"{key}.lora"))


def rollout_engine_class(backend: str) -> type:
    """The engine class of `rollout.backend`. Both take the same arguments (the HF one
    ignores the vLLM-only ones) and have the same methods."""
    if backend == "hf":
        from rlhf.actors.rollout_hf import HFRolloutEngine

        return HFRolloutEngine
    from rlhf.actors.rollout import RolloutEngine

    return RolloutEngine


def _tools_kwarg(cfg: ExperimentConfig) -> dict:
    """`tools=` for an engine's constructor when rollout.tools is set (older engines need no new kwarg)."""
    spec = tool_spec(cfg)
    return {"tools": spec} if spec else {}


def sampling_rollout(cfg: ExperimentConfig, policy: str, seed: int, max_model_len: int | None = None):
    """One rollout engine on the `policy` folder, outside any placement group, as a RolloutGroup
    (the caller shuts it down): for sampling outside PPO (comparisons, best-of-N, the LLM judge).
    `max_model_len`: default data.max_prompt_tokens + rollout.max_new_tokens (a judge's prompts
    hold a whole conversation and two replies, so it asks for more)."""
    from rlhf.orchestrator.ppo.rollout_group import RolloutGroup

    gpus = cfg.rollout.tensor_parallel_size if cfg.placement.gpus_per_node else 0
    engine = ray.remote(rollout_engine_class(cfg.rollout.backend)).options(num_cpus=1, num_gpus=gpus).remote(
        model_path=policy, dtype=cfg.model.dtype,
        max_model_len=max_model_len or max_sequence_tokens(cfg),
        seed=seed, kv_cache_gib=cfg.rollout.kv_cache_gib, gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
        tensor_parallel_size=cfg.rollout.tensor_parallel_size, enforce_eager=gpus == 0, **_tools_kwarg(cfg))
    return RolloutGroup([engine], tensor_parallel_size=cfg.rollout.tensor_parallel_size)


def launch_roles(cfg: ExperimentConfig, paths: ModelPaths, pgs, timeout_s: float) -> Roles:
    from rlhf.actors.learner import CriticLearner, LearnerArgs, PolicyLearner
    from rlhf.actors.lora import LoraArgs
    from rlhf.actors.reference import ReferenceModel
    from rlhf.actors.reward import RewardScorer
    from rlhf.orchestrator.ppo.rollout_group import RolloutGroup

    def remote(cls, role: str, index: int, **restart):
        return ray.remote(with_compute_clock(cls)).options(scheduling_strategy=pgs.strategy(role, index),
                                                           **pgs.resources(role), **restart)

    # A dead engine is restarted by Ray but its calls are NOT retried by Ray: the rollout
    # group re-syncs the fresh engine's weights first, then re-issues its prompts. The reward
    # actor is stateless, so Ray may simply restart it and retry the call.
    engine_restart = dict(max_restarts=cfg.rollout.max_restarts, max_task_retries=0)
    reward_restart = dict(max_restarts=cfg.rollout.max_restarts, max_task_retries=cfg.rollout.max_restarts)

    threads = plan_threads(cfg, os.cpu_count() or 1)  # each phase's actors share the cores
    engine_cls = rollout_engine_class(cfg.rollout.backend)
    engine_threads = {"num_threads": threads.rollout} if cfg.rollout.backend == "hf" else {}  # vLLM binds its own
    engines = [remote(engine_cls, "rollout", i, **engine_restart).remote(
        model_path=paths.policy, dtype=cfg.model.dtype,
        max_model_len=max_sequence_tokens(cfg), seed=cfg.seed + i,
        kv_cache_gib=cfg.rollout.kv_cache_gib, gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
        tensor_parallel_size=cfg.rollout.tensor_parallel_size,
        enforce_eager=cfg.placement.gpus_per_node == 0,  # CUDA graphs only pay off on GPUs
        **engine_threads, **_tools_kwarg(cfg)) for i in range(cfg.rollout.engines)]
    in_policy = reference_in_policy(cfg)

    def learner_args(section, model_path: str, seed_offset: int) -> LearnerArgs:
        role = "policy" if section is cfg.policy else "critic"
        return LearnerArgs(model_path=model_path, dtype=cfg.model.dtype, zero_stage=section.zero_stage,
                           lr=section.lr, weight_decay=section.weight_decay, grad_clip=section.grad_clip,
                           warmup_steps=section.warmup_steps, micro_batch_size=cfg.ppo.micro_batch_size,
                           seed=cfg.seed + seed_offset, temperature=cfg.rollout.temperature,
                           backend="nccl" if cfg.placement.gpus_per_node else "gloo", offload=section.offload,
                           gradient_checkpointing=section.gradient_checkpointing, packing=cfg.model.packing,
                           lora=LoraArgs.from_config(section.lora, f"{role}.lora"),
                           num_threads=threads.forward, train_threads=threads.train,
                           reference_path=paths.reference if in_policy and role == "policy" else None)

    policy = LearnerGroup("policy", [remote(PolicyLearner, "policy", i).remote(learner_args(cfg.policy, paths.policy, 0))
                                     for i in range(cfg.policy.num_ranks)], timeout_s)
    critic = None
    if cfg.ppo.advantage == "gae":
        critic = LearnerGroup("critic", [remote(CriticLearner, "critic", i).remote(learner_args(cfg.critic, paths.critic, 1))
                                         for i in range(cfg.critic.num_ranks)], timeout_s)
    ref = cfg.reference  # ZeRO-3 ranks partition the model and join a process group below
    if in_policy:  # each policy rank holds the reference too: no actors, no object-store hop
        reference = LearnerGroup("reference", policy.ranks, timeout_s, aliases={"compute_logprobs": "reference_logprobs"})
    else:
        reference = LearnerGroup("reference", [remote(ReferenceModel, "reference", i).remote(
            model_path=paths.reference, dtype=cfg.model.dtype, micro_batch_size=cfg.ppo.micro_batch_size,
            zero_stage=ref.zero_stage, offload=ref.offload, backend="nccl" if cfg.placement.gpus_per_node else "gloo",
            packing=cfg.model.packing, num_threads=threads.forward)
            for i in range(ref.num_ranks)], timeout_s)
    scorer_args = dict(tokenizer_path=paths.policy, functions=dict(cfg.reward.functions),
                       model_path=cfg.model.reward, model_weight=cfg.reward.model_weight, clip=cfg.reward.clip,
                       dtype=cfg.model.dtype, forbidden_phrases=list(cfg.reward.forbidden_phrases),
                       evidence=evidence_spec(cfg), rule_model_path=cfg.model.rule_reward,
                       rule_weights=dict(cfg.rule_rm.weights))
    in_driver = reward_in_driver(cfg)
    if in_driver:  # reward functions alone: built here while the actors start, run during the forwards
        reward = RewardScorer(**scorer_args)
    else:  # a reward model gets its own placement; functions alone (reward.scorer=actor) reserve nothing
        reward_cls = (remote(RewardScorer, "reward", 0, **reward_restart) if cfg.model.reward
                      else ray.remote(with_compute_clock(RewardScorer)).options(num_cpus=0, **reward_restart))
        reward = reward_cls.remote(**scorer_args, num_threads=threads.forward)
    # Wait for every constructor (model loads, engine start) so no phase timing includes them.
    actors = (engines + policy.ranks + ([] if in_policy else reference.ranks) + ([] if in_driver else [reward])
              + (critic.ranks if critic else []))
    wait_all([a.__ray_ready__.remote() for a in actors], timeout_s, "actor start-up (models loading)")
    groups = [g for g in (policy, critic, reference if ref.zero_stage == 3 and not in_policy else None) if g is not None]
    wait_all([r for g in groups for r in g.init_process_group_refs()], timeout_s,
             "init_process_group (" + ", ".join(g.role for g in groups) + ")")  # DeepSpeed engines, all at once
    rollout = RolloutGroup(engines, tensor_parallel_size=cfg.rollout.tensor_parallel_size, timeout_s=timeout_s)
    sync = make_weight_sync(cfg.sync.backend, policy, rollout, cfg.sync.bucket_mb, timeout_s)
    rollout.on_engine_restart = sync.resync  # a restarted engine holds the initial weights
    return Roles(rollout, policy, critic, reference, reward, sync, reward_in_driver=in_driver)


@dataclass
class PPOSession:
    """Everything a PPO run holds between start-up and shutdown."""

    cfg: ExperimentConfig
    out: Path
    roles: Roles
    trainer: object   # PPOTrainer
    prompts: object   # PromptSet
    batches: object   # iterator of prompt-index batches
    pgs: object       # PlacementGroups
    tokenizer: object = None  # the policy's tokenizer
    policy_path: str = ""     # folder the policy started from

    def close(self) -> None:
        self.trainer.close()
        self.roles.rollout.shutdown()
        self.pgs.remove()


def start_ppo(cfg: ExperimentConfig, out_dir: str | Path, address: str | None = None,
              timeout_s: float = 600.0, reference: str | None = None,
              ptx_rows: list | None = None, resume: bool = False) -> PPOSession:
    """Validates inputs, resolves the model, starts Ray, places and launches every role.

    `reference`: folder of the KL reference (default: the initial policy). `ptx_rows`:
    encoded demonstrations for PPO-ptx (needed when ppo.ptx_coef > 0). Bad input raises
    `BadInput` and leaves no new output folder behind."""
    from rlhf.orchestrator.ppo.trainer import PPOTrainer

    if not cfg.reward.functions and cfg.model.reward is None:
        raise BadInput("reward.functions: no reward source; set model.reward or at least one reward function")
    if cfg.model.reward is not None:  # a known name -> its imported folder
        from rlhf.orchestrator.models.registry import resolve_model

        reward = resolve_model(cfg.model.reward, "model.reward")
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"reward": reward})})
    plan = plan_resources(cfg)
    out = Path(out_dir).resolve()
    created, ray_start = not out.exists(), None
    try:
        # The folder's lock first (run/lock.py): a second writer is refused before it looks.
        lock_run_dir(out)
        if not resume and CheckpointManager(out / "checkpoints").latest() is not None:
            raise BadInput(f"output folder {out} holds checkpoints of an earlier run; pass --resume to continue it "
                           "or choose another --out")
        out = prepare_run_dir(out, cfg)
        task = load_task(cfg.data.task)
        cfg = prepare_evidence(cfg, task, out)  # rollout.tools search: the corpus (the task's, or evidence.corpus), indexed
        dialogues = load_prompts(cfg, task)
        demos = load_sft_dialogues(cfg, task, cfg.seed) if cfg.ppo.ptx_coef > 0 and ptx_rows is None else None
        # A tiny policy's tokenizer learns from whole demonstrations where there are some.
        corpus = demos or (task.demonstrations(cfg.data.task_size, cfg.seed)
                           if task is not None and cfg.model.policy == "tiny" else dialogues)
        model_path = None if cfg.model.policy == "tiny" else resolve_policy(cfg, out, corpus)  # folder or name
        # The data and model-name checks passed: Ray starts on the idle cores while this thread
        # imports transformers and builds a tiny model. A bad input found later (no chat
        # template, LoRA targets, every prompt too long) shuts it down again.
        ray_start = RayStart(address, int(plan.total("CPU")), out)
        from transformers import AutoTokenizer

        model_path = model_path or resolve_policy(cfg, out, corpus)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        if tokenizer.chat_template is None:
            raise BadInput(f"model.policy: the tokenizer of {model_path} has no chat template")
        check_lora_targets(cfg, model_paths(cfg, model_path, reference))
        prompts = build_prompts(dialogues, tokenizer, cfg.data.max_prompt_tokens, cfg.data.prompt_overflow)
        if demos is not None:
            ptx_rows = encode_dialogues(tokenizer, demos, cfg.sft.max_tokens).rows
        ray_start.ready()
        pgs = create_placement_groups(plan, cfg.placement.timeout_s)  # pre-flights the plan first
    except BadInput:
        if ray_start is not None:  # a local Ray this call started goes too
            ray_start.abandon()
        if created and holds(out):  # nothing half-written: the folder this call made goes again
            shutil.rmtree(out, ignore_errors=True)
        raise
    try:
        roles = launch_roles(cfg, model_paths(cfg, model_path, reference), pgs, timeout_s)
        if cfg.ppo.ptx_coef > 0:
            rows_ref = ray.put(ptx_rows)  # once, shared by every rank
            wait_all(roles.policy.call_all("set_ptx_data", rows_ref, cfg.ppo.ptx_coef, tokenizer.pad_token_id),
                     timeout_s, "policy set_ptx_data")
    except BaseException:
        pgs.remove()  # the actors die with their groups
        raise
    trainer = PPOTrainer(cfg, roles, prompts, tokenizer.pad_token_id, timeout_s)
    batches = prompt_batches(len(prompts.token_ids), cfg.ppo.prompts_per_step, cfg.seed)
    return PPOSession(cfg, out, roles, trainer, prompts, batches, pgs, tokenizer, model_path)


def _learner_groups(roles: Roles) -> list[tuple[str, LearnerGroup]]:
    return [("policy", roles.policy)] + ([("critic", roles.critic)] if roles.critic else [])


def save_checkpoint(session: PPOSession, ckpts: CheckpointManager, step: int, timeout_s: float) -> Path:
    """Every learner rank writes its DeepSpeed state into the checkpoint's temporary folder;
    the driver adds its own state; CheckpointManager makes it visible atomically."""
    def write(tmp: Path) -> None:
        refs = [r for name, group in _learner_groups(session.roles)
                for r in group.call_all("save_checkpoint", str(tmp / name))]
        wait_all(refs, timeout_s, "save_checkpoint (policy, critic ranks)")

    state = {"step": step, "name": session.cfg.name, "trainer": session.trainer.state_dict()}
    return ckpts.save(step, state, write)


def restore_checkpoint(session: PPOSession, ckpts: CheckpointManager, timeout_s: float) -> tuple[int, list[dict]]:
    """Loads the latest complete checkpoint that passes checkpoint.verify into the running
    roles; returns (steps done, metric rows up to then). No checkpoint: (0, []), a fresh start."""
    for partial in ckpts.clean_partial():
        print(f"resume: removed the incomplete checkpoint {partial.name} (a crash while it was written)")
    path, note = ckpts.select(session.cfg.checkpoint.verify)
    if note:
        print(f"resume: {note}")
    metrics = session.out / "metrics.jsonl"
    if path is None:
        print(f"resume: no checkpoint in {ckpts.root}; starting from step 1")
        return 0, []
    state = ckpts.load_state(path)
    refs = [r for name, group in _learner_groups(session.roles)
            for r in group.call_all("load_checkpoint", str(path / name))]
    wait_all(refs, timeout_s, f"load_checkpoint {path.name} (policy, critic ranks)")
    session.trainer.load_state_dict(state["trainer"])
    for _ in range(state["step"]):  # the data position: the prompt stream is reproducible from the seed
        next(session.batches)
    session.roles.sync.sync()  # the engines started from the initial weights
    # Rows logged after the checkpoint belong to steps about to be redone.
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.is_file() else []
    rows = [r for r in rows if r.get("step", 0) <= state["step"]]
    write_atomic(metrics, "".join(json.dumps(r) + "\n" for r in rows))
    print(f"resume: continuing after step {state['step']} from {path}")
    return state["step"], rows


def run_ppo(cfg: ExperimentConfig, out_dir: str | Path, max_steps: int | None = None,
            address: str | None = None, timeout_s: float = 600.0, reference: str | None = None,
            resume: bool = False, judge: JudgePlan | None = None, started_at: float | None = None) -> dict:
    """`rlhf ppo`: the steps with a progress bar, metrics to the logger, a resumable checkpoint
    every checkpoint.every steps and at the end, the final policy saved as an HF folder.
    `resume`: continue after the latest complete checkpoint in `out_dir` (fresh if none).
    `judge` (the pipeline's guard against over-optimisation, ppo/judging.py): score a held-out
    sample before step 1 and every `judge.every` steps, keep the best step's policy in
    checkpoints/best/policy, stop early after `judge.patience` evaluations below the best; the
    returned `policy_dir` is then the selected policy (the starting one if no step beat it).
    `started_at` (time.time()): when the command started, for `startup_s` (default: now), the
    seconds until the first step starts, printed in the summary and returned."""
    from tqdm import tqdm

    started = time.time() if started_at is None else started_at
    startup_s = None
    session = start_ppo(cfg, out_dir, address, timeout_s, reference=reference, resume=resume)
    steps = min(cfg.ppo.steps, max_steps) if max_steps else cfg.ppo.steps
    ckpts = CheckpointManager(session.out / "checkpoints", cfg.checkpoint.keep)
    policy_dir = session.out / "checkpoints" / "final" / "policy"
    best_dir = session.out / "checkpoints" / "best" / "policy"
    logger, stopped = None, None
    try:
        done, history = restore_checkpoint(session, ckpts, timeout_s) if resume else (0, [])
        logger = RunLogger(session.out, cfg.logger, cfg.name, cfg.model_dump(mode="json"), append=done > 0)
        selection = Selection.replay(judge.patience, history) if judge else None
        if judge and done == 0:  # step 0: the starting policy is a candidate too
            row = {"step": 0, "eval/labeler_score": judge.judge.evaluate(session.roles.rollout, session.tokenizer)}
            selection.update(0, row["eval/labeler_score"])
            logger.log(row)
            history.append(row)
        bar = tqdm(range(done + 1, steps + 1), desc="ppo", unit="step", dynamic_ncols=True, initial=done, total=steps)
        batch = next(session.batches)
        for step in bar:
            # The next step's prompts are drawn now: with rollout.overlap they are generated
            # while this step trains. (Draw order is the same either way: resume relies on it.)
            upcoming = next(session.batches) if step < steps else None
            if startup_s is None:
                startup_s = time.time() - started
            metrics = session.trainer.step(step, batch, next_prompt_index=upcoming)
            if step == done + 1:
                metrics["run/startup_s"] = startup_s
            batch = upcoming
            metrics["data/prompts_truncated"] = session.prompts.truncated
            metrics["data/prompts_rejected"] = session.prompts.rejected
            if judge and judge.due(step, steps):
                metrics["eval/labeler_score"] = judge.judge.evaluate(session.roles.rollout, session.tokenizer)
                if selection.update(step, metrics["eval/labeler_score"]) and judge.select == "best":
                    _save_policy(session, best_dir, timeout_s)
                stopped = step if selection.should_stop else None
            logger.log(metrics)
            history.append(metrics)
            if reason := kl_abort_reason(step, metrics["kl/mean"], cfg.ppo.abort_kl, cfg.policy.lr):
                raise TrainingAborted(reason)  # this step's row is logged; no checkpoint is taken of it
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", kl=f"{metrics['kl/mean']:.3f}",
                            **({"judge": f"{selection.history[-1][1]:.3f}"} if selection and selection.history else {}))
            if stopped or step == steps or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
                save_checkpoint(session, ckpts, step, timeout_s)
            if stopped:
                bar.close()  # the line below, not over the bar
                print(f"ppo: stopping early after step {step}: the judge's held-out score stayed below its best "
                      f"({selection.best_score:.3f} at step {selection.best_step}) for {judge.patience} evaluations")
                break
        _save_policy(session, policy_dir, timeout_s)
    finally:
        if logger is not None:
            logger.close()
        session.close()
    trained = [r for r in history if "reward/mean" in r]
    first, last = trained[0], trained[-1]
    selected, chosen = last["step"], policy_dir
    if judge and judge.select == "best":
        selected = selection.best_step
        chosen = best_dir if selected > 0 else Path(session.policy_path)
    print(f"ppo done: {last['step']} steps in {time.time() - started:.0f}s (start-up {startup_s or 0:.1f}s); reward/mean "
          f"{first['reward/mean']:.3f} -> {last['reward/mean']:.3f}, kl/mean {last['kl/mean']:.3f}; "
          + (f"judge {selection.history[0][1]:.3f} -> best {selection.best_score:.3f} at step {selected}; "
             if selection else "") + f"policy in {chosen}")
    return {"history": history, "policy_dir": chosen, "out": session.out, "selected_step": selected, "startup_s": startup_s,
            "stopped_early": stopped is not None, "last_policy_dir": policy_dir}


def _save_policy(session: PPOSession, dest: Path, timeout_s: float) -> None:
    """The policy as an HF folder at `dest`, replaced atomically (written next to it, renamed)."""
    tmp = dest.parent / f".{dest.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    wait_all(session.roles.policy.call_all("save_pretrained", str(tmp)), timeout_s, "policy save_pretrained")
    replace_folder(tmp, dest)
