"""The PPO driver: one `step()` is the algorithm box of InstructGPT-style RLHF.

    generate -> (score | reference log-probs | values | old log-probs) in parallel
             -> KL-shaped rewards and advantages -> PPO epochs on policy and critic
             -> weight sync to the rollout engines

The driver holds no model; it moves ObjectRefs between actor groups and does the cheap
per-token arithmetic (pure functions in orchestrator/rl/). Reward functions alone it scores
itself while the forwards run (reward.scorer). Launching the actors is in
orchestrator/ppo/launch.py.
"""
from __future__ import annotations

import concurrent.futures
import random
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm import tqdm

from rlhf.orchestrator.config import ExperimentConfig
from rlhf.orchestrator.experience import Experience, to_sequence_batch
from rlhf.orchestrator.errors import TrainingAborted
from rlhf.orchestrator.ppo.groups import Scattered, wait_all
from rlhf.orchestrator.rl import (AdaptiveKLController, AdvantageInputs, AdvantageParams, FixedKLController,
                                  behavior_importance_weights, compute_advantages, masked_mean, masked_sum,
                                  masked_whiten, shape_rewards)


@dataclass
class Advantages:
    advantages: torch.Tensor  # [B, T-1]
    returns: torch.Tensor     # [B, T-1]
    kl: torch.Tensor          # [B, T-1] per-token KL estimate (0 outside the action mask)


def make_advantages(name: str, scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor,
                    values: torch.Tensor | None, mask: torch.Tensor, kl_coef: float, kl_estimator: str,
                    gamma: float, lam: float, n: int, whiten: bool, kl_clamp: float | None = None) -> Advantages:
    """KL-shaped rewards, then advantages by estimator name.  Token tensors [B, T-1], scores [B].

    gae, reinforce_pp: r_t = -beta * KL_t, plus the score at the last response token.
    grpo, rloo: outcome-level, so the KL enters the sequence score: r = score - beta * sum_t KL_t.
    `whiten` normalises GAE advantages over the batch (group estimators normalise themselves).
    `kl_clamp` bounds each token's KL estimate to [-kl_clamp, kl_clamp] (ppo.kl.clamp; None = off).
    """
    rewards, kl = shape_rewards(scores, logp, ref_logp, mask, kl_coef, kl_estimator, kl_clamp)
    params = AdvantageParams(gamma=gamma, lam=lam, n=n)
    if name in ("grpo", "rloo"):
        inputs = AdvantageInputs(mask=mask, scores=scores - kl_coef * masked_sum(kl, mask, dim=1))
    else:
        inputs = AdvantageInputs(mask=mask, scores=scores, rewards=rewards, values=values)
    advantages, returns = compute_advantages(name, inputs, params)
    if whiten and name == "gae":
        advantages = masked_whiten(advantages, mask)
    return Advantages(advantages, returns, kl)


def sampler_logprobs(samples, mask: torch.Tensor) -> torch.Tensor:
    """The engines' per-token log-probs of the sampled replies, laid out like the learner's
    [B, T-1] tensors (0 outside `mask`). The log-probs are of the policy's tokens only, so they go
    onto the mask's 1-positions in order (a tool's inserted tokens are gaps in the mask)."""
    sampler = torch.zeros(mask.shape, dtype=torch.float32)
    counts = mask.bool().sum(1).tolist()
    for i, (lp, count) in enumerate(zip(samples.response_logprobs, counts)):
        if len(lp) != count:
            raise ValueError(f"sample {i}: {len(lp)} sampler log-probs for {count} policy tokens")
    sampler[mask.bool()] = torch.tensor([x for lp in samples.response_logprobs for x in lp], dtype=torch.float32)
    return sampler  # boolean-mask assignment fills row by row, positions in order


def kl_abort_reason(step: int, kl_per_reply: float, abort_kl: float | None, lr: float) -> str | None:
    """ppo.abort_kl: the one-line reason to stop the run after `step`, or None to go on.

    `kl_per_reply` is the step's `kl/mean` (summed per-token KL estimate to the reference,
    averaged over replies). Past `abort_kl` nats the policy no longer writes like its starting
    model (a learning rate far too high for a pretrained model does that in one step) and more
    steps only spend time. A NaN KL is left to the non-finite guard; `abort_kl` None: never.
    """
    if abort_kl is None or not kl_per_reply > abort_kl:
        return None
    return (f"ppo step {step}: KL to the reference reached {kl_per_reply:.1f} nats per reply (ppo.abort_kl = "
            f"{abort_kl:g}): the policy has left its starting model; lower policy.lr (now {lr:g}) or raise "
            "ppo.abort_kl")


class PhaseTimer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


