"""The PPO driver: one `step()` is the algorithm box of InstructGPT-style RLHF.

    generate -> (score | reference log-probs | values | old log-probs) in parallel
             -> KL-shaped rewards and advantages -> PPO epochs on policy and critic
             -> weight sync to the rollout engines

The driver holds no model; it moves ObjectRefs between actor groups and does the cheap
per-token arithmetic (pure functions in orchestrator/rl/). Launching the actors is in
orchestrator/launch.py.
"""
from __future__ import annotations

import random
import time
from contextlib import contextmanager
from dataclasses import dataclass

import ray
import torch

from rlhf.orchestrator.config import ExperimentConfig
from rlhf.orchestrator.experience import Experience, to_sequence_batch
from rlhf.orchestrator.groups import Scattered, wait_all
from rlhf.orchestrator.rl import (AdaptiveKLController, AdvantageInputs, AdvantageParams, FixedKLController,
                                  compute_advantages, masked_mean, masked_sum, masked_whiten, shape_rewards)


@dataclass
class Advantages:
    advantages: torch.Tensor  # [B, T-1]
    returns: torch.Tensor     # [B, T-1]
    kl: torch.Tensor          # [B, T-1] per-token KL estimate (0 outside the action mask)


def make_advantages(name: str, scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor,
                    values: torch.Tensor | None, mask: torch.Tensor, kl_coef: float, kl_estimator: str,
                    gamma: float, lam: float, n: int, whiten: bool) -> Advantages:
    """KL-shaped rewards, then advantages by estimator name.  Token tensors [B, T-1], scores [B].

    gae, reinforce_pp: r_t = -beta * KL_t, plus the score at the last response token.
    grpo, rloo: outcome-level, so the KL enters the sequence score: r = score - beta * sum_t KL_t.
    `whiten` normalises GAE advantages over the batch (group estimators normalise themselves).
    """
    rewards, kl = shape_rewards(scores, logp, ref_logp, mask, kl_coef, kl_estimator)
    params = AdvantageParams(gamma=gamma, lam=lam, n=n)
    if name in ("grpo", "rloo"):
        inputs = AdvantageInputs(mask=mask, scores=scores - kl_coef * masked_sum(kl, mask, dim=1))
    else:
        inputs = AdvantageInputs(mask=mask, scores=scores, rewards=rewards, values=values)
    advantages, returns = compute_advantages(name, inputs, params)
    if whiten and name == "gae":
        advantages = masked_whiten(advantages, mask)
    return Advantages(advantages, returns, kl)


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
        self._messages_ref = ray.put(prompts.messages)  # the reward actor's prompt texts, sent once

    def step(self, step: int, prompt_index: list[int]) -> dict:
        cfg, roles, timer = self.cfg, self.roles, PhaseTimer()
        n, use_critic = cfg.rollout.n_samples, roles.critic is not None

        # 1. Rollout: n samples per prompt from the engines, which hold the current policy.
        with timer("generate"):
            # Seeds advance by more than n x prompts per step so no two samples share one.
            samples = roles.rollout.generate(
                [self.prompts.token_ids[i] for i in prompt_index], n=n, temperature=cfg.rollout.temperature,
                top_p=cfg.rollout.top_p, max_new_tokens=cfg.rollout.max_new_tokens,
                seed=(cfg.seed * 1_000_003 + step) * (n * len(prompt_index) + 1))
            samples.prompt_index = [prompt_index[i] for i in samples.prompt_index]

        # 2. Experience: score, reference log-probs, values and the learner's own old
        #    log-probs are independent, so all four run at once; the driver waits once.
        with timer("experience"):
            batch = to_sequence_batch(samples, self.pad_id)
            mask, scattered = batch.action_mask, Scattered(batch)
            refs = {"score": [roles.reward.score.remote(samples, self._messages_ref)],
                    "ref": roles.reference.forward_refs("compute_logprobs", scattered,
                                                        temperature=cfg.rollout.temperature),
                    "old": roles.policy.forward_refs("compute_logprobs", scattered)}
            if use_critic:
                refs["values"] = roles.critic.forward_refs("compute_values", scattered)
            flat = [r for group in refs.values() for r in group]
            got = iter(wait_all(flat, self.timeout_s, "experience (reward, reference, policy, critic forward)"))
            results = {k: [next(got) for _ in v] for k, v in refs.items()}
            scores = results["score"][0]
            old_logp, ref_logp = torch.cat(results["old"]), torch.cat(results["ref"])
            values = torch.cat(results["values"]) * mask if use_critic else None

            # 3. KL-shaped rewards and advantages (pure functions, orchestrator/rl/).
            adv = make_advantages(cfg.ppo.advantage, torch.tensor(scores.total), old_logp, ref_logp, values, mask,
                                  self.kl_ctl.value, cfg.ppo.kl.estimator, cfg.ppo.gamma, cfg.ppo.lam, n,
                                  cfg.ppo.whiten_advantages)
            exp = Experience(batch, old_logp, ref_logp, adv.advantages, adv.returns, values)

        # 4. PPO epochs: every mini-batch is one optimizer step on every rank; all steps are
        #    queued at once (each actor runs its calls in order) and awaited together.
        with timer("train"):
            policy_refs, critic_refs = [], []
            for _ in range(cfg.ppo.epochs):
                minibatches = [Scattered(mb) for mb in self._minibatches(exp)]
                policy_refs += roles.policy.train_refs(
                    minibatches, clip_eps=cfg.ppo.clip, dual_clip=cfg.ppo.dual_clip,
                    entropy_coef=cfg.ppo.entropy_coef, loss_agg=cfg.ppo.loss_agg)
                if use_critic:
                    critic_refs += roles.critic.train_refs(minibatches, value_clip=cfg.ppo.value_clip,
                                                           loss_agg=cfg.ppo.loss_agg)
            stats = wait_all([r for mb in policy_refs + critic_refs for r in mb], self.timeout_s, "PPO train_step")

        # 5. Weight sync: the engines must sample from the updated policy next step.
        with timer("weight_sync"):
            sync = roles.sync.sync()

        kl_per_seq = masked_sum(adv.kl, mask, dim=1)
        self.kl_ctl.update(float(kl_per_seq.mean()), len(samples))
        return self._metrics(step, samples, scores, mask, kl_per_seq, old_logp, exp, stats, sync, timer)

    def _minibatches(self, exp: Experience) -> list[Experience]:
        """Shuffled mini-batches of ppo.train_batch_size samples (trailing padding trimmed)."""
        order = list(range(len(exp)))
        self.rng.shuffle(order)
        size = self.cfg.ppo.train_batch_size
        return [exp.select(torch.tensor(order[i:i + size])).trimmed() for i in range(0, len(exp), size)]

    def _metrics(self, step, samples, scores, mask, kl_per_seq, old_logp, exp, stats, sync, timer) -> dict:
        lengths = mask.sum(1)
        sampler = torch.zeros_like(old_logp)
        for i, lp in enumerate(samples.response_logprobs):
            start = int(mask[i].nonzero()[0]) if lengths[i] > 0 else 0
            sampler[i, start:start + len(lp)] = torch.tensor(lp)
        step_s = sum(timer.seconds.values())
        tokens = int(exp.sequences.attention_mask.sum())
        metrics = {
            "step": step,
            "reward/mean": sum(scores.total) / len(scores.total),
            **{f"reward/{k}": sum(v) / len(v) for k, v in scores.components.items()},
            "kl/mean": float(kl_per_seq.mean()),
            "kl/coef": self.kl_ctl.value,
            "response_length/mean": float(lengths.float().mean()),
            "response/finished_frac": sum(samples.finished) / len(samples),
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