class PPOTrainer:
    def __init__(self, cfg: ExperimentConfig, roles, prompts, pad_id: int, timeout_s: float = 600.0) -> None:
        self.cfg, self.roles, self.prompts, self.pad_id, self.timeout_s = cfg, roles, prompts, pad_id, timeout_s
        kl = cfg.ppo.kl
        self.kl_ctl = (AdaptiveKLController(kl.coef, kl.target, kl.horizon) if kl.target is not None
                       else FixedKLController(kl.coef))
        self.rng = random.Random(cfg.seed)
        self.nonfinite = {"consecutive": 0, "total": 0}  # skipped updates (non-finite loss/grad)
        self.reward_restarts, self._scorer = 0, None
        # rollout.overlap: the next step's generation runs in this thread while the learners train.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout") if cfg.rollout.overlap else None
        self._pending: tuple[int, Future] | None = None
        self.old_logprobs = cfg.ppo.old_logprobs  # "sampler" falls back to "learner" (_check_sampler_gap)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def state_dict(self) -> dict:
        """Driver state a checkpoint needs for an exact resume (JSON-serialisable)."""
        version, internal, gauss = self.rng.getstate()
        return {"kl_ctl": self.kl_ctl.state_dict(), "rng": [version, list(internal), gauss],
                "nonfinite": dict(self.nonfinite), "reward_restarts": self.reward_restarts,
                "rollout_restarts": self.roles.rollout.restarts, "old_logprobs": self.old_logprobs}

    def load_state_dict(self, state: dict) -> None:
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.nonfinite = dict(state["nonfinite"])
        self.reward_restarts = state["reward_restarts"]
        self.roles.rollout.restarts = state["rollout_restarts"]
        self.old_logprobs = state.get("old_logprobs", self.cfg.ppo.old_logprobs)

    def _generate(self, step: int, prompt_index: list[int]):
        cfg, n = self.cfg, self.cfg.rollout.n_samples
        # Seeds advance by more than n x prompts per step so no two samples share one.
        samples = self.roles.rollout.generate(
            [self.prompts.token_ids[i] for i in prompt_index], n=n, temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p, max_new_tokens=cfg.rollout.max_new_tokens,
            seed=(cfg.seed * 1_000_003 + step) * (n * len(prompt_index) + 1))
        samples.prompt_index = [prompt_index[i] for i in samples.prompt_index]
        return samples

    def step(self, step: int, prompt_index: list[int], next_prompt_index: list[int] | None = None) -> dict:
        """One PPO step on `prompt_index`. With rollout.overlap, `next_prompt_index` (the next
        step's prompts) is generated while the learners train: one step off-policy."""
        cfg, roles, timer = self.cfg, self.roles, PhaseTimer()
        n, use_critic = cfg.rollout.n_samples, roles.critic is not None

        # 1. Rollout: n samples per prompt from the engines (or the batch they generated
        #    during the previous step's training, with rollout.overlap).
        with timer("generate"):
            if self._pending is not None and self._pending[0] == step:
                samples = self._pending[1].result(timeout=self.timeout_s)
            else:
                samples = self._generate(step, prompt_index)
            self._pending = None

        # 2. Experience: score, reference log-probs, values and the old log-probs are
        #    independent, so all run at once; the driver waits once. The old log-probs are
        #    the learner's forward, or (ppo.old_logprobs=sampler) the engines' own.
        with timer("experience"):
            batch = to_sequence_batch(samples, self.pad_id)
            mask, scattered = batch.action_mask, Scattered(batch)
            # The learners' forwards go out first; the reward call (often just rule functions) last.
            refs = {"ref": roles.reference.forward_refs("compute_logprobs", scattered,
                                                        temperature=cfg.rollout.temperature)}
            if self.old_logprobs == "learner":
                refs["old"] = roles.policy.forward_refs("compute_logprobs", scattered)
            if use_critic:
                refs["values"] = roles.critic.forward_refs("compute_values", scattered)
            # Only this step's prompt texts travel, keyed by index: a few KB inline with the call,
            # where the whole prompt set from the object store cost the scorer ~2.5 ms a step to load.
            messages = {p: self.prompts.messages[p] for p in samples.prompt_index}
            if roles.reward_in_driver:  # reward functions alone: scored here while the forwards run
                scores = roles.reward.score(samples, messages)
            else:
                refs["score"] = [roles.reward.score.remote(samples, messages)]
            sampler = sampler_logprobs(samples, mask)  # the engines' own log-probs, [B, T-1]
            flat = [r for group in refs.values() for r in group]
            got = iter(wait_all(flat, self.timeout_s, "experience (reward, reference, policy, critic forward)"))
            results = {k: [next(got) for _ in v] for k, v in refs.items()}
            if "score" in results:
                scores = results["score"][0]
            ref_logp = torch.cat(results["ref"])
            old_logp = torch.cat(results["old"]) if "old" in results else sampler
            values = torch.cat(results["values"]) * mask if use_critic else None

            # 3. KL-shaped rewards and advantages (pure functions, orchestrator/rl/).
            adv = make_advantages(cfg.ppo.advantage, torch.tensor(scores.total), old_logp, ref_logp, values, mask,
                                  self.kl_ctl.value, cfg.ppo.kl.estimator, cfg.ppo.gamma, cfg.ppo.lam, n,
                                  cfg.ppo.whiten_advantages, kl_clamp=cfg.ppo.kl.clamp)
            advantages = adv.advantages
            if cfg.rollout.overlap:  # off-policy by one step: weight by pi_learner / pi_sampler
                advantages = advantages * behavior_importance_weights(
                    old_logp, sampler, mask, cfg.rollout.overlap_is_cap)
            exp = Experience(batch, old_logp, ref_logp, advantages, adv.returns, values)

        # 4. PPO epochs: every mini-batch is one optimizer step on every rank; all of a step's
        #    mini-batches go to each rank in one call (run in order) and are awaited together.
        with timer("train"):
            if self._pool is not None and next_prompt_index is not None:
                # The engines still hold the weights this batch was sampled with; they generate
                # the next batch now and get the new weights once both are done (below).
                self._pending = (step + 1, self._pool.submit(self._generate, step + 1, next_prompt_index))
            minibatches = [Scattered(mb) for _ in range(cfg.ppo.epochs) for mb in self._minibatches(exp)]
            # With sampler old log-probs, the first mini-batch also measures their gap to the
            # learner's own, before the first optimizer step (the guard, below).
            guard = {"measure_gap": True} if self.old_logprobs == "sampler" else {}
            refs = roles.policy.train_all([(mb, guard if i == 0 else {}) for i, mb in enumerate(minibatches)],
                                          reads=("old_logp", "advantages"), clip_eps=cfg.ppo.clip,
                                          dual_clip=cfg.ppo.dual_clip, entropy_coef=cfg.ppo.entropy_coef,
                                          loss_agg=cfg.ppo.loss_agg)
            if use_critic:
                refs += roles.critic.train_all([(mb, {}) for mb in minibatches], reads=("old_values", "returns"),
                                               value_clip=cfg.ppo.value_clip, loss_agg=cfg.ppo.loss_agg)
            # Idle engines (no overlapped generation) can take the new weights the moment the
            # policy ranks finish: the sync queues behind training, one round trip sooner.
            queued_sync = roles.sync.start() if self._pending is None else None
            per_rank = wait_all(refs, self.timeout_s, "PPO train_step")
            n_policy = len(roles.policy)  # stats: mini-batch major, rank minor; the policy's, then the critic's
            policy_stats = [s for ranks in zip(*per_rank[:n_policy]) for s in ranks]
            critic_stats = [s for ranks in zip(*per_rank[n_policy:]) for s in ranks]
            stats = policy_stats + critic_stats
            skipped = self._count_nonfinite(policy_stats[::n_policy],
                                            critic_stats[::len(roles.critic)] if use_critic else [])

        # 5. Weight sync: the engines must sample from the updated policy next step (with
        #    rollout.overlap: once they have finished the batch they are generating).
        if self._pending is not None:
            with timer("overlap_wait"):
                concurrent.futures.wait([self._pending[1]], timeout=self.timeout_s)
        with timer("weight_sync"):
            sync = roles.sync.finish(queued_sync)

        gap = self._check_sampler_gap(step, stats[:len(roles.policy)])
        kl_per_seq = masked_sum(adv.kl, mask, dim=1)
        self.kl_ctl.update(float(kl_per_seq.mean()), len(samples))
        self._count_reward_restart(scores.scorer)
        metrics = self._metrics(step, samples, scores, mask, kl_per_seq, old_logp, sampler, exp, stats, sync, timer)
        metrics["ppo/old_logprobs_from_sampler"] = float(gap is not None)
        if gap is not None:  # sampler old log-probs: the gap the first mini-batch measured
            metrics["rollout/logprob_gap"] = gap
        metrics.update({"train/nonfinite_skips": skipped, "train/nonfinite_skips_total": self.nonfinite["total"],
                        "ray/actor_restarts": roles.rollout.restarts + self.reward_restarts})
        return metrics

    def _check_sampler_gap(self, step: int, first_stats: list[dict]) -> float | None:
        """ppo.old_logprobs=sampler's guard: the mean |learner - sampler| log-prob gap of the
        first mini-batch (every rank's), or None with learner old log-probs. Above
        ppo.old_logprobs_max_gap the engines do not compute what the learner does (bf16
        kernels, top_p, a stale sync), and the run uses the learner's forward from now on."""
        gaps = [s["policy/old_logprob_gap"] for s in first_stats if "policy/old_logprob_gap" in s]
        if not gaps:
            return None
        gap = sum(gaps) / len(gaps)
        if not gap <= self.cfg.ppo.old_logprobs_max_gap:
            self.old_logprobs = "learner"
            tqdm.write(f"ppo step {step}: the engines' log-probs differ from the learner's by {gap:.2e} per token "
                       f"(ppo.old_logprobs_max_gap = {self.cfg.ppo.old_logprobs_max_gap:g}); using the learner's "
                       "forward for the old log-probs from the next step on")
        return gap

    def _count_nonfinite(self, policy_stats: list[dict], critic_stats: list[dict]) -> int:
        """Updates skipped this step (every rank skips together, so rank 0's stats tell);
        aborts after ppo.max_nonfinite_skips consecutive ones: the run is diverging, and
        the last checkpoint (from before) is what to resume from with other settings."""
        skipped = 0
        for i, pol in enumerate(policy_stats):
            crit = critic_stats[i] if i < len(critic_stats) else {}
            if pol.get("policy/nonfinite_skips", 0) or crit.get("critic/nonfinite_skips", 0):
                skipped += 1
                self.nonfinite["consecutive"] += 1
                self.nonfinite["total"] += 1
            else:
                self.nonfinite["consecutive"] = 0
            if self.nonfinite["consecutive"] >= self.cfg.ppo.max_nonfinite_skips:
                raise TrainingAborted(
                    f"policy/critic: {self.nonfinite['consecutive']} consecutive updates had a non-finite loss, "
                    f"advantage or gradient norm (ppo.max_nonfinite_skips = {self.cfg.ppo.max_nonfinite_skips}); "
                    "stopping. Lower the learning rates or check the reward; --resume continues from the last checkpoint")
        return skipped

    def _count_reward_restart(self, scorer: str) -> None:
        """Ray restarts a dead reward actor and retries its call; the new process has a new id."""
        if self._scorer is not None and scorer != self._scorer:
            self.reward_restarts += 1
        self._scorer = scorer

    def _minibatches(self, exp: Experience) -> list[Experience]:
        """Shuffled mini-batches of ppo.train_batch_size samples (trailing padding trimmed).
        With model.packing whole prompt groups are shuffled, so a micro-batch holds the n
        replies of its prompts together and their packed forward computes each prompt once."""
        order = list(range(len(exp)))
        if self.cfg.model.packing:
            n = self.cfg.rollout.n_samples
            groups = [order[i:i + n] for i in range(0, len(order), n)]
            self.rng.shuffle(groups)
            order = [i for group in groups for i in group]
        else:
            self.rng.shuffle(order)
        size = self.cfg.ppo.train_batch_size
        return [exp.select(torch.tensor(order[i:i + size])).trimmed() for i in range(0, len(exp), size)]

    def _metrics(self, step, samples, scores, mask, kl_per_seq, old_logp, sampler, exp, stats, sync, timer) -> dict:
        lengths = mask.sum(1)
        step_s = sum(timer.seconds.values())
        tokens = int(exp.sequences.attention_mask.sum())
        metrics = {
            "step": step,
            "reward/mean": sum(scores.total) / len(scores.total),
            **{f"reward/{k}": sum(v) / len(v) for k, v in scores.components.items()},
            **scores.metrics,  # e.g. evidence/search_rate, evidence/supported_rate (actors/reward.py)
            "kl/mean": float(kl_per_seq.mean()),
            "kl/coef": self.kl_ctl.value,
            "response_length/mean": float(lengths.float().mean()),
            "response/finished_frac": sum(samples.finished) / len(samples),
            "rollout/samples": len(samples),
            "rollout/reissued_chunks": self.roles.rollout.last_reissued,
            # |sampler log-prob - learner log-prob| on sampled tokens: ~0 when the engine holds
            # exactly the learner's weights (the PPO ratio starts at 1).
            "rollout/logprob_gap": float(masked_mean((sampler - old_logp).abs(), mask)),
            "sync/bytes": sync.bytes, "sync/buckets": sync.buckets,
            **{f"timing/{k}_s": v for k, v in timer.seconds.items()},
            "timing/step_s": step_s,
            "throughput/tokens_per_s": tokens / step_s if step_s else 0.0,
        }
        for key in dict.fromkeys(k for s in stats for k in s):  # mean over ranks and mini-batches
            values = [s[key] for s in stats if key in s]
            metrics[key] = sum(values) / len(values)
        return metrics
